"""Kernel microbenchmarks: threshold Linear and Conv2d against every baseline, in one run, on
the same inputs, with one CSV schema.

    python benchmarks/kernels.py                         # GPU: every suite, fp32/fp16/bf16; CPU: --suite cpu
    python benchmarks/kernels.py --suite cpu --csv kernels.csv --threads 1
    python benchmarks/kernels.py --suite federated --dtypes float32 --csv results.csv
    python benchmarks/plot.py kernels.csv --out plots/

Providers (kernels.md, "Benchmarks compare against all of these"):
    dense        F.linear / F.conv2d with the full weight (cuBLAS / cuDNN / oneDNN: what users have)
    masked       our op on the reference backend: weight * mask, then the dense call, with the
                 threshold gradient (what the SpaFL authors' layers compute)
    gather       index_select of the active rows, the dense call on them, scatter into the full
                 output (the active index list is computed outside the timed region, which
                 favours this baseline)
    smaller      the physically smaller dense layer: only the active rows, no scatter (the upper
                 bound for skipping rows)
    spafl-exact  our op on the default backend (backend="auto": Triton on CUDA, the CPU backend
                 otherwise), exact backward; the backend column says which ran
    spafl-skip   the same, backward without the pruned rows' threshold gradient
Ops: fwd (under no_grad), bwd (autograd.grad of a graph built beforehand, with respect to the
input, the weight and, for ours, the thresholds) and fwd+bwd. Thresholds are set so that exactly
round(density * rows) rows are active. Inputs rotate through 4 sets so that consecutive calls
do not find their operands in cache.

Timing (benchmarks/_common.py): the providers of one (case, dtype, density, op) are
interleaved, each repetition running every provider once in a rotating order; a sample is
enough back-to-back calls to last --min-sample-ms; medians with the 20th and 80th percentiles;
one intra-op thread unless --threads says otherwise. Rows are printed and written to --csv as
soon as their comparison is measured.

Columns: the machine and versions, threads; the case (layer, case, shape, dtype, density,
active rows); provider and backend (compact / reference / triton for ours and masked, torch for
the plain ops); op; reps and inner (calls per sample); ms, ms_p20, ms_p80 (per call); TFLOP/s
of the dense-equivalent and of the active work; speedup_vs_dense (dense ms / this ms) with
speedup_vs_dense_p20/_p80 (the interval of the paired per-repetition ratios) and
speedup_vs_dense_noisy (that interval reaches beyond +-tolerance of the ratio, or fewer than 3
repetitions: do not read the ratio; printed as '?'); fraction_of_upper_bound (smaller ms / this
ms) with its interval and flag; noisy (either ratio is noisy); the command.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from _common import (
    DTYPES,
    Ratio,
    add_run_args,
    check_run_args,
    fmt_ms,
    fmt_ratio,
    interleaved,
    parser_for,
    ratio,
    ratio_columns,
    report,
    row_ratio,
    start,
    timestamp,
)

import spafl
from spafl import threshold_conv2d, threshold_for_density, threshold_linear

PROVIDERS = ("dense", "masked", "gather", "smaller", "spafl-exact", "spafl-skip")
OPS = ("fwd", "bwd", "fwd+bwd")
DENSITIES = (1.0, 0.75, 0.5, 0.25, 0.2, 0.1, 0.05)
CPU_DENSITIES = (1.0, 0.5, 0.25, 0.1, 0.05)
COLUMNS = ("timestamp", "device", "torch", "triton", "python", "spafl", "threads", "layer", "case", "shape", "dtype",
           "density", "active", "provider", "backend", "op", "reps", "inner", "ms", "ms_p20", "ms_p80",
           "tflops_dense_equiv", "tflops_effective", "speedup_vs_dense", "speedup_vs_dense_p20",
           "speedup_vs_dense_p80", "speedup_vs_dense_noisy", "fraction_of_upper_bound", "fraction_of_upper_bound_p20",
           "fraction_of_upper_bound_p80", "fraction_of_upper_bound_noisy", "noisy", "command")


@dataclass(frozen=True)
class LinearCase:
    name: str
    m: int  # rows of X (batch x tokens)
    n: int  # output features (the rows that are pruned)
    k: int  # input features
    bias: bool = True

    layer = "linear"

    @property
    def shape(self) -> str:
        return f"M={self.m} N={self.n} K={self.k}" + ("" if self.bias else " no-bias")

    @property
    def rows(self) -> int:
        return self.n

    def flops(self) -> int:
        return 2 * self.m * self.n * self.k


@dataclass(frozen=True)
class ConvCase:
    name: str
    batch: int
    cin: int
    cout: int
    size: int
    kernel: int = 3
    stride: int = 1
    padding: int = 1
    bias: bool = True

    layer = "conv2d"

    @property
    def out(self) -> int:
        return (self.size + 2 * self.padding - self.kernel) // self.stride + 1

    @property
    def shape(self) -> str:
        return (f"B={self.batch} Cin={self.cin} Cout={self.cout} HW={self.size} k={self.kernel} s={self.stride} "
                f"p={self.padding}" + ("" if self.bias else " no-bias"))

    @property
    def rows(self) -> int:
        return self.cout

    def flops(self) -> int:
        return 2 * self.batch * self.out**2 * self.cout * self.cin * self.kernel**2


def _resnet18(batch: int) -> list:
    """The 3x3 and 1x1 convolutions of a CIFAR ResNet-18 (64 to 512 channels)."""
    out = []
    for cin, cout, size in ((64, 64, 32), (64, 128, 32), (128, 128, 16), (128, 256, 16), (256, 256, 8),
                            (256, 512, 8), (512, 512, 4)):
        stride = 1 if cin == cout else 2
        out.append(ConvCase(f"resnet18-{cin}-{cout}-b{batch}", batch, cin, cout, size, 3, stride, 1))
    out.append(ConvCase(f"resnet18-1x1-128-256-b{batch}", batch, 128, 256, 16, 1, 2, 0))
    return out


# LeNet-5 as the federated model builds it (no biases), at its training batch of 64.
LENET5 = [
    ConvCase("lenet5-conv1-b64", 64, 1, 20, 28, 5, 1, 0, bias=False),
    ConvCase("lenet5-conv2-b64", 64, 20, 50, 12, 5, 1, 0, bias=False),
    LinearCase("lenet5-fc3-b64", 64, 500, 800, bias=False),
    LinearCase("lenet5-fc4-b64", 64, 10, 500, bias=False),
]
# Shapes of the federated models (spafl.federated.models) at their training batch sizes.
SUITES = {
    "smoke": [LinearCase("smoke-linear", 33, 48, 40), ConvCase("smoke-conv", 2, 8, 12, 9, 3, 1, 1)],
    "federated": [
        *LENET5,
        ConvCase("conv4-conv2-b16", 16, 64, 64, 28, 5, 1, 0),
        ConvCase("conv4-conv3-b16", 16, 64, 128, 12, 5, 1, 0),
        LinearCase("vit-qkv-b16", 16 * 65, 1536, 128),
        LinearCase("vit-mlp-fc1-b16", 16 * 65, 256, 128),
        ConvCase("resnet18-spafl-128-b64", 64, 128, 128, 8, 3, 1, 1),
    ],
    # The 4096x4096 Linear also at 512 and 128 rows: the batches the cost model prices.
    "large": [LinearCase("large-8192x4096x4096", 8192, 4096, 4096), LinearCase("large-4096x4096x1024", 4096, 4096,
                                                                                1024),
              LinearCase("large-512x4096x4096", 512, 4096, 4096), LinearCase("large-128x4096x4096", 128, 4096, 4096)],
    "resnet18": _resnet18(64) + _resnet18(256),
}
# The CPU targets' shapes (a 4096x4096 Linear at batch 256, the LeNet-5 layers), then the
# other federated layers.
# The federated layers first: seconds each, so rows come at once; the 4096x4096 Linear, minutes
# per density on a CPU, last.
SUITES["cpu"] = [*SUITES["federated"], LinearCase("linear-4096x4096-b256", 256, 4096, 4096)]
SUITES["all"] = SUITES["federated"] + SUITES["large"] + SUITES["resnet18"]


# --- providers ----------------------------------------------------------------------------


def resolved_backend(weight: torch.Tensor, backend: str = "auto") -> str:
    """The backend our op runs for ``weight`` under ``backend`` (what "auto" picks)."""
    from spafl._checks import resolve_backend

    return resolve_backend(backend, weight)


class Bench:
    """One case at one dtype: weights, rotating inputs and output gradients, and for a density,
    a callable ``provider(x) -> y`` per provider with the tensors to differentiate."""

    def __init__(self, case, dtype: torch.dtype, device: torch.device, sets: int = 4, seed: int = 0):
        self.case, self.dtype, self.device = case, dtype, device
        g = torch.Generator().manual_seed(seed)
        fmt = torch.channels_last if case.layer == "conv2d" else torch.contiguous_format
        if case.layer == "linear":
            xs = [torch.randn(case.m, case.k, generator=g) for _ in range(sets)]
            dys = [torch.randn(case.m, case.n, generator=g) for _ in range(sets)]
            w = torch.randn(case.n, case.k, generator=g) / case.k**0.5
        else:
            xs = [torch.randn(case.batch, case.cin, case.size, case.size, generator=g) for _ in range(sets)]
            dys = [torch.randn(case.batch, case.cout, case.out, case.out, generator=g) for _ in range(sets)]
            fan_in = case.cin * case.kernel**2
            w = torch.randn(case.cout, case.cin, case.kernel, case.kernel, generator=g) / fan_in**0.5
        to = lambda t: t.to(device, dtype).contiguous(memory_format=fmt) if t.dim() == 4 else t.to(device, dtype)  # noqa: E731
        self.xs, self.dys = [to(x) for x in xs], [to(dy) for dy in dys]
        self.weight = to(w).requires_grad_()
        self.bias = (torch.zeros(case.rows, device=device, dtype=dtype, requires_grad=True) if case.bias else None)

    def _dense(self, x, w, b):
        c = self.case
        if c.layer == "linear":
            return F.linear(x, w, b)
        return F.conv2d(x, w, b, c.stride, c.padding)

    def _ours(self, tau, backend: str, mode: str):
        w, b, c = self.weight, self.bias, self.case
        if c.layer == "linear":
            return lambda x: threshold_linear(x, w, tau, b, backend=backend, backward_mode=mode, collapse_density=None)
        return lambda x: threshold_conv2d(x, w, tau, b, c.stride, c.padding, backend=backend, backward_mode=mode,
                                          collapse_density=None)

    def providers(self, density: float) -> dict:
        """``{name: (fn(x), params to differentiate, output-gradient transform, backend)}``."""
        w, b = self.weight, self.bias
        tau = threshold_for_density(w.detach(), density).requires_grad_()
        mask = spafl.threshold_row_mask(w, tau).mask
        active = mask.nonzero().flatten()
        self.active, self.active_index = int(active.numel()), active
        small_w = w.detach()[active].clone().requires_grad_()
        small_b = b.detach()[active].clone().requires_grad_() if b is not None else None
        dim = -1 if self.case.layer == "linear" else 1  # the output's feature / channel dimension
        with_b = lambda *ps: tuple(p for p in ps if p is not None)  # noqa: E731

        def gather(x):
            y = self._dense(x, w.index_select(0, active), b.index_select(0, active) if b is not None else None)
            shape = list(y.shape)
            shape[dim] = self.case.rows
            return torch.zeros(shape, device=y.device, dtype=y.dtype).index_copy(dim, active, y)

        ours = resolved_backend(w)
        out = {
            "dense": (lambda x: self._dense(x, w, b), with_b(w, b), None, "torch"),
            "masked": (self._ours(tau, "reference", "exact"), with_b(w, tau, b), None, "reference"),
            "gather": (gather, with_b(w, b), None, "torch"),
            "smaller": (lambda x: self._dense(x, small_w, small_b), with_b(small_w, small_b),
                        lambda dy: dy.index_select(dim, active).contiguous(), "torch"),
            "spafl-exact": (self._ours(tau, "auto", "exact"), with_b(w, tau, b), None, ours),
            "spafl-skip": (self._ours(tau, "auto", "skip"), with_b(w, tau, b), None, ours),
        }
        if self.active == 0:
            del out["smaller"], out["gather"]  # nothing to run
        return out


def runner(bench: Bench, fn, params, dy_map, op: str):
    """A no-argument callable that runs ``op`` of one provider once, on the next input set."""
    n = len(bench.xs)
    step = [0]
    dys = [dy_map(dy) if dy_map else dy for dy in bench.dys]
    if op == "fwd":
        def run():
            step[0] = (step[0] + 1) % n
            with torch.no_grad():
                fn(bench.xs[step[0]])
    elif op == "fwd+bwd":
        xs = [x.detach().requires_grad_() for x in bench.xs]

        def run():
            i = step[0] = (step[0] + 1) % n
            torch.autograd.grad(fn(xs[i]), (xs[i], *params), dys[i])
    elif op == "bwd":
        graphs = []
        for i in range(n):
            x = bench.xs[i].detach().requires_grad_()
            graphs.append((fn(x), x))

        def run():
            i = step[0] = (step[0] + 1) % n
            y, x = graphs[i]
            torch.autograd.grad(y, (x, *params), dys[i], retain_graph=True)
    else:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    return run


def group_rows(case, dtype_name: str, density: float, active: int, op: str, timings: dict, backends: dict,
               tolerance: float) -> list[dict]:
    """The rows of one interleaved comparison: per provider its times, and its ratios against
    ``dense`` and ``smaller`` (NaN where that provider was not run) with their spread."""
    flops = case.flops() * {"fwd": 1, "bwd": 2, "fwd+bwd": 3}[op]
    rows = []
    for name, t in timings.items():
        vs_dense = ratio(timings["dense"], t, tolerance) if "dense" in timings else Ratio.missing()
        of_bound = ratio(timings["smaller"], t, tolerance) if "smaller" in timings else Ratio.missing()
        rows.append({"layer": case.layer, "case": case.name, "shape": case.shape, "dtype": dtype_name,
                     "density": density, "active": active, "provider": name, "backend": backends[name], "op": op,
                     "reps": len(t.samples), "inner": t.inner, "ms": t.median, "ms_p20": t.p20, "ms_p80": t.p80,
                     "tflops_dense_equiv": flops / t.median / 1e9,
                     "tflops_effective": flops * active / case.rows / t.median / 1e9,
                     **ratio_columns("speedup_vs_dense", vs_dense),
                     **ratio_columns("fraction_of_upper_bound", of_bound),
                     "noisy": vs_dense.noisy or of_bound.noisy})
    return rows


def progress_line(done: int, total: int, elapsed: float, label: str) -> str:
    """``[done/total] label: elapsed, ETA`` (the ETA assumes the comparisons left cost the mean of
    those done: cases differ in size, so it is a rough guide that firms up as the run goes)."""
    eta = elapsed / done * (total - done) if done else float("nan")
    return f"[{done}/{total}] {label}: {elapsed:.0f} s elapsed, about {eta:.0f} s left"


def measure(cases, dtypes, densities, ops, providers, device, reps: int, min_sample_ms: float, tolerance: float,
            base: dict, progress=None) -> Iterator[dict]:
    """Every row, as soon as its comparison is measured: per case, dtype, density and op, the
    ``providers`` interleaved. ``base`` holds the columns common to every row. ``progress``
    (a file, e.g. stderr) gets one line per comparison with the count done and an ETA, so a
    long suite is never silent on one case."""
    total, done, start = len(cases) * len(dtypes) * len(densities) * len(ops), 0, time.perf_counter()
    for case in cases:
        for dtype_name in dtypes:
            bench = Bench(case, DTYPES[dtype_name], device)
            for density in densities:
                table = bench.providers(density)
                for op in ops:
                    fns = {name: runner(bench, *table[name][:3], op) for name in providers if name in table}
                    timings = interleaved(fns, device, reps, min_sample_ms)
                    backends = {name: table[name][3] for name in fns}
                    done += 1
                    if progress is not None:
                        label = f"{case.name} {dtype_name} density {density:g} {op}"
                        print(progress_line(done, total, time.perf_counter() - start, label), file=progress,
                              flush=True)
                    for row in group_rows(case, dtype_name, density, bench.active, op, timings, backends, tolerance):
                        yield {"timestamp": timestamp(), **base, **row}


TABLE_HEADER = (f"{'case':<24}{'dtype':<9}{'dens':>5} {'op':<8}{'provider':<12}{'backend':<10}{'ms (p20-p80)':<26}"
                f"{'vs dense (p20-p80)':<24}of bound (smaller ms / this ms)")


def show_row(r: dict) -> None:
    vs_dense, of_bound = row_ratio(r, "speedup_vs_dense"), row_ratio(r, "fraction_of_upper_bound")
    print(f"{r['case']:<24}{r['dtype']:<9}{r['density']:>5.2f} {r['op']:<8}{r['provider']:<12}{r['backend']:<10}"
          f"{fmt_ms(r['ms'], r['ms_p20'], r['ms_p80']):<25} {fmt_ratio(vs_dense):<23} {fmt_ratio(of_bound)}",
          flush=True)


def build_parser(cuda: bool):
    p = parser_for(__doc__)
    p.add_argument("--suite", choices=sorted(SUITES), default="all" if cuda else "cpu",
                   help="the cases to run: smoke (two tiny cases: checks the setup in well under a minute; its ratios "
                        "mean little), cpu (the CPU targets' shapes and the federated "
                        "layers), federated, large, resnet18, all (federated + large + resnet18)")
    p.add_argument("--cases", nargs="+", default=None, metavar="NAME", help="only these cases of the suite")
    p.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES) if cuda else ["float32"],
                   help="input, weight and threshold dtype")
    p.add_argument("--densities", type=float, nargs="+", default=None, metavar="D",
                   help=f"fractions of rows kept, in [0, 1] (default {' '.join(map(str, CPU_DENSITIES))} for the "
                        f"cpu suite, else {' '.join(map(str, DENSITIES))})")
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS), help="what is timed")
    p.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS),
                   help="implementations to compare (dense is the baseline of every ratio and must stay)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress line (comparisons done, elapsed, ETA) on stderr after each comparison")
    add_run_args(p, default_reps=50 if cuda else 15, default_min_sample_ms=1.0 if cuda else 2.0)
    return p


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    p = build_parser(cuda)
    args = p.parse_args(argv)
    check_run_args(p, args)
    if args.densities is None:
        args.densities = list(CPU_DENSITIES if args.suite == "cpu" else DENSITIES)
    bad = [d for d in args.densities if not (math.isfinite(d) and 0.0 <= d <= 1.0)]
    if bad:
        p.error(f"densities must be in [0, 1], got {bad}")
    if "dense" not in args.providers:
        p.error("the dense provider is the baseline of every ratio: keep it")
    cases = [c for c in SUITES[args.suite] if args.cases is None or c.name in args.cases]
    if not cases:
        p.error(f"no case of suite {args.suite!r} is named {args.cases}; cases: "
                f"{', '.join(c.name for c in SUITES[args.suite])}")
    device = torch.device("cuda" if cuda else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 is TF32 for every provider alike
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    sink, base = start(p, args, device, __file__, argv, COLUMNS, TABLE_HEADER)
    rows = measure(cases, args.dtypes, args.densities, args.ops, args.providers, device, args.reps,
                   args.min_sample_ms, args.tolerance, base, progress=None if args.no_progress else sys.stderr)
    return report(rows, sink, show_row)


if __name__ == "__main__":
    sys.exit(main())
