"""spafl: SpaFL's trainable-threshold structured sparsity, with kernels that skip pruned units.

Public API:
    threshold_linear, threshold_conv2d, threshold_row_mask     functional forms
    ThresholdLinearFunction, ThresholdConv2dFunction           the autograd Functions
    ThresholdLinear, ThresholdConv2d          drop-in nn.Linear / nn.Conv2d replacements
    sparsify                                  swap a model's nn.Linear / nn.Conv2d layers in place
    threshold_layers, threshold_penalty, model_density, threshold_for_density
    RowMask                                   device-side mask / compact index list / count
    reference                                 the plain-PyTorch reference of every op
The Triton kernels are ``spafl.kernels`` (imported lazily; needs Triton).
"""

from . import reference
from ._rowmask import RowMask
from .convert import densify, model_density, sparsify, threshold_for_density, threshold_layers, threshold_penalty
from .functional import (
    ThresholdConv2dFunction,
    ThresholdLinearFunction,
    threshold_conv2d,
    threshold_linear,
    threshold_row_mask,
)
from .layers import ThresholdConv2d, ThresholdLinear

__version__ = "0.1.0"

__all__ = [
    "RowMask",
    "ThresholdConv2d",
    "ThresholdConv2dFunction",
    "ThresholdLinear",
    "ThresholdLinearFunction",
    "densify",
    "model_density",
    "reference",
    "sparsify",
    "threshold_conv2d",
    "threshold_for_density",
    "threshold_layers",
    "threshold_linear",
    "threshold_penalty",
    "threshold_row_mask",
]
