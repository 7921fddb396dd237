"""Work counts of the Triton kernels, measured in Triton's interpreter with the GPU tile sizes.

The interpreter executes every ``tl.dot``, ``tl.load`` and ``tl.store`` of every program through
one builder object; :class:`WorkCounter` wraps those three calls (and the launch) and adds up,
per kernel:

* ``macs``: multiply-adds of every ``tl.dot`` *issued*, i.e. the full tile shape (a masked row
  of a tile still costs tensor-core work on the GPU, so it counts here too);
* ``load_bytes`` / ``store_bytes``: bytes of floating-point data moved (masked-off lanes move
  nothing);
* ``index_bytes``: integer loads and stores (``perm``, ``count``, masks, the ticket);
* ``launches`` and ``programs``.

The launchers run under :func:`spafl.kernels._config.production_tiles`, so the counts are for
the tiles, grids and loop bounds that the GPU runs, not for the interpreter's smaller tiles.

The fraction of the dense work that a layer issues depends on its number of output units
(rows / filters), the active count and the tiles, not on the batch, the spatial size or the
number of input channels (they scale the work of every density alike). The harness therefore
keeps every layer's units and kernel geometry and shrinks the rest (``harness_size``);
``test_work_count.py`` checks that independence on two layers.

Run ``python tests/work_count.py`` for the table of every layer (``--markdown`` for
benchmarks/NOTES.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from dataclasses import dataclass, field, fields

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

import torch  # noqa: E402

DENSITIES = (1.0, 0.5, 0.25, 0.1, 0.0)
MODES = ("exact", "skip", "sample")


@dataclass
class Work:
    """Work of one kernel (or a group of kernels) summed over launches."""

    launches: int = 0
    programs: int = 0
    macs: int = 0
    load_bytes: int = 0
    store_bytes: int = 0
    index_bytes: int = 0
    seconds: float = 0.0  # interpreter time (what the harness costs, not a GPU time)
    # Bytes per kernel argument: {name: [loaded, stored]} (floating-point data only).
    by_arg: dict = field(default_factory=dict)
    # Constexpr meta-parameters of the last launch (block sizes).
    meta: dict = field(default_factory=dict)

    def __iadd__(self, other: Work) -> Work:
        for f in fields(self):
            if f.name == "by_arg":
                for name, (ld, st) in other.by_arg.items():
                    mine = self.by_arg.setdefault(name, [0, 0])
                    mine[0] += ld
                    mine[1] += st
            elif f.name == "meta":
                self.meta.update(other.meta)
            else:
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    def arg_bytes(self, name: str, stored: bool = False) -> int:
        return self.by_arg.get(name, [0, 0])[int(stored)]


def _bytes(handle, mask) -> tuple[int, bool]:
    ty = handle.get_element_ty()
    n = int(mask.data.sum()) if mask is not None else int(handle.data.size)
    return n * max(1, ty.primitive_bitwidth // 8), ty.is_floating()


def _first_address(ptrs, mask) -> int | None:
    valid = ptrs.data[mask.data] if mask is not None else ptrs.data.ravel()
    return int(valid.flat[0]) if valid.size else None


class WorkCounter:
    """Context manager: ``with WorkCounter() as wc: ...`` then ``wc.kernels[name]`` is the
    :class:`Work` of every launch of the kernel ``name`` inside the block."""

    def __init__(self) -> None:
        self.kernels: dict[str, Work] = {}
        self._current: Work | None = None
        self._ranges: list = []
        self._restore: list = []

    def __enter__(self) -> WorkCounter:
        from triton.runtime import interpreter as interp

        builder = interp.interpreter_builder
        counter = self
        dot, load, store = builder.create_dot, builder.create_masked_load, builder.create_masked_store
        set_idx = builder.set_grid_idx
        call = interp.GridExecutor.__call__

        def create_dot(a, b, d, *args):
            counter._work().macs += int(a.data.size) * int(b.data.shape[-1])
            return dot(a, b, d, *args)

        def account(ptrs, mask, stored: bool) -> None:
            n, is_float = _bytes(ptrs, mask)
            w = counter._work()
            if not is_float:
                w.index_bytes += n
                return
            if stored:
                w.store_bytes += n
            else:
                w.load_bytes += n
            address = _first_address(ptrs, mask)
            if address is not None:
                name = counter._argument_at(address)
                w.by_arg.setdefault(name, [0, 0])[int(stored)] += n

        def create_masked_load(ptrs, mask, other, *args):
            account(ptrs, mask, False)
            return load(ptrs, mask, other, *args)

        def create_masked_store(ptrs, value, mask, *args):
            account(ptrs, mask, True)
            return store(ptrs, value, mask, *args)

        def set_grid_idx(x, y, z):
            counter._work().programs += 1
            return set_idx(x, y, z)

        def grid_call(executor, *args, **kwargs):
            name = executor.fn.__name__
            outer, outer_ranges = counter._current, counter._ranges
            counter._current = counter.kernels.setdefault(name, Work())
            counter._current.launches += 1
            counter._current.meta.update({k: v for k, v in kwargs.items() if k.isupper()})
            # Address ranges of the tensor arguments, to attribute every byte to one of them
            # (the first in argument order when two share a storage).
            counter._ranges = []
            for arg_name, value in zip(executor.arg_names, args, strict=False):
                if isinstance(value, torch.Tensor):
                    storage = value.untyped_storage()
                    counter._ranges.append((storage.data_ptr(), storage.data_ptr() + storage.nbytes(), arg_name))
            t0 = time.perf_counter()
            try:
                return call(executor, *args, **kwargs)
            finally:
                counter._current.seconds += time.perf_counter() - t0
                counter._current, counter._ranges = outer, outer_ranges

        builder.create_dot = create_dot
        builder.create_masked_load = create_masked_load
        builder.create_masked_store = create_masked_store
        builder.set_grid_idx = set_grid_idx
        interp.GridExecutor.__call__ = grid_call
        # Integer-overflow checks make each integer operation of the interpreter several times
        # slower; the tests keep them, the counts do not need them.
        options = builder.options
        builder.options = dataclasses.replace(options, sanitize_overflow=False)
        self._restore = [lambda: [delattr(builder, n) for n in ("create_dot", "create_masked_load",
                                                                 "create_masked_store", "set_grid_idx")],
                         lambda: setattr(interp.GridExecutor, "__call__", call),
                         lambda: setattr(builder, "options", options)]
        return self

    def __exit__(self, *exc) -> None:
        for undo in self._restore:
            undo()

    def _argument_at(self, address: int) -> str:
        for lo, hi, name in self._ranges:
            if lo <= address < hi:
                return name
        return "?"

    def _work(self) -> Work:
        if self._current is None:
            raise RuntimeError("a kernel operation ran outside a launch")
        return self._current

    def total(self, names=None) -> Work:
        out = Work()
        for name, w in self.kernels.items():
            if names is None or name in names:
                out += w
        return out


# ----------------------------------------------------------------------------- layers


@dataclass(frozen=True)
class LinearLayer:
    name: str
    in_features: int
    out_features: int

    @property
    def units(self) -> int:
        return self.out_features


@dataclass(frozen=True)
class ConvLayer:
    name: str
    cin: int
    cout: int
    kernel: int
    stride: int = 1
    padding: int = 0
    size: int = 32  # input height = width in the model

    @property
    def units(self) -> int:
        return self.cout


def _resnet18_layers(prefix: str, widths: tuple[int, ...], stem: tuple[int, int, int, int]) -> list[ConvLayer]:
    # Distinct shapes of a CIFAR ResNet-18 (32x32 input): the stem, the two 3x3 convolutions of
    # each stage (the first strided), and the 1x1 strided shortcut.
    k, s, p, size = stem
    out = [ConvLayer(f"{prefix}.stem", 3, widths[0], k, s, p, 32)]
    cin = widths[0]
    size = 32 // s
    for i, w in enumerate(widths):
        stride = 1 if i == 0 else 2
        out.append(ConvLayer(f"{prefix}.stage{i + 1}.conv1", cin, w, 3, stride, 1, size))
        size //= stride
        out.append(ConvLayer(f"{prefix}.stage{i + 1}.conv2", w, w, 3, 1, 1, size))
        if stride != 1:
            out.append(ConvLayer(f"{prefix}.stage{i + 1}.shortcut", cin, w, 1, 2, 0, size * 2))
        cin = w
    return out


# Every prunable layer of the federated models (spafl.federated.models) and of the benchmark's
# ResNet-18 (benchmarks/kernels.py, widths 64-512), plus the large Linear of the targets.
LAYERS = [
    ConvLayer("lenet5.conv1", 1, 20, 5, 1, 0, 28),
    ConvLayer("lenet5.conv2", 20, 50, 5, 1, 0, 12),
    LinearLayer("lenet5.fc3", 800, 500),
    LinearLayer("lenet5.fc4", 500, 10),
    ConvLayer("conv4.conv1", 3, 64, 5, 1, 0, 32),
    ConvLayer("conv4.conv2", 64, 64, 5, 1, 0, 28),
    ConvLayer("conv4.conv3", 64, 128, 5, 1, 0, 12),
    ConvLayer("conv4.conv4", 128, 128, 5, 1, 0, 8),
    LinearLayer("conv4.dense1", 512, 128),
    LinearLayer("conv4.dense2", 128, 128),
    LinearLayer("conv4.dense3", 128, 10),
    *_resnet18_layers("resnet18", (32, 64, 128, 256), (3, 1, 1, 32)),
    *_resnet18_layers("resnet18-bench", (64, 128, 256, 512), (3, 1, 1, 32)),
    LinearLayer("vit.qkv", 128, 1536),
    LinearLayer("vit.out", 512, 128),
    LinearLayer("vit.fc1", 128, 256),
    LinearLayer("vit.fc2", 256, 128),
    LinearLayer("large", 4096, 4096),
]


@dataclass(frozen=True)
class HarnessSize:
    """The shrunken dimensions a layer runs at (see the module docstring). The batch is large
    enough that the sample mode's strided sample (1/8 of the rows or pixels) is a fraction of
    the reduction blocks."""

    rows: int = 256  # Linear: rows of X
    features: int = 128  # Linear: input features (at most)
    images: int = 4  # Conv2d: batch
    channels: int = 16  # Conv2d: input channels (at most)
    pixels: int = 8  # Conv2d: output height = width (at most)


# The batch each model trains at (the presets of spafl.federated.config; the benchmark's
# ResNet-18 at the benchmark's batch, the large Linear at 512 rows) and the rows a Linear sees
# per sample (the ViT's 64 patches and class token).
REAL_BATCH = {"lenet5": (64, 1), "conv4": (16, 1), "resnet18": (64, 1), "resnet18-bench": (32, 1), "vit": (16, 65),
              "large": (512, 1)}


def real_size(layer) -> HarnessSize:
    """The model's own batch (Linear: rows; Conv2d: images at the model's output size); input
    channels and features stay shrunk (the fractions do not depend on them)."""
    batch, tokens = REAL_BATCH[layer.name.split(".")[0]]
    return HarnessSize(rows=batch * tokens, images=batch, pixels=1 << 30)


def _inputs(layer, dtype: torch.dtype, density: float, size: HarnessSize, seed: int = 0):
    """Inputs in the layouts the federated models use (contiguous, NCHW), and thresholds that
    leave exactly ``round(density * units)`` units active."""
    from spafl import threshold_for_density
    from spafl._conv import conv_geometry

    g = torch.Generator().manual_seed(seed)
    if isinstance(layer, LinearLayer):
        k = min(layer.in_features, size.features)
        x = torch.randn(size.rows, k, generator=g)
        w = torch.randn(layer.out_features, k, generator=g) / k**0.5
        dy = torch.randn(size.rows, layer.out_features, generator=g)
        geo = None
    else:
        geo = conv_geometry(layer.kernel, layer.stride, layer.padding)
        c = min(layer.cin, size.channels)
        # The input size that gives `size.pixels` output rows (or the model's own, if fewer).
        out = min(size.pixels, geo.output_size(layer.size, layer.size)[0])
        h = (out - 1) * layer.stride + layer.kernel - 2 * layer.padding
        x = torch.randn(size.images, c, h, h, generator=g)
        w = torch.randn(layer.cout, c, layer.kernel, layer.kernel, generator=g) / (c * layer.kernel**2) ** 0.5
        ho, wo = geo.output_size(h, h)
        dy = torch.randn(size.images, layer.cout, ho, wo, generator=g)
    x, w, dy = (t.to(dtype) for t in (x, w, dy))
    # fp32 thresholds: halfway between two fp32 row scores, so that exactly round(density *
    # units) units are active (a 16-bit threshold could round onto a score).
    tau = threshold_for_density(w.float(), density)
    return x, w, dy, tau, geo


OPS = ("mask", "w", "fwd", "dy", "dx", "dw")


def op_of(kernel_name: str) -> str:
    """The operation a kernel belongs to in the report: the row mask, the weight compaction, the
    forward GEMM, the dY compaction, the dX GEMM, the dW GEMM and its finish pass."""
    for key, op in (("row_mask", "mask"), ("compact_weight", "w"), ("compact_grad", "dy"), ("compact_dy", "dy"),
                    ("fwd", "fwd"), ("bwd_dx", "dx"), ("bwd_dw", "dw"), ("finish", "dw")):
        if key in kernel_name:
            return op
    raise ValueError(f"no operation for kernel {kernel_name}")


@dataclass
class LayerWork:
    """``work[(op, mode)][density] -> Work`` of one layer; mode is "" for mode-independent ops;
    ``kernels[(op, mode)][density][kernel name] -> Work``."""

    layer: object
    size: HarnessSize
    active: dict = field(default_factory=dict)
    work: dict = field(default_factory=dict)
    kernels: dict = field(default_factory=dict)
    seconds: float = 0.0

    def add(self, op: str, mode: str, density: float, name: str, w: Work) -> None:
        self.work.setdefault((op, mode), {}).setdefault(density, Work())
        self.work[(op, mode)][density] += w
        self.kernels.setdefault((op, mode), {}).setdefault(density, {})[name] = w

    def fraction(self, op: str, mode: str, density: float, metric: str = "macs") -> float:
        dense = getattr(self.work[(op, mode)][1.0], metric)
        got = getattr(self.work[(op, mode)][density], metric)
        return got / dense if dense else float(got == 0)


def measure(layer, densities=DENSITIES, modes=MODES, dtype=torch.float16, size: HarnessSize | None = None,
            channels_last: bool = False) -> LayerWork:
    """Run the row mask, the forward and every backward mode of ``layer`` at each density and
    count the work of every launch. 16-bit operands (fp16 and bf16 share the tiles; fp16 runs
    faster in the interpreter)."""
    from spafl.kernels import (
        _config,
        threshold_conv2d_bwd,
        threshold_conv2d_fwd,
        threshold_linear_bwd,
        threshold_linear_fwd,
        threshold_row_mask,
    )

    size = size or HarnessSize()
    result = LayerWork(layer, size)
    t0 = time.perf_counter()
    for density in densities:
        x, w, dy, tau, geo = _inputs(layer, dtype, density, size)
        if channels_last and geo is not None:
            x, w, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, w, dy))
        with _config.production_tiles():
            with WorkCounter() as wc:
                rm = threshold_row_mask(w.reshape(w.shape[0], -1), tau)
            _add_ops(result, wc, "", density)
            result.active[density] = int(rm.count.item())
            with WorkCounter() as wc:
                if geo is None:
                    threshold_linear_fwd(x, w, None, rm)
                else:
                    threshold_conv2d_fwd(x, w, None, rm, geo)
            _add_ops(result, wc, "", density)
            for mode in modes:
                need_dx = mode == modes[0]  # dX does not depend on the mode: counted once
                with WorkCounter() as wc:
                    if geo is None:
                        threshold_linear_bwd(dy, x, w, rm, mode=mode, need_dx=need_dx)
                    else:
                        threshold_conv2d_bwd(dy, x, w, rm, geo, mode=mode, need_dx=need_dx)
                _add_ops(result, wc, mode, density)
    result.seconds = time.perf_counter() - t0
    return result


def _add_ops(result: LayerWork, wc: WorkCounter, mode: str, density: float) -> None:
    for name, w in wc.kernels.items():
        op = op_of(name)
        result.add(op, mode if op in ("dw", "dy") else "", density, name, w)


# ----------------------------------------------------------------------------- the model


def _blocks(r: LayerWork, op: str, mode: str, kernel_part: str) -> dict:
    """Meta-parameters of the kernel of ``op`` whose name contains ``kernel_part``."""
    for name, w in r.kernels[(op, mode)][1.0].items():
        if kernel_part in name:
            return w.meta
    raise KeyError(f"{r.layer.name}: no {kernel_part} kernel in {op}[{mode}]")


def _reduction_cover(active: int, block: int, tail: int) -> int:
    # dX: full BLOCK_P steps, then TAIL_P steps over the remainder.
    full = active - active % block
    return full + -(-(active - full) // tail) * tail


def expected_fractions(r: LayerWork, density: float) -> dict:
    """What the kernels' tiling says each op's tensor-core work is at ``density``, as a fraction
    of its work at density 1: ``{(op, mode): fraction}``."""
    from spafl._rowmask import sample_rows
    from spafl.kernels._config import covered_units

    units, a = r.layer.units, r.active[density]
    modes = [mode for mode in MODES if ("dw", mode) in r.work]
    out = {}
    blk = _blocks(r, "fwd", "", "fwd")["BLOCK_N"]
    out[("fwd", "")] = covered_units(a, blk) / covered_units(units, blk)
    meta = _blocks(r, "dx", "", "dx")
    out[("dx", "")] = _reduction_cover(a, meta["BLOCK_P"], meta["TAIL_P"]) / _reduction_cover(
        units, meta["BLOCK_P"], meta["TAIL_P"])
    for mode in modes:
        meta = _blocks(r, "dw", mode, "bwd_dw")
        bp, bm = meta["BLOCK_P"], meta["BLOCK_M"]
        dense = covered_units(units, bp)
        if mode == "exact":
            out[("dw", mode)] = 1.0
        elif mode == "skip":
            out[("dw", mode)] = covered_units(a, bp) / dense
        else:
            reduction = r.size.rows if isinstance(r.layer, LinearLayer) else _pixels(r)
            sampled = sample_rows(reduction, 0.125)[0]
            splits = _dw_splits(r, meta, reduction, mode)
            # Pruned tiles step over the sample in SAMPLE_M rows, active ones over the batch in BLOCK_M.
            rho = _split_cover(sampled, splits, meta["SAMPLE_M"]) / _split_cover(reduction, splits, bm)
            out[("dw", mode)] = (covered_units(a, bp) + covered_units(units - a, bp) * rho) / dense
    return out


def _split_cover(end: int, splits: int, block: int) -> int:
    """Reduction rows issued over ``range(end)`` split as the conv dW kernel's ``_split_range``
    does (``splits`` chunks rounded up to whole blocks, each chunk's tiles ``block`` rows)."""
    per_split = -(-end // splits)
    chunk = -(-per_split // block) * block
    total = 0
    for i in range(splits):
        lo = min(i * chunk, end)
        total += -(-(min(lo + chunk, end) - lo) // block) * block
    return total


def _dw_splits(r: LayerWork, meta: dict, reduction: int, mode: str) -> int:
    """How many programs share the dW reduction (1 for Linear): for a convolution, the split that
    the launcher chose, read from the recorded grid (filter blocks x kernel-position / channel
    tiles x splits)."""
    if isinstance(r.layer, LinearLayer):
        return 1
    from spafl.kernels._config import cdiv

    chans = min(r.layer.cin, r.size.channels)
    num_kb = r.layer.kernel**2 * cdiv(chans, meta["BLOCK_C"])
    n_blocks = cdiv(r.layer.units, meta["BLOCK_P"]) + (1 if mode == "sample" else 0)
    work = next(w for name, w in r.kernels[("dw", mode)][1.0].items() if "bwd_dw" in name)
    return work.programs // work.launches // (n_blocks * num_kb)


def _pixels(r: LayerWork) -> int:
    from spafl._conv import conv_geometry

    layer, size = r.layer, r.size
    geo = conv_geometry(layer.kernel, layer.stride, layer.padding)
    out = min(size.pixels, geo.output_size(layer.size, layer.size)[0])
    return size.images * out * out


def _proportional(r: LayerWork, density: float, op: str, mode: str, arg: str, ratio: tuple[int, int],
                  stored: bool = False) -> str | None:
    """None if ``arg``'s bytes at ``density`` are ``ratio`` of those at density 1, else why not."""
    now = r.work[(op, mode)][density].arg_bytes(arg, stored)
    full = r.work[(op, mode)][1.0].arg_bytes(arg, stored)
    if now * ratio[1] == full * ratio[0]:
        return None
    return (f"{r.layer.name} {op}[{mode}] d={density}: {arg} {'stores' if stored else 'loads'} {now} B, "
            f"expected {ratio[0]}/{ratio[1]} of {full} B")


def check(r: LayerWork, modes=MODES) -> list[str]:
    """Every claim the harness makes about ``r``; returns the violations (empty: all hold).

    * tensor-core work: exactly what the tiling model says (:func:`expected_fractions`); for the
      forward, dX and skip-mode dW that is at most the active units rounded up to one tile, and
      at least the active units (exact and sample modes add the pruned rows' documented work);
    * bytes: the operands indexed by the pruned dimension (weight rows, compacted dY columns,
      the G workspace) move bytes in exact proportion to the active units (or to the tiles
      that cover them); the dense outputs (Y, dX, dW) are written whole at every density; the
      row mask is one launch that reads W once;
    * sample mode never issues more tensor-core work than exact mode, at any density.
    """
    from spafl.kernels._config import covered_units

    bad = []
    units = r.layer.units
    fwd_block = _blocks(r, "fwd", "", "fwd")["BLOCK_N"]
    dx_block = _blocks(r, "dx", "", "dx")["BLOCK_P"]
    for density, a in r.active.items():
        for (op, mode), want in expected_fractions(r, density).items():
            got = r.fraction(op, mode, density)
            if abs(got - want) > 1e-9:
                bad.append(f"{r.layer.name} {op}[{mode}] d={density}: {got:.4f} of the dense MACs, model {want:.4f}")
            if mode not in ("", "skip"):
                continue
            block = dx_block if op == "dx" else fwd_block
            if a < units and got > (-(-a // block) * block) / units + 1e-9:
                bad.append(f"{r.layer.name} {op}[{mode}] d={density}: more than one tile above the active units")
            if got + 1e-9 < a / (-(-units // block) * block):
                bad.append(f"{r.layer.name} {op}[{mode}] d={density}: less work than the active units need")

        active, whole = (a, units), (1, 1)
        checks = [("fwd", "", "w_ptr", active, False),
                  ("fwd", "", "x_ptr", (-(-a // fwd_block), -(-units // fwd_block)), False),
                  ("fwd", "", "y_ptr", whole, True),
                  ("dx", "", "dyc_ptr", active, False), ("dx", "", "w_ptr", active, False),
                  ("dx", "", "dx_ptr", whole, True)]
        for mode in modes:
            checks += [("dy", mode, "dy_ptr", active, False), ("dy", mode, "dyc_ptr", active, True),
                       ("dw", mode, "g_ptr", active, True), ("dw", mode, "dw_ptr", whole, True)]
        if "skip" in modes:
            checks += [("dw", "skip", arg, active, False) for arg in ("w_ptr", "g_ptr", "rpart_ptr")]
            # dyc is read a whole tile class wide (vector loads), then masked.
            bp = _blocks(r, "dw", "skip", "bwd_dw")["BLOCK_P"]
            checks.append(("dw", "skip", "dyc_ptr", (covered_units(a, bp), covered_units(units, bp)), False))
        if ("w", "") in r.work:
            checks += [("w", "", "w_ptr", active, False), ("w", "", "wc_ptr", active, True)]
        for op, mode, arg, ratio, stored in checks:
            why = _proportional(r, density, op, mode, arg, ratio, stored)
            if why:
                bad.append(why)
        if ("dw", "sample") in r.work and ("dw", "exact") in r.work:
            sampled, exact = r.work[("dw", "sample")][density].macs, r.work[("dw", "exact")][density].macs
            if sampled > exact:
                bad.append(f"{r.layer.name} dw[sample] d={density}: {sampled} MACs, more than exact mode's {exact}")
        mask = r.work[("mask", "")][density]
        if mask.launches != 1 or mask.arg_bytes("w_ptr") != r.work[("mask", "")][1.0].arg_bytes("w_ptr"):
            bad.append(f"{r.layer.name} mask d={density}: {mask.launches} launches, W read {mask.arg_bytes('w_ptr')} B")
    return bad


# ----------------------------------------------------------------------------- report


def table(results: list[LayerWork], metric: str = "macs", markdown: bool = False, grouped: bool = False) -> str:
    """Work fractions (issued / issued at density 1) per layer, op and mode, one column per density.
    ``grouped``: one row for the layers whose rows are identical (same op, units and fractions)."""
    dens = [d for d in DENSITIES if d != 1.0]
    head = ["layer", "units", "op", *[f"d={d:g}" for d in dens]]
    rows = []
    for r in results:
        for (op, mode), _ in sorted(r.work.items(), key=lambda kv: _op_order(kv[0])):
            if getattr(r.work[(op, mode)][1.0], metric) == 0:
                continue
            label = f"{op}[{mode}]" if mode else op
            cells = [f"{r.fraction(op, mode, d, metric):.3f}" if d in r.work[(op, mode)] else "" for d in dens]
            rows.append([r.layer.name, str(r.layer.units), label, *cells])
    if grouped:
        merged: dict = {}
        for row in rows:
            merged.setdefault(tuple(row[1:]), []).append(row[0])
        rows = [[", ".join(names), *key] for key, names in merged.items()]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(wd) for c, wd in zip(row, widths, strict=True)) for row in [head, *rows])


def sample_table(results: list[LayerWork], markdown: bool = False, grouped: bool = False) -> str:
    """Sample mode's weight-gradient work over exact mode's, per layer and density."""
    head = ["layer", "rows", "units", *[f"d={d:g}" for d in DENSITIES]]
    rows = []
    for r in results:
        if ("dw", "sample") not in r.work or ("dw", "exact") not in r.work:
            continue
        reduction = r.size.rows if isinstance(r.layer, LinearLayer) else _pixels(r)
        cells = [f"{r.work[('dw', 'sample')][d].macs / r.work[('dw', 'exact')][d].macs:.3f}" for d in DENSITIES]
        rows.append([r.layer.name, str(reduction), str(r.layer.units), *cells])
    if grouped:
        merged: dict = {}
        for row in rows:
            merged.setdefault(tuple(row[1:]), []).append(row[0])
        rows = [[", ".join(names), *key] for key, names in merged.items()]
    if markdown:
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                          *["| " + " | ".join(row) + " |" for row in rows]])
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(wd) for c, wd in zip(row, widths, strict=True)) for row in [head, *rows])


def _op_order(key) -> tuple:
    op, mode = key
    return OPS.index(op), MODES.index(mode) if mode in MODES else -1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", default="", help="only layers whose name contains this")
    parser.add_argument("--metric", choices=["macs", "load_bytes", "store_bytes"], default="macs")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--grouped", action="store_true", help="one row for layers with identical rows")
    parser.add_argument("--batch", choices=["harness", "real"], default="harness",
                        help="harness: 256 Linear rows, 4 images at <= 8x8 output pixels; real: each model's batch")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results, violations = [], []
    t0 = time.perf_counter()
    for layer in LAYERS:
        if args.k in layer.name:
            results.append(measure(layer, size=real_size(layer) if args.batch == "real" else None))
            violations += check(results[-1])
            print(f"# {layer.name}: {results[-1].seconds:.1f} s", file=sys.stderr)
    for metric in ("macs", "load_bytes") if args.metric == "macs" else (args.metric,):
        print(f"\n## {metric}: issued at density d / issued at density 1\n")
        print(table(results, metric, args.markdown, args.grouped))
    if args.metric == "macs":
        print("\n## dw[sample] MACs / dw[exact] MACs at the same density\n")
        print(sample_table(results, args.markdown, args.grouped))
    print("\n".join(["", *violations, f"{len(violations)} violations"]))
    print(f"\n# {len(results)} layers in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
