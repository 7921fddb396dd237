"""``spafl train`` / ``spafl compare`` / ``spafl presets`` / ``spafl plot``: the simulator's
command line.

Every :class:`FedConfig` field is a flag (``--num-clients``, ``--th-update/--no-th-update``,
``--clip none``...). Settings are layered preset < ``--config`` file < flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import shlex
import sys
import types
import typing
from pathlib import Path

from .config import (
    AGGREGATORS,
    BACKENDS,
    COHORT_LIMITS,
    COLLAPSE_TIMINGS,
    DATASETS,
    DEFAULT_PRESET,
    METHODS,
    MODELS,
    NORMALIZATIONS,
    OPTIMIZER_LIFETIMES,
    PENALTY_SCHEDULES,
    PRESETS,
    RNG_MODES,
    FedConfig,
    build_config,
)
from .flags import (
    HelpFormatter,
    add_thread_flags,
    base_config,
    csv_list,
    fail,
    folder_arg,
    optional_value,
    thread_policy,
)
from .train_command import draw_plots
from .train_command import train as _train

# The settings that take one of a few words: --help lists them and argparse refuses others.
_CHOICES = {"method": METHODS, "dataset": DATASETS, "model": MODELS, "backend": BACKENDS,
            "backward_mode": ("exact", "skip", "sample"), "normalize": NORMALIZATIONS,
            "penalty_schedule": PENALTY_SCHEDULES, "optimizer_lifetime": OPTIMIZER_LIFETIMES,
            "collapse_timing": COLLAPSE_TIMINGS, "rng": RNG_MODES, "aggregator": AGGREGATORS}

_HELP = {
    "method": "spafl, fedavg (dense), local (no communication), sparsyfed, or topk (SparsyFed's ablation)",
    "sparsity": "SparsyFed / Top-K target sparsity of the uploaded weights",
    "beta": "SparsyFed's Powerpropagation exponent",
    "spectral_exponent": "SparsyFed's hyperparameter-free variant: beta per layer from the spectral norm",
    "lr_final": "decay the learning rate exponentially from --lr to this over the run ('none': lr * lr_decay**t)",
    "dataset": "digits is embedded; the others are read from --data-root",
    "model": "the network: digits-cnn (8x8 digits), lenet5 (Fashion-MNIST), conv4, vit, resnet18 (CIFAR)",
    "backend": "threshold layers' backend: auto (compact on CPU, triton on CUDA), compact, reference (masked "
               "dense), triton",
    "backward_mode": "what pruned units get in backward: exact (the spec's gradient), skip (nothing), sample "
                     "(estimated from --sample-fraction of the batch)",
    "sample_fraction": "backward-mode sample: the fraction of batch rows the estimate uses",
    "penalty_scheduler": "the sigmoid schedule's time scale: lambda_t = th_coeff * sigmoid(10 t / "
                         "penalty_scheduler - 5)",
    "data_root": "folder holding the dataset in torchvision's layout (e.g. ../shared/data)",
    "download": "let torchvision download the dataset (needs torchvision)",
    "normalize": "standard (per-channel mean/std) or raw (0..255 floats, the reference FMNIST input)",
    "num_clients": "N", "clients_per_round": "K, sampled uniformly without replacement",
    "alpha": "Dirichlet concentration of the non-IID split",
    "th_coeff": "threshold penalty coefficient", "th_update": "threshold-guided weight update",
    "penalty_schedule": "sigmoid (FMNIST reference) or constant (CIFAR reference)",
    "clip": "gradient-norm clipping ('none': off)", "collapse_density": "collapse guard ('none': off)",
    "checkpoint_every": "rounds between checkpoints (0: only at the end)",
    "mask_layer": "threshold layer whose masks are recorded for the mask plot ('none': the model's first)",
    "device": "auto, cpu or cuda[:i]",
    "memory_format": "a convolutional model's layout: auto (channels-last on CUDA), channels_last or contiguous",
    "optimizer_lifetime": "per-round (a fresh SGD optimiser every round) or per-run (one per client, momentum kept)",
    "collapse_timing": "collapse guard on the density of this forward (current) or the previous one (previous)",
    "collapse_in_eval": "run the collapse guard in evaluation too (a reset persists in the client)",
    "rng": "keyed (draws keyed by seed, round, client) or global (the reference code's sequential draws)",
    "aggregator": "mean (the method's own), median or trimmed-mean (coordinate-wise, unweighted: robust to a "
                  "minority of hostile clients)",
    "trim_fraction": "trimmed-mean: the fraction of values dropped at each end of every coordinate",
    "cohort_clip": "scale each accepted update's deviation from the global state back to this many times "
                   "the round's median deviation, per exchanged tensor (none: the method's default; inf: off; "
                   "docs/security.md)",
    "cohort_against": "cut each accepted update's component against the cohort's median direction to this many "
                      "times the round's median deviation, per exchanged tensor (none: the method's default; inf: off; "
                      "docs/security.md)",
    "cohort_shift": "keep each accepted update's shift of a whole tensor (every value one way) within this many "
                    "times the round's median deviation of the cohort's median shift (none: the method's default; "
                    "inf: off; docs/security.md)",
    "cohort_drift": "keep each client's deviations from the cohort's centre, summed over the rounds it took part "
                    "in, within this many times the round's median deviation times sqrt(rounds) (none: the method's "
                    "default; inf: off; docs/security.md)",
    "cohort_drift_shift": "keep the component of that sum along the all-ones direction (a whole tensor one way) "
                          "within this many times the round's median deviation times sqrt(rounds) (none: the "
                          "method's default; inf: off)",
    "cohort_drift_against": "keep that client's pulls against each round's cohort direction, summed, within this "
                            "many times the round's median deviation times sqrt(rounds) (none: the method's default; "
                            "inf: off)",
    "aggregate_drift": "keep the accepted mean's deviations from the cohort's trimmed mean, summed over the rounds "
                       "whoever sent them, within this many times the round's median deviation times sqrt(rounds), "
                       "in Euclidean norm (none: the method's default; inf: off; docs/security.md)",
    "aggregate_shift": "the same sum's shift of a whole tensor (every value one way) (none: the method's default; "
                       "inf: off)",
    "aggregate_against": "the same sum's component against the cohort's direction (none: the method's default; "
                         "inf: off)",
    "aggregate_energy": "keep the root mean square over the rounds of the accepted mean's distance from the "
                        "cohort's trimmed mean, whatever its direction, within this many times the round's median "
                        "deviation (none: the method's default; inf: off)",
    "update_bounds": "reject updates that no legitimate client's local SGD can reach from the global state",
    "grad_bound": "the gradient bound the update bounds assume without --clip ('none': 1000)",
    "max_failed_rounds": "stop with an error after this many rounds in a row that aggregate nothing (0: never)",
    "rollback_depth": "keep this many of the last global states that cohorts trained from, and restore one after "
                      "a round in which more than half the sampled cohort had its update rejected or its training "
                      "failed on the global state's values (0: off; docs/security.md)",
    "seed": "the run's seed (split, sampling, initial model, batches)",
    "rounds": "rounds to run (with --resume: the new total)",
}


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(FedConfig)
    group = parser.add_argument_group(
        "run settings", f"Override the preset and the config file. The defaults shown are the {DEFAULT_PRESET} "
        "preset's; another --preset or --config changes them (spafl presets lists them).")
    shown = build_config(DEFAULT_PRESET).to_dict()
    for f in dataclasses.fields(FedConfig):
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        args = typing.get_args(hint)
        optional = isinstance(hint, types.UnionType) and type(None) in args
        base = next(a for a in args if a is not type(None)) if optional else hint
        value = shown[f.name]
        value = "none" if value is None else str(value).lower() if isinstance(value, bool) else value
        help_text = (_HELP.get(f.name, "") + f" (default: {value})").strip()
        if base is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif f.name in _CHOICES:
            group.add_argument(flag, choices=_CHOICES[f.name], default=None, help=help_text)
        else:
            # (a limit against the cohort: None, ``none``, is the method's default, so ``off`` is inf)
            kind = optional_value(base, math.inf if f.name in COHORT_LIMITS else None) if optional else base
            group.add_argument(flag, type=kind, default=None, dest=f.name, help=help_text,
                               metavar=base.__name__.upper())


def add_federated_commands(sub) -> None:
    train = sub.add_parser("train", help="run federated SpaFL or a baseline (default: the embedded digits preset)",
                           description="Run federated SpaFL or a baseline. Running the same command again "
                                       "continues an unfinished run or prints a finished one's summary.",
                           formatter_class=HelpFormatter)
    train.add_argument("--preset", choices=sorted(PRESETS), default=None,
                       help=f"start from a preset (default {DEFAULT_PRESET}, or the config file's)")
    train.add_argument("--config", type=Path, default=None, help="a JSON or TOML file of settings")
    train.add_argument("--out", type=folder_arg, default=None,
                       help="run folder (default runs/<preset>[-<method>]-seed<seed>); a run with the same settings "
                            "there is continued, or reported when finished")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in the folder with its own settings (flags may change --rounds, "
                            "--checkpoint-every, --device, --data-root, --eval-batch-size, --max-failed-rounds)")
    train.add_argument("--overwrite", action="store_true",
                       help="replace the run in the folder: its files are removed (nothing else) once the new run "
                            "is ready to start")
    train.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                       help="draw a progress line on stderr")
    train.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True,
                       help="draw the plots at the end (needs matplotlib)")
    add_thread_flags(train)
    _add_config_flags(train)
    train.set_defaults(func=_train)

    compare = sub.add_parser("compare", help="run several methods with several seeds and tabulate them",
                             formatter_class=HelpFormatter)
    compare.add_argument("--preset", choices=sorted(PRESETS), default=None,
                         help=f"start from a preset (default {DEFAULT_PRESET}, or the config file's)")
    compare.add_argument("--config", type=Path, default=None, help="a JSON or TOML file of settings")
    compare.add_argument("--methods", type=csv_list(str), default=list(METHODS), help="comma-separated methods")
    compare.add_argument("--seeds", type=csv_list(int), default=[0, 1, 2], help="comma-separated seeds")
    compare.add_argument("--out", type=folder_arg, default=None, help="folder (default runs/compare-<preset>)")
    compare.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                         help="draw a progress line on stderr")
    add_thread_flags(compare)
    _add_config_flags(compare)
    compare.set_defaults(func=_compare)

    presets = sub.add_parser("presets", help="list the presets and their settings")
    presets.set_defaults(func=_presets)

    plot = sub.add_parser("plot", help="redraw the plots of a run folder or of a spafl compare folder")
    plot.add_argument("run", type=Path, help="a run folder (history.json) or a comparison folder (comparison.csv)")
    plot.set_defaults(func=_plot)


def _compare(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .compare import run_comparison

    if args.method is not None:
        parser.error("compare runs --methods; --method is for spafl train")
    command = "spafl " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    try:
        config, preset = base_config(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"spafl compare: {e}", file=sys.stderr)
        return 2
    policy = thread_policy(args, parser, config)
    out = args.out or Path("runs") / f"compare-{preset or 'custom'}"
    print(f"spafl compare: {', '.join(args.methods)} x seeds {args.seeds} on {config.dataset} / {config.model}, "
          f"{config.rounds} rounds, into {out}; threads: {policy.describe()}")
    from .engine import FederationStalled

    try:
        with policy.applied():
            runs = run_comparison(config, args.methods, args.seeds, out, progress=args.progress, command=command,
                                  workers=policy.workers)
    except KeyboardInterrupt:
        print(f"spafl compare: interrupted; the finished runs and the others' last checkpoints are kept in {out}; run "
              f"the same command again to continue: {command}", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError) as e:
        return fail("compare", e)
    except (FederationStalled, OSError) as e:
        print(f"spafl compare: {e}", file=sys.stderr)
        return 1
    from .compare import aggregate_runs, table_markdown

    print(table_markdown(aggregate_runs(runs)), end="")
    print(f"wrote {out / 'comparison.md'}, {out / 'comparison.csv'} and the run folders")
    return 0


def _presets(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    defaults = FedConfig().to_dict()
    for name, values in PRESETS.items():
        marker = " (default)" if name == DEFAULT_PRESET else ""
        print(f"{name}{marker}")
        full = {**defaults, **values}
        print("  " + ", ".join(f"{k}={full[k]!r}" for k in values))
    return 0


def _plot(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Redraw a run folder's plots, or a comparison folder's (``spafl compare``)."""
    if (args.run / "history.json").is_file():
        try:
            draw_plots(args.run)
        except (ValueError, OSError) as e:  # a damaged or foreign run file, named; a failed write, named
            print(f"spafl plot: {e}", file=sys.stderr)
            return 2
        return 0
    if not (args.run / "comparison.csv").is_file():
        parser.error(f"{args.run} holds neither a run (history.json) nor a comparison (comparison.csv)")
    try:
        from .plots import plot_comparison
    except ImportError:
        print("spafl plot: needs matplotlib (pip install matplotlib)", file=sys.stderr)
        return 2
    from .compare import load_comparison

    try:
        runs = load_comparison(args.run)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"spafl plot: {e}", file=sys.stderr)
        return 2
    for path in plot_comparison(args.run, runs):
        print(f"wrote {path}")
    return 0
