"""``spafl train`` / ``spafl compare`` / ``spafl presets`` / ``spafl plot``: the simulator's
command line.

Every :class:`FedConfig` field is a flag (``--num-clients``, ``--th-update/--no-th-update``,
``--clip none``...). Settings are layered preset < ``--config`` file < flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import types
import typing
import warnings
from pathlib import Path

from .._threads import ThreadPolicy
from .config import DEFAULT_PRESET, METHODS, PRESETS, FedConfig, build_config, load_config_file

_HELP = {
    "method": "spafl, fedavg (dense), local (no communication), sparsyfed, or topk (SparsyFed's ablation)",
    "sparsity": "SparsyFed / Top-K target sparsity of the uploaded weights",
    "beta": "SparsyFed's Powerpropagation exponent",
    "spectral_exponent": "SparsyFed's hyperparameter-free variant: beta per layer from the spectral norm",
    "lr_final": "decay the learning rate exponentially from --lr to this over the run ('none': lr * lr_decay**t)",
    "dataset": "digits (embedded), fmnist, cifar10 or cifar100",
    "data_root": "folder holding the dataset in torchvision's layout (e.g. ../shared/data)",
    "download": "let torchvision download the dataset (needs torchvision)",
    "normalize": "standard (per-channel mean/std) or raw (0..255 floats, the reference FMNIST input)",
    "num_clients": "N", "clients_per_round": "K, sampled uniformly without replacement",
    "alpha": "Dirichlet concentration of the non-IID split",
    "th_coeff": "threshold penalty coefficient", "th_update": "threshold-guided weight update",
    "penalty_schedule": "sigmoid (FMNIST reference) or constant (CIFAR reference)",
    "clip": "gradient-norm clipping ('none': off)", "collapse_density": "collapse guard ('none': off)",
    "checkpoint_every": "rounds between checkpoints (0: only at the end)",
    "mask_layer": "threshold layer whose masks are recorded for the mask plot (default: the first)",
    "device": "auto, cpu or cuda[:i]",
    "optimizer_lifetime": "per-round (a fresh SGD optimiser every round) or per-run (one per client, momentum kept)",
    "collapse_timing": "collapse guard on the density of this forward (current) or the previous one (previous)",
    "collapse_in_eval": "run the collapse guard in evaluation too (a reset persists in the client)",
    "rng": "keyed (draws keyed by seed, round, client) or global (the reference code's sequential draws)",
}


def _optional(kind):
    def parse(text: str):
        return None if text.lower() in ("none", "null", "off") else kind(text)

    parse.__name__ = kind.__name__
    return parse


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(FedConfig)
    group = parser.add_argument_group("run settings (override the preset and the config file)")
    for f in dataclasses.fields(FedConfig):
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        args = typing.get_args(hint)
        optional = isinstance(hint, types.UnionType) and type(None) in args
        base = next(a for a in args if a is not type(None)) if optional else hint
        help_text = _HELP.get(f.name, "") + f" (default {f.default!r})"
        if base is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif f.name == "method":
            group.add_argument(flag, choices=METHODS, default=None, help=help_text)
        else:
            kind = _optional(base) if optional else base
            group.add_argument(flag, type=kind, default=None, dest=f.name, help=help_text,
                               metavar=base.__name__.upper())


def add_thread_flags(parser: argparse.ArgumentParser, workers: bool = True) -> None:
    """``--threads`` (and ``--workers``): see :class:`spafl._threads.ThreadPolicy`."""
    group = parser.add_argument_group("threads (default: 1 intra-op thread, or OMP_NUM_THREADS when set"
                                      + ("; one worker per core, at most one per sampled client)" if workers else ")"))
    group.add_argument("--threads", type=int, default=None, metavar="N",
                       help="torch intra-op threads (small models gain nothing from more)")
    if workers:
        group.add_argument("--workers", type=int, default=None, metavar="N",
                           help="clients trained and evaluated at once, in threads (CPU only; the history does not "
                                "depend on it)")


def thread_policy(args: argparse.Namespace, parser: argparse.ArgumentParser, config: FedConfig | None = None
                  ) -> ThreadPolicy:
    """The policy the flags, the environment and the machine give (``parser.error`` on bad flags)."""
    try:
        return ThreadPolicy.choose(workers=getattr(args, "workers", 1), threads=args.threads,
                                   clients_per_round=config.clients_per_round if config is not None else 1,
                                   device=config.device if config is not None else getattr(args, "device", "cpu"))
    except ValueError as e:
        parser.error(str(e).replace("threads must", "--threads must").replace("workers must", "--workers must"))


def add_federated_commands(sub) -> None:
    train = sub.add_parser("train", help="run federated SpaFL (default: the embedded digits preset)",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    train.add_argument("--preset", choices=sorted(PRESETS), default=None,
                       help=f"start from a preset (default {DEFAULT_PRESET}, or the config file's)")
    train.add_argument("--config", type=Path, default=None, help="a JSON or TOML file of settings")
    train.add_argument("--out", type=Path, default=None, help="run folder (default runs/<preset>-seed<seed>)")
    train.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    train.add_argument("--overwrite", action="store_true", help="replace a run already saved in --out")
    train.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    train.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True,
                       help="draw the plots at the end (needs matplotlib)")
    add_thread_flags(train)
    _add_config_flags(train)
    train.set_defaults(func=_train)

    compare = sub.add_parser("compare", help="run several methods with several seeds and tabulate them",
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    compare.add_argument("--preset", choices=sorted(PRESETS), default=None,
                         help=f"start from a preset (default {DEFAULT_PRESET}, or the config file's)")
    compare.add_argument("--config", type=Path, default=None, help="a JSON or TOML file of settings")
    compare.add_argument("--methods", type=_csv(str), default=list(METHODS), help="comma-separated methods")
    compare.add_argument("--seeds", type=_csv(int), default=[0, 1, 2], help="comma-separated seeds")
    compare.add_argument("--out", type=Path, default=None, help="folder (default runs/compare-<preset>)")
    compare.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    add_thread_flags(compare)
    _add_config_flags(compare)
    compare.set_defaults(func=_compare)

    presets = sub.add_parser("presets", help="list the presets and their settings")
    presets.set_defaults(func=_presets)

    plot = sub.add_parser("plot", help="draw the plots of a run folder")
    plot.add_argument("run", type=Path)
    plot.set_defaults(func=_plot)


def _csv(kind):
    def parse(text: str) -> list:
        items = [kind(x) for x in text.split(",") if x.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        return items

    parse.__name__ = f"list of {kind.__name__}"
    return parse


def _base_config(args: argparse.Namespace) -> tuple[FedConfig, str | None]:
    file_values = load_config_file(args.config) if args.config else {}
    preset = args.preset or (None if "preset" in file_values else DEFAULT_PRESET)
    return build_config(preset, file_values, _overrides(args)), preset or file_values.get("preset")


def _compare(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .compare import run_comparison

    if args.method is not None:
        parser.error("compare runs --methods; --method is for spafl train")
    command = "spafl " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    try:
        config, preset = _base_config(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"spafl compare: {e}", file=sys.stderr)
        return 2
    policy = thread_policy(args, parser, config)
    out = args.out or Path("runs") / f"compare-{preset or 'custom'}"
    print(f"spafl compare: {', '.join(args.methods)} x seeds {args.seeds} on {config.dataset} / {config.model}, "
          f"{config.rounds} rounds, into {out}; threads: {policy.describe()}")
    try:
        with policy.applied():
            runs = run_comparison(config, args.methods, args.seeds, out, progress=args.progress, command=command,
                                  workers=policy.workers)
    except (ValueError, FileNotFoundError) as e:
        print(f"spafl compare: {e}", file=sys.stderr)
        return 2
    from .compare import aggregate_runs, table_markdown

    print(table_markdown(aggregate_runs(runs)), end="")
    print(f"wrote {out / 'comparison.md'}, {out / 'comparison.csv'} and the run folders")
    return 0


def _overrides(args: argparse.Namespace) -> dict:
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(FedConfig) if getattr(args, f.name) is not None}


def _train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .simulator import Simulator, read_checkpoint

    overrides = _overrides(args)
    command = "spafl " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    try:
        if args.resume:
            if args.out is None:
                parser.error("--resume needs --out (the run folder)")
            if args.preset or args.config:
                parser.error("--resume takes the run's settings from its checkpoint; drop --preset/--config")
            ckpt = args.out / "checkpoint.pt"
            if not ckpt.is_file():
                parser.error(f"--resume: no checkpoint in {args.out}")
            saved = read_checkpoint(ckpt)["config"]
            config = FedConfig(**{**saved, **overrides}).validate()
        else:
            config, preset = _base_config(args)
            tag = "" if config.method == "spafl" else f"-{config.method}"
            out = args.out or Path("runs") / f"{preset or 'custom'}{tag}-seed{config.seed}"
            if (out / "checkpoint.pt").exists() and not args.overwrite:
                parser.error(f"{out} already holds a run; pass --resume to continue it or --overwrite to replace it")
            args.out = out
    except (ValueError, FileNotFoundError) as e:
        print(f"spafl train: {e}", file=sys.stderr)
        return 2
    policy = thread_policy(args, parser, config)
    with policy.applied():
        try:
            if args.resume:
                sim = Simulator.resume(ckpt, config, progress=args.progress, command=command, workers=policy.workers)
                print(f"resuming {args.out}: {sim.round} of {config.rounds} rounds done")
            else:
                sim = Simulator(config, out_dir=args.out, progress=args.progress, command=command,
                                workers=policy.workers)
        except (ValueError, FileNotFoundError) as e:
            print(f"spafl train: {e}", file=sys.stderr)
            return 2
        cfg = sim.config
        size = f"{sim.num_thresholds} thresholds" if cfg.method == "spafl" else f"{sim.num_weights} prunable weights"
        print(f"spafl train: {cfg.method}, {cfg.dataset} / {cfg.model}, {cfg.num_clients} clients, "
              f"{cfg.clients_per_round} per round, rounds 1 to {cfg.rounds}, alpha {cfg.alpha}, device {sim.device}, "
              f"{size}, run folder {args.out}")
        print(f"threads: {policy.describe()}")
        with warnings.catch_warnings(), sim:
            warnings.simplefilter("always")
            sim.run()
    _print_summary(sim.summary())
    if args.plot:
        _draw(args.out)
    return 0


def _print_summary(s: dict) -> None:
    if not s.get("rounds"):
        print("no rounds run")
        return
    print(f"rounds {s['rounds']}: accuracy {s['final_acc']:.2f}% (std {s['final_acc_std']:.2f} over clients), "
          f"best {s['best_acc']:.2f}% at round {s['best_round']} (density {s['density_at_best']:.3f})"
          + (f"; global model on the whole test set {s['final_acc_global']:.2f}%"
             if s.get("final_acc_global") == s.get("final_acc_global") else ""))
    print(f"density {s['final_density']:.3f} (layer mean), {s['final_density_weighted']:.3f} (weighted); "
          f"communication {s['comm_gbit_paper']:.6g} Gbit by the paper's formula, "
          f"{s['bytes_exchanged'] / 1e6:.4g} MB serialised; training {s['flops_per_client']:.4g} FLOPs per client; "
          f"{s['wall_s']:.1f} s ({s['mean_round_s']:.3f} s/round)"
          + (f"; {s['never_sampled']} client(s) never sampled" if s.get("never_sampled") else ""))


def _draw(run: Path) -> None:
    try:
        from .plots import plot_run
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install matplotlib)")
        return
    for path in plot_run(run):
        print(f"wrote {path}")


def _presets(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    defaults = FedConfig().to_dict()
    for name, values in PRESETS.items():
        marker = " (default)" if name == DEFAULT_PRESET else ""
        print(f"{name}{marker}")
        full = {**defaults, **values}
        print("  " + ", ".join(f"{k}={full[k]!r}" for k in values))
    return 0


def _plot(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if not (args.run / "history.json").is_file():
        parser.error(f"{args.run} has no history.json")
    _draw(args.run)
    return 0
