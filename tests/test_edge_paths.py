"""Paths that only some sizes, sign patterns or exact equalities reach.

Each test here fails on a small deliberate bug that the rest of the suite let through: the
block loop of the row-wise passes over weights above ``ROW_BLOCK`` elements, a slice holding
no positive value (only zeros and negatives), thresholds exactly at a row's score, the
comparisons of the collapse guard at its boundary, the single-input-channel weight-gradient
route on both sides of its size condition.
"""

import math

import pytest
import torch

from conftest import assert_close
from spafl import compact, reference, threshold_conv2d, threshold_linear, threshold_row_mask
from spafl.reference import ROW_BLOCK

# ----------------------------------------------------------------------------- row blocks


@pytest.mark.parametrize("shape", [(2048, 1024), (3, ROW_BLOCK + 5), (ROW_BLOCK // 64 + 3, 64)], ids=str)
def test_row_scores_in_blocks_equal_the_direct_mean(shape):
    # Above ROW_BLOCK elements the scores come from a loop over row blocks (a row longer than a
    # block is a block of its own); with one thread each row's mean is the direct one, bit for bit.
    assert math.prod(shape) > ROW_BLOCK
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    assert torch.equal(reference.row_scores(w), w.abs().mean(dim=1))
    w16 = w.to(torch.bfloat16)  # the block loop's cast path
    assert torch.equal(reference.row_scores(w16), w16.float().abs().mean(dim=1))


def test_row_wise_backward_passes_in_blocks_equal_their_formulas():
    g = torch.Generator().manual_seed(1)
    n, k = 2048, 1024  # 2^21 elements: several row blocks
    a, b = torch.randn(n, k, generator=g), torch.randn(n, k, generator=g)
    assert torch.equal(compact._row_dot(a, b), (a * b).sum(dim=1))
    r = torch.randn(n, generator=g)
    assert torch.equal(compact._sign_term(b, r, k), torch.sign(b) * (r / k)[:, None])
    dw, r_st = compact._straight_through_(a.clone(), b, k)
    torch.testing.assert_close(r_st, (a * b).sum(dim=1), rtol=0, atol=0)
    torch.testing.assert_close(dw, a + torch.sign(b) * (r_st / k)[:, None], rtol=1e-6, atol=1e-6)


def test_large_linear_layer_gradients_match_the_reference():
    # The compact backward of a weight above ROW_BLOCK elements (row blocks in r and the sign term).
    g = torch.Generator().manual_seed(2)
    n, k = 1100, 1000
    w = torch.randn(n, k, generator=g) / 30
    tau = reference.row_scores(w).quantile(0.5).expand(n).clone()
    x = torch.randn(3, k, generator=g)
    dy = torch.randn(3, n, generator=g)
    grads = {}
    for backend in ("reference", "compact"):
        leaves = [t.clone().requires_grad_() for t in (x, w, tau)]
        threshold_linear(*leaves, backend=backend).backward(dy)
        grads[backend] = [t.grad for t in leaves]
    for name, a, e in zip(("dx", "dW", "dtau"), grads["compact"], grads["reference"], strict=True):
        assert_close(a, e, torch.float32, name)


# ----------------------------------------------------------------------------- sign patterns


def test_nonzero_slices_see_slices_of_zeros_and_negatives():
    # A slice whose maximum is exactly 0 is still nonzero when it holds a negative value.
    t = torch.tensor([[0.0, -1.0, 0.0, 2.0], [-3.0, 0.0, 0.0, 0.0], [0.0, -2.0, 0.0, 0.0]])
    assert compact._nonzero_slices(t, 1).tolist() == [True, True, False, True]
    assert compact._nonzero_slices(t, 0).tolist() == [True, True, True]
    assert compact._nonzero_along(t, 1).tolist() == [0, 1, 3]


@pytest.mark.parametrize("mode", ["exact", "skip", "sample"])
def test_skip_zero_inputs_keeps_a_feature_that_is_never_positive(mode):
    # Feature 1 is 0 or negative in every row: live, its products count.
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 5, generator=g)
    x[:, 1] = torch.tensor([0.0, -1.5, 0.0, -0.5, 0.0, 0.0])
    x[:, 3] = 0.0  # a truly dropped feature beside it
    w, b = torch.randn(4, 5, generator=g), torch.randn(4, generator=g)
    tau = torch.zeros(4)
    want = threshold_linear(x, w, tau, b, backend="reference")
    got = threshold_linear(x, w, tau, b, backend="compact", skip_zero_inputs=True, backward_mode=mode)
    assert_close(got, want, torch.float32, "y")
    xc = torch.randn(2, 3, 5, 5, generator=g)
    xc[:, 1] = -xc[:, 1].abs()  # a channel with no positive value
    xc[:, 1, 0, 0] = 0.0
    wc = torch.randn(4, 3, 3, 3, generator=g)
    want = threshold_conv2d(xc, wc, torch.zeros(4), backend="reference")
    got = threshold_conv2d(xc, wc, torch.zeros(4), backend="compact", skip_zero_inputs=True, backward_mode=mode)
    assert_close(got, want, torch.float32, "y conv")


def test_exact_mode_pruned_unit_with_a_never_positive_output_gradient():
    # A pruned unit whose output gradient is 0 or negative everywhere still has r != 0: the
    # compact backward must not take it for a unit whose gradient vanishes.
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(5, 7, generator=g), torch.randn(3, 7, generator=g)
    tau = torch.zeros(3)
    tau[1] = 10.0  # unit 1 pruned
    dy = torch.randn(5, 3, generator=g)
    dy[:, 1] = torch.tensor([0.0, -1.0, 0.0, -2.0, 0.0])
    grads = {}
    for backend in ("reference", "compact"):
        leaves = [t.clone().requires_grad_() for t in (x, w, tau)]
        threshold_linear(*leaves, backend=backend, backward_mode="exact").backward(dy)
        grads[backend] = [t.grad for t in leaves]
    assert grads["reference"][2][1] != 0
    for name, a, e in zip(("dx", "dW", "dtau"), grads["compact"], grads["reference"], strict=True):
        assert_close(a, e, torch.float32, name)
    xc, wc = torch.randn(2, 2, 5, 5, generator=g), torch.randn(3, 2, 3, 3, generator=g)
    dyc = torch.randn(2, 3, 3, 3, generator=g)
    dyc[:, 1] = -dyc[:, 1].abs()
    dyc[0, 1, 0, 0] = 0.0
    conv = {}
    for backend in ("reference", "compact"):
        leaves = [t.clone().requires_grad_() for t in (xc, wc, tau)]
        threshold_conv2d(*leaves, backend=backend, backward_mode="exact").backward(dyc)
        conv[backend] = [t.grad for t in leaves]
    assert conv["reference"][2][1] != 0
    for name, a, e in zip(("dx", "dW", "dtau"), conv["compact"], conv["reference"], strict=True):
        assert_close(a, e, torch.float32, name)


# ----------------------------------------------------------------------------- exact equalities


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_threshold_equal_to_the_score_prunes_and_the_next_float_below_keeps(dtype):
    # active means score > tau, strictly: on every path (the host and the device row masks).
    w = torch.randn(6, 9, generator=torch.Generator().manual_seed(5), dtype=dtype)
    score = reference.row_scores(w)
    tau = score.clone()
    tau[1] = torch.nextafter(score[1], torch.tensor(-math.inf, dtype=dtype))
    tau[4] = torch.nextafter(score[4], torch.tensor(-math.inf, dtype=dtype))
    tau[2] = torch.nextafter(score[2], torch.tensor(math.inf, dtype=dtype))
    want = [False, True, False, False, True, False]
    assert threshold_row_mask(w, tau).mask.tolist() == want
    x = torch.randn(3, 9, dtype=dtype)
    for backend in ("reference", "compact"):
        for check in (True, False):  # (the host mask compares in two ways, with and without the check)
            y = threshold_linear(x, w, tau, backend=backend, check_finite=check)
            assert (y[:, [0, 2, 3, 5]] == 0).all() and (y[:, [1, 4]] != 0).all(), (backend, check)
    from spafl import ThresholdLinear

    layer = ThresholdLinear(9, 6, bias=False, dtype=dtype, collapse_density=None)
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.threshold.copy_(tau)
    assert layer.mask.tolist() == want
    assert (layer(x)[:, [0, 2, 3, 5]] == 0).all()


@pytest.mark.parametrize("on_host", [True, False])
def test_collapse_guard_fires_at_exactly_the_density(on_host):
    # density <= collapse_density fires, strictly above does not (n = 100: 1 unit is 0.01).
    from spafl._options import ThresholdOptions
    from spafl.functional import _guarded_row_mask

    w = torch.randn(100, 4, generator=torch.Generator().manual_seed(6))
    score = reference.row_scores(w)
    order = score.argsort(descending=True)
    for active, fires in ((1, True), (2, False), (0, True)):
        tau = torch.full((100,), 1e9)
        tau[order[:active]] = 0.0
        counter = torch.zeros((), dtype=torch.long)
        stored = torch.tensor(1.0)
        options = ThresholdOptions(collapse_density=0.01)
        rm = _guarded_row_mask(w, tau, "reference", not on_host, options, counter, stored)
        assert int(counter) == fires and bool((tau == 0).all()) == fires
        assert int(rm.mask.sum()) == (100 if fires else active)
        assert float(stored) == float(torch.tensor(1.0 if fires else active / 100))


def test_all_active_and_all_pruned_layers_on_every_cpu_backend():
    g = torch.Generator().manual_seed(8)
    x, w, b = torch.randn(4, 6, generator=g), torch.randn(5, 6, generator=g), torch.randn(5, generator=g)
    for tau, want in ((torch.full((5,), -1.0), x @ w.t() + b), (torch.full((5,), 1e9), b.expand(4, 5))):
        for backend in ("reference", "compact"):
            assert_close(threshold_linear(x, w, tau, b, backend=backend), want, torch.float32, backend)


# ----------------------------------------------------------------------------- size conditions


@pytest.mark.parametrize("kernel,size", [((5, 5), 12), ((3, 3), 8), ((3, 3), 36)], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_single_input_channel_layers_on_both_sides_of_the_route_condition(kernel, size, layout):
    # One input channel: dW from a forward convolution for large kernels or small outputs, from
    # the convolution's own backward otherwise (34 x 34 = 1156 output pixels > 1024) and for
    # channels-last inputs.
    g = torch.Generator().manual_seed(9)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(2, 1, size, size, generator=g).to(memory_format=fmt)
    w = torch.randn(4, 1, *kernel, generator=g)
    tau = reference.row_scores(w).sort().values[1].expand(4).clone()  # 2 of 4 filters active
    grads = {}
    for backend in ("reference", "compact"):
        leaves = [t.clone().requires_grad_() for t in (x, w, tau)]
        y = threshold_conv2d(*leaves, backend=backend)
        y.backward(torch.ones_like(y))
        grads[backend] = [t.grad for t in leaves]
    for name, a, e in zip(("dx", "dW", "dtau"), grads["compact"], grads["reference"], strict=True):
        assert_close(a, e, torch.float32, name)
