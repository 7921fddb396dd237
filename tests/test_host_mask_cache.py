"""The layers' cache of the last forward's row mask on the CPU (``spafl._guard.HostMaskCache``):
a forward reuses it only while the weight, the thresholds, the options and the guard's stored
density are as they were, and every kind of edit that PyTorch can see invalidates it. The oracle
is the mask scored from the current tensors (and a layer whose cache is dropped before every
forward, for the guard's buffers)."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import spafl
from spafl import _guard, reference


@pytest.fixture
def scored(monkeypatch):
    """Counts the forwards that scored the weight (the cache missed)."""
    calls = []
    original = _guard._host_row_mask

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(_guard, "_host_row_mask", counting)
    return calls


def _layer(**kwargs):
    torch.manual_seed(0)
    return spafl.ThresholdLinear(13, 7, **kwargs)


def _expected(layer, x):
    """The forward's output from a mask scored now (masked dense, the reference)."""
    with torch.no_grad():
        mask = reference.row_scores(layer.weight.detach()) > layer.threshold.detach()
        return reference.threshold_linear_forward(x, layer.weight, mask, layer.bias)


def _prune(layer, rows, value=10.0):
    with torch.no_grad():
        layer.threshold[rows] = value


def _check(layer, x, scored, misses):
    y = layer(x)
    torch.testing.assert_close(y, _expected(layer, x), rtol=1e-5, atol=1e-5)
    assert len(scored) == misses, f"{len(scored)} forwards scored the weight, expected {misses}"


def test_unchanged_layer_reuses_the_mask(scored):
    layer = _layer()
    x = torch.randn(5, 13)
    _prune(layer, [1, 4])
    _check(layer, x, scored, 1)
    _check(layer, x, scored, 1)
    layer(x).sum().backward()  # a backward writes gradients, not the weight
    _check(layer, x, scored, 1)
    assert layer.collapse_resets.item() == 0


@pytest.mark.parametrize("edit", [
    "optimizer_step", "copy_", "load_state_dict", "init", "detach_write", "no_grad_setitem",
    "data_reassign", "threshold_data_reassign", "threshold_copy_", "new_parameter",
])
def test_every_visible_edit_invalidates(scored, edit):
    layer = _layer()
    x = torch.randn(5, 13)
    _check(layer, x, scored, 1)
    if edit == "optimizer_step":
        opt = torch.optim.SGD([layer.threshold], lr=1.0)
        layer.threshold.grad = torch.full((7,), -10.0)  # raises every threshold: all rows pruned but guarded
        layer.threshold.grad[3:] = 0
        opt.step()
    elif edit == "copy_":
        with torch.no_grad():
            layer.weight.copy_(torch.randn(7, 13))
    elif edit == "load_state_dict":
        other = _layer()
        _prune(other, [0, 2, 5])
        layer.load_state_dict(other.state_dict())
    elif edit == "init":
        nn.init.normal_(layer.weight)
    elif edit == "detach_write":
        layer.weight.detach()[2].zero_()
    elif edit == "no_grad_setitem":
        _prune(layer, [6])
    elif edit == "data_reassign":
        layer.weight.data = layer.weight.detach() * torch.arange(7.0)[:, None]
    elif edit == "threshold_data_reassign":
        layer.threshold.data = torch.tensor([10.0, 10.0, 10.0, 0, 0, 0, 0])
    elif edit == "threshold_copy_":
        with torch.no_grad():
            layer.threshold.copy_(torch.linspace(0, 1, 7))
    elif edit == "new_parameter":
        layer.weight = nn.Parameter(torch.randn(7, 13))
    _check(layer, x, scored, 2)
    _check(layer, x, scored, 2)


def test_data_reassign_to_a_reused_address_is_seen(scored):
    # `.data = t` keeps the version counter, and a freed block's address comes back with a later
    # allocation of its size (here 4 kB blocks, which glibc hands back at once): two
    # reassignments between forwards can put new values at the address the cache saw. It holds
    # the storage it saw, so that address cannot be reused while it matters.
    torch.manual_seed(0)
    layer = spafl.ThresholdLinear(40, 25, collapse_density=None)
    x = torch.randn(5, 40)
    scale = torch.where(torch.arange(25) < 12, 0.01, 10.0)[:, None]
    for step in range(8):
        _prune(layer, slice(0, 25), 1.0)
        _check(layer, x, scored, len(scored) + 1)  # scored here (the thresholds changed)
        layer.weight.data = torch.randn(25, 40)
        layer.weight.data = torch.randn(25, 40).mul_(0.01 if step % 2 == 0 else scale)  # (no temporary)
        _check(layer, x, scored, len(scored) + 1)


def test_square_weight_transposed_in_place_of_data_is_seen(scored):
    torch.manual_seed(1)
    layer = spafl.ThresholdLinear(6, 6)
    with torch.no_grad():
        layer.weight.mul_(torch.arange(1.0, 7.0)[:, None])
        layer.threshold.fill_(0.5 * layer.weight.abs().mean().item())
    x = torch.randn(3, 6)
    _check(layer, x, scored, 1)
    layer.weight.data = layer.weight.data.t()  # same storage and pointer, other strides
    _check(layer, x, scored, 2)


def test_writes_through_data_in_place_need_forget_next_mask(scored):
    # The documented limit: in-place writes through `.data` do not bump the version counter.
    layer = _layer(collapse_density=None)
    x = torch.randn(5, 13)
    _check(layer, x, scored, 1)
    dense = layer(x)
    layer.threshold.data.fill_(10.0)  # prunes every unit, unseen
    assert torch.equal(layer(x), dense)
    assert len(scored) == 1
    layer.forget_next_mask()
    _check(layer, x, scored, 2)
    torch.testing.assert_close(layer(x), layer.bias.detach().expand(5, 7), rtol=0, atol=0)


def test_options_and_mode_changes_miss(scored):
    layer = _layer()
    x = torch.randn(5, 13)
    _check(layer, x, scored, 1)
    layer.eval()
    _check(layer, x, scored, 2)
    _check(layer, x, scored, 2)
    layer.train()
    _check(layer, x, scored, 3)
    layer.check_finite = False
    _check(layer, x, scored, 4)
    layer.backend = "reference"
    _check(layer, x, scored, 5)
    _check(layer, x, scored, 5)


def _guard_trace(layer, x, steps, cached: bool):
    """Per forward: (output, counter, stored density, thresholds) with or without the cache."""
    trace = []
    for step in range(steps):
        if not cached:
            layer.forget_next_mask()
        if step == 2:
            _prune(layer, slice(0, 7), 10.0)  # collapses: the guard fires
        y = layer(x)
        trace.append((y.detach().clone(), layer.collapse_resets.item(), layer.previous_density.item(),
                      layer.threshold.detach().clone()))
    return trace


@pytest.mark.parametrize("timing", ["current", "previous"])
def test_guard_state_matches_uncached_forwards(timing):
    x = torch.randn(5, 13)
    runs = []
    for cached in (True, False):
        layer = _layer(collapse_density=0.2, collapse_timing=timing)
        runs.append(_guard_trace(layer, x, 7, cached))
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
        assert a[1:3] == b[1:3]
        torch.testing.assert_close(a[3], b[3], rtol=0, atol=0)
    assert runs[0][-1][1] == 1  # the guard fired once


def test_zero_weight_rows_fire_the_guard_at_every_forward():
    # A collapsed layer whose reset thresholds cannot revive it fires at each forward, cached or not.
    layer = _layer(collapse_density=0.5)
    with torch.no_grad():
        layer.weight.zero_()
    x = torch.randn(5, 13)
    for step in range(1, 4):
        layer(x)
        assert layer.collapse_resets.item() == step


def test_stored_density_written_elsewhere_is_seen(scored):
    layer = _layer(collapse_density=0.3, collapse_timing="previous")
    x = torch.randn(5, 13)
    _check(layer, x, scored, 1)
    _check(layer, x, scored, 1)
    with torch.no_grad():
        layer.previous_density.fill_(0.1)  # the next guard fires
    _check(layer, x, scored, 2)
    assert layer.collapse_resets.item() == 1


def test_moves_copies_and_pickles_drop_the_cache(scored):
    layer = _layer()
    x = torch.randn(5, 13)
    layer(x)
    assert layer._host_masks()._entry is not None
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert "_host_mask_cache" not in clone.__dict__
        torch.testing.assert_close(clone(x), layer(x))
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)  # (a module of this test: not a user file)
    assert "_host_mask_cache" not in loaded.__dict__
    layer.double()
    assert layer._host_masks()._entry is None
    y = layer(x.double())
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, _expected(layer, x.double()))


def test_inference_tensors_are_not_cached():
    with torch.inference_mode():
        layer = _layer()
        x = torch.randn(5, 13)
        y1, y2 = layer(x), layer(x)
    assert layer._host_masks()._entry is None
    torch.testing.assert_close(y1, y2)


def test_gradients_unchanged_by_a_hit():
    layer = _layer(backward_mode="exact")
    _prune(layer, [0, 3])
    x = torch.randn(5, 13, requires_grad=True)
    grads = []
    for _ in range(2):  # a miss, then a hit
        for p in (x, *layer.parameters()):
            p.grad = None
        layer(x).square().sum().backward()
        grads.append([t.grad.clone() for t in (x, *layer.parameters())])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_conv_layers_keep_and_drop_the_mask(scored):
    torch.manual_seed(0)
    layer = spafl.ThresholdConv2d(3, 5, 3, padding=1)
    x = torch.randn(2, 3, 6, 7)

    def expected():
        with torch.no_grad():
            mask = reference.row_scores(layer.weight.detach().flatten(1)) > layer.threshold.detach()
            return torch.nn.functional.conv2d(x, layer.weight * mask[:, None, None, None], layer.bias, padding=1)

    for misses in (1, 1):
        torch.testing.assert_close(layer(x), expected(), rtol=1e-5, atol=1e-5)
        assert len(scored) == misses
    opt = torch.optim.SGD([layer.threshold], lr=1.0)
    layer.threshold.grad = -torch.tensor([10.0, 0, 10.0, 0, 0])  # prunes filters 0 and 2
    opt.step()
    for _ in range(2):
        y = layer(x)
        torch.testing.assert_close(y, expected(), rtol=1e-5, atol=1e-5)
        assert len(scored) == 2
    torch.testing.assert_close(y[:, 0], layer.bias[0].detach().expand(2, 6, 7), rtol=0, atol=0)
