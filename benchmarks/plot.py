"""Plots from a benchmark CSV (benchmarks/kernels.py or benchmarks/e2e.py): speedup over the
dense baseline against density, one line per provider, one panel per case, one figure per
(layer or table, dtype, op).

    python benchmarks/plot.py results.csv --out plots/
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from collections import defaultdict
from pathlib import Path


def read(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def plot(rows: list[dict], out: Path, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = defaultdict(list)
    for r in rows:
        if math.isnan(float(r["speedup_vs_dense"])):  # rows without a dense baseline (federated rounds)
            continue
        groups[(r.get("layer") or r.get("table", ""), r.get("dtype", ""), r.get("op", ""))].append(r)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for (layer, dtype, op), group in sorted(groups.items()):
        cases = sorted({r["case"] for r in group})
        cols = min(4, len(cases))
        nrows = math.ceil(len(cases) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3.2 * nrows), squeeze=False)
        for ax, case in zip(axes.flat, cases, strict=False):
            by_provider = defaultdict(list)
            for r in group:
                if r["case"] == case:
                    by_provider[r["provider"]].append((float(r["density"]), float(r["speedup_vs_dense"])))
            for provider, points in sorted(by_provider.items()):
                points.sort()
                ax.plot([d for d, _ in points], [s for _, s in points], marker="o", ms=3, label=provider)
            ax.axhline(1.0, color="grey", lw=0.8)
            ax.set_xscale("log")
            ax.set_title(case, fontsize=9)
            ax.set_xlabel("density")
            ax.set_ylabel("speedup vs dense")
        for ax in list(axes.flat)[len(cases):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=7)
        fig.suptitle(f"{title}: {layer} {op} {dtype}", fontsize=10)
        fig.tight_layout()
        path = out / f"{layer}_{op.replace('+', '_')}_{dtype}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("csv", type=Path)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    rows = read(args.csv)
    if not rows:
        p.error(f"{args.csv} has no rows")
    device = rows[0].get("device", "")
    for path in plot(rows, args.out, f"{device}, torch {rows[0].get('torch', '')}"):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
