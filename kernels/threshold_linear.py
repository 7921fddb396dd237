"""Structured-sparse Linear kernels: only active rows of the weight are read or multiplied.

Notation (docstrings give shapes): ``X [M, K]`` input rows, ``W [N, K]`` weight, ``tau [N]``
thresholds, ``perm [N]`` / ``count [1]`` from :mod:`.threshold_mask` (active rows first, sorted),
``Y [M, N]`` output, ``dY [M, N]`` its gradient.

Forward:   ``Y[:, i] = X @ W[i] + b[i]`` for active i, ``Y[:, i] = b[i]`` (or 0) for pruned i.
Backward:  ``dX = dY[:, act] @ W[act]``;  ``G = dY^T X``;  ``r_i = sum_k G_ik W_ik``;
           ``dtau = -r``;  ``dW = m * G + sign(W) * r / K``  (straight-through estimator).

Every grid is an upper bound computed from host-side shapes; programs read ``count`` on the
device and either exit early, shrink their loops to zero trips, or write the pruned outputs.
Nothing here synchronises with the host.

How the work follows the density (``tests/work_count.py`` measures it):

* The pruned dimension (rows of ``W``) is never the tensor-core M dimension. In the forward and
  the weight gradient it is N: a program owns ``BLOCK_N`` positions of ``perm``, and the one
  program whose block straddles ``count`` computes only the narrowest power-of-two tile (at
  least ``MIN_UNITS``) that covers its active positions, then writes the pruned outputs. In
  ``dX`` it is the reduction dimension: full ``BLOCK_P`` steps over ``perm[:count]``, then
  ``TAIL_P``-wide steps for the remainder.
* ``dY``'s active columns are compacted once, into ``dyc [M, >= count]`` (column ``p`` holds
  ``dY[:, perm[p]]``; row-major, so both backward GEMMs read contiguous runs along ``p``). Only
  the active columns are copied, in every mode.
* The weight gradient is computed transposed, ``G^T = X^T dY`` (``[K, N]`` tiles), so that the
  units are again the N dimension.

Backward modes for the threshold gradient of pruned rows (``r_i`` of a pruned row needs that
row's dense work, ``dY[:, i] . (X W_i)``):

* ``exact``  (0): computed for every row; equals the reference. Tiles cover all of ``perm``;
  pruned positions read their ``dY`` columns in place (a gather): the documented dense part.
* ``skip``   (1): pruned rows get no data-path gradient: ``dtau_i = 0`` and ``dW_i = 0``.
* ``sample`` (2): ``r_i`` of pruned rows estimated from ``SAMPLE_COUNT`` batch rows
  ``0, step, 2*step, ...`` scaled by ``M / SAMPLE_COUNT``; ``dW_i = sign(W_i) * r_i / K``.
  Active and pruned positions run in separate tiles (one accumulator each).

Training in skip or exact mode (the layers' autograd Function) takes a shorter route: the forward
also stores its fp32 products by position, ``Z [M, N]`` (``Z[m, p] = X[m] . W[perm[p]]``; the
active positions in skip mode, every position in exact mode, whose forward then covers all of
``perm``: its one dense-shaped GEMM). Since ``r_i = sum_k G_ik W_ik = sum_m dY[m, i] Z[m, i]``,
the one pass over ``dY`` (:func:`_compact_grad_bias_kernel`) compacts it, forms every row's ``r``
and ``dtau`` and the bias gradient; the ``dW`` GEMM then writes ``G + sign(W) r / K`` of the
active rows directly in the weight's dtype (rounded once) and the pruned rows' ``sign(W) r / K``
(no GEMM for them). For a fused optimizer step (compact gradients, ``r_out``) it writes the active
rows' ``G`` alone and reads no ``W``: the step, which reads every row of ``W`` anyway, adds
``sign(W) r / K`` to every row. Three launches: forward, that pass, and ``dX`` with ``dW`` in one
persistent launch (:func:`_threshold_linear_bwd_kernel`: both GEMMs read only ``dyc`` and the
weights; the autotuner, the int64-offset variants and IEEE fp32 on the GPU keep them apart); no
second pass over ``dW``, no fp32 workspace of ``G``.

With ``compact_weight``, the active rows of ``W`` are first copied to a contiguous ``Wc [count, K]``
(:func:`compact_weight_rows`) and the GEMMs read ``Wc`` without the gather.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .._rowmask import RowMask, sample_rows
from ._config import (
    SUPPORTED_DTYPES,
    aligned16,
    autotune_enabled,
    best_split,
    bytes_per_mac,
    cached_plan,
    cdiv,
    dot_precision,
    every_candidate_enabled,
    gemm_config,
    gpu_tiles,
    grid_programs,
    interpreter_enabled,
    launch,
    launch_settings,
    next_power_of_2,
    sample_block,
    tail_widths,
    use_compact_weight,
    wide_config,
)
from .threshold_mask import (
    GuardWrites,
    Scratch,
    _guard_stores,
    fits_int32,
    flush_guard_writes,
    held_scratch,
    scratch,
)

BACKWARD_MODES = {"exact": 0, "skip": 1, "sample": 2}

# Row padding of the compacted dY (units): at least the widest block of positions a GEMM reads.
DYC_PAD = 128


@triton.jit
def _grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    # Visit tiles in groups of GROUP_M rows so that consecutive programs share operand tiles
    # in L2 (the ordering used by Triton's matmul tutorial).
    group_size = GROUP_M * num_pid_n
    group_id = pid // group_size
    first_m = group_id * GROUP_M
    rows_in_group = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows_in_group
    pid_n = (pid % group_size) // rows_in_group
    return pid_m, pid_n


# ----------------------------------------------------------------------------- split reductions


@triton.jit
def _split_fixup(acc, ws_ptr, lock_ptr, tile, split, n_split, BLOCK_M: tl.constexpr, SLOT: tl.constexpr,
                 WIDTH: tl.constexpr):
    # One split of a tile's reduction: store the partial ``acc [BLOCK_M, WIDTH]`` to its slot of
    # the fp32 workspace (slot ``tile * n_split + split``, SLOT elements apart), take a ticket,
    # and in the program that draws the last ticket sum every split's partial in split order
    # (the same order whoever is last: deterministic) and reset the ticket. Returns the sum and
    # whether this program holds it.
    row_offs = tl.arange(0, BLOCK_M)[:, None] * WIDTH
    col_offs = tl.arange(0, WIDTH)[None, :]
    tl.store(ws_ptr + (tile * n_split + split) * SLOT + row_offs + col_offs, acc)
    # Every thread's stores happen before the ticket (release); the last program sees them all
    # (acquire), as in the row-mask kernel's handoff.
    tl.debug_barrier()
    ticket = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel")
    last = ticket == n_split - 1
    # (The partial is dead once stored: one accumulator's registers, not two.)
    acc = tl.zeros([BLOCK_M, WIDTH], dtype=tl.float32)
    if last:
        for s in range(0, n_split):
            acc += tl.load(ws_ptr + (tile * n_split + s) * SLOT + row_offs + col_offs)
        tl.atomic_xchg(lock_ptr + tile, 0, sem="relaxed")
    return acc, last


@triton.jit
def _split_count(split_ptr, index, tiles, num_programs):
    # The split the launcher's table gives for `index` (blocks of active units), never more
    # units than programs when it splits (the workspace and tickets have one slot per program).
    n_split = tl.load(split_ptr + index)
    return tl.maximum(tl.minimum(n_split, num_programs // tl.maximum(tiles, 1)), 1)


# ----------------------------------------------------------------------------- forward


@triton.jit
def _linear_fwd_unit(
    x_ptr, w_ptr, b_ptr, y_ptr, z_ptr, perm_ptr, ws_ptr, lock_ptr, p0, count, hi, offs_m, m_ok, N, K, k_lo, k_hi,
    tile, split, n_split, stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn, stride_zm,
    STORE_Z: tl.constexpr, HAS_BIAS: tl.constexpr, COMPACT_W: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, WIDE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    SLOT: tl.constexpr, WIDTH: tl.constexpr,
):
    # Y[:, perm[p0 : p0 + WIDTH]] over the features [k_lo, k_hi): positions below hi computed
    # (count, or N for Z of every unit), active ones (below count) output, pruned ones get the
    # bias (or 0). With n_split > 1 the program that finishes the tile's last split writes it.
    offs_p = p0 + tl.arange(0, WIDTH)
    p_ok = offs_p < N
    computed = offs_p < hi
    rows = tl.load(perm_ptr + offs_p, mask=p_ok, other=0)
    if WIDE:
        rows = rows.to(tl.int64)
    if COMPACT_W:
        w_rows = offs_p  # row p of the compacted weight is W[perm[p]]
        if WIDE:
            w_rows = w_rows.to(tl.int64)
    else:
        w_rows = rows
    offs_k = tl.arange(0, BLOCK_K)
    # int64 only where offsets are formed, once: the loop's masks stay 32-bit (64-bit ones
    # spill the widest tiles).
    offs_kp = offs_k.to(tl.int64) if WIDE else offs_k
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_kp[None, :] * stride_xk
    # Gather of the active weight rows fused into the tile load ([BLOCK_K, WIDTH]).
    w_ptrs = w_ptr + w_rows[None, :] * stride_wn + offs_kp[:, None] * stride_wk
    acc = tl.zeros([BLOCK_M, WIDTH], dtype=tl.float32)
    # (No jit-function calls inside loops: the interpreter pays for each.)
    if WIDE:  # int64 bounds make the loop variable int64
        k_lo = tl.cast(k_lo, tl.int64)
        k_hi = tl.cast(k_hi, tl.int64)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k_ok = offs_k < (K - k0).to(tl.int32)
        a = tl.load(x_ptrs + k0 * stride_xk, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptrs + k0 * stride_wk, mask=k_ok[:, None] & computed[None, :], other=0.0)
        if UPCAST:  # the interpreter: bf16 tl.dot is unreliable there
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    last = n_split == 1
    if n_split > 1:
        acc, last = _split_fixup(acc, ws_ptr, lock_ptr, tile, split, n_split, BLOCK_M, SLOT, WIDTH)
    if last:
        if STORE_Z:
            # The pre-bias products, unrounded, by position: the backward's
            # r_p = sum_m dY[m, perm[p]] Z[m, p] needs no second pass over the weight gradient.
            tl.store(z_ptr + offs_m[:, None] * stride_zm + offs_p[None, :], acc,
                     mask=m_ok[:, None] & computed[None, :])
            # With Z of every unit (exact mode) the pruned positions were computed as well: they
            # output the bias (or 0).
            acc = tl.where((offs_p < count)[None, :], acc, 0.0)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rows, mask=p_ok, other=0.0).to(tl.float32)[None, :]
        y_ptrs = y_ptr + offs_m[:, None] * stride_ym + rows[None, :] * stride_yn
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & p_ok[None, :])


@triton.jit
def _linear_fill_pruned(
    b_ptr, y_ptr, perm_ptr, lo, hi, N, offs_m, m_ok, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, WIDE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK: tl.constexpr,
):
    # Y[:, perm[p]] = bias (or 0) for the pruned positions lo <= p < min(hi, N), hi - lo <= BLOCK.
    offs_p = lo + tl.arange(0, BLOCK)
    p_ok = offs_p < tl.minimum(hi, N)
    rows = tl.load(perm_ptr + offs_p, mask=p_ok, other=0)
    if WIDE:
        rows = rows.to(tl.int64)
    val = tl.zeros([BLOCK_M, BLOCK], dtype=tl.float32)
    if HAS_BIAS:
        val += tl.load(b_ptr + rows, mask=p_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + rows[None, :] * stride_yn
    tl.store(y_ptrs, val.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & p_ok[None, :])


@triton.jit
def _tile_width(rem, BLOCK: tl.constexpr, TAIL1: tl.constexpr, TAIL2: tl.constexpr, TAIL3: tl.constexpr):
    # The narrowest tile class that covers `rem` active positions of a block.
    return tl.where(rem > TAIL1, BLOCK, tl.where(rem > TAIL2, TAIL1, tl.where(rem > TAIL3, TAIL2, TAIL3)))


@triton.jit
def _threshold_linear_fwd_kernel(
    x_ptr,  # [M, K]
    w_ptr,  # [N, K], or [>= count, K] compacted (COMPACT_W)
    b_ptr,  # [N] (only with HAS_BIAS), contiguous
    perm_ptr,  # [N] int32: active rows ascending, then pruned rows
    count_ptr,  # [1] int32: active rows
    split_ptr,  # [cdiv(N, BLOCK_N) + 1] int32: splits of K for each number of active blocks
    ws_ptr,  # [programs * BLOCK_M * BLOCK_N] fp32 scratch: partial tiles of split reductions
    lock_ptr,  # [>= programs] int32, zero: tickets of split tiles (reset by their last program)
    y_ptr,  # [M, N] out
    z_ptr,  # [M, N] fp32 out (STORE_Z): Z[m, p] = X[m] . W[perm[p]], p < count (Z_ALL: every p)
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_ym,
    stride_yn,
    stride_zm,
    guard_flag_ptr,  # [1] int8: the collapse guard fired (GUARD_WRITES; kernels.threshold_mask.GuardWrites)
    guard_tau_ptr,  # [N] thresholds, unit stride: set to 0 where it fired (GUARD_WRITES)
    guard_resets_ptr,  # [1] int64: the reset counter, + 1 where it fired (GUARD_WRITES)
    guard_previous_ptr,  # [1] fp32 out: count / N (GUARD_WRITES)
    HAS_BIAS: tl.constexpr,
    COMPACT_W: tl.constexpr,
    UPCAST: tl.constexpr,  # compute the dot in fp32 (interpreter: bf16 tl.dot is unreliable there)
    DOT_PRECISION: tl.constexpr,
    WIDE: tl.constexpr,  # int64 element offsets
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # positions of perm per program
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    TAIL1: tl.constexpr,  # narrower tiles for the block that straddles count: TAIL1 >= TAIL2 >= TAIL3
    TAIL2: tl.constexpr,
    TAIL3: tl.constexpr,
    STORE_Z: tl.constexpr = False,
    Z_ALL: tl.constexpr = False,  # Z of the pruned units too (exact mode's r): tiles over all of perm
    GUARD_WRITES: tl.constexpr = False,  # the guard's writes for a mask built earlier, by program 0
    GUARD_BLOCK: tl.constexpr = 64,
):
    # Persistent: a fixed number of programs (at most one per SM) share the work that the
    # device-side count defines. Work units are (output tile, split of K): the tiles cover the
    # active blocks of perm; the split of K comes from the launcher's table for this number of
    # active blocks, so that a few active blocks still occupy every program. Then the programs
    # share the pruned outputs (bias or 0).
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    count = tl.load(count_ptr)
    hi = count
    if Z_ALL:
        hi = count * 0 + N
    tiles_m = tl.cdiv(M, BLOCK_M)
    n_active = tl.cdiv(hi, BLOCK_N)
    tiles = tiles_m * n_active
    n_split = _split_count(split_ptr, n_active, tiles, num_programs)
    k_blocks = tl.cdiv(K, BLOCK_K)
    chunk = tl.maximum(tl.cdiv(k_blocks, n_split), 1)
    n_split = tl.maximum(tl.cdiv(k_blocks, chunk), 1)  # no empty split
    for u in range(pid, tiles * n_split, num_programs):
        tile = u // n_split
        split = u - tile * n_split
        pid_m, pid_p = _grouped_tile(tile, tiles_m, n_active, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        if WIDE:
            offs_m = offs_m.to(tl.int64)
        m_ok = offs_m < M
        p0 = pid_p * BLOCK_N
        k_lo = split * chunk * BLOCK_K
        k_hi = tl.minimum(k_lo + chunk * BLOCK_K, K)
        rem = hi - p0
        if rem > TAIL1:
            _linear_fwd_unit(x_ptr, w_ptr, b_ptr, y_ptr, z_ptr, perm_ptr, ws_ptr, lock_ptr, p0, count, hi, offs_m,
                             m_ok, N, K, k_lo, k_hi, tile, split, n_split, stride_xm, stride_xk, stride_wn, stride_wk,
                             stride_ym, stride_yn, stride_zm, STORE_Z, HAS_BIAS, COMPACT_W, UPCAST, DOT_PRECISION,
                             WIDE, BLOCK_M, BLOCK_K, BLOCK_M * BLOCK_N, BLOCK_N)
        elif rem > TAIL2:
            _linear_fwd_unit(x_ptr, w_ptr, b_ptr, y_ptr, z_ptr, perm_ptr, ws_ptr, lock_ptr, p0, count, hi, offs_m,
                             m_ok, N, K, k_lo, k_hi, tile, split, n_split, stride_xm, stride_xk, stride_wn, stride_wk,
                             stride_ym, stride_yn, stride_zm, STORE_Z, HAS_BIAS, COMPACT_W, UPCAST, DOT_PRECISION,
                             WIDE, BLOCK_M, BLOCK_K, BLOCK_M * BLOCK_N, TAIL1)
        elif rem > TAIL3:
            _linear_fwd_unit(x_ptr, w_ptr, b_ptr, y_ptr, z_ptr, perm_ptr, ws_ptr, lock_ptr, p0, count, hi, offs_m,
                             m_ok, N, K, k_lo, k_hi, tile, split, n_split, stride_xm, stride_xk, stride_wn, stride_wk,
                             stride_ym, stride_yn, stride_zm, STORE_Z, HAS_BIAS, COMPACT_W, UPCAST, DOT_PRECISION,
                             WIDE, BLOCK_M, BLOCK_K, BLOCK_M * BLOCK_N, TAIL2)
        else:
            _linear_fwd_unit(x_ptr, w_ptr, b_ptr, y_ptr, z_ptr, perm_ptr, ws_ptr, lock_ptr, p0, count, hi, offs_m,
                             m_ok, N, K, k_lo, k_hi, tile, split, n_split, stride_xm, stride_xk, stride_wn, stride_wk,
                             stride_ym, stride_yn, stride_zm, STORE_Z, HAS_BIAS, COMPACT_W, UPCAST, DOT_PRECISION,
                             WIDE, BLOCK_M, BLOCK_K, BLOCK_M * BLOCK_N, TAIL3)
    # Pruned outputs: the blocks from the one that straddles count to the end, past the tile
    # class that the straddling block computed (Z_ALL: the tiles wrote them all).
    first = count // BLOCK_N
    n_fill = tl.cdiv(N, BLOCK_N) - first
    if Z_ALL:
        n_fill = n_fill * 0
    for f in range(pid, tiles_m * n_fill, num_programs):
        fm = f // n_fill
        p0 = (first + f - fm * n_fill) * BLOCK_N
        offs_m = fm * BLOCK_M + tl.arange(0, BLOCK_M)
        if WIDE:
            offs_m = offs_m.to(tl.int64)
        rem = count - p0
        lo = p0 + tl.where(rem > 0, _tile_width(rem, BLOCK_N, TAIL1, TAIL2, TAIL3), 0)
        _linear_fill_pruned(b_ptr, y_ptr, perm_ptr, lo, p0 + BLOCK_N, N, offs_m, offs_m < M, stride_ym, stride_yn,
                            HAS_BIAS, WIDE, BLOCK_M, BLOCK_N)
    if GUARD_WRITES:
        # Last, when the tiles' registers are free (first, it spilled under Triton 3.6); no
        # program reads the thresholds, the counter or the stored density: no barrier.
        if pid == 0:
            _guard_stores(tl.load(guard_flag_ptr) != 0, count, N, guard_tau_ptr, guard_resets_ptr,
                          guard_previous_ptr, GUARD_BLOCK)


# ----------------------------------------------------------------------------- compactions


@triton.jit
def _compact_grad_kernel(
    dy_ptr,  # output gradient: [M, N] (Linear) or [B, N, Ho, Wo] (Conv2d), any strides
    perm_ptr,  # [N] int32
    count_ptr,  # [1] int32
    dyc_ptr,  # [M, >= count] out, row stride stride_cm, unit column stride: dyc[m, p] = dY[m, perm[p]]
    M,
    N,
    PLANE,  # a batch row m is the pixel (m // PLANE, (m % PLANE) // WIDTH, m % WIDTH); 1, 1 for Linear
    WIDTH,
    stride_dyb,
    stride_dyh,
    stride_dyw,
    stride_dyn,
    stride_cm,
    UNIT_MAJOR: tl.constexpr,  # dY's units are its contiguous dimension (Linear, channels-last)
    WIDE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    # Copies the active columns of dY (positions p < count of perm), so that the backward GEMMs
    # read contiguous rows. Units-major gradients are read along the units; NCHW gradients are
    # read along the pixels and transposed in registers, so both sides stay coalesced.
    # M tiles on grid axis 0, whose limit is 2^31 - 1 (axis 1 stops at 65535).
    pid_m = tl.program_id(0)
    pid_p = tl.program_id(1)
    count = tl.load(count_ptr)
    if pid_p * BLOCK_P >= count:
        return
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = offs_p < count
    rows = tl.load(perm_ptr + offs_p, mask=p_ok, other=0)
    if WIDE:
        rows = rows.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if WIDE:
        offs_m = offs_m.to(tl.int64)
    m_ok = offs_m < M
    b = offs_m // PLANE
    hw = offs_m - b * PLANE
    h = hw // WIDTH
    src = b * stride_dyb + h * stride_dyh + (hw - h * WIDTH) * stride_dyw
    dst = dyc_ptr + offs_m[:, None] * stride_cm + offs_p[None, :]
    if UNIT_MAJOR:
        tile = tl.load(dy_ptr + src[:, None] + rows[None, :] * stride_dyn, mask=m_ok[:, None] & p_ok[None, :])
        tl.store(dst, tile, mask=m_ok[:, None] & p_ok[None, :])
    else:
        tile = tl.load(dy_ptr + src[None, :] + rows[:, None] * stride_dyn, mask=p_ok[:, None] & m_ok[None, :])
        tl.store(dst, tl.trans(tile), mask=m_ok[:, None] & p_ok[None, :])


@triton.jit
def _compact_grad_bias_kernel(
    dy_ptr,  # [M, N] output gradient, any strides
    perm_ptr,  # [N] int32
    count_ptr,  # [1] int32
    z_ptr,  # [M, N] fp32: the forward's Z[m, p] = X[m] . W[perm[p]] (active positions; Z_ALL: all)
    dyc_ptr,  # [M, >= count] out, unit column stride: dyc[m, p] = dY[m, perm[p]]
    r_ptr,  # [N] fp32 out, by row: r = sum_m dY[m, i] Z[m, i] (skip mode: 0 for pruned rows)
    dtau_ptr,  # [N] out, by row: -r
    db_ptr,  # [N] out (HAS_BIAS): sum_m dY[m, j], rounded once to its dtype
    M,
    N,
    stride_dym,
    stride_dyn,
    stride_zm,
    stride_cm,
    HAS_BIAS: tl.constexpr,
    WIDE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_P: tl.constexpr,
    Z_ALL: tl.constexpr = False,  # exact mode: z holds every position, r of every row
):
    # The skip- or exact-mode backward's one pass over dY: the active columns compacted (as
    # _compact_grad_kernel), each active row's r from the forward's Z (so the weight-gradient
    # GEMM can finish its rows itself), and the bias gradient of every column (a pruned unit's
    # output is its bias). A program owns BLOCK_P positions and the same BLOCK_P columns, over the
    # whole batch: every sum runs in registers in a fixed order (deterministic, no atomics).
    pid = tl.program_id(0)
    count = tl.load(count_ptr)
    offs_p = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = offs_p < N
    active = offs_p < count
    hi = count
    if Z_ALL:
        hi = count * 0 + N
    computed = offs_p < hi
    rows = tl.load(perm_ptr + offs_p, mask=p_ok, other=0)
    if WIDE:
        rows = rows.to(tl.int64)
    offs_j = tl.arange(0, BLOCK_M)
    r_acc = tl.zeros([BLOCK_M, BLOCK_P], dtype=tl.float32)
    if pid * BLOCK_P < hi:
        for m0 in range(0, M, BLOCK_M):
            offs_m = m0 + offs_j
            m_ok = offs_m < M
            ok = m_ok[:, None] & computed[None, :]
            if WIDE:
                offs_m = offs_m.to(tl.int64)
            dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + rows[None, :] * stride_dyn, mask=ok, other=0.0)
            tl.store(dyc_ptr + offs_m[:, None] * stride_cm + offs_p[None, :], dy, mask=m_ok[:, None] & active[None, :])
            z = tl.load(z_ptr + offs_m[:, None] * stride_zm + offs_p[None, :], mask=ok, other=0.0)
            r_acc += dy.to(tl.float32) * z
    r = tl.sum(r_acc, axis=0)
    tl.store(r_ptr + rows, r, mask=p_ok)
    tl.store(dtau_ptr + rows, (-r).to(dtau_ptr.dtype.element_ty), mask=p_ok)
    if HAS_BIAS:
        # Columns in their own order (coalesced), not through perm.
        cols = offs_p
        if WIDE:
            cols = cols.to(tl.int64)
        b_acc = tl.zeros([BLOCK_M, BLOCK_P], dtype=tl.float32)
        for m0 in range(0, M, BLOCK_M):
            offs_m = m0 + offs_j
            ok = (offs_m < M)[:, None] & p_ok[None, :]
            if WIDE:
                offs_m = offs_m.to(tl.int64)
            b_acc += tl.load(dy_ptr + offs_m[:, None] * stride_dym + cols[None, :] * stride_dyn, mask=ok,
                             other=0.0).to(tl.float32)
        tl.store(db_ptr + cols, tl.sum(b_acc, axis=0).to(db_ptr.dtype.element_ty), mask=p_ok)


@triton.jit
def _compact_weight_kernel(
    w_ptr,  # [N, ...] weight: element (row, j) at row * stride_wn + (j % INNER) * stride_wi + ...
    perm_ptr,  # [N] int32
    count_ptr,  # [1] int32
    wc_ptr,  # [>= count, K] out, contiguous rows: wc[p, j] = W[perm[p], j]
    K,
    INNER,  # j = (r * KW + s) * INNER + c for a convolution (INNER = channels); K for Linear
    stride_wn,
    stride_wi,  # stride of the inner index c
    stride_wh,  # strides of r and s (0 for Linear)
    stride_ww,
    stride_cn,
    KW: tl.constexpr,
    WIDE: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Copies the active rows of W, in the GEMMs' K order, into a contiguous buffer.
    pid_p = tl.program_id(0)
    pid_k = tl.program_id(1)
    count = tl.load(count_ptr)
    if pid_p * BLOCK_P >= count:
        return
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = offs_p < count
    rows = tl.load(perm_ptr + offs_p, mask=p_ok, other=0)
    if WIDE:
        rows = rows.to(tl.int64)
    offs_j = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    if WIDE:
        offs_j = offs_j.to(tl.int64)
    rs = offs_j // INNER
    c = offs_j - rs * INNER
    r = rs // KW
    src = rows[:, None] * stride_wn + (c * stride_wi + r * stride_wh + (rs - r * KW) * stride_ww)[None, :]
    ok = p_ok[:, None] & (offs_j < K)[None, :]
    tile = tl.load(w_ptr + src, mask=ok)
    if WIDE:
        offs_p = offs_p.to(tl.int64)
    tl.store(wc_ptr + offs_p[:, None] * stride_cn + offs_j[None, :], tile, mask=ok)


# ----------------------------------------------------------------------------- dX


@triton.jit
def _linear_dx_unit(
    dyc_ptr, w_ptr, perm_ptr, dx_ptr, ws_ptr, lock_ptr, offs_m, m_ok, offs_k, k_ok, p_lo, p_hi, tile, split, n_split,
    stride_cm, stride_wn, stride_wk, stride_dxm, stride_dxk,
    COMPACT_W: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, TAIL_P: tl.constexpr,
):
    # dX tile over the active positions [p_lo, p_hi): full BLOCK_P steps, then TAIL_P steps for
    # the remainder; with n_split > 1 the program that finishes the tile's last split writes it.
    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    full = p_hi - (p_hi - p_lo) % BLOCK_P
    offs_j = tl.arange(0, BLOCK_P)
    a_ptrs = dyc_ptr + offs_m[:, None] * stride_cm + offs_j[None, :]
    for p0 in range(p_lo, full, BLOCK_P):
        if COMPACT_W:
            w_rows = p0 + offs_j
        else:
            w_rows = tl.load(perm_ptr + p0 + offs_j)
        if WIDE:
            w_rows = w_rows.to(tl.int64)
        a = tl.load(a_ptrs + p0, mask=m_ok[:, None], other=0.0)
        b = tl.load(w_ptr + w_rows[:, None] * stride_wn + offs_k[None, :] * stride_wk, mask=k_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    offs_t = tl.arange(0, TAIL_P)
    t_ptrs = dyc_ptr + offs_m[:, None] * stride_cm + offs_t[None, :]
    for p0 in range(full, p_hi, TAIL_P):
        p_ok = p0 + offs_t < p_hi
        if COMPACT_W:
            w_rows = p0 + offs_t
        else:
            w_rows = tl.load(perm_ptr + p0 + offs_t, mask=p_ok, other=0)
        if WIDE:
            w_rows = w_rows.to(tl.int64)
        a = tl.load(t_ptrs + p0, mask=m_ok[:, None] & p_ok[None, :], other=0.0)
        b = tl.load(w_ptr + w_rows[:, None] * stride_wn + offs_k[None, :] * stride_wk,
                    mask=p_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    last = n_split == 1
    if n_split > 1:
        acc, last = _split_fixup(acc, ws_ptr, lock_ptr, tile, split, n_split, BLOCK_M, BLOCK_M * BLOCK_K, BLOCK_K)
    if last:
        tl.store(dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk,
                 acc.to(dx_ptr.dtype.element_ty), mask=m_ok[:, None] & k_ok[None, :])


@triton.jit
def _linear_dx_split(count, split_ptr, M, K, num_programs, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                     BLOCK_P: tl.constexpr):
    # dX's work units are (dX tile, split of the active positions): the split from the
    # launcher's table for this number of active blocks (many active units over few tiles),
    # at most num_programs units (the workspace's slots). Returns (tiles, splits, chunk).
    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(K, BLOCK_K)
    p_blocks = tl.cdiv(count, BLOCK_P)
    n_split = _split_count(split_ptr, p_blocks, tiles, num_programs)
    chunk = tl.maximum(tl.cdiv(p_blocks, n_split), 1)
    n_split = tl.maximum(tl.cdiv(p_blocks, chunk), 1)  # no empty split; one unit per tile at count 0
    return tiles, n_split, chunk


@triton.jit
def _linear_dx_work(
    u, n_split, chunk, count, dyc_ptr, w_ptr, perm_ptr, ws_ptr, lock_ptr, dx_ptr, M, K,
    stride_cm, stride_wn, stride_wk, stride_dxm, stride_dxk,
    COMPACT_W: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, TAIL_P: tl.constexpr, GROUP_M: tl.constexpr,
):
    # dX's work unit u (see _linear_dx_split).
    tile = u // n_split
    split = u - tile * n_split
    pid_m, pid_k = _grouped_tile(tile, tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    if WIDE:
        offs_m = offs_m.to(tl.int64)
        offs_k = offs_k.to(tl.int64)
    p_lo = split * chunk * BLOCK_P
    _linear_dx_unit(dyc_ptr, w_ptr, perm_ptr, dx_ptr, ws_ptr, lock_ptr, offs_m, offs_m < M, offs_k, offs_k < K,
                    p_lo, tl.minimum(p_lo + chunk * BLOCK_P, count), tile, split, n_split, stride_cm, stride_wn,
                    stride_wk, stride_dxm, stride_dxk, COMPACT_W, UPCAST, DOT_PRECISION, WIDE, BLOCK_M, BLOCK_K,
                    BLOCK_P, TAIL_P)


@triton.jit
def _threshold_linear_bwd_dx_kernel(
    dyc_ptr,  # [M, >= count] compacted dY (unit column stride)
    w_ptr,  # [N, K], or [>= count, K] compacted (COMPACT_W)
    perm_ptr,  # [N] int32
    count_ptr,  # [1] int32
    split_ptr,  # [cdiv(N, BLOCK_P) + 1] int32: splits of the reduction for each number of active blocks
    ws_ptr,  # [programs * BLOCK_M * BLOCK_K] fp32 scratch: partial tiles of split reductions
    lock_ptr,  # [>= programs] int32, zero: tickets of split tiles (reset by their last program)
    dx_ptr,  # [M, K] out
    M,
    N,
    K,
    stride_cm,
    stride_wn,
    stride_wk,
    stride_dxm,
    stride_dxk,
    COMPACT_W: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    WIDE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_P: tl.constexpr,  # reduction step over active positions
    TAIL_P: tl.constexpr,  # reduction step for the count % BLOCK_P positions left over
    GROUP_M: tl.constexpr,
):
    # dX = dY[:, act] @ W[act]: the reduction runs over the active positions only. Persistent,
    # as the forward.
    num_programs = tl.num_programs(0)
    count = tl.load(count_ptr)
    tiles, n_split, chunk = _linear_dx_split(count, split_ptr, M, K, num_programs, BLOCK_M, BLOCK_K, BLOCK_P)
    for u in range(tl.program_id(0), tiles * n_split, num_programs):
        _linear_dx_work(u, n_split, chunk, count, dyc_ptr, w_ptr, perm_ptr, ws_ptr, lock_ptr, dx_ptr, M, K,
                        stride_cm, stride_wn, stride_wk, stride_dxm, stride_dxk, COMPACT_W, UPCAST, DOT_PRECISION,
                        WIDE, BLOCK_M, BLOCK_K, BLOCK_P, TAIL_P, GROUP_M)


# ----------------------------------------------------------------------------- dW


@triton.jit
def _linear_dw_tile(
    x_ptr, dyc_ptr, dy_ptr, w_ptr, perm_ptr, g_ptr, rpart_ptr,
    p0, p_end, count, pid_k, offs_k, k_ok, M, N, K, m_end, m_step, r_scale,
    stride_xm, stride_xk, stride_cm, stride_dym, stride_dyn, stride_wn, stride_wk, stride_gn, stride_gk,
    SOURCE: tl.constexpr,  # dY columns from: 0 dyc (active positions), 1 dY itself (pruned), 2 both
    R_KNOWN: tl.constexpr,  # rpart holds the final r by row: g is dW itself, G + sign(W) r / K (active rows)
    STORE_G: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, WIDTH: tl.constexpr,
    SIGN_TERM: tl.constexpr = True,  # R_KNOWN: add sign(W) r / K (False: G alone, the optimizer step adds it)
):
    # G^T[k, p] = sum_m X[m, k] dY[m, perm[p]] for positions p0 <= p < min(p0 + WIDTH, p_end),
    # over the batch rows m = j * m_step, j < m_end; then r_p = sum_k G^T[k, p] W[perm[p], k]
    # (times r_scale) into rpart[pid_k], and G (active rows) into g.
    offs_p = p0 + tl.arange(0, WIDTH)
    p_ok = offs_p < p_end
    rows = tl.load(perm_ptr + offs_p, mask=p_ok, other=0)
    if WIDE:
        rows = rows.to(tl.int64)
    in_dyc = p_ok & (offs_p < count)
    in_dy = p_ok & (offs_p >= count)
    acc = tl.zeros([BLOCK_K, WIDTH], dtype=tl.float32)
    offs_j = tl.arange(0, BLOCK_M)
    for j0 in range(0, m_end, BLOCK_M):
        j_ok = offs_j < m_end - j0
        offs_m = j0 + offs_j
        if WIDE:
            offs_m = offs_m.to(tl.int64)
        offs_m = offs_m * m_step
        xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                     mask=j_ok[:, None] & k_ok[None, :], other=0.0)
        if SOURCE == 0:
            # Loaded without a mask along p (a mask that varies along the contiguous dimension
            # would prevent vector loads; dyc's rows are padded to whole blocks), then the
            # columns past count, which hold no data, are zeroed.
            b = tl.load(dyc_ptr + offs_m[:, None] * stride_cm + offs_p[None, :], mask=j_ok[:, None], other=0.0)
            b = tl.where(in_dyc[None, :], b, 0.0)
        elif SOURCE == 1:
            b = tl.load(dy_ptr + offs_m[:, None] * stride_dym + rows[None, :] * stride_dyn,
                        mask=j_ok[:, None] & in_dy[None, :], other=0.0)
        else:
            b = tl.load(dyc_ptr + offs_m[:, None] * stride_cm + offs_p[None, :],
                        mask=j_ok[:, None] & in_dyc[None, :], other=0.0)
            b += tl.load(dy_ptr + offs_m[:, None] * stride_dym + rows[None, :] * stride_dyn,
                         mask=j_ok[:, None] & in_dy[None, :], other=0.0)
        if UPCAST:
            xt = xt.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(tl.trans(xt), b, acc, input_precision=DOT_PRECISION)
    if R_KNOWN:
        if SIGN_TERM:
            # One rounding, as the finish pass would: its sign term, its division.
            w = tl.load(w_ptr + rows[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                        mask=k_ok[:, None] & p_ok[None, :], other=0.0).to(tl.float32)
            coef = (tl.load(rpart_ptr + rows, mask=in_dyc, other=0.0) / K)[None, :]
            sign = tl.where(w > 0, 1.0, tl.where(w < 0, -1.0, 0.0))
            acc += sign * coef
        # (without the term no row of W is read here: the step that reads W anyway adds it)
        tl.store(g_ptr + rows[None, :] * stride_gn + offs_k[:, None] * stride_gk,
                 acc.to(g_ptr.dtype.element_ty), mask=k_ok[:, None] & in_dyc[None, :])
    else:
        w = tl.load(w_ptr + rows[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                    mask=k_ok[:, None] & p_ok[None, :], other=0.0).to(tl.float32)
        r = tl.sum(acc * w, axis=0) * r_scale
        tl.store(rpart_ptr + pid_k * N + rows, r, mask=p_ok)
        if STORE_G:
            # Only active rows: the finish pass never reads G of a pruned row.
            tl.store(g_ptr + rows[None, :] * stride_gn + offs_k[:, None] * stride_gk,
                     acc.to(g_ptr.dtype.element_ty), mask=k_ok[:, None] & in_dyc[None, :])


@triton.jit
def _linear_dw_tiles(
    x_ptr, dyc_ptr, dy_ptr, w_ptr, perm_ptr, g_ptr, rpart_ptr,
    p0, p_end, count, pid_k, offs_k, k_ok, M, N, K, m_end, m_step, r_scale,
    stride_xm, stride_xk, stride_cm, stride_dym, stride_dyn, stride_wn, stride_wk, stride_gn, stride_gk,
    SOURCE: tl.constexpr, R_KNOWN: tl.constexpr, STORE_G: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, WIDE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_P: tl.constexpr, TAIL1: tl.constexpr, TAIL2: tl.constexpr, TAIL3: tl.constexpr,
    SIGN_TERM: tl.constexpr = True,
):
    # The block of positions [p0, p_end) at the narrowest tile class that covers it.
    rem = p_end - p0
    if rem > TAIL1:
        _linear_dw_tile(x_ptr, dyc_ptr, dy_ptr, w_ptr, perm_ptr, g_ptr, rpart_ptr, p0, p_end, count, pid_k, offs_k,
                        k_ok, M, N, K, m_end, m_step, r_scale, stride_xm, stride_xk, stride_cm, stride_dym,
                        stride_dyn, stride_wn, stride_wk, stride_gn, stride_gk, SOURCE, R_KNOWN, STORE_G, UPCAST,
                        DOT_PRECISION, WIDE, BLOCK_K, BLOCK_M, BLOCK_P, SIGN_TERM)
    elif rem > TAIL2:
        _linear_dw_tile(x_ptr, dyc_ptr, dy_ptr, w_ptr, perm_ptr, g_ptr, rpart_ptr, p0, p_end, count, pid_k, offs_k,
                        k_ok, M, N, K, m_end, m_step, r_scale, stride_xm, stride_xk, stride_cm, stride_dym,
                        stride_dyn, stride_wn, stride_wk, stride_gn, stride_gk, SOURCE, R_KNOWN, STORE_G, UPCAST,
                        DOT_PRECISION, WIDE, BLOCK_K, BLOCK_M, TAIL1, SIGN_TERM)
    elif rem > TAIL3:
        _linear_dw_tile(x_ptr, dyc_ptr, dy_ptr, w_ptr, perm_ptr, g_ptr, rpart_ptr, p0, p_end, count, pid_k, offs_k,
                        k_ok, M, N, K, m_end, m_step, r_scale, stride_xm, stride_xk, stride_cm, stride_dym,
                        stride_dyn, stride_wn, stride_wk, stride_gn, stride_gk, SOURCE, R_KNOWN, STORE_G, UPCAST,
                        DOT_PRECISION, WIDE, BLOCK_K, BLOCK_M, TAIL2, SIGN_TERM)
    else:
        _linear_dw_tile(x_ptr, dyc_ptr, dy_ptr, w_ptr, perm_ptr, g_ptr, rpart_ptr, p0, p_end, count, pid_k, offs_k,
                        k_ok, M, N, K, m_end, m_step, r_scale, stride_xm, stride_xk, stride_cm, stride_dym,
                        stride_dyn, stride_wn, stride_wk, stride_gn, stride_gk, SOURCE, R_KNOWN, STORE_G, UPCAST,
                        DOT_PRECISION, WIDE, BLOCK_K, BLOCK_M, TAIL3, SIGN_TERM)


@triton.jit
def _linear_dw_pruned(
    w_ptr, perm_ptr, dw_ptr, r_ptr, p0, count, N, K, offs_k, k_ok, stride_wn, stride_wk, stride_dwn, stride_dwk,
    MODE: tl.constexpr, WIDE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # dW of the pruned positions in [p0, p0 + BLOCK_P): sign(W) r / K, or 0 in skip mode (no
    # read). 0 + the term, as the finish pass and MaskedGrad.dense() form it (a -0 becomes +0).
    offs_p = p0 + tl.arange(0, BLOCK_P)
    ok = (offs_p < N) & (offs_p >= count)
    rows = tl.load(perm_ptr + offs_p, mask=ok, other=0)
    if WIDE:
        rows = rows.to(tl.int64)
    val = tl.zeros([BLOCK_K, BLOCK_P], dtype=tl.float32)
    if MODE != 1:
        w = tl.load(w_ptr + rows[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                    mask=k_ok[:, None] & ok[None, :], other=0.0).to(tl.float32)
        coef = (tl.load(r_ptr + rows, mask=ok, other=0.0) / K)[None, :]
        val += tl.where(w > 0, 1.0, tl.where(w < 0, -1.0, 0.0)) * coef
    tl.store(dw_ptr + rows[None, :] * stride_dwn + offs_k[:, None] * stride_dwk, val.to(dw_ptr.dtype.element_ty),
             mask=k_ok[:, None] & ok[None, :])


@triton.jit
def _linear_dw_known(
    pid_k, t, count, x_ptr, dyc_ptr, w_ptr, perm_ptr, dw_ptr, r_ptr, M, N, K,
    stride_xm, stride_xk, stride_cm, stride_wn, stride_wk, stride_dwn, stride_dwk,
    MODE: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr,
    TAIL1: tl.constexpr, TAIL2: tl.constexpr, TAIL3: tl.constexpr,
    WRITE_PRUNED: tl.constexpr, SIGN_TERM: tl.constexpr,
):
    # The dW program (K tile pid_k, block t of positions) when r is final (skip / exact mode
    # with the forward's Z): active blocks are GEMM tiles that write dW; pruned rows need no
    # GEMM. Only dyc is read (dY itself is for the modes that gather pruned columns: passed as
    # dyc, never loaded).
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    if WIDE:
        offs_k = offs_k.to(tl.int64)
    k_ok = offs_k < K
    if t < tl.cdiv(count, BLOCK_P):
        _linear_dw_tiles(x_ptr, dyc_ptr, dyc_ptr, w_ptr, perm_ptr, dw_ptr, r_ptr, t * BLOCK_P, count, count,
                         pid_k, offs_k, k_ok, M, N, K, M, 1, 1.0, stride_xm, stride_xk, stride_cm, stride_cm,
                         1, stride_wn, stride_wk, stride_dwn, stride_dwk, 0, True, True, UPCAST,
                         DOT_PRECISION, WIDE, BLOCK_K, BLOCK_M, BLOCK_P, TAIL1, TAIL2, TAIL3, SIGN_TERM)
    if WRITE_PRUNED:
        if (t + 1) * BLOCK_P > count:
            _linear_dw_pruned(w_ptr, perm_ptr, dw_ptr, r_ptr, t * BLOCK_P, count, N, K, offs_k, k_ok,
                              stride_wn, stride_wk, stride_dwn, stride_dwk, MODE, WIDE, BLOCK_K, BLOCK_P)


@triton.jit
def _threshold_linear_bwd_dw_kernel(
    x_ptr,  # [M, K]
    dyc_ptr,  # [M, >= count] compacted dY
    dy_ptr,  # [M, N] dY itself (pruned positions in exact / sample modes)
    w_ptr,  # [N, K]
    perm_ptr,  # [N] int32
    count_ptr,  # [1] int32
    g_ptr,  # [N, K] out (active rows): m * G, fp32 workspace or dW itself (fp32); dW (R_KNOWN)
    rpart_ptr,  # [cdiv(K, BLOCK_K), N] fp32 out: per-K-tile partial sums of r; [N] r in (R_KNOWN)
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_cm,
    stride_dym,
    stride_dyn,
    stride_wn,
    stride_wk,
    stride_gn,
    stride_gk,
    sample_count,  # MODE 2: batch rows used to estimate r of pruned rows
    sample_step,  # MODE 2: stride between those batch rows
    MODE: tl.constexpr,  # 0 exact, 1 skip, 2 sample
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    WIDE: tl.constexpr,
    BLOCK_K: tl.constexpr,  # input features (the GEMM's M)
    BLOCK_P: tl.constexpr,  # positions of perm (N)
    BLOCK_M: tl.constexpr,  # reduction over batch rows
    SAMPLE_M: tl.constexpr,  # MODE 2: reduction step over the sampled rows (<= BLOCK_M, sized to the sample)
    TAIL1: tl.constexpr,
    TAIL2: tl.constexpr,
    TAIL3: tl.constexpr,
    R_KNOWN: tl.constexpr = False,  # MODE 0 / 1: rpart_ptr holds r ([N], by row) and g_ptr is dW
    WRITE_PRUNED: tl.constexpr = False,  # R_KNOWN: also the pruned rows of dW (sign(W) r / K; 0 in skip mode)
    SIGN_TERM: tl.constexpr = True,  # R_KNOWN: the active rows get sign(W) r / K (False: G alone, no read of W)
):
    # Grid: (K tiles, position blocks). exact: cdiv(N, BLOCK_P) blocks over all of perm. skip: the
    # same grid, blocks past count exit. sample: one more block, so that the active blocks
    # (from 0) and the pruned blocks (from count) each start at their own boundary.
    pid_k = tl.program_id(0)
    t = tl.program_id(1)
    count = tl.load(count_ptr)
    if R_KNOWN:
        _linear_dw_known(pid_k, t, count, x_ptr, dyc_ptr, w_ptr, perm_ptr, g_ptr, rpart_ptr, M, N, K, stride_xm,
                         stride_xk, stride_cm, stride_wn, stride_wk, stride_gn, stride_gk, MODE, UPCAST,
                         DOT_PRECISION, WIDE, BLOCK_K, BLOCK_P, BLOCK_M, TAIL1, TAIL2, TAIL3, WRITE_PRUNED, SIGN_TERM)
        return
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    if WIDE:
        offs_k = offs_k.to(tl.int64)
    k_ok = offs_k < K
    if MODE == 0:
        p0 = t * BLOCK_P
        if p0 + BLOCK_P <= count:
            _linear_dw_tile(x_ptr, dyc_ptr, dy_ptr, w_ptr, perm_ptr, g_ptr, rpart_ptr, p0, N, count, pid_k, offs_k,
                            k_ok, M, N, K, M, 1, 1.0, stride_xm, stride_xk, stride_cm, stride_dym, stride_dyn,
                            stride_wn, stride_wk, stride_gn, stride_gk, 0, False, True, UPCAST, DOT_PRECISION, WIDE,
                            BLOCK_K, BLOCK_M, BLOCK_P)
        else:
            _linear_dw_tile(x_ptr, dyc_ptr, dy_ptr, w_ptr, perm_ptr, g_ptr, rpart_ptr, p0, N, count, pid_k, offs_k,
                            k_ok, M, N, K, M, 1, 1.0, stride_xm, stride_xk, stride_cm, stride_dym, stride_dyn,
                            stride_wn, stride_wk, stride_gn, stride_gk, 2, False, True, UPCAST, DOT_PRECISION, WIDE,
                            BLOCK_K, BLOCK_M, BLOCK_P)
    else:
        n_active = tl.cdiv(count, BLOCK_P)
        if t < n_active:
            # Active positions over the whole batch; G stored.
            _linear_dw_tiles(x_ptr, dyc_ptr, dy_ptr, w_ptr, perm_ptr, g_ptr, rpart_ptr, t * BLOCK_P, count, count,
                             pid_k, offs_k, k_ok, M, N, K, M, 1, 1.0, stride_xm, stride_xk, stride_cm, stride_dym,
                             stride_dyn, stride_wn, stride_wk, stride_gn, stride_gk, 0, False, True, UPCAST,
                             DOT_PRECISION, WIDE, BLOCK_K, BLOCK_M, BLOCK_P, TAIL1, TAIL2, TAIL3)
        elif MODE == 2:
            # Pruned positions over the strided sample of the batch rows; r only.
            p0 = count + (t - n_active) * BLOCK_P
            if p0 < N:
                _linear_dw_tiles(x_ptr, dyc_ptr, dy_ptr, w_ptr, perm_ptr, g_ptr, rpart_ptr, p0, N, count, pid_k,
                                 offs_k, k_ok, M, N, K, sample_count, sample_step, M / sample_count, stride_xm,
                                 stride_xk, stride_cm, stride_dym, stride_dyn, stride_wn, stride_wk, stride_gn,
                                 stride_gk, 1, False, False, UPCAST, DOT_PRECISION, WIDE, BLOCK_K, SAMPLE_M,
                                 BLOCK_P, TAIL1, TAIL2, TAIL3)


@triton.jit
def _threshold_linear_bwd_kernel(
    x_ptr,  # [M, K]
    dyc_ptr,  # [M, >= count] compacted dY
    w_ptr,  # [N, K]: dW's (its sign term and pruned rows)
    wdx_ptr,  # [N, K], or [>= count, K] compacted (COMPACT_W): dX's
    perm_ptr,  # [N] int32
    count_ptr,  # [1] int32
    split_ptr,  # dX's split table (as _threshold_linear_bwd_dx_kernel)
    ws_ptr,  # dX's split workspace
    lock_ptr,  # dX's split tickets
    dx_ptr,  # [M, K] out
    dw_ptr,  # [N, K] out: dW (as _threshold_linear_bwd_dw_kernel with R_KNOWN)
    r_ptr,  # [N] fp32: r by row
    M,
    N,
    K,
    dx_programs,  # dX's programs in its own launch (its split table's cap)
    stride_xm,
    stride_xk,
    stride_cm,
    stride_wn,
    stride_wk,
    stride_wdxn,
    stride_wdxk,
    stride_dxm,
    stride_dxk,
    stride_dwn,
    stride_dwk,
    MODE: tl.constexpr,  # 0 exact, 1 skip
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    WIDE: tl.constexpr,
    COMPACT_W: tl.constexpr,  # dX reads the compacted weight
    DX_BLOCK_M: tl.constexpr,
    DX_BLOCK_K: tl.constexpr,
    DX_BLOCK_P: tl.constexpr,
    TAIL_P: tl.constexpr,
    GROUP_M: tl.constexpr,
    BLOCK_K: tl.constexpr,  # dW's tiles, as _threshold_linear_bwd_dw_kernel's
    BLOCK_P: tl.constexpr,
    BLOCK_M: tl.constexpr,
    TAIL1: tl.constexpr,
    TAIL2: tl.constexpr,
    TAIL3: tl.constexpr,
    WRITE_PRUNED: tl.constexpr,
    SIGN_TERM: tl.constexpr,
):
    # The backward's two GEMMs in one persistent launch once r is known (both read only dyc and
    # the weights, and write different outputs): dX's work units (as its own launch forms them,
    # its split capped at dx_programs, the workspace's slots), then dW's tiles (K tiles fastest,
    # as its own grid orders them: the active blocks, and with WRITE_PRUNED the pruned ones),
    # dealt to the programs in turn. One launch fewer per backward, and every program's share of
    # the two GEMMs' multiply-adds is about the same, whatever the density.
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    count = tl.load(count_ptr)
    tiles, n_split, chunk = _linear_dx_split(count, split_ptr, M, K, dx_programs, DX_BLOCK_M, DX_BLOCK_K, DX_BLOCK_P)
    dx_units = tiles * n_split
    k_blocks = tl.cdiv(K, BLOCK_K)
    if WRITE_PRUNED:
        dw_blocks = tl.cdiv(N, BLOCK_P)
    else:
        dw_blocks = tl.cdiv(count, BLOCK_P)
    # The units u = pid, pid + num_programs, ... below dx_units + dW's, in two loops (one body
    # each: the registers of one GEMM at a time, as in their own launches).
    for u in range(pid, dx_units, num_programs):
        _linear_dx_work(u, n_split, chunk, count, dyc_ptr, wdx_ptr, perm_ptr, ws_ptr, lock_ptr, dx_ptr, M, K,
                        stride_cm, stride_wdxn, stride_wdxk, stride_dxm, stride_dxk, COMPACT_W, UPCAST,
                        DOT_PRECISION, WIDE, DX_BLOCK_M, DX_BLOCK_K, DX_BLOCK_P, TAIL_P, GROUP_M)
    first = pid + tl.cdiv(tl.maximum(dx_units - pid, 0), num_programs) * num_programs
    for u in range(first, dx_units + dw_blocks * k_blocks, num_programs):
        j = u - dx_units
        _linear_dw_known(j % k_blocks, j // k_blocks, count, x_ptr, dyc_ptr, w_ptr, perm_ptr, dw_ptr, r_ptr, M, N,
                         K, stride_xm, stride_xk, stride_cm, stride_wn, stride_wk, stride_dwn, stride_dwk, MODE,
                         UPCAST, DOT_PRECISION, WIDE, BLOCK_K, BLOCK_P, BLOCK_M, TAIL1, TAIL2, TAIL3, WRITE_PRUNED,
                         SIGN_TERM)


@triton.jit
def _threshold_bwd_finish_kernel(
    rpart_ptr,  # [NUM_KB, N] fp32 partial sums of r
    w_ptr,  # [N, K]
    perm_ptr,  # [N] int32
    count_ptr,  # [1] int32
    g_ptr,  # [SPLIT, N, K] m * G of the active rows: fp32 workspace, or dw itself (IN_PLACE)
    dw_ptr,  # [N, K] out: m * G + sign(W) * r / K, rounded once to the weight dtype
    dtau_ptr,  # [N] out: -r
    r_ptr,  # [N] fp32 out: r (ROWS_ONLY)
    N,
    K,
    NUM_KB,  # rows of rpart
    SPLIT,  # slices of g to sum (1 when IN_PLACE)
    stride_wn,
    stride_wk,
    stride_gs,
    stride_gn,
    stride_gk,
    stride_dwn,
    stride_dwk,
    MODE: tl.constexpr,
    WIDE: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ROWS_ONLY: tl.constexpr = False,
):
    # Reads G of active rows only and W only where the sign term is needed; writes every row of
    # dW (pruned rows: sign(W) r / K, or 0 in skip mode, which reads nothing for them).
    # ROWS_ONLY: the active rows of dW alone, and r of every row, from which the fused optimizer
    # step (spafl.optim) forms the pruned rows' term as it reads W (neither is read nor written here).
    pid = tl.program_id(0)
    offs_p = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = offs_p < N
    count = tl.load(count_ptr)
    active = p_ok & (offs_p < count)
    rows = tl.load(perm_ptr + offs_p, mask=p_ok, other=0)
    if WIDE:
        rows = rows.to(tl.int64)
    if MODE == 1:
        need_r = active
    else:
        need_r = p_ok
    # Fixed summation order over the K tiles: deterministic.
    r = tl.zeros([BLOCK_P], dtype=tl.float32)
    for kb in range(0, NUM_KB):
        r += tl.load(rpart_ptr + kb * N + rows, mask=need_r, other=0.0)
    tl.store(dtau_ptr + rows, (-r).to(dtau_ptr.dtype.element_ty), mask=p_ok)
    out_rows = p_ok
    if ROWS_ONLY:
        tl.store(r_ptr + rows, r, mask=p_ok)
        need_r = active
        out_rows = active

    coef = (r / K)[:, None]
    offs_kb = tl.arange(0, BLOCK_K)
    if WIDE:
        offs_kb = offs_kb.to(tl.int64)
    n_split = SPLIT
    if WIDE:
        n_split = tl.cast(SPLIT, tl.int64)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + offs_kb
        k_ok = offs_k < K
        w = tl.load(w_ptr + rows[:, None] * stride_wn + offs_k[None, :] * stride_wk,
                    mask=need_r[:, None] & k_ok[None, :], other=0.0)
        w = w.to(tl.float32)  # (the interpreter compares raw bf16 incorrectly)
        g = tl.zeros([BLOCK_P, BLOCK_K], dtype=tl.float32)
        for sl in range(0, n_split):  # fixed order: deterministic
            g += tl.load(g_ptr + sl * stride_gs + rows[:, None] * stride_gn + offs_k[None, :] * stride_gk,
                         mask=active[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        sign = tl.where(w > 0, 1.0, tl.where(w < 0, -1.0, 0.0))
        tl.store(dw_ptr + rows[:, None] * stride_dwn + offs_k[None, :] * stride_dwk,
                 (g + sign * coef).to(dw_ptr.dtype.element_ty), mask=out_rows[:, None] & k_ok[None, :])


# ----------------------------------------------------------------------------- launchers


def check_row_mask_operands(x: torch.Tensor, weight: torch.Tensor, row_mask: RowMask, unit: str = "rows") -> None:
    """Checks shared by the launchers: dtypes, devices, and a row mask that fits ``weight``."""
    if x.dtype != weight.dtype:
        raise TypeError(f"x is {x.dtype} but weight is {weight.dtype}")
    if weight.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"Triton kernels support {SUPPORTED_DTYPES}, got {weight.dtype}")
    if row_mask.perm is None:
        raise ValueError("the row mask has no compact index list (perm); build it with with_perm=True")
    if x.device != weight.device or row_mask.perm.device != weight.device:
        raise ValueError("x, weight and the row mask must be on the same device")
    if row_mask.perm.shape != (weight.shape[0],):
        raise ValueError(f"row mask is for {row_mask.perm.shape[0]} {unit} but weight has {weight.shape[0]}")


def check_density_hint(density_hint: float | None) -> None:
    if density_hint is not None and (isinstance(density_hint, bool) or not isinstance(density_hint, (int, float))
                                     or not 0.0 <= float(density_hint) <= 1.0):
        raise ValueError(f"density_hint must be None or a number in [0, 1], got {density_hint!r}")


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t [R, K]`` with unit stride along K (copied if not): the GEMMs load runs along K, and a
    strided K would turn every vector load into single-element loads."""
    return t if t.stride(1) == 1 or t.shape[1] == 1 else t.contiguous()


def _check_operands(x2d: torch.Tensor, weight: torch.Tensor, row_mask: RowMask) -> None:
    if x2d.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"expected x [M, K] and weight [N, K], got {tuple(x2d.shape)} and {tuple(weight.shape)}")
    if x2d.shape[1] != weight.shape[1]:
        raise ValueError(f"x has {x2d.shape[1]} features but weight expects {weight.shape[1]}")
    check_row_mask_operands(x2d, weight, row_mask)


def _meta(shape, stride=None) -> torch.Tensor:
    """A stand-in of a tensor the launcher will allocate (a plan reads only its layout)."""
    if stride is None:
        return torch.empty(shape, device="meta")
    return torch.empty_strided(shape, stride, device="meta")


def _layout_aligned(pointers_aligned: bool, *tensors: torch.Tensor, sizes: tuple[int, ...] = ()) -> bool:
    """:func:`spafl.kernels._config.aligned` from the data pointers' alignment (known to the
    caller) and the layouts (also of meta stand-ins)."""
    return (pointers_aligned and all(st % 16 == 0 for t in tensors for st in t.stride() if st != 1)
            and all(n % 16 == 0 for n in sizes))


class _Launch(NamedTuple):
    """A planned launch: the grid and the keyword arguments (constexprs, tiles, warps, stages);
    ``fixed`` / ``consts`` / ``limits`` / ``family`` for the autotuner's path."""

    grid: tuple
    kwargs: dict
    family: str = ""
    fixed: dict | None = None
    consts: dict | None = None
    limits: dict | None = None
    grid_fn: object = None
    fixed_keys: tuple = ()
    tune: bool = False  # autotune_enabled() when planned (the plans' keys hold what it reads)


def _go(kernel, plan: _Launch, args: tuple, dtype, rows: int, density_hint) -> None:
    # The planned launch unless a tuner may choose: autotuning on, or every candidate recorded
    # for the offline compile check. The int64 variants never tune (their plan is final).
    if plan.fixed is None or plan.consts.get("WIDE") or not (plan.tune or every_candidate_enabled()):
        kernel[plan.grid](*args, **plan.kwargs)
        return
    launch(kernel, plan.family, plan.grid_fn, plan.fixed, args, plan.consts, dtype=dtype, rows=rows,
           density_hint=density_hint, fixed_keys=plan.fixed_keys, limits=plan.limits)


def _direct(plan: _Launch) -> bool:
    """Whether :func:`_go` launches ``plan`` as planned unless every candidate is being recorded
    (no tuner may choose)."""
    return plan.fixed is None or bool(plan.consts.get("WIDE")) or not plan.tune


def _planned(family: str, grid_fn, fixed: dict, consts: dict, *, limits=None, fixed_keys=()) -> _Launch:
    fixed = wide_config(family, fixed, consts)
    meta = dict(fixed)
    warps, stages = meta.pop("num_warps"), meta.pop("num_stages")
    return _Launch(grid_fn(fixed), {**consts, **meta, "num_warps": warps, "num_stages": stages}, family, fixed,
                   consts, limits, grid_fn, fixed_keys, autotune_enabled())


def finish_threshold_gradients(
    rpart: torch.Tensor,
    w2d: torch.Tensor,
    row_mask: RowMask,
    g: torch.Tensor,
    dw2d: torch.Tensor,
    dtau: torch.Tensor,
    *,
    mode_id: int,
    r_out: torch.Tensor | None = None,
) -> None:
    """Second pass of every weight gradient: ``dtau = -r`` from the partial sums ``rpart``
    (summed over its rows in a fixed order) and ``dW = m G + sign(W) r / K`` from the slices
    of ``g [SPLIT, N, K]`` (a view of ``dw2d`` itself when it holds G in place). ``w2d`` and
    ``dw2d`` are ``[N, K]`` views in the workspace's K order. ``r_out`` (fp32 ``[N]``): ``r``
    goes there, and ``dW`` is written for the active rows only (the others are left as they are)."""
    n_rows, fan_in = w2d.shape
    key = ("finish", w2d.shape, w2d.stride(), g.shape, g.stride(), dw2d.stride(), mode_id,
           aligned16(w2d) and aligned16(g) and aligned16(dw2d), launch_settings())
    plan = cached_plan(key, lambda: _finish_plan(w2d, g, dw2d, mode_id, key[-2]))
    rows_only = {"ROWS_ONLY": True} if r_out is not None else {}
    _threshold_bwd_finish_kernel[plan.grid](
        rpart, w2d, row_mask.perm, row_mask.count, g, dw2d, dtau, dtau if r_out is None else r_out, n_rows, fan_in,
        rpart.shape[0], g.shape[0], w2d.stride(0), w2d.stride(1), g.stride(0), g.stride(1), g.stride(2),
        dw2d.stride(0), dw2d.stride(1), **plan.kwargs, **rows_only,
    )


def _finish_plan(w2d, g, dw2d, mode_id: int, pointers_aligned: bool) -> _Launch:
    n_rows, fan_in = w2d.shape
    block_p = 32
    # Ragged K (unvectorised loads): a narrower tile stays within the registers.
    wide_k = gpu_tiles() and _layout_aligned(pointers_aligned, w2d, g, dw2d, sizes=(fan_in,))
    return _Launch((cdiv(n_rows, block_p),), {"MODE": mode_id, "WIDE": not fits_int32(w2d, g, dw2d),
                                              "BLOCK_P": block_p, "BLOCK_K": 128 if wide_k else 64, "num_warps": 4})


def compact_grad_columns(
    grad: torch.Tensor,
    row_mask: RowMask,
    rows: int,
    units: int,
    pixel_shape: tuple[int, int],
    pixel_strides: tuple[int, int, int],
    unit_stride: int,
) -> torch.Tensor:
    """``dyc [rows, >= units]``: column ``p`` holds column ``perm[p]`` of the output gradient for
    the active positions ``p < count`` (the rest is left unwritten); unit column stride.

    A batch row ``m`` is the pixel ``(m // plane, (m % plane) // width, m % width)`` with
    ``pixel_shape = (plane, width)`` and ``pixel_strides`` the strides of those three indices
    (``(1, 1)`` and ``(stride_m, 0, 0)`` for a 2-D gradient); ``unit_stride`` is the stride of
    the unit (column / channel) index. Rows are padded to whole blocks of ``DYC_PAD`` units, so
    that every row starts aligned and a block of positions can be loaded without a mask.
    """
    key = ("dyc", grad.shape, grad.stride(), rows, units, unit_stride, launch_settings())
    padded, plan = cached_plan(key, lambda: _dyc_plan(grad, rows, units, unit_stride))
    dyc = torch.empty((rows, padded), device=grad.device, dtype=grad.dtype)
    _compact_grad_kernel[plan.grid](grad, row_mask.perm, row_mask.count, dyc, rows, units, *pixel_shape,
                                    *pixel_strides, unit_stride, dyc.stride(0), **plan.kwargs)
    return dyc


def _dyc_plan(grad, rows: int, units: int, unit_stride: int):
    padded = cdiv(units, DYC_PAD) * DYC_PAD
    block_m, block_p = (64, 64) if gpu_tiles() else (32, 32)
    wide = not fits_int32(grad, _meta((rows, padded)))
    return padded, _Launch((cdiv(rows, block_m), cdiv(units, block_p)),
                           {"UNIT_MAJOR": unit_stride == 1, "WIDE": wide, "BLOCK_M": block_m, "BLOCK_P": block_p,
                            "num_warps": 4})


def compact_weight_rows(
    weight: torch.Tensor, row_mask: RowMask, fan_in: int, inner: int, inner_strides: tuple[int, int, int], kw: int
) -> torch.Tensor:
    """``Wc [N, >= fan_in]`` whose rows ``p < count`` hold ``W[perm[p]]`` in the GEMMs' K order
    (rows past ``count`` are left unwritten). Column ``j = (r * kw + s) * inner + c`` reads the
    weight at ``c * s_c + r * s_r + s * s_s`` with ``inner_strides = (s_c, s_r, s_s)``; a Linear
    weight is ``inner = fan_in``, ``inner_strides = (stride_k, 0, 0)``, ``kw = 1``."""
    n_rows = weight.shape[0]
    key = ("wc", weight.shape, weight.stride(), fan_in, kw, launch_settings())
    padded, plan = cached_plan(key, lambda: _wc_plan(weight, n_rows, fan_in, kw))
    wc = torch.empty((n_rows, padded), device=weight.device, dtype=weight.dtype)
    _compact_weight_kernel[plan.grid](weight, row_mask.perm, row_mask.count, wc, fan_in, inner, weight.stride(0),
                                      *inner_strides, wc.stride(0), **plan.kwargs)
    return wc


def _wc_plan(weight, n_rows: int, fan_in: int, kw: int):
    padded = cdiv(fan_in, 16) * 16
    block_p, block_k = (32, 128) if gpu_tiles() else (16, 32)
    wide = not fits_int32(weight, _meta((n_rows, padded)))
    return padded, _Launch((cdiv(n_rows, block_p), cdiv(fan_in, block_k)),
                           {"KW": kw, "WIDE": wide, "BLOCK_P": block_p, "BLOCK_K": block_k, "num_warps": 4})


def threshold_linear_fwd(
    x2d: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    row_mask: RowMask,
    *,
    density_hint: float | None = None,
    compact_weight: bool | None = None,
    z_out: torch.Tensor | None = None,
    z_all: bool = False,
) -> torch.Tensor:
    """``Y [M, N]`` for ``x2d [M, K]``, ``weight [N, K]``, ``bias [N] | None``; any strides.

    ``z_out`` (fp32 ``[M, N]``, contiguous): receives the active positions' products
    before the bias, ``z_out[m, p] = X[m] . W[perm[p]]`` for ``p < count`` (the rest is left
    unwritten), for the skip-mode backward (``threshold_linear_bwd(z=...)``); with ``z_all``
    every position's (the dense product, for exact mode's ``r`` of the pruned rows; the weight
    rows are then gathered, never compacted).

    ``density_hint``: the density the caller expects (e.g. the previous step's), known on the
    host without a synchronisation; it only selects the autotuning bucket. ``compact_weight``:
    copy the active rows of ``weight`` to a contiguous buffer first (default: see
    :func:`spafl.kernels._config.use_compact_weight`). What depends only on the shapes, strides,
    dtypes and settings (tiles, grid, constexprs) is planned once per shape.
    """
    _check_operands(x2d, weight, row_mask)
    check_density_hint(density_hint)
    m_rows, fan_in = x2d.shape
    n_rows = weight.shape[0]
    if z_out is not None:
        _check_z(z_out, x2d, n_rows)
    guard = _row_mask_guard(row_mask, n_rows)
    y = torch.empty((m_rows, n_rows), device=x2d.device, dtype=x2d.dtype)
    if m_rows == 0:
        if guard is not None:
            flush_guard_writes(guard)
        return y
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()  # the kernel indexes the bias with stride 1
    x2d, weight = _rows_contiguous(x2d), _rows_contiguous(weight)
    compact, plan, split = _fwd_planned(x2d, weight, bias is not None, compact_weight, z_out is not None, z_all)
    w_op = compact_weight_rows(weight, row_mask, fan_in, fan_in, (weight.stride(1), 0, 0), 1) if compact else weight
    args = (x2d, w_op, bias if bias is not None else weight, row_mask.perm, row_mask.count,
            *split.operands(x2d.device, "linear_fwd.ws"), y, y if z_out is None else z_out,
            *_fwd_layout(x2d, w_op, y, z_out))
    if guard is not None and _guard_in_launch(plan):
        _threshold_linear_fwd_kernel[plan.grid](*args, *guard.kernel_args(), **plan.kwargs, GUARD_WRITES=True,
                                                GUARD_BLOCK=guard.block)
        return y
    if guard is not None:
        flush_guard_writes(guard)
    _go(_threshold_linear_fwd_kernel, plan, (*args, *_NO_GUARD(row_mask.count)), x2d.dtype, m_rows, density_hint)
    return y


def _NO_GUARD(count: torch.Tensor) -> tuple:  # noqa: N802
    # The forward kernels' guard arguments when they make no guard writes: None, which Triton
    # specialises away (dummy tensors there cost the fp32 IEEE int64 variant spills).
    return None, None, None, None


def _row_mask_guard(row_mask: RowMask, n_rows: int) -> GuardWrites | None:
    """The row mask's pending collapse-guard writes (:class:`kernels.threshold_mask.GuardWrites`),
    checked against the layer's ``n_rows``; None when it has none."""
    guard = row_mask.guard
    if guard is None:
        return None
    if not isinstance(guard, GuardWrites) or guard.tau.shape != (n_rows,) or guard.count is not row_mask.count:
        raise ValueError(f"the row mask's pending guard writes must be kernels.threshold_mask.GuardWrites for its "
                         f"{n_rows} thresholds and its count")
    return guard


def _guard_in_launch(plan: _Launch) -> bool:
    """Whether the forward ``plan`` makes a row mask's pending guard writes in its own launch:
    when :func:`_go` launches it exactly once (no tuner's trials, no recording of every
    candidate: the counter's increment must happen once), and not in the int64-offset variants
    (tensors past 2^31 elements), whose registers are the tightest (the fp32 IEEE one spilled
    with them in the offline sm_90 compile) and where one launch more costs nothing measurable."""
    return not plan.kwargs.get("WIDE") and (plan.fixed is None or not (plan.tune or every_candidate_enabled()))


def _fwd_planned(x2d, weight, has_bias: bool, compact_weight, store_z: bool, z_all: bool):
    key = ("linear_fwd", x2d.shape, x2d.stride(), weight.shape, weight.stride(), x2d.dtype, has_bias,
           compact_weight, aligned16(x2d), aligned16(weight), store_z, z_all, launch_settings())
    return cached_plan(key, lambda: _linear_fwd_plan(x2d, weight, has_bias, compact_weight, key[-5], key[-4],
                                                     store_z, z_all and store_z))


def _fwd_layout(x2d, w_op, y, z) -> tuple:
    # The forward kernel's sizes and strides, after its tensors.
    m_rows, fan_in = x2d.shape
    return (m_rows, w_op.shape[0], fan_in, x2d.stride(0), x2d.stride(1), w_op.stride(0), w_op.stride(1),
            y.stride(0), y.stride(1), 0 if z is None else z.stride(0))


class PreparedForward:
    """:func:`threshold_linear_fwd` for one layout of ``x2d``, ``weight`` and ``bias`` (with a
    fresh fp32 ``z_out`` per call when ``store_z``), prepared once: the checks, the plan, the
    split's table, workspace and tickets, and the sizes and strides. For a caller that repeats
    the call with tensors of these layouts (shapes, strides, dtypes, device, 16-byte alignment),
    the same :func:`launch_settings`, on the same thread and stream: the caller checks that (the
    layers' kept Triton call). Raises ``ValueError`` for a layout the launcher would copy (the
    caller then keeps the launcher). A call returns ``(y, z)`` as the launcher computes them."""

    __slots__ = ("_run", "_plan", "_operands", "_layout", "_compact", "_direct", "_shape", "_dtype", "_device",
                 "_z", "_fan_in")

    def __init__(self, x2d, weight, bias, *, store_z: bool, z_all: bool = False):
        if x2d.dim() != 2 or weight.dim() != 2 or x2d.shape[1] != weight.shape[1]:
            raise ValueError(f"expected x [M, K] and weight [N, K], got {tuple(x2d.shape)} and {tuple(weight.shape)}")
        if x2d.dtype != weight.dtype or weight.dtype not in SUPPORTED_DTYPES or x2d.device != weight.device:
            raise ValueError(f"x ({x2d.dtype}, {x2d.device}) and weight ({weight.dtype}, {weight.device}) must be "
                             f"of one supported dtype and device")
        m_rows, fan_in = x2d.shape
        if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != weight.dtype
                                 or bias.device != weight.device):
            raise ValueError(f"bias must be [{weight.shape[0]}] {weight.dtype} on {weight.device}, got "
                             f"{tuple(bias.shape)} {bias.dtype} on {bias.device}")
        if (m_rows == 0 or _rows_contiguous(x2d) is not x2d or _rows_contiguous(weight) is not weight
                or (bias is not None and bias.stride(0) != 1)):
            raise ValueError("a prepared forward needs rows, a K-contiguous x and weight and a unit-stride bias")
        compact, plan, split = _fwd_planned(x2d, weight, bias is not None, None, store_z, z_all)
        n_rows, device = weight.shape[0], x2d.device
        w_op = _meta((n_rows, cdiv(fan_in, 16) * 16)) if compact else weight
        y = _meta((m_rows, n_rows))
        self._layout = _fwd_layout(x2d, w_op, y, y if store_z else None)
        self._run, self._plan, self._compact = _threshold_linear_fwd_kernel[plan.grid], plan, compact
        self._operands = split.held_operands(device, "linear_fwd.ws")
        self._direct = _direct(plan)
        self._shape, self._dtype, self._device, self._z, self._fan_in = (m_rows, n_rows), x2d.dtype, device, \
            store_z, fan_in

    def __call__(self, x2d, weight, bias, row_mask: RowMask):
        device = self._device
        y = torch.empty(self._shape, device=device, dtype=self._dtype)
        z = torch.empty(self._shape, device=device, dtype=torch.float32) if self._z else None
        w_op = (compact_weight_rows(weight, row_mask, self._fan_in, self._fan_in, (weight.stride(1), 0, 0), 1)
                if self._compact else weight)
        table, ws, tickets = self._operands
        args = (x2d, w_op, weight if bias is None else bias, row_mask.perm, row_mask.count, table, ws.get(), tickets,
                y, y if z is None else z, *self._layout)
        if row_mask.guard is not None:
            guard = _row_mask_guard(row_mask, self._shape[1])
            if _guard_in_launch(self._plan):
                self._run(*args, *guard.kernel_args(), **self._plan.kwargs, GUARD_WRITES=True, GUARD_BLOCK=guard.block)
                return y, z
            flush_guard_writes(guard)
        args = (*args, *_NO_GUARD(row_mask.count))
        if self._direct and not every_candidate_enabled():
            self._run(*args, **self._plan.kwargs)
        else:
            _go(_threshold_linear_fwd_kernel, self._plan, args, self._dtype, self._shape[0], None)
        return y, z


def _check_z(z: torch.Tensor, x2d: torch.Tensor, n_rows: int) -> None:
    if z.dtype != torch.float32 or z.device != x2d.device:
        raise ValueError(f"z must be float32 on {x2d.device}, got {z.dtype} on {z.device}")
    if z.shape != (x2d.shape[0], n_rows) or not z.is_contiguous():
        raise ValueError(f"z must be a contiguous [{x2d.shape[0]}, {n_rows}] tensor, got {tuple(z.shape)} "
                         f"strides {z.stride()}")


class _Split(NamedTuple):
    """A persistent GEMM's split reduction: ``table[i]`` is the split for ``i`` active blocks,
    ``programs`` the grid, ``slot`` the elements of one partial tile in the workspace."""

    table: tuple[int, ...]
    programs: int
    slot: int

    def held_operands(self, device: torch.device, role: str) -> tuple[torch.Tensor, Scratch, torch.Tensor]:
        """:meth:`operands` for a prepared launch: the workspace as a :class:`Scratch`."""
        table, _, tickets = self.operands(device, role)
        return table, held_scratch(role, (self.programs * self.slot if max(self.table) > 1 else 1,), torch.float32,
                                   device), tickets

    def operands(self, device: torch.device, role: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(table, workspace, tickets)`` on ``device``: the table uploaded once per device,
        a workspace of one slot per program (scratch of ``role``), and zeroed tickets shared by
        the launches of the current stream (each split tile's last program resets its own)."""
        found = _split_tables.get((self.table, device))
        if found is None:
            found = _split_tables[(self.table, device)] = torch.tensor(self.table, dtype=torch.int32, device=device)
        # An unsplit launch never touches the workspace: one element stands in for it.
        ws = scratch(role, (self.programs * self.slot if max(self.table) > 1 else 1,), torch.float32, device)
        return found, ws, split_tickets(device, self.programs)


_split_tables: dict = {}
_split_tickets: dict = {}


def split_tickets(device: torch.device, n: int) -> torch.Tensor:
    """At least ``n`` zeroed int32 tickets for the split tiles of the launches on ``device``'s
    current stream (one set per stream, so that concurrent launches never share one)."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device.type, device.index, stream)
    found = _split_tickets.get(key)
    if found is None or found.numel() < n:
        found = _split_tickets[key] = torch.zeros(max(n, 256), device=device, dtype=torch.int32)
    return found


def _split_plan(tiles_of, blocks_of, n_index: int, block_macs: int, bytes_of, slot: int, units_floor: int,
                device_programs: int, mac_bytes: float) -> _Split:
    """The split of each of ``n_index + 1`` device-side states (active blocks ``i``), the
    programs a persistent launch needs (at most ``device_programs``; at least ``units_floor``
    for the work that is not split, e.g. filling pruned outputs) and the slot size."""
    table = tuple(best_split(tiles_of(i), blocks_of(i), block_macs, bytes_of(i), slot * 4, device_programs, mac_bytes)
                  for i in range(n_index + 1))
    units = max([units_floor] + [tiles_of(i) * table[i] for i in range(n_index + 1)])
    return _Split(table, max(1, min(device_programs, units)), slot)


def _linear_fwd_plan(x2d, weight, has_bias: bool, compact_weight, x_aligned: bool, w_aligned: bool,
                     store_z: bool = False, z_all: bool = False):
    m_rows, fan_in = x2d.shape
    n_rows = weight.shape[0]
    compact = use_compact_weight(compact_weight, "linear", weight) and not z_all
    w_op = _meta((n_rows, cdiv(fan_in, 16) * 16)) if compact else weight
    y = _meta((m_rows, n_rows))
    cfg = gemm_config(x2d.dtype)
    block_n, block_k = cfg.block_n, cfg.block_k
    # (a compact weight is a fresh allocation: aligned)
    if gpu_tiles() and not _layout_aligned(x_aligned and (w_aligned or compact), x2d, w_op, y, sizes=(fan_in,)):
        # Unvectorised loads: half the tile keeps the kernel within its registers (no spills).
        block_n, block_k = block_n // 2, min(block_k, 32)
    # 16-bit: a 4-stage pipeline. With 3 stages the persistent forward's 128 x 128 tile spills
    # one register under Triton 3.6 (255 in use); with 4 it fits under 3.6 and 3.9 (offline
    # sm_90 compile, tests/aot_compile.py), and shared memory holds it (128 KiB of 227).
    stages = 4 if gpu_tiles() and x2d.dtype != torch.float32 else cfg.num_stages
    # Storing Z as well spills the full tile (89 local-memory instructions under Triton 3.9, with
    # the 254 registers it uses already): half the rows per tile, on the same warps; for IEEE
    # fp32 on the FMA units half the units too (half the rows alone still spills under Triton
    # 3.6, a quarter of them under 3.9).
    block_m = cfg.block_m // 2 if store_z and gpu_tiles() else cfg.block_m
    if store_z and gpu_tiles() and x2d.dtype == torch.float32 and dot_precision("matmul", x2d.dtype) == "ieee":
        block_n = block_n // 2
    fixed = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": cfg.group_m,
             **tail_widths(block_n), "num_warps": cfg.num_warps, "num_stages": stages}
    consts = dict(HAS_BIAS=has_bias, STORE_Z=store_z, Z_ALL=z_all, COMPACT_W=compact, UPCAST=interpreter_enabled(),
                  DOT_PRECISION=dot_precision("matmul", x2d.dtype), WIDE=not fits_int32(x2d, w_op, y))
    # The table and the programs follow the blocks the launch runs (halved for int64 offsets);
    # an autotuned configuration's smaller blocks are clamped by the kernel to the programs.
    blocks = wide_config("linear_fwd", fixed, consts)
    bm, bn, bk = blocks["BLOCK_M"], blocks["BLOCK_N"], blocks["BLOCK_K"]
    tiles_m, esize = cdiv(m_rows, bm), x2d.element_size()
    split = _split_plan(
        lambda i: tiles_m * i, lambda i: cdiv(fan_in, bk), cdiv(n_rows, bn), bm * bn * bk,
        lambda i: esize * (m_rows * fan_in + min(i * bn, n_rows) * fan_in + m_rows * n_rows), bm * bn,
        tiles_m * cdiv(n_rows, bn), grid_programs(x2d.device), bytes_per_mac(x2d.dtype))
    return compact, _planned("linear_fwd", lambda meta: (split.programs,), fixed, consts,
                             limits={"BLOCK_M": next_power_of_2(m_rows), "BLOCK_N": next_power_of_2(n_rows)}), split


def threshold_linear_bwd(
    grad_y: torch.Tensor,
    x2d: torch.Tensor,
    weight: torch.Tensor,
    row_mask: RowMask,
    *,
    mode: str = "exact",
    sample_fraction: float = 0.125,
    need_dx: bool = True,
    threshold_dtype: torch.dtype = torch.float32,
    density_hint: float | None = None,
    compact_weight: bool | None = None,
    r_out: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    db_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Gradients ``(dX [M, K] | None, dW [N, K], dtau [N])`` of the threshold Linear.

    ``grad_y [M, N]`` may have any strides. The bias gradient (``grad_y.sum(0)``) is left to
    the caller. See the module docstring for the meaning of ``mode``, and
    :func:`threshold_linear_fwd` for ``density_hint``, ``compact_weight`` and the plans.
    ``r_out`` (fp32 ``[N]``): receives ``r`` (``dtau = -r``), and ``dW`` holds the active rows
    only (``row_mask``'s; the pruned rows' ``sign(W) r / K`` is left to the fused optimizer step).
    ``z``: the forward's ``z_out`` (same ``x2d``, ``weight`` and ``row_mask``; ``z_all`` in exact
    mode); in skip and exact mode ``r`` then comes from it, in the pass that compacts ``dY``,
    and the weight gradient's GEMM writes ``dW`` itself (no second pass, no work for the pruned
    rows but their ``sign(W) r / K``). Sample mode ignores it. With ``r_out`` too, the active
    rows of ``dW`` hold ``m G`` alone, rounded to the weight's dtype, and no row of ``W`` is read:
    the fused optimizer step adds ``sign(W) r / K`` to every row as it reads ``W``.
    ``db_out`` (``[N]``): receives the bias gradient ``grad_y.sum(0)`` (fp32 sum, rounded once).
    """
    _check_operands(x2d, weight, row_mask)
    check_density_hint(density_hint)
    if mode not in BACKWARD_MODES:
        raise ValueError(f"backward mode must be one of {sorted(BACKWARD_MODES)}, got {mode!r}")
    if grad_y.shape != (x2d.shape[0], weight.shape[0]):
        raise ValueError(f"grad_y has shape {tuple(grad_y.shape)}, expected {(x2d.shape[0], weight.shape[0])}")
    m_rows, fan_in = x2d.shape
    n_rows = weight.shape[0]
    device = x2d.device
    dx = torch.empty_like(x2d, memory_format=torch.contiguous_format) if need_dx else None
    dw = torch.empty((n_rows, fan_in), device=device, dtype=weight.dtype)
    dtau = torch.empty(n_rows, device=device, dtype=threshold_dtype)
    if z is not None:
        _check_z(z, x2d, n_rows)
    if db_out is not None and (db_out.shape != (n_rows,) or db_out.device != device):
        raise ValueError(f"db_out must be [{n_rows}] on {device}, got {tuple(db_out.shape)} on {db_out.device}")
    if m_rows == 0:
        dw.zero_()
        dtau.zero_()
        if r_out is not None:
            r_out.zero_()
        if db_out is not None:
            db_out.zero_()
        return dx, dw, dtau

    if grad_y.dtype != x2d.dtype:
        grad_y = grad_y.to(x2d.dtype)
    x2d, weight = _rows_contiguous(x2d), _rows_contiguous(weight)
    plan = _bwd_planned(x2d, weight, grad_y, mode, sample_fraction, need_dx, compact_weight)
    fused = z is not None and plan.mode_id != BACKWARD_MODES["sample"]
    if fused:
        r = r_out if r_out is not None else scratch("linear_bwd.r", (n_rows,), torch.float32, device)
        dyc = _compact_grad_bias(grad_y, row_mask, z, r, dtau, db_out, m_rows, n_rows, plan.mode_id == 0)
    else:
        dyc = compact_grad_columns(grad_y, row_mask, m_rows, n_rows, (1, 1), (grad_y.stride(0), 0, 0),
                                   grad_y.stride(1))
        if db_out is not None:
            db_out.copy_(grad_y.sum(dim=0, dtype=torch.float32))
    w_op = (compact_weight_rows(weight, row_mask, fan_in, fan_in, (weight.stride(1), 0, 0), 1)
            if need_dx and plan.compact else weight)
    grouped = (plan.grouped_fused if r_out is None else plan.grouped_rows) if fused else None
    if grouped is not None:
        # dX and dW in one launch (r is known: both GEMMs read only dyc and the weights).
        _threshold_linear_bwd_kernel[grouped.grid](
            x2d, dyc, weight, w_op, row_mask.perm, row_mask.count, *plan.dx_split.operands(device, "linear_dx.ws"), dx,
            dw, r, *_grouped_layout(x2d, dyc, weight, w_op, dx, dw, plan), **grouped.kwargs)
        return dx, dw, dtau
    if need_dx:
        _go(_threshold_linear_bwd_dx_kernel, plan.dx,
            (dyc, w_op, row_mask.perm, row_mask.count, *plan.dx_split.operands(device, "linear_dx.ws"), dx,
             *_dx_layout(x2d, dyc, w_op, dx)),
            x2d.dtype, m_rows, density_hint)
    if fused:
        # r is known: the GEMM writes the active rows of dW = G + sign(W) r / K itself, and the
        # pruned rows' sign(W) r / K (0 in skip mode); with r_out the fused optimizer step adds
        # the term to every row, and the GEMM writes the active rows' G alone (W not read).
        _go(_threshold_linear_bwd_dw_kernel, plan.dw_fused if r_out is None else plan.dw_rows,
            (x2d, dyc, grad_y, weight, row_mask.perm, row_mask.count, dw, r,
             *_dw_layout(x2d, dyc, grad_y, weight, dw, plan)), x2d.dtype, m_rows, density_hint)
        return dx, dw, dtau
    # dW = m*G + sign(W) r / K is finished in a second pass (r needs every K tile of G). For
    # 16-bit weights G goes through an fp32 workspace so that dW is rounded once, like the
    # reference; fp32 weights hold G in place.
    g = dw if plan.in_place else torch.empty((n_rows, fan_in), device=device, dtype=torch.float32)
    # rpart has one row per K tile: the K tile is fixed here (not tuned), the other sizes are.
    rpart = torch.empty((plan.num_kb, n_rows), device=device, dtype=torch.float32)
    _go(_threshold_linear_bwd_dw_kernel, plan.dw,
        (x2d, dyc, grad_y, weight, row_mask.perm, row_mask.count, g, rpart,
         *_dw_layout(x2d, dyc, grad_y, weight, g, plan)), x2d.dtype, m_rows, density_hint)
    finish_threshold_gradients(rpart, weight, row_mask, g.unsqueeze(0), dw, dtau, mode_id=plan.mode_id, r_out=r_out)
    return dx, dw, dtau


class PreparedBackward:
    """:func:`threshold_linear_bwd` in skip or exact mode with the forward's ``z`` (and with
    ``r_out`` when ``rows``, ``db_out`` when ``has_db``) for one layout of ``grad_y``, ``x2d`` and
    ``weight``, prepared once: the checks, the plans, the scratch (compacted ``dY``, ``r``, the
    split's workspace and tickets) and the sizes and strides. For a caller that repeats the
    call with tensors of these layouts (shapes, strides, dtypes, device, 16-byte alignment), the
    same :func:`launch_settings`, on the same thread and stream: the caller checks that (the
    layers' kept Triton call). Raises ``ValueError`` where the launcher would convert or copy an
    operand (the caller then keeps the launcher). A call returns ``(dX | None, dW, dtau)`` as
    the launcher computes them, with the same launches."""

    __slots__ = ("_plan", "_dyc", "_dyc_run", "_dyc_kwargs", "_dyc_tail", "_r", "_dx_ops", "_grouped", "_dx_tail",
                 "_dw", "_dw_tail", "_runs", "_need_dx", "_rows", "_dims", "_dtype", "_tau_dtype", "_device")

    def __init__(self, grad_y, x2d, weight, *, mode: str, sample_fraction: float, need_dx: bool,
                 threshold_dtype: torch.dtype, rows: bool, has_db: bool):
        if mode not in ("skip", "exact"):
            raise ValueError(f"a prepared backward runs skip or exact mode, got {mode!r}")
        if x2d.dim() != 2 or weight.dim() != 2 or x2d.shape[1] != weight.shape[1]:
            raise ValueError(f"expected x [M, K] and weight [N, K], got {tuple(x2d.shape)} and {tuple(weight.shape)}")
        m_rows, fan_in = x2d.shape
        n_rows, device = weight.shape[0], x2d.device
        if (grad_y.shape != (m_rows, n_rows) or grad_y.dtype != x2d.dtype or x2d.dtype != weight.dtype
                or weight.dtype not in SUPPORTED_DTYPES or grad_y.device != device or weight.device != device
                or m_rows == 0 or _rows_contiguous(x2d) is not x2d or _rows_contiguous(weight) is not weight):
            raise ValueError("a prepared backward needs rows, one supported dtype and device and K-contiguous "
                             "x and weight")
        plan = _bwd_planned(x2d, weight, grad_y, mode, sample_fraction, need_dx, None)
        padded, dyc_plan = _dyc_planned(grad_y, m_rows, n_rows, has_db, plan.mode_id == 0)
        self._dyc = held_scratch("linear_bwd.dyc", (m_rows, padded), grad_y.dtype, device)
        dyc, z = _meta((m_rows, padded)), _meta((m_rows, n_rows))
        self._dyc_run, self._dyc_kwargs = _compact_grad_bias_kernel[dyc_plan.grid], dyc_plan.kwargs
        self._dyc_tail = _dyc_layout(grad_y, z, dyc)
        self._r = None if rows else held_scratch("linear_bwd.r", (n_rows,), torch.float32, device)
        w_op = _meta((n_rows, cdiv(fan_in, 16) * 16)) if need_dx and plan.compact else weight
        dx, dw = _meta((m_rows, fan_in)), _meta((n_rows, fan_in))
        self._dx_ops = plan.dx_split.held_operands(device, "linear_dx.ws") if need_dx else None
        grouped = plan.grouped_rows if rows else plan.grouped_fused
        self._grouped = None if grouped is None else (_threshold_linear_bwd_kernel[grouped.grid], grouped.kwargs)
        self._dx_tail = _grouped_layout(x2d, dyc, weight, w_op, dx, dw, plan) if grouped is not None else \
            _dx_layout(x2d, dyc, w_op, dx) if need_dx else None
        self._dw = plan.dw_rows if rows else plan.dw_fused
        self._dw_tail = _dw_layout(x2d, dyc, grad_y, weight, dw, plan)
        # (the planned launches themselves where no tuner may choose, as _go decides)
        self._runs = tuple(None if p is None or not _direct(p) else kernel[p.grid]
                           for kernel, p in ((_threshold_linear_bwd_dx_kernel, plan.dx),
                                             (_threshold_linear_bwd_dw_kernel, self._dw)))
        self._plan, self._need_dx, self._rows = plan, need_dx, rows
        self._dims, self._dtype, self._tau_dtype, self._device = (m_rows, n_rows, fan_in), x2d.dtype, \
            threshold_dtype, device

    def __call__(self, grad_y, x2d, weight, row_mask: RowMask, z, r_out=None, db_out=None):
        m_rows, n_rows, fan_in = self._dims
        device, dtype, plan, perm, count = self._device, self._dtype, self._plan, row_mask.perm, row_mask.count
        dx = torch.empty((m_rows, fan_in), device=device, dtype=dtype) if self._need_dx else None
        dw = torch.empty((n_rows, fan_in), device=device, dtype=dtype)
        dtau = torch.empty(n_rows, device=device, dtype=self._tau_dtype)
        r = r_out if self._rows else self._r.get()
        dyc = self._dyc.get()
        dx_ops = None
        if self._need_dx:
            table, ws, tickets = self._dx_ops
            dx_ops = (table, ws.get(), tickets)
        self._dyc_run(grad_y, perm, count, z, dyc, r, dtau, dtau if db_out is None else db_out, *self._dyc_tail,
                      **self._dyc_kwargs)
        w_op = (compact_weight_rows(weight, row_mask, fan_in, fan_in, (weight.stride(1), 0, 0), 1)
                if self._need_dx and plan.compact else weight)
        grouped = self._grouped
        if grouped is not None:
            grouped[0](x2d, dyc, weight, w_op, perm, count, *dx_ops, dx, dw, r, *self._dx_tail, **grouped[1])
            return dx, dw, dtau
        run_dx, run_dw = self._runs
        candidates = every_candidate_enabled()
        if self._need_dx:
            args = (dyc, w_op, perm, count, *dx_ops, dx, *self._dx_tail)
            if run_dx is not None and not candidates:
                run_dx(*args, **plan.dx.kwargs)
            else:
                _go(_threshold_linear_bwd_dx_kernel, plan.dx, args, dtype, m_rows, None)
        args = (x2d, dyc, grad_y, weight, perm, count, dw, r, *self._dw_tail)
        if run_dw is not None and not candidates:
            run_dw(*args, **self._dw.kwargs)
        else:
            _go(_threshold_linear_bwd_dw_kernel, self._dw, args, dtype, m_rows, None)
        return dx, dw, dtau


def _bwd_planned(x2d, weight, grad_y, mode: str, sample_fraction: float, need_dx: bool, compact_weight):
    key = ("linear_bwd", x2d.shape, x2d.stride(), weight.shape, weight.stride(), grad_y.stride(), x2d.dtype, mode,
           sample_fraction, need_dx, compact_weight, aligned16(x2d) and aligned16(weight), launch_settings())
    return cached_plan(key, lambda: _linear_bwd_plan(x2d, weight, grad_y, mode, sample_fraction, need_dx,
                                                     compact_weight, key[-2]))


# The backward kernels' sizes and strides, after their tensors.
def _dx_layout(x2d, dyc, w_op, dx) -> tuple:
    m_rows, fan_in = x2d.shape
    return (m_rows, w_op.shape[0], fan_in, dyc.stride(0), w_op.stride(0), w_op.stride(1), dx.stride(0),
            dx.stride(1))


def _dw_layout(x2d, dyc, grad_y, weight, dw, plan) -> tuple:
    m_rows, fan_in = x2d.shape
    return (m_rows, weight.shape[0], fan_in, x2d.stride(0), x2d.stride(1), dyc.stride(0), grad_y.stride(0),
            grad_y.stride(1), weight.stride(0), weight.stride(1), dw.stride(0), dw.stride(1), plan.s_count,
            plan.s_step)


def _grouped_layout(x2d, dyc, weight, w_op, dx, dw, plan) -> tuple:
    m_rows, fan_in = x2d.shape
    return (m_rows, weight.shape[0], fan_in, plan.dx_split.programs, x2d.stride(0), x2d.stride(1), dyc.stride(0),
            weight.stride(0), weight.stride(1), w_op.stride(0), w_op.stride(1), dx.stride(0), dx.stride(1),
            dw.stride(0), dw.stride(1))


class _BwdPlan(NamedTuple):
    compact: bool
    dx: _Launch | None
    dx_split: _Split | None
    in_place: bool
    num_kb: int
    dw: _Launch
    s_count: int
    s_step: int
    mode_id: int
    dw_fused: _Launch | None  # skip / exact mode with the forward's Z: dW written by the GEMM (R_KNOWN)
    dw_rows: _Launch | None  # the active rows' G only (a fused optimizer step adds every row's sign term)
    grouped_fused: _Launch | None = None  # dX and dw_fused in one launch (not planned: see _linear_bwd_plan)
    grouped_rows: _Launch | None = None  # dX and dw_rows in one launch


def _compact_grad_bias(grad_y, row_mask: RowMask, z, r, dtau, db_out, m_rows: int, n_rows: int,
                       z_all: bool) -> torch.Tensor:
    """The skip / exact-mode pass over ``grad_y [M, N]``: ``dyc`` (as :func:`compact_grad_columns`),
    ``r`` / ``dtau`` of every row from ``z`` (``z_all``: of the pruned rows too, else 0 there),
    and ``db_out`` if given."""
    padded, plan = _dyc_planned(grad_y, m_rows, n_rows, db_out is not None, z_all)
    dyc = scratch("linear_bwd.dyc", (m_rows, padded), grad_y.dtype, grad_y.device)
    _compact_grad_bias_kernel[plan.grid](
        grad_y, row_mask.perm, row_mask.count, z, dyc, r, dtau, dtau if db_out is None else db_out,
        *_dyc_layout(grad_y, z, dyc), **plan.kwargs)
    return dyc


def _dyc_planned(grad_y, m_rows: int, n_rows: int, has_bias: bool, z_all: bool):
    key = ("dyc_bias", grad_y.shape, grad_y.stride(), has_bias, z_all, launch_settings())
    return cached_plan(key, lambda: _dyc_bias_plan(grad_y, m_rows, n_rows, has_bias, z_all))


def _dyc_layout(grad_y, z, dyc) -> tuple:
    return (*grad_y.shape, grad_y.stride(0), grad_y.stride(1), z.stride(0), dyc.stride(0))


def _dyc_bias_plan(grad, rows: int, units: int, has_bias: bool, z_all: bool):
    padded = cdiv(units, DYC_PAD) * DYC_PAD
    # Each program reduces the whole batch for its units: narrow unit blocks give the launch
    # programs enough to cover the SMs (4096 units: 128 programs).
    block_m, block_p = (64, 32) if gpu_tiles() else (16, 16)
    wide = not fits_int32(grad, _meta((rows, padded)), _meta((rows, units)))
    return padded, _Launch((cdiv(units, block_p),), {"HAS_BIAS": has_bias, "Z_ALL": z_all, "WIDE": wide,
                                                     "BLOCK_M": block_m, "BLOCK_P": block_p, "num_warps": 4})


def _linear_bwd_plan(x2d, weight, grad_y, mode: str, sample_fraction: float, need_dx: bool, compact_weight,
                     pointers_aligned: bool) -> _BwdPlan:
    m_rows, fan_in = x2d.shape
    n_rows = weight.shape[0]
    cfg = gemm_config(x2d.dtype)
    consts = dict(UPCAST=interpreter_enabled(), DOT_PRECISION=dot_precision("matmul", x2d.dtype))
    mode_id = BACKWARD_MODES[mode]
    dyc = _meta((m_rows, cdiv(n_rows, DYC_PAD) * DYC_PAD))
    compact, dx_plan, dx_split = False, None, None
    if need_dx:
        compact = use_compact_weight(compact_weight, "linear", weight)
        w_op = _meta((n_rows, cdiv(fan_in, 16) * 16)) if compact else weight
        fixed = {"BLOCK_M": cfg.block_m, "BLOCK_K": cfg.block_k * 2, "BLOCK_P": cfg.block_k, "GROUP_M": cfg.group_m,
                 "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
        dx_consts = dict(COMPACT_W=compact, TAIL_P=16, WIDE=not fits_int32(dyc, w_op, _meta((m_rows, fan_in))),
                         **consts)
        blocks = wide_config("linear_dx", fixed, dx_consts)
        bm, bk, bp = blocks["BLOCK_M"], blocks["BLOCK_K"], blocks["BLOCK_P"]
        tiles, esize = cdiv(m_rows, bm) * cdiv(fan_in, bk), x2d.element_size()
        # The reduction runs over the active positions: its blocks are the table's index.
        dx_split = _split_plan(
            lambda i: tiles, lambda i: i, cdiv(n_rows, bp), bm * bk * bp,
            lambda i: esize * (min(i * bp, n_rows) * (m_rows + fan_in) + m_rows * fan_in), bm * bk, tiles,
            grid_programs(x2d.device), bytes_per_mac(x2d.dtype))
        dx_plan = _planned("linear_dx", lambda meta: (dx_split.programs,), fixed, dx_consts,
                           limits={"BLOCK_M": next_power_of_2(m_rows)})
    in_place = weight.dtype == torch.float32
    g = _meta((n_rows, fan_in))
    s_count, s_step = sample_rows(m_rows, sample_fraction)
    # Unvectorised loads of X (ragged K): narrower feature and unit tiles keep it within its
    # registers (Triton 3.6 spills the full unit tile there: offline sm_90 compile).
    vector_k = not gpu_tiles() or _layout_aligned(pointers_aligned, x2d, weight, sizes=(fan_in,))
    feature_tile = cfg.block_k * 2 if vector_k else cfg.block_k
    unit_tile = cfg.block_n if vector_k else cfg.block_n // 2
    fixed = {"BLOCK_K": feature_tile, "BLOCK_P": unit_tile, "BLOCK_M": cfg.block_k, **tail_widths(unit_tile),
             "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    num_kb = cdiv(fan_in, fixed["BLOCK_K"])
    # (one compiled variant for the modes that do not sample)
    sample_m = sample_block(s_count, fixed["BLOCK_M"]) if mode_id == 2 else fixed["BLOCK_M"]
    dw_plan = _planned(
        f"linear_dw{mode_id}", lambda meta: (num_kb, cdiv(n_rows, meta["BLOCK_P"]) + (1 if mode_id == 2 else 0)),
        fixed, dict(MODE=mode_id, SAMPLE_M=sample_m, WIDE=not fits_int32(x2d, dyc, grad_y, weight, g), **consts),
        limits={"BLOCK_P": next_power_of_2(n_rows)}, fixed_keys=("BLOCK_K",))
    dw_fused = dw_rows = None
    if mode_id != BACKWARD_MODES["sample"]:
        # (their own tuners: "linear_dw", the mode, r known, pruned rows written or not)
        dw_fused, dw_rows = (_planned(
            f"linear_dw{mode_id}1{int(pruned)}", lambda meta: (num_kb, cdiv(n_rows, meta["BLOCK_P"])), fixed,
            dict(MODE=mode_id, SAMPLE_M=sample_m, R_KNOWN=True, WRITE_PRUNED=pruned, SIGN_TERM=pruned,
                 WIDE=not fits_int32(x2d, dyc, grad_y, weight, g), **consts),
            limits={"BLOCK_P": next_power_of_2(n_rows)}, fixed_keys=("BLOCK_K",)) for pruned in (True, False))
    grouped = (None, None)
    # (IEEE fp32 on the GPU's FMA tiles: the two GEMMs in one kernel spill, 10 local-memory
    # instructions under Triton 3.9 in the offline sm_90 compile: two launches there.)
    fma = gpu_tiles() and x2d.dtype == torch.float32 and consts["DOT_PRECISION"] == "ieee"
    if dx_plan is not None and dw_fused is not None and not (dx_plan.tune or dw_fused.tune or fma) \
            and not (dx_plan.consts["WIDE"] or dw_fused.consts["WIDE"]):
        # (the compact gradients' GEMMs only: the variant that writes the pruned rows and adds the
        # sign term spills in one persistent kernel, 14 to 20 local-memory instructions under
        # Triton 3.9 in the offline sm_90 compile; plain torch.optim keeps two launches)
        grouped = (None, _grouped_plan(dx_plan, dx_split, tiles, dw_rows, grid_programs(x2d.device)))
    return _BwdPlan(compact, dx_plan, dx_split, in_place, num_kb, dw_plan, s_count, s_step, mode_id, dw_fused,
                    dw_rows, *grouped)


def _grouped_plan(dx: _Launch, dx_split: _Split, dx_tiles: int, dw: _Launch, programs: int) -> _Launch:
    """The launch of ``_threshold_linear_bwd_kernel``: ``dx``'s work units and ``dw``'s tiles on
    one set of persistent programs, at their planned tiles (the autotuner and the int64-offset
    variants keep two launches)."""
    x, w = dx.kwargs, dw.kwargs
    if (x["num_warps"], x["num_stages"]) != (w["num_warps"], w["num_stages"]):
        raise AssertionError("the grouped backward needs one warp count and pipeline depth for dX and dW")
    kwargs = {"MODE": w["MODE"], "UPCAST": w["UPCAST"], "DOT_PRECISION": w["DOT_PRECISION"], "WIDE": False,
              "COMPACT_W": x["COMPACT_W"], "DX_BLOCK_M": x["BLOCK_M"], "DX_BLOCK_K": x["BLOCK_K"],
              "DX_BLOCK_P": x["BLOCK_P"], "TAIL_P": x["TAIL_P"], "GROUP_M": x["GROUP_M"],
              **{k: w[k] for k in ("BLOCK_K", "BLOCK_P", "BLOCK_M", "TAIL1", "TAIL2", "TAIL3", "WRITE_PRUNED",
                                   "SIGN_TERM", "num_warps", "num_stages")}}
    # Persistent: a program per SM, fewer when the two GEMMs never have that many units (dX: its
    # tiles, or its programs when it splits; dW: its grid).
    units = max(dx_tiles, dx_split.programs) + dw.grid[0] * dw.grid[1]
    return _Launch((max(1, min(programs, units)),), kwargs)
