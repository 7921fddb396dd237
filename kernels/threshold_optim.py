"""Fused optimizer step of a threshold layer's weight: update, row scores, mask and compaction.

For a weight viewed as ``[N, K]`` (contiguous), its gradient, the optimizer's state and the
(already updated) thresholds ``tau [N]``, one launch

* updates every element of ``W`` as ``torch.optim.SGD`` (momentum, dampening, Nesterov, weight
  decay), ``torch.optim.Adam`` or ``torch.optim.AdamW`` would (no AMSGrad, no ``maximize``),
  and the state buffers with it;
* scores the updated rows, ``score[i] = mean_j |W[i, j]|`` (fp32, accumulated in the same tiles
  and order as ``_row_mask_kernel``), and stores ``mask[i] = score[i] > tau[i]``;
* lets its last program build ``perm`` / ``count`` and run the collapse guard, as the row-mask
  kernel does (:func:`kernels.threshold_mask._score_and_compact`).

So the one pass over ``W`` that every training step needs (the update touches every row: momentum
and weight decay reach pruned rows too) also produces the row mask of the next forward, which
then skips the row-mask launch.

16-bit weights: ``torch.optim`` keeps its state in the weight's dtype and rounds after every
operation; the kernel computes in fp32 and rounds at the same points (``ROUND``), so that it
follows ``torch.optim`` within an ulp per step instead of drifting away from it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._rowmask import RowMask
from ._config import cached_plan, cdiv, gpu_tiles, launch_settings, next_power_of_2
from .threshold_mask import _score_and_compact, fits_int32, ticket_counter

KINDS = {"sgd": 0, "adam": 1, "adamw": 2}


@triton.jit
def _rounded(x, DTYPE: tl.constexpr, ROUND: tl.constexpr):
    # The value torch.optim would hold after an operation on a 16-bit tensor (round to nearest
    # even). bf16 by hand: Triton's interpreter truncates in its fp32 -> bf16 conversion, and
    # the result is then exact in bf16, whichever conversion stores it.
    if ROUND:
        if DTYPE == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
            x = tl.where(x == x, bits.to(tl.float32, bitcast=True), x)  # (NaN stays NaN)
        else:
            x = x.to(DTYPE).to(tl.float32)
    return x


@triton.jit
def _fused_step_kernel(
    w_ptr,  # [N, K] weight, contiguous: updated in place
    g_ptr,  # [N, K] gradient, contiguous
    s1_ptr,  # [N, K] momentum buffer (SGD) / exp_avg (Adam); unused without momentum
    s2_ptr,  # [N, K] exp_avg_sq (Adam); unused for SGD
    tau_ptr,  # [N] thresholds (after this step's update)
    score_ptr,  # [N] fp32 out
    mask_ptr,  # [N] int8 out
    perm_ptr,  # [N] int32 out
    count_ptr,  # [1] int32 out
    collapsed_ptr,  # [1] int8 out (HAS_GUARD)
    previous_ptr,  # [1] float: the layer's previous_density (GUARD_PREVIOUS)
    ticket_ptr,  # [1] int32, 0 on entry and on exit
    gmask_ptr,  # [N] int8: the rows of g_ptr that hold the gradient (ROWS)
    r_ptr,  # [N] fp32: r of the other rows, owed sign(W) r / K (ROWS)
    N,
    K,
    lr,
    weight_decay,
    momentum,  # SGD: momentum; Adam: beta1
    dampening,  # SGD: dampening; Adam: beta2
    step_size,  # Adam: lr / (1 - beta1 ** step)
    bias_correction2_sqrt,  # Adam: sqrt(1 - beta2 ** step)
    eps,
    collapse_density,
    KIND: tl.constexpr,  # 0 SGD, 1 Adam, 2 AdamW
    HAS_DECAY: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,  # SGD
    FIRST: tl.constexpr,  # SGD: the momentum buffer starts as the gradient
    NESTEROV: tl.constexpr,
    HAS_GUARD: tl.constexpr,
    GUARD_PREVIOUS: tl.constexpr,  # the guard tests previous_ptr, not this mask's density
    ROUND: tl.constexpr,
    WIDE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    COMPACT_BLOCK: tl.constexpr,
    ROWS: tl.constexpr = False,  # g_ptr holds the backward's active rows only (rows_only backward)
    ROWS_TERM: tl.constexpr = False,  # ROWS: those rows lack sign(W) r / K too (G alone): added here
):
    pid = tl.program_id(0)
    dtype = w_ptr.dtype.element_ty
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    offs_k = tl.arange(0, BLOCK_K)
    if WIDE:
        base = rows.to(tl.int64)[:, None] * K + offs_k.to(tl.int64)[None, :]
    else:
        base = rows[:, None] * K + offs_k[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    if ROWS:
        live = tl.load(gmask_ptr + rows, mask=row_ok, other=0) != 0
        coef = (tl.load(r_ptr + rows, mask=row_ok, other=0.0) / K)[:, None]
    for k0 in range(0, K, BLOCK_K):
        offs = base + k0
        ok = row_ok[:, None] & (offs_k[None, :] < K - k0)
        w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        if ROWS:
            # A pruned row's gradient, as the backward's finish kernel would have written it:
            # 0 + sign(W) r / K, rounded to the weight dtype (r is 0 in skip mode).
            g = tl.load(g_ptr + offs, mask=ok & live[:, None], other=0.0).to(tl.float32)
            sign = tl.where(w > 0, 1.0, tl.where(w < 0, -1.0, 0.0))
            if ROWS_TERM:
                # Every row: G (0 where pruned) + sign(W) r / K, rounded to the weight dtype
                # (fp32: the bits of the dW GEMM that adds the term itself; 16-bit: G was rounded
                # when stored, as the reference rounds its G). The active rows round to nearest
                # even as torch does (MaskedGrad.dense()) in the interpreter too; the pruned rows
                # as the backward writes them (the interpreter's conversion truncates).
                g = g + sign * coef
                g = tl.where(live[:, None], _rounded(g, dtype, ROUND), g.to(dtype).to(tl.float32))
            else:
                owed = (tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32) + sign * coef).to(dtype).to(tl.float32)
                g = tl.where(live[:, None], g, owed)
        else:
            g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        if KIND == 0:
            if HAS_DECAY:
                g = _rounded(tl.fma(w, weight_decay, g), dtype, ROUND)
            if HAS_MOMENTUM:
                if FIRST:
                    buf = g
                else:
                    buf = tl.load(s1_ptr + offs, mask=ok, other=0.0).to(tl.float32)
                    buf = _rounded(buf * momentum, dtype, ROUND)
                    buf = _rounded(tl.fma(g, 1.0 - dampening, buf), dtype, ROUND)
                tl.store(s1_ptr + offs, _rounded(buf, dtype, ROUND).to(dtype), mask=ok)
                if NESTEROV:
                    g = _rounded(tl.fma(buf, momentum, g), dtype, ROUND)
                else:
                    g = buf
            w = tl.fma(g, -lr, w)
        else:
            if KIND == 2:
                if HAS_DECAY:
                    w = _rounded(w * (1.0 - lr * weight_decay), dtype, ROUND)
            if KIND == 1:
                if HAS_DECAY:
                    g = _rounded(tl.fma(w, weight_decay, g), dtype, ROUND)
            m1 = tl.load(s1_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            m2 = tl.load(s2_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            # exp_avg.lerp_(grad, 1 - beta1), in torch's two-sided form
            t = 1.0 - momentum
            diff = g - m1
            m1 = _rounded(tl.where(t < 0.5, tl.fma(diff, t, m1), tl.fma(diff, t - 1.0, g)), dtype, ROUND)
            # exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            m2 = _rounded(m2 * dampening, dtype, ROUND)
            m2 = _rounded(m2 + (1.0 - dampening) * g * g, dtype, ROUND)
            denom = _rounded(tl.sqrt_rn(m2), dtype, ROUND)
            denom = _rounded(tl.div_rn(denom, bias_correction2_sqrt), dtype, ROUND)
            denom = _rounded(denom + eps, dtype, ROUND)
            w = w + (-step_size) * m1 / denom
            tl.store(s1_ptr + offs, m1.to(dtype), mask=ok)  # (rounded above)
            tl.store(s2_ptr + offs, m2.to(dtype), mask=ok)
        w = tl.where(ok, _rounded(w, dtype, ROUND), 0.0)
        tl.store(w_ptr + offs, w.to(dtype), mask=ok)
        acc += tl.abs(w)
    # As the row-mask kernel ends: score, mask, and the last program to finish compacts.
    _score_and_compact(acc, K, rows, row_ok, tau_ptr, score_ptr, mask_ptr, perm_ptr, count_ptr, collapsed_ptr,
                       ticket_ptr, N, collapse_density, HAS_GUARD, COMPACT_BLOCK, previous_ptr, GUARD_PREVIOUS)


# The row-mask kernel's score columns (BLOCK_K): each row sums |W| in the same order, so that the
# scores (and masks) equal the ones the forward would have computed. A quarter of its rows per
# program: the update holds four operands per element; 32 rows spilled registers in the 16-bit
# Adam and Nesterov variants on ragged K (offline sm_90 compile, Triton 3.9: up to 341
# local-memory instructions), 16 in fp32 SGD's first step under Triton 3.6 (2).
_SCORE_BLOCK_N = 8
_SCORE_BLOCK_K = 128
_COMPACT_BLOCK = 1024


def fused_step(
    weight2d: torch.Tensor,
    grad2d: torch.Tensor,
    threshold: torch.Tensor,
    *,
    kind: str,
    lr: float,
    weight_decay: float = 0.0,
    state1: torch.Tensor | None = None,
    state2: torch.Tensor | None = None,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    first: bool = False,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    step: int = 1,
    collapse_density: float | None = None,
    previous_density: torch.Tensor | None = None,
    grad_rows: tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, bool] | None = None,
) -> RowMask:
    """One optimizer step of ``weight2d [N, K]`` (contiguous, updated in place) from ``grad2d``,
    and the row mask of the updated weight against ``threshold [N]``: what
    :func:`spafl.kernels.threshold_row_mask` would return for them afterwards, with the same
    guard. ``kind``: ``"sgd"`` (``state1``: the momentum buffer when ``momentum``; ``first``:
    it is initialised with the gradient, as torch.optim does at its first step), ``"adam"`` or
    ``"adamw"`` (``state1`` / ``state2``: ``exp_avg`` / ``exp_avg_sq``; ``step``: the step
    count after this step). State buffers are contiguous, of the weight's shape and dtype.
    ``previous_density`` (one element): the guard of ``collapse_timing="previous"``, which
    tests it instead of the new mask's density (and then masks ``score > 0``, as after the reset).
    ``grad_rows = (mask, r)``: ``grad2d`` holds only the rows where the backward's ``mask [N]``
    is set (a ``rows_only`` backward); every other row's gradient is ``sign(W) r / K``, formed
    here from ``r [N]`` (fp32) as the backward would have written it. ``(mask, r, True)``: the
    rows of ``grad2d`` lack their ``sign(W) r / K`` too (the Linear GEMM's ``G`` alone), and
    every row gets it here, from the ``W`` this step reads anyway."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    if weight2d.dim() != 2 or not weight2d.is_contiguous():
        raise ValueError(f"fused_step expects a contiguous 2-D weight view, got shape {tuple(weight2d.shape)}")
    n_rows, fan_in = weight2d.shape
    if n_rows == 0 or fan_in == 0:
        raise ValueError(f"weight must have at least one row and one column, got {tuple(weight2d.shape)}")
    buffers = [("grad", grad2d)]
    if kind != "sgd":
        buffers += [("exp_avg", state1), ("exp_avg_sq", state2)]
    elif momentum != 0.0:
        buffers.append(("momentum buffer", state1))
    for name, t in buffers:
        if t is None:
            raise ValueError(f"fused_step ({kind}) needs its {name}")
        if t.shape != weight2d.shape or t.dtype != weight2d.dtype or t.device != weight2d.device \
                or not t.is_contiguous():
            raise ValueError(f"the {name} must be contiguous {weight2d.dtype} of shape {tuple(weight2d.shape)} on "
                             f"{weight2d.device}, got {t.dtype} {tuple(t.shape)} on {t.device}")
    if threshold.shape != (n_rows,) or threshold.device != weight2d.device:
        raise ValueError(f"threshold must have shape ({n_rows},) on {weight2d.device}, got {tuple(threshold.shape)}")
    device = weight2d.device
    if threshold.stride(0) != 1:
        threshold = threshold.contiguous()
    score = torch.empty(n_rows, device=device, dtype=torch.float32)
    mask = torch.empty(n_rows, device=device, dtype=torch.bool)
    perm = torch.empty(n_rows, device=device, dtype=torch.int32)
    count = torch.empty(1, device=device, dtype=torch.int32)
    has_guard = collapse_density is not None
    collapsed = torch.empty(1, device=device, dtype=torch.int8) if has_guard else None  # (the kernel writes it)
    guard_previous = has_guard and previous_density is not None
    if guard_previous and (previous_density.numel() != 1 or previous_density.device != device):
        raise ValueError(f"previous_density must be one element on {device}, got {tuple(previous_density.shape)} on "
                         f"{previous_density.device}")
    adam = kind != "sgd"
    if adam:
        beta1, beta2 = betas
        s_a, s_b = beta1, beta2
        step_size = lr / (1 - beta1 ** step)
        bc2_sqrt = (1 - beta2 ** step) ** 0.5
    else:
        s_a, s_b, step_size, bc2_sqrt = momentum, dampening, 0.0, 1.0
    key = ("fused_step", weight2d.shape, weight2d.dtype, kind, weight_decay != 0.0, momentum != 0.0, first, nesterov,
           has_guard, guard_previous, launch_settings())
    grid, kwargs = cached_plan(key, lambda: _plan(weight2d, kind, weight_decay != 0.0, momentum != 0.0, first,
                                                  nesterov, has_guard, guard_previous))
    gmask, r = score, score  # (placeholders: not read without ROWS)
    if grad_rows is not None:
        if len(grad_rows) not in (2, 3):
            raise ValueError("grad_rows must be (mask, r) or (mask, r, rows_lack_term)")
        gmask, r = grad_rows[:2]
        rows_term = bool(grad_rows[2]) if len(grad_rows) == 3 else False
        if gmask.shape != (n_rows,) or r.shape != (n_rows,) or r.dtype != torch.float32 \
                or gmask.device != device or r.device != device:
            raise ValueError(f"grad_rows must be a mask and fp32 r of shape ({n_rows},) on {device}")
        gmask = gmask.view(torch.int8) if gmask.dtype == torch.bool else gmask
        kwargs = {**kwargs, "ROWS": True, "ROWS_TERM": rows_term}
    _fused_step_kernel[grid](
        weight2d, grad2d, state1 if state1 is not None else weight2d, state2 if state2 is not None else weight2d,
        threshold, score, mask.view(torch.int8), perm, count, collapsed if has_guard else count,
        previous_density if guard_previous else score, ticket_counter(device), gmask, r, n_rows, fan_in, float(lr),
        float(weight_decay), float(s_a), float(s_b), float(step_size), float(bc2_sqrt), float(eps),
        float(collapse_density) if has_guard else 0.0, **kwargs,
    )
    return RowMask(mask, perm, count, score, collapsed.view(torch.bool) if has_guard else None)


def _plan(weight2d: torch.Tensor, kind: str, decay: bool, has_momentum: bool, first: bool, nesterov: bool,
          has_guard: bool, guard_previous: bool) -> tuple[tuple, dict]:
    n_rows, fan_in = weight2d.shape
    compact_block = min(_COMPACT_BLOCK, next_power_of_2(n_rows)) if gpu_tiles() else 64
    return (cdiv(n_rows, _SCORE_BLOCK_N),), dict(
        KIND=KINDS[kind], HAS_DECAY=decay, HAS_MOMENTUM=has_momentum, FIRST=first, NESTEROV=nesterov,
        HAS_GUARD=has_guard, GUARD_PREVIOUS=guard_previous, ROUND=weight2d.dtype != torch.float32,
        WIDE=not fits_int32(weight2d),
        BLOCK_N=_SCORE_BLOCK_N, BLOCK_K=min(_SCORE_BLOCK_K, next_power_of_2(fan_in)),
        COMPACT_BLOCK=max(compact_block, 16), num_warps=4,
    )
