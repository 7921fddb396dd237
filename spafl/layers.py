"""Drop-in threshold layers."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_options, check_positive_int, check_threshold_values
from ._conv import conv_geometry
from .functional import threshold_conv2d, threshold_linear, threshold_row_mask


class _ThresholdMixin:
    """Mask / density / collapse-guard state shared by the threshold layers.

    Expects ``self.weight [out, ...]``, ``self.threshold [out]`` and the options set by
    :meth:`_init_threshold_state`.
    """

    def _init_threshold_state(self, backend, backward_mode, sample_fraction, collapse_density, check_finite, device):
        check_options(backend, backward_mode, sample_fraction, collapse_density)
        self.backend = backend
        self.backward_mode = backward_mode
        self.sample_fraction = float(sample_fraction)
        self.collapse_density = collapse_density
        self.check_finite = check_finite
        # Number of times the collapse guard reset this layer's thresholds; a buffer so that it
        # lives on the device (incremented without a host sync) and is saved with checkpoints.
        self.register_buffer("collapse_resets", torch.zeros((), dtype=torch.long, device=device))

    def _layer_options(self) -> dict:
        return {
            "backend": self.backend,
            "backward_mode": self.backward_mode,
            "sample_fraction": self.sample_fraction,
            "collapse_density": self.collapse_density,
            "collapse_counter": self.collapse_resets,
            "check_finite": self.check_finite,
        }

    def _init_parameters(self, weight_shape: tuple[int, ...], bias: bool, factory: dict) -> None:
        out = weight_shape[0]
        self.weight = nn.Parameter(torch.empty(weight_shape, **factory))
        self.threshold = nn.Parameter(torch.empty(out, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out, **factory))
        else:
            self.register_parameter("bias", None)

    def _copy_from(self, dense: nn.Module):
        """Copy ``dense``'s weight and bias (values, memory format, requires_grad, train mode)."""
        with torch.no_grad():
            self.weight.data = torch.empty_like(dense.weight).copy_(dense.weight)
            if dense.bias is not None:
                self.bias.copy_(dense.bias)
        self.weight.requires_grad_(dense.weight.requires_grad)
        if dense.bias is not None:
            self.bias.requires_grad_(dense.bias.requires_grad)
        self.train(dense.training)
        return self

    @property
    def mask(self) -> torch.Tensor:
        """bool ``[out]``: units active under the current weights and thresholds (no guard)."""
        rm = threshold_row_mask(self.weight, self.threshold, backend=self.backend, check_finite=self.check_finite)
        return rm.mask

    @property
    def density(self) -> float:
        """Fraction of active output units (synchronises with the device)."""
        return float(self.mask.float().mean())

    def _density_repr(self) -> str:
        try:
            return f"density={self.density:.3f}"
        except Exception:  # e.g. meta tensors: the repr must not fail
            return "density=?"


class ThresholdLinear(_ThresholdMixin, nn.Module):
    """``nn.Linear`` with a trainable threshold per output neuron (SpaFL).

    Neuron ``i`` is active while ``mean_j |weight[i, j]| > threshold[i]``; a pruned neuron
    outputs ``bias[i]`` (0 without bias) and on CUDA its row of the GEMM is skipped in the
    forward and backward passes. Thresholds start at 0, so a fresh layer is fully dense.

    Args:
        in_features, out_features, bias, device, dtype: as for ``nn.Linear``.
        backend: ``"auto"`` (Triton kernels for CUDA tensors, plain PyTorch otherwise),
            ``"triton"`` or ``"reference"``.
        backward_mode: ``"exact"``, ``"skip"`` or ``"sample"``: what pruned neurons receive in
            the backward pass (see :func:`spafl.threshold_linear`).
        sample_fraction: share of the batch used by ``"sample"`` mode.
        collapse_density: the collapse guard: when the layer's density is ``<=`` this at forward
            time, its thresholds are reset to 0 and ``collapse_resets`` is incremented (the
            reference code uses 0.01). ``None`` disables it. Runs in every forward pass, as in
            the reference code, without a host synchronisation.
        check_finite: reject NaN / inf thresholds in forward (default: on CPU only, see
            :func:`spafl.threshold_linear`).

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
        check_finite: bool | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.in_features = check_positive_int("in_features", in_features)
        self.out_features = check_positive_int("out_features", out_features)
        self._init_parameters((out_features, in_features), bias, {"device": device, "dtype": dtype})
        self._init_threshold_state(backend, backward_mode, sample_fraction, collapse_density, check_finite, device)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's initialisation, and thresholds at 0 (every neuron active).
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)
        nn.init.zeros_(self.threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return threshold_linear(x, self.weight, self.threshold, self.bias, **self._layer_options())

    @classmethod
    def from_dense(cls, linear: nn.Linear, **kwargs) -> ThresholdLinear:
        """A threshold layer with a copy of ``linear``'s weight and bias (thresholds at 0)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_dense expects an nn.Linear, got {type(linear).__name__}")
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
            **kwargs,
        )
        return layer._copy_from(linear)

    def to_dense(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing the same function: pruned rows of the weight zeroed."""
        check_threshold_values(self.threshold, True)
        dense = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        with torch.no_grad():
            dense.weight.copy_(self.weight * self.mask.to(self.weight.dtype)[:, None])
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        dense.train(self.training)
        return dense

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"{self._density_repr()}, backend={self.backend!r}, backward_mode={self.backward_mode!r}"
        )


class ThresholdConv2d(_ThresholdMixin, nn.Module):
    """``nn.Conv2d`` with a trainable threshold per filter (SpaFL).

    Filter ``i`` is active while the mean |w| of ``weight[i]`` (over ``in_channels / groups *
    kh * kw``) is ``> threshold[i]``; a pruned filter's output channel is ``bias[i]`` (0
    without bias) and on CUDA the filter is skipped by the implicit-GEMM kernels in the forward
    and backward passes. Thresholds start at 0, so a fresh layer is fully dense.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
        padding_mode, device, dtype: as for ``nn.Conv2d``. ``groups > 1`` (grouped and
            depthwise convolutions) runs on the plain-PyTorch path: the mask is applied, but
            nothing is skipped.
        backend, backward_mode, sample_fraction, collapse_density, check_finite: as for
            :class:`ThresholdLinear` (``sample`` mode samples output pixels).

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
        self._init_threshold_state(backend, backward_mode, sample_fraction, collapse_density, check_finite, device)
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
        padding = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self._explicit_padding, mode=self.padding_mode)
            padding = 0
        return threshold_conv2d(
            x, self.weight, self.threshold, self.bias, self.stride, padding, self.dilation, self.groups,
            **self._layer_options(),
        )

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, **kwargs) -> ThresholdConv2d:
        """A threshold layer with a copy of ``conv``'s weight and bias (thresholds at 0); the
        weight keeps its memory format (e.g. channels-last)."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"from_dense expects an nn.Conv2d, got {type(conv).__name__}")
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
            **kwargs,
        )
        return layer._copy_from(conv)

    def to_dense(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` computing the same function: pruned filters zeroed."""
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
            dense.weight.data = self.weight * self.mask.to(self.weight.dtype)[:, None, None, None]
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        dense.train(self.training)
        return dense

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
        return ", ".join(parts)
