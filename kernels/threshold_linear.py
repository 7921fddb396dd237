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

Backward modes for the threshold gradient of pruned rows (``r_i`` of a pruned row needs that
row's dense work, ``dY[:, i] . (X W_i)``):

* ``exact``  (0): computed for every row; equals the reference.
* ``skip``   (1): pruned rows get no data-path gradient: ``dtau_i = 0`` and ``dW_i = 0``.
* ``sample`` (2): ``r_i`` of pruned rows estimated from ``SAMPLE_COUNT`` batch rows
  ``0, step, 2*step, ...`` scaled by ``M / SAMPLE_COUNT``; ``dW_i = sign(W_i) * r_i / K``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._rowmask import RowMask, sample_rows
from ._config import SUPPORTED_DTYPES, dot_precision, gemm_config, interpreter_enabled

BACKWARD_MODES = {"exact": 0, "skip": 1, "sample": 2}


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


@triton.jit
def _mma(acc, a, b, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # acc += a @ b on tensor cores. UPCAST (the interpreter): in fp32, because bf16 tl.dot is
    # unreliable there.
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _perm_tile(perm_ptr, pid_p, N, count, BLOCK: tl.constexpr):
    # A tile of positions in `perm`: (positions, in range, the unit (row / filter) at each
    # position as int64, active). Position p < count holds an active unit.
    offs_p = pid_p * BLOCK + tl.arange(0, BLOCK)
    p_ok = offs_p < N
    rows = tl.load(perm_ptr + offs_p, mask=p_ok, other=0).to(tl.int64)
    return offs_p, p_ok, rows, offs_p < count


@triton.jit
def _threshold_linear_fwd_kernel(
    x_ptr,  # [M, K]
    w_ptr,  # [N, K]
    b_ptr,  # [N] (only with HAS_BIAS)
    perm_ptr,  # [N] int32: active rows ascending, then pruned rows
    count_ptr,  # [1] int32: active rows
    y_ptr,  # [M, N] out
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_ym,
    stride_yn,
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,  # compute the dot in fp32 (interpreter: bf16 tl.dot is unreliable there)
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_m, pid_p = _grouped_tile(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    count = tl.load(count_ptr)

    # Tile columns are positions in `perm`.
    offs_p, p_ok, rows, active = _perm_tile(perm_ptr, pid_p, N, count, BLOCK_N)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    m_ok = offs_m < M

    # Tiles made only of pruned rows run the K loop zero times and only write bias / zeros.
    k_end = tl.where(pid_p * BLOCK_N < count, K, 0)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, k_end, BLOCK_K):
        offs_k = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        k_ok = offs_k < K
        a = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=m_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        # Gather of the active weight rows fused into the tile load ([BLOCK_K, BLOCK_N]).
        b = tl.load(
            w_ptr + rows[None, :] * stride_wn + offs_k[:, None] * stride_wk,
            mask=active[None, :] & k_ok[:, None],
            other=0.0,
        )
        acc = _mma(acc, a, b, UPCAST, DOT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(b_ptr + rows, mask=p_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(
        y_ptr + offs_m[:, None] * stride_ym + rows[None, :] * stride_yn,
        acc.to(y_ptr.dtype.element_ty),
        mask=m_ok[:, None] & p_ok[None, :],
    )


@triton.jit
def _gather_grad_columns_kernel(
    dy_ptr,  # output gradient: [M, N] (Linear) or [B, N, Ho, Wo] (Conv2d), any strides
    perm_ptr,  # [N] int32
    count_ptr,  # [1] int32
    dyt_ptr,  # [N, M] out: dyt[p, m] = dY[m, perm[p]] for positions p < limit
    M,
    N,
    PLANE,  # a batch row m is the pixel (m // PLANE, (m % PLANE) // WIDTH, m % WIDTH); 1, 1 for Linear
    WIDTH,
    stride_dyb,
    stride_dyh,
    stride_dyw,
    stride_dyn,
    ALL_ROWS: tl.constexpr,  # gather every position (exact / sample modes) or only active ones
    BLOCK_P: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    # Compacts (and transposes) the columns of dY that the backward GEMMs read, so both GEMMs
    # load contiguous runs along M instead of scattered columns.
    # M tiles on grid axis 0, whose limit is 2^31 - 1 (axis 1 stops at 65535).
    pid_m = tl.program_id(0)
    pid_p = tl.program_id(1)
    if ALL_ROWS:
        limit = N
    else:
        limit = tl.load(count_ptr)
    if pid_p * BLOCK_P >= limit:
        return
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = offs_p < limit
    rows = tl.load(perm_ptr + offs_p, mask=p_ok, other=0).to(tl.int64)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    b = offs_m // PLANE
    hw = offs_m - b * PLANE
    h = hw // WIDTH
    src = b * stride_dyb + h * stride_dyh + (hw - h * WIDTH) * stride_dyw
    ok = p_ok[:, None] & (offs_m[None, :] < M)
    tile = tl.load(dy_ptr + src[None, :] + rows[:, None] * stride_dyn, mask=ok, other=0.0)
    tl.store(dyt_ptr + offs_p.to(tl.int64)[:, None] * M + offs_m[None, :], tile, mask=ok)


@triton.jit
def _threshold_linear_bwd_dx_kernel(
    dyt_ptr,  # [N, M] compacted, transposed dY (positions < count are filled)
    w_ptr,  # [N, K]
    perm_ptr,  # [N] int32
    count_ptr,  # [1] int32
    dx_ptr,  # [M, K] out
    M,
    N,
    K,
    stride_wn,
    stride_wk,
    stride_dxm,
    stride_dxk,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_P: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # dX = dY[:, act] @ W[act]: the reduction runs over the active positions only.
    pid = tl.program_id(0)
    pid_m, pid_k = _grouped_tile(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    count = tl.load(count_ptr)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_k = (pid_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    m_ok = offs_m < M
    k_ok = offs_k < K
    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for p0 in range(0, count, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        p_ok = offs_p < count
        rows = tl.load(perm_ptr + offs_p, mask=p_ok, other=0).to(tl.int64)
        a = tl.load(
            dyt_ptr + offs_p.to(tl.int64)[None, :] * M + offs_m[:, None],
            mask=p_ok[None, :] & m_ok[:, None],
            other=0.0,
        )
        b = tl.load(
            w_ptr + rows[:, None] * stride_wn + offs_k[None, :] * stride_wk,
            mask=p_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        acc = _mma(acc, a, b, UPCAST, DOT_PRECISION)
    tl.store(
        dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk,
        acc.to(dx_ptr.dtype.element_ty),
        mask=m_ok[:, None] & k_ok[None, :],
    )


@triton.jit
def _dyt_x_product(
    acc,
    dyt_ptr,
    x_ptr,
    offs_p,
    p_ok,
    offs_k,
    k_ok,
    M,
    m_end,
    m_step,
    stride_xm,
    stride_xk,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    # acc += dyt[offs_p, rows_m] @ x[rows_m, offs_k] over the batch rows m = j * m_step, j < m_end.
    for j0 in range(0, m_end, BLOCK_M):
        offs_j = j0 + tl.arange(0, BLOCK_M)
        j_ok = offs_j < m_end
        offs_m = offs_j.to(tl.int64) * m_step
        a = tl.load(
            dyt_ptr + offs_p.to(tl.int64)[:, None] * M + offs_m[None, :],
            mask=p_ok[:, None] & j_ok[None, :],
            other=0.0,
        )
        b = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=j_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        acc = _mma(acc, a, b, UPCAST, DOT_PRECISION)
    return acc


@triton.jit
def _mode_reduction_bounds(has_active, count, M, N, sample_count, sample_step, MODE: tl.constexpr):
    # The batch rows m = j * m_step, j < m_end, that a dW tile reduces over: all of them for a
    # tile holding an active row; for an all-pruned tile, all (exact), none (skip) or the strided
    # sample (sample). a_rows: positions of dyt that hold data (skip gathered only active ones).
    m_step = 1
    m_end = M
    a_rows = N
    if MODE == 1:
        m_end = tl.where(has_active, M, 0)
        a_rows = count
    if MODE == 2:
        m_end = tl.where(has_active, M, sample_count)
        m_step = tl.where(has_active, 1, sample_step)
    return m_end, m_step, a_rows


@triton.jit
def _threshold_linear_bwd_dw_kernel(
    dyt_ptr,  # [N, M] compacted, transposed dY
    x_ptr,  # [M, K]
    w_ptr,  # [N, K]
    perm_ptr,  # [N] int32
    count_ptr,  # [1] int32
    g_ptr,  # [N, K] out, contiguous: m * G (the finish kernel adds the sign term)
    rpart_ptr,  # [cdiv(K, BLOCK_K), N] fp32 out: per-K-tile partial sums of r
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    sample_count,  # MODE 2: batch rows used to estimate r of pruned rows
    sample_step,  # MODE 2: stride between those batch rows
    MODE: tl.constexpr,  # 0 exact, 1 skip, 2 sample
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_k = tl.program_id(1)
    count = tl.load(count_ptr)
    offs_p, p_ok, rows, active = _perm_tile(perm_ptr, pid_p, N, count, BLOCK_P)
    offs_k = (pid_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    k_ok = offs_k < K
    has_active = pid_p * BLOCK_P < count
    has_pruned = ((pid_p + 1) * BLOCK_P > count) & (count < N)

    m_end, m_step, a_rows = _mode_reduction_bounds(has_active, count, M, N, sample_count, sample_step, MODE)
    acc = tl.zeros([BLOCK_P, BLOCK_K], dtype=tl.float32)
    acc = _dyt_x_product(acc, dyt_ptr, x_ptr, offs_p, offs_p < a_rows, offs_k, k_ok, M, m_end, m_step, stride_xm,
                         stride_xk, UPCAST, DOT_PRECISION, BLOCK_M)

    # W is read only where r is needed (not for the all-pruned tiles of skip mode).
    w_rows = N
    if MODE == 1:
        w_rows = tl.where(has_active, N, 0)
    w_ok = (offs_p < w_rows)[:, None] & k_ok[None, :]
    w = tl.load(w_ptr + rows[:, None] * stride_wn + offs_k[None, :] * stride_wk, mask=w_ok, other=0.0).to(tl.float32)
    # Skip mode: pruned positions loaded dY as 0 above, so their r is exactly 0 here.
    r = tl.sum(acc * w, axis=1)
    if MODE == 2:
        # The one tile that straddles `count` reduced its pruned rows over the whole batch;
        # re-estimate them from the sample so the result does not depend on the tiling.
        s_end = tl.where(has_active & has_pruned, sample_count, 0)
        acc_s = tl.zeros([BLOCK_P, BLOCK_K], dtype=tl.float32)
        acc_s = _dyt_x_product(acc_s, dyt_ptr, x_ptr, offs_p, p_ok & (offs_p >= count), offs_k, k_ok, M, s_end,
                               sample_step, stride_xm, stride_xk, UPCAST, DOT_PRECISION, BLOCK_M)
        r_sampled = tl.where(has_active, tl.sum(acc_s * w, axis=1), r) * (M / sample_count)
        r = tl.where(active, r, r_sampled)
    tl.store(rpart_ptr + pid_k * N + rows, r, mask=p_ok)
    g = tl.where(active[:, None], acc, 0.0)
    g_ok = p_ok[:, None] & k_ok[None, :]
    tl.store(g_ptr + rows[:, None] * K + offs_k[None, :], g.to(g_ptr.dtype.element_ty), mask=g_ok)


@triton.jit
def _threshold_linear_bwd_finish_kernel(
    rpart_ptr,  # [NUM_KB, N] fp32 partial sums of r
    w_ptr,  # [N, K]
    perm_ptr,  # [N] int32
    count_ptr,  # [1] int32
    g_ptr,  # [SPLIT, N, K] m * G from the dW kernel(s): fp32 workspace, or dw itself (IN_PLACE)
    dw_ptr,  # [N, K] out: m * G + sign(W) * r / K, rounded once to the weight dtype
    dtau_ptr,  # [N] out: -r
    N,
    K,
    NUM_KB,  # rows of rpart
    SPLIT,  # slices of g to sum (1 when IN_PLACE)
    stride_wn,
    stride_wk,
    stride_dwn,
    stride_dwk,
    MODE: tl.constexpr,
    IN_PLACE: tl.constexpr,  # g_ptr is dw_ptr
    BLOCK_P: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_p = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = offs_p < N
    rows = tl.load(perm_ptr + offs_p, mask=p_ok, other=0).to(tl.int64)
    # Fixed summation order over the K tiles: deterministic.
    r = tl.zeros([BLOCK_P], dtype=tl.float32)
    for kb in range(0, NUM_KB):
        r += tl.load(rpart_ptr + kb * N + rows, mask=p_ok, other=0.0)
    tl.store(dtau_ptr + rows, (-r).to(dtau_ptr.dtype.element_ty), mask=p_ok)

    # In skip mode an all-pruned tile has r = 0 and G = 0: nothing to read. In place, dW is
    # already 0 there and the tile is done; otherwise the loop only writes zeros.
    k_end = K
    load_rows = N
    if MODE == 1:
        tile_active = pid * BLOCK_P < tl.load(count_ptr)
        load_rows = tl.where(tile_active, N, 0)
        if IN_PLACE:
            k_end = tl.where(tile_active, K, 0)
    coef = (r / K)[:, None]
    for k0 in range(0, k_end, BLOCK_K):
        offs_k = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        ok = p_ok[:, None] & (offs_k[None, :] < K)
        load_ok = ok & (offs_p < load_rows)[:, None]
        w = tl.load(w_ptr + rows[:, None] * stride_wn + offs_k[None, :] * stride_wk, mask=load_ok, other=0.0)
        w = w.to(tl.float32)  # (the interpreter compares raw bf16 incorrectly)
        g = tl.zeros([BLOCK_P, BLOCK_K], dtype=tl.float32)
        for sl in range(0, SPLIT):  # fixed order: deterministic
            g_off = (sl * N + rows[:, None]) * K + offs_k[None, :]
            g += tl.load(g_ptr + g_off, mask=load_ok, other=0.0).to(tl.float32)
        sign = tl.where(w > 0, 1.0, tl.where(w < 0, -1.0, 0.0))
        tl.store(
            dw_ptr + rows[:, None] * stride_dwn + offs_k[None, :] * stride_dwk,
            (g + sign * coef).to(dw_ptr.dtype.element_ty),
            mask=ok,
        )


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


def _check_operands(x2d: torch.Tensor, weight: torch.Tensor, row_mask: RowMask) -> None:
    if x2d.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"expected x [M, K] and weight [N, K], got {tuple(x2d.shape)} and {tuple(weight.shape)}")
    if x2d.shape[1] != weight.shape[1]:
        raise ValueError(f"x has {x2d.shape[1]} features but weight expects {weight.shape[1]}")
    check_row_mask_operands(x2d, weight, row_mask)


def finish_threshold_gradients(
    rpart: torch.Tensor,
    w2d: torch.Tensor,
    row_mask: RowMask,
    g: torch.Tensor,
    dw2d: torch.Tensor,
    dtau: torch.Tensor,
    *,
    split: int,
    mode_id: int,
    in_place: bool,
) -> None:
    """Second pass of every weight gradient: ``dtau = -r`` from the partial sums ``rpart``
    (summed over its rows in a fixed order) and ``dW = m G + sign(W) r / K`` from the ``split``
    slices of ``g`` (``g`` is ``dw2d`` itself when ``in_place``). ``w2d`` and ``dw2d`` are
    ``[N, K]`` views in the workspace's K order."""
    n_rows, fan_in = w2d.shape
    block_p = 32
    _threshold_linear_bwd_finish_kernel[(triton.cdiv(n_rows, block_p),)](
        rpart,
        w2d,
        row_mask.perm,
        row_mask.count,
        g,
        dw2d,
        dtau,
        n_rows,
        fan_in,
        rpart.shape[0],
        split,
        w2d.stride(0),
        w2d.stride(1),
        dw2d.stride(0),
        dw2d.stride(1),
        MODE=mode_id,
        IN_PLACE=in_place,
        BLOCK_P=block_p,
        BLOCK_K=64 if interpreter_enabled() else 128,
        num_warps=4,
    )


def gather_grad_columns(
    grad: torch.Tensor,
    row_mask: RowMask,
    rows: int,
    units: int,
    pixel_shape: tuple[int, int],
    pixel_strides: tuple[int, int, int],
    unit_stride: int,
    *,
    all_rows: bool,
) -> torch.Tensor:
    """``dyt [units, rows]``: column ``perm[p]`` of the output gradient in row ``p`` (every
    position with ``all_rows``, else the first ``count``; the rest is left unwritten).

    A batch row ``m`` is the pixel ``(m // plane, (m % plane) // width, m % width)`` with
    ``pixel_shape = (plane, width)`` and ``pixel_strides`` the strides of those three indices
    (``(1, 1)`` and ``(stride_m, 0, 0)`` for a 2-D gradient); ``unit_stride`` is the stride of
    the unit (column / channel) index.
    """
    cfg = gemm_config(grad.dtype)
    dyt = torch.empty((units, rows), device=grad.device, dtype=grad.dtype)
    _gather_grad_columns_kernel[(triton.cdiv(rows, cfg.block_m), triton.cdiv(units, cfg.block_n))](
        grad,
        row_mask.perm,
        row_mask.count,
        dyt,
        rows,
        units,
        *pixel_shape,
        *pixel_strides,
        unit_stride,
        ALL_ROWS=all_rows,
        BLOCK_P=cfg.block_n,
        BLOCK_M=cfg.block_m,
        num_warps=4,
    )
    return dyt


def threshold_linear_fwd(
    x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, row_mask: RowMask
) -> torch.Tensor:
    """``Y [M, N]`` for ``x2d [M, K]``, ``weight [N, K]``, ``bias [N] | None``; any strides."""
    _check_operands(x2d, weight, row_mask)
    m_rows, fan_in = x2d.shape
    n_rows = weight.shape[0]
    y = torch.empty((m_rows, n_rows), device=x2d.device, dtype=x2d.dtype)
    if m_rows == 0:
        return y
    if bias is not None:
        bias = bias.contiguous()  # the kernel indexes the bias with stride 1
    cfg = gemm_config(x2d.dtype)
    grid = (triton.cdiv(m_rows, cfg.block_m) * triton.cdiv(n_rows, cfg.block_n),)
    _threshold_linear_fwd_kernel[grid](
        x2d,
        weight,
        bias if bias is not None else weight,
        row_mask.perm,
        row_mask.count,
        y,
        m_rows,
        n_rows,
        fan_in,
        x2d.stride(0),
        x2d.stride(1),
        weight.stride(0),
        weight.stride(1),
        y.stride(0),
        y.stride(1),
        HAS_BIAS=bias is not None,
        UPCAST=interpreter_enabled(),
        DOT_PRECISION=dot_precision(),
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return y


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
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Gradients ``(dX [M, K] | None, dW [N, K], dtau [N])`` of the threshold Linear.

    ``grad_y [M, N]`` may have any strides. The bias gradient (``grad_y.sum(0)``) is left to
    the caller. See the module docstring for the meaning of ``mode``.
    """
    _check_operands(x2d, weight, row_mask)
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
    if m_rows == 0:
        dw.zero_()
        dtau.zero_()
        return dx, dw, dtau

    grad_y = grad_y.to(x2d.dtype)
    cfg = gemm_config(x2d.dtype)
    upcast = interpreter_enabled()
    precision = dot_precision()
    mode_id = BACKWARD_MODES[mode]

    dyt = gather_grad_columns(grad_y, row_mask, m_rows, n_rows, (1, 1), (grad_y.stride(0), 0, 0), grad_y.stride(1),
                              all_rows=mode_id != 1)

    if need_dx:
        grid = (triton.cdiv(m_rows, cfg.block_m) * triton.cdiv(fan_in, cfg.block_k * 2),)
        _threshold_linear_bwd_dx_kernel[grid](
            dyt,
            weight,
            row_mask.perm,
            row_mask.count,
            dx,
            m_rows,
            n_rows,
            fan_in,
            weight.stride(0),
            weight.stride(1),
            dx.stride(0),
            dx.stride(1),
            UPCAST=upcast,
            DOT_PRECISION=precision,
            BLOCK_M=cfg.block_m,
            BLOCK_K=cfg.block_k * 2,
            BLOCK_P=cfg.block_k,
            GROUP_M=cfg.group_m,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )

    # dW = m*G + sign(W) r / K is finished in a second pass (r needs every K tile of G). For
    # 16-bit weights G goes through an fp32 workspace so that dW is rounded once, like the
    # reference; fp32 weights finish in place.
    in_place = weight.dtype == torch.float32
    g = dw if in_place else torch.empty((n_rows, fan_in), device=device, dtype=torch.float32)
    s_count, s_step = sample_rows(m_rows, sample_fraction)
    block_k = cfg.block_k * 2
    num_kb = triton.cdiv(fan_in, block_k)
    rpart = torch.empty((num_kb, n_rows), device=device, dtype=torch.float32)
    _threshold_linear_bwd_dw_kernel[(triton.cdiv(n_rows, cfg.block_n), num_kb)](
        dyt,
        x2d,
        weight,
        row_mask.perm,
        row_mask.count,
        g,
        rpart,
        m_rows,
        n_rows,
        fan_in,
        x2d.stride(0),
        x2d.stride(1),
        weight.stride(0),
        weight.stride(1),
        s_count,
        s_step,
        MODE=mode_id,
        UPCAST=upcast,
        DOT_PRECISION=precision,
        BLOCK_P=cfg.block_n,
        BLOCK_K=block_k,
        BLOCK_M=cfg.block_k,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    finish_threshold_gradients(rpart, weight, row_mask, g, dw, dtau, split=1, mode_id=mode_id, in_place=in_place)
    return dx, dw, dtau
