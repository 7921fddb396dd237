"""Run several methods with several seeds on one configuration and tabulate them like the
paper's Table 2 (accuracy mean +- std over seeds, communication, FLOPs, wall time).

Each (method, seed) is an ordinary run folder ``<out>/<method>-seed<seed>`` with its own
checkpoint: an interrupted comparison resumes where it stopped, a finished run is not redone,
and asking for more rounds extends the runs already there.
"""

from __future__ import annotations

import csv
import io
import math
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from . import runfolder
from .config import METHODS, FedConfig
from .progress import OverallEta
from .runfolder import CHECKPOINT, PREVIOUS
from .runfolder import atomic_write as _atomic_write
from .simulator import Simulator

METHOD_LABELS = {"spafl": "SpaFL", "fedavg": "FedAvg (dense)", "local": "Local only", "sparsyfed": "SparsyFed",
                 "topk": "Top-K"}
RUN_COLUMNS = ("method", "seed", "rounds", "final_acc", "final_acc_std", "best_acc", "final_acc_global",
               "final_density", "final_density_weighted", "final_global_sparsity", "comm_gbit_paper", "bytes_exchanged",
               "flops_per_client", "wall_s", "mean_round_s")


# The methods that prune whole units (neurons, filters): the dense ones keep all of theirs.
UNIT_PRUNING = ("spafl", "fedavg", "local")


def run_folder(out: Path, method: str, seed: int) -> Path:
    return Path(out) / f"{method}-seed{seed}"


def run_comparison(config: FedConfig, methods: Iterable[str], seeds: Iterable[int], out: str | Path,
                   progress: bool = False, command: str | None = None, log=print, workers: int = 1) -> list[dict]:
    """Run (or resume, or reuse) every ``method`` x ``seed`` with ``config``'s other settings
    (one after another, each with ``workers`` client threads: see :class:`.Simulator`); write
    the table and return one summary per run."""
    out = Path(out)
    methods, seeds = list(methods), list(seeds)
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        raise ValueError(f"unknown or no methods {unknown}; methods: {METHODS}")
    if not seeds:
        raise ValueError("give at least one seed")
    twice = sorted({str(x) for x in [*methods, *seeds] if [*methods, *seeds].count(x) > 1})
    if twice:  # one run counted twice: its mean weighted twice, a spread of "+- 0.00" from one run
        raise ValueError(f"methods and seeds must each be given once: {', '.join(twice)} given more than once")
    configs = [config.replace(method=m, seed=s, spectral_exponent=config.spectral_exponent and m == "sparsyfed")
               .validate() for s in seeds for m in methods]  # every method's first seed first
    eta = OverallEta(len(configs) * config.rounds)
    for k, cfg in enumerate(configs, 1):
        folder = run_folder(out, cfg.method, cfg.seed)
        if (folder / CHECKPOINT).is_file() or (folder / PREVIOUS).is_file():
            sim = Simulator.resume(folder, cfg, log=log, progress=progress, command=command, workers=workers)
            state = "done" if sim.round >= cfg.rounds else f"resuming after round {sim.round}"
        else:
            sim = Simulator(cfg, out_dir=folder, progress=progress, command=command, workers=workers)
            state = "starting"
        eta.skip(min(sim.round, cfg.rounds))  # rounds a previous invocation ran cost nothing now
        log(f"[run {k}/{len(configs)}] {cfg.method} seed {cfg.seed}: {state} ({cfg.rounds} rounds) in {folder}; "
            f"{eta.describe()}")
        with warnings.catch_warnings(), sim:
            warnings.simplefilter("always")
            before = sim.round
            sim.run()
            eta.ran(max(0, sim.round - before))
    log(f"[run {len(configs)}/{len(configs)}] all done; {eta.describe()}")
    runs = [load_run(run_folder(out, c.method, c.seed)) for c in configs]
    write_table(out, runs)
    return runs


def load_run(folder: Path) -> dict:
    """A finished run's summary, settings and history, from its ``history.json``
    (:func:`runfolder.read_history`); ``FileNotFoundError`` or :class:`runfolder.RunFolderError`
    naming the file."""
    file = Path(folder) / "history.json"
    meta = runfolder.read_history(folder)
    if meta is None:
        raise FileNotFoundError(f"no history.json in {folder}")
    try:
        summary = dict(meta["summary"])
        summary.setdefault("method", meta["config"].get("method", "spafl"))
        summary["seed"] = meta["config"]["seed"]
    except (KeyError, TypeError, ValueError) as e:
        raise runfolder.RunFolderError(f"{file} is not a finished run's history (no {e})") from e
    summary["config"] = meta["config"]
    summary["environment"] = meta.get("environment", {})
    summary["history"] = meta["history"]
    summary["folder"] = str(folder)
    return summary


def load_comparison(out: str | Path) -> list[dict]:
    """The runs of a comparison folder (:func:`load_run` each), in the order its
    ``comparison.csv`` lists them; ``ValueError`` / ``FileNotFoundError`` naming the file."""
    out = Path(out)
    table = out / "comparison.csv"
    try:
        with table.open(newline="", encoding="utf-8") as f:
            entries = [(row["method"], int(row["seed"])) for row in csv.DictReader(f)]
    except (KeyError, TypeError, ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{table} is not a comparison table ({type(e).__name__}: {e})") from e
    if not entries:
        raise ValueError(f"{table} lists no runs")
    runs = []
    for method, seed in entries:
        folder = run_folder(out, method, seed)
        if not (folder / "history.json").is_file():
            raise FileNotFoundError(f"{folder} has no history.json ({table} lists {method} seed {seed})")
        runs.append(load_run(folder))
    return runs


def _mean_std(values: list[float]) -> tuple[float, float]:
    v = np.array([x for x in values if x == x], dtype=float)
    if not len(v):
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std())


def aggregate_runs(runs: list[dict]) -> list[dict]:
    """One row per method: mean (and std over seeds) of each run's final values."""
    rows = []
    for method in dict.fromkeys(r["method"] for r in runs):
        group = [r for r in runs if r["method"] == method]
        acc, acc_std = _mean_std([r["final_acc"] for r in group])
        glob, glob_std = _mean_std([r.get("final_acc_global", float("nan")) for r in group])
        rows.append({
            "method": method,
            "seeds": len(group),
            "rounds": min(r["rounds"] for r in group),
            "acc": acc, "acc_std": acc_std,
            "acc_global": glob, "acc_global_std": glob_std,
            "active_units": _mean_std([r["final_density"] for r in group])[0]
            if method in UNIT_PRUNING else float("nan"),
            "nonzero_weights": _mean_std([r["final_density_weighted"] for r in group])[0],
            "comm_gbit": _mean_std([r["comm_gbit_paper"] for r in group])[0],
            "megabytes": _mean_std([r["bytes_exchanged"] / 1e6 for r in group])[0],
            "flops": _mean_std([r["flops_per_client"] for r in group])[0],
            "wall_s": _mean_std([r["wall_s"] for r in group])[0],
            "round_s": _mean_std([r["mean_round_s"] for r in group])[0],
        })
    return rows


def _fmt(x: float, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _mean_sd(mean: float, sd: float, n: int) -> str:
    """``63.77 +- 3.35`` over ``n`` >= 2 seeds; ``63.77 (n=1)``: one seed has no spread to show."""
    if math.isnan(mean):
        return "-"
    return f"{mean:.2f} (n=1)" if n == 1 else f"{mean:.2f} +- {sd:.2f}"


def table_markdown(rows: list[dict]) -> str:
    """Accuracy as mean +- standard deviation over the seeds (the seeds column is n). Two
    sparsity columns, because the methods prune different things: ``active units`` is the
    fraction of neurons and filters active (mean over layers), what SpaFL prunes (1 for the
    dense methods; none for SparsyFed and Top-K, which prune single weights); ``non-zero
    weights`` is the fraction of the prunable weights the model computes with (SpaFL: those of
    its active units; SparsyFed and Top-K: the weights their Top-K keeps)."""
    lines = ["| method | seeds | rounds | accuracy (%) | global-model accuracy (%) | active units | non-zero weights "
             "| comm (Gbit) | serialised (MB) | FLOPs per client | wall (s) | s / round |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {METHOD_LABELS.get(r['method'], r['method'])} | {r['seeds']} | {r['rounds']} "
            f"| {_mean_sd(r['acc'], r['acc_std'], r['seeds'])} "
            f"| {_mean_sd(r['acc_global'], r['acc_global_std'], r['seeds'])} "
            f"| {_fmt(r['active_units'], '.3f')} | {_fmt(r['nonzero_weights'], '.3f')} "
            f"| {_fmt(r['comm_gbit'], '.4g')} | {_fmt(r['megabytes'], '.4g')} "
            f"| {_fmt(r['flops'], '.3g')} | {_fmt(r['wall_s'], '.1f')} | {_fmt(r['round_s'], '.2f')} |")
    return "\n".join(lines) + "\n"


def write_table(out: Path, runs: list[dict]) -> list[Path]:
    """``comparison.csv`` (one row per run), ``comparison.md`` (per method) and, with
    matplotlib, ``accuracy_vs_round.png`` and ``accuracy_vs_gbit.png``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=RUN_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in runs:
        writer.writerow({k: r.get(k, "") for k in RUN_COLUMNS})
    _atomic_write(out / "comparison.csv", lambda f: f.write(buffer.getvalue().encode()))
    rows = aggregate_runs(runs)
    text = table_markdown(rows)
    _atomic_write(out / "comparison.md", lambda f: f.write(text.encode()))
    written = [out / "comparison.csv", out / "comparison.md"]
    try:
        from .plots import plot_comparison
    except ImportError:
        return written
    return written + plot_comparison(out, runs)
