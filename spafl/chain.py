"""Compact chains: threshold layers that hand each other only their active units.

A threshold layer without bias outputs exact zeros at its pruned units (a Conv2d's filters, a
Linear's neurons). When that output reaches the next threshold layer only through a ReLU, max
pooling and flatten (the rule of :mod:`spafl.layers` under which ``skip_zero_inputs`` is exact)
the zeros can stay implicit: a chain passes a :class:`Compact` activation, the active units'
values ``[B, A, ...]`` and their positions, so that ReLU and pooling run on the active channels
only and the next layer multiplies the matching columns of its weight without searching its
input for zeros. A chain's convolutions run channels-last: the layout in which PyTorch's CPU
max pooling is fast (measured ~6x faster than on NCHW tensors); the layout never leaves the
chain, whose final output is a plain tensor.

Results equal those of the layers called one by one, with or without ``skip_zero_inputs``, in
every backward mode: a pruned unit's output gradient is 0 there too (ReLU's gradient at 0 is 0),
so its threshold and weight gradients are 0 in every mode, and a chain gives them 0 without
computing anything for it. As for ``skip_zero_inputs``, the gradients of the activations inside
the chain at the dropped entries, which a chain never materialises, are the one difference.
Exact for finite weights (the reference's ``W * m`` turns an infinite pruned weight into NaN).

The federated models (:mod:`spafl.federated.models`: LeNet-5 and digits-cnn) take their chain
when :func:`applies` allows it; any model can do the same::

    if chain.applies(x, model.conv1, model.conv2, model.fc):
        h = chain.max_pool2d(chain.relu(chain.layer(model.conv1, x)), 2)
        h = chain.flatten(chain.relu(chain.layer(model.conv2, h)))
        return chain.layer(model.fc, h, compact_output=False)  # a plain tensor
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.fx
import torch.nn.functional as F
from torch.nn.modules import module as _module

from . import compact
from ._checks import check_finite_values, route
from ._conv import cached_geometry
from ._functions import ThresholdConv2dFunction, ThresholdLinearFunction, _autocast_enabled, _Compact, _run
from ._guard import _check_finite, _guarded_row_mask
from .layers import ThresholdConv2d, ThresholdLinear


class Compact(NamedTuple):
    """An activation ``[B, size, ...]`` of which only the entries ``index`` along dim 1 may be
    nonzero, stored as those entries.

    values:    ``[B, A, ...]``, the entries at ``index`` in ascending order
    index:     int64 ``[A]``, ascending; None when every entry is stored (``values`` is the
               whole activation)
    size:      the whole activation's size along dim 1
    rectified: a ReLU has run since the layer that produced it: what makes its zeros' gradient
               0, and so what a threshold layer needs before it may take a compact input
    """

    values: torch.Tensor
    index: torch.Tensor | None
    size: int
    rectified: bool = False


# ----------------------------------------------------------------------------- operations


def relu(c: Compact) -> Compact:
    """``F.relu`` of the activation (0 stays 0)."""
    return Compact(F.relu(c.values), c.index, c.size, True)


def max_pool2d(c: Compact, kernel_size, stride=None, padding=0, dilation=1, ceil_mode: bool = False) -> Compact:
    """``F.max_pool2d`` of an activation ``[B, C, H, W]`` (per channel: a channel of zeros pools
    to zeros), without indices."""
    values = c.values
    if values.dim() != 4:
        raise ValueError(f"max_pool2d needs a [B, C, H, W] activation, got values of shape {tuple(values.shape)}")
    if values.shape[1]:
        return c._replace(values=F.max_pool2d(values, kernel_size, stride, padding, dilation, ceil_mode))
    # No unit stored (F.max_pool2d refuses zero channels): an empty result of the pooled shape
    # that stays in the graph, so that the layers before still receive their (zero) gradients.
    batch, _, height, width = values.shape
    pooled = F.max_pool2d(values.new_zeros(batch, 1, height, width), kernel_size, stride, padding, dilation,
                          ceil_mode)
    return c._replace(values=values.sum(dim=(2, 3), keepdim=True).expand(batch, 0, *pooled.shape[2:]))


def flatten(c: Compact) -> Compact:
    """``torch.flatten(x, 1)``: ``[B, C, *rest] -> [B, C * prod(rest)]``; entry ``c`` becomes the
    features ``c * prod(rest) ... (c + 1) * prod(rest) - 1``."""
    values = c.values
    if values.dim() <= 2:
        return c
    per_entry = math.prod(values.shape[2:])
    index = c.index
    if index is not None:
        index = (index[:, None] * per_entry + torch.arange(per_entry, device=index.device)).flatten()
    return Compact(values.flatten(1), index, c.size * per_entry, c.rectified)


def to_dense(c: Compact) -> torch.Tensor:
    """The whole activation ``[B, size, ...]`` (zeros at the entries that are not stored);
    differentiable."""
    if c.index is None:
        return c.values
    shape = (c.values.shape[0], c.size, *c.values.shape[2:])
    return c.values.new_zeros(shape).index_copy(1, c.index, c.values)


# ----------------------------------------------------------------------------- threshold layers


def _layer_type_ok(module) -> bool:
    # Exactly the library's layers: a subclass may compute something else in its forward.
    return type(module) in (ThresholdLinear, ThresholdConv2d)


def layer(module: ThresholdLinear | ThresholdConv2d, x: torch.Tensor | Compact, *,
          compact_output: bool = True) -> Compact | torch.Tensor:
    """``module(x)`` inside a chain: ``x`` is the layer's whole input (a tensor) or a
    :class:`Compact` activation that has passed a ReLU; returns a :class:`Compact` of the active
    units (``compact_output``, which needs a layer without bias) or the whole output.

    Same mask, collapse guard, backward mode and gradients as calling ``module``, which must
    run on the compacting backend (``backend="auto"`` on CPU, or ``"compact"``). Linear layers
    take ``[B, in_features]`` inputs, Conv2d layers ``[B, C, H, W]``; a compact input of a
    Conv2d needs ``groups == 1``. Forward hooks of ``module`` do not run (see :func:`applies`).
    """
    if not _layer_type_ok(module):
        raise TypeError(f"chain.layer takes a ThresholdLinear or ThresholdConv2d, got {type(module).__name__}")
    weight, threshold, bias = module.weight, module.threshold, module.bias
    conv = isinstance(module, ThresholdConv2d)
    name = type(module).__name__
    options = module.forward_options
    where = route(options.backend, weight).compute
    if where != "compact":
        raise ValueError(f"a chain runs on the compacting backend; this {name} resolves backend={options.backend!r} "
                         f"to {where!r} for {weight.device} {weight.dtype}")
    if _autocast_enabled(weight.device.type):
        raise ValueError("a chain does not run under torch.autocast; call the layers instead")
    if compact_output and bias is not None:
        raise ValueError(f"compact_output needs a layer without bias (this {name} has one: its pruned units "
                         "output the bias, not 0)")
    x_index = None
    if isinstance(x, Compact):
        if not x.rectified:
            raise ValueError("a compact activation must pass chain.relu before the next threshold layer: "
                             "ReLU is what makes its dropped entries' gradient 0")
        values, x_index, width = x.values, x.index, x.size
    elif isinstance(x, torch.Tensor):
        values = x
        width = x.shape[1] if x.dim() > 1 else -1
    else:
        raise TypeError(f"chain.layer takes a tensor or a Compact, got {type(x).__name__}")
    if values.dtype != weight.dtype or values.device != weight.device:
        raise TypeError(f"{name}: the input is {values.dtype} on {values.device}, the weight "
                        f"{weight.dtype} on {weight.device}")
    want = 4 if conv else 2
    wide = module.in_channels if conv else module.in_features
    if values.dim() != want or width != wide:
        raise ValueError(f"{name} in a chain takes [B, {wide}{', H, W' if conv else ''}] inputs, got "
                         f"{'a compact one of size ' + str(width) if x_index is not None else 'one'} "
                         f"with values of shape {tuple(values.shape)}")
    geometry = None
    if conv:
        if x_index is not None and module.groups != 1:
            raise ValueError(f"a compact input needs a convolution with groups == 1, got groups={module.groups}")
        padding = module.padding
        if module.padding_mode != "zeros":
            values = F.pad(values, module._explicit_padding, mode=module.padding_mode)
            padding = 0
        geometry = cached_geometry(module.kernel_size, module.stride, padding, module.dilation, module.groups)
        out_h, out_w = geometry.output_size(values.shape[2], values.shape[3])
        if out_h < 1 or out_w < 1:
            raise ValueError(f"{name}: input of spatial size {tuple(values.shape[2:])} is too small for kernel "
                             f"{geometry.kernel}")
        if compact_output and not compact._channels_last(values):
            values = _as_channels_last(values)
    tau = threshold.detach()
    if _check_finite(options, threshold):
        check_finite_values(tau)  # (the weights' scores are checked when the layer is called by itself)
    module._register_owner()  # (a fused optimizer's step scores the weight for the next call)
    row_mask = _guarded_row_mask(weight, threshold, "compact", False, options, module.collapse_resets,
                                 module.previous_density, precomputed=module._kept_mask(options))
    impl = _Compact(x_index, compact_output, in_chain=True)
    if conv:
        y = _run(ThresholdConv2dFunction, values, weight, threshold, bias, row_mask, geometry, impl, options)
    else:
        y = _run(ThresholdLinearFunction, values, weight, threshold, bias, row_mask, impl, options)
    mask = row_mask.mask
    if not compact_output:
        # Channels-last values are the chain's own layout: a whole output leaves it in the
        # layout F.conv2d gives for a contiguous input (channels-last only for such a weight).
        if conv and x_index is not None and not compact._channels_last(weight):
            y = y.contiguous()
        return y
    return Compact(y, compact.active_units(mask, row_mask.units), weight.shape[0])


def _as_channels_last(t: torch.Tensor) -> torch.Tensor:
    """``t [B, C, H, W]`` with channels-last strides: a copy, except for one channel, where the
    memory is the same and only the strides differ."""
    if t.shape[1] == 1 and t.is_contiguous():
        height, width = t.shape[2:]
        return t.as_strided(t.shape, (height * width, 1, width, 1))
    return t.contiguous(memory_format=torch.channels_last)


def _hooked(module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _global_hooks() -> bool:
    return any(getattr(_module, name, None) for name in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
        "_global_backward_pre_hooks"))


def applies(x, *layers) -> bool:
    """Whether ``layers`` (threshold layers, in the order data flows through them) may run as a
    chain on the input ``x`` of the first: every layer is a :class:`spafl.ThresholdLinear` /
    :class:`spafl.ThresholdConv2d` on the compacting backend without hooks, every layer but the
    first has ``skip_zero_inputs`` set (by :func:`spafl.mark_zero_input_layers`, which checks
    with ``torch.fx`` that its input is a ReLU's output through max pooling / shape operations
    only, or by hand under the same rule), every layer but the last has no bias, ``x`` is a
    tensor of the first layer's input shape, and no ``torch.fx`` trace, ``torch.compile`` or
    autocast is running. Otherwise a model calls its layers as usual (which also raises the
    usual errors for bad inputs)."""
    if not isinstance(x, torch.Tensor) or isinstance(x, torch.fx.Proxy) or not layers or not x.numel():
        return False
    if torch.compiler.is_compiling() or torch.jit.is_scripting() or _global_hooks():
        return False
    first = layers[0]
    if not all(_layer_type_ok(m) and not _hooked(m) for m in layers):
        return False
    if any(not m.skip_zero_inputs for m in layers[1:]) or any(m.bias is not None for m in layers[:-1]):
        return False
    weight = first.weight
    if any(route(m.backend, m.weight).compute != "compact" for m in layers) or _autocast_enabled(weight.device.type):
        return False
    if x.dtype != weight.dtype or x.device != weight.device:
        return False
    if isinstance(first, ThresholdConv2d):
        return x.dim() == 4 and x.shape[1] == first.in_channels
    return x.dim() == 2 and x.shape[1] == first.in_features
