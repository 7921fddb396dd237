"""A threshold Linear layer against the dense layer and the masked one (weight * mask, as the
SpaFL authors' code does), in about a minute on a CPU.

    python examples/kernel_benchmark.py [--size 1024] [--batch 256] [--reps 9]

At each density the three are timed interleaved (forward + backward, one intra-op thread) and
the medians are compared: the sparse layer skips the pruned rows, so it gains as density falls,
where the masked one costs a dense layer plus the mask. `benchmarks/kernels.py` is the full
suite (every baseline, ratios with their spread, a CSV); this is the one-minute look.
"""

import argparse
import statistics
import time

import torch
from torch import nn

import spafl


def _time(step, reps: int) -> list[float]:
    step()  # warm-up
    out = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        out.append(time.perf_counter() - start)
    return out


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=1024, help="in and out features")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.1])
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    dense = nn.Linear(args.size, args.size)
    x = torch.randn(args.batch, args.size, requires_grad=True)
    rows = []
    print(f"Linear {args.size}x{args.size}, batch {args.batch}, forward + backward, median of {args.reps} "
          f"(one thread; times on a busy machine vary)")
    for density in args.densities:
        layers = {"dense": dense}
        for backend in ("auto", "reference"):
            layer = spafl.ThresholdLinear.from_dense(dense, backend=backend, backward_mode="skip")
            with torch.no_grad():
                layer.threshold.copy_(spafl.threshold_for_density(layer.weight, density))
            layers["spafl" if backend == "auto" else "masked"] = layer
        samples = {name: [] for name in layers}
        for _ in range(args.reps):  # interleaved, so a change in the machine's load hits all three alike
            for name, layer in layers.items():
                samples[name] += _time(lambda layer=layer: layer(x).sum().backward(), 1)
        ms = {name: statistics.median(s) * 1e3 for name, s in samples.items()}
        row = {"density": layers["spafl"].density, **{f"{k}_ms": v for k, v in ms.items()}}
        rows.append(row)
        print(f"density {row['density']:.2f}: dense {ms['dense']:.2f} ms, masked {ms['masked']:.2f} ms "
              f"({ms['dense'] / ms['masked']:.2f}x dense), spafl {ms['spafl']:.2f} ms "
              f"({ms['dense'] / ms['spafl']:.2f}x dense)")
    return rows


if __name__ == "__main__":
    main()
