"""Plots of a run folder (needs matplotlib): accuracy and density curves, and one layer's
masks across clients at a few rounds (like the paper's Figure 3)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_run(run: str | Path, rounds_shown: int = 3) -> list[Path]:
    """Write ``accuracy.png``, ``density.png`` and (when ``masks.npz`` exists) ``masks.png``
    into ``run``; return their paths."""
    run = Path(run)
    meta = json.loads((run / "history.json").read_text())
    rows = meta["history"]
    if not rows:
        return []
    title = f"{meta['config']['dataset']} / {meta['config']['model']}, seed {meta['config']['seed']}"
    r = np.array([row["round"] for row in rows]) + 1
    out = []

    fig, ax = plt.subplots(figsize=(6.4, 4))
    mean = np.array([row["acc_mean"] for row in rows])
    std = np.array([row["acc_std"] for row in rows])
    ax.plot(r, mean, label="mean over clients")
    ax.fill_between(r, mean - std, mean + std, alpha=0.2, label="+- std")
    ax.plot(r, [row["acc_weighted"] for row in rows], label="sample-weighted", lw=1)
    ax.plot(r, [row["acc_p10"] for row in rows], label="10th percentile", lw=1, ls="--")
    ax.set(xlabel="round", ylabel="personalised test accuracy (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    out.append(_save(fig, run / "accuracy.png"))

    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.plot(r, [row["density"] for row in rows], label="layer mean", lw=2)
    ax.plot(r, [row["density_weighted"] for row in rows], label="parameter-weighted", lw=2)
    for name in meta["layers"]:
        ax.plot(r, [row["layers"][name] for row in rows], label=name, lw=0.8, alpha=0.7)
    ax.set(xlabel="round", ylabel="density (active units)", ylim=(0, 1.02), title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncol=2)
    out.append(_save(fig, run / "density.png"))

    if (run / "masks.npz").is_file():
        data = np.load(run / "masks.npz")
        masks, rounds = data["masks"], data["rounds"]
        picks = sorted({int(i) for i in np.linspace(0, len(rounds) - 1, rounds_shown)})
        fig, axes = plt.subplots(1, len(picks), figsize=(4 * len(picks), 3.6), squeeze=False)
        for ax, i in zip(axes[0], picks, strict=True):
            ax.imshow(masks[i], aspect="auto", cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
            ax.set(title=f"round {rounds[i] + 1}", xlabel=f"unit of {data['layer']}", ylabel="client")
        fig.suptitle(f"{title}: active (black) units of {data['layer']} per client")
        out.append(_save(fig, run / "masks.png"))
    return out


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_comparison(out: str | Path, runs: list[dict]) -> list[Path]:
    """``accuracy_vs_round.png`` and ``accuracy_vs_gbit.png``: each method's mean personalised
    accuracy over its seeds (band: min..max over seeds) against the round and against the
    cumulative communication (log scale; local-only, which sends nothing, is left out)."""
    out = Path(out)
    methods = list(dict.fromkeys(r["method"] for r in runs))
    fig_r, ax_r = plt.subplots(figsize=(6.4, 4))
    fig_g, ax_g = plt.subplots(figsize=(6.4, 4))
    for method in methods:
        group = [r for r in runs if r["method"] == method]
        n = min(len(r["history"]) for r in group)
        acc = np.array([[row["acc_mean"] for row in r["history"][:n]] for r in group])
        gbit = np.array([[row["comm_gbit_paper_total"] for row in r["history"][:n]] for r in group]).mean(0)
        rounds = np.arange(1, n + 1)
        line, = ax_r.plot(rounds, acc.mean(0), label=method)
        if len(group) > 1:
            ax_r.fill_between(rounds, acc.min(0), acc.max(0), alpha=0.2, color=line.get_color())
        if gbit[-1] > 0:
            ax_g.plot(gbit, acc.mean(0), label=method, color=line.get_color())
    config = runs[0]["config"]
    title = f"{config['dataset']} / {config['model']}, {len({r['seed'] for r in runs})} seed(s)"
    ax_r.set(xlabel="round", ylabel="personalised test accuracy (%)", title=title)
    ax_g.set(xlabel="cumulative communication (Gbit, log scale)", ylabel="personalised test accuracy (%)",
             title=title, xscale="log")
    for ax in (ax_r, ax_g):
        ax.grid(alpha=0.3)
        ax.legend()
    return [_save(fig_r, out / "accuracy_vs_round.png"), _save(fig_g, out / "accuracy_vs_gbit.png")]
