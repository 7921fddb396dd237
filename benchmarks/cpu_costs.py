"""Where the compact CPU path's fixed costs go: the pieces behind the figures of
``benchmarks/results/cpu/README.md``, each group of sides interleaved in one process.

    python benchmarks/cpu_costs.py --reps 21 --threads 1 --csv costs.csv

Groups (the ``group`` column; ``ratio_vs_first`` compares each side with the group's first):

fc3-floor      LeNet-5's fc3 (64 x 800 -> 500) at density 0.1, forward + backward: ``dense``,
               ``smaller`` (the active rows only), ``spafl-skip`` (the compact path), and the two
               pieces of the threshold layer's work that no implementation avoids, timed alone:
               ``row-scores`` (mean |w| of every row) and ``grad-fill`` (a weight-sized gradient
               allocated and zeroed). ``smaller + row-scores + grad-fill`` is the floor the
               compact path could reach.
cl-gather      5 of the 50 channels of a channels-last ``[64, 50, 8, 8]`` tensor:
               ``index_select`` along dim 1 against ``spafl.compact._select_channels``.
elementwise    110,592 fp32 values: ``add``, ``ge`` (a bool result), ``where`` (a bool condition):
               the cost of bool tensors in elementwise work on this build.
call-floor     ``ThresholdLinear(64, 10)``'s training-mode forward at batch 8 (the host-time
               benchmark's CPU case, default options): ``nn.Linear``, the ``layer``, ``floor``
               (the operations such a forward needs, back to back in one bare function: row
               scores, the finiteness check, mask, active units, the stored density, an autograd
               Function around ``F.linear`` and the bias add), and the layer's two halves:
               ``guard`` (its row mask after the collapse guard), ``function`` (its autograd
               Function on a prebuilt mask) and ``guard+function`` (the two in a row).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator

import torch
from _common import (
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

from kernels import SUITES, Bench, runner
from spafl import compact, reference

COLUMNS = ("timestamp", "device", "torch", "triton", "python", "spafl", "threads", "group", "side", "reps", "inner",
           "ms", "ms_p20", "ms_p80", "ratio_vs_first", "ratio_vs_first_p20", "ratio_vs_first_p80",
           "ratio_vs_first_noisy", "command")
TABLE_HEADER = f"{'group':<13}{'side':<18}{'ms (p20-p80)':<26}first side's ms / this ms (p20-p80)"


def _fc3_floor() -> dict[str, Callable[[], object]]:
    case = next(c for c in SUITES["cpu"] if c.name == "lenet5-fc3-b64")
    bench = Bench(case, torch.float32, torch.device("cpu"))
    table = bench.providers(0.1)
    sides = {name: runner(bench, *table[name][:3], "fwd+bwd") for name in ("dense", "smaller", "spafl-skip")}
    weight = bench.weight.detach()
    sides["row-scores"] = lambda: reference.row_scores(weight)
    sides["grad-fill"] = lambda: torch.empty(weight.shape).zero_()
    return sides


def _cl_gather() -> dict[str, Callable[[], object]]:
    g = torch.Generator().manual_seed(0)
    t = torch.randn(64, 50, 8, 8, generator=g).contiguous(memory_format=torch.channels_last)
    index = torch.tensor([3, 11, 20, 31, 47])
    return {"index_select": lambda: t.index_select(1, index),
            "_select_channels": lambda: compact._select_channels(t, index)}


def _elementwise() -> dict[str, Callable[[], object]]:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(110_592, generator=g), torch.randn(110_592, generator=g)
    cond = a > 0
    return {"add": lambda: a + b, "ge": lambda: a >= b, "where": lambda: torch.where(cond, a, b)}


def _call_floor() -> dict[str, Callable[[], object]]:
    import math

    import torch.nn.functional as F

    import spafl
    from spafl import _functions, _guard

    torch.manual_seed(0)
    layer, dense = spafl.ThresholdLinear(64, 10), torch.nn.Linear(64, 10)
    x = torch.randn(8, 64, requires_grad=True)
    w, tau, b = layer.weight, layer.threshold, layer.bias
    options, counter, stored = layer.forward_options, layer.collapse_resets, layer.previous_density

    class Bare(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w, tau, b, mask):
            z = F.linear(x, w)
            ctx.save_for_backward(x, w, mask)
            ctx.z = z
            return z + b

        @staticmethod
        def backward(ctx, grad):
            return None, None, None, None, None

    apply = super(torch.autograd.Function, Bare).apply

    def floor():
        score = w.detach().abs().mean(dim=1)
        diff = score - tau.detach()
        if not math.isfinite(diff.sum().item()):
            raise ValueError("not finite")
        mask = diff > 0
        units = mask.nonzero().view(-1)
        stored.fill_(units.shape[0] / mask.shape[0])
        return apply(x, w, tau, b, mask)

    def guard():
        return _guard._guarded_row_mask(w, tau, "compact", False, options, counter, stored, True)

    row_mask = guard()

    def function(mask=row_mask):
        return _functions._run(_functions.ThresholdLinearFunction, x, w, tau, b, mask, "compact", options)

    return {"nn.Linear": lambda: dense(x), "layer": lambda: layer(x), "floor": floor, "guard": guard,
            "function": function, "guard+function": lambda: function(guard())}


GROUPS = {"fc3-floor": _fc3_floor, "cl-gather": _cl_gather, "elementwise": _elementwise, "call-floor": _call_floor}


def measure(groups, reps: int, min_sample_ms: float, tolerance: float, base: dict) -> Iterator[dict]:
    for group in groups:
        timings = interleaved(GROUPS[group](), torch.device("cpu"), reps, min_sample_ms)
        first = next(iter(timings.values()))
        for side, t in timings.items():
            yield {"timestamp": timestamp(), **base, "group": group, "side": side, "reps": len(t.samples),
                   "inner": t.inner, "ms": t.median, "ms_p20": t.p20, "ms_p80": t.p80,
                   **ratio_columns("ratio_vs_first", ratio(first, t, tolerance))}


def show_row(r: dict) -> None:
    print(f"{r['group']:<13}{r['side']:<18}{fmt_ms(r['ms'], r['ms_p20'], r['ms_p80']):<25} "
          f"{fmt_ratio(row_ratio(r, 'ratio_vs_first'))}", flush=True)


def main(argv=None) -> int:
    p = parser_for(__doc__)
    p.add_argument("--groups", nargs="+", choices=list(GROUPS), default=list(GROUPS), help="which groups to time")
    add_run_args(p, default_reps=21, default_min_sample_ms=20.0)
    args = p.parse_args(argv)
    check_run_args(p, args)
    sink, base = start(p, args, torch.device("cpu"), __file__, argv, COLUMNS, TABLE_HEADER)
    return report(measure(args.groups, args.reps, args.min_sample_ms, args.tolerance, base), sink, show_row)


if __name__ == "__main__":
    sys.exit(main())
