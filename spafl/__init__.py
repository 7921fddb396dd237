"""spafl: SpaFL's trainable-threshold structured sparsity, with kernels that skip pruned units.

Public API:
    threshold_linear, threshold_conv2d, threshold_row_mask     functional forms
    ThresholdLinearFunction, ThresholdConv2dFunction           the autograd Functions
    ThresholdLinear, ThresholdConv2d          drop-in nn.Linear / nn.Conv2d replacements
    sparsify, densify                         swap a model's nn.Linear / nn.Conv2d layers in place, and back
    dense_state_dict                          the plain model's state dict of a sparsified model
    find_zero_input_layers, mark_zero_input_layers   input-side skipping where it is exact
    threshold_layers, named_threshold_layers   the threshold layers of a model (like modules / named_modules)
    threshold_penalty, model_density, threshold_for_density
    add_threshold_penalty_grad                the penalty's gradient, added after the backward
    RowMask                                   device-side mask / compact index list / count
    reference                                 the masked-dense reference of every op (the tests' oracle)
    compact                                   the compacting plain-PyTorch backend (CPU default)
The Triton kernels are ``spafl.kernels`` (imported lazily; needs Triton).
"""

from . import (
    _ops,  # noqa: F401  (registers the torch.library operators that torch.compile traces)
    compact,
    compact_conv,
    reference,
)
from ._rowmask import RowMask
from .convert import (
    add_threshold_penalty_grad,
    dense_state_dict,
    densify,
    model_density,
    named_threshold_layers,
    sparsify,
    threshold_for_density,
    threshold_layers,
    threshold_penalty,
)
from .functional import (
    ThresholdConv2dFunction,
    ThresholdLinearFunction,
    threshold_conv2d,
    threshold_linear,
    threshold_row_mask,
)
from .layers import ThresholdConv2d, ThresholdLinear
from .zero_inputs import find_zero_input_layers, mark_zero_input_layers

__version__ = "0.1.0"

__all__ = [
    "RowMask",
    "ThresholdConv2d",
    "ThresholdConv2dFunction",
    "ThresholdLinear",
    "ThresholdLinearFunction",
    "add_threshold_penalty_grad",
    "compact",
    "compact_conv",
    "dense_state_dict",
    "densify",
    "find_zero_input_layers",
    "mark_zero_input_layers",
    "model_density",
    "named_threshold_layers",
    "reference",
    "sparsify",
    "threshold_conv2d",
    "threshold_for_density",
    "threshold_layers",
    "threshold_linear",
    "threshold_penalty",
    "threshold_row_mask",
]
