"""Triton kernels of spafl, installed as ``spafl.kernels``.

Import them as ``from spafl.kernels import threshold_row_mask, threshold_linear_fwd, ...``.
This folder is mapped onto the ``spafl`` namespace by ``setup.py``; it is never installed as a
top-level ``kernels`` module. Importing it needs Triton; the rest of ``spafl`` does not.
"""

from .._rowmask import RowMask
from ._config import SUPPORTED_DTYPES, interpreter_enabled
from .threshold_conv2d import threshold_conv2d_bwd, threshold_conv2d_fwd
from .threshold_linear import BACKWARD_MODES, threshold_linear_bwd, threshold_linear_fwd
from .threshold_mask import threshold_row_mask

__all__ = [
    "BACKWARD_MODES",
    "SUPPORTED_DTYPES",
    "RowMask",
    "interpreter_enabled",
    "threshold_conv2d_bwd",
    "threshold_conv2d_fwd",
    "threshold_linear_bwd",
    "threshold_linear_fwd",
    "threshold_row_mask",
]
