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
    if len(samples) < 2:
        return samples[0], samples[0], samples[0]
    q = statistics.quantiles(samples, n=10)
    return statistics.median(samples), q[1], q[7]


def timestamp() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def append_csv(path: str, rows: list[dict]) -> None:
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        if f.tell() == 0:
            writer.writeheader()
        writer.writerows(rows)
