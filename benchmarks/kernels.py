"""Kernel microbenchmarks: threshold Linear and Conv2d against every baseline, in one run, on the
same inputs, with one CSV schema.

    python benchmarks/kernels.py                                  # GPU: every suite, fp32/fp16/bf16
    python benchmarks/kernels.py --suite federated --dtypes float32 --csv results.csv
    python benchmarks/plot.py results.csv --out plots/

Providers (``kernels.md``, "Benchmarks compare against all of these"):
    dense        F.linear / F.conv2d with the full weight (cuBLAS / cuDNN: what users have today)
    masked       weight * mask, then the dense call (what the SpaFL and SparsyFed code does)
    gather       index_select of the active rows, the dense call on them, scatter into the
                 full output (the active index list is computed outside the timed region,
                 which favours this baseline)
    smaller      the physically smaller dense layer: only the active rows, no scatter (the
                 upper bound for skipping rows)
    spafl-exact  our op (Triton on CUDA, the PyTorch reference on CPU), exact backward
    spafl-skip   our op, backward without the pruned rows' threshold gradient
Ops: ``fwd`` (under no_grad), ``bwd`` (``autograd.grad`` of a graph built beforehand, with
respect to the input, the weight and, for ours, the thresholds) and ``fwd+bwd``. Thresholds are
set so that exactly ``round(density * rows)`` rows are active. Timing: ``triton.testing.do_bench``
on CUDA (median, 20th and 80th percentiles), wall-clock repeats on CPU; inputs rotate through 4
sets so that consecutive calls do not find their operands in cache. Each row carries the device
and versions, the speedup over ``dense`` and the fraction of ``smaller`` (its time / ours).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from _common import DTYPES, append_csv, environment, time_ms, timestamp

import spafl
from spafl import threshold_conv2d, threshold_for_density, threshold_linear

PROVIDERS = ("dense", "masked", "gather", "smaller", "spafl-exact", "spafl-skip")
OPS = ("fwd", "bwd", "fwd+bwd")
DENSITIES = (1.0, 0.75, 0.5, 0.25, 0.1, 0.05)
COLUMNS = ("timestamp", "device", "torch", "triton", "python", "spafl", "layer", "case", "shape", "dtype", "density",
           "active", "provider", "op", "ms", "ms_p20", "ms_p80", "tflops_dense_equiv", "tflops_effective",
           "speedup_vs_dense", "fraction_of_upper_bound", "command")


@dataclass(frozen=True)
class LinearCase:
    name: str
    m: int  # rows of X (batch x tokens)
    n: int  # output features (the rows that are pruned)
    k: int  # input features

    layer = "linear"

    @property
    def shape(self) -> str:
        return f"M={self.m} N={self.n} K={self.k}"

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

    layer = "conv2d"

    @property
    def out(self) -> int:
        return (self.size + 2 * self.padding - self.kernel) // self.stride + 1

    @property
    def shape(self) -> str:
        return (f"B={self.batch} Cin={self.cin} Cout={self.cout} HW={self.size} k={self.kernel} s={self.stride} "
                f"p={self.padding}")

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


# Shapes of the federated models (spafl.federated.models) at their training batch sizes.
SUITES = {
    "smoke": [LinearCase("smoke-linear", 33, 48, 40), ConvCase("smoke-conv", 2, 8, 12, 9, 3, 1, 1)],
    "federated": [
        LinearCase("lenet5-fc3-b64", 64, 500, 800),
        ConvCase("lenet5-conv2-b64", 64, 20, 50, 12, 5, 1, 0),
        ConvCase("conv4-conv2-b16", 16, 64, 64, 28, 5, 1, 0),
        ConvCase("conv4-conv3-b16", 16, 64, 128, 12, 5, 1, 0),
        LinearCase("vit-qkv-b16", 16 * 65, 1536, 128),
        LinearCase("vit-mlp-fc1-b16", 16 * 65, 256, 128),
        ConvCase("resnet18-spafl-128-b64", 64, 128, 128, 8, 3, 1, 1),
    ],
    "large": [LinearCase("large-8192x4096x4096", 8192, 4096, 4096), LinearCase("large-4096x4096x1024", 4096, 4096,
                                                                                1024)],
    "resnet18": _resnet18(64) + _resnet18(256),
}
SUITES["cpu"] = SUITES["federated"]
SUITES["all"] = SUITES["federated"] + SUITES["large"] + SUITES["resnet18"]


# --- providers ----------------------------------------------------------------------------


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
        self.bias = torch.zeros(case.rows, device=device, dtype=dtype, requires_grad=True)

    def _dense(self, x, w, b):
        c = self.case
        if c.layer == "linear":
            return F.linear(x, w, b)
        return F.conv2d(x, w, b, c.stride, c.padding)

    def providers(self, density: float) -> dict:
        """``{name: (fn(x), params to differentiate, output-gradient transform)}``."""
        w, b = self.weight, self.bias
        tau = threshold_for_density(w.detach(), density).requires_grad_()
        mask = spafl.threshold_row_mask(w, tau).mask
        active = mask.nonzero().flatten()
        self.active, self.active_index = int(active.numel()), active
        view = (-1, 1) if w.dim() == 2 else (-1, 1, 1, 1)
        small_w = w.detach()[active].clone().requires_grad_()
        small_b = b.detach()[active].clone().requires_grad_()
        dim = 1  # the output's feature / channel dimension
        if self.case.layer == "linear":
            dim = -1

        def gather(x):
            y = self._dense(x, w.index_select(0, active), b.index_select(0, active))
            shape = list(y.shape)
            shape[dim] = self.case.rows
            return torch.zeros(shape, device=y.device, dtype=y.dtype).index_copy(dim, active, y)

        common = dict(collapse_density=None)
        out = {
            "dense": (lambda x: self._dense(x, w, b), (w, b), None),
            "masked": (lambda x: self._dense(x, w * mask.to(w.dtype).view(view), b), (w, b), None),
            "gather": (gather, (w, b), None),
            "smaller": (lambda x: self._dense(x, small_w, small_b), (small_w, small_b),
                        lambda dy: dy.index_select(dim, active).contiguous()),
        }
        for mode in ("exact", "skip"):
            if self.case.layer == "linear":
                fn = lambda x, mode=mode: threshold_linear(x, w, tau, b, backward_mode=mode, **common)  # noqa: E731
            else:
                c = self.case
                fn = lambda x, mode=mode, c=c: threshold_conv2d(x, w, tau, b, c.stride, c.padding,  # noqa: E731
                                                                backward_mode=mode, **common)
            out[f"spafl-{mode}"] = (fn, (w, tau, b), None)
        if self.active == 0:
            del out["smaller"], out["gather"]  # nothing to run
        return out


def timed(bench: Bench, fn, params, dy_map, op: str, device: torch.device, reps: int):
    """``(median, p20, p80)`` ms of one provider and op over the rotating input sets."""
    n = len(bench.xs)
    step = [0]
    dys = [dy_map(dy) if dy_map else dy for dy in bench.dys]
    if op == "fwd":
        def run():
            step[0] = (step[0] + 1) % n
            with torch.no_grad():
                fn(bench.xs[step[0]])
    elif op == "fwd+bwd":
        def run():
            i = step[0] = (step[0] + 1) % n
            x = bench.xs[i].requires_grad_()
            torch.autograd.grad(fn(x), (x, *params), dys[i])
            x.requires_grad_(False)
    else:
        graphs = []
        for i in range(n):
            x = bench.xs[i].detach().requires_grad_()
            graphs.append((fn(x), x))

        def run():
            i = step[0] = (step[0] + 1) % n
            y, x = graphs[i]
            torch.autograd.grad(y, (x, *params), dys[i], retain_graph=True)
    return time_ms(run, device, reps)


def run_case(case, dtype_name: str, densities, ops, providers, device, reps, env, command) -> list[dict]:
    bench = Bench(case, DTYPES[dtype_name], device)
    rows = []
    for density in densities:
        table = bench.providers(density)
        for op in ops:
            flops = case.flops() * {"fwd": 1, "bwd": 2, "fwd+bwd": 3}[op]
            for name in providers:
                if name not in table:
                    continue
                fn, params, dy_map = table[name]
                ms, lo, hi = timed(bench, fn, params, dy_map, op, device, reps)
                rows.append({"timestamp": timestamp(), **{k: env.get(k) for k in ("device", "torch", "triton",
                                                                                    "python", "spafl")},
                             "layer": case.layer, "case": case.name, "shape": case.shape, "dtype": dtype_name,
                             "density": density, "active": bench.active, "provider": name, "op": op, "ms": ms,
                             "ms_p20": lo, "ms_p80": hi, "tflops_dense_equiv": flops / ms / 1e9,
                             "tflops_effective": flops * bench.active / case.rows / ms / 1e9, "command": command})
    add_ratios(rows)
    return rows


def add_ratios(rows: list[dict]) -> None:
    """``speedup_vs_dense`` and ``fraction_of_upper_bound`` (``smaller``'s time / this time) of
    every row, against the rows of the same case, dtype, density and op."""
    key = lambda r: (r["case"], r["dtype"], r["density"], r["op"])  # noqa: E731
    dense = {key(r): r["ms"] for r in rows if r["provider"] == "dense"}
    smaller = {key(r): r["ms"] for r in rows if r["provider"] == "smaller"}
    for r in rows:
        r["speedup_vs_dense"] = dense[key(r)] / r["ms"] if key(r) in dense else float("nan")
        r["fraction_of_upper_bound"] = smaller[key(r)] / r["ms"] if key(r) in smaller else float("nan")


def print_rows(rows: list[dict]) -> None:
    print(f"{'case':<26}{'dtype':<9}{'dens':>5} {'op':<8}{'provider':<12}{'ms':>9}{'vs dense':>9}{'of bound':>9}")
    for r in rows:
        print(f"{r['case']:<26}{r['dtype']:<9}{r['density']:>5.2f} {r['op']:<8}{r['provider']:<12}{r['ms']:>9.3f}"
              f"{r['speedup_vs_dense']:>8.2f}x{r['fraction_of_upper_bound']:>9.2f}")


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", choices=sorted(SUITES), default="all" if cuda else "cpu")
    p.add_argument("--cases", nargs="+", default=None, help="only these case names")
    p.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES) if cuda else ["float32"])
    p.add_argument("--densities", type=float, nargs="+", default=list(DENSITIES))
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    p.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    p.add_argument("--reps", type=int, default=20 if cuda else 5)
    p.add_argument("--csv", default=None, help="append the rows to this CSV file")
    args = p.parse_args(argv)
    bad = [d for d in args.densities if not 0.0 <= d <= 1.0]
    if bad:
        p.error(f"densities must be in [0, 1], got {bad}")
    if args.reps < 1:
        p.error(f"--reps must be at least 1, got {args.reps}")
    if "dense" not in args.providers:
        p.error("the dense provider is the baseline of every ratio: keep it")
    device = torch.device("cuda" if cuda else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 is TF32 for every provider alike
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    env = environment(device)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    cases = [c for c in SUITES[args.suite] if args.cases is None or c.name in args.cases]
    if not cases:
        p.error(f"no case of suite {args.suite!r} is named {args.cases}")
    print(f"# {env['device']}; torch {env['torch']}, triton {env['triton']}; {command}")
    for case in cases:
        for dtype in args.dtypes:
            rows = run_case(case, dtype, args.densities, args.ops, args.providers, device, args.reps, env, command)
            print_rows(rows)
            if args.csv:
                append_csv(args.csv, [{k: r[k] for k in COLUMNS} for r in rows])
    return 0


if __name__ == "__main__":
    sys.exit(main())
