"""The backends' forward and backward (``IMPLEMENTATIONS``) and the autograd Functions that run
them in eager mode.

Each resolved backend name (``Route.compute`` of :func:`spafl._checks.route`) has an entry in
``IMPLEMENTATIONS`` with ``linear_forward``, ``linear_backward``, ``conv2d_forward`` and
``conv2d_backward``: run by the autograd Functions here in eager mode, by the
``torch.library`` operators of :mod:`spafl._ops` under ``torch.compile``, and by the compact
chains of :mod:`spafl.chain` (which pass an implementation object of their own).
"""

from __future__ import annotations

import contextlib
import weakref
from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable
from torch.utils.weak import WeakIdKeyDictionary

from . import compact, compact_conv, reference
from ._conv import ConvGeometry
from ._guard import _kernels
from ._options import ThresholdOptions
from ._rowmask import RowMask


def _cast_gradients(grads, need_dx: bool, weight_dtype: torch.dtype, threshold_dtype: torch.dtype):
    """The compute-dtype ``(dx, dw, dtau, db)`` of the plain-PyTorch backends in the dtypes of
    the inputs."""
    dx, dw, dtau, db = grads
    if isinstance(dw, compact.CompactGrad):
        dw = dw._replace(values=compact._cast(dw.values, weight_dtype))
    else:
        dw = compact._cast(dw, weight_dtype)
    return (
        compact._cast(dx, weight_dtype) if need_dx else None,
        dw,
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

    def linear_backward(self, grad_y2d, x2d, weight, row_mask, state, options, need_dx, has_bias, threshold_dtype,
                        rows_only=False):
        grads = compact.linear_backward(
            grad_y2d, x2d, weight, row_mask.mask, state, has_bias=has_bias, need_dx=need_dx,
            mode=_mode(options, x2d.shape[0]), sample_fraction=options.sample_fraction, rows_only=rows_only,
        )
        return _cast_gradients(grads, need_dx, weight.dtype, threshold_dtype)

    def conv2d_forward(self, x, weight, bias, row_mask, geometry, options):
        return compact_conv.conv2d_forward(x, weight, bias, row_mask.mask, geometry, self._skip(options),
                                      x_index=self.x_index, compact_output=self.compact_output, units=row_mask.units)

    def conv2d_backward(self, grad_y, x, weight, row_mask, geometry, state, options, need_dx, has_bias,
                        threshold_dtype, rows_only=False):
        grads = compact_conv.conv2d_backward(
            grad_y, x, weight, row_mask.mask, geometry, state, has_bias=has_bias, need_dx=need_dx,
            mode=_mode(options, x.shape[0]), sample_fraction=options.sample_fraction, rows_only=rows_only,
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
    def linear_forward(x2d, weight, bias, row_mask, options, keep_z=False):
        # keep_z (a recorded skip- or exact-mode call): the products go to the backward, which
        # then needs no second pass over the weight gradient (state: fp32 [M, N]). Exact mode
        # computes the pruned units' too: its one dense-shaped GEMM, for their r.
        z = None
        exact = options.backward_mode == "exact"
        if keep_z and (exact or options.backward_mode == "skip"):
            z = torch.empty((x2d.shape[0], weight.shape[0]), dtype=torch.float32, device=x2d.device)
        return _kernels().threshold_linear_fwd(x2d, weight, bias, row_mask, z_out=z, z_all=exact), z

    @staticmethod
    def linear_backward(grad_y2d, x2d, weight, row_mask, state, options, need_dx, has_bias, threshold_dtype,
                        rows_only=False, prepared=None):
        # prepared: a PreparedBackward of these operands' layouts (PreparedTriton's), same launches
        r = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device) if rows_only else None
        db = torch.empty(weight.shape[0], dtype=weight.dtype, device=weight.device) if has_bias else None
        mode = _mode(options, x2d.shape[0])
        if prepared is not None:
            dx, dw, dtau = prepared(grad_y2d, x2d, weight, row_mask, state, r, db)
        else:
            dx, dw, dtau = _kernels().threshold_linear_bwd(
                grad_y2d, x2d, weight, row_mask, mode=mode,
                sample_fraction=options.sample_fraction, need_dx=need_dx, threshold_dtype=threshold_dtype, r_out=r,
                z=state, db_out=db,
            )
        if rows_only:
            # (from the forward's products the GEMM leaves every row's sign term to the step)
            dw = MaskedGrad(dw, row_mask.mask, r, weight, state is not None and mode != "sample")
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
                        threshold_dtype, rows_only=False):
        r = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device) if rows_only else None
        kwargs = {"mode": _mode(options, x.shape[0]), "sample_fraction": options.sample_fraction,
                  "need_dx": need_dx, "threshold_dtype": threshold_dtype, "r_out": r}
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
            db = grad_y.sum(dim=(0, 2, 3), dtype=torch.float32).to(weight.dtype) if has_bias else None
        else:
            # The bias gradient comes from the launch that compacts dY (it reads dY anyway).
            db = torch.empty(weight.shape[0], dtype=weight.dtype, device=weight.device) if has_bias else None
            dx, dw, dtau = _kernels().threshold_conv2d_bwd(grad_y, x, weight, row_mask, geometry, db_out=db, **kwargs)
        if rows_only:
            dw = MaskedGrad(dw, row_mask.mask, r, weight)
        return dx, dw, dtau, db


def _operands_already_cast(device_type: str):
    """Autocast off inside the forward: :func:`_autocast` has cast the operands already, and the
    plain-PyTorch backends compute in fp32 (fp64) and round once, like the backward (which
    autocast does not reach)."""
    if _autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _autocast_enabled(device_type: str) -> bool:
    # Devices without autocast (e.g. "meta", for shape-only runs) raise in is_autocast_enabled;
    # whether a device type has autocast is asked once (a Python call every forward otherwise).
    available = _AUTOCAST_AVAILABLE.get(device_type)
    if available is None:
        available = _AUTOCAST_AVAILABLE[device_type] = torch.amp.is_autocast_available(device_type)
    return available and torch.is_autocast_enabled(device_type)


# (a dict rather than functools.lru_cache: dynamo traces through it without a warning)
_AUTOCAST_AVAILABLE: dict[str, bool] = {}


# The registry: where a resolved backend name (``Route.compute``) becomes code.
_COMPACT = _Compact()
class PreparedTriton:
    """The Triton implementation for the kept calls of one layer (``spafl.functional.DeviceCall``)
    on one input layout, thread and stream: the row mask, the forward and the backward launches
    prepared once (``spafl.kernels``' ``Prepared*``), the same launches with the same arguments
    as :class:`_Triton`'s. The kept call checks that its tensors, their layouts and the launch
    settings are those it was prepared for; a backward of another ``grad_y`` layout or mode
    takes :class:`_Triton`'s."""

    __slots__ = ("row_mask", "recorded_forward", "_forwards", "_backwards", "_cuda")

    def __init__(self, x2d, weight, tau, bias, options: ThresholdOptions, guard: float | None, previous: bool,
                 previous_density, counter):
        kernels = _kernels()
        self.row_mask = kernels.threshold_mask.PreparedRowMask(weight, tau, guard, previous, previous_density,
                                                               counter)
        # The recorded calls' forward (keep_z, as _Triton's) and the others'.
        exact = options.backward_mode == "exact"
        store_z = exact or options.backward_mode == "skip"
        prepare = kernels.threshold_linear.PreparedForward
        self._forwards = (prepare(x2d, weight, bias, store_z=False),
                          prepare(x2d, weight, bias, store_z=store_z, z_all=exact))
        self.recorded_forward = self._forwards[True]  # (PreparedLinearFunction's)
        self._backwards, self._cuda = {}, weight.device.type == "cuda"

    def linear_forward(self, x2d, weight, bias, row_mask, options, keep_z=False):
        return self._forwards[keep_z](x2d, weight, bias, row_mask)

    def linear_backward(self, grad_y2d, x2d, weight, row_mask, state, options, need_dx, has_bias, threshold_dtype,
                        rows_only=False):
        prepared = None
        if state is not None:
            kernels = _kernels()
            key = (grad_y2d.stride(), grad_y2d.dtype, need_dx, has_bias, rows_only, threshold_dtype,
                   kernels._config.launch_settings(), kernels.threshold_mask.stream_key(grad_y2d.device, self._cuda))
            prepared = self._backwards.get(key)
            if prepared is None:
                if len(self._backwards) >= 8:
                    self._backwards.clear()
                try:
                    prepared = kernels.threshold_linear.PreparedBackward(
                        grad_y2d, x2d, weight, mode=_mode(options, x2d.shape[0]),
                        sample_fraction=options.sample_fraction, need_dx=need_dx, threshold_dtype=threshold_dtype,
                        rows=rows_only, has_db=has_bias)
                except ValueError:  # (a layout or mode the launcher converts: it runs the call)
                    prepared = False
                self._backwards[key] = prepared
        return _Triton.linear_backward(grad_y2d, x2d, weight, row_mask, state, options, need_dx, has_bias,
                                       threshold_dtype, rows_only, prepared or None)


def _triton(impl) -> bool:
    return impl is _Triton or impl.__class__ is PreparedTriton


IMPLEMENTATIONS = {"reference": _Reference, "compact": _COMPACT, "triton": _Triton}


# ----------------------------------------------------------------------------- compact weight gradients

# weight Parameter -> its GradSink, for the weights of a fused optimizer that asked for compact
# gradients (spafl.optim, compact_grads=True). Keyed by identity, like spafl.layers' owners.
_GRAD_SINKS = WeakIdKeyDictionary()

# The weight dtypes whose compact gradient a fused step applies with torch.optim's exact bits (the
# 16-bit elementwise kernels round differently on row subsets: those weights get full gradients).
_ROWS_DTYPES = (torch.float32, torch.float64)


class MaskedGrad(NamedTuple):
    """A weight's gradient from the Triton backward's ``rows_only`` pass: ``dw`` holds the rows
    where ``mask`` is set (the others are unwritten), and every other row ``i`` is
    ``sign(W_i) r_i / fan_in`` (``r`` fp32; 0 in skip mode), which the fused step forms as it
    reads ``W``. ``lacks_term``: the rows of ``dw`` hold ``G`` alone and are owed that term
    too (the Linear GEMM that takes the forward's products reads no ``W``)."""

    dw: torch.Tensor
    mask: torch.Tensor
    r: torch.Tensor
    weight: torch.Tensor
    lacks_term: bool = False

    def dense(self) -> torch.Tensor:
        """The full gradient (the backward's without the opt-in; from the weight as it is now)."""
        w = self.weight.detach()
        w2 = w.reshape(w.shape[0], -1)
        owed = torch.sign(w2.float()) * (self.r / w2.shape[1])[:, None]
        rows = self.dw.reshape(w2.shape)
        if self.lacks_term:
            # (as the fused step forms it: G, 0 where pruned, plus the term, rounded once)
            rows = torch.where(self.mask.view(-1, 1), rows, 0).float()
            return (rows + owed).to(w.dtype).view(w.shape)
        owed = (torch.zeros((), dtype=torch.float32, device=w.device) + owed).to(w.dtype)
        return torch.where(self.mask.view(-1, 1), rows, owed).view(w.shape)


class GradSink:
    """Where the compact backend's backward leaves a weight's gradient as rows
    (:class:`spafl.compact.CompactGrad`) instead of writing ``weight.grad``, for the fused
    optimizer that consumes it (:mod:`spafl.optim`). ``grad`` is None when nothing is pending."""

    __slots__ = ("param", "grad", "__weakref__")

    def __init__(self, param: torch.Tensor):
        self.param = weakref.ref(param)
        self.grad = None

    def take(self):
        grad, self.grad = self.grad, None
        return grad

    def materialize(self) -> None:
        """Move a pending compact gradient into ``param.grad`` (added to it if there is one)."""
        grad, param = self.take(), self.param()
        if grad is None or param is None:
            return
        dense = grad.dense()
        if param.grad is None:
            param.grad = dense
        else:
            param.grad += dense

    def accepts(self, any_dtype: bool = False) -> bool:
        """Whether this backward may leave its ``dW`` here as rows. A gradient already pending
        (a second backward before the step: accumulation) is moved into ``param.grad`` first, and
        this backward then writes its full ``dW`` too, which autograd adds to it."""
        param = self.param()
        if param is None:
            return False
        if self.grad is not None:
            self.materialize()
        return param.grad is None and (any_dtype or param.dtype in _ROWS_DTYPES)


def grad_sink(weight: torch.Tensor) -> GradSink:
    """The weight's sink, made on first use."""
    sink = _GRAD_SINKS.get(weight)
    if sink is None:
        sink = _GRAD_SINKS[weight] = GradSink(weight)
    return sink


def _sink_for(impl, weight: torch.Tensor):
    # Only the layers' own compact backend and the Triton kernels write rows (a chain's compact
    # instance and the reference write full gradients).
    # (the dictionary's own len() is Python code: its plain mapping tells emptiness in C)
    if not _GRAD_SINKS.data or not (impl is IMPLEMENTATIONS["compact"] or _triton(impl)):
        return None
    return _GRAD_SINKS.get(weight)


def _hand_rows(ctx):
    """Whether this backward leaves ``dW`` in the sink (see :class:`GradSink`). The Triton rows
    are any dtype: the fused kernel forms the pruned rows' gradient with the backward's rounding."""
    sink = ctx.sink
    return sink is not None and ctx.needs_input_grad[1] and sink.accepts(_triton(ctx.impl))


def _keep_rows(ctx, dw):
    """``dw`` for autograd: None when it came as rows (then kept in the sink)."""
    if isinstance(dw, (compact.CompactGrad, MaskedGrad)):
        ctx.sink.grad = dw
        return None
    return dw


def _impl(backend):
    # A name of the registry, or an implementation object (a chain's compact one).
    return IMPLEMENTATIONS[backend] if isinstance(backend, str) else backend


def _needs_graph(x, weight, threshold, bias) -> bool:
    """Whether autograd must record the call: without it (inference, ``no_grad``) the forward
    runs without the autograd Function and its saved state."""
    return torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or threshold.requires_grad
                                        or (bias is not None and bias.requires_grad))


def _bare(row_mask: RowMask) -> RowMask:
    # What the products and the backward read (the scores and the guard's flag stay behind; the
    # guard's pending writes go to the forward's launch).
    if row_mask.score is None and row_mask.collapsed is None:
        return row_mask
    return RowMask(row_mask.mask, row_mask.perm, row_mask.count, None, None, row_mask.units, row_mask.guard)


def _once_differentiable(backward):
    """``torch.autograd.function.once_differentiable`` without its cost in an ordinary backward:
    there grad mode is off already (its ``no_grad`` block changes nothing); a backward that
    records a graph (``create_graph=True``) goes through it, which refuses a second
    differentiation."""
    checked = once_differentiable(backward)

    def run(ctx, *grads):
        if torch.is_grad_enabled():
            return checked(ctx, *grads)
        return backward(ctx, *grads)

    return run


def _own(y: torch.Tensor) -> torch.Tensor:
    """A Function's output that is not a view: autograd forbids in-place changes to a view made
    inside a custom Function (``nn.ReLU(inplace=True)`` after the layer would fail), and the
    Triton 1x1 convolution's output is a permuted view of the GEMM's. The same memory."""
    return y.detach() if y._is_view() else y


class ThresholdLinearFunction(torch.autograd.Function):
    """``y = x @ (W * m)^T + b`` with the straight-through threshold gradient.

    Inputs: ``x [..., in]``, ``weight [out, in]``, ``threshold [out]``, ``bias [out] | None``,
    the :class:`RowMask` of :func:`threshold_row_mask`, the backend (a key of
    ``IMPLEMENTATIONS``, or an implementation object) and the :class:`ThresholdOptions`.
    """

    @staticmethod
    def forward(ctx, x, weight, threshold, bias, row_mask, backend, options):
        impl = _impl(backend)
        x_shape = x.shape
        if x.dim() != 2:
            x = x.reshape(-1, weight.shape[1])
        ctx.sink = sink = _sink_for(impl, weight)
        small = False
        if impl is _COMPACT:  # (the layers' compacting backend: its forward called directly, a hot path)
            y, state = compact.linear_forward(x, weight, bias, row_mask.mask, options.skip_zero_inputs,
                                              units=row_mask.units)
            # The dense small case, decided once here: its backward is one call (_dense_small_backward)
            # and reads neither the mask nor the options.
            small = state.small and sink is None and len(x_shape) == 2 and threshold.dtype == weight.dtype
        elif _triton(impl):
            y, state = impl.linear_forward(x, weight, bias, _bare(row_mask), options, keep_z=True)
        else:
            y, state = impl.linear_forward(x, weight, bias, _bare(row_mask), options)
        ctx.small = small
        if small:
            ctx.save_for_backward(x, weight)
        else:
            ctx.save_for_backward(x, weight, *row_mask[:3])
        ctx.impl, ctx.state, ctx.options, ctx.tau_dtype = impl, state, options, threshold.dtype
        ctx.has_bias, ctx.x_shape = bias is not None, x_shape
        return _own(y if len(x_shape) == 2 else y.reshape(*x_shape[:-1], weight.shape[0]))

    @staticmethod
    def backward(ctx, grad_y):
        if ctx.small and not torch.is_grad_enabled():  # (what _backward runs for it, without the route)
            return ThresholdLinearFunction._small_backward(ctx, grad_y)
        return ThresholdLinearFunction._backward(ctx, grad_y)

    @staticmethod
    def _small_backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        dx, dw, dtau, db = compact._dense_small_backward(grad_y, x, weight, ctx.state.z, ctx.has_bias,
                                                         ctx.needs_input_grad[0])
        return dx, dw, dtau, db, None, None, None

    @staticmethod
    @_once_differentiable
    def _backward(ctx, grad_y):
        if ctx.small:
            return ThresholdLinearFunction._small_backward(ctx, grad_y)
        x, weight, mask, perm, count = ctx.saved_tensors
        if grad_y.dim() != 2:
            grad_y = grad_y.reshape(-1, weight.shape[0])
        rows = {"rows_only": True} if _hand_rows(ctx) else {}
        dx, dw, dtau, db = ctx.impl.linear_backward(
            grad_y, x, weight, RowMask(mask, perm, count, None), ctx.state, ctx.options,
            ctx.needs_input_grad[0], ctx.has_bias, ctx.tau_dtype, **rows,
        )
        dw = _keep_rows(ctx, dw)
        if dx is not None and len(ctx.x_shape) != 2:
            dx = dx.reshape(ctx.x_shape)
        return dx, dw, dtau, db, None, None, None


class PreparedLinearFunction(ThresholdLinearFunction):
    """:class:`ThresholdLinearFunction` for the layers' kept Triton call (``backend`` a
    :class:`PreparedTriton`, ``x`` 2-D: what ``spafl.functional.linear_device_kept`` checks): its
    prepared forward called directly, without the general forward's dispatch; the same saved
    state and the same backward."""

    @staticmethod
    def forward(ctx, x, weight, threshold, bias, row_mask, backend, options):
        # (the prepared forward reads the mask's perm, count and guard: the row mask as it comes)
        ctx.sink = _GRAD_SINKS.get(weight) if _GRAD_SINKS.data else None
        y, state = backend.recorded_forward(x, weight, bias, row_mask)
        ctx.small = False
        ctx.save_for_backward(x, weight, *row_mask[:3])
        ctx.impl, ctx.state, ctx.options, ctx.tau_dtype = backend, state, options, threshold.dtype
        ctx.has_bias, ctx.x_shape = bias is not None, x.shape
        return y  # (a fresh tensor: the prepared forward allocates it)


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
        ctx.sink = _sink_for(impl, weight)
        ctx.geometry = geometry
        ctx.has_bias = bias is not None
        return _own(y)

    @staticmethod
    @_once_differentiable
    def backward(ctx, grad_y):
        x, weight, mask, perm, count = ctx.saved_tensors
        rows = {"rows_only": True} if _hand_rows(ctx) else {}
        dx, dw, dtau, db = ctx.impl.conv2d_backward(
            grad_y, x, weight, RowMask(mask, perm, count, None), ctx.geometry, ctx.state, ctx.options,
            ctx.needs_input_grad[0], ctx.has_bias, ctx.tau_dtype, **rows,
        )
        dw = _keep_rows(ctx, dw)
        return dx, dw, dtau, db, None, None, None, None


_unwrap_if_dead = torch._C._functorch.unwrap_if_dead


# The autograd Functions' C++ apply (what ``Function.apply`` ends in), bound once.
_C_APPLY = {fn: super(torch.autograd.Function, fn).apply
            for fn in (ThresholdLinearFunction, PreparedLinearFunction, ThresholdConv2dFunction)}


def _run(fn, x, weight, threshold, bias, row_mask, *args):
    """The autograd Function ``fn`` when autograd records the call, else its forward alone."""
    if _needs_graph(x, weight, threshold, bias):
        if torch._C._are_functorch_transforms_active():
            return fn.apply(x, weight, threshold, bias, row_mask, *args)
        # Function.apply less its Python wrapper (a third of the call on a small layer): without
        # functorch transforms the wrapper only unwraps dead functorch wrappers, done here.
        return _C_APPLY[fn](_unwrap_if_dead(x), _unwrap_if_dead(weight), _unwrap_if_dead(threshold),
                            None if bias is None else _unwrap_if_dead(bias), row_mask, *args)
    impl = _impl(args[-2])
    forward = impl.linear_forward if fn is ThresholdLinearFunction else impl.conv2d_forward
    return forward(x, weight, bias, _bare(row_mask), *args[:-2], args[-1])[0]
