"""Autograd functions and the functional API of the threshold layers."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from . import reference
from ._checks import (
    check_layer_inputs,
    check_options,
    check_threshold_values,
    check_weight_and_threshold,
    resolve_backend,
)
from ._conv import ConvGeometry, conv_geometry
from ._rowmask import RowMask


def _kernels():
    # Imported on first use so that the reference path works where Triton is not installed.
    from . import kernels

    return kernels


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
    ``check_finite`` as for :func:`threshold_linear`.
    """
    check_options(backend, "exact", 1.0, collapse_density)
    check_weight_and_threshold(weight, threshold, op="threshold_row_mask")
    check_threshold_values(threshold, check_finite)
    return _row_mask(weight, threshold, resolve_backend(backend, weight), collapse_density)


def _row_mask(
    weight, threshold, resolved_backend: str, collapse_density: float | None, with_perm: bool = True
) -> RowMask:
    w2d = weight.detach().reshape(weight.shape[0], -1)
    with torch.no_grad():
        if resolved_backend == "triton":
            return _kernels().threshold_row_mask(w2d, threshold.detach(), collapse_density=collapse_density)
        return reference.row_mask(w2d, threshold, collapse_density=collapse_density, with_perm=with_perm)


def apply_collapse_guard(
    threshold: torch.Tensor, row_mask: RowMask, counter: torch.Tensor | None = None
) -> None:
    """Reset ``threshold`` to 0 where ``row_mask.collapsed`` says the guard fired and count it.

    Device-side ``masked_fill_`` / ``add_``: no host synchronisation.
    """
    if row_mask.collapsed is None:
        return
    with torch.no_grad():
        threshold.masked_fill_(row_mask.collapsed, 0.0)
        if counter is not None:
            counter.add_(row_mask.collapsed.reshape(()).to(counter.dtype))


class ThresholdLinearFunction(torch.autograd.Function):
    """``y = x @ (W * m)^T + b`` with the straight-through threshold gradient.

    Inputs: ``x [..., in]``, ``weight [out, in]``, ``threshold [out]``, ``bias [out] | None``,
    the precomputed ``mask / perm / count`` of :func:`threshold_row_mask`, then the backend
    (``"triton"`` or ``"reference"``), the backward mode and the sample fraction.
    """

    @staticmethod
    def forward(ctx, x, weight, threshold, bias, mask, perm, count, backend, backward_mode, sample_fraction):
        n_out, fan_in = weight.shape
        x2d = x.reshape(-1, fan_in)
        if backend == "triton":
            y = _kernels().threshold_linear_fwd(x2d, weight, bias, RowMask(mask, perm, count, None))
        else:
            y = reference.threshold_linear_forward(x2d, weight, mask, bias)
        ctx.save_for_backward(x2d, weight, mask, perm, count)
        ctx.x_shape = x.shape
        ctx.has_bias = bias is not None
        ctx.backend = backend
        ctx.backward_mode = backward_mode
        ctx.sample_fraction = sample_fraction
        ctx.threshold_dtype = threshold.dtype
        return y.reshape(*x.shape[:-1], n_out)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x2d, weight, mask, perm, count = ctx.saved_tensors
        n_out = weight.shape[0]
        grad_y2d = grad_y.reshape(-1, n_out)
        need_dx = ctx.needs_input_grad[0]
        if ctx.backend == "triton":
            dx, dw, dtau = _kernels().threshold_linear_bwd(
                grad_y2d,
                x2d,
                weight,
                RowMask(mask, perm, count, None),
                mode=ctx.backward_mode,
                sample_fraction=ctx.sample_fraction,
                need_dx=need_dx,
                threshold_dtype=ctx.threshold_dtype,
            )
            db = grad_y2d.sum(dim=0, dtype=torch.float32).to(weight.dtype) if ctx.has_bias else None
        else:
            dx, dw, dtau, db = _cast_gradients(
                reference.threshold_linear_backward(
                    grad_y2d,
                    x2d,
                    weight,
                    mask.to(weight.dtype),
                    mask,
                    has_bias=ctx.has_bias,
                    mode=ctx.backward_mode,
                    sample_fraction=ctx.sample_fraction,
                ),
                need_dx,
                weight.dtype,
                ctx.threshold_dtype,
            )
        if dx is not None:
            dx = dx.reshape(ctx.x_shape)
        return dx, dw, dtau, db, None, None, None, None, None, None


def _cast_gradients(grads, need_dx: bool, weight_dtype: torch.dtype, threshold_dtype: torch.dtype):
    """The reference backward's fp32 ``(dx, dw, dtau, db)`` in the dtypes of the inputs."""
    dx, dw, dtau, db = grads
    return (
        dx.to(weight_dtype) if need_dx else None,
        dw.to(weight_dtype),
        dtau.to(threshold_dtype),
        db.to(weight_dtype) if db is not None else None,
    )


def _pointwise_as_linear(x: torch.Tensor, geometry: ConvGeometry) -> bool:
    """A 1x1 convolution on a channels-last input is a GEMM on a view of it: the Linear kernels
    run it with no copy."""
    return geometry.is_pointwise and x.permute(0, 2, 3, 1).is_contiguous()


class ThresholdConv2dFunction(torch.autograd.Function):
    """``y = conv2d(x, W * m[:, None, None, None], b)`` with the straight-through threshold
    gradient.

    Inputs: ``x [B, C, H, W]``, ``weight [F, C / groups, KH, KW]``, ``threshold [F]``,
    ``bias [F] | None``, the ``mask / perm / count`` of :func:`threshold_row_mask`, a
    ``ConvGeometry``, then the backend (``"triton"``: ``groups == 1`` only, or
    ``"reference"``), the backward mode and the sample fraction.
    """

    @staticmethod
    def forward(ctx, x, weight, threshold, bias, mask, perm, count, geometry, backend, backward_mode,
                sample_fraction):
        row_mask = RowMask(mask, perm, count, None)
        as_linear = backend == "triton" and _pointwise_as_linear(x, geometry)
        if as_linear:
            batch, chans, height, width = x.shape
            filters = weight.shape[0]
            x2d = x.permute(0, 2, 3, 1).reshape(-1, chans)
            y2d = _kernels().threshold_linear_fwd(x2d, weight.reshape(filters, chans), bias, row_mask)
            y = y2d.view(batch, height, width, filters).permute(0, 3, 1, 2)
        elif backend == "triton":
            y = _kernels().threshold_conv2d_fwd(x, weight, bias, row_mask, geometry)
        else:
            y = reference.threshold_conv2d_forward(x, weight, mask, bias, geometry)
        ctx.save_for_backward(x, weight, mask, perm, count)
        ctx.geometry = geometry
        ctx.as_linear = as_linear
        ctx.has_bias = bias is not None
        ctx.backend = backend
        ctx.backward_mode = backward_mode
        ctx.sample_fraction = sample_fraction
        ctx.threshold_dtype = threshold.dtype
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, weight, mask, perm, count = ctx.saved_tensors
        need_dx = ctx.needs_input_grad[0]
        options = {"mode": ctx.backward_mode, "sample_fraction": ctx.sample_fraction, "need_dx": need_dx,
                   "threshold_dtype": ctx.threshold_dtype}
        if ctx.backend == "triton":
            row_mask = RowMask(mask, perm, count, None)
            if ctx.as_linear:
                batch, chans, height, width = x.shape
                filters = weight.shape[0]
                dx, dw, dtau = _kernels().threshold_linear_bwd(
                    grad_y.permute(0, 2, 3, 1).reshape(-1, filters),
                    x.permute(0, 2, 3, 1).reshape(-1, chans),
                    weight.reshape(filters, chans),
                    row_mask,
                    **options,
                )
                dw = dw.view(weight.shape)
                if dx is not None:
                    dx = dx.view(batch, height, width, chans).permute(0, 3, 1, 2)
            else:
                dx, dw, dtau = _kernels().threshold_conv2d_bwd(grad_y, x, weight, row_mask, ctx.geometry, **options)
            db = grad_y.sum(dim=(0, 2, 3), dtype=torch.float32).to(weight.dtype) if ctx.has_bias else None
        else:
            dx, dw, dtau, db = _cast_gradients(
                reference.threshold_conv2d_backward(
                    grad_y, x, weight, mask.to(weight.dtype), mask, ctx.geometry, has_bias=ctx.has_bias,
                    need_dx=need_dx, mode=ctx.backward_mode, sample_fraction=ctx.sample_fraction,
                ),
                need_dx,
                weight.dtype,
                ctx.threshold_dtype,
            )
        return dx, dw, dtau, db, None, None, None, None, None, None, None


def _autocast(x, weight, bias):
    """Under ``torch.autocast``, run in the autocast dtype like ``F.linear`` does; thresholds and
    the master weights stay in their own dtype (gradients flow back through the casts)."""
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return x, weight, bias
    dtype = torch.get_autocast_dtype(device_type)
    cast = (lambda t: t if t is None or t.dtype == dtype else t.to(dtype))  # noqa: E731
    return cast(x), cast(weight), cast(bias)


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
    check_finite: bool | None = None,
) -> torch.Tensor:
    """Threshold-pruned linear layer: ``x [..., in] -> [..., out]``.

    Output unit ``i`` is active while ``mean_j |weight[i, j]| > threshold[i]``; pruned units
    output ``bias[i]`` (or 0) and, on the Triton backend, cost nothing in the forward pass.

    Args:
        weight: ``[out, in]``; threshold: ``[out]``; bias: ``[out]`` or None (never masked).
        backend: ``"auto"`` (Triton for CUDA tensors, reference otherwise), ``"triton"``,
            ``"reference"``.
        backward_mode: what pruned units receive in the backward pass. ``"exact"``: the
            straight-through gradient of the spec (costs their dense work). ``"skip"``: none,
            ``dtau_i = 0`` and ``dW_i = 0``. ``"sample"``: ``r_i`` estimated from
            ``sample_fraction`` of the batch rows. Active units are exact in every mode.
        collapse_density: if set and the layer's density is ``<=`` it, ``threshold`` is reset to
            0 in place (before the forward; the reset mask is used) and ``collapse_counter``
            (an integer scalar tensor) is incremented. No host synchronisation.
        check_finite: reject NaN / inf thresholds. Default: on for CPU tensors, off for CUDA
            tensors (the check would synchronise with the host every call).
    """
    check_options(backend, backward_mode, sample_fraction, collapse_density)
    check_layer_inputs(x, weight, threshold, bias, op="threshold_linear", weight_dim=2, x_min_dim=1)
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"threshold_linear: x has shape {tuple(x.shape)} with {x.shape[-1]} features in its last "
            f"dimension, but weight {tuple(weight.shape)} expects {weight.shape[1]}"
        )
    check_threshold_values(threshold, check_finite)
    # The mask comes from the master weight, before any autocast cast, so that it agrees with
    # `layer.mask`, `density` and `to_dense()`; the GEMMs run on the (possibly cast) operands.
    x_op, w_op, b_op = _autocast(x, weight, bias)
    resolved = resolve_backend(backend, w_op)
    row_mask = _row_mask(weight, threshold, resolve_backend(backend, weight), collapse_density,
                         with_perm=resolved == "triton")
    apply_collapse_guard(threshold, row_mask, collapse_counter)
    return ThresholdLinearFunction.apply(
        x_op, w_op, threshold, b_op, row_mask.mask, row_mask.perm, row_mask.count, resolved, backward_mode,
        float(sample_fraction),
    )


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
    check_finite: bool | None = None,
) -> torch.Tensor:
    """Threshold-pruned 2-D convolution: ``x [B, C, H, W]`` (or unbatched ``[C, H, W]``) ->
    ``[B, F, Ho, Wo]``, with the options of ``F.conv2d``.

    Filter ``i`` is active while the mean |w| of ``weight[i]`` (over ``C / groups * KH * KW``)
    is ``> threshold[i]``; a pruned filter's output channel is ``bias[i]`` (or 0). On the Triton
    backend pruned filters cost nothing in the forward pass and, except for the threshold
    gradient of ``exact`` / ``sample`` modes, in the backward pass.

    Args:
        weight: ``[F, C / groups, KH, KW]``; threshold: ``[F]``; bias: ``[F]`` or None.
        stride, dilation: int or pair; padding: int, pair, ``"same"`` or ``"valid"``.
        groups: ``groups > 1`` (grouped and depthwise convolutions) runs on the reference path,
            masked dense ``F.conv2d``: nothing is skipped there. ``backend="triton"`` then raises.
        backend, backward_mode, sample_fraction, collapse_density, collapse_counter,
        check_finite: as for :func:`threshold_linear`; ``sample`` mode samples output pixels.

    Channels-last inputs and weights are read without a copy; the output is channels-last when
    either is, as with ``F.conv2d``. 1x1 convolutions
    without stride or padding on a channels-last input run through the Linear kernels.
    """
    check_options(backend, backward_mode, sample_fraction, collapse_density)
    check_layer_inputs(x, weight, threshold, bias, op="threshold_conv2d", weight_dim=4, x_min_dim=3)
    if x.dim() not in (3, 4):
        raise ValueError(f"threshold_conv2d: x must be [B, C, H, W] or [C, H, W], got shape {tuple(x.shape)}")
    geometry = conv_geometry(tuple(weight.shape[2:]), stride, padding, dilation, groups)
    filters, chans_per_group = weight.shape[:2]
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
    check_threshold_values(threshold, check_finite)
    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
    x_op, w_op, b_op = _autocast(x, weight, bias)
    resolved = resolve_backend(backend, w_op)
    if resolved == "triton" and groups != 1:
        if backend == "triton":
            raise ValueError(
                f"backend='triton' supports groups=1, got groups={groups}; grouped and depthwise convolutions "
                "run on backend='reference' (or 'auto', which picks it)"
            )
        resolved = "reference"
    row_mask = _row_mask(weight, threshold, resolve_backend(backend, weight), collapse_density,
                         with_perm=resolved == "triton")
    apply_collapse_guard(threshold, row_mask, collapse_counter)
    y = ThresholdConv2dFunction.apply(
        x_op, w_op, threshold, b_op, row_mask.mask, row_mask.perm, row_mask.count, geometry, resolved,
        backward_mode, float(sample_fraction),
    )
    return y.squeeze(0) if unbatched else y
