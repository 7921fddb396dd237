"""Drop-in threshold layers.

Input-side skipping (``skip_zero_inputs=True``, honoured by the ``compact`` backend). The layer
drops input features (Linear: entries of the last dimension; Conv2d: channels) that are exactly
0 for every sample of the batch: their products are skipped in the forward pass, in ``dW``
(``G = dL/dW_hat`` is 0 there, so ``dW`` is the sign term alone) and in ``dX``, which is
returned as 0 there instead of ``(W * m)^T dY``. The layer's output and its weight, threshold
and bias gradients are unchanged (for finite weights), in every backward mode.

The rule under which every gradient upstream is unchanged too: the layer's input is the output
of a ReLU (``nn.ReLU``, ``F.relu``, ``torch.relu``, ``Tensor.relu``, in place or not) reached
only through max pooling (``max_pool*``, ``adaptive_max_pool*``, without indices), dropout,
identity and shape operations (flatten, view, reshape, permute, transpose, squeeze, unsqueeze,
contiguous), and nothing modifies those tensors in place. Then a dropped entry comes only from
ReLU outputs that are 0 (a maximum of non-negative values is 0 only when all of them are),
those operations route its gradient only to such positions (or to none), and ReLU's backward
gives 0 there whatever arrives. So the gradients of every parameter, threshold and input
upstream of the ReLU are those of the computation without skipping. What does differ: the
gradient of the ReLU's output itself and of the tensors between it and the layer, at the
dropped entries (a hook or ``retain_grad`` sees 0 there). The rule does NOT hold, and the flag
must stay off, with a bias or normalisation after the ReLU (BatchNorm, LayerNorm), any other
activation (GELU, LeakyReLU, ELU, ``clamp(min=0)``, whose gradient at exactly 0 is 1), average
pooling (an average of tiny positive values can round to 0), or a residual add, concatenation
or other arithmetic between the ReLU and the layer. Normalisation or a bias BEFORE the ReLU is
fine. :func:`spafl.mark_zero_input_layers` (used by :func:`spafl.sparsify` and the federated
models) finds such chains by tracing the model with ``torch.fx``.

Collapse guard options (``collapse_density``, ``collapse_timing``, ``collapse_in_eval``):
see :class:`ThresholdLinear`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import _threads
from ._checks import check_positive_int, check_threshold_values
from ._conv import cached_geometry, conv_geometry
from ._layer_base import _ThresholdMixin
from .functional import conv2d_call, device_call_of, linear_call, linear_device_kept, linear_kept


class ThresholdLinear(_ThresholdMixin, nn.Module):
    """``nn.Linear`` with a trainable threshold per output neuron (SpaFL).

    Neuron ``i`` is active while ``mean_j |weight[i, j]| > threshold[i]``; a pruned neuron
    outputs ``bias[i]`` (0 without bias) and on CUDA its row of the GEMM is skipped in the
    forward and backward passes. Thresholds start at 0, so a fresh layer is fully dense.

    Args:
        in_features, out_features, bias, device, dtype: as for ``nn.Linear``.
        backend: ``"auto"`` (the compacting plain-PyTorch path ``"compact"`` for CPU tensors,
            the Triton kernels for CUDA tensors), ``"compact"``, ``"triton"`` or
            ``"reference"`` (masked dense, the tests' oracle).
        backward_mode: ``"exact"``, ``"skip"`` or ``"sample"``: what pruned neurons receive in
            the backward pass (see :func:`spafl.threshold_linear`).
        sample_fraction: share of the batch used by ``"sample"`` mode.
        collapse_density: the collapse guard: when the layer's density is ``<=`` this, its
            thresholds are reset to 0 (before the forward, whose mask then comes from the reset
            thresholds) and ``collapse_resets`` is incremented (the reference code uses 0.01).
            ``None`` disables it. No host synchronisation.
        collapse_timing: which density the guard tests: ``"current"``, this forward's;
            ``"previous"``, the one measured at the previous guarded forward (the buffer
            ``previous_density``, 1 at first), as the SpaFL authors' layers do.
        collapse_in_eval: run the guard in eval-mode forwards too (the authors' code does).
            With the default False, an eval-mode forward (with or without ``no_grad``) changes
            no parameter and no buffer; in training mode the guard runs in every forward.
        skip_zero_inputs: input-side skipping (see the module docstring for the rule that
            makes it exact). Set by :func:`spafl.sparsify` and the federated models where the
            rule holds; the ``compact`` backend honours it, the others ignore it.
        check_finite: reject NaN / inf thresholds in forward (default: on CPU only, see
            :func:`spafl.threshold_linear`).

    Buffers: ``collapse_resets`` (how often the guard fired), ``previous_density``.

    Shapes: input ``[..., in_features]``, output ``[..., out_features]``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        backend: str = "auto",
        backward_mode: str = "exact",
        sample_fraction: float = 0.125,
        collapse_density: float | None = 0.01,
        collapse_timing: str = "current",
        collapse_in_eval: bool = False,
        skip_zero_inputs: bool = False,
        check_finite: bool | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.in_features = check_positive_int("in_features", in_features)
        self.out_features = check_positive_int("out_features", out_features)
        self._init_parameters((out_features, in_features), bias, {"device": device, "dtype": dtype})
        self._init_threshold_state(backend, backward_mode, sample_fraction, collapse_density, collapse_timing,
                                   collapse_in_eval, skip_zero_inputs, check_finite, device)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's initialisation, and thresholds at 0 (every neuron active).
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)
        nn.init.zeros_(self.threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _threads._warned and self.training and not torch.compiler.is_compiling():
            _threads.warn_once_about_threads(x.device)
        options = self._options if self.training else self._eval_options
        weight, threshold, bias, counter, previous = self._call_tensors()
        state = self.__dict__
        cache = state.get("_host_mask_cache")
        if cache is not None and cache._entry is not None:  # (the last forward's mask may still be current)
            y = linear_kept(x, weight, threshold, bias, options, previous, cache)
            if y is not None:
                return y
        call = state.get("_device_call")
        if call is not None and "_next_mask" not in state:  # (a fused step's kept mask takes the general path)
            y = linear_device_kept(x, weight, threshold, bias, options, counter, previous, call)
            if y is not None:
                return y
        y = linear_call(x, weight, threshold, bias, options, counter, previous, *self._eager_masks(options))
        if x.device.type != "cpu" or options.backend == "triton":  # (the Triton path's next calls, in one step)
            state["_device_call"] = device_call_of(x, weight, threshold, bias, options, counter, previous)
        return y

    @classmethod
    def from_dense(cls, linear: nn.Linear, *, copy: bool = True, **kwargs) -> ThresholdLinear:
        """A threshold layer computing what ``linear`` computes (thresholds at 0), with the
        layer options ``kwargs``. ``copy=True``: with a copy of its weight and bias.
        ``copy=False``: with its weight and bias Parameter objects themselves (shared, as
        :func:`spafl.sparsify` does: an optimizer holding them keeps training them, and weights
        tied to other modules stay tied). Device, dtype, memory format, ``requires_grad`` and
        train mode are ``linear``'s."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_dense expects an nn.Linear, got {type(linear).__name__}")
        args = (linear.in_features, linear.out_features, linear.bias is not None)
        return cls._from_dense(linear, copy, args, kwargs)

    def to_dense(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing the same function: pruned rows of the weight zeroed
        (also rows holding a NaN, which count as pruned when ``check_finite`` lets them through)."""
        check_threshold_values(self.threshold, True)
        dense = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        with torch.no_grad():
            dense.weight.copy_(self.weight.masked_fill(~self.mask[:, None], 0))
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return self._finish_dense(dense)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"{self._density_repr()}, backend={self.backend!r}, backward_mode={self.backward_mode!r}"
            + self._flags_repr()
        )


class ThresholdConv2d(_ThresholdMixin, nn.Module):
    """``nn.Conv2d`` with a trainable threshold per filter (SpaFL).

    Filter ``i`` is active while the mean |w| of ``weight[i]`` (over ``in_channels / groups *
    kh * kw``) is ``> threshold[i]``; a pruned filter's output channel is ``bias[i]`` (0
    without bias) and the filter is skipped in the forward and backward passes (on the
    ``compact`` and ``triton`` backends). Thresholds start at 0, so a fresh layer is fully dense.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
        padding_mode, device, dtype: as for ``nn.Conv2d``. ``groups > 1`` (grouped and
            depthwise convolutions) skips pruned filters on ``compact`` (see
            :mod:`spafl.compact`); on CUDA, ``"auto"`` runs them on the reference path.
        backend, backward_mode, sample_fraction, collapse_density, collapse_timing,
        collapse_in_eval, skip_zero_inputs, check_finite: as for :class:`ThresholdLinear`
            (``sample`` mode samples output pixels; input skipping drops input channels and
            applies to ``groups == 1``).

    Shapes: input ``[B, in_channels, H, W]`` or ``[in_channels, H, W]``, output
    ``[B, out_channels, Ho, Wo]``; channels-last inputs give channels-last outputs.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        *,
        backend: str = "auto",
        backward_mode: str = "exact",
        sample_fraction: float = 0.125,
        collapse_density: float | None = 0.01,
        collapse_timing: str = "current",
        collapse_in_eval: bool = False,
        skip_zero_inputs: bool = False,
        check_finite: bool | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.in_channels = check_positive_int("in_channels", in_channels)
        self.out_channels = check_positive_int("out_channels", out_channels)
        geometry = conv_geometry(kernel_size, stride, padding, dilation, groups)
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible by groups ({groups})"
            )
        if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            raise ValueError(
                f"padding_mode must be 'zeros', 'reflect', 'replicate' or 'circular', got {padding_mode!r}"
            )
        self.kernel_size = geometry.kernel
        self.stride = geometry.stride
        self.padding = geometry.padding
        self.dilation = geometry.dilation
        self.groups = groups
        self.padding_mode = padding_mode
        # F.pad order (left, right, top, bottom) for the non-zero padding modes.
        (top, left), (bottom, right) = geometry.pad_begin, geometry.pad_end
        self._explicit_padding = (left, right, top, bottom)
        self._init_parameters((out_channels, in_channels // groups, *geometry.kernel), bias,
                              {"device": device, "dtype": dtype})
        self._init_threshold_state(backend, backward_mode, sample_fraction, collapse_density, collapse_timing,
                                   collapse_in_eval, skip_zero_inputs, check_finite, device)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Conv2d's initialisation, and thresholds at 0 (every filter active).
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight[0].numel()
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)
        nn.init.zeros_(self.threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _threads._warned and self.training and not torch.compiler.is_compiling():
            _threads.warn_once_about_threads(x.device)
        padding = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self._explicit_padding, mode=self.padding_mode)
            padding = 0
        # (cached: the settings are attributes a caller may change, as on nn.Conv2d)
        geometry = cached_geometry(self.kernel_size, self.stride, padding, self.dilation, self.groups)
        options = self.forward_options
        weight, threshold, bias, counter, previous = self._call_tensors()
        return conv2d_call(x, weight, threshold, bias, geometry, options, counter, previous,
                           *self._eager_masks(options))

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, *, copy: bool = True, **kwargs) -> ThresholdConv2d:
        """A threshold layer computing what ``conv`` computes (thresholds at 0), with the layer
        options ``kwargs``; ``copy`` as for :meth:`ThresholdLinear.from_dense`. The weight keeps
        its memory format (e.g. channels-last)."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"from_dense expects an nn.Conv2d, got {type(conv).__name__}")
        args = (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                conv.groups, conv.bias is not None, conv.padding_mode)
        return cls._from_dense(conv, copy, args, kwargs)

    def to_dense(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` computing the same function: pruned filters zeroed (also filters
        holding a NaN, which count as pruned when ``check_finite`` lets them through)."""
        check_threshold_values(self.threshold, True)
        dense = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            bias=self.bias is not None,
            padding_mode=self.padding_mode,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        with torch.no_grad():
            # (empty_like keeps the weight's memory format, which masked_fill may not)
            masked = self.weight.masked_fill(~self.mask[:, None, None, None], 0)
            dense.weight.data = torch.empty_like(self.weight).copy_(masked)
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return self._finish_dense(dense)

    def extra_repr(self) -> str:
        parts = [f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"]
        if self.padding not in ((0, 0), "valid"):
            parts.append(f"padding={self.padding!r}" if isinstance(self.padding, str) else f"padding={self.padding}")
        if self.dilation != (1, 1):
            parts.append(f"dilation={self.dilation}")
        if self.groups != 1:
            parts.append(f"groups={self.groups}")
        if self.bias is None:
            parts.append("bias=False")
        if self.padding_mode != "zeros":
            parts.append(f"padding_mode={self.padding_mode!r}")
        parts += [self._density_repr(), f"backend={self.backend!r}", f"backward_mode={self.backward_mode!r}"]
        return ", ".join(parts) + self._flags_repr()
