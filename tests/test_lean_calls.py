"""The short paths of a small layer's call: the compact backward of a dense small Linear
(bit-identical to the general path) and the launch settings read at every kernel launch."""

from __future__ import annotations

import os

import pytest
import torch

from spafl import compact


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("has_bias, need_dx", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("rows, fan_in, n_out", [(8, 64, 10), (3, 17, 5), (1, 2, 1)])
def test_dense_small_backward_is_the_general_path_bit_for_bit(dtype, has_bias, need_dx, rows, fan_in, n_out):
    # The general path with every unit listed (units = all rows) runs the same arithmetic
    # through its gathers and scatters.
    torch.manual_seed(rows * 100 + fan_in)
    x = torch.randn(rows, fan_in, dtype=dtype)
    w = torch.randn(n_out, fan_in, dtype=dtype)
    b = torch.randn(n_out, dtype=dtype) if has_bias else None
    dy = torch.randn(rows, n_out, dtype=dtype)
    mask = torch.ones(n_out, dtype=torch.bool)
    y, state = compact.linear_forward(x, w, b, mask)
    assert state.units is None and state.z is not None  # the fast path's case
    fast = compact.linear_backward(dy, x, w, mask, state, has_bias=has_bias, need_dx=need_dx)
    listed = state._replace(units=torch.arange(n_out))
    general = compact.linear_backward(dy, x, w, mask, listed, has_bias=has_bias, need_dx=need_dx)
    for name, a, g in zip(("dx", "dw", "dtau", "db"), fast, general, strict=True):
        if g is None:
            assert a is None, name
        else:
            assert a.dtype == g.dtype and torch.equal(a, g), name


def test_launch_settings_follow_the_environment_and_torch(monkeypatch):
    pytest.importorskip("triton")
    from spafl.kernels import _config

    before = _config.launch_settings()
    for name in ("SPAFL_AUTOTUNE", "SPAFL_COMPACT_WEIGHT", "TRITON_INTERPRET"):
        monkeypatch.setenv(name, "changed" + name)
        now = _config.launch_settings()
        assert now != before, name
        before = now
        monkeypatch.delenv(name)
        assert _config.launch_settings() != now, name
        before = _config.launch_settings()
    assert os.environ.get("SPAFL_AUTOTUNE") is None
    flag = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = not flag
        assert _config.launch_settings() != before
    finally:
        torch.backends.cuda.matmul.allow_tf32 = flag
    assert _config.launch_settings() == before


class _Scale(torch.nn.Module):
    def forward(self, w):
        return w * 3.0


@pytest.mark.parametrize("name", ["weight", "threshold", "bias"])
def test_parametrized_tensors_are_read_through_the_module(name):
    # A parametrization moves the tensor out of the module's parameter dictionary: the forward
    # must read the computed value, and see the parametrization's change of the original.
    from torch.nn.utils import parametrize

    import spafl

    torch.manual_seed(0)
    layer = spafl.ThresholdLinear(9, 6)
    with torch.no_grad():
        layer.threshold.copy_(torch.linspace(0.0, 0.3, 6))
    plain = copy_layer(layer)
    parametrize.register_parametrization(layer, name, _Scale())
    with torch.no_grad():
        getattr(plain, name).mul_(3.0)
    x = torch.randn(4, 9)
    torch.testing.assert_close(layer(x), plain(x), rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        getattr(layer.parametrizations, name).original.mul_(0.5)
        getattr(plain, name).mul_(0.5)
    torch.testing.assert_close(layer(x), plain(x), rtol=1e-6, atol=1e-6)


def test_functional_call_uses_the_given_tensors():
    import spafl

    torch.manual_seed(0)
    layer = spafl.ThresholdLinear(9, 6)
    x = torch.randn(4, 9)
    layer(x)
    params = {"weight": torch.randn(6, 9), "threshold": torch.full((6,), 0.5), "bias": torch.zeros(6)}
    y = torch.func.functional_call(layer, params, (x,))
    mask = params["weight"].abs().mean(1) > 0.5
    torch.testing.assert_close(y, x @ (params["weight"] * mask[:, None]).t(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias), rtol=1e-5,
                               atol=1e-5)


def copy_layer(layer):
    import copy

    return copy.deepcopy(layer)
