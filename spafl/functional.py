"""The functional API of the threshold layers and the one path of each op.

:func:`linear_call` / :func:`conv2d_call` take the tensors, the layer's
:class:`~spafl._options.ThresholdOptions` and the guard's buffers; the layers call them directly,
the functional API after building the options from its keyword arguments. The route (which
backend computes the mask and the products) comes from :func:`spafl._checks.route`, the one
dispatch point; the row mask and the collapse guard from :mod:`spafl._guard`; the forward and
the backward of each backend are the methods of its entry in
:data:`spafl._functions.IMPLEMENTATIONS`, run by the autograd Functions there in eager mode and
by the ``torch.library`` operators of :mod:`spafl._ops` under ``torch.compile``;
``torch.jit.trace`` records a tensor-only forward (:func:`_jit_traced`).
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import reference
from ._checks import (
    Route,
    check_finite_values,
    check_layer_inputs,
    check_weight_and_threshold,
    route,
)
from ._conv import ConvGeometry, conv_geometry
from ._functions import (
    _C_APPLY,
    IMPLEMENTATIONS,
    PreparedLinearFunction,
    PreparedTriton,
    ThresholdConv2dFunction,
    ThresholdLinearFunction,
    _autocast_enabled,
    _bare,
    _run,
    _unwrap_if_dead,
)
from ._guard import _check_finite, _guarded_row_mask, _kernels, _row_mask
from ._options import ThresholdOptions, options_of
from ._rowmask import RowMask

_PREPARED_APPLY = _C_APPLY[PreparedLinearFunction]


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


# ----------------------------------------------------------------------------- implementations


def _autocast(x, weight, bias):
    """Under ``torch.autocast`` (the caller has checked that it is on), run in the autocast dtype
    like ``F.linear`` does; thresholds and the master weights stay in their own dtype (gradients
    flow back through the casts)."""
    dtype = torch.get_autocast_dtype(x.device.type)
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


def linear_call(x, weight, threshold, bias, options: ThresholdOptions, counter=None, previous_density=None,
                precomputed=None, cache=None):
    """:func:`threshold_linear` with its options already built (what the layers call): checks
    the tensors, runs the guard and the forward of the routed backend. ``precomputed`` and
    ``cache``: see :func:`spafl._guard._guarded_row_mask` (eager mode only)."""
    if torch.jit.is_tracing():
        with _shape_checks_in_trace():
            return _linear_call(x, weight, threshold, bias, options, counter, previous_density)
    return _linear_call(x, weight, threshold, bias, options, counter, previous_density, precomputed, cache)


def linear_kept(x, weight, threshold, bias, options: ThresholdOptions, previous_density, cache):
    """The common eager call of a layer whose last forward's mask is still current (see
    :class:`spafl._guard.HostMaskCache`), or None when this call is not that one: a 2-D CPU ``x``
    of the weight's dtype, no ``torch.jit`` trace, ``torch.compile``, functorch transform or
    autocast, the mask and the bias well formed. Then it is what :func:`linear_call` computes
    (the route of a kept mask is the compacting backend; the checks that read ``weight`` and
    ``threshold`` passed at the forward that kept it, and they are unchanged since), from the
    layer to the autograd Function in one step: on a small layer the dispatch of the general
    path costs several times its product."""
    dtype = weight.dtype
    if (torch._C._is_tracing() or x.__class__ is not torch.Tensor or not x.is_cpu or x.dtype != dtype
            or x.dim() != 2 or x.shape[1] != weight.shape[1] or torch.compiler.is_compiling()
            or torch.is_autocast_enabled("cpu") or torch._C._are_functorch_transforms_active()):
        return None
    if bias is not None and (bias.dtype != dtype or not bias.is_cpu or bias.shape != threshold.shape):
        return None
    row_mask = cache.get(weight, threshold, "compact", options, previous_density)
    if row_mask is None:
        return None
    return _kept_forward(x, weight, threshold, bias, row_mask, "compact", options)


def _kept_forward(x, weight, threshold, bias, row_mask: RowMask, route: str, options: ThresholdOptions):
    """The kept calls' last step: the autograd Function when a gradient is wanted, else the
    route's forward (the Triton route's on the mask without its scores and guard flag)."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or threshold.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        if route.__class__ is PreparedTriton:
            return _PREPARED_APPLY(_unwrap_if_dead(x), _unwrap_if_dead(weight), _unwrap_if_dead(threshold),
                                   None if bias is None else _unwrap_if_dead(bias), row_mask, route, options)
        return _C_APPLY[ThresholdLinearFunction](_unwrap_if_dead(x), _unwrap_if_dead(weight),
                                                 _unwrap_if_dead(threshold),
                                                 None if bias is None else _unwrap_if_dead(bias), row_mask, route,
                                                 options)
    if route.__class__ is PreparedTriton:
        return route.linear_forward(x, weight, bias, row_mask, options)[0]
    return IMPLEMENTATIONS[route].linear_forward(x, weight, bias, _bare(row_mask) if route == "triton" else row_mask,
                                                 options)[0]


class DeviceCall(NamedTuple):
    """What a layer's eager call on the Triton path established about its tensors and options
    (:func:`device_call_of`), for :func:`linear_device_kept`: the tensors themselves, their
    layouts (data pointer, dtype, shape, strides; the aliases in ``held`` keep the storages, so
    that no later tensor can take their addresses) and the guard's settings."""

    options: ThresholdOptions
    tensors: tuple  # (weight, threshold, bias, counter, previous_density)
    stamped: tuple  # the same, None as _ABSENT
    stamp: tuple  # their layouts (_stamp)
    held: tuple
    tau: torch.Tensor  # a detached alias of the thresholds, which the guard's launch writes
    device: torch.device
    dtype: torch.dtype  # the weight's
    fan_in: int
    guard: float | None
    previous: bool
    prepared: dict  # (x's rows, strides, 16-byte alignment, settings, thread, stream) -> PreparedTriton | False
    autocast: str | None  # the device type, where it has autocast
    settings: Callable[[], tuple]  # the launchers' settings (kernels' launch_settings)
    stream: Callable[[], object]  # this thread and the device's current stream (threshold_mask.stream_key)


def _stamp(w, t, b, c, p):
    """The layouts (data pointer, dtype, shape, strides) of a kept call's five tensors, ``None``
    ones given as :data:`_ABSENT`: one flat tuple, built and compared at every kept call."""
    return (w.data_ptr(), w.dtype, w.shape, w.stride(), t.data_ptr(), t.dtype, t.shape, t.stride(),
            b.data_ptr(), b.dtype, b.shape, b.stride(), c.data_ptr(), c.dtype, c.shape, c.stride(),
            p.data_ptr(), p.dtype, p.shape, p.stride())


_ABSENT = torch.empty(0)  # (in a kept call's stamped tensors, for a bias, counter or density that is None)


def device_call_of(x, weight, threshold, bias, options: ThresholdOptions, counter, previous_density):
    """The :class:`DeviceCall` of a layer's call that :func:`linear_call` just ran, or None when
    its next calls cannot take :func:`linear_device_kept`: that needs the Triton kernels for the
    mask and the products (no cast), no finiteness check, a contiguous 2-D weight, and the guard's
    writes in the mask's launch (:func:`spafl.kernels.threshold_mask.writes_guard`)."""
    if (options.backend not in ("triton", "auto") or torch.compiler.is_compiling() or torch._C._is_tracing()
            or weight.dim() != 2 or not weight.is_contiguous() or threshold.dim() != 1):
        return None
    where = route(options.backend, weight)
    if where.mask != "triton" or where.compute != "triton" or _check_finite(options, threshold):
        return None
    guard = options.collapse_density
    if guard is not None and not _kernels().threshold_mask.writes_guard(threshold, previous_density, counter):
        return None
    tensors = (weight, threshold, bias, counter, previous_density)
    stamped = tuple(_ABSENT if t is None else t for t in tensors)
    kernels, device = _kernels(), weight.device
    stream = functools.partial(kernels.threshold_mask.stream_key, device, device.type == "cuda")
    return DeviceCall(options, tensors, stamped, _stamp(*stamped),
                      tuple(None if t is None else t.detach() for t in tensors), threshold.detach(), device,
                      weight.dtype, weight.shape[1], guard, options.collapse_timing == "previous", {},
                      device.type if torch.amp.is_autocast_available(device.type) else None,
                      kernels._config.launch_settings, stream)


def linear_device_kept(x, weight, threshold, bias, options: ThresholdOptions, counter, previous_density,
                       call: DeviceCall):
    """A layer's common call on the Triton path in one step, or None when this call is not
    that one: the same tensors and options as the call that made ``call`` (same objects, same
    layouts), a 2-D ``x`` of the weight's dtype and device, no ``torch.jit`` trace,
    ``torch.compile``, functorch transform or autocast. Then the checks of the tensors, the route
    and the guard's settings of :func:`linear_call` would find what they found then; this runs
    what it runs after them: the row mask (with the guard's writes in its launch) and the
    autograd Function."""
    tensors = call.tensors
    if (call.options is not options or tensors[0] is not weight or tensors[1] is not threshold
            or tensors[2] is not bias or tensors[3] is not counter or tensors[4] is not previous_density):
        return None
    shape = x.shape
    # (the weight's dtype and fan-in as the call found them: the stamp below checks they still are)
    if (x.__class__ is not torch.Tensor or x.dtype != call.dtype or len(shape) != 2 or shape[1] != call.fan_in
            or x.device != call.device or torch._C._is_tracing() or torch.compiler.is_compiling()
            or torch._C._are_functorch_transforms_active()
            or (call.autocast is not None and torch.is_autocast_enabled(call.autocast))):
        return None
    if _stamp(*call.stamped) != call.stamp:  # (the same objects as ``tensors``: checked above)
        return None
    key = (shape[0], x.stride(), x.data_ptr() % 16 == 0, call.settings(), call.stream())
    impl = call.prepared.get(key)
    if impl is None:
        impl = call.prepared[key] = _prepared(call, x, weight, bias, options, counter, previous_density)
    if impl is False:
        masks = _kernels().threshold_mask
        if call.guard is None:
            row_mask = masks.threshold_row_mask(weight, call.tau)
        else:
            row_mask = masks.guarded_row_mask(weight, call.tau, call.guard, call.previous, previous_density, counter)
        return _kept_forward(x, weight, threshold, bias, row_mask, "triton", options)
    return _kept_forward(x, weight, threshold, bias, impl.row_mask(), impl, options)


def _prepared(call: DeviceCall, x, weight, bias, options: ThresholdOptions, counter, previous_density):
    """The :class:`PreparedTriton` of ``call`` for ``x``'s layout, or False where its launches
    cannot be prepared (a layout the launchers copy): the launchers run those calls."""
    if len(call.prepared) >= 8:  # (a caller cycling through batch sizes must not grow it forever)
        call.prepared.clear()
    try:
        return PreparedTriton(x, weight, call.tau, bias, options, call.guard, call.previous, previous_density,
                              counter)
    except ValueError:
        return False


@contextlib.contextmanager
def _shape_checks_in_trace():
    """While ``torch.jit.trace`` records a call: silence its warnings about the Python decisions
    left, which read shapes only (the traced forward, :func:`_jit_traced`, has no other)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Converting a tensor to a Python",
                                category=torch.jit.TracerWarning)
        yield


def _linear_call(x, weight, threshold, bias, options: ThresholdOptions, counter, previous_density, precomputed=None,
                 cache=None):
    check_layer_inputs(x, weight, threshold, bias, op="threshold_linear", weight_dim=2, x_min_dim=1)
    n_out, fan_in = weight.shape
    if x.shape[-1] != fan_in:
        raise ValueError(
            f"threshold_linear: x has shape {tuple(x.shape)} with {x.shape[-1]} features in its last "
            f"dimension, but weight {tuple(weight.shape)} expects {fan_in}"
        )
    # The mask comes from the master weight, before any autocast cast, so that it agrees with
    # `layer.mask`, `density` and `to_dense()`; the GEMMs run on the (possibly cast) operands.
    autocast = _autocast_enabled(x.device.type)
    x_op, w_op, b_op = _autocast(x, weight, bias) if autocast else (x, weight, bias)
    where = route(options.backend, weight, w_op.dtype)
    check = _check_finite(options, threshold)
    x2d = x_op if x_op.dim() == 2 else x_op.reshape(-1, fan_in)
    if torch.jit.is_tracing():
        y = _jit_traced(x2d, w_op, weight, threshold, b_op, options, counter, previous_density, F.linear)
    elif torch.compiler.is_compiling():
        mask, perm, count = _traced_row_mask(weight, threshold, where, options, counter, previous_density, check)
        y = torch.ops.spafl.threshold_linear(x2d, w_op, threshold, b_op, mask, perm, count, where.compute,
                                             options.key)
    else:
        row_mask = _guarded_row_mask(weight, threshold, where.mask, where.with_perm, options, counter,
                                     previous_density, check, precomputed, cache, where.compute == "triton")
        if autocast:
            with torch.autocast(x.device.type, enabled=False):
                y = _run(ThresholdLinearFunction, x2d, w_op, threshold, b_op, row_mask, where.compute, options)
        else:
            y = _run(ThresholdLinearFunction, x2d, w_op, threshold, b_op, row_mask, where.compute, options)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], n_out)


def _jit_traced(x, w_op, weight, threshold, bias, options: ThresholdOptions, counter, previous_density, product):
    """The forward as ``torch.jit.trace`` records it: tensor operations only, so that the trace
    recomputes the mask (and runs the collapse guard, device-side) from the weights at every
    call instead of freezing one call's decisions, and a traced model saves and loads without
    Python. The masked dense product (the reference), with ``W_hat`` built so that autograd
    gives the straight-through gradients of ``"exact"`` mode whatever ``backward_mode`` says;
    no finiteness check (it is a host decision, which a trace cannot hold)."""
    mask = _guarded_row_mask(weight, threshold, "reference", True, options.replace(check_finite=False), counter,
                             previous_density).mask
    compute = reference._compute_dtype(x.dtype)
    w = w_op.to(compute)
    # d - d.detach() is 0 in value and carries the gradient of d = s - tau (s: the row's mean
    # |w|): then dW = m G + sign(W) r / fan_in and dtau = -r with r = sum_j G_ij W_ij (the spec).
    d = w.abs().flatten(1).mean(1) - threshold.to(compute)
    through = w * (d - d.detach()).view((-1,) + (1,) * (w.dim() - 1))
    y = product(x.to(compute), reference.masked_weight(w, mask) + through, None if bias is None else bias.to(compute))
    return y.to(x.dtype)


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
                previous_density=None, precomputed=None, cache=None):
    """:func:`threshold_conv2d` with its geometry and options already built (what the layers
    call): checks the tensors, runs the guard and the forward of the routed backend.
    ``precomputed`` and ``cache``: see :func:`spafl._guard._guarded_row_mask` (eager mode only)."""
    if torch.jit.is_tracing():
        with _shape_checks_in_trace():
            return _conv2d_call(x, weight, threshold, bias, geometry, options, counter, previous_density)
    return _conv2d_call(x, weight, threshold, bias, geometry, options, counter, previous_density, precomputed,
                        cache)


def _conv2d_call(x, weight, threshold, bias, geometry: ConvGeometry, options: ThresholdOptions, counter,
                 previous_density, precomputed=None, cache=None):
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
    autocast = _autocast_enabled(x.device.type)
    x_op, w_op, b_op = _autocast(x, weight, bias) if autocast else (x, weight, bias)
    where = route(options.backend, weight, w_op.dtype, groups)
    check = _check_finite(options, threshold)
    if torch.jit.is_tracing():
        y = _jit_traced(x_op, w_op, weight, threshold, b_op, options, counter, previous_density,
                        lambda x, w, b: reference._conv2d(x, w, b, geometry))
    elif torch.compiler.is_compiling():
        mask, perm, count = _traced_row_mask(weight, threshold, where, options, counter, previous_density, check)
        y = torch.ops.spafl.threshold_conv2d(
            x_op, w_op, threshold, b_op, mask, perm, count, list(geometry.stride), list(geometry.pad_begin),
            list(geometry.pad_end), list(geometry.dilation), groups, where.compute, options.key,
        )
    else:
        row_mask = _guarded_row_mask(weight, threshold, where.mask, where.with_perm, options, counter,
                                     previous_density, check, precomputed, cache, where.compute == "triton")
        if autocast:
            with torch.autocast(x.device.type, enabled=False):
                y = _run(ThresholdConv2dFunction, x_op, w_op, threshold, b_op, row_mask, geometry, where.compute,
                         options)
        else:
            y = _run(ThresholdConv2dFunction, x_op, w_op, threshold, b_op, row_mask, geometry, where.compute, options)
    return y.squeeze(0) if unbatched else y
