"""The skip- and exact-mode backward that takes the forward's products (``z``; every unit's in
exact mode): ``r`` and the bias gradient from the pass that compacts ``dY``, and ``dW`` written
by its GEMM (no second pass), against the reference, the unfused backward, and the rows-only
contract of the fused optimizer step."""

import pytest
import torch
from test_kernels_linear import DTYPES, SHAPES, _inputs

from conftest import TOLERANCES, assert_close
from spafl import reference
from spafl.kernels import threshold_linear_bwd, threshold_linear_fwd, threshold_row_mask

pytestmark = pytest.mark.interpreter


def _fused(x, w, b, dy, rm, rows_only=False, need_dx=True, tau_dtype=torch.float32, mode="skip"):
    z = torch.empty((x.shape[0], w.shape[0]), dtype=torch.float32, device=x.device)
    y = threshold_linear_fwd(x, w, b, rm, z_out=z, z_all=mode == "exact")
    r = torch.empty(w.shape[0], dtype=torch.float32, device=x.device) if rows_only else None
    db = torch.empty_like(b) if b is not None else None
    dx, dw, dtau = threshold_linear_bwd(dy, x, w, rm, mode=mode, need_dx=need_dx, r_out=r, z=z, db_out=db,
                                        threshold_dtype=tau_dtype)
    return y, dx, dw, dtau, db, r, z


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("mode", ["skip", "exact"])
def test_fused_backward_matches_reference(shape, density, dtype, bias, mode, device):
    x, w, b, dy, tau = _inputs(*shape, dtype, density, device, bias=bias)
    rm = threshold_row_mask(w, tau)
    y, dx, dw, dtau, db, _, z = _fused(x, w, b, dy, rm, tau_dtype=tau.dtype, mode=mode)
    ref_mask = rm.mask
    assert_close(y, reference.threshold_linear_forward(x, w, ref_mask, b), dtype, "y")
    computed = int(rm.count) if mode == "skip" else w.shape[0]
    rz = (x.double() @ w.double().t())[:, rm.perm[:computed].long()]
    assert_close(z[:, :computed], rz, dtype, "z (the computed products)")
    rdx, rdw, rdtau, rdb = reference.threshold_linear_backward(
        dy, x, w, ref_mask.to(w.dtype), ref_mask, has_bias=bias, mode=mode)
    assert dx.dtype == dw.dtype == dtype and dtau.dtype == tau.dtype
    assert_close(dx, rdx, dtype, "dx")
    assert_close(dw, rdw, dtype, "dW")
    assert_close(dtau, rdtau, dtype, "dtau")
    if mode == "skip":
        assert (dw[~ref_mask] == 0).all() and (dtau[~ref_mask] == 0).all()
    if bias:
        assert db.dtype == dtype
        assert_close(db, rdb, dtype, "db")
    # The unfused backward computes the same gradients (r summed in another order).
    _, odw, odtau = threshold_linear_bwd(dy, x, w, rm, mode=mode, threshold_dtype=tau.dtype)
    assert_close(dw, odw, dtype, "dW against the unfused backward")
    assert_close(dtau, odtau, dtype, "dtau against the unfused backward")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("mode", ["skip", "exact"])
def test_fused_rows_only_writes_active_rows_and_r(dtype, density, mode, device, poisoned_allocations):
    x, w, b, dy, tau = _inputs(37, 53, 41, dtype, density, device)
    rm = threshold_row_mask(w, tau)
    _, dx, dw, dtau, db, r, _ = _fused(x, w, b, dy, rm, rows_only=True, mode=mode)
    _, rdw, rdtau, rdb = reference.threshold_linear_backward(
        dy, x, w, rm.mask.to(w.dtype), rm.mask, has_bias=True, mode=mode)[:4]
    assert torch.isfinite(dx).all() and torch.isfinite(dtau).all() and torch.isfinite(db).all()
    assert torch.isfinite(r).all()
    # r of every row: the reference's -dtau (skip mode: 0 for the pruned rows), and dtau = -r exactly.
    assert_close(r, -rdtau, dtype, "r")
    if mode == "skip":
        assert (r[~rm.mask] == 0).all()
    assert torch.equal(dtau, (-r).to(dtau.dtype))
    # The active rows hold m G alone: the fused optimizer step adds sign(W) r / K to every row.
    # Both checks fail if the GEMM adds the term (twice, with the step's) or if the rows miss G.
    act = rm.mask
    term = torch.sign(w.float()) * (r / w.shape[1])[:, None]
    rg = rdw.double() - torch.sign(w.double()) * (-rdtau.double() / w.shape[1])[:, None]  # m G
    assert_close(dw[act], rg[act], dtype, "dW (active rows: G)")
    assert_close((dw.float() + term)[act], rdw[act], dtype, "dW (active rows) + the step's term")
    if dtype == torch.float32 and density == 1.0:
        # (the term is not lost in fp32's tolerance: the test tells G from G + term; 16-bit
        # tolerances are too wide for that at these sizes)
        assert float(term[act].abs().max()) > 10 * TOLERANCES[dtype] * max(float(rdw.abs().max()), 1.0)
    assert_close(db, rdb, dtype, "db")


@pytest.mark.parametrize("mode", ["skip", "exact"])
def test_fused_backward_is_deterministic_and_matches_half_rounding(mode, device):
    x, w, b, dy, tau = _inputs(64, 40, 48, torch.bfloat16, 0.5, device, seed=5)
    rm = threshold_row_mask(w, tau)
    first = _fused(x, w, b, dy, rm, mode=mode)
    again = _fused(x, w, b, dy, rm, mode=mode)
    for a, c in zip(first[:5], again[:5], strict=True):
        assert torch.equal(a, c)
    # dW rounded once from fp32 (within one rounding of the reference's result).
    _, rdw, _, _ = reference.threshold_linear_backward(dy, x, w, rm.mask.to(w.dtype), rm.mask, has_bias=False,
                                                       mode=mode)
    dw = first[2]
    ulp = torch.finfo(dw.dtype).eps * rdw.abs().clamp_min(torch.finfo(dw.dtype).tiny)
    assert ((dw.double() - rdw.to(dw.dtype).double()).abs() <= ulp.double() + 1e-3 * rdw.abs().max()).all()


def test_sample_mode_ignores_z(device):
    # The same bits as without it.
    x, w, b, dy, tau = _inputs(20, 30, 25, torch.float32, 0.4, device)
    rm = threshold_row_mask(w, tau)
    z = torch.empty((20, 30), dtype=torch.float32, device=device)
    threshold_linear_fwd(x, w, b, rm, z_out=z, z_all=True)
    with_z = threshold_linear_bwd(dy, x, w, rm, mode="sample", z=z)
    without = threshold_linear_bwd(dy, x, w, rm, mode="sample")
    for a, c in zip(with_z, without, strict=True):
        assert torch.equal(a, c)


def test_empty_batch_and_bad_z(device):
    x, w, b, dy, tau = _inputs(0, 13, 7, torch.float32, 0.5, device)
    rm = threshold_row_mask(w, tau)
    _, dx, dw, dtau, db, r, _ = _fused(x, w, b, dy, rm, rows_only=True)
    assert dx.shape == (0, 7) and (dw == 0).all() and (dtau == 0).all() and (db == 0).all() and (r == 0).all()
    x, w, b, dy, tau = _inputs(5, 6, 7, torch.float32, 0.5, device)
    rm = threshold_row_mask(w, tau)
    for bad in (torch.empty(5, 6, device=device, dtype=torch.float64), torch.empty(5, 7, device=device),
                torch.empty(6, 5, device=device).t()):
        with pytest.raises(ValueError, match="z must be"):
            threshold_linear_fwd(x, w, b, rm, z_out=bad)
        with pytest.raises(ValueError, match="z must be"):
            threshold_linear_bwd(dy, x, w, rm, mode="skip", z=bad)
    with pytest.raises(ValueError, match="db_out"):
        threshold_linear_bwd(dy, x, w, rm, mode="skip", db_out=torch.empty(5, device=device))


@pytest.mark.parametrize("rows_only", [False, True], ids=["every-row", "rows-only"])
@pytest.mark.parametrize("mode", ["skip", "exact"])
def test_dx_and_dw_in_one_launch_equal_the_two_launches(mode, rows_only, device):
    # For compact gradients (rows only) with dX, the two GEMMs run in one launch
    # (_threshold_linear_bwd_kernel); without dX (a first layer), dW's launch alone; writing
    # every row of dW, two launches. The launches share their code: the same bits. Odd sizes
    # with an active count that straddles a block; more units than programs.
    from spafl.kernels import threshold_linear as tlk

    x, w, b, dy, tau = _inputs(45, 70, 150, torch.bfloat16, 0.45, device, seed=3)
    rm = threshold_row_mask(w, tau)
    launched = []
    for kernel in (tlk._threshold_linear_bwd_kernel, tlk._threshold_linear_bwd_dw_kernel,
                   tlk._threshold_linear_bwd_dx_kernel):
        original = kernel.run

        def run(*args, _name=kernel.__name__, _run=original, **kwargs):
            launched.append(_name)
            return _run(*args, **kwargs)

        kernel.run = run
    try:
        _, dx, dw, dtau, db, r, _ = _fused(x, w, b, dy, rm, rows_only=rows_only, mode=mode)
        assert launched == (["_threshold_linear_bwd_kernel"] if rows_only else
                            ["_threshold_linear_bwd_dx_kernel", "_threshold_linear_bwd_dw_kernel"])
        del launched[:]
        _, no_dx, dw_alone, dtau_alone, db_alone, r_alone, _ = _fused(x, w, b, dy, rm, rows_only=rows_only,
                                                                       need_dx=False, mode=mode)
        assert launched == ["_threshold_linear_bwd_dw_kernel"] and no_dx is None
    finally:
        for kernel in (tlk._threshold_linear_bwd_kernel, tlk._threshold_linear_bwd_dw_kernel,
                       tlk._threshold_linear_bwd_dx_kernel):
            del kernel.run
    rows = rm.perm[:int(rm.count)].long() if rows_only else slice(None)
    assert torch.equal(dw[rows], dw_alone[rows]) and torch.equal(dtau, dtau_alone) and torch.equal(db, db_alone)
    if rows_only:
        assert torch.equal(r, r_alone)
    rdx = reference.threshold_linear_backward(dy, x, w, rm.mask.to(w.dtype), rm.mask, has_bias=True, mode=mode)[0]
    assert_close(dx, rdx, torch.bfloat16, "dx")
