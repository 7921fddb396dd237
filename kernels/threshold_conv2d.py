"""Structured-sparse Conv2d kernels: implicit GEMMs that read and multiply active filters only.

Notation: input ``X [B, C, H, W]``, weight ``W [F, C, KH, KW]`` (F filters), thresholds
``tau [F]``, ``perm [F]`` / ``count [1]`` from :mod:`.threshold_mask` (active filters first,
sorted), output ``Y [B, F, Ho, Wo]``. Every tensor may have any strides (NCHW and channels-last
both run without a copy). Output pixels are flattened as ``p = b * Ho * Wo + oh * Wo + ow``;
``P = B * Ho * Wo`` of them.

The convolution is the GEMM ``Y[p, f] = sum_{r, s, c} Xcol[p, (r, s, c)] W[f, c, r, s]`` whose
``Xcol`` (im2col) tiles are gathered on the fly from ``X``; its columns are positions in ``perm``,
so only active filters are loaded and multiplied (``groups == 1``).

Forward:  an upper-bound grid over pixel tiles x ``perm`` tiles; tiles past ``count`` skip the
          reduction and write bias (or 0) for the pruned output channels.
Backward: ``dY`` columns of the needed filters are gathered into ``dyt [F, P]``
          (:func:`._gather_grad_columns_kernel`);
          ``dX`` is the transposed convolution over the active filters only, split into the
          ``stride_h * stride_w`` phases of the input pixels so that no lane computes a product
          that the stride makes zero;
          ``G = dL/dW_hat`` is a GEMM over the pixels, split along them for parallelism, with
          per-tile partial sums of ``r_i = sum G_i W_i``; the Linear finish kernel then writes
          ``dtau = -r`` and ``dW = m G + sign(W) r / (C KH KW)``.
The backward modes are those of :mod:`.threshold_linear`; ``sample`` draws its strided sample
from the output pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._conv import ConvGeometry
from .._rowmask import RowMask, sample_rows
from ._config import GemmConfig, dot_precision, gemm_config, interpreter_enabled
from .threshold_linear import (
    BACKWARD_MODES,
    _grouped_tile,
    _mma,
    _mode_reduction_bounds,
    _perm_tile,
    check_row_mask_operands,
    finish_threshold_gradients,
    gather_grad_columns,
)


@triton.jit
def _pixel_coords(offs, plane, width):
    # Flattened pixel index -> (image, row, column) for an image of `plane = rows * width` pixels.
    b = offs // plane
    hw = offs - b * plane
    row = hw // width
    return b, row, hw - row * width


@triton.jit
def _im2col_tile(
    x_ptr, b, oh, ow, pix_ok, offs_c, c_ok, r, s, H, W,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, sxb, sxc, sxh, sxw,
):
    # [pixels, channels] tile of Xcol at kernel position (r, s); zero padding is a masked load.
    ih = oh * stride_h - pad_h + r * dil_h
    iw = ow * stride_w - pad_w + s * dil_w
    ok = pix_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    ptrs = x_ptr + b[:, None] * sxb + ih[:, None] * sxh + iw[:, None] * sxw + offs_c[None, :] * sxc
    return tl.load(ptrs, mask=ok[:, None] & c_ok[None, :], other=0.0)


@triton.jit
def _threshold_conv2d_fwd_kernel(
    x_ptr,  # [B, C, H, W]
    w_ptr,  # [F, C, KH, KW]
    b_ptr,  # [F] (only with HAS_BIAS), contiguous
    perm_ptr,  # [F] int32
    count_ptr,  # [1] int32
    y_ptr,  # [B, F, Ho, Wo] out
    P,  # B * Ho * Wo
    F,
    C, H, W, Ho, Wo, KH, KW,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sxb, sxc, sxh, sxw,
    swf, swc, swh, sww,
    syb, syf, syh, syw,
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,  # output pixels
    BLOCK_N: tl.constexpr,  # filters (positions in perm)
    BLOCK_K: tl.constexpr,  # input channels
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_m, pid_p = _grouped_tile(pid, tl.cdiv(P, BLOCK_M), tl.cdiv(F, BLOCK_N), GROUP_M)
    count = tl.load(count_ptr)
    offs_p, p_ok, rows, active = _perm_tile(perm_ptr, pid_p, F, count, BLOCK_N)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    m_ok = offs_m < P
    b, oh, ow = _pixel_coords(offs_m, Ho * Wo, Wo)

    # One flat loop over (kernel position, channel block), so the pipeliner prefetches across
    # kernel positions too. Tiles made only of pruned filters run it zero times.
    num_cb = tl.cdiv(C, BLOCK_K)
    t_end = tl.where(pid_p * BLOCK_N < count, KH * KW * num_cb, 0)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for t in range(0, t_end):
        rs = t // num_cb
        c0 = (t - rs * num_cb) * BLOCK_K
        r = rs // KW
        s = rs - r * KW
        offs_c = (c0 + tl.arange(0, BLOCK_K)).to(tl.int64)  # c * stride_c can pass 2^31 (NCHW)
        c_ok = offs_c < C
        a = _im2col_tile(x_ptr, b, oh, ow, m_ok, offs_c, c_ok, r, s, H, W, stride_h, stride_w, pad_h, pad_w,
                         dil_h, dil_w, sxb, sxc, sxh, sxw)
        # Gather of the active filters fused into the tile load ([BLOCK_K, BLOCK_N]).
        wt = tl.load(
            w_ptr + rows[None, :] * swf + offs_c[:, None] * swc + r * swh + s * sww,
            mask=active[None, :] & c_ok[:, None],
            other=0.0,
        )
        acc = _mma(acc, a, wt, UPCAST, DOT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(b_ptr + rows, mask=p_ok, other=0.0).to(tl.float32)[None, :]
    out = y_ptr + b[:, None] * syb + oh[:, None] * syh + ow[:, None] * syw + rows[None, :] * syf
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & p_ok[None, :])


@triton.jit
def _threshold_conv2d_bwd_dx_kernel(
    dyt_ptr,  # [F, P] compacted dY (positions < count are filled)
    w_ptr,  # [F, C, KH, KW]
    perm_ptr,  # [F] int32
    count_ptr,  # [1] int32
    dx_ptr,  # [B, C, H, W] out
    PQ,  # B * Hq * Wq: input pixels of one phase (upper bound)
    P,  # B * Ho * Wo
    C, H, W, Ho, Wo,
    Hq, Wq,  # cdiv(H, stride_h), cdiv(W, stride_w)
    KH, KW, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    swf, swc, swh, sww,
    sdb, sdc, sdh, sdw,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,  # input pixels of the phase
    BLOCK_C: tl.constexpr,  # input channels
    BLOCK_P: tl.constexpr,  # reduction over active filters
    GROUP_M: tl.constexpr,
):
    # dX[b, c, ih, iw] = sum over active f and (r, s) with ih = oh * stride_h - pad_h + r * dil_h
    # (and the same for w) of dY[b, f, oh, ow] W[f, c, r, s]. The input pixels of one phase
    # (ih % stride_h, iw % stride_w) share the set of kernel positions that reach them, so a
    # kernel position either feeds the whole tile or none of it.
    pid = tl.program_id(0)
    phase = tl.program_id(1)
    ph = phase // stride_w
    pw = phase - ph * stride_w
    pid_m, pid_c = _grouped_tile(pid, tl.cdiv(PQ, BLOCK_M), tl.cdiv(C, BLOCK_C), GROUP_M)
    count = tl.load(count_ptr)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    b, i, j = _pixel_coords(offs_m, Hq * Wq, Wq)
    ih = ph + i * stride_h
    iw = pw + j * stride_w
    pix_ok = (offs_m < PQ) & (ih < H) & (iw < W)
    offs_c = (pid_c * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    c_ok = offs_c < C
    # Offsets that make the numerators below non-negative (integer division then truncates
    # and rounds down alike, in the compiler and in the interpreter).
    lift_h = (KH - 1) * dil_h
    lift_w = (KW - 1) * dil_w
    acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    for rs in range(0, KH * KW):
        r = rs // KW
        s = rs - r * KW
        num_h = ph + pad_h - r * dil_h + lift_h * stride_h
        num_w = pw + pad_w - s * dil_w + lift_w * stride_w
        reaches = (num_h % stride_h == 0) & (num_w % stride_w == 0)
        oh = num_h // stride_h - lift_h + i
        ow = num_w // stride_w - lift_w + j
        ok = pix_ok & (oh >= 0) & (oh < Ho) & (ow >= 0) & (ow < Wo)
        pix = b * Ho * Wo + oh * Wo + ow
        p_end = tl.where(reaches, count, 0)
        for p0 in range(0, p_end, BLOCK_P):
            offs_p = p0 + tl.arange(0, BLOCK_P)
            p_ok = offs_p < count
            rows = tl.load(perm_ptr + offs_p, mask=p_ok, other=0).to(tl.int64)
            a = tl.load(
                dyt_ptr + offs_p.to(tl.int64)[None, :] * P + pix[:, None],
                mask=ok[:, None] & p_ok[None, :],
                other=0.0,
            )
            wt = tl.load(
                w_ptr + rows[:, None] * swf + offs_c[None, :] * swc + r * swh + s * sww,
                mask=p_ok[:, None] & c_ok[None, :],
                other=0.0,
            )
            acc = _mma(acc, a, wt, UPCAST, DOT_PRECISION)
    out = dx_ptr + b[:, None] * sdb + ih[:, None] * sdh + iw[:, None] * sdw + offs_c[None, :] * sdc
    tl.store(out, acc.to(dx_ptr.dtype.element_ty), mask=pix_ok[:, None] & c_ok[None, :])


@triton.jit
def _dyt_xcol_product(
    acc, dyt_ptr, x_ptr, offs_p, p_ok, offs_c, c_ok, r, s, j_lo, j_hi, m_step, P, Ho, Wo, H, W,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, sxb, sxc, sxh, sxw,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # acc += dyt[offs_p, pix] @ Xcol[pix, (r, s, offs_c)] over the pixels pix = j * m_step,
    # j in [j_lo, j_hi).
    for j0 in range(j_lo, j_hi, BLOCK_M):
        offs_j = j0 + tl.arange(0, BLOCK_M)
        j_ok = offs_j < j_hi
        pix = offs_j.to(tl.int64) * m_step
        a = tl.load(
            dyt_ptr + offs_p.to(tl.int64)[:, None] * P + pix[None, :],
            mask=p_ok[:, None] & j_ok[None, :],
            other=0.0,
        )
        b, oh, ow = _pixel_coords(pix, Ho * Wo, Wo)
        xt = _im2col_tile(x_ptr, b, oh, ow, j_ok, offs_c, c_ok, r, s, H, W, stride_h, stride_w, pad_h, pad_w,
                          dil_h, dil_w, sxb, sxc, sxh, sxw)
        acc = _mma(acc, a, xt, UPCAST, DOT_PRECISION)
    return acc


@triton.jit
def _split_range(end, split, SPLIT, BLOCK: tl.constexpr):
    # [lo, hi) of `split`'s share of range(end), in whole blocks so that tiles do not straddle.
    chunk = tl.cdiv(tl.cdiv(end, SPLIT), BLOCK) * BLOCK
    lo = tl.minimum(split * chunk, end)
    return lo, tl.minimum(lo + chunk, end)


@triton.jit
def _threshold_conv2d_bwd_dw_kernel(
    dyt_ptr,  # [F, P] compacted dY
    x_ptr,  # [B, C, H, W]
    w_ptr,  # [F, C, KH, KW]
    perm_ptr,  # [F] int32
    count_ptr,  # [1] int32
    g_ptr,  # [SPLIT, F, C, KH, KW] fp32 out (or dW itself when SPLIT == 1 and fp32): m * G
    rpart_ptr,  # [SPLIT, KH * KW * cdiv(C, BLOCK_C), F] fp32 out: partial sums of r
    P,
    F,
    C, H, W, Ho, Wo, KH, KW,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sxb, sxc, sxh, sxw,
    swf, swc, swh, sww,
    sample_count,
    sample_step,
    SPLIT,  # the pixel reduction is split into SPLIT programs along grid axis 2
    MODE: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr,  # filters (positions in perm)
    BLOCK_C: tl.constexpr,  # input channels
    BLOCK_M: tl.constexpr,  # reduction over pixels
):
    pid_p = tl.program_id(0)
    pid_k = tl.program_id(1)  # (kernel position, channel block)
    split = tl.program_id(2)
    num_cb = tl.cdiv(C, BLOCK_C)
    rs = pid_k // num_cb
    r = rs // KW
    s = rs - r * KW
    count = tl.load(count_ptr)
    offs_p, p_ok, rows, active = _perm_tile(perm_ptr, pid_p, F, count, BLOCK_P)
    offs_c = ((pid_k - rs * num_cb) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    c_ok = offs_c < C
    has_active = pid_p * BLOCK_P < count
    has_pruned = ((pid_p + 1) * BLOCK_P > count) & (count < F)

    m_end, m_step, a_rows = _mode_reduction_bounds(has_active, count, P, F, sample_count, sample_step, MODE)
    j_lo, j_hi = _split_range(m_end, split, SPLIT, BLOCK_M)
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    acc = _dyt_xcol_product(acc, dyt_ptr, x_ptr, offs_p, offs_p < a_rows, offs_c, c_ok, r, s, j_lo, j_hi, m_step,
                            P, Ho, Wo, H, W, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, sxb, sxc, sxh, sxw,
                            UPCAST, DOT_PRECISION, BLOCK_M)

    w_rows = F
    if MODE == 1:
        w_rows = tl.where(has_active, F, 0)
    w_ok = (offs_p < w_rows)[:, None] & c_ok[None, :]
    wt = tl.load(w_ptr + rows[:, None] * swf + offs_c[None, :] * swc + r * swh + s * sww, mask=w_ok, other=0.0)
    wt = wt.to(tl.float32)
    rsum = tl.sum(acc * wt, axis=1)
    if MODE == 2:
        # As in the Linear kernel: pruned rows of the tile straddling `count` are re-estimated
        # from the sample, so the result does not depend on the tiling.
        s_lo, s_hi = _split_range(tl.where(has_active & has_pruned, sample_count, 0), split, SPLIT, BLOCK_M)
        acc_s = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
        acc_s = _dyt_xcol_product(acc_s, dyt_ptr, x_ptr, offs_p, p_ok & (offs_p >= count), offs_c, c_ok, r, s,
                                  s_lo, s_hi, sample_step, P, Ho, Wo, H, W, stride_h, stride_w, pad_h, pad_w,
                                  dil_h, dil_w, sxb, sxc, sxh, sxw, UPCAST, DOT_PRECISION, BLOCK_M)
        r_sampled = tl.where(has_active, tl.sum(acc_s * wt, axis=1), rsum) * (P / sample_count)
        rsum = tl.where(active, rsum, r_sampled)
    num_kb = KH * KW * num_cb
    tl.store(rpart_ptr + (split * num_kb + pid_k) * F + rows, rsum, mask=p_ok)
    g = tl.where(active[:, None], acc, 0.0)
    fan_in = C * KH * KW
    g_off = split.to(tl.int64) * F * fan_in + rows[:, None] * fan_in + offs_c[None, :] * (KH * KW) + rs
    tl.store(g_ptr + g_off, g.to(g_ptr.dtype.element_ty), mask=p_ok[:, None] & c_ok[None, :])


# ----------------------------------------------------------------------------- launchers


def _check_operands(x: torch.Tensor, weight: torch.Tensor, row_mask: RowMask, geometry: ConvGeometry) -> None:
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(
            f"expected x [B, C, H, W] and weight [F, C, KH, KW], got {tuple(x.shape)} and {tuple(weight.shape)}"
        )
    if geometry.groups != 1:
        raise ValueError(f"the Triton convolution supports groups=1, got groups={geometry.groups}")
    if tuple(weight.shape[2:]) != geometry.kernel:
        raise ValueError(f"weight has kernel {tuple(weight.shape[2:])} but the geometry says {geometry.kernel}")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"x has {x.shape[1]} channels but weight expects {weight.shape[1]}")
    check_row_mask_operands(x, weight, row_mask, "filters")
    ho, wo = geometry.output_size(x.shape[2], x.shape[3])
    if ho < 1 or wo < 1:
        raise ValueError(f"input of spatial size {tuple(x.shape[2:])} is too small for this convolution")


def _memory_format(x: torch.Tensor, weight: torch.Tensor) -> torch.memory_format:
    """The layout PyTorch's convolution gives its output: channels-last when the input or the
    weight is channels-last."""
    for t in (x, weight):
        if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
            return torch.channels_last
    return torch.contiguous_format


def _pow2_block(n: int, cap: int, floor: int = 16) -> int:
    """A power-of-two tile covering ``n`` (at least ``floor``, ``tl.dot``'s minimum; at most ``cap``)."""
    return max(floor, min(cap, triton.next_power_of_2(n)))


@dataclass(frozen=True)
class ConvTiles:
    """Tile sizes of the three convolution GEMMs for one layer."""

    fwd_filters: int  # forward: output pixels x filters x channels
    fwd_channels: int
    dx_channels: int  # dX: input pixels x channels, reduction over filters
    dx_filters: int
    dw_filters: int  # dW: filters x channels, reduction over pixels
    dw_channels: int
    dw_pixels: int


def conv_tiles(cfg: GemmConfig, filters: int, chans: int) -> ConvTiles:
    """Tiles for a layer of ``filters`` x ``chans``. The filter tiles of the forward and dW
    GEMMs cover at most half of the filters, so that a layer at density 0.5 has whole tiles of
    pruned filters to skip (one tile of all the filters would always hold an active one); the
    channel tiles shrink to the channel count (the stem's 3 channels take a 16-wide tile)."""
    filter_tile = _pow2_block(filters // 2, cfg.block_n)
    return ConvTiles(
        fwd_filters=filter_tile,
        fwd_channels=_pow2_block(chans, cfg.block_k),
        dx_channels=_pow2_block(chans, cfg.block_n),
        dx_filters=cfg.block_k,
        dw_filters=filter_tile,
        dw_channels=_pow2_block(chans, cfg.block_k),
        dw_pixels=cfg.block_k,
    )


_MAX_GRID_YZ = 65535  # CUDA's limit on grid axes 1 and 2


def _geometry_args(geometry: ConvGeometry) -> tuple[int, ...]:
    (sh, sw), (ph, pw), (dh, dw) = geometry.stride, geometry.pad_begin, geometry.dilation
    return sh, sw, ph, pw, dh, dw


def threshold_conv2d_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, row_mask: RowMask, geometry: ConvGeometry
) -> torch.Tensor:
    """``Y [B, F, Ho, Wo]`` for ``x [B, C, H, W]``, ``weight [F, C, KH, KW]``, ``bias [F] | None``.

    Any strides; the output is channels-last when ``x`` or ``weight`` is, as with ``F.conv2d``.
    """
    _check_operands(x, weight, row_mask, geometry)
    batch, chans, height, width = x.shape
    filters, _, kh, kw = weight.shape
    ho, wo = geometry.output_size(height, width)
    y = torch.empty((batch, filters, ho, wo), device=x.device, dtype=x.dtype,
                    memory_format=_memory_format(x, weight))
    pixels = batch * ho * wo
    if pixels == 0:
        return y
    if bias is not None:
        bias = bias.contiguous()
    cfg = gemm_config(x.dtype)
    tiles = conv_tiles(cfg, filters, chans)
    grid = (triton.cdiv(pixels, cfg.block_m) * triton.cdiv(filters, tiles.fwd_filters),)
    _threshold_conv2d_fwd_kernel[grid](
        x, weight, bias if bias is not None else weight, row_mask.perm, row_mask.count, y,
        pixels, filters, chans, height, width, ho, wo, kh, kw, *_geometry_args(geometry),
        *x.stride(), *weight.stride(), *y.stride(),
        HAS_BIAS=bias is not None,
        UPCAST=interpreter_enabled(),
        DOT_PRECISION=dot_precision("conv"),
        BLOCK_M=cfg.block_m,
        BLOCK_N=tiles.fwd_filters,
        BLOCK_K=tiles.fwd_channels,
        GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return y


# Parallelism target of the pixel-split dW GEMM: programs per launch (a few waves of a
# Hopper GPU's 132 SMs) and the fewest pixels one split may reduce over.
_DW_TARGET_PROGRAMS = 512
_DW_MIN_PIXELS_PER_SPLIT = 1024


def _dw_split(tiles: int, pixels: int, block_m: int) -> int:
    by_work = triton.cdiv(pixels, max(_DW_MIN_PIXELS_PER_SPLIT, block_m))
    return max(1, min(by_work, triton.cdiv(_DW_TARGET_PROGRAMS, tiles)))


def threshold_conv2d_bwd(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    row_mask: RowMask,
    geometry: ConvGeometry,
    *,
    mode: str = "exact",
    sample_fraction: float = 0.125,
    need_dx: bool = True,
    threshold_dtype: torch.dtype = torch.float32,
    split: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Gradients ``(dX | None, dW, dtau)`` of the threshold Conv2d (bias gradient left to the
    caller). ``split``: how many programs share the pixel reduction of the weight gradient
    (default: chosen from the shape; the result does not depend on it beyond fp32 rounding)."""
    _check_operands(x, weight, row_mask, geometry)
    if mode not in BACKWARD_MODES:
        raise ValueError(f"backward mode must be one of {sorted(BACKWARD_MODES)}, got {mode!r}")
    batch, chans, height, width = x.shape
    filters, _, kh, kw = weight.shape
    ho, wo = geometry.output_size(height, width)
    if grad_y.shape != (batch, filters, ho, wo):
        raise ValueError(f"grad_y has shape {tuple(grad_y.shape)}, expected {(batch, filters, ho, wo)}")
    if split is not None and (isinstance(split, bool) or not isinstance(split, int) or not 1 <= split <= _MAX_GRID_YZ):
        raise ValueError(f"split must be an integer in [1, {_MAX_GRID_YZ}], got {split!r}")
    device = x.device
    fan_in = chans * kh * kw
    dx = torch.empty_like(x, memory_format=_memory_format(x, weight)) if need_dx else None
    dw = torch.empty(weight.shape, device=device, dtype=weight.dtype)
    dtau = torch.empty(filters, device=device, dtype=threshold_dtype)
    pixels = batch * ho * wo
    if pixels == 0:
        dw.zero_()
        dtau.zero_()
        if dx is not None:
            dx.zero_()
        return dx, dw, dtau

    grad_y = grad_y.to(x.dtype)
    cfg = gemm_config(x.dtype)
    tiles = conv_tiles(cfg, filters, chans)
    sh, sw = geometry.stride
    num_kb = kh * kw * triton.cdiv(chans, tiles.dw_channels)
    if num_kb > _MAX_GRID_YZ or sh * sw > _MAX_GRID_YZ:
        raise ValueError(
            f"convolution too large for the kernels' launch grid: kernel {kh}x{kw}, {chans} channels, stride {sh}x{sw}"
        )
    upcast = interpreter_enabled()
    precision = dot_precision("conv")
    mode_id = BACKWARD_MODES[mode]
    geo = _geometry_args(geometry)

    # dyt[q, p] = dY[b, perm[q], oh, ow] for the flattened pixel p = (b, oh, ow).
    dyt = gather_grad_columns(
        grad_y, row_mask, pixels, filters, (ho * wo, wo), (grad_y.stride(0), grad_y.stride(2), grad_y.stride(3)),
        grad_y.stride(1), all_rows=mode_id != 1,
    )

    if need_dx:
        hq, wq = triton.cdiv(height, sh), triton.cdiv(width, sw)
        phase_pixels = batch * hq * wq
        grid = (triton.cdiv(phase_pixels, cfg.block_m) * triton.cdiv(chans, tiles.dx_channels), sh * sw)
        _threshold_conv2d_bwd_dx_kernel[grid](
            dyt, weight, row_mask.perm, row_mask.count, dx,
            phase_pixels, pixels, chans, height, width, ho, wo, hq, wq, kh, kw, *geo,
            *weight.stride(), *dx.stride(),
            UPCAST=upcast,
            DOT_PRECISION=precision,
            BLOCK_M=cfg.block_m,
            BLOCK_C=tiles.dx_channels,
            BLOCK_P=tiles.dx_filters,
            GROUP_M=cfg.group_m,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )

    n_tiles = triton.cdiv(filters, tiles.dw_filters) * num_kb
    n_split = split if split is not None else _dw_split(n_tiles, pixels, tiles.dw_pixels)
    # m*G: accumulated straight into dW for fp32 without a split, else into an fp32 workspace
    # (one slice per split) that the finish pass sums in a fixed order and rounds once.
    in_place = weight.dtype == torch.float32 and n_split == 1
    g = dw if in_place else torch.empty((n_split, filters, fan_in), device=device, dtype=torch.float32)
    rpart = torch.empty((n_split * num_kb, filters), device=device, dtype=torch.float32)
    s_count, s_step = sample_rows(pixels, sample_fraction)
    _threshold_conv2d_bwd_dw_kernel[(triton.cdiv(filters, tiles.dw_filters), num_kb, n_split)](
        dyt, x, weight, row_mask.perm, row_mask.count, g, rpart,
        pixels, filters, chans, height, width, ho, wo, kh, kw, *geo,
        *x.stride(), *weight.stride(),
        s_count, s_step, n_split,
        MODE=mode_id,
        UPCAST=upcast,
        DOT_PRECISION=precision,
        BLOCK_P=tiles.dw_filters,
        BLOCK_C=tiles.dw_channels,
        BLOCK_M=tiles.dw_pixels,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    # The finish pass reads W in the (c, r, s) order of the workspace.
    w2d = weight.reshape(filters, fan_in) if weight.is_contiguous() else weight.contiguous().view(filters, fan_in)
    finish_threshold_gradients(rpart, w2d, row_mask, g, dw.view(filters, fan_in), dtau, split=n_split,
                               mode_id=mode_id, in_place=in_place)
    return dx, dw, dtau
