"""Plots from a benchmark CSV: benchmarks/kernels.py, benchmarks/e2e.py or
scripts/authors_side_by_side.py (recognised by their columns).

    python benchmarks/plot.py kernels.csv --out plots/

kernels.py and e2e.py's step table: speedup over dense against density (log axis, ticks at the
measured densities), one line per provider (and backend), one panel per case, one figure per
(layer or table, dtype, op); whiskers span the 20th-80th percentile interval of the ratio, a
hollow marker is a noisy ratio, the grey line is 1x (as fast as dense). e2e.py's round table and
per-layer profiles: bars of the time per provider with 20th-80th percentile whiskers, labelled
with the speedup over masked. authors_side_by_side.py: seconds per round and accuracy against the
round, one line per side.
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


def _f(r: dict, key: str) -> float:
    try:
        return float(r.get(key, "nan"))
    except ValueError:
        return float("nan")


def _noisy(r: dict, ratio: str) -> bool:
    """Whether the row's ``ratio`` column was flagged noisy (older CSVs: the row's flag)."""
    return str(r.get(f"{ratio}_noisy", r.get("noisy", ""))).lower() == "true"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# One colour per provider in every figure and panel.
COLORS = {name: f"C{i}" for i, name in enumerate(("dense", "masked", "gather", "smaller", "spafl-exact", "spafl-skip",
                                                  "spafl"))}


def _color(provider: str) -> str:
    return COLORS.get(provider, "black")


def _label(r: dict) -> str:
    backend = r.get("backend", "")
    return f"{r['provider']} ({backend})" if backend and backend != "torch" else r["provider"]


def plot(rows: list[dict], out: Path, title: str) -> list[Path]:
    """Every figure the rows call for, written under ``out``; returns their paths."""
    if rows and "side" in rows[0]:
        return plot_side_by_side(rows, out, title)
    return plot_speedups(rows, out, title) + plot_bars(rows, out, title)


def plot_speedups(rows: list[dict], out: Path, title: str) -> list[Path]:
    """Speedup over dense against density, for the rows at one density for every layer."""
    from matplotlib.ticker import FixedLocator, NullLocator

    plt = _pyplot()
    groups = defaultdict(list)
    for r in rows:
        if math.isnan(_f(r, "speedup_vs_dense")) or r.get("profile", "uniform") != "uniform":
            continue  # no dense baseline (federated rounds), or per-layer densities (plot_bars)
        groups[(r.get("layer") or r.get("table", ""), r.get("dtype", ""), r.get("op", ""))].append(r)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for (layer, dtype, op), group in sorted(groups.items()):
        cases = sorted({r["case"] for r in group})
        cols = min(4, len(cases))
        nrows = math.ceil(len(cases) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(max(5.5, 4.2 * cols), 3.4 * nrows + 0.5), squeeze=False)
        for ax, case in zip(axes.flat, cases, strict=False):
            by_provider = defaultdict(list)
            for r in group:
                if r["case"] == case:
                    by_provider[_label(r)].append(r)
            densities = sorted({_f(r, "density") for r in group if r["case"] == case and _f(r, "density") > 0})
            for label, points in sorted(by_provider.items(), key=lambda kv: list(COLORS).index(kv[1][0]["provider"])
                                        if kv[1][0]["provider"] in COLORS else len(COLORS)):
                points = sorted((p for p in points if _f(p, "density") > 0), key=lambda p: _f(p, "density"))
                if not points:
                    continue
                x = [_f(p, "density") for p in points]
                y = [_f(p, "speedup_vs_dense") for p in points]
                lo = [_f(p, "speedup_vs_dense_p20") for p in points]
                hi = [_f(p, "speedup_vs_dense_p80") for p in points]
                color = _color(points[0]["provider"])
                (line,) = ax.plot(x, y, color=color, lw=1.2, label=label)
                if not any(math.isnan(v) for v in lo + hi):
                    yerr = [[max(0.0, a - b) for a, b in zip(y, lo, strict=True)],
                            [max(0.0, b - a) for a, b in zip(y, hi, strict=True)]]
                    ax.errorbar(x, y, yerr=yerr, fmt="none", ecolor=color, elinewidth=0.8, capsize=2)
                for p, xv, yv in zip(points, x, y, strict=True):
                    face = "white" if _noisy(p, "speedup_vs_dense") else color
                    ax.plot([xv], [yv], marker="o", ms=4, color=color, mfc=face)
            ax.axhline(1.0, color="grey", lw=0.8, ls="--")
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(FixedLocator(densities))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xticklabels([f"{d:g}" for d in densities])
            ax.set_title(case, fontsize=9)
            ax.set_xlabel("density (fraction of units kept)")
            ax.set_ylabel("speedup over dense (x)")
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(cases):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=7, title="hollow: noisy", title_fontsize=7)
        fig.suptitle(f"{layer} {op} {dtype}: speedup over dense (>1x is faster)\n{title}", fontsize=9)
        fig.tight_layout()
        path = out / f"{layer}_{op.replace('+', '_')}_{dtype}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def plot_bars(rows: list[dict], out: Path, title: str) -> list[Path]:
    """Time per provider of e2e.py's round rows and per-layer-profile step rows."""
    plt = _pyplot()
    picked = [r for r in rows if r.get("table") == "round" or r.get("profile", "uniform") not in ("uniform", "")]
    groups = defaultdict(list)
    for r in picked:
        groups[(r["table"], r["case"], r.get("profile", ""), r.get("layer_densities", ""))].append(r)
    if not groups:
        return []
    out.mkdir(parents=True, exist_ok=True)
    keys = sorted(groups)
    fig, axes = plt.subplots(1, len(keys), figsize=(max(5.5, 4.2 * len(keys)), 4.3), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=True):
        table, case, profile, layers = key
        group = groups[key]
        scale, unit = (1e-3, "s") if table == "round" else (1.0, "ms")
        names = [_label(r) for r in group]
        y = [_f(r, "ms") * scale for r in group]
        lo = [max(0.0, v - _f(r, "ms_p20") * scale) for v, r in zip(y, group, strict=True)]
        hi = [max(0.0, _f(r, "ms_p80") * scale - v) for v, r in zip(y, group, strict=True)]
        ax.bar(range(len(group)), y, yerr=[lo, hi], capsize=3, color=[_color(r["provider"]) for r in group])
        for i, r in enumerate(group):
            s = _f(r, "speedup_vs_masked")
            if not math.isnan(s) and r["provider"] != "masked":
                mark = "?" if _noisy(r, "speedup_vs_masked") else ""
                ax.annotate(f"{s:.2f}x vs masked{mark}", (i, y[i] + hi[i]), ha="center", va="bottom", fontsize=7,
                            xytext=(0, 3), textcoords="offset points")
        ax.set_xticks(range(len(group)))
        ax.set_xticklabels(names, fontsize=7, rotation=15)
        what = "one federated round" if table == "round" else "one training step"
        ax.set_ylabel(f"{what} ({unit}, median, p20-p80)")
        ax.set_title(f"{case}, {profile}\n{layers}", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        ax.margins(y=0.15)
    fig.suptitle(f"time per provider ('?': noisy ratio)\n{title}", fontsize=9)
    fig.tight_layout()
    path = out / "e2e_profiles_and_rounds.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def plot_side_by_side(rows: list[dict], out: Path, title: str) -> list[Path]:
    """Seconds per round and accuracy against the round, one line per side."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    sides = defaultdict(list)
    for r in rows:
        sides[r["side"]].append((int(r["round"]), _f(r, "seconds"), _f(r, "acc"), _f(r, "density")))
    out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for side, points in sorted(sides.items()):
        points.sort()
        t = [p[0] for p in points]
        for ax, k in zip(axes, (1, 2, 3), strict=True):
            ax.plot(t, [p[k] for p in points], marker="o", ms=2, lw=1, label=side)
    for ax, ylabel in zip(axes, ("seconds per round", "accuracy (%, mean over clients)", "density (mean over layers)"),
                          strict=True):
        ax.set_xlabel("round")
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].set_ylim(bottom=0)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"the SpaFL authors' code and spafl, run one after the other\n{title}", fontsize=9)
    fig.tight_layout()
    path = out / "side_by_side.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csv", type=Path, help="a CSV written by kernels.py, e2e.py or authors_side_by_side.py")
    p.add_argument("--out", type=Path, required=True, help="folder for the PNG files (created if missing)")
    args = p.parse_args(argv)
    if not args.csv.is_file():
        p.error(f"{args.csv} does not exist")
    rows = read(args.csv)
    if not rows:
        p.error(f"{args.csv} has no rows")
    r0 = rows[0]
    threads = f", {r0['threads']} thread{'s' if r0['threads'] != '1' else ''}" if r0.get("threads") else ""
    for path in plot(rows, args.out, f"{r0.get('device', '')}, torch {r0.get('torch', '')}{threads}"):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
