"""Launch settings shared by the kernels: tiles, autotuning, and the weight-path policy.

Fixed configurations. Every kernel has one fixed launch configuration per dtype class:
conventional Hopper GEMM tiles (128x128x64 for 16-bit operands, 128x128x32 for fp32), not
measured optima. The interpreter and the tests always use fixed configurations (the interpreter
must never autotune); the interpreter's are smaller (fewer rows per test, more tile edges
exercised), except inside :func:`production_tiles`, which makes it run the GPU tiles: the
work-count harness (``tests/work_count.py``) counts the work of exactly what the GPU issues.

Autotuning (GPU only; opt-in with ``SPAFL_AUTOTUNE=1`` or :func:`autotuning`, off by default
because every candidate is a compile at the first call of every layer shape: minutes for a
ResNet-18). The GEMM launchers go through :func:`launch`, which then wraps the kernel in
``triton.autotune`` over a few candidate tile sizes, warp counts and pipeline depths
(:data:`CANDIDATES`), keyed by every integer argument (shapes and strides) and the dtypes, with
one tuner per kernel family and *density bucket*. The active count lives on the device, so the
bucket comes from what the host knows without a synchronisation: the caller's
``density_hint`` (for instance the density it measured at a previous step), else the bucket
``"unknown"``. Without a hint a layer is tuned at the density of its first call and keeps that
choice; this costs little because the kernels adapt to the density at run time anyway: the
block that straddles the active count runs the narrowest tile class that covers it
(:func:`tail_widths`), whatever the configured block.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .._checks import TRITON_DTYPES, interpreter_enabled

# Element types the kernels accept for activations and weights.
SUPPORTED_DTYPES = TRITON_DTYPES

# The narrowest tile of units (rows of W / filters) a kernel issues tensor-core work for: the
# smallest N of Hopper's wgmma (and of mma.sync) is 8.
MIN_UNITS = 8


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
_GPU_GEMM_FP32 = GemmConfig(128, 128, 32, 8, 8, 3)  # TF32 tensor cores
# IEEE fp32 runs on the FMA units; a 128-wide N tile spills there (offline sm_90 compile).
_GPU_GEMM_FP32_IEEE = GemmConfig(128, 64, 32, 8, 8, 3)


def aligned(*tensors: torch.Tensor, sizes: tuple[int, ...] = ()) -> bool:
    """Whether Triton's launcher will see these operands as 16-aligned: data pointers 16-byte
    aligned, every stride other than 1 and every size in ``sizes`` (the extents the tile masks
    test along contiguous dimensions) a multiple of 16. That is the specialisation under which
    the GEMMs load 16-byte vectors and pipeline them with cp.async; otherwise every element is
    a load of its own with its own address, and the large tiles run out of registers."""
    for t in tensors:
        if t.data_ptr() % 16 or any(st % 16 for st in t.stride() if st != 1):
            return False
    return all(n % 16 == 0 for n in sizes)


_production_tiles_forced = False


@contextlib.contextmanager
def production_tiles() -> Iterator[None]:
    """Within this block the launchers pick the GPU's tiles and launch settings even in the
    interpreter (the dot is still upcast to fp32 there: only the tile sizes change)."""
    global _production_tiles_forced
    previous, _production_tiles_forced = _production_tiles_forced, True
    try:
        yield
    finally:
        _production_tiles_forced = previous


def gpu_tiles() -> bool:
    """Whether launches use the GPU's tile sizes: on the GPU, or under :func:`production_tiles`."""
    return _production_tiles_forced or not interpreter_enabled()


def gemm_config(dtype: torch.dtype, op: str = "matmul") -> GemmConfig:
    """The fixed tiles of a GEMM on ``dtype`` operands (``op`` as for :func:`dot_precision`)."""
    if not gpu_tiles():
        return _INTERPRETER_GEMM
    if dtype != torch.float32:
        return _GPU_GEMM_16BIT
    return _GPU_GEMM_FP32 if dot_precision(op, dtype) == "tf32" else _GPU_GEMM_FP32_IEEE


def dot_precision(op: str = "matmul", dtype: torch.dtype = torch.float32) -> str:
    """`tl.dot` precision for fp32 operands, following PyTorch's own setting for the same op.

    ``op="matmul"``: ``torch.backends.cuda.matmul.allow_tf32`` (float32 matmul precision
    "high" / "medium"), off by default, as for ``F.linear``. ``op="conv"``:
    ``torch.backends.cudnn.allow_tf32``, on by default, as for ``F.conv2d``. TF32 tensor cores
    when the setting allows them, otherwise full IEEE fp32. 16-bit operands: "ieee" (the
    setting means nothing for them; one value keeps one compiled kernel).
    """
    if interpreter_enabled() or dtype != torch.float32:
        return "ieee"
    if op == "conv":
        return "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def tail_widths(block: int) -> dict[str, int]:
    """Tile classes for the block of units that straddles the active count: a kernel with
    ``BLOCK`` units per program computes ``rem`` active units at width ``BLOCK`` if
    ``rem > TAIL1``, else ``TAIL1`` if ``rem > TAIL2``, else ``TAIL2`` if ``rem > TAIL3``, else
    ``TAIL3``: halvings of the block, at least :data:`MIN_UNITS`."""
    return {f"TAIL{i}": max(block >> i, MIN_UNITS) for i in (1, 2, 3)}


def covered_units(active: int, block: int) -> int:
    """Units a kernel with blocks of ``block`` units and the tail classes of :func:`tail_widths`
    issues work for when ``active`` units are active (the work-count harness's model)."""
    full, rem = divmod(active, block)
    if rem == 0:
        return full * block
    widths = [block, *tail_widths(block).values()]
    width = block
    for wider, narrower in zip(widths, widths[1:], strict=False):
        if rem > narrower:
            width = wider
            break
    else:
        width = widths[-1]
    return full * block + width


def sample_block(sample_count: int, block: int) -> int:
    """Reduction step of the sample mode's pruned tiles: the sample rounded up to a power of two,
    at least 16 (the smallest reduction of ``tl.dot``) and at most ``block`` (the step over the
    whole batch). A sample of 8 rows then issues a 16-row step, not a whole ``block``: at a
    batch of 64 the pruned rows' estimate costs a quarter of their exact gradient, not all of it."""
    return min(block, max(16, next_power_of_2(sample_count)))


# ----------------------------------------------------------------------------- persistent grids

# The split of a GEMM's reduction is chosen by the project's cost model (benchmarks/model.py,
# docs/cost-model.md) on an H100 SXM: a program's multiply-adds run at one SM's share of 75% of
# the dense peak, bytes at 85% of 3.35 TB/s. What matters is their ratio: how many bytes of HBM
# traffic take as long as one multiply-add of one program.
_H100_SMS = 132
_H100_PEAK = {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "ieee": 66.9e12}
_H100_BYTES_PER_S = 0.85 * 3.35e12
# The interpreter's tests run the tiny shapes on this many programs, so that splits, the
# persistent loops and their tickets run there too.
_INTERPRETER_PROGRAMS = 8


def bytes_per_mac(dtype: torch.dtype, op: str = "matmul") -> float:
    """HBM bytes that take as long as one multiply-add of one program (see above)."""
    precision = dot_precision(op, dtype) if dtype == torch.float32 else "bf16"
    return 2 * _H100_SMS / (0.75 * _H100_PEAK[precision]) * _H100_BYTES_PER_S


_sm_counts: dict = {}


def grid_programs(device: torch.device) -> int:
    """Programs of a persistent launch: one per SM of a CUDA device; the H100's 132 for any
    other device with the GPU's tiles (:func:`production_tiles`, the offline compile's
    recordings); a few for the interpreter's tests."""
    if not gpu_tiles():
        return _INTERPRETER_PROGRAMS
    if device.type != "cuda":
        return _H100_SMS
    key = (device.type, device.index)
    if key not in _sm_counts:
        _sm_counts[key] = torch.cuda.get_device_properties(device).multi_processor_count
    return _sm_counts[key]


_forced_split: int | None = None


@contextlib.contextmanager
def forced_split(n: int | None) -> Iterator[None]:
    """Within this block the split GEMMs split every reduction ``n`` ways (as far as the
    blocks and programs allow) instead of the cost model's choice; ``None`` restores it. For
    the tests: every split count runs on small shapes."""
    global _forced_split
    previous, _forced_split = _forced_split, n
    try:
        yield
    finally:
        _forced_split = previous


def best_split(tiles: int, blocks: int, block_macs: int, base_bytes: int, slot_bytes: int, programs: int,
               mac_bytes: float) -> int:
    """Into how many parts to split the reduction of ``tiles`` output tiles, each ``blocks``
    reduction blocks of ``block_macs`` multiply-adds, on ``programs`` persistent programs: the
    split the cost model prices fastest. Compute: the waves of units times one unit's
    multiply-adds; bytes: ``base_bytes`` (operands and output) plus, when split, every unit's
    fp32 partial tile (``slot_bytes``) written and read once. Ties go to the smaller split.
    :func:`forced_split` overrides the choice."""
    if tiles <= 0 or blocks <= 1:
        return 1
    most = max(1, min(blocks, programs // tiles))
    if _forced_split is not None:
        return max(1, min(_forced_split, most))
    best, best_cost = 1, None
    for split in range(1, most + 1):
        chunk = cdiv(blocks, split)
        if cdiv(blocks, chunk) != split:
            continue  # the kernels use cdiv(blocks, chunk) parts: the same as a smaller split
        compute = cdiv(tiles * split, programs) * chunk * block_macs * mac_bytes
        traffic = base_bytes + (2 * tiles * split * slot_bytes if split > 1 else 0)
        cost = max(compute, traffic)
        if best_cost is None or cost < best_cost:
            best, best_cost = split, cost
    return best


# ----------------------------------------------------------------------------- weight path


def _channels_last(weight: torch.Tensor) -> bool:
    return weight.dim() == 4 and weight.is_contiguous(memory_format=torch.channels_last)


def use_compact_weight(flag: bool | None, kind: str, weight: torch.Tensor) -> bool:
    """Whether a GEMM first copies the active rows of ``weight`` to a contiguous buffer in its K
    order (``compact``) instead of gathering them inside the tile loads (``gather``).

    ``flag`` (the launchers' ``compact_weight``) decides when given; else the environment
    variable ``SPAFL_COMPACT_WEIGHT``: ``always``, ``never`` or ``auto`` (default). ``auto``
    compacts a convolution weight that is not channels-last, whose channel loads would stride
    by ``kh * kw`` elements: the copy (active filters only) is the layout conversion. Linear
    weights have contiguous rows and gather in the loads.
    """
    if flag is not None:
        return bool(flag)
    policy = os.environ.get("SPAFL_COMPACT_WEIGHT", "auto")
    if policy == "always":
        return True
    if policy == "never":
        return False
    if policy != "auto":
        raise ValueError(f"SPAFL_COMPACT_WEIGHT must be 'auto', 'always' or 'never', got {policy!r}")
    return kind == "conv" and not _channels_last(weight)


# ----------------------------------------------------------------------------- autotuning

# Candidates per kernel family: overrides of the fixed configuration (which is always tried).
# Few on purpose: every candidate is a compile on the GPU's first call of each shape. A deeper
# pipeline, and half the rows on half the warps. None gives a thread a larger output tile than
# the fixed configuration: 4 warps on the full tile, or a 256-wide tile on 8, spill on the
# ragged (unvectorised) and IEEE fp32 configurations (offline sm_90 compile of every candidate,
# tests/aot_compile.py).
CANDIDATES: dict[str, list[dict]] = {
    "linear_fwd": [{"num_stages": 4}, {"BLOCK_M": 64, "num_warps": 4, "num_stages": 4}],
    "linear_dx": [{"num_stages": 4}, {"BLOCK_M": 64, "num_warps": 4, "num_stages": 4}],
    "linear_dw": [{"num_stages": 4}, {"BLOCK_P": 64, "num_warps": 4, "num_stages": 4}],
    "conv_fwd": [{"num_stages": 4}, {"BLOCK_M": 64, "num_warps": 4, "num_stages": 4}],
    "conv_dx": [{"num_stages": 4}, {"BLOCK_M": 64, "num_warps": 4, "num_stages": 4}],
    "conv_dw": [{"num_stages": 4}],
}

# Candidates that spill in one precision only (offline sm_90 compile), dropped there: the
# persistent IEEE fp32 Linear forward with a 4-stage pipeline (19 local-memory instructions;
# 3 stages, the fixed configuration, and the half-row candidate do not spill).
PRECISION_EXCLUDED: dict[tuple[str, str], list[dict]] = {("linear_fwd", "ieee"): [{"num_stages": 4}]}

# The int64-offset variants (``WIDE``: tensors past 2^31 elements) of these families run with
# these blocks halved: 64-bit offsets and bounds take registers, and the fixed tiles spill then
# (offline sm_90 compile; Triton 3.6 also spilled the IEEE fp32 Linear dX with its row block
# halved alone, the persistent IEEE fp32 Linear forward likewise (22 local-memory
# instructions), the IEEE fp32 conv dW, and the 16-bit Linear dW that also writes the pruned
# rows, 26). They never autotune: a compile per candidate for a
# rare shape. (No block that sizes a grid outside the launch: conv dW's pixel block is its
# reduction.)
WIDE_HALVED = {"linear_fwd": ("BLOCK_M", "BLOCK_N"), "linear_dx": ("BLOCK_M", "BLOCK_K"), "linear_dw": ("BLOCK_P",),
               "conv_fwd": ("BLOCK_M",), "conv_dx": ("BLOCK_M",), "conv_dw": ("BLOCK_M",)}

# Meta-parameters whose tail classes follow them.
_TAILED = ("BLOCK_N", "BLOCK_P")

_autotune_override: bool | None = None
_tuners: dict = {}


@contextlib.contextmanager
def autotuning(enabled: bool) -> Iterator[None]:
    """Within this block GPU launches autotune (``True``) or use the fixed configurations
    (``False``), whatever ``SPAFL_AUTOTUNE`` says. The interpreter never autotunes."""
    global _autotune_override
    previous, _autotune_override = _autotune_override, bool(enabled)
    try:
        yield
    finally:
        _autotune_override = previous


def fixed_configs() -> contextlib.AbstractContextManager:
    """Within this block the GPU launches use the fixed configurations (no autotuning)."""
    return autotuning(False)


_every_candidate = False


@contextlib.contextmanager
def every_candidate() -> Iterator[None]:
    """Within this block each tuned launch is issued once per candidate configuration of its
    autotuner (:func:`candidate_metas`), one after the other, with no tuner: what the offline
    compile check (``tests/aot_compile.py``) records to compile every configuration the GPU's
    autotuner may pick. The kernels run several times, so only for recorded launches."""
    global _every_candidate
    previous, _every_candidate = _every_candidate, True
    try:
        yield
    finally:
        _every_candidate = previous


def every_candidate_enabled() -> bool:
    """Whether launches are being recorded once per candidate (:func:`every_candidate`)."""
    return _every_candidate


def wide_config(family: str, fixed: dict, consts: dict) -> dict:
    """``fixed`` with the blocks of :data:`WIDE_HALVED` halved for an int64-offset variant
    (``consts["WIDE"]``), else ``fixed`` itself."""
    if not consts.get("WIDE"):
        return fixed
    halved = {k: fixed[k] // 2 for k in WIDE_HALVED.get(family.rstrip("0123456789"), ()) if fixed[k] > 16}
    for key in _TAILED:  # the tile classes follow their block
        if key in halved and "TAIL1" in fixed:
            halved.update(tail_widths(halved[key]))
    return {**fixed, **halved} if halved else fixed


def autotune_enabled() -> bool:
    if interpreter_enabled():
        return False
    if _autotune_override is not None:
        return _autotune_override
    value = os.environ.get("SPAFL_AUTOTUNE", "0")
    if value not in ("0", "1"):
        raise ValueError(f"SPAFL_AUTOTUNE must be '0' or '1', got {value!r}")
    return value == "1"


DENSITY_BUCKETS = (0.125, 0.25, 0.5, 1.0)


def density_bucket(hint: float | None) -> str:
    """``"unknown"`` without a hint, else the smallest of :data:`DENSITY_BUCKETS` >= ``hint``."""
    if hint is None:
        return "unknown"
    return f"<={next(b for b in DENSITY_BUCKETS if hint <= b)}"


def _per_warp_tile(meta: dict) -> float:
    """The elements of a configuration's blocks per warp: what a thread holds grows with it."""
    return math.prod(v for k, v in meta.items() if k.startswith("BLOCK_")) / meta["num_warps"]


def candidate_metas(family: str, fixed: dict, limits: dict | None = None, fixed_keys: tuple = ()) -> list[dict]:
    """The fixed configuration, then each candidate of ``family`` applied over it, without
    duplicates, without overrides of ``fixed_keys``, and without blocks above ``limits``
    (a block larger than the dimension it tiles only adds masked work)."""
    metas = [dict(fixed)]
    for override in CANDIDATES.get(family.rstrip("0123456789"), []):
        if any(k in fixed_keys or k not in fixed for k in override):
            continue
        meta = {**fixed, **override}
        for key in _TAILED:
            if key in override:
                meta.update(tail_widths(meta[key]))
        if limits and any(meta[k] > v and meta[k] > fixed[k] for k, v in limits.items()):
            continue
        if _per_warp_tile(meta) > _per_warp_tile(fixed):
            # Fewer warps on a block that did not shrink as much: a larger tile per thread,
            # which spills where the fixed one fits (e.g. the IEEE fp32 dW, whose fixed unit
            # block is already the candidate's).
            continue
        if meta not in metas:
            metas.append(meta)
    return metas


def launches_once(consts: dict) -> bool:
    """Whether :func:`launch` with these constexprs launches its kernel exactly once (no tuner,
    no recording of every candidate): then the launch may carry writes that must happen once."""
    return bool(consts.get("WIDE")) or not (_every_candidate or autotune_enabled())


def launch(
    kernel,
    family: str,
    grid: Callable[[dict], tuple],
    fixed: dict,
    args: tuple,
    consts: dict,
    *,
    dtype: torch.dtype,
    rows: int,
    density_hint: float | None,
    fixed_keys: tuple = (),
    limits: dict | None = None,
) -> None:
    """Launch ``kernel(*args, **consts)`` with the meta-parameters ``fixed`` (block sizes,
    ``num_warps``, ``num_stages``), or through its autotuner (see the module docstring). ``rows``
    (the batch dimension) and ``dtype`` only name the tuner; the tuner's key is every integer
    argument. The int64-offset variants (``consts["WIDE"]``) take the fixed configuration with
    the blocks of :data:`WIDE_HALVED` halved, never a tuner."""
    wide = bool(consts.get("WIDE"))
    fixed = wide_config(family, fixed, consts)
    precision = consts.get("DOT_PRECISION") if dtype == torch.float32 else None
    excluded = [{**fixed, **o} for o in PRECISION_EXCLUDED.get((family.rstrip("0123456789"), precision), [])]
    if wide or _every_candidate or not autotune_enabled():
        for chosen in ([m for m in candidate_metas(family, fixed, limits, fixed_keys) if m not in excluded]
                       if _every_candidate and not wide else [fixed]):
            meta = dict(chosen)
            warps, stages = meta.pop("num_warps"), meta.pop("num_stages")
            kernel[grid(chosen)](*args, **consts, **meta, num_warps=warps, num_stages=stages)
        return
    import triton

    metas = [m for m in candidate_metas(family, fixed, limits, fixed_keys) if m not in excluded]
    ident = (kernel.fn.__name__ if hasattr(kernel, "fn") else id(kernel), family, density_bucket(density_hint),
             str(dtype), tuple(tuple(sorted(m.items())) for m in metas))
    tuner = _tuners.get(ident)
    if tuner is None:
        configs = []
        for meta in metas:
            meta = dict(meta)
            warps, stages = meta.pop("num_warps"), meta.pop("num_stages")
            configs.append(triton.Config(meta, num_warps=warps, num_stages=stages))
        key = [name for name, value in zip(kernel.arg_names, args, strict=False)
               if isinstance(value, int) and not isinstance(value, bool)]
        tuner = _tuners[ident] = triton.autotune(configs=configs, key=key)(kernel)
    tuner[grid](*args, **consts)


# ----------------------------------------------------------------------------- per-shape plans


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for the host side of the launchers (``triton.cdiv`` is a constexpr
    function in Triton 3.9, several microseconds a call)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 ``>= n`` (1 for ``n <= 1``), on the host."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def launch_settings() -> tuple:
    """What a launcher's plan depends on besides the operands: the interpreter, the tiles, the
    autotuning switch, the weight-path policy and PyTorch's TF32 settings. Part of every plan's
    key, so that changing one of them (in a test, or ``torch.backends``) takes effect at once."""
    return (*_plan_environment(), _production_tiles_forced, _autotune_override, _forced_split,
            _cublas_tf32(), _cudnn_tf32())


# The variables a plan depends on (TRITON_INTERPRET, SPAFL_AUTOTUNE, SPAFL_COMPACT_WEIGHT), read at
# every launch: through `os.environ.get` the three cost ~5 us a launch (each decodes the value),
# half of this function; from the mapping behind `os.environ` (POSIX: raw bytes, updated by every
# write through `os.environ`, as `os.environ.get` is) a few hundred nanoseconds. Their raw values
# key the plans: distinct spellings of one setting only make distinct (equal) plans.
_PLAN_VARIABLES = ("TRITON_INTERPRET", "SPAFL_AUTOTUNE", "SPAFL_COMPACT_WEIGHT")
_RAW_ENVIRON = getattr(os.environ, "_data", None)
if os.name == "posix" and isinstance(_RAW_ENVIRON, dict):
    _RAW_KEYS = tuple(os.fsencode(name) for name in _PLAN_VARIABLES)

    def _plan_environment(_get=_RAW_ENVIRON.get, _keys=_RAW_KEYS) -> tuple:
        return (_get(_keys[0]), _get(_keys[1]), _get(_keys[2]))
else:
    def _plan_environment() -> tuple:
        return tuple(os.environ.get(name) for name in _PLAN_VARIABLES)

# (torch.backends' properties end in these getters, through a Python __getattr__ that costs ~2 us)
_cublas_tf32 = torch._C._get_cublas_allow_tf32
_cudnn_tf32 = torch._C._get_cudnn_allow_tf32


_PLANS: dict[tuple, object] = {}


def cached_plan(key: tuple, build: Callable[[], object]):
    """The launch plan of ``key`` (a launcher's name, the operands' shapes, strides, dtypes and
    alignment, its flags and :func:`launch_settings`): built by ``build`` at the first call of a
    shape and reused after, so that a call spends no time on what depends only on these."""
    found = _PLANS.get(key)
    if found is None:
        if len(_PLANS) >= 4096:  # (a caller cycling through many shapes must not grow it forever)
            _PLANS.clear()
        found = _PLANS[key] = build()
    return found


def aligned16(t: torch.Tensor) -> bool:
    """Whether ``t``'s data pointer is 16-byte aligned (part of a plan's key: see :func:`aligned`)."""
    return t.data_ptr() % 16 == 0


def run(kernel, grid: tuple, args: tuple, kwargs: dict) -> None:
    """``kernel[grid](*args, **kwargs)``: a planned launch with the fixed configuration."""
    kernel[grid](*args, **kwargs)
