"""Timing and reporting shared by the benchmark scripts."""

from __future__ import annotations

import csv
import statistics
import time
from datetime import datetime, timezone

import torch

from spafl._env import environment  # noqa: F401  (re-exported to the benchmark scripts)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def time_ms(fn, device: torch.device, reps: int) -> tuple[float, float, float]:
    """(median, p20, p80) of ``fn()`` in milliseconds: ``triton.testing.do_bench`` on CUDA,
    wall-clock repeats on CPU."""
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


def timestamp() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def add_speedups(rows: list[dict], baseline: str = "dense") -> None:
    """``speedup_vs_<baseline>`` of every row against the baseline's row with the same op and
    density (same run, same inputs)."""
    base = {(r["op"], r["density"]): r["ms"] for r in rows if r["provider"] == baseline}
    for r in rows:
        r[f"speedup_vs_{baseline}"] = base[(r["op"], r["density"])] / r["ms"]


def print_table(rows: list[dict], header: str, baseline: str = "dense") -> None:
    print(header)
    print(f"{'provider':<14}{'op':<9}{'density':>8}{'ms':>10}{'p20':>9}{'p80':>9}{'vs ' + baseline:>10}")
    for r in rows:
        print(f"{r['provider']:<14}{r['op']:<9}{r['density']:>8.2f}{r['ms']:>10.3f}{r['ms_p20']:>9.3f}"
              f"{r['ms_p80']:>9.3f}{r[f'speedup_vs_{baseline}']:>9.2f}x")


def append_csv(path: str, rows: list[dict]) -> None:
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        if f.tell() == 0:
            writer.writeheader()
        writer.writerows(rows)


def rotating(*sets: list[torch.Tensor]):
    """A function returning the next tuple of inputs on each call, so that consecutive timed
    calls do not find their operands in L2."""
    step = [0]

    def next_inputs():
        step[0] = (step[0] + 1) % len(sets[0])
        return tuple(s[step[0]] for s in sets)

    return next_inputs


def timed_call(fn, next_inputs, op: str):
    """A closure running ``fn`` forward only (``op == "fwd"``) or forward and backward."""

    def run():
        x, dy = next_inputs()
        if op == "fwd":
            with torch.no_grad():
                fn(x)
        else:
            x = x.requires_grad_()
            fn(x).backward(dy)
            x.requires_grad_(False)

    return run


def measure(providers: dict, device: torch.device, reps: int, first_mode: str, row: dict, fwd_flops: int) -> list:
    """Time every provider, forward and forward+backward. ``providers`` maps a name to
    ``(fn, next_inputs)``; the forward of ``spafl-*`` providers other than ``spafl-<first_mode>``
    is not timed again (it does not depend on the backward mode). ``row`` is copied into every
    result row."""
    rows = []
    for name, (fn, feed) in providers.items():
        for op in ("fwd", "fwd+bwd"):
            if op == "fwd" and name.startswith("spafl-") and name != f"spafl-{first_mode}":
                continue
            ms, lo, hi = time_ms(timed_call(fn, feed, op), device, reps)
            flops = fwd_flops * (1 if op == "fwd" else 3)
            rows.append({**row, "provider": name, "op": op, "ms": ms, "ms_p20": lo, "ms_p80": hi,
                         "tflops_dense_equiv": flops / ms / 1e9, "timestamp": timestamp()})
    return rows
