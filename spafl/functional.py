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
            dx, dw, dtau, db = reference.threshold_linear_backward(
                grad_y2d,
                x2d,
                weight,
                mask.to(weight.dtype),
                mask,
                has_bias=ctx.has_bias,
                mode=ctx.backward_mode,
                sample_fraction=ctx.sample_fraction,
            )
            dx = dx.to(weight.dtype) if need_dx else None
            dw = dw.to(weight.dtype)
            dtau = dtau.to(ctx.threshold_dtype)
            db = db.to(weight.dtype) if db is not None else None
        if dx is not None:
            dx = dx.reshape(ctx.x_shape)
        return dx, dw, dtau, db, None, None, None, None, None, None


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
