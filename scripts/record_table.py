"""Tabulate several runs of one preset against the paper's Table 2 row.

    python scripts/record_table.py results/fmnist-lenet5/seed0 results/fmnist-lenet5/seed1 ... \
        --paper-acc 89.21 0.25 --paper-gbit 0.1856 --paper-flops 2.38e11 --out results/fmnist-lenet5

Reads each folder's ``history.json`` (written by ``spafl train``) and writes ``record.csv`` (one
row per run) and ``record.md`` (the per-run table, then mean +- std over the runs beside the
paper's figures). Standard deviations are over runs (seeds), population form (``ddof=0``), as
``spafl compare`` reports them.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

import numpy as np

COLUMNS = ("seed", "rounds", "final_acc", "last10_acc", "best_acc", "best_round", "density", "density_weighted",
           "gbit_paper", "megabytes", "flops_per_client", "collapse_resets", "wall_s", "median_round_s", "folder")


def run_row(folder: Path) -> dict:
    meta = json.loads((folder / "history.json").read_text())
    history = meta["history"]
    if not history:
        raise ValueError(f"{folder}: the history is empty")
    acc = np.array([r["acc_mean"] for r in history])
    best = int(np.argmax(acc))
    last = history[-1]
    walls = np.array([r.get("wall_s", float("nan")) for r in history])
    return {
        "seed": meta["config"]["seed"],
        "rounds": len(history),
        "final_acc": float(acc[-1]),
        "last10_acc": float(acc[-10:].mean()),
        "best_acc": float(acc[best]),
        "best_round": int(history[best]["round"]),
        "density": float(last["density"]),
        "density_weighted": float(last["density_weighted"]),
        "gbit_paper": float(last["comm_gbit_paper_total"]),
        "megabytes": float(last["bytes_total"]) / 1e6,
        "flops_per_client": float(last["flops_total"]),
        "collapse_resets": int(last.get("collapse_resets", 0)),
        "wall_s": float(np.nansum(walls)),
        "median_round_s": float(np.nanmedian(walls)),
        "folder": str(folder),
    }


def _pm(values, spec: str) -> str:
    v = np.asarray(values, dtype=float)
    return f"{format(v.mean(), spec)} +- {format(v.std(), spec)}" if len(v) > 1 else format(v.mean(), spec)


def markdown(rows: list[dict], paper: dict) -> str:
    lines = ["| seed | rounds | final acc (%) | mean of last 10 (%) | best acc (%) at round | density (layer mean) "
             "| density (weighted) | comm (Gbit, paper formula) | serialised (MB) | FLOPs per client "
             "| guard resets | wall (h) | median s / round |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['rounds']} | {r['final_acc']:.2f} | {r['last10_acc']:.2f} "
                     f"| {r['best_acc']:.2f} at {r['best_round']} | {r['density']:.3f} | {r['density_weighted']:.3f} "
                     f"| {r['gbit_paper']:.4f} | {r['megabytes']:.1f} | {r['flops_per_client']:.3g} "
                     f"| {r['collapse_resets']} | {r['wall_s'] / 3600:.2f} | {r['median_round_s']:.2f} |")
    col = {k: [r[k] for r in rows] for k in COLUMNS if k != "folder"}
    lines += ["", f"Over {len(rows)} runs (mean +- std over seeds):", "",
              "| | paper (Table 2) | spafl |", "|---|---|---|",
              f"| accuracy, final round (%) | {paper['acc']:.2f} +- {paper['acc_std']:.2f} | "
              f"{_pm(col['final_acc'], '.2f')} |",
              f"| accuracy, mean of the last 10 rounds (%) | | {_pm(col['last10_acc'], '.2f')} |",
              f"| best accuracy (%) | | {_pm(col['best_acc'], '.2f')} |",
              f"| density, layer mean | | {_pm(col['density'], '.3f')} |",
              f"| density, weighted | | {_pm(col['density_weighted'], '.3f')} |",
              f"| communication (Gbit, paper formula) | {paper['gbit']:.4g} | {_pm(col['gbit_paper'], '.4g')} |",
              f"| training FLOPs per client | {paper['flops']:.3g} | {_pm(col['flops_per_client'], '.3g')} |",
              f"| wall time (h) | | {_pm(np.array(col['wall_s']) / 3600, '.2f')} |"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+", type=Path, help="run folders holding history.json")
    p.add_argument("--paper-acc", type=float, nargs=2, default=(89.21, 0.25), metavar=("MEAN", "STD"),
                   help="the paper's accuracy mean and std (default: SpaFL, Fashion-MNIST)")
    p.add_argument("--paper-gbit", type=float, default=0.1856, help="the paper's communication in Gbit")
    p.add_argument("--paper-flops", type=float, default=2.38e11, help="the paper's training FLOPs per client")
    p.add_argument("--out", type=Path, required=True, help="folder for record.csv and record.md")
    args = p.parse_args(argv)
    missing = [str(f) for f in args.folders if not (f / "history.json").is_file()]
    if missing:
        p.error(f"no history.json in: {', '.join(missing)}")
    rows = sorted((run_row(f) for f in args.folders), key=lambda r: r["seed"])
    paper = {"acc": args.paper_acc[0], "acc_std": args.paper_acc[1], "gbit": args.paper_gbit,
             "flops": args.paper_flops}
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "record.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: (float(f"{v:.7g}") if isinstance(v, float) and math.isfinite(v) else v)
                          for k, v in r.items()} for r in rows)
    text = markdown(rows, paper)
    (args.out / "record.md").write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
