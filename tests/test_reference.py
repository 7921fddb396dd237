"""The plain-PyTorch reference against the spec's formulas (spafl-algorithm.md section 1)."""

import pytest
import torch
import torch.nn.functional as F

from spafl import reference, threshold_for_density

# ----------------------------------------------------------------------------- mask


def test_row_scores_are_mean_abs_over_all_fan_in():
    w = torch.randn(5, 3, 2, 2, dtype=torch.float64)
    expected = torch.stack([w[i].abs().sum() / 12 for i in range(5)])
    torch.testing.assert_close(reference.row_scores(w), expected)


def test_mask_is_strict_and_perm_lists_active_rows_first_sorted():
    w = torch.tensor([[1.0, -1.0], [0.5, 0.5], [2.0, 0.0], [-0.1, 0.1], [3.0, 3.0]])
    # scores: 1.0, 0.5, 1.0, 0.1, 3.0 ; tau equal to the score must prune (strictly greater)
    tau = torch.tensor([1.0, 0.4, 0.9, 0.2, 3.0])
    rm = reference.row_mask(w, tau)
    assert rm.mask.tolist() == [False, True, True, False, False]
    assert rm.perm.tolist() == [1, 2, 0, 3, 4]
    assert rm.count.tolist() == [2]
    assert rm.perm.dtype == torch.int32 and rm.count.dtype == torch.int32
    assert rm.collapsed is None


def test_collapse_guard_rebuilds_the_mask_of_tau_zero():
    w = torch.randn(200, 7)
    tau = torch.full((200,), 100.0)
    rm = reference.row_mask(w, tau, collapse_density=0.01)
    assert rm.collapsed.tolist() == [True]
    assert rm.mask.all() and rm.count.item() == 200
    # 2 active of 200 = 1% <= 1%: fires; 3 of 200 does not.
    tau = threshold_for_density(w, 2 / 200)
    assert reference.row_mask(w, tau, collapse_density=0.01).collapsed.item()
    tau = threshold_for_density(w, 3 / 200)
    rm = reference.row_mask(w, tau, collapse_density=0.01)
    assert not rm.collapsed.item() and rm.count.item() == 3


@pytest.mark.parametrize("density", [0.0, 0.3, 0.5, 1.0])
def test_threshold_for_density_is_exact(density):
    w = torch.randn(37, 11)
    tau = threshold_for_density(w, density)
    assert int(reference.row_mask(w, tau).mask.sum()) == round(density * 37)


# ----------------------------------------------------------------------------- backward


def _problem(m=9, n=7, k=5, dtype=torch.float64, density=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g, dtype=dtype)
    w = torch.randn(n, k, generator=g, dtype=dtype)
    b = torch.randn(n, generator=g, dtype=dtype)
    tau = threshold_for_density(w, density)
    dy = torch.randn(m, n, generator=g, dtype=dtype)
    return x, w, b, tau, dy


def test_backward_matches_the_spec_formulas_written_out():
    x, w, b, tau, dy = _problem()
    mask = reference.row_mask(w, tau).mask
    m = mask.double()
    dx, dw, dtau, db = reference.threshold_linear_backward(dy, x, w, m, mask, has_bias=True, mode="exact")
    g = dy.t() @ x  # dL/dW_hat
    r = (g * w).sum(1)
    torch.testing.assert_close(dtau, -r)
    torch.testing.assert_close(dw, m[:, None] * g + torch.sign(w) * r[:, None] / w.shape[1])
    torch.testing.assert_close(dx, dy @ (w * m[:, None]))
    torch.testing.assert_close(db, dy.sum(0))
    # r of a pruned unit is not zero: that is how it can come back.
    assert (~mask).any() and (r[~mask].abs() > 0).all()


def test_backward_equals_autograd_of_the_straight_through_surrogate():
    x, w, b, tau, dy = _problem(m=11, n=13, k=6)
    mask = reference.row_mask(w, tau).mask
    dx, dw, dtau, db = reference.threshold_linear_backward(dy, x, w, mask.double(), mask, has_bias=True)
    xs, ws, taus, bs = (t.clone().requires_grad_() for t in (x, w, tau, b))
    y = reference.straight_through_surrogate(xs, ws, taus, bs)
    torch.testing.assert_close(y, reference.threshold_linear_forward(x, w, mask, b))
    y.backward(dy)
    for got, want, name in ((dx, xs.grad, "dx"), (dw, ws.grad, "dW"), (dtau, taus.grad, "dtau"), (db, bs.grad, "db")):
        torch.testing.assert_close(got, want, msg=name)


def test_skip_mode_gives_pruned_rows_no_data_gradient():
    x, w, b, tau, dy = _problem(density=0.4)
    mask = reference.row_mask(w, tau).mask
    exact = reference.threshold_linear_backward(dy, x, w, mask.double(), mask, has_bias=True, mode="exact")
    skip = reference.threshold_linear_backward(dy, x, w, mask.double(), mask, has_bias=True, mode="skip")
    assert (skip[2][~mask] == 0).all() and (skip[1][~mask] == 0).all()
    torch.testing.assert_close(skip[2][mask], exact[2][mask])
    torch.testing.assert_close(skip[1][mask], exact[1][mask])
    torch.testing.assert_close(skip[0], exact[0])
    torch.testing.assert_close(skip[3], exact[3])


def test_sample_mode_with_the_whole_batch_is_exact_and_estimates_otherwise():
    x, w, b, tau, dy = _problem(m=64, density=0.4)
    mask = reference.row_mask(w, tau).mask
    exact = reference.threshold_linear_backward(dy, x, w, mask.double(), mask, has_bias=True)
    full = reference.threshold_linear_backward(dy, x, w, mask.double(), mask, has_bias=True, mode="sample",
                                               sample_fraction=1.0)
    for a, e in zip(full, exact, strict=True):
        torch.testing.assert_close(a, e)
    part = reference.threshold_linear_backward(dy, x, w, mask.double(), mask, has_bias=True, mode="sample",
                                               sample_fraction=0.25)
    idx = torch.arange(16) * 4
    r_est = ((dy[idx].t() @ x[idx]) * w).sum(1) * 4
    torch.testing.assert_close(part[2][~mask], -r_est[~mask])
    torch.testing.assert_close(part[2][mask], exact[2][mask])


class _SmoothStandIn(torch.autograd.Function):
    """Forward ``F.linear(x, W * mult, b)`` with the SMOOTH multiplier ``mult = m0 + s(W) - tau``
    (m0 a fixed 0/1 vector), backward from the reference's formulas with that multiplier.

    The real mask is a step function whose derivative is 0 almost everywhere, so finite
    differences cannot check the straight-through estimator. With the step replaced by a
    function whose derivative really is 1 in ``s - tau``, the spec's formulas become the exact
    gradient, and gradcheck verifies the reference's backward code against finite differences.
    """

    @staticmethod
    def forward(ctx, x, w, tau, b, m0):
        mult = m0 + reference.row_scores(w) - tau
        ctx.save_for_backward(x, w, mult, m0)
        return F.linear(x, w * mult[:, None], b)

    @staticmethod
    def backward(ctx, dy):
        x, w, mult, m0 = ctx.saved_tensors
        dx, dw, dtau, db = reference.threshold_linear_backward(dy, x, w, mult, m0 > 0, has_bias=True, mode="exact")
        return dx, dw, dtau, db, None


def test_gradcheck_of_the_reference_backward_on_the_smooth_stand_in():
    x, w, b, tau, _ = _problem(m=4, n=5, k=3)
    m0 = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    w = w + torch.sign(w) * 0.1  # keep |w| away from 0, where sign(w) is not differentiable
    inputs = tuple(t.clone().requires_grad_() for t in (x, w, tau, b)) + (m0,)
    assert torch.autograd.gradcheck(_SmoothStandIn.apply, inputs, eps=1e-6, atol=1e-6)


def test_forward_keeps_bias_on_pruned_units_and_zeroes_them_without():
    x, w, b, _, _ = _problem()
    mask = torch.zeros(7, dtype=torch.bool)
    y = reference.threshold_linear_forward(x, w, mask, b)
    torch.testing.assert_close(y, b.expand_as(y))
    assert (reference.threshold_linear_forward(x, w, mask, None) == 0).all()
