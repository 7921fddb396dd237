"""Compacting backend of the threshold layers (``backend="compact"``, what ``"auto"`` picks on CPU).

Plain PyTorch that really skips pruned units, with results equal to :mod:`spafl.reference` up to
the rounding of the compute dtype (fp32 for fp32 / fp16 / bf16 inputs, fp64 for fp64):

* forward: the active units' index list (``nonzero``), the dense op (``F.linear`` /
  ``F.conv2d``) on the gathered rows of the weight, its result scattered into the output;
  pruned units output 0 (plus their bias). With every unit active and nothing to drop, the
  dense op runs on the weight itself: no gather, no scatter.
* backward: ``dX`` and ``G = dL/dW_hat`` through the active rows only, then the
  straight-through terms of ``spafl-algorithm.md`` section 1. A pruned unit ``i`` needs
  ``r_i = sum_b dY_bi Z_bi`` (``Z`` = the pre-activation it would have) in ``exact`` mode and
  the same sum over the reference's sampled batch rows / output pixels, scaled as the reference
  does, in ``sample`` mode. ``r_i`` is 0 whenever unit ``i``'s output gradient is 0 (a pruned
  unit without bias followed by ReLU: ReLU's gradient at 0 is 0), so ``Z`` is computed only for
  pruned units whose output gradient is not identically zero: a cheap reduction over ``dY``
  decides. ``skip`` mode gives pruned units nothing.
* input skipping (``skip_zero_inputs=True``): input features (Linear) / channels (Conv2d)
  that are exactly zero for the whole batch are dropped from every product; their weight
  gradient is the sign term alone (``G`` is 0 there) and their input gradient is returned as 0.
  When this leaves every gradient upstream unchanged is stated in :class:`spafl.ThresholdLinear`.
* grouped convolutions: the groups that hold active filters are gathered and each is padded to
  the largest number of active filters in one group, so a grouped convolution costs
  ``groups_used * widest / filters`` of the dense one (exactly the active share for depthwise
  convolutions and for groups with equal numbers of active filters). Input skipping is not
  applied to grouped convolutions.

The index lists come from host synchronisations (``nonzero``, ``int``): free on the CPU, and the
reason the Triton kernels, not this module, are the CUDA path. Every dense product goes
through :func:`_linear`, :func:`_mm`, :func:`_conv2d` or :func:`_conv2d_backward`, so that the
tests can see the shapes that were really multiplied.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._conv import ConvGeometry
from ._rowmask import sample_rows
from .reference import _compute_dtype

# ----------------------------------------------------------------------------- dense products


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, w, b)


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.mm(a, b)


def _conv2d(x, w, b, stride, padding, dilation, groups: int) -> torch.Tensor:
    return F.conv2d(x, w, b, stride, padding, dilation, groups)


def _conv2d_backward(dy, x, w, stride, padding, dilation, groups: int, need_dx: bool):
    """``(dL/dx | None, dL/dw)`` of ``_conv2d(x, w)`` from the convolution's own backward."""
    dx, dw, _ = torch.ops.aten.convolution_backward(
        dy, x, w, None, stride, padding, dilation, False, (0, 0), groups, (need_dx, True, False)
    )
    return dx, dw


# ----------------------------------------------------------------------------- index lists


def active_units(mask: torch.Tensor) -> torch.Tensor | None:
    """Ascending int64 indices of the active units of ``mask [N]``; None when all are active.
    Synchronises with the device."""
    units = mask.nonzero().squeeze(1)
    return None if units.numel() == mask.numel() else units


def _nonzero_along(t: torch.Tensor, dim: int) -> torch.Tensor | None:
    """Indices ``j`` along ``dim`` where some entry of ``t`` is not 0 (NaN counts as not 0);
    None when that is every ``j``."""
    other = tuple(d for d in range(t.dim()) if d != dim)
    keep = t.ne(0).any(dim=other) if other else t.ne(0)
    index = keep.nonzero().squeeze(1)
    return None if index.numel() == t.shape[dim] else index


def _take(t: torch.Tensor, rows: torch.Tensor | None, cols: torch.Tensor | None) -> torch.Tensor:
    if rows is not None:
        t = t.index_select(0, rows)
    if cols is not None:
        t = t.index_select(1, cols)
    return t


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sum_j a_ij b_ij`` of two ``[n, ...]`` tensors: ``[n]``."""
    n = a.shape[0]
    return (a.reshape(n, -1) * b.reshape(n, -1)).sum(dim=1)


def _unit_fill(bias: torch.Tensor | None, shape, dim: int, dtype, device, memory_format=torch.contiguous_format):
    """An output of ``shape`` holding ``bias`` along ``dim`` (0 without bias): what pruned units output."""
    out = torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)
    if bias is None:
        return out.zero_()
    view = [1] * len(shape)
    view[dim] = -1
    return out.copy_(bias.view(view).expand(shape))


def _sign_term(w_rows: torch.Tensor, r: torch.Tensor, fan_in: int) -> torch.Tensor:
    """``sign(W_ij) * r_i / fan_in`` for ``w_rows [n, ...]``, ``r [n]``."""
    view = (-1,) + (1,) * (w_rows.dim() - 1)
    return torch.sign(w_rows).mul_((r / fan_in).view(view))


# ----------------------------------------------------------------------------- Linear


def linear_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mask: torch.Tensor,
    skip_zero_inputs: bool = False,
) -> tuple[torch.Tensor, tuple]:
    """``x [M, K]``, ``weight [N, K]``, ``mask [N]`` -> ``(y [M, N] in x's dtype, state)``;
    ``state`` (the active units and the kept input features, None meaning all) goes to
    :func:`linear_backward`."""
    compute = _compute_dtype(x.dtype)
    xc, w = x.to(compute), weight.to(compute)
    b = None if bias is None else bias.to(compute)
    units = active_units(mask)
    cols = _nonzero_along(xc, 1) if skip_zero_inputs else None
    state = (units, cols)
    x_in = xc if cols is None else xc.index_select(1, cols)
    if units is None:
        return _linear(x_in, _take(w, None, cols), b).to(x.dtype), state
    y = _unit_fill(b, (x.shape[0], w.shape[0]), 1, compute, x.device)
    if units.numel():
        b_active = None if b is None else b.index_select(0, units)
        y.index_copy_(1, units, _linear(x_in, _take(w, units, cols), b_active))
    return y.to(x.dtype), state


def linear_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    state: tuple,
    *,
    has_bias: bool,
    need_dx: bool = True,
    mode: str = "exact",
    sample_fraction: float = 0.125,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(dx [M, K] | None, dW [N, K], dtau [N], db [N] | None)`` in the compute dtype, equal to
    :func:`spafl.reference.threshold_linear_backward` (``dx`` is 0 at dropped input features)."""
    units, cols = state
    compute = _compute_dtype(x.dtype)
    dy, xc, w = grad_out.to(compute), x.to(compute), weight.to(compute)
    n_out, fan_in = w.shape
    db = dy.sum(dim=0) if has_bias else None
    x_in = xc if cols is None else xc.index_select(1, cols)
    dx = None
    if units is not None and units.numel() == 0:
        dw, r = w.new_zeros(w.shape), w.new_zeros(n_out)
        if need_dx:
            dx = xc.new_zeros(xc.shape)
    else:
        dy_a = dy if units is None else dy.index_select(1, units)
        w_a = _take(w, units, cols)
        if need_dx:
            dx_in = _mm(dy_a, w_a)
            dx = dx_in if cols is None else xc.new_zeros(xc.shape).index_copy_(1, cols, dx_in)
        g = _mm(dy_a.t(), x_in)
        r_a = _row_dot(g, w_a)  # exact with dropped features: G is 0 there
        if units is None and cols is None:  # density 1: no pruned unit, nothing dropped
            return dx, g.add_(_sign_term(w, r_a, fan_in)), -r_a, db
        dw_a = _sign_term(w if units is None else w.index_select(0, units), r_a, fan_in)
        if cols is None:
            dw_a.add_(g)
        else:
            dw_a.index_add_(1, cols, g)
        if units is None:
            return dx, dw_a, -r_a, db
        dw = w.new_zeros(w.shape).index_copy_(0, units, dw_a)
        r = w.new_zeros(n_out).index_copy_(0, units, r_a)
    pruned, r_p = _pruned_r_linear(dy, x_in, w, mask, cols, mode, sample_fraction)
    if pruned.numel():
        r.index_copy_(0, pruned, r_p)
        dw.index_copy_(0, pruned, _sign_term(w.index_select(0, pruned), r_p, fan_in))
    return dx, dw, -r, db


def _pruned_r_linear(dy, x_in, w, mask, cols, mode: str, sample_fraction: float):
    """``(pruned units with a possibly nonzero r, their r)`` for the backward ``mode``."""
    empty = mask.new_zeros(0, dtype=torch.long)
    if mode == "skip" or bool(mask.all()):
        return empty, dy.new_zeros(0)
    scale = 1.0
    if mode == "sample":
        m_rows = dy.shape[0]
        count, step = sample_rows(m_rows, sample_fraction)
        dy, x_in = dy[: count * step : step], x_in[: count * step : step]  # rows 0, step, ...
        scale = m_rows / count
    pruned = (dy.ne(0).any(dim=0) & ~mask).nonzero().squeeze(1)
    if not pruned.numel():
        return empty, dy.new_zeros(0)
    z = _linear(x_in, _take(w, pruned, cols))  # what the pruned units would output
    r = (dy.index_select(1, pruned) * z).sum(dim=0)
    return pruned, r * scale if scale != 1.0 else r


# ----------------------------------------------------------------------------- Conv2d


def _channels_last(t: torch.Tensor) -> bool:
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _conv_format(x: torch.Tensor, weight: torch.Tensor) -> torch.memory_format:
    """The memory format of ``F.conv2d(x, weight)``'s output and gradients: channels-last when
    either operand is."""
    return torch.channels_last if _channels_last(x) or _channels_last(weight) else torch.contiguous_format


def _as_format(t: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    return t if t.is_contiguous(memory_format=memory_format) else t.contiguous(memory_format=memory_format)


class _ConvPlan(NamedTuple):
    """A convolution over a subset of the filters (and, with ``groups == 1``, of the input channels).

    weight:   ``[G' * width, C' / G', kh, kw]``, the compact weight (zero filters pad groups
              with fewer active filters than the widest)
    groups:   ``G'``, the groups of the compact convolution
    channels: input channels it reads (None: all)
    slots:    for each selected filter, its output channel in the compact convolution (None:
              the filters are the compact output channels, in order)
    """

    weight: torch.Tensor
    groups: int
    channels: torch.Tensor | None
    slots: torch.Tensor | None


def _conv_plan(w: torch.Tensor, units: torch.Tensor | None, channels: torch.Tensor | None, groups: int) -> _ConvPlan:
    """The compact convolution of filters ``units`` (None: all, ascending) reading input
    channels ``channels`` (None: all; only with ``groups == 1``)."""
    if groups == 1:
        return _ConvPlan(_take(w, units, channels), 1, channels, None)
    if units is None:
        return _ConvPlan(w, groups, None, None)
    per_group, chans = w.shape[0] // groups, w.shape[1]
    used, counts = torch.unique_consecutive(torch.div(units, per_group, rounding_mode="floor"), return_counts=True)
    width = int(counts.max())
    n_used = used.numel()
    channels = None if n_used == groups else (used[:, None] * chans + torch.arange(chans, device=w.device)).flatten()
    if bool((counts == width).all()):  # every used group has the same number: no padding
        return _ConvPlan(w.index_select(0, units), n_used, channels, None)
    start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(units.numel(), device=w.device) - torch.repeat_interleave(start, counts)
    slots = torch.repeat_interleave(torch.arange(n_used, device=w.device), counts) * width + rank
    compact = w.new_zeros((n_used * width, *w.shape[1:])).index_copy_(0, slots, w.index_select(0, units))
    return _ConvPlan(compact, n_used, channels, slots)


def _pad_explicitly(x: torch.Tensor, geometry: ConvGeometry, always: bool = False):
    """``(x, padding)`` for F.conv2d: asymmetric padding (``"same"`` with an odd total) as an
    explicit pad, as the reference does; ``always`` pads every side explicitly."""
    if not always and geometry.pad_begin == geometry.pad_end:
        return x, geometry.pad_begin
    (top, left), (bottom, right) = geometry.pad_begin, geometry.pad_end
    if (top, left, bottom, right) == (0, 0, 0, 0):
        return x, (0, 0)
    return F.pad(x, (left, right, top, bottom)), (0, 0)


def _plan_conv(x_in: torch.Tensor, plan: _ConvPlan, geometry: ConvGeometry, bias=None) -> torch.Tensor:
    xp, padding = _pad_explicitly(x_in, geometry)
    y = _conv2d(xp, plan.weight, bias, geometry.stride, padding, geometry.dilation, plan.groups)
    return y if plan.slots is None else y.index_select(1, plan.slots)


def _gather_channels(x: torch.Tensor, channels: torch.Tensor | None) -> torch.Tensor:
    return x if channels is None else x.index_select(1, channels)


def conv2d_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mask: torch.Tensor,
    geometry: ConvGeometry,
    skip_zero_inputs: bool = False,
) -> tuple[torch.Tensor, tuple]:
    """``x [B, C, H, W]``, ``weight [F, C / groups, kh, kw]``, ``mask [F]`` ->
    ``(y [B, F, Ho, Wo] in x's dtype, state for conv2d_backward)``."""
    compute = _compute_dtype(x.dtype)
    xc, w = x.to(compute), weight.to(compute)
    b = None if bias is None else bias.to(compute)
    units = active_units(mask)
    channels = _nonzero_along(xc, 1) if skip_zero_inputs and geometry.groups == 1 else None
    if channels is not None and not channels.numel():  # every input channel is 0: so is every product
        units = mask.new_zeros(0, dtype=torch.long)
    state = (units, channels)
    if units is None and channels is None:
        return _plan_conv(xc, _ConvPlan(w, geometry.groups, None, None), geometry, b).to(x.dtype), state
    fmt = _conv_format(x, weight)
    if units is None:
        plan = _conv_plan(w, None, channels, geometry.groups)
        y = _plan_conv(_gather_channels(xc, plan.channels), plan, geometry, b)
        return _as_format(y, fmt).to(x.dtype), state
    out_h, out_w = geometry.output_size(x.shape[2], x.shape[3])
    y = _unit_fill(b, (x.shape[0], w.shape[0], out_h, out_w), 1, compute, x.device, fmt)
    if units.numel():
        plan = _conv_plan(w, units, channels, geometry.groups)
        y_active = _plan_conv(_gather_channels(xc, plan.channels), plan, geometry)
        if b is not None:
            y_active += b.index_select(0, units).view(1, -1, 1, 1)
        y.index_copy_(1, units, y_active)
    return y.to(x.dtype), state


def conv2d_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    geometry: ConvGeometry,
    state: tuple,
    *,
    has_bias: bool,
    need_dx: bool = True,
    mode: str = "exact",
    sample_fraction: float = 0.125,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(dx | None, dW, dtau, db | None)`` in the compute dtype, equal to
    :func:`spafl.reference.threshold_conv2d_backward` (``dx`` is 0 at dropped input channels)."""
    units, channels = state
    compute = _compute_dtype(x.dtype)
    dy, xc, w = grad_out.to(compute), x.to(compute), weight.to(compute)
    n_out, fan_in = w.shape[0], w[0].numel()
    fmt = _conv_format(x, weight)
    db = dy.sum(dim=(0, 2, 3)) if has_bias else None
    dx = None
    if units is not None and units.numel() == 0:
        dw, r = w.new_zeros(w.shape), w.new_zeros(n_out)
        if need_dx:
            dx = torch.empty(xc.shape, dtype=compute, device=xc.device, memory_format=fmt).zero_()
    else:
        plan = _conv_plan(w, units, channels, geometry.groups)
        x_in = _gather_channels(xc, plan.channels)
        dy_a = dy if units is None else dy.index_select(1, units)
        if plan.slots is not None:
            dy_a = dy_a.new_zeros((dy.shape[0], plan.weight.shape[0], *dy.shape[2:])).index_copy_(1, plan.slots, dy_a)
        xp, padding = _pad_explicitly(x_in, geometry)
        dx_in, g = _conv2d_backward(dy_a, xp, plan.weight, geometry.stride, padding, geometry.dilation, plan.groups,
                                    need_dx)
        w_c = plan.weight
        if plan.slots is not None:
            g, w_c = g.index_select(0, plan.slots), w_c.index_select(0, plan.slots)
        r_a = _row_dot(g, w_c)  # exact with dropped channels: G is 0 there
        if need_dx:
            if xp is not x_in:
                top, left = geometry.pad_begin
                dx_in = dx_in[..., top : top + x.shape[2], left : left + x.shape[3]]
            if plan.channels is None:
                dx = _as_format(dx_in, fmt)
            else:
                dx = torch.empty(xc.shape, dtype=compute, device=xc.device, memory_format=fmt).zero_()
                dx.index_copy_(1, plan.channels, dx_in)
        if units is None and channels is None:  # density 1, nothing dropped
            return dx, g.add_(_sign_term(w, r_a, fan_in)), -r_a, db
        dw_a = _sign_term(w if units is None else w.index_select(0, units), r_a, fan_in)
        if channels is None:
            dw_a.add_(g)
        else:
            dw_a.index_add_(1, channels, g)
        if units is None:
            return dx, dw_a, -r_a, db
        dw = w.new_zeros(w.shape).index_copy_(0, units, dw_a)
        r = w.new_zeros(n_out).index_copy_(0, units, r_a)
    pruned, r_p = _pruned_r_conv(dy, xc, w, mask, channels, geometry, mode, sample_fraction)
    if pruned.numel():
        r.index_copy_(0, pruned, r_p)
        dw.index_copy_(0, pruned, _sign_term(w.index_select(0, pruned), r_p, fan_in))
    return dx, dw, -r, db


def _pruned_r_conv(dy, xc, w, mask, channels, geometry: ConvGeometry, mode: str, sample_fraction: float):
    """``(pruned filters with a possibly nonzero r, their r)`` for the backward ``mode``."""
    empty = mask.new_zeros(0, dtype=torch.long)
    if mode == "skip" or bool(mask.all()) or (channels is not None and not channels.numel()):
        return empty, dy.new_zeros(0)
    if mode == "exact":
        pruned = (dy.ne(0).any(dim=(0, 2, 3)) & ~mask).nonzero().squeeze(1)
        if not pruned.numel():
            return empty, dy.new_zeros(0)
        plan = _conv_plan(w, pruned, channels, geometry.groups)
        z = _plan_conv(_gather_channels(xc, plan.channels), plan, geometry)  # the pruned filters' outputs
        return pruned, (dy.index_select(1, pruned) * z).sum(dim=(0, 2, 3))
    # sample: the reference's output pixels b * Ho * Wo + oh * Wo + ow = 0, step, 2 * step, ...
    batch, _, out_h, out_w = dy.shape
    pixels = batch * out_h * out_w
    count, step = sample_rows(pixels, sample_fraction)
    pix = torch.arange(count, device=dy.device) * step
    b_i, rest = torch.div(pix, out_h * out_w, rounding_mode="floor"), pix % (out_h * out_w)
    o_h, o_w = torch.div(rest, out_w, rounding_mode="floor"), rest % out_w
    dy_s = dy[b_i, :, o_h, o_w]  # [S, F]
    pruned = (dy_s.ne(0).any(dim=0) & ~mask).nonzero().squeeze(1)
    if not pruned.numel():
        return empty, dy.new_zeros(0)
    plan = _conv_plan(w, pruned, channels, geometry.groups)
    # The receptive field of each sampled pixel as a [S, C', kh_span, kw_span] batch: one
    # convolution without stride or padding then gives each pixel's pre-activation.
    xp, _ = _pad_explicitly(_gather_channels(xc, plan.channels), geometry, always=True)
    (kh, kw), (dh, dw_) = geometry.kernel, geometry.dilation
    span_h, span_w = dh * (kh - 1) + 1, dw_ * (kw - 1) + 1
    windows = xp.unfold(2, span_h, geometry.stride[0]).unfold(3, span_w, geometry.stride[1])[b_i, :, o_h, o_w]
    z = _conv2d(windows, plan.weight, None, (1, 1), (0, 0), geometry.dilation, plan.groups).flatten(1)
    if plan.slots is not None:
        z = z.index_select(1, plan.slots)
    r = (dy_s.index_select(1, pruned) * z).sum(dim=0)
    return pruned, r * (pixels / count)
