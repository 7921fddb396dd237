"""Convolutions of the compacting backend (``backend="compact"``): see :mod:`spafl.compact` for
what it computes and how; this module holds the Conv2d forward and backward, their grouped
convolution plans and the memory-format rules. Every convolution goes through
:func:`_conv2d` or :func:`_conv2d_backward`, so that the tests can see the shapes that were
really multiplied (as :mod:`spafl.compact` does for the Linear products).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._conv import ConvGeometry
from ._rowmask import sample_rows
from .compact import (
    CompactGrad,
    _cast,
    _channels_last,
    _live_pruned,
    _nonzero_along,
    _row_dot,
    _rows_gradient,
    _scatter_units,
    _select_channels,
    _sign_term,
    _straight_through_,
    _take,
    _zeros_except,
    active_units,
)
from .reference import _compute_dtype


def _conv2d(x, w, b, stride, padding, dilation, groups: int) -> torch.Tensor:
    return F.conv2d(x, w, b, stride, padding, dilation, groups)


def _conv2d_backward(dy, x, w, stride, padding, dilation, groups: int, need_dx: bool):
    """``(dL/dx | None, dL/dw)`` of ``_conv2d(x, w)`` from the convolution's own backward,
    except for the weight gradient of a convolution with one input channel (the first layer of
    a grayscale model): oneDNN's weight-gradient kernel vectorises over input channels and is
    slow there, so ``dW`` comes from a forward convolution of the batch-transposed tensors:
    ``dW[f, c, i, j] = sum_{b, p} dy[b, f, p] x[b, c, p * stride + (i, j) * dilation]`` is the
    convolution of ``x^T [C, B, H, W]`` with the kernel ``dy^T [F, B, Ho, Wo]`` at stride
    ``dilation`` and dilation ``stride``. Measured on an AVX2 CPU, one thread: 1.8-2.0x faster
    for 5x5 and 7x7 kernels (LeNet-5's conv1: 1.96x) and for small output maps, 0.64-0.95x for
    3x3 kernels on maps of 64x64 and more, hence the condition."""
    if not _single_channel_route(x, w.shape[2:], dy.shape[2:], groups):
        dx, dw, _ = torch.ops.aten.convolution_backward(
            dy, x, w, None, stride, padding, dilation, False, (0, 0), groups, (need_dx, True, False)
        )
        return dx, dw
    dx = None
    if need_dx:
        dx = torch.ops.aten.convolution_backward(
            dy, x, w, None, stride, padding, dilation, False, (0, 0), groups, (True, False, False)
        )[0]
    kh, kw = w.shape[2:]
    dw = F.conv2d(x.transpose(0, 1), dy.transpose(0, 1), None, dilation, padding, stride)
    return dx, dw[:, :, :kh, :kw].transpose(0, 1).contiguous(memory_format=_weight_format(w))


def _single_channel_route(x: torch.Tensor, kernel, out_size, groups: int) -> bool:
    """Whether :func:`_conv2d_backward` takes the weight gradient from a forward convolution:
    not for channels-last tensors, whose own weight gradient measured 1.7x faster than the
    route (and 5x faster than NCHW's) for LeNet-5's conv1."""
    (kh, kw), (out_h, out_w) = kernel, out_size
    return (groups == 1 and x.shape[1] == 1 and (kh * kw >= 25 or out_h * out_w <= 1024)
            and not _channels_last(x))


def _weight_format(w: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if _channels_last(w) else torch.contiguous_format


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
    return y if plan.slots is None else _select_channels(y, plan.slots)


def _gather_channels(x: torch.Tensor, channels: torch.Tensor | None) -> torch.Tensor:
    return x if channels is None else _select_channels(x, channels)


class _ConvState(NamedTuple):
    """What :func:`conv2d_forward` hands to :func:`conv2d_backward`."""

    units: torch.Tensor | None  # active filters (None: all)
    channels: torch.Tensor | None  # kept input channels (None: all); with a compact input, those x holds
    x_in: torch.Tensor | None  # the input with only those channels (None: the input itself)
    plan: _ConvPlan | None  # the active filters' compact convolution (None: the dense one, or none)
    x_plan: torch.Tensor | None  # the plan's input when it is neither x_in nor the input
    compact_input: bool = False
    compact_output: bool = False
    rows: torch.Tensor | None = None  # the active filters' whole rows of the weight, when the plan also drops channels


def conv2d_state(
    xc: torch.Tensor,
    w: torch.Tensor,
    mask: torch.Tensor,
    geometry: ConvGeometry,
    skip_zero_inputs: bool = False,
    *,
    x_index: torch.Tensor | None = None,
    compact_output: bool = False,
    units: torch.Tensor | None = None,
) -> _ConvState:
    """What :func:`conv2d_forward` decides before its convolution, for ``xc`` and ``w`` already
    in the compute dtype: the active filters (none when every input channel is 0), the input
    channels multiplied and the compact convolution's plan (None when the dense convolution
    runs or nothing is active). The compiled operators (:mod:`spafl._ops`) rebuild the
    backward's state with it. ``units``: the active filters where the caller has them (see
    :func:`active_units`)."""
    units = active_units(mask, units)
    if x_index is not None:
        channels = x_index
    else:
        channels = _nonzero_along(xc, 1) if skip_zero_inputs and geometry.groups == 1 else None
    if channels is not None and not channels.numel():  # every input channel is 0: so is every product
        units = mask.new_zeros(0, dtype=torch.long)
    compact_input = x_index is not None
    if units is None and channels is None:
        return _ConvState(None, None, None, None, None, compact_input, compact_output)
    x_in = xc if compact_input else _gather_channels(xc, channels)
    state = _ConvState(units, channels, None if x_in is xc else x_in, None, None, compact_input, compact_output)
    if units is not None and not units.numel():
        return state
    if geometry.groups == 1:
        return state._replace(**_dense_groups_plan(w, units, channels, _channels_last(x_in)))
    plan = _conv_plan(w, units, channels, geometry.groups)
    x_plan = x_in if plan.channels is channels else _gather_channels(xc, plan.channels)
    if plan.weight is not w and _channels_last(x_plan) and not _channels_last(plan.weight):
        # The gathered weight in the input's layout: oneDNN would reorder it in every call
        # (measured 1.07x on the forward and backward of LeNet-5's compact conv2).
        plan = plan._replace(weight=plan.weight.contiguous(memory_format=torch.channels_last))
    return state._replace(plan=plan, x_plan=None if x_plan is x_in else x_plan)


def _dense_groups_plan(w: torch.Tensor, units: torch.Tensor | None, channels: torch.Tensor | None,
                       channels_last: bool) -> dict:
    """The ``plan`` (and ``rows``) of :class:`_ConvState` for ``groups == 1``: the filters
    ``units`` (None: all) reading the input channels ``channels`` (None: all), in the input's
    layout (``channels_last``), as :func:`_conv_plan` and a reorder would make it, with fewer
    operations. The whole rows ``W[units]`` are kept for the backward's sign term, which would
    otherwise gather them again."""
    rows = w if units is None else w.index_select(0, units)
    if channels is None:
        weight = rows
        if rows is not w and channels_last and not _channels_last(rows):
            # The gathered weight in the input's layout: oneDNN would reorder it in every call
            # (measured 1.07x on the forward and backward of LeNet-5's compact conv2).
            weight = rows.contiguous(memory_format=torch.channels_last)
        return {"plan": _ConvPlan(weight, 1, None, None)}
    if channels_last:
        # Gathered along the last dimension of the [F', kh, kw, C] view, the columns come out
        # channels-last: one copy where a gather and a reorder made two.
        weight = rows.permute(0, 2, 3, 1).index_select(3, channels).permute(0, 3, 1, 2)
    else:
        weight = rows.index_select(1, channels)
    return {"plan": _ConvPlan(weight, 1, channels, None), "rows": None if rows is w else rows}


def conv2d_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mask: torch.Tensor,
    geometry: ConvGeometry,
    skip_zero_inputs: bool = False,
    *,
    x_index: torch.Tensor | None = None,
    compact_output: bool = False,
    units: torch.Tensor | None = None,
) -> tuple[torch.Tensor, _ConvState]:
    """``x [B, C, H, W]``, ``weight [F, C / groups, kh, kw]``, ``mask [F]`` ->
    ``(y [B, F, Ho, Wo] in x's dtype, state for conv2d_backward)``.

    Compact chains (:mod:`spafl.chain`): with ``x_index`` (``groups == 1``), ``x [B, len(x_index),
    H, W]`` holds only those input channels, the others being 0; with ``compact_output`` (no
    bias), ``y [B, A, Ho, Wo]`` holds only the active filters' outputs (all ``F`` when every
    filter is active), in the layout the convolution gives (``x``'s), and the backward takes
    the gradient of that ``y``."""
    if compact_output and bias is not None:
        raise ValueError("compact_output needs a layer without bias: pruned filters must output 0")
    if x_index is not None and geometry.groups != 1:
        raise ValueError(f"a compact input needs groups == 1, got groups={geometry.groups}")
    compute = _compute_dtype(x.dtype)
    xc, w, b = _cast(x, compute), _cast(weight, compute), _cast(bias, compute)
    state = conv2d_state(xc, w, mask, geometry, skip_zero_inputs, x_index=x_index, compact_output=compact_output,
                         units=units)
    units, plan = state.units, state.plan
    if units is None and state.channels is None:
        y = _plan_conv(xc, _ConvPlan(w, geometry.groups, None, None), geometry, b)
        return _cast(y, x.dtype), state
    if plan is None:  # no filter active, or every input channel 0: so is every product
        out_h, out_w = geometry.output_size(x.shape[2], x.shape[3])
        if compact_output:  # the rows of a compact output: the mask's active filters
            return x.new_zeros((x.shape[0], int(mask.count_nonzero()), out_h, out_w)), state
        y_active = xc.new_empty((x.shape[0], 0, out_h, out_w))
        y = _scatter_units(y_active, units, b, (x.shape[0], w.shape[0], out_h, out_w), 1, _conv_format(x, weight))
        return _cast(y, x.dtype), state
    x_in = xc if state.x_in is None else state.x_in
    x_plan = x_in if state.x_plan is None else state.x_plan
    if units is None:
        return _cast(_as_format(_plan_conv(x_plan, plan, geometry, b), _conv_format(x, weight)), x.dtype), state
    y_active = _plan_conv(x_plan, plan, geometry)
    if compact_output:
        return _cast(y_active, x.dtype), state
    out_h, out_w = y_active.shape[2:]
    y = _scatter_units(y_active, units, b, (x.shape[0], w.shape[0], out_h, out_w), 1, _conv_format(x, weight))
    return _cast(y, x.dtype), state


def conv2d_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    geometry: ConvGeometry,
    state: _ConvState,
    *,
    has_bias: bool,
    need_dx: bool = True,
    mode: str = "exact",
    sample_fraction: float = 0.125,
    rows_only: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | CompactGrad, torch.Tensor, torch.Tensor | None]:
    """``(dx | None, dW, dtau, db | None)`` in the compute dtype, equal to
    :func:`spafl.reference.threshold_conv2d_backward` (``dx`` is 0 at dropped input channels).
    With a compact input ``dx`` is that of the compact ``x``; with a compact output
    ``grad_out`` is ``[B, A, Ho, Wo]`` and pruned filters get no gradient (theirs is 0).
    ``rows_only``: ``dW`` as a :class:`spafl.compact.CompactGrad` when some filter is active and
    some pruned (see :func:`spafl.compact.linear_backward`)."""
    units, channels = state.units, state.channels
    compute = _compute_dtype(x.dtype)
    dy, xc, w = _cast(grad_out, compute), _cast(x, compute), _cast(weight, compute)
    n_out, fan_in = w.shape[0], math.prod(w.shape[1:])
    db = dy.sum(dim=(0, 2, 3)) if has_bias else None
    if units is None and channels is None:  # density 1, nothing dropped: the dense backward
        dx, g = _plan_conv_backward(dy, xc, _ConvPlan(w, geometry.groups, None, None), geometry, need_dx, x.shape)
        dw, r = _straight_through_(g, w, fan_in)
        return None if dx is None else _as_format(dx, _conv_format(x, weight)), dw, r.neg_(), db
    x_in = xc if state.x_in is None else state.x_in
    plan = state.plan
    dw = torch.empty(w.shape, dtype=compute, device=w.device)  # first: see linear_backward
    rows_only = rows_only and units is not None and not state.compact_output
    if plan is None:  # nothing active (or every input channel 0)
        dx = None
        if need_dx:
            dx = torch.empty(xc.shape, dtype=compute, device=xc.device, memory_format=_conv_format(x, weight)).zero_()
        dtau = w.new_zeros(n_out)
        if rows_only:
            rows = _rows_conv(dy, xc, x_in, w, mask, channels, geometry, mode, sample_fraction, dtau, fan_in,
                              w.new_empty((0, *w.shape[1:])), units)
            return dx, rows, dtau, db
        dw = dw.zero_()
    else:
        x_plan = x_in if state.x_plan is None else state.x_plan
        if units is None or state.compact_output:
            dy_a = dy
        else:
            dy_a = _gather_grad(dy, units, plan, x_plan, need_dx)
        if plan.slots is not None:
            dy_a = _zeros_except(dy_a, plan.slots, (dy.shape[0], plan.weight.shape[0], *dy.shape[2:]), 1)
        dx_in, g = _plan_conv_backward(dy_a, x_plan, plan, geometry, need_dx, x_plan.shape)
        w_in = plan.weight
        if plan.slots is not None:
            g, w_in = g.index_select(0, plan.slots), w_in.index_select(0, plan.slots)
        dx = None
        if need_dx and (plan.channels is None or state.compact_input):
            dx = _as_format(dx_in, _conv_format(x, weight))
        elif need_dx:
            dx = _zeros_except(dx_in, plan.channels, xc.shape, 1, _conv_format(x, weight))
        r_a = _row_dot(g, w_in)  # exact with dropped channels: G is 0 there
        w_a = w_in  # whole filters for the sign term
        if channels is not None:
            w_a = _take(w, units, None) if state.rows is None else state.rows
        dw_a = _sign_term(w_a, r_a, fan_in)
        if channels is None:
            dw_a.add_(g)
        else:
            dw_a.index_add_(1, channels, g)
        if units is None:
            return dx, dw_a, r_a.neg_(), db
        dtau = r_a.new_zeros(n_out).index_copy_(0, units, r_a.neg_())
        if rows_only:
            rows = _rows_conv(dy, xc, x_in, w, mask, channels, geometry, mode, sample_fraction, dtau, fan_in,
                              dw_a, units)
            return dx, rows, dtau, db
        dw.zero_().index_copy_(0, units, dw_a)
    if state.compact_output or (channels is not None and not channels.numel()):
        return dx, dw, dtau, db  # pruned filters' output gradient is 0, or every input is
    pruned, r_p = _pruned_r_conv(dy, xc, x_in, w, mask, channels, geometry, mode, sample_fraction)
    if pruned is not None:
        dtau.index_copy_(0, pruned, -r_p)
        dw.index_copy_(0, pruned, _sign_term(w.index_select(0, pruned), r_p, fan_in))
    return dx, dw, dtau, db


def _rows_conv(dy, xc, x_in, w, mask, channels, geometry, mode, sample_fraction, dtau, fan_in, dw_a, units):
    """The ``rows_only`` gradient of :func:`conv2d_backward`: the active filters' ``dw_a`` and the
    pruned filters' straight-through term (their ``-r`` written into ``dtau``)."""
    pruned, r_p = None, None
    if channels is None or channels.numel():  # (every input 0: no pruned filter is owed anything)
        pruned, r_p = _pruned_r_conv(dy, xc, x_in, w, mask, channels, geometry, mode, sample_fraction)
    if pruned is not None:
        dtau.index_copy_(0, pruned, -r_p)
    return _rows_gradient(dw_a, units, pruned, w, r_p, fan_in)


def _gather_grad(dy: torch.Tensor, units: torch.Tensor, plan: _ConvPlan, x_plan: torch.Tensor, need_dx: bool):
    """``dy[:, units]``; laid out channel-major (a ``[B, A, Ho, Wo]`` view of an
    ``[A, B, Ho, Wo]`` tensor) when the weight gradient will take the single-input-channel route
    of :func:`_conv2d_backward`, which reads ``dy`` transposed: one copy instead of two."""
    if need_dx or not _single_channel_route(x_plan, plan.weight.shape[2:], dy.shape[2:], plan.groups):
        return _select_channels(dy, units)
    return dy.transpose(0, 1).index_select(0, units).transpose(0, 1)


def _plan_conv_backward(dy, x_in, plan: _ConvPlan, geometry: ConvGeometry, need_dx: bool, x_shape):
    """``(dx of x_in | None, dL/d plan.weight)`` of :func:`_plan_conv` for its output gradient ``dy``
    (in the compact convolution's channel order)."""
    xp, padding = _pad_explicitly(x_in, geometry)
    dx, g = _conv2d_backward(dy, xp, plan.weight, geometry.stride, padding, geometry.dilation, plan.groups, need_dx)
    if need_dx and xp is not x_in:
        top, left = geometry.pad_begin
        dx = dx[..., top : top + x_shape[2], left : left + x_shape[3]]
    return dx, g


def _pruned_r_conv(dy, xc, x_in, w, mask, channels, geometry: ConvGeometry, mode: str, sample_fraction: float):
    """``(pruned filters with a nonzero r, their r)`` for the backward ``mode``, or ``(None, None)``.
    ``x_in`` is ``xc`` with the dropped ``channels`` left out."""
    if mode == "skip":
        return None, None
    if mode == "exact":
        pruned, dy_p = _live_pruned(dy, mask)
        if pruned is None:
            return None, None
        plan = _conv_plan(w, pruned, channels, geometry.groups)
        x_plan = x_in if plan.channels is channels else _gather_channels(xc, plan.channels)
        z = _plan_conv(x_plan, plan, geometry)  # the pruned filters' outputs
        return pruned, (dy_p * z).sum(dim=(0, 2, 3))
    # sample: the reference's output pixels b * Ho * Wo + oh * Wo + ow = 0, step, 2 * step, ...
    batch, _, out_h, out_w = dy.shape
    pixels = batch * out_h * out_w
    count, step = sample_rows(pixels, sample_fraction)
    pix = torch.arange(count, device=dy.device) * step
    b_i, rest = torch.div(pix, out_h * out_w, rounding_mode="floor"), pix % (out_h * out_w)
    o_h, o_w = torch.div(rest, out_w, rounding_mode="floor"), rest % out_w
    pruned, dy_p = _live_pruned(dy[b_i, :, o_h, o_w], mask)  # dy of the sampled pixels: [S, F]
    if pruned is None:
        return None, None
    plan = _conv_plan(w, pruned, channels, geometry.groups)
    x_plan = x_in if plan.channels is channels else _gather_channels(xc, plan.channels)
    # The receptive field of each sampled pixel as a [S, C', kh_span, kw_span] batch: one
    # convolution without stride or padding then gives each pixel's pre-activation.
    xp, _ = _pad_explicitly(x_plan, geometry, always=True)
    (kh, kw), (dil_h, dil_w) = geometry.kernel, geometry.dilation
    span_h, span_w = dil_h * (kh - 1) + 1, dil_w * (kw - 1) + 1
    windows = xp.unfold(2, span_h, geometry.stride[0]).unfold(3, span_w, geometry.stride[1])[b_i, :, o_h, o_w]
    z = _conv2d(windows, plan.weight, None, (1, 1), (0, 0), geometry.dilation, plan.groups).flatten(1)
    if plan.slots is not None:
        z = z.index_select(1, plan.slots)
    return pruned, (dy_p * z).sum(dim=0).mul_(pixels / count)
