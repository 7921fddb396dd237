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
import sys

import torch
import torch.nn.functional as F
from _common import DTYPES, add_speedups, append_csv, environment, measure, print_table, rotating

import spafl
from spafl import threshold_for_density, threshold_linear


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
    env = environment(device)
    next_inputs = rotating(inputs, grads)
    rows = []
    for density in args.densities:
        tau = threshold_for_density(weight.detach(), density).requires_grad_()
        mask = spafl.threshold_row_mask(weight, tau).mask
        providers = {
            "dense": (lambda x: F.linear(x, weight, bias), next_inputs),
            "masked": (lambda x, mask=mask: F.linear(x, weight * mask.to(dtype)[:, None], bias), next_inputs),
        }
        for mode in args.modes:
            providers[f"spafl-{mode}"] = (lambda x, mode=mode, tau=tau: threshold_linear(
                x, weight, tau, bias, backward_mode=mode), next_inputs)
        row = {**env, "dtype": args.dtype, "M": m, "N": n, "K": k, "density": density}
        rows += measure(providers, device, args.reps, args.modes[0], row, 2 * m * n * k)
    add_speedups(rows)
    print_table(rows, f"# {env['device']}; torch {env['torch']}, triton {env['triton']}; M={m} N={n} K={k} "
                      f"{args.dtype}; command: {' '.join(sys.argv)}")
    if args.csv:
        append_csv(args.csv, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
