"""spafl: SpaFL's trainable-threshold structured sparsity, with kernels that skip pruned units.

Public API:
    threshold_linear, threshold_row_mask      functional forms
    ThresholdLinearFunction                   the autograd Function
    ThresholdLinear                           drop-in nn.Linear replacement
    sparsify                                  swap a model's nn.Linear layers in place
    threshold_layers, threshold_penalty, model_density, threshold_for_density
    RowMask                                   device-side mask / compact index list / count
    reference                                 the plain-PyTorch reference of every op
The Triton kernels are ``spafl.kernels`` (imported lazily; needs Triton).
"""

from . import reference
from ._rowmask import RowMask
from .convert import model_density, sparsify, threshold_for_density, threshold_layers, threshold_penalty
from .functional import ThresholdLinearFunction, threshold_linear, threshold_row_mask
from .layers import ThresholdLinear

__version__ = "0.1.0"

__all__ = [
    "RowMask",
    "ThresholdLinear",
    "ThresholdLinearFunction",
    "model_density",
    "reference",
    "sparsify",
    "threshold_for_density",
    "threshold_layers",
    "threshold_linear",
    "threshold_penalty",
    "threshold_row_mask",
]
