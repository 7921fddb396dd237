"""Input validation shared by the functional API and the layers.

Every check here reads only tensor metadata (shape, dtype, device) except the finiteness
check of the thresholds and of the weights' row scores, which needs the values: on CPU it is
free and on by default, on CUDA it costs a device synchronisation, so there it runs only when
asked for (``check_finite=True``).
"""

from __future__ import annotations

import importlib.util
import math
import os
from typing import NamedTuple

import torch

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# Whether Triton is installed, decided once at import without importing it (slow). A constant
# rather than a cached function: torch.compile reads a global, where it warns about caches.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _TRITON_INSTALLED


def interpreter_enabled() -> bool:
    """True when Triton runs kernels on the CPU through its NumPy interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _well_formed(x, weight, threshold, bias, weight_dim: int, x_min_dim: int) -> bool:
    """The common case of :func:`check_layer_inputs` in a few comparisons; False sends the call
    through the checks that name what is wrong."""
    if type(x) is not torch.Tensor or type(weight) is not torch.nn.Parameter and type(weight) is not torch.Tensor:
        return False
    dtype, device, n_out = weight.dtype, weight.device, weight.shape[0]
    return (
        isinstance(threshold, torch.Tensor)
        and x.dtype == dtype
        and dtype.is_floating_point
        and weight.dim() == weight_dim
        and x.dim() >= x_min_dim
        and threshold.shape == (n_out,)
        and threshold.dtype.is_floating_point
        and weight.numel() > 0
        and x.device == device
        and threshold.device == device
        and (bias is None or (isinstance(bias, torch.Tensor) and bias.dtype == dtype and bias.shape == (n_out,)
                              and bias.device == device))
    )


def resolve_check_finite(check_finite: bool | None, device: torch.device) -> bool:
    """``check_finite`` of the layers and the functional API: None means on for CPU tensors (the
    check is free there) and off elsewhere (on CUDA it synchronises with the host)."""
    if check_finite is not None and not isinstance(check_finite, bool):
        raise TypeError(f"check_finite must be None or a bool, got {check_finite!r}")
    return device.type == "cpu" if check_finite is None else check_finite


def check_threshold_values(threshold: torch.Tensor, check_finite: bool | None) -> None:
    """Reject NaN / inf thresholds (see the module docstring for when this runs)."""
    if resolve_check_finite(check_finite, threshold.device):
        check_finite_values(threshold)


def check_finite_values(threshold: torch.Tensor, score: torch.Tensor | None = None) -> None:
    """Reject NaN / inf thresholds and, given the row scores (``mean |w|`` per unit), units whose
    weights hold a NaN or an inf (their score is not finite). Meta tensors have no values to check."""
    if threshold.device.type == "meta":
        return
    # One synchronisation in the common case: a finite sum means finite values (the elementwise
    # tests below run only when the sum is not finite, which overflow alone can also cause).
    total = threshold.detach().sum(dtype=torch.float64)
    if score is not None:
        total = total + score.sum(dtype=torch.float64)
    if math.isfinite(float(total)):
        return
    bad = _non_finite_units(threshold.detach())
    if bad:
        raise ValueError(f"threshold has non-finite values (NaN or inf) at units {bad}")
    bad = _non_finite_units(score) if score is not None else []
    if bad:
        raise ValueError(
            f"weight has non-finite values (NaN or inf) in units {bad}; with check_finite=False a unit whose "
            "weights hold a NaN counts as pruned (its output is its bias) and one holding an inf stays active"
        )


def _non_finite_units(t: torch.Tensor) -> list[int]:
    return (~torch.isfinite(t)).nonzero().flatten()[:8].tolist()


def check_weight_and_threshold(
    weight: torch.Tensor, threshold: torch.Tensor, *, op: str, weight_dim: int | None = None
) -> None:
    """``weight [out, fan_in...]`` (exactly ``weight_dim``-D if given) and ``threshold [out]``:
    tensors, non-empty, floating point, on one device."""
    _tensor("weight", weight)
    _tensor("threshold", threshold)
    if weight_dim is not None and weight.dim() != weight_dim:
        raise ValueError(f"{op}: weight must be {weight_dim}-D, got shape {tuple(weight.shape)}")
    if weight.dim() < 2:
        raise ValueError(f"{op}: weight must have at least 2 dimensions [out, fan_in...], got {tuple(weight.shape)}")
    if any(s == 0 for s in weight.shape):
        raise ValueError(f"{op}: weight must not be empty, got shape {tuple(weight.shape)}")
    n_out = weight.shape[0]
    if threshold.shape != (n_out,):
        raise ValueError(
            f"{op}: threshold must have shape ({n_out},), one value per output unit; got {tuple(threshold.shape)}"
        )
    for name, t in (("weight", weight), ("threshold", threshold)):
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
    if weight.device != threshold.device:
        raise ValueError(f"{op}: weight is on {weight.device} but threshold is on {threshold.device}")


def check_layer_inputs(
    x: torch.Tensor,
    weight: torch.Tensor,
    threshold: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    op: str,
    weight_dim: int,
    x_min_dim: int,
) -> None:
    """Shape / dtype / device checks common to the threshold layers (the caller checks that the
    feature dimension of ``x`` matches the weight, which differs between Linear and Conv2d)."""
    if _well_formed(x, weight, threshold, bias, weight_dim, x_min_dim):
        return
    _tensor("x", x)
    check_weight_and_threshold(weight, threshold, op=op, weight_dim=weight_dim)
    n_out = weight.shape[0]
    if x.dim() < x_min_dim:
        raise ValueError(f"{op}: x must have at least {x_min_dim} dimension(s), got shape {tuple(x.shape)}")
    if bias is not None:
        _tensor("bias", bias)
        if bias.shape != (n_out,):
            raise ValueError(f"{op}: bias must have shape ({n_out},), got {tuple(bias.shape)}")
    for name, t in (("x", x), ("bias", bias)):
        if t is not None and not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
    if x.dtype != weight.dtype:
        raise TypeError(
            f"{op}: x is {x.dtype} but weight is {weight.dtype}; cast one of them "
            "(the dense layer has the same rule) or run under torch.autocast"
        )
    if bias is not None and bias.dtype != weight.dtype:
        raise TypeError(f"{op}: bias is {bias.dtype} but weight is {weight.dtype}")
    named = (("x", x), ("weight", weight), ("threshold", threshold), ("bias", bias))
    if len({t.device for _, t in named if t is not None}) > 1:
        where = ", ".join(f"{n}={t.device}" for n, t in named if t is not None)
        raise ValueError(f"{op}: all tensors must be on the same device, got {where}")


class Route(NamedTuple):
    """Where a call runs: the backend of the row mask (from the master weight), the backend of
    the products (from the operands, which autocast may have cast) and whether the products need
    the mask's compact index list."""

    mask: str
    compute: str
    with_perm: bool


def route(backend: str, weight: torch.Tensor, op_dtype: torch.dtype | None = None, groups: int = 1) -> Route:
    """The one dispatch point of the threshold ops: the :class:`Route` of a call whose options
    name ``backend``, for the master ``weight`` and operands of ``op_dtype`` (default: the
    weight's). Decided once per (backend, device type, dtypes, groups, interpreter) and cached;
    errors (a backend that cannot run there) are raised every time."""
    dtype = weight.dtype
    op_dtype = dtype if op_dtype is None else op_dtype
    # (the interpreter matters to backend="triton" alone; reading the environment costs more
    # than the rest of this function)
    key = (backend, weight.device.type, dtype, op_dtype, groups, backend == "triton" and interpreter_enabled())
    found = _ROUTES.get(key)
    if found is None:
        found = _ROUTES[key] = _route(*key)
    return found


# (a dict rather than functools.lru_cache: dynamo traces through it without a warning)
_ROUTES: dict[tuple, Route] = {}


def _route(backend: str, device_type: str, dtype: torch.dtype, op_dtype: torch.dtype, groups: int,
           interpreter: bool) -> Route:
    compute = _resolve(backend, device_type, op_dtype, interpreter)
    if compute == "triton" and groups != 1:
        if backend == "triton":
            raise ValueError(
                f"backend='triton' supports groups=1, got groups={groups}; grouped and depthwise convolutions "
                "run on backend='compact' or 'reference' ('auto' picks the reference on CUDA)"
            )
        compute = "reference"
    mask = compute if dtype == op_dtype else _resolve(backend, device_type, dtype, interpreter)
    return Route(mask, compute, compute == "triton")


def resolve_backend(backend: str, weight: torch.Tensor) -> str:
    """The backend that runs ``backend`` for ``weight`` (see :func:`route`)."""
    return route(backend, weight).compute


def _resolve(backend: str, device_type: str, dtype: torch.dtype, interpreter: bool) -> str:
    """Pick the implementation. ``auto``: Triton for CUDA tensors it supports (fp32 / fp16 /
    bf16, Triton installed), the compacting plain-PyTorch path for CPU tensors, the reference
    otherwise (it never synchronises with the device). ``compact`` and ``reference`` run on any
    device; ``triton`` insists (and explains why it cannot run)."""
    if backend in ("reference", "compact"):
        return backend
    on_cuda = device_type == "cuda"
    if backend == "auto":
        if device_type == "cpu":
            return "compact"
        ok = on_cuda and dtype in TRITON_DTYPES and triton_available()
        return "triton" if ok else "reference"
    if not triton_available():
        raise RuntimeError("backend='triton' needs the triton package (pip install 'spafl[triton]')")
    if not on_cuda and not interpreter:
        raise ValueError(
            f"backend='triton' runs on CUDA tensors, got tensors on {device_type}; use backend='auto' or "
            "'compact' on CPU (or set TRITON_INTERPRET=1 before importing spafl to run the kernels in "
            "Triton's interpreter, for testing)"
        )
    if dtype not in TRITON_DTYPES:
        raise TypeError(
            f"backend='triton' supports {TRITON_DTYPES}, got {dtype}; use backend='compact' or 'reference'"
        )
    return "triton"
