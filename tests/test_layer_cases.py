"""Threshold layers in the places a dense layer goes: an in-place ReLU after them, a
``torch.jit.trace`` of a model holding them, and inputs that reach a pruned unit as inf."""

import io
import warnings

import pytest
import torch
from torch import nn

from spafl import ThresholdConv2d, ThresholdLinear, threshold_for_density

BACKENDS = ["compact", "reference", pytest.param("triton", marks=pytest.mark.interpreter)]


def _pruned(layer, density):
    with torch.no_grad():
        layer.threshold.copy_(threshold_for_density(layer.weight, density))
    return layer


def _grads(model, x):
    x = x.detach().clone().requires_grad_(True)
    for p in model.parameters():
        p.grad = None
    y = model(x)
    y.square().sum().backward()
    return [y.detach(), x.grad, *(p.grad for p in model.parameters())]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["linear", "conv", "pointwise-channels-last"])
def test_in_place_relu_after_a_threshold_layer(backend, kind):
    # Autograd refuses in-place changes to a view made inside a custom Function: the layer's
    # output must not be one (the Triton 1x1 convolution's output was a permuted view).
    torch.manual_seed(0)
    if kind == "linear":
        layer, x = ThresholdLinear(8, 4, backend=backend), torch.randn(3, 2, 8)
    elif kind == "conv":
        layer, x = ThresholdConv2d(3, 6, 3, backend=backend), torch.randn(2, 3, 5, 5)
    else:
        layer = ThresholdConv2d(4, 6, 1, backend=backend).to(memory_format=torch.channels_last)
        x = torch.randn(2, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    _pruned(layer, 0.5)
    in_place = _grads(nn.Sequential(layer, nn.ReLU(inplace=True)), x)
    out_of_place = _grads(nn.Sequential(layer, nn.ReLU()), x)
    for a, b in zip(in_place, out_of_place, strict=True):
        assert torch.equal(a, b)


def _model(kind):
    torch.manual_seed(0)
    if kind == "linear":
        model = nn.Sequential(ThresholdLinear(8, 6), nn.ReLU(), ThresholdLinear(6, 3, bias=False))
        return model, torch.randn(4, 8), torch.randn(5, 8)
    model = nn.Sequential(ThresholdConv2d(2, 5, 3, padding=1), nn.ReLU(), ThresholdConv2d(5, 4, 2, stride=2))
    return model, torch.randn(2, 2, 6, 6), torch.randn(3, 2, 6, 6)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_jit_trace_recomputes_the_mask_and_keeps_straight_through_gradients(kind):
    model, x, other = _model(kind)
    _pruned(model[0], 0.5)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)  # no decision frozen into the trace
        traced = torch.jit.trace(model, x)
    torch.testing.assert_close(traced(other), model(other), rtol=1e-5, atol=1e-6)
    # The mask is part of the graph: pruning more units after tracing changes the traced model too.
    _pruned(model[2], 1 / 3)
    expected = model(other)
    torch.testing.assert_close(traced(other), expected, rtol=1e-5, atol=1e-6)
    # Saved and loaded without Python: the same outputs.
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    torch.testing.assert_close(torch.jit.load(buffer)(other), expected, rtol=1e-5, atol=1e-6)
    # Gradients of the traced model: those of the layers in exact mode (the reference's).
    eager = _grads(model, other)
    through_trace = _grads(traced, other)
    for a, b in zip(through_trace, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert model[0].threshold.grad.abs().sum() > 0  # (the pruned units' straight-through term is in it)


def test_jit_trace_in_training_mode_runs_the_collapse_guard_in_the_graph():
    torch.manual_seed(0)
    layer = ThresholdLinear(8, 10, collapse_density=0.2)
    x = torch.randn(4, 8)
    traced = torch.jit.trace(layer, x)  # density 1 while tracing: the guard does not fire
    assert int(layer.collapse_resets) == 0
    _pruned(layer, 0.1)  # at or below the guard's density: the traced call resets the thresholds
    y = traced(x)
    assert int(layer.collapse_resets) == 1 and bool((layer.threshold == 0).all())
    assert float(layer.previous_density) == pytest.approx(1.0)
    torch.testing.assert_close(y, layer.eval()(x), rtol=1e-5, atol=1e-6)


# The Triton kernels compute a tile's pruned positions with their weights loaded as 0 and store
# them (0 * inf = NaN) where they should store the bias: a select on `active` before the bias in
# the forward tiles fixes it (kernels/threshold_linear.py `_linear_fwd_tile` and the conv's).
TRITON_PRUNED_NAN = pytest.mark.xfail(strict=True, reason="Triton forward tiles store 0 * inf for pruned positions")


@pytest.mark.parametrize("backend", ["compact", "reference",
                                     pytest.param("triton", marks=[pytest.mark.interpreter, TRITON_PRUNED_NAN])])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_inf_input_reaching_a_pruned_unit_gives_its_bias_on_every_backend(backend, bias, kind):
    # A pruned unit outputs its bias (or 0), whatever the input; an active one sees the inf.
    torch.manual_seed(0)
    if kind == "linear":
        layer, x = ThresholdLinear(6, 4, bias=bias, backend=backend), torch.randn(3, 6)
        x[1, 2] = float("inf")
    else:
        layer, x = ThresholdConv2d(2, 4, 3, padding=1, bias=bias, backend=backend), torch.randn(2, 2, 4, 4)
        x[1, 0, 2, 2] = float("inf")
    _pruned(layer, 0.5)
    mask = layer.mask
    y = layer(x)
    pruned = y.transpose(0, 1)[~mask]
    expected = torch.zeros_like(pruned) if not bias else layer.bias.detach()[~mask].view(
        (-1,) + (1,) * (pruned.dim() - 1)).expand_as(pruned)
    assert torch.equal(pruned, expected)
    assert not torch.isfinite(y.transpose(0, 1)[mask]).all()  # the active units do see the inf


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_a_second_differentiation_is_refused_and_the_first_is_unchanged_by_create_graph(kind):
    # The backward is differentiable once: with create_graph=True the first gradients are the
    # usual ones, and differentiating them again raises instead of giving a wrong answer.
    torch.manual_seed(0)
    if kind == "linear":
        layer, x = _pruned(ThresholdLinear(6, 5), 0.6), torch.randn(4, 6, requires_grad=True)
    else:
        layer, x = _pruned(ThresholdConv2d(2, 5, 3), 0.6), torch.randn(2, 2, 5, 5, requires_grad=True)
    plain = torch.autograd.grad(layer(x).square().sum(), [x, layer.weight, layer.threshold])
    graphed = torch.autograd.grad(layer(x).square().sum(), [x, layer.weight, layer.threshold], create_graph=True)
    for a, b in zip(graphed, plain, strict=True):
        assert torch.equal(a.detach(), b)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        graphed[0].sum().backward()
