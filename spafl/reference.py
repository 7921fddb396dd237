"""Plain-PyTorch reference of the threshold layers (``backend="reference"``).

This is the oracle: what the Triton kernels and the compacting CPU backend
(:mod:`spafl.compact`) are tested against, and what the benchmarks call "masked dense". It
follows ``spafl-algorithm.md`` section 1 literally:

* row score ``s_i = mean_j |W_ij|`` over all fan-in elements, mask ``m_i = s_i > tau_i``;
* forward with ``W_hat = W * m``, written as a select (``W`` where ``m``, else 0), so that a
  pruned row contributes exactly nothing even when it holds a NaN (whose score is NaN, never
  above the threshold: such a unit is pruned), as on the backends that skip pruned rows;
* straight-through backward: ``G = dL/dW_hat``, ``r_i = sum_j G_ij W_ij``,
  ``dL/dtau_i = -r_i``, ``dL/dW_ij = m_i G_ij + sign(W_ij) r_i / fan_in``.

Nothing here synchronises with the host either (the collapse guard uses ``torch.where``), so
the reference path is also safe to run on a GPU, e.g. as the masked-dense baseline.
Half-precision inputs are computed in fp32 and the results cast back.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from ._conv import ConvGeometry
from ._rowmask import RowMask, sample_rows

BACKWARD_MODES = ("exact", "skip", "sample")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# Elements per block of the row-wise passes over a weight on the CPU (4 MB of fp32): a block's
# temporaries live in a reused workspace (`scratch`) that stays in cache, where one temporary
# the size of a large weight (64 MB for 4096 x 4096) costs more in page faults than the
# reduction itself (measured 75 ms at once vs 15 ms in blocks). Weights up to this size (every
# layer of the paper's models) take one block: fewer, larger operations.
ROW_BLOCK = 1 << 20


# Temporaries up to this many elements (256 KB of fp32) come from the allocator: small blocks
# that glibc keeps, so no page faults to avoid, and no workspace bookkeeping to pay for (for
# the row scores, the block loop and its workspace cost 20-35 us more a call on the CPU than
# the direct pass, which is about what the pass itself takes on LeNet-5's small layers).
SMALL_TEMPORARY = 1 << 16


def row_blocks(n_rows: int, row_len: int, device: torch.device) -> list[slice] | None:
    """Slices of rows for a row-wise pass on the CPU: blocks of at most ``ROW_BLOCK`` elements
    (a row longer than that is a block of its own), whose temporaries go to :func:`scratch`.
    None elsewhere: there, one kernel launch beats many."""
    if device.type != "cpu":
        return None
    step = max(1, ROW_BLOCK // max(1, row_len))
    return [slice(r, min(r + step, n_rows)) for r in range(0, n_rows, step)]


_SCRATCH = threading.local()


def scratch(rows: int, row_len: int, dtype: torch.dtype) -> torch.Tensor:
    """A ``[rows, row_len]`` CPU workspace for the temporaries of one row block, kept per thread
    and dtype and reused: fresh megabyte-sized temporaries in every forward and backward made
    glibc return heap memory to the system and page-fault it back each step (measured: ~160 page
    faults per forward+backward of an 800 -> 500 Linear, none for nn.Linear, ~2x its time)."""
    need = rows * row_len
    cache = _SCRATCH.__dict__
    buf = cache.get(dtype)
    if buf is None or buf.numel() < need:
        buf = cache[dtype] = torch.empty(max(need, ROW_BLOCK), dtype=dtype)
    return buf[:need].view(rows, row_len)


def row_scores(weight: torch.Tensor) -> torch.Tensor:
    """Mean |w| of every output unit: ``[out]`` (fp32, or fp64 for fp64 weights). With one
    intra-op thread a row's mean is bit-identical in blocks and at once (with several, PyTorch
    may split a long row's sum differently, as it does between thread counts)."""
    w = weight.detach()
    if w.dim() != 2:
        w = w.reshape(w.shape[0], -1)
    compute = _compute_dtype(weight.dtype)
    if w.device.type != "cpu" or w.numel() <= SMALL_TEMPORARY:
        magnitude = w.abs()
        # (a no-op .to() still costs a dispatcher round trip, on a path that runs every forward)
        return (magnitude if magnitude.dtype == compute else magnitude.to(compute)).mean(dim=1)
    blocks = row_blocks(w.shape[0], w.shape[1], w.device)
    out = torch.empty(w.shape[0], dtype=compute, device=w.device)
    for rows in blocks:
        w_rows = w[rows]
        buf = scratch(w_rows.shape[0], w_rows.shape[1], compute)
        if w_rows.dtype == compute:
            torch.abs(w_rows, out=buf)
        else:
            buf.copy_(w_rows).abs_()
        torch.mean(buf, dim=1, out=out[rows])
    return out


def row_mask(
    weight: torch.Tensor,
    threshold: torch.Tensor,
    *,
    collapse_density: float | None = None,
    with_perm: bool = True,
) -> RowMask:
    """Reference of :func:`spafl.kernels.threshold_row_mask` (same outputs, same guard).

    ``with_perm=False`` leaves ``RowMask.perm`` as None: the reference GEMMs only need the mask,
    and the sort that builds the compact index list is then skipped.
    """
    score = row_scores(weight)
    mask = score > threshold.detach().to(score.dtype)
    collapsed = None
    if collapse_density is not None:
        n_active = mask.sum()
        collapsed = (n_active.to(torch.float32) <= collapse_density * mask.numel()).reshape(1)
        mask = torch.where(collapsed, score > 0, mask)
    # Active rows first (ascending), then pruned rows (ascending): a stable sort on ~mask.
    perm = torch.argsort((~mask).to(torch.int8), stable=True).to(torch.int32) if with_perm else None
    count = mask.sum().to(torch.int32).reshape(1)
    return RowMask(mask, perm, count, score, collapsed)


def masked_weight(weight: torch.Tensor, multiplier: torch.Tensor) -> torch.Tensor:
    """``W_hat = W * m`` for ``weight [out, ...]`` and ``multiplier [out]`` (the bool or 0/1 mask;
    the gradcheck stand-in passes a smooth one), with the rows where ``m == 0`` exactly 0 even
    when they hold NaN or inf. Keeps the weight's memory format."""
    view = (-1,) + (1,) * (weight.dim() - 1)
    if multiplier.dtype == torch.bool:
        return weight.masked_fill(~multiplier.view(view), 0)
    m = multiplier.to(weight.dtype).view(view)
    return (weight * m).masked_fill(m == 0, 0)


def threshold_linear_forward(
    x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear(x, W * m[:, None], b)``; x ``[..., in]`` -> ``[..., out]``. A pruned unit
    outputs its bias (or 0) whatever the input holds: ``0 * inf`` would make it NaN in the
    product, where the backends that skip the unit give the bias."""
    compute = _compute_dtype(x.dtype)
    w_hat = masked_weight(weight.to(compute), mask)
    b = None if bias is None else bias.to(compute)
    y = F.linear(x.to(compute), w_hat, b)
    return _pruned_to_bias(y, mask, b, 1).to(x.dtype)


def _pruned_to_bias(y: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None, trailing: int) -> torch.Tensor:
    """``y`` with the pruned units' outputs (``mask [out]`` along the dimension followed by
    ``trailing - 1`` others) set to their bias or 0, without a host synchronisation."""
    view = (-1,) + (1,) * (trailing - 1)
    return torch.where(mask.view(view), y, 0.0 if bias is None else bias.view(view))


def threshold_gradients(
    grad_w_hat: torch.Tensor,
    weight: torch.Tensor,
    multiplier: torch.Tensor,
    mask: torch.Tensor,
    *,
    mode: str = "exact",
    sampled_grad_w_hat: torch.Tensor | None = None,
    sample_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Straight-through gradients ``(dW, dtau)`` from ``G = dL/dW_hat``.

    ``grad_w_hat`` and ``weight`` are ``[out, fan_in...]`` (any trailing shape: Linear and
    Conv2d share this), ``multiplier [out]`` is the factor the forward applied to each row
    (the mask, bool or 0/1; the gradcheck stand-in passes a smooth one), ``mask [out]`` bool.
    ``mode``: ``exact`` uses ``r`` of every row; ``skip`` sets ``r = 0`` on pruned rows;
    ``sample`` takes pruned rows' ``r`` from ``sampled_grad_w_hat * sample_scale``.
    """
    if mode not in BACKWARD_MODES:
        raise ValueError(f"backward mode must be one of {BACKWARD_MODES}, got {mode!r}")
    out = weight.shape[0]
    g = grad_w_hat.reshape(out, -1)
    w = weight.reshape(out, -1).to(g.dtype)
    r = (g * w).sum(dim=1)
    if mode == "skip":
        r = torch.where(mask, r, torch.zeros_like(r))
    elif mode == "sample":
        if sampled_grad_w_hat is None:
            raise ValueError("sample mode needs the gradient of the sampled batch rows")
        r_est = (sampled_grad_w_hat.reshape(out, -1) * w).sum(dim=1) * sample_scale
        r = torch.where(mask, r, r_est)
    fan_in = w.shape[1]
    dw = multiplier.to(g.dtype)[:, None] * g + torch.sign(w) * (r / fan_in)[:, None]
    return dw.reshape(weight.shape), -r


def threshold_linear_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    multiplier: torch.Tensor,
    mask: torch.Tensor,
    *,
    has_bias: bool,
    mode: str = "exact",
    sample_fraction: float = 0.125,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Reference backward: ``(dx, dW, dtau, db)`` in the compute dtype (fp32 / fp64)."""
    compute = _compute_dtype(x.dtype)
    n_out, fan_in = weight.shape
    dy = grad_out.reshape(-1, n_out).to(compute)
    x2 = x.reshape(-1, fan_in).to(compute)
    w = weight.to(compute)
    dx = (dy @ masked_weight(w, multiplier)).reshape(x.shape)
    grad_w_hat = dy.t() @ x2
    sampled, scale = None, 1.0
    if mode == "sample":
        m_rows = x2.shape[0]
        count, step = sample_rows(m_rows, sample_fraction)
        idx = torch.arange(count, device=x2.device) * step
        sampled = dy[idx].t() @ x2[idx]
        scale = m_rows / count
    dw, dtau = threshold_gradients(
        grad_w_hat, w, multiplier, mask, mode=mode, sampled_grad_w_hat=sampled, sample_scale=scale
    )
    db = dy.sum(dim=0) if has_bias else None
    return dx, dw, dtau, db


def _explicit_padding(x: torch.Tensor, geometry: ConvGeometry) -> tuple[torch.Tensor, tuple[int, int]]:
    # Asymmetric padding ("same" with an odd total) as an explicit pad: F.conv2d would make the
    # same copy internally, with a warning.
    if geometry.pad_begin == geometry.pad_end:
        return x, geometry.pad_begin
    (top, left), (bottom, right) = geometry.pad_begin, geometry.pad_end
    return F.pad(x, (left, right, top, bottom)), (0, 0)


def _conv2d(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, geometry: ConvGeometry) -> torch.Tensor:
    x, padding = _explicit_padding(x, geometry)
    return F.conv2d(x, w, b, geometry.stride, padding, geometry.dilation, geometry.groups)


def _conv2d_backward(
    dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, geometry: ConvGeometry, need_dx: bool
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(dL/dx | None, dL/dw)`` of ``_conv2d(x, w)`` for the output gradient ``dy``, from the
    convolution's own backward (no forward recomputation)."""
    xp, padding = _explicit_padding(x, geometry)
    dx, dw, _ = torch.ops.aten.convolution_backward(
        dy, xp, w, None, geometry.stride, padding, geometry.dilation, False, (0, 0), geometry.groups,
        (need_dx, True, False),
    )
    if need_dx and xp is not x:
        top, left = geometry.pad_begin
        dx = dx[..., top : top + x.shape[-2], left : left + x.shape[-1]]
    return dx, dw


def threshold_conv2d_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None,
    geometry: ConvGeometry,
) -> torch.Tensor:
    """``F.conv2d(x, W * m[:, None, None, None], b, ...)`` for ``x [B, C, H, W]``."""
    compute = _compute_dtype(x.dtype)
    w_hat = masked_weight(weight.to(compute), mask)
    b = None if bias is None else bias.to(compute)
    y = _conv2d(x.to(compute), w_hat, b, geometry)
    # (pruned filters output their bias whatever the input holds, as in threshold_linear_forward)
    return _pruned_to_bias(y, mask, b, 3).to(x.dtype)


def _sampled_pixels(grad_out: torch.Tensor, sample_fraction: float) -> tuple[torch.Tensor, float]:
    """``grad_out [B, C, Ho, Wo]`` with every output pixel zeroed except the sample that the
    ``sample`` mode uses (flattened pixel index ``b * Ho * Wo + oh * Wo + ow`` in
    ``0, step, 2 * step, ...``), and the scale ``pixels / sampled``."""
    b, _, ho, wo = grad_out.shape
    pixels = b * ho * wo
    count, step = sample_rows(pixels, sample_fraction)
    keep = torch.zeros(pixels, dtype=torch.bool, device=grad_out.device)
    keep[torch.arange(count, device=grad_out.device) * step] = True
    return grad_out * keep.view(b, 1, ho, wo).to(grad_out.dtype), pixels / count


def threshold_conv2d_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    multiplier: torch.Tensor,
    mask: torch.Tensor,
    geometry: ConvGeometry,
    *,
    has_bias: bool,
    need_dx: bool = True,
    mode: str = "exact",
    sample_fraction: float = 0.125,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Reference backward of the threshold Conv2d: ``(dx | None, dW, dtau, db)`` in the compute
    dtype. ``G = dL/dW_hat`` and ``dx`` come from the convolution's backward; the
    straight-through terms from :func:`threshold_gradients`, exactly as for Linear."""
    compute = _compute_dtype(x.dtype)
    dy = grad_out.to(compute)
    xc = x.detach().to(compute)
    w_hat = masked_weight(weight.detach().to(compute), multiplier.detach())
    dx, grad_w_hat = _conv2d_backward(dy, xc, w_hat, geometry, need_dx)
    sampled, scale = None, 1.0
    if mode == "sample":
        dy_sampled, scale = _sampled_pixels(dy, sample_fraction)
        _, sampled = _conv2d_backward(dy_sampled, xc, w_hat, geometry, False)
    dw, dtau = threshold_gradients(
        grad_w_hat, weight.to(compute), multiplier, mask, mode=mode, sampled_grad_w_hat=sampled, sample_scale=scale
    )
    db = dy.sum(dim=(0, 2, 3)) if has_bias else None
    return dx, dw, dtau, db


def straight_through_surrogate(
    x: torch.Tensor, weight: torch.Tensor, threshold: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The same forward written so that plain autograd yields the ``exact`` STE gradients.

    ``m~ = m + (s - tau) - stop_grad(s - tau)`` has the value of the 0/1 mask and derivative 1
    with respect to ``s - tau``, which is the straight-through estimator. Used by the tests as
    an independent check of :func:`threshold_linear_backward`.
    """
    score = weight.abs().reshape(weight.shape[0], -1).mean(dim=1)
    gap = score - threshold
    mask = (gap > 0).to(weight.dtype)
    mult = mask + gap - gap.detach()
    return F.linear(x, weight * mult[:, None], bias)
