"""The fused optimizer on the CPU: training steps with ``spafl.optim.SGD`` against ``torch.optim.SGD``.

Cases (one thread, interleaved in one process, median of ``--reps`` samples with the 20th-80th
percentile spread):

* ``lenet5``: the simulator's LeNet-5 (FMNIST shapes, batch 64, skip mode, every threshold layer
  at ``--density``), forward + loss + backward + SGD step (momentum 0.9, weight decay 5e-4), with
  each optimizer, and the plain network (``nn`` layers of the same shapes) with torch.optim, for
  the step ratio;
* ``linear4096``: one ``ThresholdLinear(4096, 4096)`` at 256 rows, skip mode, density
  ``--density``: the steady-state forward + backward alone (after a step of each optimizer: with
  spafl.optim the forward takes the step's scores) and the whole step; beside it the
  physically smaller dense layer (``nn.Linear`` of the active rows only: the upper bound of
  skipping), forward + backward.

On the CPU the fused optimizer moves the row-score pass from the forward into the step (its
arithmetic is torch.optim's, for bit-identical histories): the whole step costs the same work,
the forward + backward less. ``compact`` is ``spafl.optim.SGD(compact_grads=True)``: the
backward hands the step its active rows' gradient instead of a full ``dW``.

    OMP_NUM_THREADS=1 python benchmarks/optim_cpu.py --reps 15
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import spafl
import spafl.optim as so
from spafl import threshold_for_density
from spafl.federated.models import LeNet5

# (name, class, extra constructor arguments): "compact" hands the step the backward's active rows
# (compact_grads=True) instead of a full weight gradient
OPTIMIZERS = [("torch.optim", torch.optim.SGD, {}), ("spafl.optim", so.SGD, {}),
              ("compact", so.SGD, {"compact_grads": True})]


def _set_density(model: nn.Module, density: float) -> None:
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "threshold"):
                m.threshold.copy_(threshold_for_density(m.weight, density))


def _plain_lenet() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 20, 5, bias=False), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(20, 50, 5, bias=False), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(800, 500, bias=False), nn.ReLU(), nn.Linear(500, 10, bias=False))


def _step(model, opt, x, y):
    def run():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return run


def _fwd_bwd(model, x, dy):
    def run():
        model.zero_grad(set_to_none=True)
        model(x).backward(dy)
    return run


def _time(fn, min_ms: float = 20.0) -> float:
    """ms per call of ``fn``, over enough calls to last ``min_ms``."""
    n, t = 1, 0.0
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        t = time.perf_counter() - t0
        if t * 1e3 >= min_ms:
            return t * 1e3 / n
        n *= 2


def _interleaved(fns: dict, reps: int) -> dict:
    for fn in fns.values():  # warm-up (plans, allocator, the first momentum buffers)
        for _ in range(3):
            fn()
    samples = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            samples[k].append(_time(fn))
    return samples


def _summary(xs: list[float]) -> str:
    q = statistics.quantiles(xs, n=10)
    return f"{statistics.median(xs):8.3f} ms (p20-p80 {q[1]:.3f}-{q[7]:.3f})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--density", type=float, default=0.1)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print(f"# python {platform.python_version()}, torch {torch.__version__}, spafl {spafl.__version__}, "
          f"{platform.machine()}, threads {torch.get_num_threads()}; density {args.density}")

    kw = dict(lr=0.01, momentum=0.9, weight_decay=5e-4)
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    nets = {}
    for name, opt_cls, extra in OPTIMIZERS:
        net = LeNet5(num_classes=10, backward_mode="skip")
        _set_density(net, args.density)
        nets[name] = _step(net, opt_cls(net.parameters(), **kw, **extra), x, y)
    plain = _plain_lenet()
    nets["plain"] = _step(plain, torch.optim.SGD(plain.parameters(), **kw), x, y)
    lenet = _interleaved(nets, args.reps)
    print("lenet5 step, batch 64:")
    for k, v in lenet.items():
        print(f"  {k:<12} {_summary(v)}")
    for k, _, _ in OPTIMIZERS:
        print(f"  plain / {k}: {statistics.median(lenet['plain']) / statistics.median(lenet[k]):.3f}x")

    xl, dyl = torch.randn(256, 4096), torch.randn(256, 4096)
    fns = {}
    for name, opt_cls, extra in OPTIMIZERS:
        layer = spafl.ThresholdLinear(4096, 4096, backward_mode="skip", collapse_density=None)
        _set_density(layer, args.density)
        opt = opt_cls(layer.parameters(), **kw, **extra)

        def step(layer=layer, opt=opt):
            opt.zero_grad(set_to_none=True)
            layer(xl).backward(dyl)
            opt.step()

        def fwd_bwd(layer=layer, opt=opt):
            # The forward + backward that follows a step: the step itself is not timed.
            opt.step()
            t0 = time.perf_counter()
            layer.zero_grad(set_to_none=True)
            layer(xl).backward(dyl)
            return time.perf_counter() - t0

        fns[name] = (step, fwd_bwd)
        active = int(layer.mask.sum())
    # The physically smaller layer: a dense nn.Linear of the active rows only (the upper bound
    # of skipping, benchmarks/kernels.py's `smaller`), its forward + backward alone.
    small = nn.Linear(4096, active)
    xs = xl.clone().requires_grad_(False)
    dys = torch.randn(256, active)

    def smaller():
        t0 = time.perf_counter()
        small.zero_grad(set_to_none=True)
        small(xs).backward(dys)
        return time.perf_counter() - t0

    steps = _interleaved({k: v[0] for k, v in fns.items()}, max(3, args.reps // 3))
    fb = {k: [] for k in [*fns, "smaller"]}
    for _ in range(args.reps):
        for k, v in fns.items():
            fb[k].append(1e3 * v[1]())
        fb["smaller"].append(1e3 * smaller())
    print(f"linear 4096x4096, 256 rows, density {args.density}, skip ({active} active rows):")
    for k in fns:
        print(f"  {k:<12} step {_summary(steps[k])}; forward+backward after a step {_summary(fb[k])}")
    print(f"  {'smaller':<12} forward+backward of nn.Linear(4096, {active}) {_summary(fb['smaller'])}")
    for k in fns:
        print(f"  smaller / {k} (forward+backward): "
              f"{statistics.median(fb['smaller']) / statistics.median(fb[k]):.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
