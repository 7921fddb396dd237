"""Threshold Linear vs the dense layer: forward and forward+backward time at several densities.

    python benchmarks/bench_linear.py                        # GPU: 8192 x 4096 x 4096, bf16
    python benchmarks/bench_linear.py --dtype float32 --m 2048 --n 1024 --k 1024 --csv out.csv

Providers, timed on the same inputs in one run:
    dense    F.linear with the full weight (what a user has today)
    masked   the reference path: weight * mask, then F.linear (what the SpaFL code does)
    spafl    our layer (Triton kernels on CUDA; on CPU the reference, so it equals "masked")
Thresholds are set so that exactly round(density * N) rows are active. On CUDA, times are
`triton.testing.do_bench` medians (20th / 80th percentiles beside them) over rotating input
sets; on CPU, medians of wall-clock repeats. The CSV row carries device and versions.
"""

from __future__ import annotations

import argparse
import csv
import platform
import statistics
import sys
import time
from datetime import datetime, timezone

import torch
import torch.nn.functional as F

import spafl
from spafl import threshold_for_density, threshold_linear

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _time(fn, device: torch.device, reps: int) -> tuple[float, float, float]:
    """(median, p20, p80) in milliseconds."""
    if device.type == "cuda":
        import triton.testing

        return tuple(triton.testing.do_bench(fn, warmup=25, rep=100 * reps // 10, quantiles=[0.5, 0.2, 0.8]))
    fn()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(samples, n=10)
    return statistics.median(samples), q[1], q[7]


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--m", type=int, default=8192 if cuda else 512)
    p.add_argument("--n", type=int, default=4096 if cuda else 512)
    p.add_argument("--k", type=int, default=4096 if cuda else 512)
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16" if cuda else "float32")
    p.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.5, 0.1])
    p.add_argument("--modes", nargs="+", default=["exact", "skip"], choices=["exact", "skip", "sample"])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--csv", default=None, help="append rows to this CSV file")
    args = p.parse_args(argv)

    device = torch.device("cuda" if cuda else "cpu")
    dtype = DTYPES[args.dtype]
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 rows are TF32 for every provider alike
    m, n, k = args.m, args.n, args.k
    g = torch.Generator(device="cpu").manual_seed(0)
    inputs = [torch.randn(m, k, generator=g).to(device, dtype) for _ in range(4)]
    grads = [torch.randn(m, n, generator=g).to(device, dtype) for _ in range(4)]
    weight = (torch.randn(n, k, generator=g) / k**0.5).to(device, dtype).requires_grad_()
    bias = torch.zeros(n, device=device, dtype=dtype, requires_grad=True)
    device_name = torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()
    versions = {"torch": torch.__version__, "spafl": spafl.__version__}
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        versions["triton"] = ""
    rows = []
    step = [0]

    def next_inputs():
        step[0] = (step[0] + 1) % len(inputs)
        return inputs[step[0]], grads[step[0]]

    for density in args.densities:
        tau = threshold_for_density(weight.detach(), density).requires_grad_()
        mask = spafl.threshold_row_mask(weight, tau).mask
        providers = {
            "dense": lambda x: F.linear(x, weight, bias),
            "masked": lambda x, mask=mask: F.linear(x, weight * mask.to(dtype)[:, None], bias),
        }
        for mode in args.modes:
            providers[f"spafl-{mode}"] = lambda x, mode=mode, tau=tau: threshold_linear(
                x, weight, tau, bias, backward_mode=mode)
        for name, fn in providers.items():
            for op in ("fwd", "fwd+bwd"):
                if op == "fwd" and name.startswith("spafl-") and name != f"spafl-{args.modes[0]}":
                    continue  # the forward does not depend on the backward mode

                def run(fn=fn, op=op):
                    x, dy = next_inputs()
                    if op == "fwd":
                        with torch.no_grad():
                            fn(x)
                    else:
                        x = x.requires_grad_()
                        fn(x).backward(dy)
                        x.requires_grad_(False)

                ms, lo, hi = _time(run, device, args.reps)
                flops = 2 * m * n * k * (1 if op == "fwd" else 3)
                rows.append({"device": device_name, **versions, "provider": name,
                             "op": op, "dtype": args.dtype, "M": m, "N": n, "K": k, "density": density,
                             "ms": ms, "ms_p20": lo, "ms_p80": hi, "tflops_dense_equiv": flops / ms / 1e9,
                             "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    dense = {(r["op"], r["density"]): r["ms"] for r in rows if r["provider"] == "dense"}
    for r in rows:
        r["speedup_vs_dense"] = dense[(r["op"], r["density"])] / r["ms"]
    print(f"# {device_name}; torch {versions['torch']}, triton {versions['triton']}; "
          f"M={m} N={n} K={k} {args.dtype}; command: {' '.join(sys.argv)}")
    print(f"{'provider':<14}{'op':<9}{'density':>8}{'ms':>10}{'p20':>9}{'p80':>9}{'vs dense':>10}")
    for r in rows:
        print(f"{r['provider']:<14}{r['op']:<9}{r['density']:>8.2f}{r['ms']:>10.3f}{r['ms_p20']:>9.3f}"
              f"{r['ms_p80']:>9.3f}{r['speedup_vs_dense']:>9.2f}x")
    if args.csv:
        with open(args.csv, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            if f.tell() == 0:
                writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
