"""Cost model of every device launch of a layer call or a training step, priced on H100 / H200.

    python benchmarks/model.py layers --out benchmarks/results/model            # every benchmark layer
    python benchmarks/model.py layers -k 4096 --breakdown                       # one launch per line
    python benchmarks/model.py steps --out benchmarks/results/model             # LeNet-5, Conv4, ResNet-18
    python benchmarks/model.py pair --measured OUT/kernels.csv --device h100 --out OUT/model_pairs.csv

What is counted (docs/cost-model.md has the formulas, the peaks and the limits):

* Triton launches run in Triton's interpreter at the GPU's tiles (``production_tiles()``): per
  launch the programs (grid size), the ``tl.dot`` multiply-adds every program issues (a program
  that exits early issues none), and the unique bytes it loads and stores, counted in 32-byte
  sectors from the addresses of every unmasked lane.
* PyTorch ops outside the kernels (fills, copies, layout changes, reductions, GEMMs, elementwise)
  through a ``TorchDispatchMode``: GEMM / convolution multiply-adds from the shapes, bytes =
  every tensor input and output rounded up to whole sectors, one launch each; views and
  allocations launch nothing.
* Each launch costs ``launch + max(compute, memory)``: a Triton launch's compute is
  ``ceil(programs issuing MACs / SMs) x the largest program's MACs`` at ``compute_efficiency``
  of one SM's share of the dense peak; a PyTorch op's is its MACs at that efficiency of the whole
  machine; memory is the bytes at ``memory_efficiency`` of the HBM bandwidth.

Interpreter time: the convolution GEMM launches (forward, dX, dW) are counted from their grids
and loop bounds by benchmarks/conv_count.py, the Linear kernels, the finish pass and the row
mask by benchmarks/linear_count.py, their address sets formed at once in NumPy and their
outputs written by plain torch (tests/test_cost_model.py checks every field of every launch
against the interpreter); every other launch runs in the interpreter.

No GPU ran anything here: every figure is a model.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

import argparse  # noqa: E402
import csv  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterable  # noqa: E402
from dataclasses import dataclass, replace  # noqa: E402
from fractions import Fraction  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import conv_count  # noqa: E402  (the convolution GEMM launches counted without the interpreter)
import linear_count  # noqa: E402  (the Linear kernels and the row mask, likewise)

import kernels as bench_kernels  # noqa: E402  (benchmarks/kernels.py: the benchmark cases)

SECTOR = 32  # bytes: the DRAM / L2 access granularity of Hopper

# ----------------------------------------------------------------------------- devices


@dataclass(frozen=True)
class DeviceSpec:
    """Published peaks of one GPU (dense, no structured sparsity) and the model's efficiencies."""

    name: str
    sms: int
    memory_bytes_per_s: float
    bf16_flops: float
    fp16_flops: float
    tf32_flops: float
    fp32_flops: float  # IEEE fp32 on the FMA units
    compute_efficiency: float = 0.75
    memory_efficiency: float = 0.85
    launch_s: float = 2e-6

    def peak(self, precision: str) -> float:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        return getattr(self, f"{precision}_flops")


PRECISIONS = ("bf16", "fp16", "tf32", "fp32")
# NVIDIA H100 / H200 datasheets (SXM): BF16/FP16 tensor 1979 TFLOP/s and TF32 989 TFLOP/s with 2:4
# sparsity, i.e. 989.4 and 494.7 dense; FP32 67 TFLOP/s; HBM3 3.35 TB/s, HBM3e 4.8 TB/s; 132 SMs.
DEVICES = {
    "h100": DeviceSpec("NVIDIA H100 SXM5 (modelled)", 132, 3.35e12, 989.4e12, 989.4e12, 494.7e12, 66.9e12),
    "h200": DeviceSpec("NVIDIA H200 SXM (modelled)", 132, 4.8e12, 989.4e12, 989.4e12, 494.7e12, 66.9e12),
}


# ----------------------------------------------------------------------------- launches


@dataclass
class Launch:
    """One device launch (or, for a multi-tensor ``_foreach`` op, ``launches`` of them)."""

    phase: str  # fwd / bwd / step ...
    source: str  # "triton" or "torch"
    name: str
    precision: str = ""  # of the multiply-adds ("" when it issues none)
    programs: int = 0  # Triton: grid size; PyTorch ops are priced on the whole machine
    mac_programs: int = 0  # programs that issued at least one tl.dot
    macs: int = 0
    max_program_macs: int = 0
    read_bytes: int = 0  # unique sectors loaded x 32
    write_bytes: int = 0  # unique sectors stored x 32
    launches: int = 1

    @property
    def bytes(self) -> int:
        return self.read_bytes + self.write_bytes


INT_FIELDS = ("programs", "mac_programs", "macs", "max_program_macs", "read_bytes", "write_bytes", "launches")


@dataclass(frozen=True)
class Cost:
    waves: int
    compute_s: float
    memory_s: float
    seconds: float


def price(launch: Launch, spec: DeviceSpec) -> Cost:
    """``launches x launch_s + max(compute, memory)`` (see the module docstring)."""
    memory = launch.bytes / (spec.memory_bytes_per_s * spec.memory_efficiency)
    compute = 0.0
    if launch.macs:
        rate = spec.peak(launch.precision) * spec.compute_efficiency  # flop/s of the whole machine
        if launch.source == "triton":
            compute = math.ceil(launch.mac_programs / spec.sms) * launch.max_program_macs * 2 / (rate / spec.sms)
        else:
            compute = launch.macs * 2 / rate
    waves = math.ceil(launch.programs / spec.sms) if launch.source == "triton" else 0
    return Cost(waves, compute, memory, launch.launches * spec.launch_s + max(compute, memory))


def total_seconds(launches: Iterable[Launch], spec: DeviceSpec) -> float:
    """Launches run one after the other: no overlap between them."""
    return sum(price(la, spec).seconds for la in launches)


# ----------------------------------------------------------------------------- precision


def gpu_precision(dtype: torch.dtype, op: str) -> str:
    """The precision a CUDA run uses for multiply-adds on ``dtype`` operands: 16-bit as is; fp32
    follows PyTorch's settings as the kernels and cuBLAS / cuDNN do (``op`` "matmul" or "conv")."""
    if dtype == torch.bfloat16:
        return "bf16"
    if dtype == torch.float16:
        return "fp16"
    allow = torch.backends.cudnn.allow_tf32 if op == "conv" else torch.backends.cuda.matmul.allow_tf32
    return "tf32" if allow else "fp32"


# ----------------------------------------------------------------------------- the recorder


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a launch moves for ``t``: the span of storage its elements cover (broadcast strides
    count once), rounded up to whole sectors."""
    if t.numel() == 0:
        return 0
    span = 1 + sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride(), strict=True))
    n = min(span, t.numel()) if any(st == 0 for st in t.stride()) else span
    return -(-n * t.element_size() // SECTOR) * SECTOR


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


aten = torch.ops.aten
# Ops that launch nothing on the device: allocations, metadata, host reads.
_NO_LAUNCH = {aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default, aten.new_empty.default,
              aten.new_empty_strided.default, aten.lift_fresh.default, aten.set_.source_Storage_storage_offset,
              aten.set_.source_Storage, aten._local_scalar_dense.default, aten.detach.default,
              aten.resize_.default, aten._has_compatible_shallow_copy_type.default,
              aten._unsafe_view.default}  # a view the schema does not annotate (reshape's result)
# In-place ops that overwrite their first argument without reading it.
_WRITE_ONLY = {aten.zero_.default, aten.fill_.Scalar, aten.fill_.Tensor, aten.copy_.default, aten.normal_.default,
               aten.uniform_.default, aten.random_.default, aten.bernoulli_.float}
# Tensors per launch of PyTorch's multi-tensor apply, by the number of tensor lists (depth); and
# 320 blocks of 65536 elements at most per launch.
_FOREACH_TENSORS = {1: 110, 2: 64, 3: 48, 4: 36, 5: 30}
_FOREACH_CHUNK, _FOREACH_BLOCKS = 65536, 320


def _is_view(func) -> bool:
    return any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)


class _DispatchRecorder(TorchDispatchMode):
    def __init__(self, recorder: Recorder):
        super().__init__()
        self.recorder = recorder

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self.recorder._in_kernel:
            self.recorder._torch_op(func, args, kwargs, out)
        return out


# Count the convolution GEMM launches from their grids (benchmarks/conv_count.py) instead of
# interpreting every program; ``--interpret-conv`` (or False here) interprets them. Likewise the
# Linear kernels, the finish pass and the row mask (benchmarks/linear_count.py; ``--interpret-linear``).
FAST_CONV = True
FAST_LINEAR = True


class Recorder:
    """``with Recorder() as rec: ...`` then ``rec.launches``: every device launch in the block,
    in order. ``rec.phase = "bwd"`` labels the launches that follow. ``fast_conv`` (default
    :data:`FAST_CONV`): the convolution GEMM launches are counted by ``conv_count`` and their
    outputs written by plain torch; ``fast_linear`` (default :data:`FAST_LINEAR`): the same for
    the launches ``linear_count`` knows; every other launch runs in the interpreter."""

    def __init__(self, fast_conv: bool | None = None, fast_linear: bool | None = None) -> None:
        self.fast_conv = FAST_CONV if fast_conv is None else fast_conv
        self.fast_linear = FAST_LINEAR if fast_linear is None else fast_linear
        self.fast_launches = 0  # launches counted by conv_count or linear_count
        self.launches: list[Launch] = []
        self.phase = ""
        self.syncs = 0  # host reads of device values (.item()): no launch, but a stall on a GPU
        self._host: set[int] = set()  # data pointers of tensors that live on the host on CUDA
        self._in_kernel = False
        self._current: Launch | None = None
        self._program_macs = 0
        self._reads: list[np.ndarray] = []
        self._writes: list[np.ndarray] = []
        self._restore: list[Callable[[], None]] = []
        self._mode: _DispatchRecorder | None = None

    def host_tensors(self, tensors: Iterable[torch.Tensor]) -> None:
        """Mark tensors that a CUDA run keeps on the host (``torch.optim``'s step counters): ops
        on them and 0-dim values launch nothing, and reading them is no synchronisation."""
        self._host.update(t.data_ptr() for t in tensors)

    def _on_host(self, tensors: list[torch.Tensor]) -> bool:
        if not self._host:
            return False
        ptrs = [t.data_ptr() for t in tensors]
        return any(p in self._host for p in ptrs) and all(
            p in self._host or t.dim() == 0 for p, t in zip(ptrs, tensors, strict=True))

    # --- PyTorch ops
    def _torch_op(self, func, args, kwargs, out) -> None:
        name = func.name().replace("aten::", "")
        ins = _tensors(list(args) + list(kwargs.values()))
        outs = _tensors(out)
        if self._on_host(ins + outs):
            return
        if func in _NO_LAUNCH or _is_view(func):
            if func is aten._local_scalar_dense.default:
                self.syncs += 1
            return
        if not ins and not outs:  # no device data (profiler markers and the like)
            return
        # Written: the arguments the schema marks as mutated (in-place and out= variants), and
        # the outputs; the same tensor once.
        mutated = [t for a, v in zip(func._schema.arguments, args, strict=False)
                   if a.alias_info is not None and a.alias_info.is_write for t in _tensors(v)]
        mutated += [t for a in func._schema.arguments if a.name in kwargs and a.alias_info is not None
                    and a.alias_info.is_write for t in _tensors(kwargs[a.name])]
        writes = list({(t.data_ptr(), t.shape, t.stride()): t for t in mutated + outs}.values())
        reads = ins[1:] if func in _WRITE_ONLY else ins
        rb = sum(tensor_bytes(t) for t in reads)
        wb = sum(tensor_bytes(t) for t in writes)
        if name.startswith("_foreach_"):
            lists = [a for a in args if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor)]
            depth = len(lists) + (0 if name.endswith("_") else 1)
            n = len(lists[0]) if lists else 1
            chunks = sum(-(-t.numel() // _FOREACH_CHUNK) for t in (lists[0] if lists else []))
            count = max(1, -(-n // _FOREACH_TENSORS.get(depth, 30)), -(-chunks // _FOREACH_BLOCKS))
            self.launches.append(Launch(self.phase, "torch", name, read_bytes=rb, write_bytes=wb, launches=count))
            return
        if func in (aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default):
            a, b = (args[0], args[1]) if func in (aten.mm.default, aten.bmm.default) else (args[1], args[2])
            macs = a.numel() * b.shape[-1]
            self.launches.append(Launch(self.phase, "torch", name, gpu_precision(a.dtype, "matmul"), macs=macs,
                                        read_bytes=rb, write_bytes=wb))
            return
        if func is aten.convolution.default:
            x, w = args[0], args[1]
            macs = math.prod(out.shape) * math.prod(w.shape[1:])  # w: [out, in / groups, kh, kw]
            self.launches.append(Launch(self.phase, "torch", name, gpu_precision(x.dtype, "conv"), macs=macs,
                                        read_bytes=rb, write_bytes=wb))
            return
        if func is aten.convolution_backward.default:
            dy, x, w, mask = args[0], args[1], args[2], args[10]
            macs = math.prod(dy.shape) * math.prod(w.shape[1:])
            prec = gpu_precision(x.dtype, "conv")
            by = tensor_bytes
            if mask[0]:
                self.launches.append(Launch(self.phase, "torch", "convolution_backward.dgrad", prec, macs=macs,
                                            read_bytes=by(dy) + by(w), write_bytes=by(out[0])))
            if mask[1]:
                self.launches.append(Launch(self.phase, "torch", "convolution_backward.wgrad", prec, macs=macs,
                                            read_bytes=by(dy) + by(x), write_bytes=by(out[1])))
            if mask[2]:
                self.launches.append(Launch(self.phase, "torch", "convolution_backward.bias", read_bytes=by(dy),
                                            write_bytes=by(out[2])))
            return
        self.launches.append(Launch(self.phase, "torch", name, read_bytes=rb, write_bytes=wb))

    # --- Triton launches (the interpreter's builder, as tests/work_count.py wraps it)
    def _access(self, ptrs, mask, write: bool) -> None:
        # Elements are naturally aligned and at most 8 bytes wide: none straddles a sector.
        addr = ptrs.data if mask is None else ptrs.data[mask.data]
        if addr.size:
            (self._writes if write else self._reads).append(np.unique(addr.astype(np.int64, copy=False) // SECTOR))

    def _end_program(self) -> None:
        cur = self._current
        if cur is not None and self._program_macs:
            cur.mac_programs += 1
            cur.max_program_macs = max(cur.max_program_macs, self._program_macs)
        self._program_macs = 0

    def __enter__(self) -> Recorder:
        import dataclasses

        from triton.runtime import interpreter as interp

        rec = self
        builder = interp.interpreter_builder
        dot, load, store = builder.create_dot, builder.create_masked_load, builder.create_masked_store
        rmw, cas = builder.create_atomic_rmw, builder.create_atomic_cas
        set_idx = builder.set_grid_idx
        call = interp.GridExecutor.__call__

        def create_dot(a, b, d, *args):
            macs = int(a.data.size) * int(b.data.shape[-1])
            rec._current.macs += macs
            rec._program_macs += macs
            return dot(a, b, d, *args)

        def create_masked_load(ptrs, mask, other, *args):
            rec._access(ptrs, mask, False)
            return load(ptrs, mask, other, *args)

        def create_masked_store(ptrs, value, mask, *args):
            rec._access(ptrs, mask, True)
            return store(ptrs, value, mask, *args)

        def create_atomic_rmw(op, ptr, val, mask, *args):
            rec._access(ptr, mask, False)
            rec._access(ptr, mask, True)
            return rmw(op, ptr, val, mask, *args)

        def create_atomic_cas(ptr, cmp, val, *args):
            rec._access(ptr, None, False)
            rec._access(ptr, None, True)
            return cas(ptr, cmp, val, *args)

        def set_grid_idx(x, y, z):
            rec._end_program()
            rec._current.programs += 1
            return set_idx(x, y, z)

        def grid_call(executor, *args, **kwargs):
            name = executor.fn.__name__
            floats = [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
            prec = gpu_precision(floats[0].dtype, "conv" if "conv" in name else "matmul") if floats else ""
            rec._current = Launch(rec.phase, "triton", name, prec)
            rec._reads, rec._writes, rec._program_macs = [], [], 0
            rec._in_kernel = True
            counters = [c.count for c, on in ((conv_count, rec.fast_conv), (linear_count, rec.fast_linear)) if on]
            if counters:
                # (its reference ops run inside the launch: the dispatch mode does not record them)
                counted = None
                try:
                    for counter in counters:
                        counted = counter(executor, args, kwargs)
                        if counted is not None:
                            break
                except BaseException:
                    rec._current, rec._in_kernel = None, False
                    raise
                if counted is not None:
                    cur = replace(rec._current, **counted)
                    if not cur.macs:
                        cur.precision = ""
                    rec.launches.append(cur)
                    rec.fast_launches += 1
                    rec._current, rec._in_kernel = None, False
                    return None
            try:
                return call(executor, *args, **kwargs)
            finally:
                rec._end_program()
                cur = rec._current
                if not cur.macs:
                    cur.precision = ""
                cur.read_bytes = SECTOR * (np.unique(np.concatenate(rec._reads)).size if rec._reads else 0)
                cur.write_bytes = SECTOR * (np.unique(np.concatenate(rec._writes)).size if rec._writes else 0)
                rec.launches.append(cur)
                rec._current, rec._reads, rec._writes, rec._in_kernel = None, [], [], False

        builder.create_dot = create_dot
        builder.create_masked_load = create_masked_load
        builder.create_masked_store = create_masked_store
        builder.create_atomic_rmw = create_atomic_rmw
        builder.create_atomic_cas = create_atomic_cas
        builder.set_grid_idx = set_grid_idx
        interp.GridExecutor.__call__ = grid_call
        # Integer-overflow checks make the interpreter several times slower; counts do not need them.
        options = builder.options
        builder.options = dataclasses.replace(options, sanitize_overflow=False)
        names = ("create_dot", "create_masked_load", "create_masked_store", "create_atomic_rmw", "create_atomic_cas",
                 "set_grid_idx")
        self._restore = [lambda: [delattr(builder, n) for n in names],
                         lambda: setattr(interp.GridExecutor, "__call__", call),
                         lambda: setattr(builder, "options", options)]
        self._mode = _DispatchRecorder(self)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
        for undo in self._restore:
            undo()


def record(fn: Callable[[], object], phase: str, rec: Recorder | None = None) -> tuple[list[Launch], object]:
    """The launches of ``fn()`` (at the GPU's tiles) and its result."""
    from spafl.kernels import _config

    own = rec is None
    rec = rec or Recorder()
    start = len(rec.launches)
    rec.phase = phase
    with _config.production_tiles():
        if own:
            with rec:
                out = fn()
        else:
            out = fn()
    return rec.launches[start:], out


# ----------------------------------------------------------------------------- extrapolation


def bilinear(probes: dict[tuple[int, int], list[Launch]], target: tuple[int, int]) -> list[Launch]:
    """Launches at ``target = (a, b)`` from the launches at the four probe sizes ``{(a_i, b_j)}``:
    every integer field of every launch fitted as ``c0 + c1 a + c2 b + c3 a b``, which is exact
    when each count is bilinear in the two sizes (checked by the tests for the Linear layers at
    multiples of 128). The launch sequences of the probes must match (names and phases)."""
    (a1, a2), (b1, b2) = sorted({k[0] for k in probes}), sorted({k[1] for k in probes})
    runs = [probes[(a1, b1)], probes[(a2, b1)], probes[(a1, b2)], probes[(a2, b2)]]
    shape = [[(la.phase, la.name, la.precision) for la in run] for run in runs]
    if any(s != shape[0] for s in shape):
        raise ValueError("the probe sizes launched different kernels: cannot extrapolate")
    u, v = Fraction(target[0] - a1, a2 - a1), Fraction(target[1] - b1, b2 - b1)
    weights = [(1 - u) * (1 - v), u * (1 - v), (1 - u) * v, u * v]
    out = []
    for i, base in enumerate(runs[0]):
        values = {}
        for f in INT_FIELDS:
            value = sum(w * getattr(run[i], f) for w, run in zip(weights, runs, strict=True))
            if value.denominator != 1 or value < 0:
                raise ValueError(f"{base.name}.{f} is not bilinear in the probe sizes ({value})")
            values[f] = int(value)
        out.append(replace(base, **values))
    return out


# ----------------------------------------------------------------------------- layer cases


def _layer_fn(case, x, w, tau, b, mode: str | None):
    """``f(x)``: our op on the Triton backend (``mode`` a backward mode) or the dense op (None),
    called as a CUDA run calls it (no finiteness check, no collapse guard)."""
    from spafl import threshold_conv2d, threshold_linear

    if case.layer == "linear":
        if mode is None:
            return lambda x: F.linear(x, w, b)
        return lambda x: threshold_linear(x, w, tau, b, backend="triton", backward_mode=mode, collapse_density=None,
                                          check_finite=False)
    if mode is None:
        return lambda x: F.conv2d(x, w, b, case.stride, case.padding)
    return lambda x: threshold_conv2d(x, w, tau, b, case.stride, case.padding, backend="triton", backward_mode=mode,
                                      collapse_density=None, check_finite=False)


OPS = ("fwd", "bwd", "fwd+bwd")


def unit_thresholds(units: int, density: float, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    """Thresholds ``[units]`` that leave exactly ``round(density * units)`` units active, chosen
    at random positions by ``seed`` alone (-1 below every row score, 1e4 above any): the same
    units whatever the weight's other dimensions, so that probe sizes gather the same rows."""
    active = round(density * units)
    order = torch.randperm(units, generator=torch.Generator().manual_seed(seed))
    tau = torch.full((units,), 1e4, dtype=dtype)
    tau[order[:active]] = -1.0
    return tau


def _warm_state() -> None:
    """State the kernels keep between calls (the row-mask ticket counter), created before any
    record: a steady-state call does not allocate it."""
    from spafl.kernels import threshold_mask

    threshold_mask.ticket_counter(torch.device("cpu"))


def layer_launches(case, dtype: torch.dtype, density: float, modes: Iterable[str]) -> tuple[int, dict]:
    """``(active units, {(provider, op): [Launch]})`` of one case at one density: providers
    ``dense`` and ``spafl-<mode>``; ops fwd (no autograd graph), bwd (the gradients of x, the
    weight, the thresholds and the bias of a graph built beforehand) and fwd+bwd (both, the
    forward recording its graph). Layouts as benchmarks/kernels.py builds them."""
    from spafl import threshold_row_mask

    _warm_state()
    bench = bench_kernels.Bench(case, dtype, torch.device("cpu"), sets=1)
    x0, dy = bench.xs[0], bench.dys[0]
    w, b = bench.weight, bench.bias
    tau = unit_thresholds(case.rows, density, w.dtype).requires_grad_()
    active = int(threshold_row_mask(w.detach(), tau.detach(), check_finite=False).mask.sum())
    out = {}
    for provider, mode in [("dense", None), *[(f"spafl-{m}", m) for m in modes]]:
        params = tuple(p for p in (w, tau if mode else None, b) if p is not None)
        fwd, fwd_graph, bwd = _op_launches(_layer_fn(case, x0, w, tau, b, mode), x0, dy, params)
        out[(provider, "fwd")] = fwd
        out[(provider, "bwd")] = bwd
        out[(provider, "fwd+bwd")] = fwd_graph + bwd
    return active, out


def _op_launches(fn, x0: torch.Tensor, dy: torch.Tensor, params: tuple) -> tuple[list, list, list]:
    """Launches of ``fn``'s forward without a graph, its forward recording the graph, and the
    backward of that graph, in steady state: one forward and backward first, not recorded, so
    that the launchers' scratch buffers (kept per shape between calls) exist, as in a training
    loop."""
    xw = x0.detach().requires_grad_()
    yw = record(lambda: fn(xw), "fwd")[1]
    record(lambda: torch.autograd.grad(yw, (xw, *params), dy), "bwd")
    with torch.no_grad():
        fwd, _ = record(lambda: fn(x0), "fwd")
    x = x0.detach().requires_grad_()
    fwd_graph, y = record(lambda: fn(x), "fwd")
    bwd, _ = record(lambda: torch.autograd.grad(y, (x, *params), dy), "bwd")
    return fwd, fwd_graph, bwd


def probe_plan(case) -> tuple[list[int], list[int]] | None:
    """Probe sizes (rows, features) for a Linear case that :func:`bilinear` extrapolates exactly:
    rows and features multiples of 128, a 16-bit dtype. None: count the case whole.

    Always None now: the persistent Linear forward and dX split their reductions by the
    shape (``kernels._config.best_split``), so counts at the probe sizes are not bilinear in
    the rows and features (``benchmarks/gemm_model.py`` counts the 4096 x 4096 GEMMs whole)."""
    return None


def case_launches(case, dtype, density, modes, shortcut: bool = True) -> tuple[int, dict, str]:
    """:func:`layer_launches` of ``case``, extrapolated from probe sizes where that is exact."""
    plan = probe_plan(case) if shortcut and dtype != torch.float32 else None
    if plan is None:
        active, out = layer_launches(case, dtype, density, modes)
        return active, out, "executed"
    ms, ks = plan
    ms2, ks2 = (ms * 2)[:2], (ks * 2)[:2]
    ms2 = [ms2[0], ms2[1] if ms2[1] != ms2[0] else ms2[0] + 128]
    ks2 = [ks2[0], ks2[1] if ks2[1] != ks2[0] else ks2[0] + 128]
    probes, actives = {}, set()
    for m in ms2:
        for k in ks2:
            small = replace(case, m=m, k=k)
            a, probes[(m, k)] = layer_launches(small, dtype, density, modes)
            actives.add(a)
    if len(actives) != 1:
        raise ValueError(f"{case.name}: the probes have different active counts {sorted(actives)}")
    keys = probes[(ms2[0], ks2[0])].keys()
    out = {key: bilinear({mk: probes[mk][key] for mk in probes}, (case.m, case.k)) for key in keys}
    return actives.pop(), out, f"extrapolated from rows {ms2} x features {ks2}"


# ----------------------------------------------------------------------------- host time


def host_us(case, dtype: torch.dtype, density: float, provider: str, op: str, **timing) -> float | str:
    """Median host microseconds of one call of our layer (``provider`` ``spafl-<mode>``, op
    ``fwd`` without a graph or ``fwd+bwd``) with the device's work left out:
    ``benchmarks/host_time.py`` measures (``stubbed_launches``, ``host_time_us``; ``timing`` goes
    to the latter); this adapts a case to it. The layer runs on the Triton path at the GPU's
    tiles with every grid's execution stubbed: what is timed is spafl's Python, PyTorch's
    dispatch and allocations and Triton's launch bookkeeping; the PyTorch ops between the kernels
    still run on the CPU, so a large layer's figure includes their CPU time. "" for the dense
    provider (its host time is PyTorch's dispatch, which nothing here can time without running
    its arithmetic on the CPU) and for other ops."""
    import host_time

    from spafl.kernels import _config

    mode = provider.removeprefix("spafl-")
    if op not in ("fwd", "fwd+bwd") or mode not in MODES:
        return ""
    _warm_state()
    bench = bench_kernels.Bench(case, dtype, torch.device("cpu"), sets=1)
    x0, dy, w, b = bench.xs[0], bench.dys[0], bench.weight, bench.bias
    tau = unit_thresholds(case.rows, density, w.dtype).requires_grad_()
    fn = _layer_fn(case, x0, w, tau, b, mode)
    params = tuple(t for t in (w, tau, b) if t is not None)

    def call():
        if op == "fwd":
            with torch.no_grad():
                return fn(x0)
        x = x0.detach().requires_grad_()
        return torch.autograd.grad(fn(x), (x, *params), dy)

    with _config.production_tiles(), host_time.stubbed_launches():
        median, _, _ = host_time.host_time_us(call, **timing)
    return median


# ----------------------------------------------------------------------------- output

LAYER_COLUMNS = ("device", "layer", "case", "shape", "dtype", "density", "active", "provider", "op", "launches",
                 "triton_launches", "torch_launches", "macs", "bytes", "model_us", "dense_model_us", "vs_dense",
                 "host_us", "counted")
LAUNCH_COLUMNS = ("device", "case", "density", "provider", "op", "index", "phase", "source", "name", "precision",
                  "programs", "waves", "mac_programs", "macs", "max_program_macs", "read_bytes", "write_bytes",
                  "launches", "compute_us", "memory_us", "model_us")


def summarise(launches: list[Launch], spec: DeviceSpec) -> dict:
    return {"launches": sum(la.launches for la in launches),
            "triton_launches": sum(la.launches for la in launches if la.source == "triton"),
            "torch_launches": sum(la.launches for la in launches if la.source == "torch"),
            "macs": sum(la.macs for la in launches), "bytes": sum(la.bytes for la in launches),
            "model_us": total_seconds(launches, spec) * 1e6}


def launch_rows(launches: list[Launch], spec: DeviceSpec, base: dict) -> list[dict]:
    rows = []
    for i, la in enumerate(launches):
        c = price(la, spec)
        rows.append({**base, "index": i, "phase": la.phase, "source": la.source, "name": la.name,
                     "precision": la.precision, "programs": la.programs, "waves": c.waves,
                     "mac_programs": la.mac_programs, "macs": la.macs, "max_program_macs": la.max_program_macs,
                     "read_bytes": la.read_bytes, "write_bytes": la.write_bytes, "launches": la.launches,
                     "compute_us": c.compute_s * 1e6, "memory_us": c.memory_s * 1e6, "model_us": c.seconds * 1e6})
    return rows


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def markdown(rows: list[dict], columns: Iterable[str]) -> str:
    columns = list(columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_csv(path: Path, rows: list[dict], columns: Iterable[str]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


# ----------------------------------------------------------------------------- cases

LINEAR_4096 = [bench_kernels.LinearCase("linear-4096x4096-b512", 512, 4096, 4096),
               bench_kernels.LinearCase("linear-4096x4096-b128", 128, 4096, 4096)]
RESNET_256 = [bench_kernels.ConvCase("resnet18-256-256-16x16-b8", 8, 256, 256, 16),
              bench_kernels.ConvCase("resnet18-256-256-16x16-b32", 32, 256, 256, 16)]
LAYER_CASES = LINEAR_4096 + RESNET_256 + list(bench_kernels.SUITES["federated"])
DENSITIES = (1.0, 0.5, 0.25, 0.1)
MODES = ("skip", "exact")


def run_layers(args) -> int:
    cases = [c for c in LAYER_CASES if args.k in c.name]
    if not cases:
        print(f"no case matches -k {args.k!r}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    specs = [DEVICES[d] for d in args.devices]
    for case in cases:
        t0 = time.perf_counter()
        rows = {d: [] for d in args.devices}
        launches = {d: [] for d in args.devices}
        for density in args.densities:
            # Counted once, priced on every device.
            dtype = bench_kernels.DTYPES[args.dtype]
            active, res, how = case_launches(case, dtype, density, args.modes, not args.no_shortcut)
            if args.step_optimizers and how == "executed":
                import model_steps

                res.update(model_steps.layer_step_rows(case, dtype, density, args.modes, args.step_optimizers))
            host = {}
            if args.host:
                host = {key: _host(case, dtype, density, *key) for key in res if key[1] in ("fwd", "fwd+bwd")}
            for d, spec in zip(args.devices, specs, strict=True):
                for (provider, op), lst in res.items():
                    s = summarise(lst, spec)
                    dense = total_seconds(res[("dense", op)], spec) * 1e6
                    base = {"device": d, "layer": case.layer, "case": case.name, "shape": case.shape,
                            "dtype": args.dtype, "density": density, "active": active, "provider": provider,
                            "op": op}
                    rows[d].append({**base, **s, "dense_model_us": dense, "vs_dense": dense / s["model_us"],
                                    "host_us": host.get((provider, op), ""), "counted": how})
                    launches[d] += launch_rows(lst, spec, base)
        print(f"# {case.name}: {time.perf_counter() - t0:.0f} s of interpreter", file=sys.stderr, flush=True)
        for d in args.devices:
            table = markdown(rows[d], ("density", "active", "provider", "op", "launches", "macs", "bytes", "model_us",
                                       "dense_model_us", "vs_dense", "host_us"))
            title = f"## {case.name} ({case.shape}), {args.dtype}, {DEVICES[d].name}"
            print(f"\n{title}\n\n{table}", flush=True)
            if args.breakdown:
                print("\n" + markdown(launches[d], LAUNCH_COLUMNS[3:]), flush=True)
            if out:
                stem = f"{case.name}-{args.dtype}-{d}"
                write_csv(out / f"{stem}.csv", rows[d], LAYER_COLUMNS)
                write_csv(out / f"{stem}-launches.csv", launches[d], LAUNCH_COLUMNS)
                (out / f"{stem}.md").write_text(f"{title}\n\n{table}\n")
    return 0


def _host(case, dtype, density, provider, op):
    try:
        return host_us(case, dtype, density, provider, op)
    except Exception as e:  # optional column: an error leaves a note, not a crash
        return f"error: {type(e).__name__}: {e}"


STEP_COLUMNS = ("device", "model", "batch", "dtype", "density", "provider", "optimizer", "phase", "launches",
                "triton_launches", "torch_launches", "macs", "bytes", "model_us", "dense_model_us", "vs_dense")


def run_steps(args) -> int:
    import model_steps as ms

    from spafl.federated.config import FedConfig, preset

    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    dtype = bench_kernels.DTYPES[args.dtype]
    dense_opt = ms.DENSE_OPTIMIZER[args.optimizer]
    plans = []
    for name in args.models:
        real = FedConfig(**preset(ms.STEP_PRESETS[name])).batch_size
        batch = args.batch or real
        fmt = "" if args.memory_format == "auto" else f"-{args.memory_format.replace('_', '-')}"
        fmt += "" if args.penalty == "grad" else f"-penalty-{args.penalty}"
        stem = f"step-{name}{'' if batch == real else f'-b{batch}'}{fmt}-{args.dtype}-{args.optimizer}"
        paths = [out / f"{stem}-{d}{ext}" for d in args.devices for ext in (".csv", "-launches.csv", ".md")] if out \
            else []
        for path in paths:
            if path.exists() and not args.force:
                print(f"steps: {path} exists; pass --force to replace it", file=sys.stderr)
                return 2
        plans.append((name, real, batch, stem))
    for name, real, batch, stem in plans:
        rows = {d: [] for d in args.devices}
        launches = {d: [] for d in args.devices}
        t0 = time.perf_counter()
        for density in args.densities:
            ours = ms.step_launches(name, density, dtype, batch=batch, optimizer=args.optimizer,
                                    memory_format=args.memory_format, penalty=args.penalty)
            dense = ms.step_launches(name, density, dtype, dense=True, batch=batch, optimizer=dense_opt,
                                     memory_format=args.memory_format)
            for d in args.devices:
                spec = DEVICES[d]
                for provider, opt_name, res in (("spafl", args.optimizer, ours), ("dense", dense_opt, dense)):
                    res = {**res, "total": res["fwd"] + res["bwd"] + res["step"]}
                    for phase, lst in res.items():
                        base = {"device": d, "model": name, "batch": batch, "dtype": args.dtype, "density": density,
                                "provider": provider, "optimizer": opt_name, "phase": phase}
                        s = summarise(lst, spec)
                        dense_us = total_seconds(dense[phase] if phase != "total" else
                                                 dense["fwd"] + dense["bwd"] + dense["step"], spec) * 1e6
                        rows[d].append({**base, **s, "dense_model_us": dense_us, "vs_dense": dense_us / s["model_us"]})
                        if phase != "total":
                            launches[d] += launch_rows(lst, spec, {"device": d, "case": name, "density": density,
                                                                   "provider": provider, "op": phase})
            print(f"# {name} at density {density:g}: {time.perf_counter() - t0:.0f} s of interpreter so far",
                  file=sys.stderr, flush=True)
            # Written after every density: a long run keeps what it has counted.
            last = density == args.densities[-1]
            for d in args.devices:
                table = markdown(rows[d], ("density", "provider", "optimizer", "phase", "launches", "triton_launches",
                                           "torch_launches", "macs", "bytes", "model_us", "dense_model_us",
                                           "vs_dense"))
                note = "" if batch == real else f" (not the preset's batch {real})"
                layout = "" if args.memory_format == "auto" else f", {args.memory_format.replace('_', '-')}"
                layout += "" if args.penalty == "grad" else ", the threshold penalty in the loss"
                title = f"## {name} training step, batch {batch}{note}{layout}, {args.dtype}, {args.optimizer}, " \
                        f"{DEVICES[d].name}"
                if last:
                    print(f"\n{title}\n\n{table}", flush=True)
                    if args.breakdown:
                        print("\n" + markdown(launches[d], LAUNCH_COLUMNS[3:]), flush=True)
                if out:
                    write_csv(out / f"{stem}-{d}.csv", rows[d], STEP_COLUMNS)
                    write_csv(out / f"{stem}-{d}-launches.csv", launches[d], LAUNCH_COLUMNS)
                    (out / f"{stem}-{d}.md").write_text(f"{title}\n\n{table}\n")
    return 0


# ----------------------------------------------------------------------------- pairs

PAIR_COLUMNS = ("case", "layer", "shape", "dtype", "density", "active", "provider", "op", "measured_ms",
                "model_ms", "measured_over_model", "model_device", "measured_device", "note")
_ALL_CASES = {c.name: c for suite in bench_kernels.SUITES.values() for c in suite}
for _c in LAYER_CASES:
    _ALL_CASES.setdefault(_c.name, _c)


def _case_of(row: dict):
    """The benchmark case of a measured row: by name, else by layer and shape."""
    if row.get("case") in _ALL_CASES:
        return _ALL_CASES[row["case"]]
    for c in _ALL_CASES.values():
        if c.layer == row.get("layer") and c.shape == row.get("shape"):
            return c
    return None


def _model_tables(folder: Path, device: str) -> dict:
    """``{(case, dtype, density, provider, op): model_us}`` of the layer tables in ``folder``
    (the committed ones price a measured row without the interpreter)."""
    out = {}
    for path in folder.glob(f"*-{device}.csv"):
        if path.name.startswith("step-"):
            continue
        with path.open(newline="") as f:
            for r in csv.DictReader(f):
                if "op" in r and "model_us" in r:
                    out[(r["case"], r["dtype"], float(r["density"]), r["provider"], r["op"])] = float(r["model_us"])
    return out


def run_pair(args) -> int:
    path = Path(args.measured)
    if not path.is_file():
        print(f"pair: {path} does not exist; nothing to pair")
        return 0
    out = Path(args.out)
    if out.exists() and not args.force:
        print(f"pair: {out} exists; pass --force to replace it")
        return 2
    spec = DEVICES[args.device]
    with path.open(newline="") as f:
        measured = list(csv.DictReader(f))
    tables = _model_tables(Path(args.tables), args.device) if args.tables else {}
    start = time.perf_counter()
    cache: dict = {}
    pairs = []
    for row in measured:
        note, model_ms = "", ""
        provider, op = row.get("provider", ""), row.get("op", "")
        case = _case_of(row)
        try:
            density = float(row.get("density", "nan"))
        except ValueError:
            density = float("nan")
        if case is None:
            note = "unknown case"
        elif provider not in ("dense", "spafl-skip", "spafl-exact"):
            note = f"provider {provider} is not modelled"
        elif row.get("dtype") not in bench_kernels.DTYPES or not math.isfinite(density):
            note = f"dtype {row.get('dtype')!r} / density {row.get('density')!r} not modelled"
        elif (case.name, row["dtype"], density, provider, op) in tables:
            model_ms = tables[(case.name, row["dtype"], density, provider, op)] / 1e3
        elif time.perf_counter() - start > args.budget_s and (case.name, row["dtype"], density) not in cache:
            note = f"not modelled: the {args.budget_s:g} s interpreter budget is spent"
        else:
            key = (case.name, row["dtype"], density)
            try:
                if key not in cache:
                    cache[key] = case_launches(case, bench_kernels.DTYPES[row["dtype"]], density, MODES)
                lst = cache[key][1].get((provider, op))
                if lst is None:
                    note = f"op {op!r} not modelled"
                else:
                    model_ms = total_seconds(lst, spec) * 1e3
            except Exception as e:  # one clear line per case that cannot be modelled, then go on
                note = f"cannot model: {type(e).__name__}: {e}"
        if note:
            print(f"pair: {row.get('case')} {row.get('dtype')} d={row.get('density')} {provider} {op}: {note}")
        try:
            ms = float(row.get("ms", "nan"))
        except ValueError:
            ms = float("nan")
        pairs.append({"case": row.get("case"), "layer": row.get("layer"), "shape": row.get("shape"),
                      "dtype": row.get("dtype"), "density": row.get("density"), "active": row.get("active"),
                      "provider": provider, "op": op, "measured_ms": ms, "model_ms": model_ms,
                      "measured_over_model": ms / model_ms if model_ms and math.isfinite(ms) else "",
                      "model_device": spec.name, "measured_device": row.get("device", ""), "note": note})
    write_csv(out, pairs, PAIR_COLUMNS)
    print(f"pair: {len(pairs)} rows ({sum(1 for p in pairs if p['model_ms'] != '')} modelled) -> {out}")
    return 0


# ----------------------------------------------------------------------------- re-pricing


def launches_from_csv(path: Path) -> list[tuple[dict, Launch]]:
    """``[(row, Launch)]`` of a per-launch CSV written by ``layers`` or ``steps``."""
    with Path(path).open(newline="") as f:
        rows = list(csv.DictReader(f))
    missing = [c for c in ("phase", "source", "name", "precision", *INT_FIELDS) if rows and c not in rows[0]]
    if missing:
        raise ValueError(f"{path} is not a per-launch CSV of benchmarks/model.py: no columns {missing}")
    return [(r, Launch(r["phase"], r["source"], r["name"], r["precision"], **{f: int(r[f]) for f in INT_FIELDS}))
            for r in rows]


def run_reprice(args) -> int:
    """Every (case, density, provider, op) of per-launch CSVs priced on a calibrated spec."""
    spec = replace(DEVICES[args.device], **{k: v for k, v in (("compute_efficiency", args.compute_efficiency),
                                                             ("memory_efficiency", args.memory_efficiency),
                                                             ("launch_s", args.launch_us and args.launch_us * 1e-6))
                                            if v is not None})
    totals: dict = {}
    for path in args.launches:
        for row, la in launches_from_csv(path):
            key = (row["case"], row["density"], row["provider"], row["op"])
            totals[key] = totals.get(key, 0.0) + price(la, spec).seconds * 1e6
    rows = [{"case": k[0], "density": k[1], "provider": k[2], "op": k[3], "model_us": v} for k, v in totals.items()]
    print(f"# {spec}")
    print(markdown(rows, ("case", "density", "provider", "op", "model_us")))
    return 0


def run_retable(args) -> int:
    """Rebuild the tables of a folder from its per-launch CSVs with the current rules for what
    launches (rows of ops that no longer count are dropped) and the current specs: the counts
    need no new interpreter run."""
    folder = Path(args.folder)
    drop = {f.name().replace("aten::", "").split(".")[0] for f in _NO_LAUNCH}
    done = 0
    for path in sorted(folder.glob("*-launches.csv")):
        table = path.with_name(path.name.replace("-launches.csv", ".csv"))
        if not table.is_file():
            continue
        step = path.name.startswith("step-")
        pairs = [(r, la) for r, la in launches_from_csv(path) if la.name.split(".")[0] not in drop]
        spec = DEVICES[pairs[0][0]["device"]] if pairs else None
        groups: dict = {}
        for r, la in pairs:
            groups.setdefault((r["density"], r["provider"], r["op"]), []).append(la)
        with table.open(newline="") as f:
            rows = list(csv.DictReader(f))
        for row in rows:
            key_op = row["phase"] if step else row["op"]
            ops = ("fwd", "bwd", "step") if key_op == "total" else (key_op,)
            mine = [la for op in ops for la in groups.get((row["density"], row["provider"], op), [])]
            dense = [la for op in ops for la in groups.get((row["density"], "dense", op), [])]
            s = summarise(mine, spec)
            row.update(s, dense_model_us=total_seconds(dense, spec) * 1e6)
            row["vs_dense"] = row["dense_model_us"] / s["model_us"]
        write_csv(table, rows, STEP_COLUMNS if step else LAYER_COLUMNS)
        md = table.with_suffix(".md")
        if md.is_file():
            title = md.read_text().split("\n")[0]
            cols = (("density", "provider", "phase", "launches", "triton_launches", "torch_launches", "macs", "bytes",
                     "model_us", "dense_model_us", "vs_dense") if step else
                    ("density", "active", "provider", "op", "launches", "macs", "bytes", "model_us", "dense_model_us",
                     "vs_dense", "host_us"))
            md.write_text(f"{title}\n\n{markdown(rows, cols)}\n")
        write_csv(path, [{**r, **launch_rows([la], spec, {})[0], "index": r["index"]} for r, la in pairs],
                  LAUNCH_COLUMNS)
        done += 1
    print(f"retable: {done} tables rebuilt in {folder}")
    return 0


# ----------------------------------------------------------------------------- summary


def run_summary(args) -> int:
    """One table of every layer CSV in a folder: fwd+bwd (or ``--op``) per case and density,
    ours against dense, on one device."""
    folder = Path(args.folder)
    paths = sorted(p for p in folder.glob(f"*-{args.device}.csv") if not p.name.startswith("step-"))
    if not paths:
        print(f"summary: no layer CSVs for {args.device} in {folder}")
        return 2
    rows = []
    for path in paths:
        with path.open(newline="") as f:
            got = [r for r in csv.DictReader(f) if r["op"] == args.op]
        for density in dict.fromkeys(r["density"] for r in got):
            at = {r["provider"]: r for r in got if r["density"] == density}
            dense = float(at["dense"]["model_us"])
            row = {"case": at["dense"]["case"], "shape": at["dense"]["shape"], "density": density,
                   "active": at["dense"]["active"], "dense_us": dense}
            for mode in MODES:
                r = at.get(f"spafl-{mode}")
                row[f"{mode}_us"] = float(r["model_us"]) if r else ""
                row[f"{mode}_vs_dense"] = f"{dense / float(r['model_us']):.2f}x" if r else ""
            rows.append(row)
    print(markdown(rows, ("case", "shape", "density", "active", "dense_us", "skip_us", "skip_vs_dense", "exact_us",
                          "exact_vs_dense")))
    return 0


# ----------------------------------------------------------------------------- main


def _densities(text: str) -> tuple[float, ...]:
    values = tuple(float(v) for v in text.split(","))
    if not all(0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"densities must lie in [0, 1], got {text}")
    return values


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"batch must be a positive integer, got {text!r}")
    return int(text)


def main(argv=None) -> int:
    import model_steps

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--devices", nargs="+", choices=sorted(DEVICES), default=["h100", "h200"])
    common.add_argument("--densities", type=_densities, default=DENSITIES, help="comma-separated")
    common.add_argument("--breakdown", action="store_true", help="print every launch")
    common.add_argument("--out", default=None, help="folder for the tables (markdown) and CSVs")
    common.add_argument("--interpret-conv", action="store_true",
                        help="run the convolution GEMM launches in the interpreter too (slow; by default "
                             "benchmarks/conv_count.py counts them from their grids)")
    common.add_argument("--interpret-linear", action="store_true",
                        help="run the Linear kernels, the finish pass and the row mask in the interpreter too "
                             "(slow; by default benchmarks/linear_count.py counts them from their grids)")
    lay = sub.add_parser("layers", parents=[common], help="the benchmark layers")
    lay.add_argument("-k", default="", help="only cases whose name contains this")
    lay.add_argument("--dtype", choices=sorted(bench_kernels.DTYPES), default="bfloat16")
    lay.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    lay.add_argument("--no-shortcut", action="store_true", help="execute every case whole (slow)")
    lay.add_argument("--step-optimizers", nargs="*", default=["torch-sgd"],
                     choices=tuple(model_steps.OPTIMIZERS),
                     help="optimizers of the training-step rows (ops opt, steady-fwd+bwd, step) of cases counted "
                          "whole; none: no step rows")
    lay.add_argument("--host", action="store_true", help="fill host_us (host time with the launches stubbed)")
    st = sub.add_parser("steps", parents=[common], help="training steps of the federated models")
    st.add_argument("--models", nargs="+", choices=sorted(model_steps.STEP_PRESETS),
                    default=["lenet5", "conv4", "resnet18"])
    st.add_argument("--optimizer", choices=tuple(model_steps.OPTIMIZERS), default="torch-sgd",
                    help="the spafl network's optimizer (the dense one steps with the torch.optim of the same rule)")
    st.add_argument("--force", action="store_true", help="replace existing tables")
    st.add_argument("--batch", type=_positive_int, default=None,
                    help="batch size (default: the preset's; another one is named in the file names and titles)")
    st.add_argument("--dtype", choices=sorted(bench_kernels.DTYPES), default="float32")
    st.add_argument("--memory-format", choices=("auto", "channels_last", "contiguous"), default="auto",
                    help="the models' layout (auto: as the simulator sets it on a GPU, channels-last for the "
                         "convolutional models; another one is named in the file names and titles)")
    st.add_argument("--penalty", choices=model_steps.PENALTIES, default="grad",
                    help="the threshold penalty: grad, its gradient added after the backward (as the simulator "
                         "trains); loss, the term in the loss (another than grad is named in the file names and "
                         "titles)")
    pr = sub.add_parser("pair", help="the model beside every measured row of benchmarks/kernels.py")
    pr.add_argument("--measured", required=True)
    pr.add_argument("--device", choices=sorted(DEVICES), required=True)
    pr.add_argument("--out", required=True)
    pr.add_argument("--force", action="store_true", help="replace --out if it exists")
    pr.add_argument("--tables", default=str(Path(__file__).resolve().parent / "results" / "model"),
                    help="model tables to read before counting ('' for none)")
    pr.add_argument("--budget-s", type=float, default=120.0,
                    help="interpreter seconds for cases the tables lack; later ones get a line and no model")
    rp = sub.add_parser("reprice", help="re-price per-launch CSVs on a calibrated device (no interpreter)")
    rp.add_argument("launches", nargs="+", help="per-launch CSVs (*-launches.csv)")
    rp.add_argument("--device", choices=sorted(DEVICES), default="h100")
    rp.add_argument("--compute-efficiency", type=float, default=None)
    rp.add_argument("--memory-efficiency", type=float, default=None)
    rp.add_argument("--launch-us", type=float, default=None)
    rt = sub.add_parser("retable", help="rebuild a folder's tables from its per-launch CSVs (no interpreter)")
    rt.add_argument("folder")
    sm = sub.add_parser("summary", help="one table of the layer CSVs in a folder")
    sm.add_argument("folder")
    sm.add_argument("--device", choices=sorted(DEVICES), default="h100")
    sm.add_argument("--op", choices=(*OPS, "opt", "steady-fwd+bwd", "step"), default="fwd+bwd")
    args = p.parse_args(argv)
    from spafl._checks import interpreter_enabled

    if not interpreter_enabled():
        p.error("the model counts launches in Triton's interpreter: unset TRITON_INTERPRET=0")
    torch.set_num_threads(1)
    global FAST_CONV, FAST_LINEAR
    FAST_CONV = not getattr(args, "interpret_conv", False)
    FAST_LINEAR = not getattr(args, "interpret_linear", False)
    return {"layers": run_layers, "steps": run_steps, "pair": run_pair, "reprice": run_reprice,
            "retable": run_retable, "summary": run_summary}[args.cmd](args)


if __name__ == "__main__":
    sys.modules.setdefault("model", sys.modules["__main__"])  # model_steps imports this module as ``model``
    sys.exit(main())
