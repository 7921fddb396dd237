"""``spafl.add_threshold_penalty_grad``: the threshold penalty's gradient added after the
backward, against the penalty in the loss (``spafl.threshold_penalty``) on every CPU backend and
the Triton one (interpreter): same bits where a threshold's layer gives it one gradient, the
launches it saves, and its refusals."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import spafl
from spafl import ThresholdConv2d, ThresholdLinear

LAM = 0.002 * 0.7310585786300049  # a penalty coefficient as the schedule gives it (not a round number)


def _model(backend: str, mode: str = "skip", seed: int = 1, spread=(-0.05, 0.12)) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(ThresholdConv2d(1, 6, 3, padding=1, backend=backend, backward_mode=mode), nn.ReLU(),
                      nn.MaxPool2d(2), ThresholdConv2d(6, 8, 3, padding=1, backend=backend, backward_mode=mode),
                      nn.ReLU(), nn.Flatten(), ThresholdLinear(8 * 4 * 4, 13, backend=backend, backward_mode=mode),
                      nn.ReLU(), ThresholdLinear(13, 5, backend=backend, backward_mode=mode))
    with torch.no_grad():
        for layer in spafl.threshold_layers(m):
            layer.threshold.uniform_(*spread)  # some units pruned, some active
    return m


def _grads(m: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in m.named_parameters()}


def _both(backend: str, mode: str = "skip", steps: int = 3, **kw):
    """Two copies trained ``steps`` SGD steps: the penalty in the loss, and its gradient added."""
    a = _model(backend, mode, **kw)
    b = copy.deepcopy(a)
    oa, ob = (torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (a, b))
    gen = torch.Generator().manual_seed(3)
    for _ in range(steps):
        x, y = torch.randn(6, 1, 8, 8, generator=gen), torch.randint(0, 5, (6,), generator=gen)
        oa.zero_grad(set_to_none=True)
        ob.zero_grad(set_to_none=True)
        (F.cross_entropy(a(x), y) + LAM * spafl.threshold_penalty(a)).backward()
        F.cross_entropy(b(x), y).backward()
        spafl.add_threshold_penalty_grad(b, LAM)
        ga, gb = _grads(a), _grads(b)
        yield ga, gb
        oa.step()
        ob.step()


@pytest.mark.parametrize("backend", ["auto", "compact", "reference"])
@pytest.mark.parametrize("mode", ["skip", "exact"])
def test_same_bits_as_the_penalty_in_the_loss_on_the_cpu(backend, mode):
    for ga, gb in _both(backend, mode):
        for name in ga:
            assert torch.equal(ga[name], gb[name]), name


@pytest.mark.parametrize("spread", [(5.0, 6.0), (-6.0, -5.0)], ids=["all-pruned", "all-active"])
def test_same_bits_with_every_unit_pruned_or_active(spread):
    for ga, gb in _both("auto", steps=2, spread=spread):
        for name in ga:
            assert torch.equal(ga[name], gb[name]), name


def test_triton_backend_matches_the_penalty_in_the_loss():
    # The kernel path's penalty is one expression over the concatenated thresholds: the
    # gradient is the same elementwise, so the thresholds' gradients agree bit for bit too.
    for ga, gb in _both("triton", steps=2):
        for name in ga:
            assert torch.equal(ga[name], gb[name]), name


def test_a_threshold_without_a_gradient_gets_the_penalty_alone():
    m = _model("auto")
    ref = copy.deepcopy(m)
    (LAM * spafl.threshold_penalty(ref)).backward()
    spafl.add_threshold_penalty_grad(m, LAM)
    for a, b in zip(spafl.threshold_layers(m), spafl.threshold_layers(ref), strict=True):
        assert torch.equal(a.threshold.grad, b.threshold.grad)
        assert a.weight.grad is None


def test_frozen_thresholds_are_left_alone_and_a_list_is_taken():
    m = _model("auto")
    layers = list(spafl.threshold_layers(m))
    layers[1].threshold.requires_grad_(False)
    spafl.add_threshold_penalty_grad([layer.threshold for layer in layers], LAM)
    assert layers[1].threshold.grad is None
    assert all(layer.threshold.grad is not None for i, layer in enumerate(layers) if i != 1)


def test_a_shared_threshold_counts_once_per_layer_as_in_the_penalty():
    a, b = ThresholdLinear(4, 3), ThresholdLinear(4, 3)
    b.threshold = a.threshold  # tied
    m = nn.Sequential(a, b)
    with torch.no_grad():
        a.threshold.uniform_(-1, 1)
    ref = copy.deepcopy(m)
    (LAM * spafl.threshold_penalty(ref)).backward()
    spafl.add_threshold_penalty_grad(m, LAM)
    torch.testing.assert_close(a.threshold.grad, ref[0].threshold.grad, rtol=1e-6, atol=0)
    torch.testing.assert_close(a.threshold.grad, -2 * LAM * torch.exp(-a.threshold.detach()), rtol=1e-6, atol=0)
    # and once more on top of an existing gradient
    spafl.add_threshold_penalty_grad(m, LAM)
    torch.testing.assert_close(a.threshold.grad, -4 * LAM * torch.exp(-a.threshold.detach()), rtol=1e-6, atol=0)


def test_mixed_dtypes():
    m = nn.Sequential(ThresholdLinear(4, 3), ThresholdLinear(3, 2, dtype=torch.float64))
    with torch.no_grad():
        for layer in spafl.threshold_layers(m):
            layer.threshold.uniform_(-1, 1)
    ref = copy.deepcopy(m)
    (LAM * spafl.threshold_penalty(ref)).backward()
    spafl.add_threshold_penalty_grad(m, LAM)
    for a, b in zip(spafl.threshold_layers(m), spafl.threshold_layers(ref), strict=True):
        assert a.threshold.grad.dtype == a.threshold.dtype
        assert torch.equal(a.threshold.grad, b.threshold.grad)


def test_zero_coefficient_adds_nothing():
    m = _model("auto")
    spafl.add_threshold_penalty_grad(m, 0.0)
    assert all(layer.threshold.grad is None for layer in spafl.threshold_layers(m))


def test_launches_for_the_whole_model():
    # Four multi-tensor operations whatever the number of layers, and no autograd node.
    from test_layer_linear import _aten_ops

    m = _model("auto")
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 5, (4,))
    F.cross_entropy(m(x), y).backward()
    ops = _aten_ops(lambda: spafl.add_threshold_penalty_grad(m, LAM))
    assert ops == ["_foreach_neg", "_foreach_exp_", "_foreach_mul_", "_foreach_sub_"], ops


@pytest.mark.parametrize("coefficient, error, match", [
    (True, TypeError, "real number"),
    ("0.1", TypeError, "real number"),
    (torch.tensor(0.1), TypeError, "real number"),
    (float("nan"), ValueError, "finite"),
    (float("inf"), ValueError, "finite"),
])
def test_bad_coefficients_are_refused(coefficient, error, match):
    with pytest.raises(error, match=match):
        spafl.add_threshold_penalty_grad(_model("auto"), coefficient)


def test_bad_models_and_gradients_are_refused():
    with pytest.raises(ValueError, match="no threshold layers"):
        spafl.add_threshold_penalty_grad(nn.Linear(3, 2), LAM)
    with pytest.raises(TypeError, match="floating-point tensors; entry 1"):
        spafl.add_threshold_penalty_grad([torch.zeros(3), "tau"], LAM)
    m = ThresholdLinear(4, 3)
    m.threshold.grad = torch.zeros(3).to_sparse()
    with pytest.raises(ValueError, match="sparse"):
        spafl.add_threshold_penalty_grad(m, LAM)
