"""Plots of a run folder (needs matplotlib): accuracy and density curves, one layer's masks
across clients at a few rounds (like the paper's Figure 3), the distribution of the clients'
accuracies over the rounds and the global thresholds per layer. Rounds count from 1, as in
the history."""

from __future__ import annotations

import contextlib
import zipfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .config import dataset_classes  # noqa: E402

# Percentile bands of the per-client accuracy plot: (low, high) pairs, outermost first.
CLIENT_BANDS = ((0, 100), (10, 90), (25, 75))


def history_rounds(meta: dict) -> np.ndarray:
    """The rounds' numbers counting from 1 (files written before ``history_format`` 2
    numbered them from 0)."""
    rounds = np.array([row["round"] for row in meta["history"]], dtype=np.int64)
    return rounds if meta.get("history_format", 1) >= 2 else rounds + 1


class PlotInputError(ValueError):
    """A run file the plots read is damaged or not a run's (the message names it)."""


@contextlib.contextmanager
def _reading(file: Path):
    """Turn what a damaged ``file`` makes NumPy or the plotting code raise into one
    :class:`PlotInputError` naming it."""
    try:
        yield
    except (KeyError, TypeError, IndexError, ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        if isinstance(e, PlotInputError):
            raise
        raise PlotInputError(f"cannot plot {file}: it is damaged or not a run's file ({type(e).__name__}: "
                             f"{str(e)[:200]})") from e


def plot_run(run: str | Path, rounds_shown: int = 3) -> list[Path]:
    """Write ``accuracy.png``, ``density.png``, and when their data exist ``masks.png``
    (``masks.npz``), ``clients.png`` (``clients.npz``) and ``thresholds.png`` (the history's
    ``tau`` statistics) into ``run``; return their paths."""
    from . import runfolder

    run = Path(run)
    meta = runfolder.read_history(run)  # RunFolderError naming the file when damaged
    if meta is None:
        raise FileNotFoundError(f"no history.json in {run}")
    runfolder.check_foreign(run)  # a plot of the user's own of the same name is not overwritten
    with _reading(run / "history.json"):
        return _plot_run(run, meta, rounds_shown)


def _plot_run(run: Path, meta: dict, rounds_shown: int) -> list[Path]:
    rows = meta["history"]
    if not rows:
        return []
    title = f"{meta['config']['dataset']} / {meta['config']['model']}, seed {meta['config']['seed']}"
    r = history_rounds(meta)
    out = []

    fig, ax = plt.subplots(figsize=(6.4, 4))
    mean = np.array([row["acc_mean"] for row in rows])
    std = np.array([row["acc_std"] for row in rows])
    ax.plot(r, mean, label="mean over clients")
    # accuracy lives in [0, 100]: a std band around a mean near either end would leave it
    ax.fill_between(r, np.clip(mean - std, 0, 100), np.clip(mean + std, 0, 100), alpha=0.2,
                    label="+- std (clipped to 0-100)")
    ax.plot(r, [row["acc_weighted"] for row in rows], label="sample-weighted", lw=1)
    ax.plot(r, [row["acc_p10"] for row in rows], label="10th percentile", lw=1, ls="--")
    ax.set(xlabel="round", ylabel="personalised test accuracy (%)", ylim=(0, 100), title=title)
    _round_axis(ax)
    ax.grid(alpha=0.3)
    ax.legend()
    out.append(_save(fig, run / "accuracy.png"))

    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.plot(r, [row["density"] for row in rows], label="layer mean", lw=2)
    ax.plot(r, [row["density_weighted"] for row in rows], label="parameter-weighted", lw=2)
    for name in meta["layers"]:
        ax.plot(r, [row["layers"][name] for row in rows], label=name, lw=0.8, alpha=0.7)
    ax.set(xlabel="round", ylabel="density (active units)", ylim=(0, 1.02), title=title)
    _round_axis(ax)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncol=2)
    out.append(_save(fig, run / "density.png"))

    if (run / "masks.npz").is_file():
        with _reading(run / "masks.npz"):
            out.append(_masks_plot(run, meta, title, rounds_shown))
    if (run / "clients.npz").is_file():
        with _reading(run / "clients.npz"), np.load(run / "clients.npz") as data:
            classes = dataset_classes(meta["config"]["dataset"])
            fig = client_accuracy_figure(data["rounds"], data["acc"], title, stuck_below=2 * 100.0 / classes)
        out.append(_save(fig, run / "clients.png"))

    if rows[0].get("tau"):
        out.append(_save(threshold_figure(r, rows, title), run / "thresholds.png"))
    return out


def _masks_plot(run: Path, meta: dict, title: str, rounds_shown: int) -> Path:
    with np.load(run / "masks.npz") as data:
        masks, rounds, layer = data["masks"], data["rounds"], str(data["layer"])
        if meta.get("history_format", 1) < 2:
            rounds = rounds + 1
        picks = sorted({int(i) for i in np.linspace(0, len(rounds) - 1, rounds_shown)})
        fig, axes = plt.subplots(1, len(picks), figsize=(4 * len(picks), 3.6), squeeze=False)
        for ax, i in zip(axes[0], picks, strict=True):
            ax.imshow(masks[i], aspect="auto", cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
            ax.set(title=f"round {rounds[i]}", xlabel=f"unit of {layer}", ylabel="client")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        fig.suptitle(f"{title}: active (black) units of {layer} per client")
    return _save(fig, run / "masks.png")


def client_percentiles(acc: np.ndarray) -> dict[int, np.ndarray]:
    """``{q: the q-th percentile over clients, per round}`` of ``acc [rounds, clients]`` for
    every q of :data:`CLIENT_BANDS` and the median; clients without test data (NaN) left out."""
    qs = sorted({q for band in CLIENT_BANDS for q in band} | {50})
    acc = np.asarray(acc, dtype=np.float64)
    if acc.size == 0 or np.isnan(acc).all():
        return {q: np.full(len(acc), np.nan) for q in qs}
    return {q: np.nanpercentile(acc, q, axis=1) for q in qs}


def client_accuracy_figure(rounds: np.ndarray, acc: np.ndarray, title: str = "", stuck_below: float = 20.0):
    """The distribution of the clients' accuracies over the rounds (``acc [rounds, clients]``
    in %, y axis 0 to 100): the median and the 25-75, 10-90 and min-max bands
    (:func:`client_percentiles`); under it, how many clients were below ``stuck_below`` % each
    round (:func:`plot_run` passes twice the chance level: clients stuck near chance)."""
    bands = client_percentiles(acc)
    fig, (ax, low) = plt.subplots(2, 1, figsize=(6.4, 5.2), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for (q_low, q_high), alpha in zip(CLIENT_BANDS, (0.15, 0.25, 0.35), strict=True):
        ax.fill_between(rounds, bands[q_low], bands[q_high], alpha=alpha, color="C0", lw=0,
                        label=f"{q_low}-{q_high}th percentile" if (q_low, q_high) != (0, 100) else "min-max")
    ax.plot(rounds, bands[50], color="C0", lw=1.5, label="median")
    ax.set(ylabel="client test accuracy (%)", ylim=(0, 100), title=f"{title}: accuracy over {acc.shape[1]} clients")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="lower right")
    stuck = (np.nan_to_num(np.asarray(acc, dtype=np.float64), nan=100.0) < stuck_below).sum(1)
    low.plot(rounds, stuck, color="C3", lw=1)
    low.set(xlabel="round", ylabel=f"clients < {stuck_below:g}%", ylim=(0, max(1, acc.shape[1])))
    low.grid(alpha=0.3)
    _round_axis(low)
    return fig


def threshold_figure(rounds: np.ndarray, rows: list[dict], title: str = ""):
    """The global thresholds of every layer over the rounds: mean, +- std, and the min-max band
    (one panel per layer: their scales differ)."""
    layers = list(rows[0]["tau"])
    fig, axes = plt.subplots(len(layers), 1, figsize=(6.4, 1.9 * len(layers) + 0.8), sharex=True, squeeze=False)
    for ax, name in zip(axes[:, 0], layers, strict=True):
        stats = {s: np.array([row["tau"][name][s] for row in rows]) for s in ("mean", "std", "min", "max")}
        ax.fill_between(rounds, stats["min"], stats["max"], alpha=0.15, color="C1", lw=0, label="min-max")
        ax.fill_between(rounds, stats["mean"] - stats["std"], stats["mean"] + stats["std"], alpha=0.3, color="C1",
                        lw=0, label="+- std")
        ax.plot(rounds, stats["mean"], color="C1", lw=1.2, label="mean")
        ax.set_ylabel(f"tau {name}")
        ax.grid(alpha=0.3)
    axes[0, 0].set_title(f"{title}: global thresholds")
    axes[0, 0].legend(fontsize="small", loc="upper left")
    axes[-1, 0].set_xlabel("round")
    _round_axis(axes[-1, 0])
    return fig


def _round_axis(ax) -> None:
    """Integer round ticks."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _save(fig, path: Path) -> Path:
    from .runfolder import atomic_write

    fig.tight_layout()
    try:  # atomic: a failed write leaves the previous plot, and the run folder records the file
        atomic_write(path, lambda f: fig.savefig(f, dpi=120, format="png"))
    finally:
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
    _round_axis(ax_r)
    ax_g.set(xlabel="cumulative communication (Gbit, log scale)", ylabel="personalised test accuracy (%)",
             title=title, xscale="log")
    for ax in (ax_r, ax_g):
        ax.grid(alpha=0.3)
        ax.legend()
    return [_save(fig_r, out / "accuracy_vs_round.png"), _save(fig_g, out / "accuracy_vs_gbit.png")]
