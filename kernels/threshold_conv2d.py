"""Structured-sparse Conv2d kernels: implicit GEMMs that read and multiply active filters only.

Notation: input ``X [B, C, H, W]``, weight ``W [F, C, KH, KW]`` (F filters), thresholds
``tau [F]``, ``perm [F]`` / ``count [1]`` from :mod:`.threshold_mask` (active filters first,
sorted), output ``Y [B, F, Ho, Wo]``. Output pixels are flattened as
``p = b * Ho * Wo + oh * Wo + ow``; ``P = B * Ho * Wo`` of them.

The convolution is the GEMM ``Y[p, f] = sum_{r, s, c} Xcol[p, (r, s, c)] W[f, c, r, s]`` whose
``Xcol`` (im2col) tiles are gathered on the fly from ``X``; its columns are positions in
``perm``, so only active filters are loaded and multiplied (``groups == 1``).

Layouts. The kernels read ``X`` channels-last (``[B, H, W, C]`` in memory): a row of an
im2col tile is then a contiguous run of channels. An NCHW input is converted once per launcher
call (``x.contiguous(memory_format=torch.channels_last)``, one read and one write of ``X``);
channels-last inputs (``model.to(memory_format=torch.channels_last)``) are read in place. The
outputs (``Y``, ``dX``) keep the layout ``F.conv2d`` would give: channels-last when the input or
the weight is, NCHW otherwise. A weight that is not channels-last has its active filters copied
to a contiguous ``[count, KH * KW * C]`` buffer (see :func:`.threshold_linear.compact_weight_rows`;
the copy is the layout conversion, and only active filters move); a channels-last weight is
gathered inside the tile loads. ``KH``, ``KW`` are compile-time constants, per-pixel offsets are
computed once per program, and offsets are int32 wherever the launcher proves they fit.

Forward:  an upper-bound grid over pixel tiles x ``perm`` blocks; as for Linear, the block that
          straddles ``count`` runs the narrowest tile class that covers its active filters, and
          blocks past ``count`` only write bias (or 0) for the pruned output channels.
Backward: ``dY``'s active columns are compacted into ``dyc [P, >= count]`` by a launch that also
          sums the bias gradient over every filter (it reads nearly all of ``dY`` anyway); with
          every filter active, a channels-last ``dY`` that has ``dyc``'s layout is not copied
          and the GEMMs read it in place (decided on the device, :func:`_dy_in_place`);
          ``dX`` is the transposed convolution over the active filters only (full ``BLOCK_P``
          steps, then ``TAIL_P``-wide steps), split into the ``stride_h * stride_w`` phases of
          the input pixels so that no lane computes a product that the stride makes zero; each
          phase loops only over the kernel positions that reach it;
          ``G^T = Xcol^T dY`` (``[channels, filters]`` tiles per kernel position, filters as the
          N dimension again) is a GEMM over the pixels, split along them so that the active
          filter blocks fill the SMs (:func:`_dw_split`), with
          per-tile partial sums of ``r_i = sum G_i W_i`` (the last split program of a tile adds
          the splits' fp32 slices of ``G`` into the first); the finish kernel then writes
          ``dtau = -r`` and ``dW = m G + sign(W) r / (C KH KW)``.
The backward modes are those of :mod:`.threshold_linear`; ``sample`` draws its strided sample
from the output pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._conv import ConvGeometry
from .._rowmask import RowMask, sample_rows
from ._config import (
    MIN_UNITS,
    GemmConfig,
    aligned,
    bytes_per_mac,
    cdiv,
    dot_precision,
    gemm_config,
    gpu_tiles,
    grid_programs,
    interpreter_enabled,
    launch,
    launches_once,
    next_power_of_2,
    sample_block,
    tail_widths,
    use_compact_weight,
)
from .threshold_linear import (
    _NO_GUARD,
    BACKWARD_MODES,
    DYC_PAD,
    _grouped_tile,
    _row_mask_guard,
    check_density_hint,
    check_row_mask_operands,
    compact_weight_rows,
    finish_threshold_gradients,
    split_tickets,
)
from .threshold_mask import _guard_stores_apart, fits_int32, flush_guard_writes


@triton.jit
def _pixel_coords(offs, plane, width):
    # Flattened pixel index -> (image, row, column) for an image of `plane = rows * width` pixels.
    b = offs // plane
    hw = offs - b * plane
    row = hw // width
    return b, row, hw - row * width


# ----------------------------------------------------------------------------- forward


@triton.jit
def _conv_fwd_tile(
    x_ptr, w_ptr, b_ptr, y_ptr, perm_ptr, p0, count, F, C, H, W,
    pix, ih0, iw0, m_ok, out, dil_h, dil_w,
    sxc, sxh, sxw, swf, swc, swh, sww, syf,
    HAS_BIAS: tl.constexpr, COMPACT_W: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    WIDE: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    WIDTH: tl.constexpr,
):
    # Output channels perm[p0 : p0 + WIDTH] of a pixel tile: pix, ih0, iw0 are the pixels' offset
    # in X and top-left input row / column (computed once), out their offset in Y.
    offs_p = p0 + tl.arange(0, WIDTH)
    p_ok = offs_p < F
    active = offs_p < count
    rows = tl.load(perm_ptr + offs_p, mask=p_ok, other=0)
    if WIDE:
        rows = rows.to(tl.int64)
    if COMPACT_W:
        w_rows = offs_p  # row p of the compacted weight is W[perm[p]]
        if WIDE:
            w_rows = w_rows.to(tl.int64)
    else:
        w_rows = rows
    offs_c = tl.arange(0, BLOCK_K)
    # int64 only where offsets are formed, once: the loop's masks stay 32-bit.
    offs_cp = offs_c.to(tl.int64) if WIDE else offs_c
    a_ptrs = x_ptr + pix[:, None] + offs_cp[None, :] * sxc
    # Gather of the active filters fused into the tile load ([BLOCK_K, WIDTH]).
    w_ptrs = w_ptr + w_rows[None, :] * swf + offs_cp[:, None] * swc
    num_cb = tl.cdiv(C, BLOCK_K)
    acc = tl.zeros([BLOCK_M, WIDTH], dtype=tl.float32)
    # One flat loop over (kernel position, channel block), so the pipeliner prefetches across
    # kernel positions too. (No jit-function calls inside loops: the interpreter pays for each.)
    for t in range(0, KH * KW * num_cb):
        rs = t // num_cb
        c0 = (t - rs * num_cb) * BLOCK_K
        r = rs // KW
        s = rs - r * KW
        dh = r * dil_h
        dw = s * dil_w
        ih = ih0 + dh
        iw = iw0 + dw
        ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        c_ok = offs_c < C - c0
        if WIDE:
            dh = dh.to(tl.int64)
            dw = dw.to(tl.int64)
            c0 = c0.to(tl.int64)
            r = r.to(tl.int64)
            s = s.to(tl.int64)
        a = tl.load(a_ptrs + (dh * sxh + dw * sxw + c0 * sxc), mask=ok[:, None] & c_ok[None, :], other=0.0)
        b = tl.load(w_ptrs + (r * swh + s * sww + c0 * swc), mask=c_ok[:, None] & active[None, :], other=0.0)
        if UPCAST:  # the interpreter: bf16 tl.dot is unreliable there
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rows, mask=p_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + out[:, None] + rows[None, :] * syf, acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & p_ok[None, :])


@triton.jit
def _conv_fill_pruned(
    b_ptr, y_ptr, perm_ptr, lo, hi, F, m_ok, out, syf,
    HAS_BIAS: tl.constexpr, WIDE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK: tl.constexpr,
):
    # Output channels perm[p] of pruned positions lo <= p < min(hi, F): the bias (or 0).
    offs_p = lo + tl.arange(0, BLOCK)
    p_ok = offs_p < tl.minimum(hi, F)
    rows = tl.load(perm_ptr + offs_p, mask=p_ok, other=0)
    if WIDE:
        rows = rows.to(tl.int64)
    val = tl.zeros([BLOCK_M, BLOCK], dtype=tl.float32)
    if HAS_BIAS:
        val += tl.load(b_ptr + rows, mask=p_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + out[:, None] + rows[None, :] * syf, val.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & p_ok[None, :])


@triton.jit
def _threshold_conv2d_fwd_kernel(
    x_ptr,  # [B, C, H, W], channels-last in memory (sxc == 1 on the launcher's path)
    w_ptr,  # [F, C, KH, KW], or [>= count, KH * KW * C] compacted (COMPACT_W)
    b_ptr,  # [F] (only with HAS_BIAS), contiguous
    perm_ptr,  # [F] int32
    count_ptr,  # [1] int32
    y_ptr,  # [B, F, Ho, Wo] out, any strides
    P,  # B * Ho * Wo
    F,
    C, H, W, Ho, Wo,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sxb, sxc, sxh, sxw,
    swf, swc, swh, sww,
    syb, syf, syh, syw,
    guard_flag_ptr,  # [1] int8 (GUARD_WRITES: the collapse guard's writes, as the Linear forward's)
    guard_tau_ptr,  # [F]
    guard_resets_ptr,  # [1] int64
    guard_previous_ptr,  # [1] fp32
    HAS_BIAS: tl.constexpr,
    COMPACT_W: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    WIDE: tl.constexpr,
    KH: tl.constexpr,
    KW: tl.constexpr,
    BLOCK_M: tl.constexpr,  # output pixels
    BLOCK_N: tl.constexpr,  # filters (positions in perm)
    BLOCK_K: tl.constexpr,  # input channels
    GROUP_M: tl.constexpr,
    TAIL1: tl.constexpr,  # narrower tiles for the block that straddles count
    TAIL2: tl.constexpr,
    TAIL3: tl.constexpr,
    GUARD_WRITES: tl.constexpr = False,
    GUARD_BLOCK: tl.constexpr = 64,
):
    pid = tl.program_id(0)
    pid_m, pid_p = _grouped_tile(pid, tl.cdiv(P, BLOCK_M), tl.cdiv(F, BLOCK_N), GROUP_M)
    count = tl.load(count_ptr)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if WIDE:
        offs_m = offs_m.to(tl.int64)
    m_ok = offs_m < P
    b, oh, ow = _pixel_coords(offs_m, Ho * Wo, Wo)
    if WIDE:
        # Image, row and column fit int32 (the element offsets do not): 32-bit coordinates
        # keep the main loop's bounds checks in 32-bit registers (64-bit ones spill).
        b, oh, ow = b.to(tl.int32), oh.to(tl.int32), ow.to(tl.int32)
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    if WIDE:
        b64 = b.to(tl.int64)
        pix = b64 * sxb + ih0.to(tl.int64) * sxh + iw0.to(tl.int64) * sxw
        out = b64 * syb + oh.to(tl.int64) * syh + ow.to(tl.int64) * syw
    else:
        pix = b * sxb + ih0 * sxh + iw0 * sxw
        out = b * syb + oh * syh + ow * syw
    p0 = pid_p * BLOCK_N
    rem = count - p0
    if rem > TAIL1:
        _conv_fwd_tile(x_ptr, w_ptr, b_ptr, y_ptr, perm_ptr, p0, count, F, C, H, W, pix, ih0, iw0, m_ok, out, dil_h,
                       dil_w, sxc, sxh, sxw, swf, swc, swh, sww, syf, HAS_BIAS, COMPACT_W, UPCAST, DOT_PRECISION,
                       WIDE, KH, KW, BLOCK_M, BLOCK_K, BLOCK_N)
    elif rem > TAIL2:
        _conv_fwd_tile(x_ptr, w_ptr, b_ptr, y_ptr, perm_ptr, p0, count, F, C, H, W, pix, ih0, iw0, m_ok, out, dil_h,
                       dil_w, sxc, sxh, sxw, swf, swc, swh, sww, syf, HAS_BIAS, COMPACT_W, UPCAST, DOT_PRECISION,
                       WIDE, KH, KW, BLOCK_M, BLOCK_K, TAIL1)
        _conv_fill_pruned(b_ptr, y_ptr, perm_ptr, p0 + TAIL1, p0 + BLOCK_N, F, m_ok, out, syf, HAS_BIAS, WIDE,
                          BLOCK_M, BLOCK_N)
    elif rem > TAIL3:
        _conv_fwd_tile(x_ptr, w_ptr, b_ptr, y_ptr, perm_ptr, p0, count, F, C, H, W, pix, ih0, iw0, m_ok, out, dil_h,
                       dil_w, sxc, sxh, sxw, swf, swc, swh, sww, syf, HAS_BIAS, COMPACT_W, UPCAST, DOT_PRECISION,
                       WIDE, KH, KW, BLOCK_M, BLOCK_K, TAIL2)
        _conv_fill_pruned(b_ptr, y_ptr, perm_ptr, p0 + TAIL2, p0 + BLOCK_N, F, m_ok, out, syf, HAS_BIAS, WIDE,
                          BLOCK_M, BLOCK_N)
    elif rem > 0:
        _conv_fwd_tile(x_ptr, w_ptr, b_ptr, y_ptr, perm_ptr, p0, count, F, C, H, W, pix, ih0, iw0, m_ok, out, dil_h,
                       dil_w, sxc, sxh, sxw, swf, swc, swh, sww, syf, HAS_BIAS, COMPACT_W, UPCAST, DOT_PRECISION,
                       WIDE, KH, KW, BLOCK_M, BLOCK_K, TAIL3)
        _conv_fill_pruned(b_ptr, y_ptr, perm_ptr, p0 + TAIL3, p0 + BLOCK_N, F, m_ok, out, syf, HAS_BIAS, WIDE,
                          BLOCK_M, BLOCK_N)
    else:
        _conv_fill_pruned(b_ptr, y_ptr, perm_ptr, p0, p0 + BLOCK_N, F, m_ok, out, syf, HAS_BIAS, WIDE, BLOCK_M,
                          BLOCK_N)
    if GUARD_WRITES:
        # (last, when the tile's registers are free; no program reads what it writes)
        if pid == 0:
            _guard_stores_apart(guard_flag_ptr, count, F, guard_tau_ptr, guard_resets_ptr, guard_previous_ptr,
                                GUARD_BLOCK)


# ----------------------------------------------------------------------------- dX


@triton.jit
def _phase_taps(phase, pad, dil, stride, K: tl.constexpr):
    # The kernel positions r that reach input pixels of this phase along one axis:
    # (phase + pad - r * dil) % stride == 0. They form r0, r0 + step, ... (step = stride /
    # gcd(stride, dil)); returns (r0, how many). The lift keeps the numerator non-negative.
    lift = (K - 1) * dil * stride
    first = phase * 0 + K
    n = phase * 0
    for r in tl.static_range(K):
        reach = (phase + pad - r * dil + lift) % stride == 0
        first = tl.where(reach & (first == K), r, first)
        n += reach.to(tl.int32)
    return first, n


@triton.jit
def _threshold_conv2d_bwd_dx_kernel(
    dyc_ptr,  # [P, >= count] compacted dY (row = output pixel, unit column stride)
    dy_ptr,  # [P, F] dY itself, row stride stride_cm (DY_DIRECT only)
    w_ptr,  # [F, C, KH, KW], or [>= count, KH * KW * C] compacted (COMPACT_W)
    perm_ptr,  # [F] int32
    count_ptr,  # [1] int32
    dx_ptr,  # [B, C, H, W] out, any strides
    PQ,  # B * Hq * Wq: input pixels of one phase (upper bound)
    F,
    C, H, W, Ho, Wo,
    Hq, Wq,  # cdiv(H, stride_h), cdiv(W, stride_w)
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    step_r, step_s,  # stride / gcd(stride, dilation) per axis: kernel positions between two taps of a phase
    stride_cm,
    swf, swc, swh, sww,
    sdb, sdc, sdh, sdw,
    DY_DIRECT: tl.constexpr,  # dY is channels-last with F a multiple of DYC_PAD: dyc's layout
    COMPACT_W: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    WIDE: tl.constexpr,
    KH: tl.constexpr,
    KW: tl.constexpr,
    BLOCK_M: tl.constexpr,  # input pixels of the phase
    BLOCK_C: tl.constexpr,  # input channels
    BLOCK_P: tl.constexpr,  # reduction step over active filters
    TAIL_P: tl.constexpr,  # reduction step for the count % BLOCK_P filters left over
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
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if WIDE:
        offs_m = offs_m.to(tl.int64)
    b, i, j = _pixel_coords(offs_m, Hq * Wq, Wq)
    ih = ph + i * stride_h
    iw = pw + j * stride_w
    pix_ok = (offs_m < PQ) & (ih < H) & (iw < W)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    if WIDE:
        offs_c = offs_c.to(tl.int64)
    c_ok = offs_c < C
    r0, n_r = _phase_taps(ph, pad_h, dil_h, stride_h, KH)
    s0, n_s = _phase_taps(pw, pad_w, dil_w, stride_w, KW)
    n_taps = n_r * n_s
    # Output pixel of tap (r, s): (i + dh, j + dw) with dh = (ph + pad_h - r dil_h) / stride_h.
    lift_h = (KH - 1) * dil_h
    lift_w = (KW - 1) * dil_w
    base = b * Ho * Wo + i * Wo + j
    if DY_DIRECT:
        if count == F:
            # Every filter active: perm is the identity and dY's rows are dyc's, so the
            # compaction wrote nothing (see _conv_compact_dy_kernel).
            dyc_ptr = dy_ptr
    a_rows = dyc_ptr + base[:, None] * stride_cm
    w_cols = w_ptr + offs_c[None, :] * swc
    acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)

    # Full BLOCK_P steps over perm[:full] for every tap, then TAIL_P steps over the rest: one
    # flat loop each, so that the pipeliner prefetches across taps.
    full = count - count % BLOCK_P
    n_full = full // BLOCK_P
    offs_q = tl.arange(0, BLOCK_P)
    for t in range(0, n_taps * n_full):
        tap = t // n_full
        p0 = (t - tap * n_full) * BLOCK_P
        kr = tap // n_s
        r = r0 + kr * step_r
        s = s0 + (tap - kr * n_s) * step_s
        dh = (ph + pad_h - r * dil_h + lift_h * stride_h) // stride_h - lift_h
        dw = (pw + pad_w - s * dil_w + lift_w * stride_w) // stride_w - lift_w
        ok = pix_ok & (i + dh >= 0) & (i + dh < Ho) & (j + dw >= 0) & (j + dw < Wo)
        if COMPACT_W:
            w_rows = p0 + offs_q
        else:
            w_rows = tl.load(perm_ptr + p0 + offs_q)
        shift = dh * Wo + dw
        if WIDE:
            w_rows = w_rows.to(tl.int64)
            shift = shift.to(tl.int64)
            r = r.to(tl.int64)
            s = s.to(tl.int64)
        a = tl.load(a_rows + (shift * stride_cm + p0) + offs_q[None, :], mask=ok[:, None], other=0.0)
        wt = tl.load(w_cols + (w_rows[:, None] * swf + (r * swh + s * sww)), mask=c_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(a, wt, acc, input_precision=DOT_PRECISION)

    n_tail = tl.cdiv(count - full, TAIL_P)
    offs_t = tl.arange(0, TAIL_P)
    for t in range(0, n_taps * n_tail):
        tap = t // n_tail
        p0 = full + (t - tap * n_tail) * TAIL_P
        kr = tap // n_s
        r = r0 + kr * step_r
        s = s0 + (tap - kr * n_s) * step_s
        dh = (ph + pad_h - r * dil_h + lift_h * stride_h) // stride_h - lift_h
        dw = (pw + pad_w - s * dil_w + lift_w * stride_w) // stride_w - lift_w
        ok = pix_ok & (i + dh >= 0) & (i + dh < Ho) & (j + dw >= 0) & (j + dw < Wo)
        p_ok = p0 + offs_t < count
        if COMPACT_W:
            w_rows = p0 + offs_t
        else:
            w_rows = tl.load(perm_ptr + p0 + offs_t, mask=p_ok, other=0)
        shift = dh * Wo + dw
        if WIDE:
            w_rows = w_rows.to(tl.int64)
            shift = shift.to(tl.int64)
            r = r.to(tl.int64)
            s = s.to(tl.int64)
        a = tl.load(a_rows + (shift * stride_cm + p0) + offs_t[None, :], mask=ok[:, None] & p_ok[None, :],
                    other=0.0)
        wt = tl.load(w_cols + (w_rows[:, None] * swf + (r * swh + s * sww)), mask=p_ok[:, None] & c_ok[None, :],
                     other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(a, wt, acc, input_precision=DOT_PRECISION)
    out = dx_ptr + (b * sdb + ih * sdh + iw * sdw)[:, None] + offs_c[None, :] * sdc
    tl.store(out, acc.to(dx_ptr.dtype.element_ty), mask=pix_ok[:, None] & c_ok[None, :])


# ----------------------------------------------------------------------------- dY compaction, bias gradient


@triton.jit
def _conv_compact_dy_kernel(
    dy_ptr,  # [B, F, Ho, Wo] output gradient, any strides
    perm_ptr,  # [F] int32
    count_ptr,  # [1] int32
    dyc_ptr,  # [P, >= count] out, row stride stride_cm: dyc[q, p] = dY[q, perm[p]] for p < count
    dbp_ptr,  # [cdiv(P, BLOCK_M), F] fp32 scratch: each pixel block's sum of dY per filter (HAS_BIAS)
    db_ptr,  # [F] out: the bias gradient, sum of dY over the pixels (HAS_BIAS)
    ticket_ptr,  # [>= cdiv(F, BLOCK_P)] int32, 0 on entry and on exit (HAS_BIAS)
    P,
    F,
    PLANE,  # Ho * Wo: pixel q is (q // PLANE, (q % PLANE) // Wo, q % Wo)
    Wo,
    sdyb, sdyf, sdyh, sdyw,
    stride_cm,
    HAS_BIAS: tl.constexpr,
    UNIT_MAJOR: tl.constexpr,  # dY's filters are its contiguous dimension (channels-last)
    DY_DIRECT: tl.constexpr,  # dY is [P, F] with row stride stride_cm: the GEMMs read it in place at count == F
    WIDE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    # Copies dY's active columns for the GEMMs and, with a bias, sums every column over the
    # pixels in the same pass: the bias gradient needs all of dY, which the compaction reads
    # nearly all of anyway (a 32-byte sector holds 16 bf16 filters). The sum is deterministic:
    # per pixel block, then the program that draws a column block's last ticket adds the blocks'
    # partials in block order.
    pid_m = tl.program_id(0)
    pid_p = tl.program_id(1)
    count = tl.load(count_ptr)
    # The positions to copy: none when the GEMMs read dY in place (every filter active).
    n_copy = count
    if DY_DIRECT:
        if count == F:
            n_copy = 0
    if not HAS_BIAS:
        if pid_p * BLOCK_P >= n_copy:
            return
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = offs_p < F
    active = offs_p < count
    rows = tl.load(perm_ptr + offs_p, mask=p_ok, other=0)
    if WIDE:
        rows = rows.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if WIDE:
        offs_m = offs_m.to(tl.int64)
    m_ok = offs_m < P
    b, oh, ow = _pixel_coords(offs_m, PLANE, Wo)
    src = b * sdyb + oh * sdyh + ow * sdyw
    read = p_ok if HAS_BIAS else active
    dst = dyc_ptr + offs_m[:, None] * stride_cm + offs_p[None, :]
    if UNIT_MAJOR:
        tile = tl.load(dy_ptr + src[:, None] + rows[None, :] * sdyf, mask=m_ok[:, None] & read[None, :], other=0.0)
    else:
        # Read along the pixels (NCHW) and transposed in registers: both sides coalesced.
        tile = tl.trans(tl.load(dy_ptr + src[None, :] + rows[:, None] * sdyf, mask=read[:, None] & m_ok[None, :],
                                other=0.0))
    tl.store(dst, tile, mask=m_ok[:, None] & (offs_p < n_copy)[None, :])
    if HAS_BIAS:
        n_m = tl.num_programs(0)
        part = tl.sum(tile.to(tl.float32), axis=0)
        blk = pid_m.to(tl.int64) if WIDE else pid_m
        tl.store(dbp_ptr + blk * F + rows, part, mask=p_ok)
        # Every thread's stores happen before the ticket (release); the last program sees them
        # all (acquire), as in the row-mask kernel's handoff.
        tl.debug_barrier()
        ticket = tl.atomic_add(ticket_ptr + pid_p, 1, sem="acq_rel")
        if ticket == n_m - 1:
            acc = tl.zeros([BLOCK_P], dtype=tl.float32)
            n_loop = n_m
            if WIDE:  # int64 bounds make the loop variable int64
                n_loop = tl.cast(n_m, tl.int64)
            for m in range(0, n_loop):
                acc += tl.load(dbp_ptr + m * F + rows, mask=p_ok, other=0.0)
            tl.store(db_ptr + rows, acc.to(db_ptr.dtype.element_ty), mask=p_ok)
            tl.atomic_xchg(ticket_ptr + pid_p, 0, sem="relaxed")


# ----------------------------------------------------------------------------- dW


@triton.jit
def _split_range(end, split, SPLIT, BLOCK: tl.constexpr):
    # [lo, hi) of `split`'s share of range(end), in whole blocks so that tiles do not straddle.
    chunk = tl.cdiv(tl.cdiv(end, SPLIT), BLOCK) * BLOCK
    lo = tl.minimum(split * chunk, end)
    return lo, tl.minimum(lo + chunk, end)


@triton.jit
def _conv_dw_tile(
    x_ptr, dyc_ptr, dy_ptr, w_ptr, perm_ptr, g_ptr, rpart_ptr,
    p0, p_end, count, kb, split, num_kb, r, s, rs, offs_c, c_ok, F, H, W, Ho, Wo,
    m_end, m_step, r_scale, SPLIT,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sxb, sxc, sxh, sxw, stride_cm, sdyb, sdyf, sdyh, sdyw, swf, swc, swh, sww,
    stride_gs, stride_gn, stride_gc, stride_grs,
    SOURCE: tl.constexpr,  # dY columns from: 0 dyc (active positions), 1 dY itself (pruned), 2 both
    STORE_G: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, WIDTH: tl.constexpr,
):
    # G^T[(r, s, c), p] = sum_pix Xcol[pix, (r, s, c)] dY[pix, perm[p]] for positions
    # p0 <= p < min(p0 + WIDTH, p_end) and this program's share of the pixels pix = j * m_step,
    # j < m_end; then the partial r and (active positions) G.
    offs_p = p0 + tl.arange(0, WIDTH)
    p_ok = offs_p < p_end
    rows = tl.load(perm_ptr + offs_p, mask=p_ok, other=0)
    if WIDE:
        rows = rows.to(tl.int64)
    in_dyc = p_ok & (offs_p < count)
    in_dy = p_ok & (offs_p >= count)
    j_lo, j_hi = _split_range(m_end, split, SPLIT, BLOCK_M)
    acc = tl.zeros([BLOCK_C, WIDTH], dtype=tl.float32)
    offs_j = tl.arange(0, BLOCK_M)
    dh = r * dil_h - pad_h
    dw = s * dil_w - pad_w
    for j0 in range(j_lo, j_hi, BLOCK_M):
        jj = j0 + offs_j
        j_ok = jj < j_hi
        if WIDE:
            jj = jj.to(tl.int64)
        pix = jj * m_step
        b = pix // (Ho * Wo)
        hw = pix - b * (Ho * Wo)
        oh = hw // Wo
        ow = hw - oh * Wo
        ih = oh * stride_h + dh
        iw = ow * stride_w + dw
        ok = j_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        xt = tl.load(x_ptr + (b * sxb + ih * sxh + iw * sxw)[:, None] + offs_c[None, :] * sxc,
                     mask=ok[:, None] & c_ok[None, :], other=0.0)
        if SOURCE == 0:
            # Unmasked along p (vector loads; dyc's rows are padded to whole blocks), then the
            # columns past count, which hold no data, are zeroed.
            g = tl.load(dyc_ptr + pix[:, None] * stride_cm + offs_p[None, :], mask=j_ok[:, None], other=0.0)
            g = tl.where(in_dyc[None, :], g, 0.0)
        elif SOURCE == 1:
            g = tl.load(dy_ptr + (b * sdyb + oh * sdyh + ow * sdyw)[:, None] + rows[None, :] * sdyf,
                        mask=j_ok[:, None] & in_dy[None, :], other=0.0)
        else:
            g = tl.load(dyc_ptr + pix[:, None] * stride_cm + offs_p[None, :],
                        mask=j_ok[:, None] & in_dyc[None, :], other=0.0)
            g += tl.load(dy_ptr + (b * sdyb + oh * sdyh + ow * sdyw)[:, None] + rows[None, :] * sdyf,
                         mask=j_ok[:, None] & in_dy[None, :], other=0.0)
        if UPCAST:
            xt = xt.to(tl.float32)
            g = g.to(tl.float32)
        acc = tl.dot(tl.trans(xt), g, acc, input_precision=DOT_PRECISION)
    wt = tl.load(w_ptr + rows[None, :] * swf + offs_c[:, None] * swc + (r * swh + s * sww),
                 mask=c_ok[:, None] & p_ok[None, :], other=0.0).to(tl.float32)
    rsum = tl.sum(acc * wt, axis=0) * r_scale
    tl.store(rpart_ptr + (split * num_kb + kb) * F + rows, rsum, mask=p_ok)
    if STORE_G:
        # Only active rows: the finish pass never reads G of a pruned filter.
        g_ptrs = g_ptr + split * stride_gs + rows[None, :] * stride_gn + offs_c[:, None] * stride_gc + rs * stride_grs
        tl.store(g_ptrs, acc.to(g_ptr.dtype.element_ty), mask=c_ok[:, None] & in_dyc[None, :])


@triton.jit
def _conv_dw_tiles(
    x_ptr, dyc_ptr, dy_ptr, w_ptr, perm_ptr, g_ptr, rpart_ptr,
    p0, p_end, count, kb, split, num_kb, r, s, rs, offs_c, c_ok, F, H, W, Ho, Wo, m_end, m_step, r_scale, SPLIT,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sxb, sxc, sxh, sxw, stride_cm, sdyb, sdyf, sdyh, sdyw, swf, swc, swh, sww,
    stride_gs, stride_gn, stride_gc, stride_grs,
    SOURCE: tl.constexpr, STORE_G: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    WIDE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
    TAIL1: tl.constexpr, TAIL2: tl.constexpr, TAIL3: tl.constexpr,
):
    # The block of positions [p0, p_end) at the narrowest tile class that covers it.
    rem = p_end - p0
    if rem > TAIL1:
        _conv_dw_tile(x_ptr, dyc_ptr, dy_ptr, w_ptr, perm_ptr, g_ptr, rpart_ptr, p0, p_end, count, kb, split, num_kb,
                      r, s, rs, offs_c, c_ok, F, H, W, Ho, Wo, m_end, m_step, r_scale, SPLIT, stride_h, stride_w,
                      pad_h, pad_w, dil_h, dil_w, sxb, sxc, sxh, sxw, stride_cm, sdyb, sdyf, sdyh, sdyw, swf, swc,
                      swh, sww, stride_gs, stride_gn, stride_gc, stride_grs, SOURCE, STORE_G, UPCAST,
                      DOT_PRECISION, WIDE, BLOCK_C, BLOCK_M, BLOCK_P)
    elif rem > TAIL2:
        _conv_dw_tile(x_ptr, dyc_ptr, dy_ptr, w_ptr, perm_ptr, g_ptr, rpart_ptr, p0, p_end, count, kb, split, num_kb,
                      r, s, rs, offs_c, c_ok, F, H, W, Ho, Wo, m_end, m_step, r_scale, SPLIT, stride_h, stride_w,
                      pad_h, pad_w, dil_h, dil_w, sxb, sxc, sxh, sxw, stride_cm, sdyb, sdyf, sdyh, sdyw, swf, swc,
                      swh, sww, stride_gs, stride_gn, stride_gc, stride_grs, SOURCE, STORE_G, UPCAST,
                      DOT_PRECISION, WIDE, BLOCK_C, BLOCK_M, TAIL1)
    elif rem > TAIL3:
        _conv_dw_tile(x_ptr, dyc_ptr, dy_ptr, w_ptr, perm_ptr, g_ptr, rpart_ptr, p0, p_end, count, kb, split, num_kb,
                      r, s, rs, offs_c, c_ok, F, H, W, Ho, Wo, m_end, m_step, r_scale, SPLIT, stride_h, stride_w,
                      pad_h, pad_w, dil_h, dil_w, sxb, sxc, sxh, sxw, stride_cm, sdyb, sdyf, sdyh, sdyw, swf, swc,
                      swh, sww, stride_gs, stride_gn, stride_gc, stride_grs, SOURCE, STORE_G, UPCAST,
                      DOT_PRECISION, WIDE, BLOCK_C, BLOCK_M, TAIL2)
    else:
        _conv_dw_tile(x_ptr, dyc_ptr, dy_ptr, w_ptr, perm_ptr, g_ptr, rpart_ptr, p0, p_end, count, kb, split, num_kb,
                      r, s, rs, offs_c, c_ok, F, H, W, Ho, Wo, m_end, m_step, r_scale, SPLIT, stride_h, stride_w,
                      pad_h, pad_w, dil_h, dil_w, sxb, sxc, sxh, sxw, stride_cm, sdyb, sdyf, sdyh, sdyw, swf, swc,
                      swh, sww, stride_gs, stride_gn, stride_gc, stride_grs, SOURCE, STORE_G, UPCAST,
                      DOT_PRECISION, WIDE, BLOCK_C, BLOCK_M, TAIL3)


@triton.jit
def _conv_dw_sum_splits(
    g_ptr, perm_ptr, ticket_ptr, tile, p0, count, rs, offs_c, c_ok, SPLIT,
    stride_gs, stride_gn, stride_gc, stride_grs,
    WIDE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # The last of a tile's SPLIT programs to store its slice of G adds the slices in split
    # order into slice 0: the finish pass then reads one fp32 slice instead of SPLIT (the same
    # fp32 sums in the same order as it would form). Every thread's stores happen before the
    # ticket (release); the last program sees them all (acquire).
    tl.debug_barrier()
    ticket = tl.atomic_add(ticket_ptr + tile, 1, sem="acq_rel")
    if ticket == SPLIT - 1:
        offs_p = p0 + tl.arange(0, BLOCK_P)
        act = offs_p < count
        rows = tl.load(perm_ptr + offs_p, mask=act, other=0)
        if WIDE:
            rows = rows.to(tl.int64)
        ptrs = g_ptr + rows[None, :] * stride_gn + offs_c[:, None] * stride_gc + rs * stride_grs
        ok = c_ok[:, None] & act[None, :]
        acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
        n_split = SPLIT
        if WIDE:
            n_split = tl.cast(SPLIT, tl.int64)
        for sl in range(0, n_split):
            acc += tl.load(ptrs + sl * stride_gs, mask=ok, other=0.0)
        tl.store(ptrs, acc, mask=ok)
        tl.atomic_xchg(ticket_ptr + tile, 0, sem="relaxed")


@triton.jit
def _threshold_conv2d_bwd_dw_kernel(
    x_ptr,  # [B, C, H, W], channels-last in memory on the launcher's path
    dyc_ptr,  # [P, >= count] compacted dY
    dy_ptr,  # [B, F, Ho, Wo] dY itself (pruned positions in exact / sample modes)
    w_ptr,  # [F, C, KH, KW]
    perm_ptr,  # [F] int32
    count_ptr,  # [1] int32
    g_ptr,  # [SPLIT, F, C, KH * KW] out (active rows): m * G, fp32 workspace or dW itself
    rpart_ptr,  # [SPLIT * num_kb, F] fp32 out: partial sums of r
    ticket_ptr,  # [>= blocks * num_kb] int32, 0 on entry and on exit (SPLIT > 1)
    P,
    F,
    C, H, W, Ho, Wo,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sxb, sxc, sxh, sxw,
    stride_cm,
    sdyb, sdyf, sdyh, sdyw,
    swf, swc, swh, sww,
    stride_gs, stride_gn, stride_gc, stride_grs,  # g: split, filter, channel, kernel position
    sample_count,
    sample_step,
    SPLIT,  # the pixel reduction is split into SPLIT programs along grid axis 2
    MODE: tl.constexpr,
    DY_DIRECT: tl.constexpr,  # as in the dX kernel: dY read in place at count == F
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    WIDE: tl.constexpr,
    KH: tl.constexpr,
    KW: tl.constexpr,
    BLOCK_C: tl.constexpr,  # input channels (the GEMM's M)
    BLOCK_P: tl.constexpr,  # filters: positions in perm (N)
    BLOCK_M: tl.constexpr,  # reduction over pixels
    SAMPLE_M: tl.constexpr,  # MODE 2: reduction step over the sampled pixels (<= BLOCK_M, sized to the sample)
    TAIL1: tl.constexpr,
    TAIL2: tl.constexpr,
    TAIL3: tl.constexpr,
):
    # Grid: (position blocks, (kernel position, channel block), pixel splits); position blocks
    # as in the Linear dW kernel (exact: all of perm; skip: active; sample: active from 0 and
    # pruned from count, one more block).
    t = tl.program_id(0)
    kb = tl.program_id(1)
    split = tl.program_id(2)
    num_cb = tl.cdiv(C, BLOCK_C)
    num_kb = KH * KW * num_cb
    rs = kb // num_cb
    offs_c = (kb - rs * num_cb) * BLOCK_C + tl.arange(0, BLOCK_C)
    if WIDE:
        offs_c = offs_c.to(tl.int64)
    rs = rs
    if WIDE:
        rs = rs.to(tl.int64)
    r = rs // KW
    s = rs - r * KW
    split = split
    if WIDE:
        split = split.to(tl.int64)
    count = tl.load(count_ptr)
    c_ok = offs_c < C
    if DY_DIRECT:
        if count == F:
            dyc_ptr = dy_ptr
    if MODE == 0:
        p0 = t * BLOCK_P
        if p0 + BLOCK_P <= count:
            _conv_dw_tile(x_ptr, dyc_ptr, dy_ptr, w_ptr, perm_ptr, g_ptr, rpart_ptr, p0, F, count, kb, split, num_kb,
                          r, s, rs, offs_c, c_ok, F, H, W, Ho, Wo, P, 1, 1.0, SPLIT, stride_h, stride_w, pad_h, pad_w,
                          dil_h, dil_w, sxb, sxc, sxh, sxw, stride_cm, sdyb, sdyf, sdyh, sdyw, swf, swc, swh, sww,
                          stride_gs, stride_gn, stride_gc, stride_grs, 0, True, UPCAST, DOT_PRECISION, WIDE, BLOCK_C,
                          BLOCK_M, BLOCK_P)
        else:
            _conv_dw_tile(x_ptr, dyc_ptr, dy_ptr, w_ptr, perm_ptr, g_ptr, rpart_ptr, p0, F, count, kb, split, num_kb,
                          r, s, rs, offs_c, c_ok, F, H, W, Ho, Wo, P, 1, 1.0, SPLIT, stride_h, stride_w, pad_h, pad_w,
                          dil_h, dil_w, sxb, sxc, sxh, sxw, stride_cm, sdyb, sdyf, sdyh, sdyw, swf, swc, swh, sww,
                          stride_gs, stride_gn, stride_gc, stride_grs, 2, True, UPCAST, DOT_PRECISION, WIDE, BLOCK_C,
                          BLOCK_M, BLOCK_P)
        if SPLIT > 1:
            if p0 < count:
                _conv_dw_sum_splits(g_ptr, perm_ptr, ticket_ptr, t * num_kb + kb, p0, count, rs, offs_c, c_ok, SPLIT,
                                    stride_gs, stride_gn, stride_gc, stride_grs, WIDE, BLOCK_C, BLOCK_P)
    else:
        n_active = tl.cdiv(count, BLOCK_P)
        if t < n_active:
            # Active positions over all the pixels; G stored.
            _conv_dw_tiles(x_ptr, dyc_ptr, dy_ptr, w_ptr, perm_ptr, g_ptr, rpart_ptr, t * BLOCK_P, count, count, kb,
                           split, num_kb, r, s, rs, offs_c, c_ok, F, H, W, Ho, Wo, P, 1, 1.0, SPLIT, stride_h,
                           stride_w, pad_h, pad_w, dil_h, dil_w, sxb, sxc, sxh, sxw, stride_cm, sdyb, sdyf, sdyh,
                           sdyw, swf, swc, swh, sww, stride_gs, stride_gn, stride_gc, stride_grs, 0, True, UPCAST,
                           DOT_PRECISION, WIDE, BLOCK_C, BLOCK_M, BLOCK_P, TAIL1, TAIL2, TAIL3)
            if SPLIT > 1:
                _conv_dw_sum_splits(g_ptr, perm_ptr, ticket_ptr, t * num_kb + kb, t * BLOCK_P, count, rs, offs_c,
                                    c_ok, SPLIT, stride_gs, stride_gn, stride_gc, stride_grs, WIDE, BLOCK_C, BLOCK_P)
        elif MODE == 2:
            # Pruned positions over the strided sample of the pixels; r only.
            p0 = count + (t - n_active) * BLOCK_P
            if p0 < F:
                _conv_dw_tiles(x_ptr, dyc_ptr, dy_ptr, w_ptr, perm_ptr, g_ptr, rpart_ptr, p0, F, count, kb, split,
                               num_kb, r, s, rs, offs_c, c_ok, F, H, W, Ho, Wo, sample_count, sample_step,
                               P / sample_count, SPLIT, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, sxb, sxc,
                               sxh, sxw, stride_cm, sdyb, sdyf, sdyh, sdyw, swf, swc, swh, sww, stride_gs, stride_gn,
                               stride_gc, stride_grs, 1, False, UPCAST, DOT_PRECISION, WIDE, BLOCK_C, SAMPLE_M,
                               BLOCK_P, TAIL1, TAIL2, TAIL3)


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


def _is_channels_last(t: torch.Tensor) -> bool:
    """Channels-last and not also contiguous; with one channel (where both hold) the channel
    stride tells: 1 where the tensor was made channels-last (``model.to(memory_format=...)``
    on a 1-channel stem), ``H * W`` where it was made contiguous."""
    if not t.is_contiguous(memory_format=torch.channels_last):
        return False
    return not t.is_contiguous() or (t.shape[1] == 1 and t.shape[2] * t.shape[3] > 1 and t.stride(1) == 1)


def _memory_format(x: torch.Tensor, weight: torch.Tensor) -> torch.memory_format:
    """The layout PyTorch's convolution gives its output: channels-last when the input or the
    weight is channels-last."""
    return torch.channels_last if _is_channels_last(x) or _is_channels_last(weight) else torch.contiguous_format


def _pow2_block(n: int, cap: int, floor: int = 16) -> int:
    """A power-of-two tile covering ``n`` (at least ``floor``; at most ``cap``)."""
    return max(floor, min(cap, next_power_of_2(n)))


@dataclass(frozen=True)
class ConvTiles:
    """Tile sizes of the three convolution GEMMs for one layer."""

    fwd_pixels: int  # forward: output pixels x filters x channels
    fwd_filters: int
    fwd_channels: int
    dx_pixels: int  # dX: input pixels x channels, reduction over filters
    dx_channels: int
    dx_filters: int
    dx_tail: int
    dw_channels: int  # dW^T: channels x filters, reduction over pixels
    dw_filters: int
    dw_pixels: int


def conv_tiles(cfg: GemmConfig, filters: int, chans: int, geometry: ConvGeometry | None = None,
               pixels: int | None = None, programs: int | None = None) -> ConvTiles:
    """Tiles for a layer of ``filters`` x ``chans``. A filter block covers the layer up to the
    configured width (one block for a 64-filter layer); the work still follows the density
    because the block that straddles the active count runs the narrowest tile class that covers
    it (``tail_widths``), down to ``MIN_UNITS`` filters. Channel tiles shrink to the channel
    count (the 3-channel stem takes a 16-wide tile, ``tl.dot``'s smallest reduction).

    The forward of a strided or 1x1 convolution takes at most half the filter width: with 128
    filters it spills registers (offline sm_90 compile: strides that are not the constant 1
    keep more per-pixel state live).

    With ``pixels`` output pixels and ``programs`` SMs, the forward's pixel tile is halved (to
    64 at least) when the full tiles of one filter block are fewer than the SMs: at a low
    density only the first filter block multiplies, and half-height tiles put twice as many
    programs on it (ResNet-18's 256-filter 3x3 convolution at 16x16, batch 32: 8192 pixels,
    64 tiles of 128, 128 of 64)."""
    filter_tile = _pow2_block(filters, cfg.block_n, MIN_UNITS)
    fwd_pixels = cfg.block_m
    if pixels is not None and programs is not None and cdiv(pixels, cfg.block_m) < programs:
        fwd_pixels = max(64, cfg.block_m // 2) if cfg.block_m > 64 else cfg.block_m
    fwd_filters = filter_tile
    if geometry is not None and (geometry.stride != (1, 1) or geometry.kernel == (1, 1)):
        fwd_filters = _pow2_block(filters, max(cfg.block_n // 2, MIN_UNITS), MIN_UNITS)
    return ConvTiles(
        fwd_pixels=fwd_pixels,
        fwd_filters=fwd_filters,
        fwd_channels=_pow2_block(chans, cfg.block_k),
        dx_pixels=cfg.block_m,
        dx_channels=_pow2_block(chans, cfg.block_n),
        dx_filters=cfg.block_k,
        dx_tail=16,
        # 64-channel dW tiles: twice the tiles per filter block, so that fewer pixel splits
        # fill the machine and fewer fp32 slices of G go through HBM to the finish pass.
        dw_channels=_pow2_block(chans, min(cfg.block_n, 64)),
        dw_filters=filter_tile,
        dw_pixels=cfg.block_k,
    )


_MAX_GRID_YZ = 65535  # CUDA's limit on grid axes 1 and 2


def _geometry_args(geometry: ConvGeometry) -> tuple[int, ...]:
    (sh, sw), (ph, pw), (dh, dw) = geometry.stride, geometry.pad_begin, geometry.dilation
    return sh, sw, ph, pw, dh, dw


def _weight_operand(weight: torch.Tensor, row_mask: RowMask, compact: bool) -> tuple[torch.Tensor, tuple]:
    """The weight the GEMMs read and its (filter, channel, r, s) strides: the compacted active
    filters in (r, s, c) order, or the weight itself."""
    filters, chans, kh, kw = weight.shape
    if not compact:
        return weight, weight.stride()
    wc = compact_weight_rows(weight, row_mask, chans * kh * kw, chans,
                             (weight.stride(1), weight.stride(2), weight.stride(3)), kw)
    return wc, (wc.stride(0), 1, kw * chans, chans)


def threshold_conv2d_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    row_mask: RowMask,
    geometry: ConvGeometry,
    *,
    density_hint: float | None = None,
    compact_weight: bool | None = None,
) -> torch.Tensor:
    """``Y [B, F, Ho, Wo]`` for ``x [B, C, H, W]``, ``weight [F, C, KH, KW]``, ``bias [F] | None``.

    Any strides (see the module docstring for the layouts); the output is channels-last when
    ``x`` or ``weight`` is, as with ``F.conv2d``. ``density_hint`` and ``compact_weight`` as for
    :func:`.threshold_linear.threshold_linear_fwd`.
    """
    _check_operands(x, weight, row_mask, geometry)
    check_density_hint(density_hint)
    batch, chans, height, width = x.shape
    filters, _, kh, kw = weight.shape
    guard = _row_mask_guard(row_mask, filters)
    ho, wo = geometry.output_size(height, width)
    y = torch.empty((batch, filters, ho, wo), device=x.device, dtype=x.dtype,
                    memory_format=_memory_format(x, weight))
    pixels = batch * ho * wo
    if pixels == 0:
        if guard is not None:
            flush_guard_writes(guard)
        return y
    if bias is not None:
        bias = bias.contiguous()
    x_cl = x.contiguous(memory_format=torch.channels_last)
    compact = use_compact_weight(compact_weight, "conv", weight)
    w_op, w_strides = _weight_operand(weight, row_mask, compact)
    cfg = gemm_config(x.dtype, "conv")
    wide = not fits_int32(x_cl, w_op, y)
    # Not in the int64 variant, which halves the pixel tile itself (WIDE_HALVED): 32 x 128 on 8
    # warps spills (offline sm_90 compile, Triton 3.6 and 3.9: 4 local-memory instructions).
    tiles = conv_tiles(cfg, filters, chans, geometry, pixels=None if wide else pixels,
                       programs=grid_programs(x.device))
    channel_tile = tiles.fwd_channels
    if gpu_tiles() and not aligned(x_cl, w_op, sizes=(chans,)):
        # Unvectorised im2col loads (a channel count that is not a multiple of 16): 16-channel
        # steps keep the kernel within its registers (no spills).
        channel_tile = 16
    fixed = {"BLOCK_M": tiles.fwd_pixels, "BLOCK_N": tiles.fwd_filters, "BLOCK_K": channel_tile,
             "GROUP_M": cfg.group_m, **tail_widths(tiles.fwd_filters), "num_warps": cfg.num_warps,
             "num_stages": cfg.num_stages}
    consts = dict(HAS_BIAS=bias is not None, COMPACT_W=compact, UPCAST=interpreter_enabled(),
                  DOT_PRECISION=dot_precision("conv", x.dtype), WIDE=wide, KH=kh, KW=kw)
    if guard is not None and (wide or not launches_once(consts)):  # (as the Linear forward: _guard_in_launch)
        flush_guard_writes(guard)
        guard = None
    if guard is not None:
        consts.update(GUARD_WRITES=True, GUARD_BLOCK=guard.block)
    launch(
        _threshold_conv2d_fwd_kernel,
        "conv_fwd",
        lambda meta: (cdiv(pixels, meta["BLOCK_M"]) * cdiv(filters, meta["BLOCK_N"]),),
        fixed,
        (x_cl, w_op, bias if bias is not None else weight, row_mask.perm, row_mask.count, y, pixels, filters, chans,
         height, width, ho, wo, *_geometry_args(geometry), *x_cl.stride(), *w_strides, *y.stride(),
         *(guard.kernel_args() if guard is not None else _NO_GUARD(row_mask.count))),
        consts,
        dtype=x.dtype,
        rows=pixels,
        density_hint=density_hint,
        fixed_keys=("BLOCK_N", "BLOCK_K"),
    )
    return y


def _dy_in_place(grad_y: torch.Tensor) -> bool:
    """Whether the GEMMs may read ``grad_y`` itself where every filter is active: channels-last
    and dense (its ``[P, F]`` view has row stride ``F``), with ``F`` a multiple of ``DYC_PAD``,
    so that the view has exactly the compacted buffer's layout (the unmasked block loads
    along the filters stay inside each row)."""
    return grad_y.shape[1] % DYC_PAD == 0 and grad_y.permute(0, 2, 3, 1).is_contiguous()


def _compact_dy(grad_y: torch.Tensor, row_mask: RowMask, pixels: int, ho: int, wo: int,
                db_out: torch.Tensor | None, in_place: bool) -> torch.Tensor:
    """``dyc [pixels, >= count]`` (column ``p`` holds dY's filter ``perm[p]``, rows padded to
    whole blocks as :func:`.threshold_linear.compact_grad_columns` pads them) and, with
    ``db_out [F]``, the bias gradient written there in the same launch. ``in_place``
    (:func:`_dy_in_place`): at ``count == F`` nothing is copied (the bias gradient is still
    summed) and the GEMMs read ``grad_y`` instead; the count is read on the device only."""
    filters = grad_y.shape[1]
    padded = cdiv(filters, DYC_PAD) * DYC_PAD
    dyc = torch.empty((pixels, padded), device=grad_y.device, dtype=grad_y.dtype)
    block_m, block_p = (64, 64) if gpu_tiles() else (32, 32)
    n_m, n_p = cdiv(pixels, block_m), cdiv(filters, block_p)
    has_bias = db_out is not None
    dbp = torch.empty((n_m, filters) if has_bias else (1,), device=grad_y.device, dtype=torch.float32)
    tickets = split_tickets(grad_y.device, n_p) if has_bias else row_mask.count
    _conv_compact_dy_kernel[(n_m, n_p)](
        grad_y, row_mask.perm, row_mask.count, dyc, dbp, db_out if has_bias else dbp, tickets, pixels, filters,
        ho * wo, wo, *grad_y.stride(), dyc.stride(0), HAS_BIAS=has_bias, UNIT_MAJOR=grad_y.stride(1) == 1,
        DY_DIRECT=in_place, WIDE=not fits_int32(grad_y, dyc, dbp), BLOCK_M=block_m, BLOCK_P=block_p, num_warps=4,
    )
    return dyc


# The fewest pixels one split of the dW GEMM's pixel reduction may reduce over.
_DW_MIN_PIXELS_PER_SPLIT = 1024


@dataclass(frozen=True)
class DwShape:
    """What the dW GEMM's split depends on: ``blocks`` filter blocks of ``block_p`` filters,
    ``num_kb`` (kernel position, channel block) tiles of ``block_c`` channels each, ``pixels``
    reduced in ``block_m`` steps, ``fan_in`` weight columns, ``base_bytes`` read whatever the
    split (X and the compacted dY), ``mac_bytes`` HBM bytes as long as one multiply-add of one
    program (:func:`._config.bytes_per_mac`), on ``programs`` SMs."""

    blocks: int
    num_kb: int
    pixels: int
    block_m: int
    block_c: int
    block_p: int
    fan_in: int
    base_bytes: int
    mac_bytes: float
    programs: int


def _dw_split(shape: DwShape) -> int:
    """How many programs share the dW GEMM's pixel reduction. The count is device-side, so the
    grid is sized for every filter block and the blocks past it exit at once; the split is
    priced as the cost model prices a launch, ``max(compute, traffic)``: the waves of
    ``block_m``-pixel steps, against the bytes read plus the fp32 slices of G that every split
    writes and the finish pass reads. Two densities are weighed, each relative to its best
    split: one active block at a quarter of its width (a 256-filter layer at density 0.1 runs
    the 32-wide class) and every block. Ties go to the smaller split."""
    sh = shape
    most = max(1, min(cdiv(sh.pixels, max(_DW_MIN_PIXELS_PER_SPLIT, sh.block_m)), _MAX_GRID_YZ))

    def cost(split: int, active: int, width: int) -> float:
        steps = cdiv(cdiv(sh.pixels, split), sh.block_m)
        compute = cdiv(active * sh.num_kb * split, sh.programs) * steps * sh.block_c * width * sh.block_m * sh.mac_bytes
        traffic = sh.base_bytes + 2 * split * active * width * sh.fan_in * 4
        return max(compute, traffic)

    points = {(1, max(MIN_UNITS, sh.block_p // 4)), (sh.blocks, sh.block_p)}
    costs = {split: [cost(split, *p) for p in points] for split in range(1, most + 1)}
    lowest = [min(c[i] for c in costs.values()) for i in range(len(points))]
    return min(costs, key=lambda split: (sum(c / b for c, b in zip(costs[split], lowest, strict=True)), split))


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
    density_hint: float | None = None,
    compact_weight: bool | None = None,
    r_out: torch.Tensor | None = None,
    db_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Gradients ``(dX | None, dW, dtau)`` of the threshold Conv2d (bias gradient left to the
    caller). ``split``: how many programs share the pixel reduction of the weight gradient
    (default: chosen from the shape; the result does not depend on it beyond fp32 rounding).
    ``dW`` has the weight's layout (channels-last or contiguous); ``dX`` the output layout of
    :func:`threshold_conv2d_fwd`. ``r_out``: as in
    :func:`spafl.kernels.threshold_linear.threshold_linear_bwd` (``dW`` of the active filters only).
    ``db_out [F]`` (any float dtype): the bias gradient, written by the launch that compacts dY
    (fp32 sums, rounded once)."""
    _check_operands(x, weight, row_mask, geometry)
    check_density_hint(density_hint)
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
    if db_out is not None and (db_out.shape != (filters,) or db_out.device != device or not db_out.is_contiguous()
                               or not db_out.is_floating_point()):
        raise ValueError(f"db_out must be a contiguous floating-point tensor of shape ({filters},) on {device}, got "
                         f"{db_out.dtype} {tuple(db_out.shape)} on {db_out.device}")
    fan_in = chans * kh * kw
    w_cl = _is_channels_last(weight)
    dx = torch.empty_like(x, memory_format=_memory_format(x, weight)) if need_dx else None
    dw = torch.empty(weight.shape, device=device, dtype=weight.dtype,
                     memory_format=torch.channels_last if w_cl else torch.contiguous_format)
    dtau = torch.empty(filters, device=device, dtype=threshold_dtype)
    pixels = batch * ho * wo
    if pixels == 0:
        dw.zero_()
        dtau.zero_()
        if dx is not None:
            dx.zero_()
        if r_out is not None:
            r_out.zero_()
        if db_out is not None:
            db_out.zero_()
        return dx, dw, dtau

    grad_y = grad_y.to(x.dtype)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    cfg = gemm_config(x.dtype, "conv")
    tiles = conv_tiles(cfg, filters, chans, geometry)
    sh, sw = geometry.stride
    num_kb = kh * kw * cdiv(chans, tiles.dw_channels)
    if num_kb > _MAX_GRID_YZ or sh * sw > _MAX_GRID_YZ:
        raise ValueError(
            f"convolution too large for the kernels' launch grid: kernel {kh}x{kw}, {chans} channels, stride {sh}x{sw}"
        )
    consts = dict(UPCAST=interpreter_enabled(), DOT_PRECISION=dot_precision("conv", x.dtype), KH=kh, KW=kw)
    mode_id = BACKWARD_MODES[mode]
    geo = _geometry_args(geometry)

    # dyc[q, p] = dY[b, perm[p], oh, ow] for the flattened pixel q = (b, oh, ow), p < count.
    dy_in_place = _dy_in_place(grad_y)
    dyc = _compact_dy(grad_y, row_mask, pixels, ho, wo, db_out, dy_in_place)

    if need_dx:
        compact = use_compact_weight(compact_weight, "conv", weight)
        w_op, w_strides = _weight_operand(weight, row_mask, compact)
        hq, wq = cdiv(height, sh), cdiv(width, sw)
        phase_pixels = batch * hq * wq
        (_, _, _, _, dil_h, dil_w) = geo
        steps = (sh // math.gcd(sh, dil_h), sw // math.gcd(sw, dil_w))
        fixed = {"BLOCK_M": tiles.dx_pixels, "BLOCK_C": tiles.dx_channels, "BLOCK_P": tiles.dx_filters,
                 "GROUP_M": cfg.group_m, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
        launch(
            _threshold_conv2d_bwd_dx_kernel,
            "conv_dx",
            lambda meta: (cdiv(phase_pixels, meta["BLOCK_M"]) * cdiv(chans, meta["BLOCK_C"]), sh * sw),
            fixed,
            (dyc, grad_y, w_op, row_mask.perm, row_mask.count, dx, phase_pixels, filters, chans, height, width, ho,
             wo, hq, wq, *geo, *steps, dyc.stride(0), *w_strides, *dx.stride()),
            dict(DY_DIRECT=dy_in_place, COMPACT_W=compact, TAIL_P=tiles.dx_tail, WIDE=not fits_int32(dyc, w_op, dx),
                 **consts),
            dtype=x.dtype,
            rows=pixels,
            density_hint=density_hint,
            fixed_keys=("BLOCK_C",),
        )

    n_blocks = cdiv(filters, tiles.dw_filters) + (1 if mode_id == 2 else 0)
    if split is None:
        split = _dw_split(DwShape(n_blocks, num_kb, pixels, tiles.dw_pixels, tiles.dw_channels, tiles.dw_filters,
                                  fan_in, x_cl.numel() * x_cl.element_size() + dyc.numel() * dyc.element_size(),
                                  bytes_per_mac(x.dtype, "conv"), grid_programs(device)))
    n_split = split
    # m*G: accumulated straight into dW for fp32 without a split, else into an fp32 workspace
    # (one slice per split) that the finish pass sums in a fixed order and rounds once. Its
    # columns follow dW's memory order: (r, s, c) channels-last, (c, r, s) otherwise.
    in_place = weight.dtype == torch.float32 and n_split == 1
    dw2d = dw.permute(0, 2, 3, 1).reshape(filters, fan_in) if w_cl else dw.view(filters, fan_in)
    if in_place:
        g = dw2d.unsqueeze(0)
    else:
        g = torch.empty((n_split, filters, fan_in), device=device, dtype=torch.float32)
    g_strides = (g.stride(0), g.stride(1), 1, chans) if w_cl else (g.stride(0), g.stride(1), kh * kw, 1)
    rpart = torch.empty((n_split * num_kb, filters), device=device, dtype=torch.float32)
    s_count, s_step = sample_rows(pixels, sample_fraction)
    wide = not fits_int32(x_cl, dyc, grad_y, weight, g)
    # The sampled step never exceeds the pixel block, halved in the int64 variant as by
    # wide_config; one compiled variant for the modes that do not sample.
    pixel_block = tiles.dw_pixels // 2 if wide and tiles.dw_pixels > 16 else tiles.dw_pixels
    sample_m = sample_block(s_count, pixel_block) if mode_id == 2 else pixel_block
    fixed = {"BLOCK_C": tiles.dw_channels, "BLOCK_P": tiles.dw_filters, "BLOCK_M": tiles.dw_pixels,
             **tail_widths(tiles.dw_filters), "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    launch(
        _threshold_conv2d_bwd_dw_kernel,
        f"conv_dw{mode_id}",
        lambda meta: (n_blocks, num_kb, n_split),
        fixed,
        (x_cl, dyc, grad_y, weight, row_mask.perm, row_mask.count, g, rpart,
         split_tickets(device, n_blocks * num_kb) if n_split > 1 else row_mask.count, pixels, filters, chans, height,
         width, ho, wo, *geo, *x_cl.stride(), dyc.stride(0), *grad_y.stride(), *weight.stride(), *g_strides, s_count,
         s_step, n_split),
        dict(MODE=mode_id, DY_DIRECT=dy_in_place, WIDE=wide, SAMPLE_M=sample_m, **consts),
        dtype=x.dtype,
        rows=pixels,
        density_hint=density_hint,
        # The grid and rpart are sized by these: not tuned.
        fixed_keys=("BLOCK_C", "BLOCK_P"),
    )
    # The finish pass reads W in dW's memory order.
    if w_cl:
        w2d = weight.permute(0, 2, 3, 1).reshape(filters, fan_in)
    else:
        w2d = weight.reshape(filters, fan_in) if weight.is_contiguous() else weight.contiguous().view(filters, fan_in)
    # With a split, the dW launch has summed the slices into the first (_conv_dw_sum_splits).
    finish_threshold_gradients(rpart, w2d, row_mask, g[:1], dw2d, dtau, mode_id=mode_id, r_out=r_out)
    return dx, dw, dtau
