"""Threshold Conv2d vs cuDNN: forward and forward+backward time at several densities.

    python benchmarks/bench_conv.py          # GPU: ResNet-18 layer, batch 64, 64->64, 32x32, 3x3, bf16
    python benchmarks/bench_conv.py --batch 32 --cin 128 --cout 128 --size 16 --dtype float32 --csv out.csv

Providers, timed on the same inputs in one run:
    dense    F.conv2d with the full weight (cuDNN on CUDA: what a user has today)
    masked   the reference path: weight * mask, then F.conv2d (what the SpaFL code does)
    compact  F.conv2d with only the active filters and no scatter back: the physically smaller
             layer, the upper bound for skipping filters
    spafl    our layer (Triton implicit GEMM on CUDA; on CPU the reference, so it equals "masked")
Thresholds are set so that exactly round(density * Cout) filters are active. Inputs are
channels-last unless --nchw. Timing as in bench_linear.py.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from _common import DTYPES, add_speedups, append_csv, environment, measure, print_table, rotating

import spafl
from spafl import threshold_conv2d, threshold_for_density


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64 if cuda else 8)
    p.add_argument("--cin", type=int, default=64)
    p.add_argument("--cout", type=int, default=64)
    p.add_argument("--size", type=int, default=32, help="input height and width")
    p.add_argument("--kernel", type=int, default=3)
    p.add_argument("--stride", type=int, default=1)
    p.add_argument("--nchw", action="store_true", help="NCHW inputs instead of channels-last")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16" if cuda else "float32")
    p.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.5, 0.1])
    p.add_argument("--modes", nargs="+", default=["exact", "skip"], choices=["exact", "skip", "sample"])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--csv", default=None, help="append rows to this CSV file")
    args = p.parse_args(argv)

    device = torch.device("cuda" if cuda else "cpu")
    dtype = DTYPES[args.dtype]
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 rows are TF32 for every provider alike
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True  # cuDNN picks its fastest algorithm per shape
    fmt = torch.contiguous_format if args.nchw else torch.channels_last
    b, cin, cout, size, k, stride = args.batch, args.cin, args.cout, args.size, args.kernel, args.stride
    pad = k // 2
    out = (size + 2 * pad - k) // stride + 1
    g = torch.Generator(device="cpu").manual_seed(0)
    inputs = [torch.randn(b, cin, size, size, generator=g).to(device, dtype).to(memory_format=fmt) for _ in range(4)]
    grads = [torch.randn(b, cout, out, out, generator=g).to(device, dtype).to(memory_format=fmt) for _ in range(4)]
    weight = (torch.randn(cout, cin, k, k, generator=g) / (cin * k * k) ** 0.5).to(device, dtype)
    weight = weight.to(memory_format=fmt).requires_grad_()
    bias = torch.zeros(cout, device=device, dtype=dtype, requires_grad=True)
    env = environment(device)
    next_inputs = rotating(inputs, grads)
    rows = []
    for density in args.densities:
        tau = threshold_for_density(weight.detach(), density).requires_grad_()
        mask = spafl.threshold_row_mask(weight, tau).mask
        active = mask.nonzero().flatten()
        small_w = weight.detach()[active].clone().requires_grad_()
        small_b = bias.detach()[active].clone().requires_grad_()
        small_grads = [dy[:, active].contiguous(memory_format=fmt) for dy in grads]
        next_small = rotating(inputs, small_grads)
        providers = {
            "dense": (lambda x: F.conv2d(x, weight, bias, stride, pad), next_inputs),
            "masked": (lambda x, mask=mask: F.conv2d(x, weight * mask.to(dtype)[:, None, None, None], bias, stride,
                                                     pad), next_inputs),
            "compact": (lambda x, w=small_w, bb=small_b: F.conv2d(x, w, bb, stride, pad), next_small),
        }
        for mode in args.modes:
            providers[f"spafl-{mode}"] = (lambda x, mode=mode, tau=tau: threshold_conv2d(
                x, weight, tau, bias, stride, pad, backward_mode=mode), next_inputs)
        if active.numel() == 0:
            del providers["compact"]  # no filters left: nothing to run
        row = {**env, "dtype": args.dtype, "layout": str(fmt)[6:], "batch": b, "cin": cin, "cout": cout,
               "size": size, "kernel": k, "stride": stride, "density": density}
        rows += measure(providers, device, args.reps, args.modes[0], row, 2 * b * out * out * cout * cin * k * k)
    add_speedups(rows)
    print_table(rows, f"# {env['device']}; torch {env['torch']}, triton {env['triton']}; batch {b}, {cin}->{cout}, "
                      f"{size}x{size}, {k}x{k}/{stride}, {args.dtype}, {str(fmt)[6:]}; command: {' '.join(sys.argv)}")
    if args.csv:
        append_csv(args.csv, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
