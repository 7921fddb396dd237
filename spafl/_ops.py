"""The threshold layers as ``torch.library`` operators: what ``torch.compile`` traces.

Eager calls never come here: :func:`spafl.threshold_linear` and :func:`spafl.threshold_conv2d`
run their autograd Functions directly, without a trip through the dispatcher. While dynamo
traces (``torch.compiler.is_compiling()``), they call these operators instead, so that a
model of threshold layers compiles with ``fullgraph=True`` and no graph break on every backend:

``spafl::row_mask``
    the mask (and, for the Triton kernels, the compact index list and count) after the
    collapse guard, which it runs in place on the thresholds, the reset counter and the
    stored density (declared as mutated inputs), and the finiteness check of the thresholds
    and weights (an exception from inside the operator). Its decisions on the host (CPU
    tensors) stay inside it, where dynamo does not look.
``spafl::threshold_linear`` / ``spafl::threshold_conv2d`` and their ``*_backward``
    the forward and the gradients of one backend (``reference``, ``compact`` or ``triton``:
    a string argument), with ``register_autograd`` tying them together. The compacting
    backend rebuilds its index lists in the backward (the eager Function hands them over from
    the forward; operators return tensors of fixed shapes only), see :func:`_compact_linear_state`.

Every operator has a fake (meta) implementation giving the real outputs' shapes, dtypes and
layouts: the outputs of the real ones are brought to the same layout (contiguous, or
channels-last for convolutions whose input or weight is), so that the two always agree. The
Triton path is a ``custom_op`` around the launchers of ``spafl.kernels`` (opaque to inductor):
``torch.library.triton_op`` would need every launch there written through ``wrap_triton``.
"""

from typing import Optional

import torch

from . import compact, compact_conv
from ._conv import ConvGeometry
from ._functions import IMPLEMENTATIONS, _operands_already_cast, _pointwise_as_linear
from ._guard import _guarded_row_mask
from ._options import from_key
from ._rowmask import RowMask

Tensor = torch.Tensor


def _row_mask_of(mask: Tensor, perm: Tensor, count: Tensor) -> RowMask:
    # Empty perm / count stand for None (operators cannot return None).
    return RowMask(mask, perm if perm.numel() else None, count if count.numel() else None, None)


def _no_list(t: Tensor) -> Tensor:
    return t.new_empty(0, dtype=torch.int32)


# ----------------------------------------------------------------------------- the row mask


@torch.library.custom_op("spafl::row_mask", mutates_args=("threshold", "counter", "previous_density"))
def row_mask(
    weight: Tensor,
    threshold: Tensor,
    counter: Optional[Tensor],  # noqa: UP045 (torch.library reads the annotations)
    previous_density: Optional[Tensor],  # noqa: UP045
    backend: str,
    with_perm: bool,
    options: str,
    check_finite: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(mask [N] bool, perm [N] int32 | [0], count [1] int32 | [0])`` of ``weight [N, ...]``
    after the collapse guard of ``options`` (a ``ThresholdOptions.key``), as the eager forward
    computes them (``perm`` / ``count`` only with ``with_perm``)."""
    rm = _guarded_row_mask(weight, threshold, backend, with_perm, from_key(options), counter, previous_density,
                           check_finite)
    perm = rm.perm if with_perm else _no_list(weight)
    count = rm.count.reshape(1) if with_perm else _no_list(weight)
    return rm.mask, perm, count


@row_mask.register_fake
def _(weight, threshold, counter, previous_density, backend, with_perm, options, check_finite):
    n = weight.shape[0]
    mask = weight.new_empty(n, dtype=torch.bool)
    if not with_perm:
        return mask, _no_list(weight), _no_list(weight)
    return mask, weight.new_empty(n, dtype=torch.int32), weight.new_empty(1, dtype=torch.int32)


# ----------------------------------------------------------------------------- Linear


def _compact_linear_state(x: Tensor, weight: Tensor, mask: Tensor, skip_zero_inputs: bool) -> compact._LinearState:
    """The state :func:`spafl.compact.linear_forward` hands to its backward, rebuilt from the
    forward's inputs without the forward's product (:func:`spafl.compact.linear_state`)."""
    compute = compact._compute_dtype(x.dtype)
    return compact.linear_state(compact._cast(x, compute), compact._cast(weight, compute), mask, skip_zero_inputs)


@torch.library.custom_op("spafl::threshold_linear", mutates_args=())
def threshold_linear(
    x: Tensor,
    weight: Tensor,
    threshold: Tensor,
    bias: Optional[Tensor],  # noqa: UP045
    mask: Tensor,
    perm: Tensor,
    count: Tensor,
    backend: str,
    options: str,
) -> Tensor:
    """``y [M, N]`` for ``x [M, K]``, ``weight [N, K]``: the eager forward of ``backend`` with
    ``options`` (a ``ThresholdOptions.key``; ``threshold`` is here for its gradient only)."""
    with _operands_already_cast(x.device.type):
        y, _ = IMPLEMENTATIONS[backend].linear_forward(x, weight, bias, _row_mask_of(mask, perm, count),
                                                       from_key(options))
    return y.contiguous()


@threshold_linear.register_fake
def _(x, weight, threshold, bias, mask, perm, count, backend, options):
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.custom_op("spafl::threshold_linear_backward", mutates_args=())
def threshold_linear_backward(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    mask: Tensor,
    perm: Tensor,
    count: Tensor,
    backend: str,
    options: str,
    threshold_dtype: torch.dtype,
    need_dx: bool,
    has_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dx [M, K] | [0], dW [N, K], dtau [N], db [N] | [0])``: the eager backward of ``backend``."""
    opts = from_key(options)
    state = _compact_linear_state(x, weight, mask, opts.skip_zero_inputs) if backend == "compact" else None
    dx, dw, dtau, db = IMPLEMENTATIONS[backend].linear_backward(
        grad_y, x, weight, _row_mask_of(mask, perm, count), state, opts, need_dx, has_bias, threshold_dtype
    )
    return (
        dx.contiguous() if need_dx else x.new_empty(0),
        dw.contiguous(),
        dtau.contiguous(),
        db.contiguous() if has_bias else weight.new_empty(0),
    )


@threshold_linear_backward.register_fake
def _(grad_y, x, weight, mask, perm, count, backend, options, threshold_dtype, need_dx, has_bias):
    return (
        x.new_empty(x.shape) if need_dx else x.new_empty(0),
        weight.new_empty(weight.shape),
        weight.new_empty(weight.shape[0], dtype=threshold_dtype),
        weight.new_empty(weight.shape[0]) if has_bias else weight.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    """Both operators' autograd context: the tensors the backward operator reads, and the
    options after them (the threshold's dtype appended: the gradient of tau is in it)."""
    x, weight, threshold, bias, mask, perm, count, *options = inputs
    ctx.save_for_backward(x, weight, mask, perm, count)
    ctx.options = (*options, threshold.dtype)
    ctx.has_bias = bias is not None
    ctx.num_inputs = len(inputs)


def _backward_through(backward_op):
    """The autograd backward of a forward operator whose gradients ``backward_op`` computes:
    gradients of x, weight, threshold and bias, None for every other input."""

    def backward(ctx, grad_y):
        x, weight, mask, perm, count = ctx.saved_tensors
        need_dx = ctx.needs_input_grad[0]
        dx, dw, dtau, db = backward_op(grad_y, x, weight, mask, perm, count, *ctx.options, need_dx, ctx.has_bias)
        return (dx if need_dx else None, dw, dtau, db if ctx.has_bias else None) + (None,) * (ctx.num_inputs - 4)

    return backward


threshold_linear.register_autograd(_backward_through(torch.ops.spafl.threshold_linear_backward),
                                   setup_context=_setup_context)


# ----------------------------------------------------------------------------- Conv2d


def _geometry(weight: Tensor, stride, pad_begin, pad_end, dilation, groups: int) -> ConvGeometry:
    pad_begin, pad_end = tuple(pad_begin), tuple(pad_end)
    # The padding spec is informational here: pad_begin / pad_end are what the code uses, and
    # only padding="same" makes them differ.
    padding = pad_begin if pad_begin == pad_end else "same"
    return ConvGeometry(tuple(weight.shape[2:]), tuple(stride), padding, tuple(dilation), groups, pad_begin, pad_end)


def _conv_format(x: Tensor, weight: Tensor) -> torch.memory_format:
    """The layout of a convolution's output and input gradient: channels-last when the input or
    the weight is (the rule of the compacting backend and of the Triton kernels)."""
    return compact_conv._conv_format(x, weight)


def _in_format(t: Tensor, memory_format: torch.memory_format) -> Tensor:
    return t if t.is_contiguous(memory_format=memory_format) else t.contiguous(memory_format=memory_format)


def _compact_conv2d_state(x: Tensor, weight: Tensor, mask: Tensor, geometry: ConvGeometry,
                          skip_zero_inputs: bool) -> compact_conv._ConvState:
    """The state :func:`spafl.compact_conv.conv2d_forward` hands to its backward, rebuilt from the
    forward's inputs without the forward's convolution (:func:`spafl.compact_conv.conv2d_state`)."""
    compute = compact._compute_dtype(x.dtype)
    return compact_conv.conv2d_state(compact._cast(x, compute), compact._cast(weight, compute), mask, geometry,
                                skip_zero_inputs)


@torch.library.custom_op("spafl::threshold_conv2d", mutates_args=())
def threshold_conv2d(
    x: Tensor,
    weight: Tensor,
    threshold: Tensor,
    bias: Optional[Tensor],  # noqa: UP045
    mask: Tensor,
    perm: Tensor,
    count: Tensor,
    stride: list[int],
    pad_begin: list[int],
    pad_end: list[int],
    dilation: list[int],
    groups: int,
    backend: str,
    options: str,
) -> Tensor:
    """``y [B, F, Ho, Wo]`` for ``x [B, C, H, W]``, ``weight [F, C / groups, KH, KW]``: the eager
    forward of ``backend``."""
    geometry = _geometry(weight, stride, pad_begin, pad_end, dilation, groups)
    with _operands_already_cast(x.device.type):
        y, _ = IMPLEMENTATIONS[backend].conv2d_forward(x, weight, bias, _row_mask_of(mask, perm, count), geometry,
                                                       from_key(options))
    return _in_format(y, _conv_format(x, weight))


@threshold_conv2d.register_fake
def _(x, weight, threshold, bias, mask, perm, count, stride, pad_begin, pad_end, dilation, groups, backend, options):
    geometry = _geometry(weight, stride, pad_begin, pad_end, dilation, groups)
    out_h, out_w = geometry.output_size(x.shape[2], x.shape[3])
    return torch.empty((x.shape[0], weight.shape[0], out_h, out_w), dtype=x.dtype, device=x.device,
                       memory_format=_conv_format(x, weight))


@torch.library.custom_op("spafl::threshold_conv2d_backward", mutates_args=())
def threshold_conv2d_backward(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    mask: Tensor,
    perm: Tensor,
    count: Tensor,
    stride: list[int],
    pad_begin: list[int],
    pad_end: list[int],
    dilation: list[int],
    groups: int,
    backend: str,
    options: str,
    threshold_dtype: torch.dtype,
    need_dx: bool,
    has_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dx | [0], dW, dtau [F], db [F] | [0])``: the eager backward of ``backend``."""
    geometry = _geometry(weight, stride, pad_begin, pad_end, dilation, groups)
    opts = from_key(options)
    if backend == "compact":
        state = _compact_conv2d_state(x, weight, mask, geometry, opts.skip_zero_inputs)
    elif backend == "triton":
        state = _pointwise_as_linear(x, geometry)  # the route the forward took
    else:
        state = None
    dx, dw, dtau, db = IMPLEMENTATIONS[backend].conv2d_backward(
        grad_y, x, weight, _row_mask_of(mask, perm, count), geometry, state, opts, need_dx, has_bias, threshold_dtype
    )
    return (
        _in_format(dx, _conv_format(x, weight)) if need_dx else x.new_empty(0),
        dw.contiguous(),
        dtau.contiguous(),
        db.contiguous() if has_bias else weight.new_empty(0),
    )


@threshold_conv2d_backward.register_fake
def _(grad_y, x, weight, mask, perm, count, stride, pad_begin, pad_end, dilation, groups, backend, options,
      threshold_dtype, need_dx, has_bias):
    return (
        torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_conv_format(x, weight))
        if need_dx else x.new_empty(0),
        weight.new_empty(weight.shape),
        weight.new_empty(weight.shape[0], dtype=threshold_dtype),
        weight.new_empty(weight.shape[0]) if has_bias else weight.new_empty(0),
    )


threshold_conv2d.register_autograd(_backward_through(torch.ops.spafl.threshold_conv2d_backward),
                                   setup_context=_setup_context)
