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


# ----------------------------------------------------------------------------- the kept-mask call


@pytest.fixture
def kept_calls(monkeypatch):
    """Records, per layer forward, whether the one-step call of a kept mask ran it."""
    from spafl import layers

    taken = []
    original = layers.linear_kept

    def recording(*args):
        y = original(*args)
        taken.append(y is not None)
        return y

    monkeypatch.setattr(layers, "linear_kept", recording)
    return taken


def _general(layer, x):
    """The layer's forward through the general path (the oracle of the one-step call)."""
    import spafl.functional as fn

    options = layer.forward_options
    w, tau, b, counter, previous = layer._call_tensors()
    return fn.linear_call(x, w, tau, b, options, counter, previous, *layer._eager_masks(options))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("rows", [3, 40])  # z kept (rows < fan_in: the dense small backward) or not
@pytest.mark.parametrize("pruned", [False, True])
@pytest.mark.parametrize("skip_zero_inputs", [False, True])
@pytest.mark.parametrize("grad", [True, False])
def test_kept_mask_call_is_the_general_call_bit_for_bit(kept_calls, dtype, has_bias, rows, pruned, skip_zero_inputs,
                                                        grad):
    import spafl

    torch.manual_seed(rows + 7 * pruned)
    layer = spafl.ThresholdLinear(24, 9, bias=has_bias, skip_zero_inputs=skip_zero_inputs, dtype=dtype)
    if pruned:
        with torch.no_grad():
            layer.threshold[[1, 4, 5]] = 10.0
    other = copy_layer(layer)
    x = torch.randn(rows, 24, dtype=dtype).relu_()
    x[:, 3] = 0  # (a dropped input feature under skip_zero_inputs)
    dy = torch.randn(rows, 9, dtype=dtype)
    outs = []
    for module, call in ((layer, layer), (other, lambda xi: _general(other, xi))):
        module(x)  # keeps the mask (the first forward scores the weight)
        xi = x.clone().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            y = call(xi)
        got = [y]
        if grad:
            y.backward(dy)
            got += [xi.grad, *(p.grad for p in module.parameters())]
        outs.append(got)
    # (the first forward has no kept mask to try; the oracle's forward does not record)
    assert kept_calls == [True], "the second forward of an unchanged layer takes the one-step call"
    for a, e in zip(*outs, strict=True):
        assert a.dtype == e.dtype and torch.equal(a, e)
    assert torch.equal(layer.collapse_resets, other.collapse_resets)
    assert torch.equal(layer.previous_density, other.previous_density)


def test_kept_mask_call_leaves_other_calls_to_the_general_path(kept_calls):
    import spafl

    torch.manual_seed(0)
    layer = spafl.ThresholdLinear(6, 4)
    x = torch.randn(5, 6)
    layer(x)
    kept_calls.clear()
    # each call below finds the mask current, but is not the one-step call's case
    y3 = layer(x.view(5, 1, 6))  # (not 2-D)
    torch.testing.assert_close(y3.view(5, 4), layer(x), rtol=0, atol=0)
    with pytest.raises(TypeError, match="x is torch.float64 but weight is torch.float32"):
        layer(x.double())
    with pytest.raises(ValueError, match="features in its last dimension"):
        layer(torch.randn(5, 7))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16
    traced = torch.jit.trace(layer, x, check_trace=False)
    torch.testing.assert_close(traced(x), layer(x), rtol=1e-6, atol=1e-6)
    # (the traced forward's guard writes the thresholds in place, device-side: the last forward scores again)
    assert kept_calls == [False, True, False, False, False, False, False], kept_calls
    layer(x)
    assert kept_calls[-1] is True
    # a bias reshaped behind the layer's back: the general path names it
    layer.bias.data = torch.zeros(3)
    with pytest.raises(ValueError, match="bias must have shape"):
        layer(x)
    assert kept_calls[-1] is False


def test_dense_small_backward_with_a_grad_sink_accumulates_as_the_general_path():
    # A fused optimizer that takes compact gradients (a sink on the weight): a pruned forward's
    # backward leaves its rows there, then a dense small one (thresholds back at 0) runs, before
    # any step. The accumulated gradient is the one of a layer without a sink.
    import spafl
    from spafl import _functions

    torch.manual_seed(0)
    layer = spafl.ThresholdLinear(16, 5)
    other = copy_layer(layer)
    x = torch.randn(3, 16)
    sink = _functions.grad_sink(layer.weight)
    for tau in (10.0, 0.0):
        for module in (layer, other):
            with torch.no_grad():
                module.threshold[[0, 2]] = tau
            module(x).sum().backward()
        if tau:
            assert sink.grad is not None  # (the pruned forward's rows are pending)
    sink.materialize()
    assert torch.equal(layer.weight.grad, other.weight.grad)
    assert torch.equal(layer.threshold.grad, other.threshold.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("value", [1, 3, 7, 64, 100, 1000003, 2**24 + 1])
def test_cached_divisor_divides_as_the_python_number(dtype, value):
    # (the straight-through term's r / fan_in: the cached 0-dim tensor must round as the number)
    torch.manual_seed(value % 1000)
    r = torch.cat([torch.randn(4096, dtype=dtype) * 10.0 ** torch.randint(-30, 30, (4096,)).to(dtype),
                   torch.tensor([0.0, -0.0, float("inf"), float("nan"), torch.finfo(dtype).tiny], dtype=dtype)])
    got = torch.div(r, compact._divisor(value, dtype))
    assert got.dtype == dtype
    assert torch.equal(got.view(-1)[:-2], torch.div(r, value)[:-2])
    assert torch.equal(got.isnan(), torch.div(r, value).isnan())
    assert torch.equal(got[-1], torch.div(r, value)[-1])


@pytest.mark.parametrize("n", [1, 3, 7, 100, 4096, 12345])
def test_cached_divisor_gives_the_stored_density_of_the_python_number(n):
    # (the device-side guard stores count / n, count an int32 [1] tensor, into an fp32 buffer)
    counts = torch.arange(0, n + 1, dtype=torch.int32).view(-1, 1)
    got = torch.div(counts, compact._divisor(n, torch.float32))
    expected = torch.div(counts, n)
    assert got.dtype == expected.dtype == torch.float32 and torch.equal(got, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("rows, fan_in, n_out", [(8, 64, 10), (1, 2, 1), (3, 5, 4)])
def test_dense_small_forward_is_the_general_path_bit_for_bit(dtype, has_bias, rows, fan_in, n_out):
    # With the full list of units given, the forward takes its short branch; without it the
    # general path (which finds every unit active itself) runs: the same output and state.
    torch.manual_seed(rows + fan_in)
    x = torch.randn(rows, fan_in, dtype=dtype)
    w = torch.randn(n_out, fan_in, dtype=dtype)
    b = torch.randn(n_out, dtype=dtype) if has_bias else None
    mask = torch.ones(n_out, dtype=torch.bool)
    y, state = compact.linear_forward(x, w, b, mask, units=torch.arange(n_out))
    y_general, general = compact.linear_forward(x, w, b, mask)
    assert y.dtype == y_general.dtype and torch.equal(y, y_general)
    assert y.data_ptr() != state.z.data_ptr()  # (a kept z stays private to the backward)
    assert state._replace(z=None) == general._replace(z=None) and state.small
    assert torch.equal(state.z, general.z)


def test_dense_small_forward_is_only_taken_where_it_applies(monkeypatch):
    # Cases one condition away from the short branch: the general path's state says why.
    torch.manual_seed(0)
    w, b = torch.randn(4, 6), torch.randn(4)
    mask, every = torch.ones(4, dtype=torch.bool), torch.arange(4)
    x = torch.randn(3, 6)
    assert not compact.linear_forward(x, w, b, mask.clone().index_fill_(0, torch.tensor([1]), False),
                                      units=torch.tensor([0, 2, 3]))[1].small  # a pruned unit
    assert compact.linear_forward(torch.randn(6, 6), w, b, mask, units=every)[1].z is None  # rows >= fan_in: no z
    assert not compact.linear_forward(x.half(), w.half(), b.half(), mask, units=every)[1].small  # cast
    x0 = x.clone()
    x0[:, 2] = 0
    assert compact.linear_forward(x0, w, b, mask, True, units=every)[1].cols is not None  # skip_zero_inputs
    monkeypatch.setattr(compact, "ROW_BLOCK", 23)
    assert not compact.linear_forward(x, w, b, mask, units=every)[1].small  # several row blocks
