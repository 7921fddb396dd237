"""Autograd functions and the functional API of the threshold layers.

One path per op: :func:`linear_call` / :func:`conv2d_call` take the tensors, the layer's
:class:`~spafl._options.ThresholdOptions` and the guard's buffers; the layers call them directly,
the functional API after building the options from its keyword arguments. The route (which
backend computes the mask and the products) comes from :func:`spafl._checks.route`, the one
dispatch point; the forward and the backward of each backend are the methods of its entry in
``IMPLEMENTATIONS``, run by the autograd Functions here in eager mode, by the ``torch.library``
operators of :mod:`spafl._ops` under ``torch.compile``, and by the compact chains of
:mod:`spafl.chain` (which pass an implementation object of their own).
"""

from __future__ import annotations

import contextlib
import math
import struct

import torch
from torch.autograd.function import once_differentiable

from . import compact, reference
from ._checks import (
    Route,
    check_finite_values,
    check_layer_inputs,
    check_weight_and_threshold,
    route,
)
from ._conv import ConvGeometry, conv_geometry
from ._options import ThresholdOptions, options_of
from ._rowmask import RowMask

_KERNELS = None


def _kernels():
    # Imported on first use so that the reference path works where Triton is not installed.
    global _KERNELS
    if _KERNELS is None:
        from . import kernels

        _KERNELS = kernels
    return _KERNELS


def threshold_row_mask(
    weight: torch.Tensor,
    threshold: torch.Tensor,
    *,
    backend: str = "auto",
    collapse_density: float | None = None,
    check_finite: bool | None = None,
) -> RowMask:
    """Which output units of ``weight [out, ...]`` are active under ``threshold [out]``.

    Returns a :class:`RowMask` (mask, sorted compact index list, active count, row scores),
    computed on the tensors' device without a host synchronisation. With ``collapse_density``,
    a layer at or below that density gets the mask of ``tau = 0`` and ``RowMask.collapsed`` is
    set; this function does not modify ``threshold`` (the layers do, see ``collapse_density``).
    ``check_finite`` as for :func:`threshold_linear` (NaN / inf thresholds and weights).
    """
    options = options_of(backend, "exact", 1.0, collapse_density, "current", False, check_finite)
    check_weight_and_threshold(weight, threshold, op="threshold_row_mask")
    row_mask = _row_mask(weight, threshold, route(backend, weight).mask, collapse_density)
    if _check_finite(options, threshold):
        check_finite_values(threshold, row_mask.score)
    return row_mask


def _check_finite(options: ThresholdOptions, threshold: torch.Tensor) -> bool:
    """``options.check_finite`` resolved: None means on for CPU tensors (the check is free there)
    and off elsewhere (on CUDA it synchronises with the host)."""
    check = options.check_finite
    return threshold.device.type == "cpu" if check is None else check


def _row_mask(weight, threshold, mask_backend: str, collapse_density: float | None, with_perm: bool = True) -> RowMask:
    if mask_backend == "triton":  # (a launch records no graph: no detach needed)
        w2d = weight if weight.dim() == 2 else weight.reshape(weight.shape[0], -1)
        return _kernels().threshold_row_mask(w2d, threshold, collapse_density=collapse_density)
    w2d = weight.detach()
    if w2d.dim() != 2:
        w2d = w2d.reshape(w2d.shape[0], -1)
    with torch.no_grad():
        return reference.row_mask(w2d, threshold, collapse_density=collapse_density, with_perm=with_perm)


def _guarded_row_mask(
    weight: torch.Tensor,
    threshold: torch.Tensor,
    mask_backend: str,
    with_perm: bool,
    options: ThresholdOptions,
    counter: torch.Tensor | None,
    previous_density: torch.Tensor | None,
    check_finite: bool = False,
    precomputed: tuple[str, RowMask] | None = None,
) -> RowMask:
    """The forward's row mask, after the collapse guard of ``options`` (if any) has run: the one
    guard of every path (eager, the ``spafl::row_mask`` operator, the chains).

    ``"current"``: the guard tests this mask's density, and the mask of ``tau = 0`` is used
    when it fires. ``"previous"``: it tests ``previous_density`` (the density of the last
    guarded forward, as the SpaFL authors' layers test ``self.ratio``), resets before the mask
    is built, and the mask comes from the reset thresholds. Either way ``previous_density``
    (when given) then holds this forward's density. When it fires, ``threshold`` is reset to 0
    in place and ``counter`` incremented. Device-side, without a host synchronisation, except
    for CPU tensors on the plain-PyTorch backends, where the host decides (same results, and a
    forward where the guard does not fire pays no no-op writes). ``check_finite``: reject NaN /
    inf thresholds and weights first (nothing is modified then).

    ``precomputed``: ``(mask backend, RowMask)`` that a fused optimizer step (:mod:`spafl.optim`)
    built from these very weights and thresholds with this guard density; the caller has checked
    that they are unchanged since. On the host path only its scores are read; elsewhere it is the
    mask (the guard's "current" test included) when it comes from this mask backend.
    """
    density = options.collapse_density
    on_host = mask_backend != "triton" and not with_perm and weight.device.type == "cpu"
    if on_host:
        return _host_row_mask(weight, threshold, mask_backend == "compact", density, options.collapse_timing,
                              counter, previous_density, check_finite,
                              None if precomputed is None else precomputed[1].score)
    # (with a guard, the kept mask must carry its decision: the fused step makes it for either timing)
    reuse = (precomputed is not None and precomputed[0] == mask_backend
             and (not with_perm or precomputed[1].perm is not None)
             and (density is None or precomputed[1].collapsed is not None))
    if check_finite:  # a pass over the weight of its own: only where the check was asked for
        check_finite_values(threshold, precomputed[1].score if reuse else reference.row_scores(weight))
    if reuse:
        row_mask = precomputed[1]
        if density is not None:
            with torch.no_grad():
                _reset(threshold, row_mask.collapsed, counter)
                if previous_density is not None:
                    previous_density.copy_(row_mask.count.reshape(()) / row_mask.mask.shape[0])
        return row_mask
    if density is None:
        return _row_mask(weight, threshold, mask_backend, None, with_perm)
    previous = options.collapse_timing == "previous"
    with torch.no_grad():
        if previous:
            collapsed = (previous_density <= density).reshape(1)
            _reset(threshold, collapsed, counter)
            row_mask = _row_mask(weight, threshold, mask_backend, None, with_perm)._replace(collapsed=collapsed)
        else:
            row_mask = _row_mask(weight, threshold, mask_backend, density, with_perm)
            _reset(threshold, row_mask.collapsed, counter)
        if previous_density is not None:
            previous_density.copy_(row_mask.count.reshape(()) / row_mask.mask.shape[0])  # (fp32, as the host)
    return row_mask


def _host_row_mask(weight, threshold, want_units: bool, density, timing, counter, previous_density, check_finite,
                   score=None):
    """:func:`_guarded_row_mask` for CPU tensors on the plain-PyTorch backends, deciding on the
    host (a synchronisation is free there) with as few operations as a small layer allows: the
    comparisons are the device path's, in its dtypes (``s > tau`` as ``s - tau > 0``, the same
    for IEEE floats, whose difference is 0 only when they are equal; one finite sum of it tells
    that both are finite). ``RowMask.perm``, ``count`` and ``collapsed`` stay None; ``units``
    holds the active rows for the compacting backend (``want_units``). ``score``: the row
    scores of ``weight`` when already known (a fused optimizer step computed them)."""
    if score is None:
        score = reference.row_scores(weight)
    tau = threshold.detach()
    if tau.dtype != score.dtype:
        tau = tau.to(score.dtype)
    if check_finite:
        diff = score - tau
        if not math.isfinite(float(diff.sum())):
            check_finite_values(threshold.detach(), score)  # names the culprits (or finds an overflowed sum)
        mask = diff > 0
    else:
        mask = score > tau
    units = active = None
    n = mask.shape[0]
    if want_units or (density is not None and timing == "current"):
        units = mask.nonzero().squeeze(1)
        active = units.shape[0]
    if density is not None:
        if timing == "previous":
            fired = bool(previous_density <= density)
        else:
            fired = active <= _float32(density * n)  # the device path compares in fp32
        if fired:
            with torch.no_grad():
                threshold.zero_()
            if counter is not None:
                counter.add_(1)
            mask = score > 0
            units = mask.nonzero().squeeze(1)
            active = units.shape[0]
        if previous_density is not None:
            if active is None:
                units = mask.nonzero().squeeze(1)
                active = units.shape[0]
            previous_density.fill_(active / n)  # = the device path's fp32 count / n, rounded once
    return RowMask(mask, None, None, score, None, units if want_units else None)


def _reset(threshold: torch.Tensor, collapsed: torch.Tensor, counter: torch.Tensor | None) -> None:
    """The guard's reset on the device: ``threshold`` to 0 and ``counter`` + 1 where
    ``collapsed`` (no host synchronisation)."""
    threshold.masked_fill_(collapsed, 0.0)
    if counter is not None:
        counter.add_(collapsed.reshape(()))


def _float32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", value))[0]


# ----------------------------------------------------------------------------- implementations


def _cast_gradients(grads, need_dx: bool, weight_dtype: torch.dtype, threshold_dtype: torch.dtype):
    """The compute-dtype ``(dx, dw, dtau, db)`` of the plain-PyTorch backends in the dtypes of
    the inputs."""
    dx, dw, dtau, db = grads
    return (
        compact._cast(dx, weight_dtype) if need_dx else None,
        compact._cast(dw, weight_dtype),
        compact._cast(dtau, threshold_dtype),
        compact._cast(db, weight_dtype),
    )


def _mode(options: ThresholdOptions, rows: int) -> str:
    """The backward mode to run for a batch of ``rows`` rows (Linear) or samples (Conv2d): an
    empty batch has no rows to sample, and there ``"sample"`` is ``"exact"`` (every ``r`` is 0)."""
    mode = options.backward_mode
    return "exact" if mode == "sample" and rows == 0 else mode


class _Reference:
    """Masked dense (``W * m``, then the dense op): the oracle of the tests and the benchmarks'
    ``masked`` baseline. Ignores ``skip_zero_inputs``."""

    @staticmethod
    def linear_forward(x2d, weight, bias, row_mask, options):
        return reference.threshold_linear_forward(x2d, weight, row_mask.mask, bias), None

    @staticmethod
    def linear_backward(grad_y2d, x2d, weight, row_mask, state, options, need_dx, has_bias, threshold_dtype):
        grads = reference.threshold_linear_backward(
            grad_y2d, x2d, weight, row_mask.mask, row_mask.mask, has_bias=has_bias,
            mode=_mode(options, x2d.shape[0]), sample_fraction=options.sample_fraction,
        )
        return _cast_gradients(grads, need_dx, weight.dtype, threshold_dtype)

    @staticmethod
    def conv2d_forward(x, weight, bias, row_mask, geometry, options):
        return reference.threshold_conv2d_forward(x, weight, row_mask.mask, bias, geometry), None

    @staticmethod
    def conv2d_backward(grad_y, x, weight, row_mask, geometry, state, options, need_dx, has_bias, threshold_dtype):
        grads = reference.threshold_conv2d_backward(
            grad_y, x, weight, row_mask.mask, row_mask.mask, geometry, has_bias=has_bias,
            need_dx=need_dx, mode=_mode(options, x.shape[0]), sample_fraction=options.sample_fraction,
        )
        return _cast_gradients(grads, need_dx, weight.dtype, threshold_dtype)


class _Compact:
    """Gathers the active units (and, with ``skip_zero_inputs``, the nonzero inputs): see
    :mod:`spafl.compact`. A chain (:mod:`spafl.chain`) runs an instance with its compact input's
    index list and whether its output stays compact; the layers run the class itself."""

    x_index = None
    compact_output = False
    in_chain = False

    def __init__(self, x_index: torch.Tensor | None = None, compact_output: bool = False, in_chain: bool = False):
        # A chain's layer takes its input's index list as it comes: the chain decides what it
        # carries (a whole input is multiplied whole, as the chain has always done).
        self.x_index, self.compact_output, self.in_chain = x_index, compact_output, in_chain

    def _skip(self, options) -> bool:
        return options.skip_zero_inputs and not self.in_chain

    def linear_forward(self, x2d, weight, bias, row_mask, options):
        return compact.linear_forward(x2d, weight, bias, row_mask.mask, self._skip(options),
                                      x_index=self.x_index, compact_output=self.compact_output, units=row_mask.units)

    def linear_backward(self, grad_y2d, x2d, weight, row_mask, state, options, need_dx, has_bias, threshold_dtype):
        grads = compact.linear_backward(
            grad_y2d, x2d, weight, row_mask.mask, state, has_bias=has_bias, need_dx=need_dx,
            mode=_mode(options, x2d.shape[0]), sample_fraction=options.sample_fraction,
        )
        return _cast_gradients(grads, need_dx, weight.dtype, threshold_dtype)

    def conv2d_forward(self, x, weight, bias, row_mask, geometry, options):
        return compact.conv2d_forward(x, weight, bias, row_mask.mask, geometry, self._skip(options),
                                      x_index=self.x_index, compact_output=self.compact_output, units=row_mask.units)

    def conv2d_backward(self, grad_y, x, weight, row_mask, geometry, state, options, need_dx, has_bias,
                        threshold_dtype):
        grads = compact.conv2d_backward(
            grad_y, x, weight, row_mask.mask, geometry, state, has_bias=has_bias, need_dx=need_dx,
            mode=_mode(options, x.shape[0]), sample_fraction=options.sample_fraction,
        )
        return _cast_gradients(grads, need_dx, weight.dtype, threshold_dtype)


def _pointwise_as_linear(x: torch.Tensor, geometry: ConvGeometry) -> bool:
    """A 1x1 convolution on a channels-last input is a GEMM on a view of it: the Linear kernels
    run it with no copy."""
    return geometry.is_pointwise and x.permute(0, 2, 3, 1).is_contiguous()


class _Triton:
    """The Triton kernels (``spafl.kernels``): device-side compaction, no host synchronisation.
    Ignores ``skip_zero_inputs``."""

    @staticmethod
    def linear_forward(x2d, weight, bias, row_mask, options):
        return _kernels().threshold_linear_fwd(x2d, weight, bias, row_mask), None

    @staticmethod
    def linear_backward(grad_y2d, x2d, weight, row_mask, state, options, need_dx, has_bias, threshold_dtype):
        dx, dw, dtau = _kernels().threshold_linear_bwd(
            grad_y2d, x2d, weight, row_mask, mode=_mode(options, x2d.shape[0]),
            sample_fraction=options.sample_fraction, need_dx=need_dx, threshold_dtype=threshold_dtype,
        )
        db = grad_y2d.sum(dim=0, dtype=torch.float32).to(weight.dtype) if has_bias else None
        return dx, dw, dtau, db

    @staticmethod
    def conv2d_forward(x, weight, bias, row_mask, geometry, options):
        if not _pointwise_as_linear(x, geometry):
            return _kernels().threshold_conv2d_fwd(x, weight, bias, row_mask, geometry), False
        batch, chans, height, width = x.shape
        filters = weight.shape[0]
        x2d = x.permute(0, 2, 3, 1).reshape(-1, chans)
        y2d = _kernels().threshold_linear_fwd(x2d, weight.reshape(filters, chans), bias, row_mask)
        return y2d.view(batch, height, width, filters).permute(0, 3, 1, 2), True

    @staticmethod
    def conv2d_backward(grad_y, x, weight, row_mask, geometry, as_linear, options, need_dx, has_bias,
                        threshold_dtype):
        kwargs = {"mode": _mode(options, x.shape[0]), "sample_fraction": options.sample_fraction,
                  "need_dx": need_dx, "threshold_dtype": threshold_dtype}
        if as_linear:
            batch, chans, height, width = x.shape
            filters = weight.shape[0]
            dx, dw, dtau = _kernels().threshold_linear_bwd(
                grad_y.permute(0, 2, 3, 1).reshape(-1, filters),
                x.permute(0, 2, 3, 1).reshape(-1, chans),
                weight.reshape(filters, chans),
                row_mask,
                **kwargs,
            )
            dw = dw.view(weight.shape)
            if dx is not None:
                dx = dx.view(batch, height, width, chans).permute(0, 3, 1, 2)
        else:
            dx, dw, dtau = _kernels().threshold_conv2d_bwd(grad_y, x, weight, row_mask, geometry, **kwargs)
        db = grad_y.sum(dim=(0, 2, 3), dtype=torch.float32).to(weight.dtype) if has_bias else None
        return dx, dw, dtau, db


def _operands_already_cast(device_type: str):
    """Autocast off inside the forward: :func:`_autocast` has cast the operands already, and the
    plain-PyTorch backends compute in fp32 (fp64) and round once, like the backward (which
    autocast does not reach)."""
    if _autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _autocast_enabled(device_type: str) -> bool:
    # Devices without autocast (e.g. "meta", for shape-only runs) raise in is_autocast_enabled.
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


# The registry: where a resolved backend name (``Route.compute``) becomes code.
IMPLEMENTATIONS = {"reference": _Reference, "compact": _Compact(), "triton": _Triton}


def _impl(backend):
    # A name of the registry, or an implementation object (a chain's compact one).
    return IMPLEMENTATIONS[backend] if isinstance(backend, str) else backend


def _needs_graph(*tensors) -> bool:
    """Whether autograd must record the call: without it (inference, ``no_grad``) the forward
    runs without the autograd Function and its saved state."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _bare(row_mask: RowMask) -> RowMask:
    # What the products and the backward read (the scores and the guard's flag stay behind).
    if row_mask.score is None and row_mask.collapsed is None:
        return row_mask
    return RowMask(row_mask.mask, row_mask.perm, row_mask.count, None, None, row_mask.units)


class ThresholdLinearFunction(torch.autograd.Function):
    """``y = x @ (W * m)^T + b`` with the straight-through threshold gradient.

    Inputs: ``x [..., in]``, ``weight [out, in]``, ``threshold [out]``, ``bias [out] | None``,
    the :class:`RowMask` of :func:`threshold_row_mask`, the backend (a key of
    ``IMPLEMENTATIONS``, or an implementation object) and the :class:`ThresholdOptions`.
    """

    @staticmethod
    def forward(ctx, x, weight, threshold, bias, row_mask, backend, options):
        row_mask = _bare(row_mask)
        impl = _impl(backend)
        x_shape = x.shape
        if x.dim() != 2:
            x = x.reshape(-1, weight.shape[1])
        y, state = impl.linear_forward(x, weight, bias, row_mask, options)
        ctx.save_for_backward(x, weight, *row_mask[:3])
        ctx.impl, ctx.state, ctx.options, ctx.tau_dtype = impl, state, options, threshold.dtype
        ctx.has_bias, ctx.x_shape = bias is not None, x_shape
        return y if len(x_shape) == 2 else y.reshape(*x_shape[:-1], weight.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, weight, mask, perm, count = ctx.saved_tensors
        if grad_y.dim() != 2:
            grad_y = grad_y.reshape(-1, weight.shape[0])
        dx, dw, dtau, db = ctx.impl.linear_backward(
            grad_y, x, weight, RowMask(mask, perm, count, None), ctx.state, ctx.options,
            ctx.needs_input_grad[0], ctx.has_bias, ctx.tau_dtype,
        )
        if dx is not None and len(ctx.x_shape) != 2:
            dx = dx.reshape(ctx.x_shape)
        return dx, dw, dtau, db, None, None, None


class ThresholdConv2dFunction(torch.autograd.Function):
    """``y = conv2d(x, W * m[:, None, None, None], b)`` with the straight-through threshold
    gradient.

    Inputs: ``x [B, C, H, W]``, ``weight [F, C / groups, KH, KW]``, ``threshold [F]``,
    ``bias [F] | None``, the :class:`RowMask` of :func:`threshold_row_mask`, a
    ``ConvGeometry``, the backend (``"triton"`` takes ``groups == 1`` only) and the
    :class:`ThresholdOptions`.
    """

    @staticmethod
    def forward(ctx, x, weight, threshold, bias, row_mask, geometry, backend, options):
        row_mask = _bare(row_mask)
        impl = _impl(backend)
        y, state = impl.conv2d_forward(x, weight, bias, row_mask, geometry, options)
        ctx.save_for_backward(x, weight, *row_mask[:3])
        ctx.impl, ctx.state, ctx.options, ctx.tau_dtype = impl, state, options, threshold.dtype
        ctx.geometry = geometry
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, weight, mask, perm, count = ctx.saved_tensors
        dx, dw, dtau, db = ctx.impl.conv2d_backward(
            grad_y, x, weight, RowMask(mask, perm, count, None), ctx.geometry, ctx.state, ctx.options,
            ctx.needs_input_grad[0], ctx.has_bias, ctx.tau_dtype,
        )
        return dx, dw, dtau, db, None, None, None, None


def _autocast(x, weight, bias):
    """Under ``torch.autocast``, run in the autocast dtype like ``F.linear`` does; thresholds and
    the master weights stay in their own dtype (gradients flow back through the casts)."""
    device_type = x.device.type
    if not _autocast_enabled(device_type):
        return x, weight, bias
    dtype = torch.get_autocast_dtype(device_type)
    cast = (lambda t: t if t is None or t.dtype == dtype else t.to(dtype))  # noqa: E731
    return cast(x), cast(weight), cast(bias)


def _validate_guard(options: ThresholdOptions, collapse_counter, previous_density, threshold: torch.Tensor,
                    op: str) -> None:
    for name, t in (("collapse_counter", collapse_counter), ("previous_density", previous_density)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.numel() != 1:
            raise ValueError(f"{op}: {name} must be a one-element tensor, got {t!r}")
        if t.device != threshold.device:
            raise ValueError(f"{op}: {name} is on {t.device} but threshold is on {threshold.device}")
    if previous_density is not None and not previous_density.is_floating_point():
        raise TypeError(f"{op}: previous_density must be a floating-point tensor, got {previous_density.dtype}")
    if options.collapse_timing == "previous" and options.collapse_density is not None and previous_density is None:
        raise ValueError(
            f"{op}: collapse_timing='previous' needs previous_density, the tensor that carries the density "
            "from one forward to the next (the layers keep it as a buffer)"
        )


def _run(fn, x, weight, threshold, bias, row_mask, *args):
    """The autograd Function ``fn`` when autograd records the call, else its forward alone."""
    if _needs_graph(x, weight, threshold, bias):
        return fn.apply(x, weight, threshold, bias, row_mask, *args)
    impl = _impl(args[-2])
    forward = impl.linear_forward if fn is ThresholdLinearFunction else impl.conv2d_forward
    return forward(x, weight, bias, _bare(row_mask), *args[:-2], args[-1])[0]


def linear_call(x, weight, threshold, bias, options: ThresholdOptions, counter=None, previous_density=None,
                precomputed=None):
    """:func:`threshold_linear` with its options already built (what the layers call): checks
    the tensors, runs the guard and the forward of the routed backend. ``precomputed``: see
    :func:`_guarded_row_mask` (eager mode only)."""
    check_layer_inputs(x, weight, threshold, bias, op="threshold_linear", weight_dim=2, x_min_dim=1)
    n_out, fan_in = weight.shape
    if x.shape[-1] != fan_in:
        raise ValueError(
            f"threshold_linear: x has shape {tuple(x.shape)} with {x.shape[-1]} features in its last "
            f"dimension, but weight {tuple(weight.shape)} expects {fan_in}"
        )
    # The mask comes from the master weight, before any autocast cast, so that it agrees with
    # `layer.mask`, `density` and `to_dense()`; the GEMMs run on the (possibly cast) operands.
    x_op, w_op, b_op = _autocast(x, weight, bias)
    where = route(options.backend, weight, w_op.dtype)
    check = _check_finite(options, threshold)
    x2d = x_op if x_op.dim() == 2 else x_op.reshape(-1, fan_in)
    if torch.compiler.is_compiling():
        mask, perm, count = _traced_row_mask(weight, threshold, where, options, counter, previous_density, check)
        y = torch.ops.spafl.threshold_linear(x2d, w_op, threshold, b_op, mask, perm, count, where.compute,
                                             options.key)
    else:
        row_mask = _guarded_row_mask(weight, threshold, where.mask, where.with_perm, options, counter,
                                     previous_density, check, precomputed)
        with _operands_already_cast(x.device.type):
            y = _run(ThresholdLinearFunction, x2d, w_op, threshold, b_op, row_mask, where.compute, options)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], n_out)


def _traced_row_mask(weight, threshold, where: Route, options, counter, previous_density, check):
    """``(mask, perm, count)`` of :func:`_guarded_row_mask` while ``torch.compile`` traces: the
    ``spafl::row_mask`` operator (:mod:`spafl._ops`), which runs the guard and the finiteness check
    inside, where their host decisions break no graph."""
    with torch.no_grad():  # the guard writes into the thresholds, a leaf that requires grad
        return torch.ops.spafl.row_mask(weight, threshold, counter, previous_density, where.mask, where.with_perm,
                                        options.key, check)


def threshold_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    threshold: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    backend: str = "auto",
    backward_mode: str = "exact",
    sample_fraction: float = 0.125,
    collapse_density: float | None = None,
    collapse_counter: torch.Tensor | None = None,
    collapse_timing: str = "current",
    previous_density: torch.Tensor | None = None,
    skip_zero_inputs: bool = False,
    check_finite: bool | None = None,
) -> torch.Tensor:
    """Threshold-pruned linear layer: ``x [..., in] -> [..., out]``.

    Output unit ``i`` is active while ``mean_j |weight[i, j]| > threshold[i]``; pruned units
    output ``bias[i]`` (or 0) and, on the ``compact`` and ``triton`` backends, cost nothing in
    the forward pass.

    Args:
        weight: ``[out, in]``; threshold: ``[out]``; bias: ``[out]`` or None (never masked).
        backend: ``"auto"`` (``"compact"`` for CPU tensors, ``"triton"`` for CUDA tensors of
            fp32 / fp16 / bf16, else ``"reference"``), ``"compact"`` (plain PyTorch that
            gathers the active units; synchronises with the device, any device), ``"triton"``,
            or ``"reference"`` (masked dense: the oracle of the tests).
        backward_mode: what pruned units receive in the backward pass. ``"exact"``: the
            straight-through gradient of the spec (costs their dense work; on ``compact`` only
            for pruned units whose output gradient is not zero). ``"skip"``: none,
            ``dtau_i = 0`` and ``dW_i = 0``. ``"sample"``: ``r_i`` estimated from
            ``sample_fraction`` of the batch rows. Active units are exact in every mode.
        collapse_density: if set and the layer's density is ``<=`` it, ``threshold`` is reset to
            0 in place (before the forward; the reset mask is used) and ``collapse_counter``
            (an integer scalar tensor) is incremented. No host synchronisation.
        collapse_timing: ``"current"``: the guard tests this forward's density.
            ``"previous"``: it tests ``previous_density``, the density of the previous guarded
            forward (the SpaFL authors' layers), which it then overwrites with this forward's.
        previous_density: a one-element floating tensor on the threshold's device, read and
            written in place (the layers keep it as the ``previous_density`` buffer); needed by
            ``"previous"``; when given, every guarded forward (either timing) stores its density.
        skip_zero_inputs: drop input features that are 0 for every row of ``x`` from the
            products (``compact`` backend; the others ignore it). The input gradient is then 0
            at those features; see :class:`spafl.ThresholdLinear` for when that is exact.
        check_finite: reject NaN / inf thresholds. Default: on for CPU tensors, off for CUDA
            tensors (the check would synchronise with the host every call).
    """
    options = options_of(backend, backward_mode, sample_fraction, collapse_density, collapse_timing,
                         skip_zero_inputs, check_finite)
    _validate_guard(options, collapse_counter, previous_density, threshold, "threshold_linear")
    return linear_call(x, weight, threshold, bias, options, collapse_counter, previous_density)


def threshold_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    threshold: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    *,
    backend: str = "auto",
    backward_mode: str = "exact",
    sample_fraction: float = 0.125,
    collapse_density: float | None = None,
    collapse_counter: torch.Tensor | None = None,
    collapse_timing: str = "current",
    previous_density: torch.Tensor | None = None,
    skip_zero_inputs: bool = False,
    check_finite: bool | None = None,
) -> torch.Tensor:
    """Threshold-pruned 2-D convolution: ``x [B, C, H, W]`` (or unbatched ``[C, H, W]``) ->
    ``[B, F, Ho, Wo]``, with the options of ``F.conv2d``.

    Filter ``i`` is active while the mean |w| of ``weight[i]`` (over ``C / groups * KH * KW``)
    is ``> threshold[i]``; a pruned filter's output channel is ``bias[i]`` (or 0). On the
    ``compact`` and ``triton`` backends pruned filters cost nothing in the forward pass and,
    except for the threshold gradient of ``exact`` / ``sample`` modes, in the backward pass.

    Args:
        weight: ``[F, C / groups, KH, KW]``; threshold: ``[F]``; bias: ``[F]`` or None.
        stride, dilation: int or pair; padding: int, pair, ``"same"`` or ``"valid"``.
        groups: grouped and depthwise convolutions run on ``compact`` (the groups holding
            active filters, each padded to the widest; see :mod:`spafl.compact`) and
            ``reference``; ``backend="triton"`` takes ``groups == 1`` only (``"auto"`` on CUDA
            falls back to ``"reference"`` for them).
        backend, backward_mode, sample_fraction, collapse_density, collapse_counter,
        collapse_timing, previous_density, check_finite: as for :func:`threshold_linear`;
        ``sample`` mode samples output pixels.
        skip_zero_inputs: drop input channels that are 0 over the whole batch (``compact``,
            ``groups == 1``; ignored otherwise). See :class:`spafl.ThresholdConv2d`.

    Channels-last inputs and weights give a channels-last output, as with ``F.conv2d``. On
    ``triton``, 1x1 convolutions without stride or padding on a channels-last input run through
    the Linear kernels.
    """
    options = options_of(backend, backward_mode, sample_fraction, collapse_density, collapse_timing,
                         skip_zero_inputs, check_finite)
    geometry = conv_geometry(_kernel_of(weight), stride, padding, dilation, groups)
    _validate_guard(options, collapse_counter, previous_density, threshold, "threshold_conv2d")
    return conv2d_call(x, weight, threshold, bias, geometry, options, collapse_counter, previous_density)


def _kernel_of(weight):
    # (the weight's own checks, with their messages, come in conv2d_call)
    return tuple(weight.shape[2:]) if isinstance(weight, torch.Tensor) and weight.dim() == 4 else (1, 1)


def conv2d_call(x, weight, threshold, bias, geometry: ConvGeometry, options: ThresholdOptions, counter=None,
                previous_density=None, precomputed=None):
    """:func:`threshold_conv2d` with its geometry and options already built (what the layers
    call): checks the tensors, runs the guard and the forward of the routed backend.
    ``precomputed``: see :func:`_guarded_row_mask` (eager mode only)."""
    check_layer_inputs(x, weight, threshold, bias, op="threshold_conv2d", weight_dim=4, x_min_dim=3)
    if x.dim() not in (3, 4):
        raise ValueError(f"threshold_conv2d: x must be [B, C, H, W] or [C, H, W], got shape {tuple(x.shape)}")
    groups = geometry.groups
    filters, chans_per_group = weight.shape[:2]
    if tuple(weight.shape[2:]) != geometry.kernel:
        geometry = conv_geometry(tuple(weight.shape[2:]), geometry.stride, geometry.padding, geometry.dilation,
                                 groups)
    if filters % groups:
        raise ValueError(f"threshold_conv2d: {filters} filters (out_channels) are not divisible by groups={groups}")
    if x.shape[-3] != chans_per_group * groups:
        raise ValueError(
            f"threshold_conv2d: x has shape {tuple(x.shape)} with {x.shape[-3]} channels, but weight "
            f"{tuple(weight.shape)} with groups={groups} expects {chans_per_group * groups}"
        )
    out_h, out_w = geometry.output_size(x.shape[-2], x.shape[-1])
    if out_h < 1 or out_w < 1:
        raise ValueError(
            f"threshold_conv2d: input of spatial size {tuple(x.shape[-2:])} is too small for kernel "
            f"{geometry.kernel} with dilation {geometry.dilation} and padding {geometry.padding}"
        )
    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
    x_op, w_op, b_op = _autocast(x, weight, bias)
    where = route(options.backend, weight, w_op.dtype, groups)
    check = _check_finite(options, threshold)
    if torch.compiler.is_compiling():
        mask, perm, count = _traced_row_mask(weight, threshold, where, options, counter, previous_density, check)
        y = torch.ops.spafl.threshold_conv2d(
            x_op, w_op, threshold, b_op, mask, perm, count, list(geometry.stride), list(geometry.pad_begin),
            list(geometry.pad_end), list(geometry.dilation), groups, where.compute, options.key,
        )
    else:
        row_mask = _guarded_row_mask(weight, threshold, where.mask, where.with_perm, options, counter,
                                     previous_density, check, precomputed)
        with _operands_already_cast(x.device.type):
            y = _run(ThresholdConv2dFunction, x_op, w_op, threshold, b_op, row_mask, geometry, where.compute, options)
    return y.squeeze(0) if unbatched else y
