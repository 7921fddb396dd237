"""Where the time of a LeNet-5 training step goes, in thread CPU time.

    python benchmarks/step_profile.py --steps 60 --threads 1
    python benchmarks/step_profile.py --profile uniform-0.1

The step is e2e.py's (forward, SpaFL's loss with the threshold penalty, backward, SGD with
momentum at learning rate 0, batch 64 of random images) on the spafl model (backend="auto")
and on the plain network with the same weights (dense), at the late-SpaFL densities by default.

Printed: (1) the median per-step thread CPU time of the three phases (forward with the loss,
backward, optimizer step) of both networks, over interleaved steps, and the ratio dense / spafl
of the whole step with the 20th-80th percentiles of the paired per-step ratios; (2) the spafl
step split by where the time is spent, from wrappers around the functions that run it: the
convolution kernels (oneDNN, forward and backward), the rest of the compact convolution's
forward and backward (the small operations and their Python), the Linear layers, the row masks
and finiteness checks of the chain's layers, the chain's own bookkeeping, the pooling, the
penalty, the optimizer, and what is left. The wrappers add a few microseconds a call, so the
instrumented step is a little longer than the plain one.

Thread CPU time (``time.thread_time``) leaves out the time the process waits for a core, so
on a machine shared with other jobs it moves less than the wall clock; it still counts
what the other jobs cost this one in caches and memory bandwidth: read ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections import defaultdict

import torch
import torch.nn.functional as F
from e2e import PROFILES, set_density

from spafl import chain as chain_mod
from spafl import compact, compact_conv, densify, threshold_penalty
from spafl.federated.models import build_model

PHASES = ("forward", "backward", "optimizer")


def _models(profile: str):
    torch.manual_seed(0)
    model = build_model("lenet5", 10, backend="auto", collapse_density=None)
    if profile.startswith("uniform-"):
        set_density(model, float(profile.split("-", 1)[1]))
    else:
        set_density(model, PROFILES[profile]["lenet5"])
    return model, densify(copy.deepcopy(model))


def _batches(n: int = 4):
    g = torch.Generator().manual_seed(0)
    return ([torch.randn(64, 1, 28, 28, generator=g) for _ in range(n)],
            [torch.randint(0, 10, (64,), generator=g) for _ in range(n)])


def _stepper(model, penalty: bool):
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    xs, ys = _batches()
    i = [0]

    def step() -> tuple[float, float, float]:
        i[0] = (i[0] + 1) % len(xs)
        t0 = time.thread_time()
        loss = F.cross_entropy(model(xs[i[0]]), ys[i[0]])
        if penalty:
            loss = loss + 0.002 * threshold_penalty(model)
        t1 = time.thread_time()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t2 = time.thread_time()
        opt.step()
        return t1 - t0, t2 - t1, time.thread_time() - t2

    model.train()
    return step


def phases(profile: str, steps: int, warmup: int = 5, run: int = 1) -> dict:
    """Per-phase thread CPU times (s) of interleaved spafl and dense steps: ``run`` steps of one
    network, then ``run`` of the other, in an order that alternates, until each has ``steps``.
    ``run = 1`` alternates every step, so each step starts with the caches the other network
    left; a longer run measures steps that follow steps of their own network, as in a training
    loop."""
    spafl_model, dense_model = _models(profile)
    steppers = {"spafl": _stepper(spafl_model, True), "dense": _stepper(dense_model, False)}
    for _ in range(warmup):
        for s in steppers.values():
            s()
    out = {name: [] for name in steppers}
    r = 0
    while len(out["spafl"]) < steps:
        order = list(steppers) if r % 2 == 0 else list(reversed(steppers))
        for name in order:
            for _ in range(min(run, steps - len(out[name]))):
                out[name].append(steppers[name]())
        r += 1
    return out


# (module, attribute, key): the functions whose thread CPU time is measured. They nest (a chain
# layer holds its row mask, finiteness check and layer function; a compact convolution holds its
# kernel): attribution() turns the totals into exclusive shares.
_WRAPPED = (
    (compact_conv, "_conv2d", "conv_kernel_fwd"),
    (compact_conv, "_conv2d_backward", "conv_kernel_bwd"),
    (compact_conv, "conv2d_forward", "conv_fwd"),
    (compact_conv, "conv2d_backward", "conv_bwd"),
    (compact, "linear_forward", "linear_fwd"),
    (compact, "linear_backward", "linear_bwd"),
    (chain_mod, "_guarded_row_mask", "row_mask"),
    (chain_mod, "check_finite_values", "finite"),
    (chain_mod, "max_pool2d", "pool_fwd"),
    (chain_mod, "layer", "chain_layer"),
    (sys.modules[__name__], "threshold_penalty", "penalty"),
)


def attribution(profile: str, steps: int, warmup: int = 5) -> tuple[float, dict[str, float]]:
    """(mean instrumented spafl step, {share: mean seconds a step}), exclusive shares from the
    wrapped functions' totals (see _WRAPPED) and the optimizer phase."""
    spent: dict[str, float] = defaultdict(float)
    saved = []

    def wrap(owner, name, key):
        original = getattr(owner, name)
        saved.append((owner, name, original))

        def timed(*args, **kwargs):
            t = time.thread_time()
            try:
                return original(*args, **kwargs)
            finally:
                spent[key] += time.thread_time() - t

        setattr(owner, name, timed)

    for owner, name, key in _WRAPPED:
        wrap(owner, name, key)
    try:
        spafl_model, _ = _models(profile)
        step = _stepper(spafl_model, True)
        for _ in range(warmup):
            step()
        spent.clear()
        optimizer = 0.0
        t0 = time.thread_time()
        for _ in range(steps):
            optimizer += step()[2]
        total = (time.thread_time() - t0) / steps
    finally:
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)
    t = {key: spent[key] / steps for _, _, key in _WRAPPED}
    shares = {
        "conv kernels, backward (oneDNN)": t["conv_kernel_bwd"],
        "conv kernels, forward (oneDNN)": t["conv_kernel_fwd"],
        "compact conv backward, less its kernel": t["conv_bwd"] - t["conv_kernel_bwd"],
        "compact conv forward, less its kernel": t["conv_fwd"] - t["conv_kernel_fwd"],
        "compact Linear forward": t["linear_fwd"],
        "compact Linear backward": t["linear_bwd"],
        "row masks of the four layers": t["row_mask"],
        "threshold finiteness checks": t["finite"],
        "chain.layer bookkeeping and the autograd Functions' forward": (
            t["chain_layer"] - t["row_mask"] - t["finite"] - t["conv_fwd"] - t["linear_fwd"]),
        "max pooling, forward": t["pool_fwd"],
        "threshold penalty, forward": t["penalty"],
        "optimizer step (torch.optim.SGD)": optimizer / steps,
    }
    shares["the rest: autograd, pooling backward, ReLU, loss, penalty backward, zero_grad"] = (
        total - sum(shares.values()))
    return total, shares


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--profile", default="late-spafl",
                   help="late-spafl (conv1 0.6, conv2 0.3, fc3 0.05, fc4 1.0) or uniform-D for density D everywhere")
    p.add_argument("--steps", type=int, default=60, help="measured steps of each network (after 5 warm-up steps)")
    p.add_argument("--threads", type=int, default=1, help="intra-op CPU threads")
    p.add_argument("--run", type=int, default=1,
                   help="consecutive steps of one network before the other's (1: alternate every step)")
    args = p.parse_args(argv)
    if args.steps < 5:
        p.error(f"--steps must be at least 5, got {args.steps}")
    if args.run < 1:
        p.error(f"--run must be at least 1, got {args.run}")
    if args.profile not in PROFILES and not args.profile.startswith("uniform-"):
        p.error(f"--profile takes {', '.join(sorted(PROFILES))} or uniform-D, got {args.profile!r}")
    torch.set_num_threads(args.threads)
    print(f"# python {' '.join(sys.argv)}")
    print(f"# torch {torch.__version__}, {args.threads} thread(s), profile {args.profile}, thread CPU time, "
          f"runs of {args.run} step(s)")
    times = phases(args.profile, args.steps, run=args.run)
    for name, rows in times.items():
        cols = [statistics.median(r[j] for r in rows) * 1e3 for j in range(3)]
        total = statistics.median(sum(r) for r in rows) * 1e3
        split = "  ".join(f"{ph} {c:.2f}" for ph, c in zip(PHASES, cols, strict=True))
        print(f"{name:<6} step {total:6.2f} ms  {split}")
    ratios = sorted(sum(d) / sum(s) for s, d in zip(times["spafl"], times["dense"], strict=True))
    n = len(ratios)
    print(f"dense / spafl: {statistics.median(ratios):.2f}x (p20 {ratios[n // 5]:.2f}, p80 {ratios[4 * n // 5]:.2f}),"
          f" {n} paired steps")
    total, shares = attribution(args.profile, args.steps)
    print(f"spafl step, instrumented: {total * 1e3:.2f} ms")
    for label, v in sorted(shares.items(), key=lambda kv: -kv[1]):
        print(f"  {v * 1e3:6.2f} ms  {100 * v / total:4.1f}%  {label}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
