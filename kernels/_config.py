"""Launch settings shared by the kernels.

Block sizes here are fixed, not autotuned: the interpreter must never autotune, and the
tuned GPU configurations belong to the benchmark-driven tuning work. The values chosen for
the GPU are conventional Hopper GEMM tiles (128x128x64 for 16-bit operands, 128x128x32 for
fp32), not measured optima.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._checks import TRITON_DTYPES, interpreter_enabled

# Element types the kernels accept for activations and weights.
SUPPORTED_DTYPES = TRITON_DTYPES




@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


# The interpreter executes each program with NumPy, so fewer, larger programs are faster,
# but 32 keeps the test shapes (tens of rows) spread over several tiles so the tile-edge
# and mixed active/pruned tile paths are exercised.
_INTERPRETER_GEMM = GemmConfig(32, 32, 32, 4, 4, 1)
_GPU_GEMM_16BIT = GemmConfig(128, 128, 64, 8, 8, 3)
_GPU_GEMM_FP32 = GemmConfig(128, 128, 32, 8, 8, 3)


def gemm_config(dtype: torch.dtype) -> GemmConfig:
    if interpreter_enabled():
        return _INTERPRETER_GEMM
    return _GPU_GEMM_FP32 if dtype == torch.float32 else _GPU_GEMM_16BIT


def dot_precision(op: str = "matmul") -> str:
    """`tl.dot` precision for fp32 operands, following PyTorch's own setting for the same op.

    ``op="matmul"``: ``torch.backends.cuda.matmul.allow_tf32`` (float32 matmul precision
    "high" / "medium"), off by default, as for ``F.linear``. ``op="conv"``:
    ``torch.backends.cudnn.allow_tf32``, on by default, as for ``F.conv2d``. TF32 tensor cores
    when the setting allows them, otherwise full IEEE fp32.
    """
    if interpreter_enabled():
        return "ieee"
    if op == "conv":
        return "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
