"""Timing, statistics and incremental CSV output shared by the benchmark scripts.

Timing policy (``interleaved``):

- one intra-op thread by default (``--threads``, printed in the header and stored in every
  row): with several, a shared machine's neighbours are measured as much as the code;
- the sides of a comparison are interleaved: each repetition runs every side once, in an order
  that rotates from one repetition to the next, so that a slow spell of the machine falls on
  all sides alike rather than on whichever side happened to run then;
- many short repetitions: one sample is ``inner`` back-to-back calls, with ``inner`` chosen
  per side so that a sample lasts about ``min_sample_ms``; the time of a side is the median
  over repetitions, its spread the 20th and 80th percentiles (``ms_p20``, ``ms_p80``);
- on CUDA each sample is timed with CUDA events (the clock stops when the GPU work ends).

Noise rule (``ratio``): a ratio of two sides is ``median(base) / median(side)``. Interleaving
pairs the samples: repetition ``i`` gives ``base_i / side_i``, and the 20th-80th percentile
interval of these paired ratios is the ratio's spread. The ratio is flagged ``noisy`` when
that interval reaches beyond ``tolerance`` of it (below ``ratio / (1 + tolerance)`` or above
``ratio * (1 + tolerance)``), or when fewer than 3 repetitions leave its spread unknown. A
noisy ratio says nothing: rerun with more repetitions, or on a quieter machine.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from spafl._env import environment

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TOLERANCE = 0.2
MIN_REPS_FOR_SPREAD = 3


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The default after a flag's help (where it has one: not None, not a switch's False); the
    module docstring printed as written."""

    def _get_help_string(self, action):
        if action.default is None or (action.default is False and action.nargs == 0):
            return action.help
        return super()._get_help_string(action)


def parser_for(doc: str) -> argparse.ArgumentParser:
    """An argument parser whose ``--help`` shows the whole module docstring ``doc``."""
    return argparse.ArgumentParser(description=doc, formatter_class=HelpFormatter)


# --- statistics -----------------------------------------------------------------------------


def _quantiles(samples) -> tuple[float, float, float]:
    """(median, p20, p80) of ``samples`` (linear interpolation between order statistics)."""
    samples = list(samples)
    if not samples:
        raise ValueError("no samples")
    if len(samples) == 1:
        return samples[0], samples[0], samples[0]
    deciles = statistics.quantiles(samples, n=10, method="inclusive")
    return statistics.median(samples), deciles[1], deciles[7]


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call of one side, one sample per repetition (in repetition order)."""

    samples: tuple[float, ...]
    inner: int = 1  # calls per sample

    @property
    def median(self) -> float:
        return _quantiles(self.samples)[0]

    @property
    def p20(self) -> float:
        return _quantiles(self.samples)[1]

    @property
    def p80(self) -> float:
        return _quantiles(self.samples)[2]


@dataclass(frozen=True)
class Ratio:
    """``median(base) / median(side)`` with the 20th-80th percentile interval of the paired
    per-repetition ratios and the noise flag (see the module docstring)."""

    value: float
    p20: float
    p80: float
    noisy: bool

    @staticmethod
    def missing() -> Ratio:
        nan = float("nan")
        return Ratio(nan, nan, nan, False)


def ratio(base: Timing, side: Timing, tolerance: float = TOLERANCE) -> Ratio:
    """How many times faster ``side`` is than ``base``, with its spread and noise flag.

    The samples must come from the same interleaved repetitions (equal counts): sample ``i``
    of each side was taken in repetition ``i``.
    """
    if len(base.samples) != len(side.samples):
        raise ValueError(f"paired samples needed: {len(base.samples)} base samples, {len(side.samples)} side samples")
    if not tolerance > 0:
        raise ValueError(f"tolerance must be positive, got {tolerance}")
    value = base.median / side.median
    _, lo, hi = _quantiles(b / s for b, s in zip(base.samples, side.samples, strict=True))
    noisy = len(base.samples) < MIN_REPS_FOR_SPREAD or lo < value / (1 + tolerance) or hi > value * (1 + tolerance)
    return Ratio(value, lo, hi, bool(noisy))


# --- timing ---------------------------------------------------------------------------------


def _sampler(device: torch.device) -> Callable[[Callable[[], object], int], float]:
    """``sample(fn, inner)``: milliseconds per call of ``inner`` back-to-back calls of ``fn``."""
    if device.type == "cuda":

        def sample(fn, inner):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / inner

        return sample

    def sample(fn, inner):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        return (time.perf_counter() - t0) * 1e3 / inner

    return sample


def interleaved(fns: dict[str, Callable[[], object]], device: torch.device, reps: int, min_sample_ms: float,
                warmup: int = 1, max_inner: int = 10_000) -> dict[str, Timing]:
    """Time every callable of ``fns`` over ``reps`` interleaved repetitions.

    Each side is first called ``warmup`` times (compilation, allocator, caches) and timed once to
    choose its ``inner`` (calls per sample, so that a sample lasts about ``min_sample_ms``);
    then repetition ``r`` runs every side once, starting at side ``r mod len(fns)``.
    Returns ``{name: Timing}`` with ``reps`` samples each.
    """
    if reps < 1:
        raise ValueError(f"reps must be at least 1, got {reps}")
    sample = _sampler(device)
    names = list(fns)
    inner = {}
    for name in names:
        for _ in range(warmup):
            fns[name]()
        one = sample(fns[name], 1)
        inner[name] = max(1, min(max_inner, math.ceil(min_sample_ms / max(one, 1e-6))))
    samples = {name: [0.0] * reps for name in names}
    for r in range(reps):
        for j in range(len(names)):
            name = names[(r + j) % len(names)]
            samples[name][r] = sample(fns[name], inner[name])
    return {name: Timing(tuple(samples[name]), inner[name]) for name in names}


# --- run settings ---------------------------------------------------------------------------


def add_run_args(p: argparse.ArgumentParser, default_reps: int, default_min_sample_ms: float) -> None:
    """The timing and output flags every benchmark script takes."""
    g = p.add_argument_group("timing and output")
    g.add_argument("--reps", type=int, default=default_reps,
                   help="interleaved repetitions per comparison (samples per side; the median and the 20th-80th "
                        f"percentiles come from them; fewer than {MIN_REPS_FOR_SPREAD} flags every ratio noisy)")
    g.add_argument("--min-sample-ms", type=float, default=default_min_sample_ms,
                   help="a sample repeats a call until it lasts about this long (short calls are averaged over "
                        "several back-to-back calls)")
    g.add_argument("--threads", type=int, default=1,
                   help="intra-op CPU threads (torch.set_num_threads); stored in every row")
    g.add_argument("--tolerance", type=float, default=TOLERANCE,
                   help="a ratio is flagged noisy when the 20th-80th percentile interval of its paired "
                        "per-repetition ratios reaches beyond +-this fraction of it")
    g.add_argument("--csv", default=None,
                   help="write every row to this CSV as soon as it is measured (a fresh file with its header; "
                        "an interrupted run keeps the rows measured so far)")
    g.add_argument("--append", action="store_true",
                   help="add the rows to the existing --csv instead of replacing it (its header must match)")


def check_run_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.reps < 1:
        p.error(f"--reps must be at least 1, got {args.reps}")
    if args.threads < 1:
        p.error(f"--threads must be at least 1, got {args.threads}")
    if not (math.isfinite(args.min_sample_ms) and args.min_sample_ms >= 0):
        p.error(f"--min-sample-ms must be a non-negative number, got {args.min_sample_ms}")
    if not (math.isfinite(args.tolerance) and args.tolerance > 0):
        p.error(f"--tolerance must be a positive number, got {args.tolerance}")
    if args.append and not args.csv:
        p.error("--append needs --csv (the file to add to)")


def command_line(script: str, argv: list[str] | None) -> str:
    """The command as a person would retype it from the current folder: ``python script argv``
    (``argv`` None: this process's arguments)."""
    args = argv if argv is not None else sys.argv[1:]
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(script), *args])


def timestamp() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --- incremental output ---------------------------------------------------------------------


class CsvSink:
    """Rows written to ``path`` as they come, one line per :meth:`write`, flushed at once.

    By default the file is replaced by one holding just the header ``columns``; with
    ``append`` an existing non-empty file is added to, and refused (``ValueError``) unless its
    header is exactly ``columns`` (a file of another schema would be silently corrupted).
    """

    def __init__(self, path: str | Path, columns: Iterable[str], append: bool = False):
        self.path, self.columns = Path(path), tuple(columns)
        if append and self.path.is_file() and self.path.stat().st_size > 0:
            with self.path.open(newline="") as f:
                header = next(csv.reader(f), [])
            if tuple(header) != self.columns:
                missing, extra = sorted(set(self.columns) - set(header)), sorted(set(header) - set(self.columns))
                raise ValueError(f"{self.path} has another header than the rows to append; missing {missing}, extra "
                                 f"{extra}"
                                 "; write a fresh file (without --append) or choose another path")
            return
        with self.path.open("w", newline="") as f:
            csv.writer(f).writerow(self.columns)

    def write(self, row: dict) -> None:
        missing = [c for c in self.columns if c not in row]
        if missing:
            raise KeyError(f"row lacks the columns {missing}")
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerow([row[c] for c in self.columns])
            f.flush()


def emit(rows: Iterable[dict], sink: CsvSink | None, show: Callable[[dict], None]) -> int:
    """Print and save each row of ``rows`` the moment it is produced; return how many.

    Whatever ``rows`` raises (a keyboard interrupt included) propagates after the rows before
    it have been printed and written.
    """
    n = 0
    for row in rows:
        show(row)
        if sink is not None:
            sink.write(row)
        n += 1
    return n


def _num(v: float) -> str:
    """About 3 significant digits, never in exponent notation (1234, 12.3, 0.123, 0.00123)."""
    if not math.isfinite(v):
        return str(v)
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.3g}" if abs(v) >= 1e-3 else f"{v:.6f}"


def fmt_ms(t: float, lo: float, hi: float) -> str:
    """``12.3 (11.9-13.0)``: a median and its spread, to about 3 significant digits."""
    if not math.isfinite(t):
        return "-"
    return f"{_num(t)} ({_num(lo)}-{_num(hi)})"


def fmt_ratio(r: Ratio) -> str:
    """``2.10x (1.95-2.21)``, followed by ``?`` when the ratio is noisy."""
    if not math.isfinite(r.value):
        return "-"
    return f"{r.value:.2f}x ({r.p20:.2f}-{r.p80:.2f}){'?' if r.noisy else ''}"


def ratio_columns(prefix: str, r: Ratio) -> dict:
    """``{prefix: value, prefix_p20, prefix_p80, prefix_noisy}`` for a CSV row."""
    return {prefix: r.value, f"{prefix}_p20": r.p20, f"{prefix}_p80": r.p80, f"{prefix}_noisy": r.noisy}


def row_ratio(row: dict, prefix: str) -> Ratio:
    """The :class:`Ratio` stored in ``row`` by :func:`ratio_columns`."""
    return Ratio(row[prefix], row[f"{prefix}_p20"], row[f"{prefix}_p80"], row[f"{prefix}_noisy"])


def start(p: argparse.ArgumentParser, args: argparse.Namespace, device: torch.device, script: str,
          argv: list[str] | None, columns: Iterable[str], table_header: str) -> tuple[CsvSink | None, dict]:
    """Set the threads, open the CSV (a parser error if ``--append`` meets another schema), print
    the run's header and the table's; return the sink and the columns every row shares."""
    torch.set_num_threads(args.threads)
    env = environment(device)
    command = command_line(script, argv)
    try:
        sink = CsvSink(args.csv, columns, append=args.append) if args.csv else None
    except ValueError as e:
        p.error(str(e))
    print(header(env, args.threads, args.reps, args.tolerance, command), flush=True)
    print(table_header, flush=True)
    return sink, {**{k: env[k] for k in ("device", "torch", "triton", "python", "spafl")}, "threads": args.threads,
                  "command": command}


def report(rows: Iterable[dict], sink: CsvSink | None, show: Callable[[dict], None]) -> int:
    """:func:`emit` ``rows``; the exit status: 0, or 130 after an interrupt (the rows before it
    printed and saved)."""
    try:
        emit(rows, sink, show)
    except KeyboardInterrupt:
        print(f"# interrupted{f'; {sink.path} holds the rows printed above' if sink else ''}", flush=True)
        return 130
    return 0


def header(env: dict, threads: int, reps: int, tolerance: float, command: str) -> str:
    return (f"# {env['device']}; torch {env['torch']}, triton {env['triton'] or '-'}, spafl {env['spafl']}; "
            f"{threads} thread{'s' if threads != 1 else ''}; {reps} interleaved repetitions per comparison; "
            f"medians with (p20-p80); '?' marks a noisy ratio (paired p20-p80 beyond +-{tolerance:.0%});\n"
            f"# {command}")
