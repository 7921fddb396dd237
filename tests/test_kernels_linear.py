"""Triton kernels against the reference: masks bit-exact, every output and gradient, every mode.

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set in conftest), so the
shapes stay small; on CUDA the same tests run natively, plus larger shapes (test_gpu.py).
"""

import pytest
import torch

from conftest import assert_close
from spafl import reference, threshold_for_density
from spafl.kernels import threshold_linear_bwd, threshold_linear_fwd, threshold_row_mask

pytestmark = pytest.mark.interpreter

# Odd and prime shapes: tile edges in every dimension, N smaller than one tile, K = 1.
SHAPES = [(37, 53, 41), (7, 13, 5), (3, 1, 17), (70, 67, 1), (33, 97, 65)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MODES = ["exact", "skip", "sample"]


def _inputs(m, n, k, dtype, density, device, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(device=device, dtype=dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(device=device, dtype=dtype)
    b = torch.randn(n, generator=g).to(device=device, dtype=dtype) if bias else None
    dy = torch.randn(m, n, generator=g).to(device=device, dtype=dtype)
    tau = threshold_for_density(w, density)
    return x, w, b, dy, tau


def _check_all(x, w, b, dy, tau, mode, dtype, sample_fraction=0.3, **options):
    rm = threshold_row_mask(w, tau)
    ref = reference.row_mask(w, tau)
    assert torch.equal(rm.mask.cpu(), ref.mask.cpu()), "mask differs from the reference"
    assert torch.equal(rm.perm.cpu(), ref.perm.cpu()), "compact index list differs from the reference"
    assert torch.equal(rm.count.cpu(), ref.count.cpu())
    assert_close(rm.score, ref.score, torch.float32, "row scores")

    y = threshold_linear_fwd(x, w, b, rm, **options)
    assert y.dtype == x.dtype
    assert_close(y, reference.threshold_linear_forward(x, w, ref.mask, b), dtype, "y")

    dx, dw, dtau = threshold_linear_bwd(dy, x, w, rm, mode=mode, sample_fraction=sample_fraction,
                                        threshold_dtype=tau.dtype, **options)
    rdx, rdw, rdtau, _ = reference.threshold_linear_backward(
        dy, x, w, ref.mask.to(w.dtype), ref.mask, has_bias=False, mode=mode, sample_fraction=sample_fraction
    )
    assert dx.dtype == dw.dtype == dtype and dtau.dtype == tau.dtype
    assert_close(dx, rdx, dtype, "dx")
    assert_close(dw, rdw, dtype, "dW")
    assert_close(dtau, rdtau, dtype, "dtau")
    return rm, y, dx, dw, dtau


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("mode", MODES)
def test_kernels_match_reference_fp32(shape, density, mode, device):
    _check_all(*_inputs(*shape, torch.float32, density, device), mode, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("mode", MODES)
def test_kernels_match_reference_half(dtype, density, mode, device):
    _check_all(*_inputs(37, 53, 41, dtype, density, device), mode, dtype)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_compacted_weight_path(mode, density, device):
    # The active rows copied to a contiguous buffer first, then GEMMs without the gather.
    _check_all(*_inputs(33, 97, 65, torch.float32, density, device), mode, torch.float32, compact_weight=True,
               density_hint=density)


def test_compact_weight_policy_from_the_environment(monkeypatch, device):
    from spafl.kernels import _config

    w = torch.randn(6, 4)
    monkeypatch.setenv("SPAFL_COMPACT_WEIGHT", "always")
    assert _config.use_compact_weight(None, "linear", w) and not _config.use_compact_weight(False, "linear", w)
    monkeypatch.setenv("SPAFL_COMPACT_WEIGHT", "never")
    assert not _config.use_compact_weight(None, "conv", w.view(6, 4, 1, 1).expand(6, 4, 3, 3))
    monkeypatch.setenv("SPAFL_COMPACT_WEIGHT", "auto")
    assert not _config.use_compact_weight(None, "linear", w)
    assert _config.use_compact_weight(None, "conv", torch.randn(6, 4, 3, 3))  # NCHW: compacted
    assert not _config.use_compact_weight(None, "conv", torch.randn(6, 4, 3, 3).to(memory_format=torch.channels_last))
    monkeypatch.setenv("SPAFL_COMPACT_WEIGHT", "sometimes")
    with pytest.raises(ValueError, match="SPAFL_COMPACT_WEIGHT"):
        _config.use_compact_weight(None, "linear", w)
    x, w, b, dy, tau = _inputs(5, 6, 7, torch.float32, 0.5, device)
    with pytest.raises(ValueError, match="SPAFL_COMPACT_WEIGHT"):
        threshold_linear_fwd(x, w, b, threshold_row_mask(w, tau))


def test_autotune_settings(monkeypatch):
    from spafl.kernels import _config

    assert not _config.autotune_enabled()  # the interpreter never autotunes
    assert _config.density_bucket(None) == "unknown"
    assert [_config.density_bucket(d) for d in (0.0, 0.1, 0.125, 0.2, 0.5, 0.7, 1.0)] == [
        "<=0.125", "<=0.125", "<=0.125", "<=0.25", "<=0.5", "<=1.0", "<=1.0"]
    # Candidates: the fixed configuration first; tail classes follow the block; limits and
    # fixed keys respected.
    fixed = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, **_config.tail_widths(128),
             "num_warps": 8, "num_stages": 3}
    metas = _config.candidate_metas("linear_fwd", fixed)
    assert metas[0] == fixed and len(metas) == len({tuple(sorted(m.items())) for m in metas}) > 1
    # (A widening candidate, to check that the tail classes follow it and that limits drop it;
    # one that only widens gives each warp a larger tile than the fixed one and is dropped.)
    monkeypatch.setitem(_config.CANDIDATES, "linear_fwd",
                        [*_config.CANDIDATES["linear_fwd"], {"BLOCK_N": 256, "BLOCK_M": 64}, {"BLOCK_N": 256}])
    widened = [m for m in _config.candidate_metas("linear_fwd", fixed) if m["BLOCK_N"] == 256]
    assert [m["BLOCK_M"] for m in widened] == [64]
    wide = widened[0]
    assert (wide["TAIL1"], wide["TAIL2"], wide["TAIL3"]) == (128, 64, 32)
    assert all(m["BLOCK_N"] <= 128 for m in _config.candidate_metas("linear_fwd", fixed, {"BLOCK_N": 16}))
    assert all(m["BLOCK_M"] == 128 for m in _config.candidate_metas("linear_fwd", fixed, fixed_keys=("BLOCK_M",)))
    monkeypatch.setattr(_config, "interpreter_enabled", lambda: False)
    monkeypatch.delenv("SPAFL_AUTOTUNE", raising=False)
    assert not _config.autotune_enabled()  # opt-in
    monkeypatch.setenv("SPAFL_AUTOTUNE", "0")
    assert not _config.autotune_enabled()
    monkeypatch.setenv("SPAFL_AUTOTUNE", "1")
    assert _config.autotune_enabled()
    with _config.fixed_configs():
        assert not _config.autotune_enabled()
    monkeypatch.setenv("SPAFL_AUTOTUNE", "0")
    with _config.autotuning(True):
        assert _config.autotune_enabled()
    monkeypatch.setenv("SPAFL_AUTOTUNE", "yes")
    with pytest.raises(ValueError, match="SPAFL_AUTOTUNE"):
        _config.autotune_enabled()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bias_and_pruned_outputs(dtype, device):
    x, w, b, dy, tau = _inputs(19, 23, 29, dtype, 0.3, device)
    rm = threshold_row_mask(w, tau)
    y = threshold_linear_fwd(x, w, b, rm)
    pruned = ~rm.mask
    # Pruned outputs are exactly the bias, written in the same launch.
    assert torch.equal(y[:, pruned], b[pruned].expand(19, -1))
    y0 = threshold_linear_fwd(x, w, None, rm)
    assert (y0[:, pruned] == 0).all()
    assert_close(y - b, y0, dtype, "y - b")


def test_strided_bias(device):
    x, w, _, dy, tau = _inputs(9, 6, 5, torch.float32, 0.5, device)
    bias = torch.randn(6, 3, device=device)[:, 1]
    assert bias.stride(0) == 3
    rm = threshold_row_mask(w, tau)
    assert_close(threshold_linear_fwd(x, w, bias, rm), reference.threshold_linear_forward(x, w, rm.mask, bias),
                 torch.float32, "y with a strided bias")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_weight_gradient_is_rounded_once(dtype, device):
    # dW = m*G + sign(W) r / K: the kernel keeps G in fp32 until the sign term is added, so it
    # matches the reference (fp32 math, one rounding) to within one rounding of the result.
    x, w, _, dy, tau = _inputs(64, 40, 48, dtype, 0.5, device, seed=5)
    rm = threshold_row_mask(w, tau)
    _, dw, _ = threshold_linear_bwd(dy, x, w, rm)
    _, rdw, _, _ = reference.threshold_linear_backward(dy, x, w, rm.mask.to(dtype), rm.mask, has_bias=False)
    ulp = torch.finfo(dtype).eps * rdw.abs().clamp_min(torch.finfo(dtype).tiny)
    assert ((dw.double() - rdw.to(dtype).double()).abs() <= ulp.double() + 1e-6 * rdw.abs().max()).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_every_output_element_is_written(dtype, device, poisoned_allocations):
    x, w, b, dy, tau = _inputs(33, 97, 65, dtype, 0.3, device)
    rm = threshold_row_mask(w, tau)
    assert torch.isfinite(threshold_linear_fwd(x, w, None, rm)).all()
    for mode in MODES:
        dx, dw, dtau = threshold_linear_bwd(dy, x, w, rm, mode=mode)
        assert torch.isfinite(dx).all() and torch.isfinite(dw).all() and torch.isfinite(dtau).all()


def test_non_contiguous_inputs(device):
    g = torch.Generator().manual_seed(3)
    # x and dy as transposed views, W as a column slice of a wider tensor.
    x = torch.randn(41, 37, generator=g).to(device).t()
    w = (torch.randn(53, 60, generator=g) / 7).to(device)[:, 5:46]
    dy = torch.randn(53, 37, generator=g).to(device).t()
    assert not (x.is_contiguous() or w.is_contiguous() or dy.is_contiguous())
    tau = threshold_for_density(w, 0.4)
    _check_all(x, w, None, dy, tau, "exact", torch.float32)


@pytest.mark.parametrize("mode", MODES)
def test_deterministic_across_runs(mode, device):
    x, w, b, dy, tau = _inputs(37, 53, 41, torch.float32, 0.3, device)
    first = [t.clone() for t in (*threshold_row_mask(w, tau)[:4],)]
    rm = threshold_row_mask(w, tau)
    for a, b_ in zip(first, rm[:4], strict=True):
        assert torch.equal(a, b_)
    out1 = (threshold_linear_fwd(x, w, b, rm), *threshold_linear_bwd(dy, x, w, rm, mode=mode))
    out2 = (threshold_linear_fwd(x, w, b, rm), *threshold_linear_bwd(dy, x, w, rm, mode=mode))
    for a, b_ in zip(out1, out2, strict=True):
        assert torch.equal(a, b_)


def test_threshold_equal_to_score_prunes(device):
    # Rows of constant magnitude 2^-j have an exactly representable mean |w| whatever the
    # summation order, so tau == score is a true tie: the comparison is strict, the row is pruned.
    k = 24
    mags = 2.0 ** -torch.arange(8, dtype=torch.float32)
    signs = torch.where(torch.rand(8, k) > 0.5, 1.0, -1.0)
    w = (mags[:, None] * signs).to(device)
    tau = mags.clone().to(device)
    tau[::2] -= 1e-3  # even rows strictly above their threshold
    rm = threshold_row_mask(w, tau)
    assert rm.mask.tolist() == [True, False] * 4
    assert torch.equal(rm.mask.cpu(), reference.row_mask(w, tau).mask.cpu())


@pytest.mark.parametrize("active", [0, 1, 2, 3])
def test_collapse_guard_matches_reference(active, device):
    w = torch.randn(200, 9).to(device)
    tau = threshold_for_density(w, active / 200)
    rm = threshold_row_mask(w, tau, collapse_density=0.01)
    ref = reference.row_mask(w, tau, collapse_density=0.01)
    assert rm.collapsed.item() == ref.collapsed.item() == (active <= 2)
    assert torch.equal(rm.mask.cpu(), ref.mask.cpu())
    assert torch.equal(rm.perm.cpu(), ref.perm.cpu())
    assert rm.count.item() == (200 if active <= 2 else active)


def test_empty_batch(device):
    x, w, b, dy, tau = _inputs(0, 13, 7, torch.float32, 0.5, device)
    rm = threshold_row_mask(w, tau)
    assert threshold_linear_fwd(x, w, b, rm).shape == (0, 13)
    dx, dw, dtau = threshold_linear_bwd(dy, x, w, rm)
    assert dx.shape == (0, 7) and (dw == 0).all() and (dtau == 0).all()


def test_launchers_reject_bad_operands(device):
    x, w, b, dy, tau = _inputs(5, 6, 7, torch.float32, 0.5, device)
    rm = threshold_row_mask(w, tau)
    with pytest.raises(ValueError, match="features"):
        threshold_linear_fwd(x[:, :6], w, b, rm)
    with pytest.raises(TypeError, match="float16"):
        threshold_linear_fwd(x.half(), w, b, rm)
    with pytest.raises(TypeError, match="float64"):
        threshold_linear_fwd(x.double(), w.double(), None, rm)
    with pytest.raises(ValueError, match="backward mode"):
        threshold_linear_bwd(dy, x, w, rm, mode="fast")
    with pytest.raises(ValueError, match="grad_y"):
        threshold_linear_bwd(dy[:, :3], x, w, rm)
    with pytest.raises(ValueError, match="threshold must have shape"):
        threshold_row_mask(w, tau[:3])
    with pytest.raises(ValueError, match="no compact index list"):
        threshold_linear_fwd(x, w, b, reference.row_mask(w, tau, with_perm=False))
    for hint in (-0.1, 1.5, "0.5", True):
        with pytest.raises(ValueError, match="density_hint"):
            threshold_linear_fwd(x, w, b, rm, density_hint=hint)
        with pytest.raises(ValueError, match="density_hint"):
            threshold_linear_bwd(dy, x, w, rm, density_hint=hint)


# ----------------------------------------------------------------------------- split reductions

# (rows, units, features): one row tile. The first splits dX's active positions over its two
# feature tiles (and the forward's four K blocks at density 1); the second splits the forward's
# ten K blocks over the one or two active blocks of density 0.1 and 0.5.
SPLIT_SHAPES = [(20, 150, 100), (45, 61, 300)]


@pytest.mark.parametrize("shape", SPLIT_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("split", [2, 3, 5])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 1.0])
def test_split_reductions_match_reference(shape, split, dtype, density, device):
    from spafl.kernels import _config
    from spafl.kernels import threshold_linear as tl_mod

    inputs = _inputs(*shape, dtype, density, device)
    with _config.forced_split(split):
        rm, y, dx, *_ = _check_all(*inputs, "skip", dtype)
        # Partials are summed in split order whichever program finishes last: bitwise repeatable.
        assert torch.equal(threshold_linear_fwd(inputs[0], inputs[1], inputs[2], rm), y)
        assert torch.equal(threshold_linear_bwd(inputs[3], *inputs[:2], rm, mode="skip")[0], dx)
    # Every split tile's last program reset its ticket.
    assert not tl_mod.split_tickets(torch.device(device), 1).any()


def test_split_plans_split_where_the_shape_allows(device):
    # The tests above run split reductions only if the plans do split these shapes.
    from spafl.kernels import _config
    from spafl.kernels import threshold_linear as tl_mod

    m, n, k = SPLIT_SHAPES[1]
    x, w, b, dy, tau = _inputs(m, n, k, torch.float32, 0.1, device)
    with _config.forced_split(5):
        _, plan, split = tl_mod._linear_fwd_plan(x, w, True, None, True, True)
        bwd = tl_mod._linear_bwd_plan(*_inputs(*SPLIT_SHAPES[0], torch.float32, 1.0, device)[:2],
                                      dy.new_empty(20, 150), "skip", 0.125, True, None, True)
    # One / two active blocks of 32 over two row tiles: 2 / 4 tiles over 8 programs.
    assert split.table[1] == 4 and split.table[2] == 2
    assert max(bwd.dx_split.table) == 4  # two dX tiles over 8 programs


def test_best_split_is_the_cost_models_choice():
    from spafl.kernels._config import best_split, forced_split

    # One tile, 64 blocks of 1000 MACs, no operand bytes, 1000-byte partials, a byte per MAC:
    # split s costs max(ceil(64 / s) * 1000, 2 * s * 1000); s = 6 (11 blocks each) is cheapest.
    assert best_split(1, 64, 1000, 0, 1000, 132, 1.0) == 6
    # Memory-bound (the operands dwarf the compute): no split.
    assert best_split(1, 64, 1000, 10**9, 1000, 132, 1.0) == 1
    # A tile per program already, or nothing to split: no split.
    assert best_split(132, 64, 10**6, 0, 1, 132, 1.0) == 1
    assert best_split(1, 1, 10**6, 0, 1, 132, 1.0) == 1
    assert best_split(0, 64, 10**6, 0, 1, 132, 1.0) == 1
    # Never more units than programs, never more parts than blocks.
    assert best_split(40, 64, 10**6, 0, 1, 132, 1.0) == 3
    assert best_split(1, 5, 10**6, 0, 1, 132, 1.0) == 5
    with forced_split(100):
        assert best_split(40, 64, 1, 10**9, 10**9, 132, 1.0) == 3
    with forced_split(2):
        assert best_split(1, 64, 1000, 0, 1000, 132, 1.0) == 2
