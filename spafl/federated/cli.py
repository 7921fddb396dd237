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
from .config import (
    AGGREGATORS,
    BACKENDS,
    COLLAPSE_TIMINGS,
    DATASETS,
    DEFAULT_PRESET,
    METHODS,
    MODELS,
    NORMALIZATIONS,
    OPTIMIZER_LIFETIMES,
    PENALTY_SCHEDULES,
    PRESETS,
    RESUMABLE_CHANGES,
    RNG_MODES,
    FedConfig,
    build_config,
    config_mismatch,
    load_config_file,
)

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
    "optimizer_lifetime": "per-round (a fresh SGD optimiser every round) or per-run (one per client, momentum kept)",
    "collapse_timing": "collapse guard on the density of this forward (current) or the previous one (previous)",
    "collapse_in_eval": "run the collapse guard in evaluation too (a reset persists in the client)",
    "rng": "keyed (draws keyed by seed, round, client) or global (the reference code's sequential draws)",
    "aggregator": "mean (the method's own), median or trimmed-mean (coordinate-wise, unweighted: robust to a "
                  "minority of hostile clients)",
    "trim_fraction": "trimmed-mean: the fraction of values dropped at each end of every coordinate",
    "cohort_clip": "scale each accepted update's deviation from the global state back to this many times "
                   "the round's median deviation, per exchanged tensor (none: off; docs/security.md)",
    "cohort_against": "cut each accepted update's component against the cohort's median direction to this many "
                      "times the round's median deviation, per exchanged tensor (none: the method's default; inf: off; "
                      "docs/security.md)",
    "cohort_shift": "keep each accepted update's shift of a whole tensor (every value one way) within this many "
                    "times the round's median deviation of the cohort's median shift (none: the method's default; "
                    "inf: off; docs/security.md)",
    "update_bounds": "reject updates that no legitimate client's local SGD can reach from the global state",
    "grad_bound": "the gradient bound the update bounds assume without --clip ('none': 1000)",
    "max_failed_rounds": "stop with an error after this many rounds in a row that aggregate nothing (0: never)",
    "seed": "the run's seed (split, sampling, initial model, batches)",
    "rounds": "rounds to run (with --resume: the new total)",
}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default where it has one (not ``None``, ``False`` of a switch, or a
    value its help already states)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def _folder(text: str) -> Path:
    """A folder argument: an empty one (``--out ''``) would mean the current folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty folder name; name a folder (e.g. runs/my-run)")
    return Path(text)


def _optional(kind):
    def parse(text: str):
        return None if text.lower() in ("none", "null", "off") else kind(text)

    parse.__name__ = kind.__name__
    return parse


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
    train = sub.add_parser("train", help="run federated SpaFL or a baseline (default: the embedded digits preset)",
                           description="Run federated SpaFL or a baseline. Running the same command again "
                                       "continues an unfinished run or prints a finished one's summary.",
                           formatter_class=_HelpFormatter)
    train.add_argument("--preset", choices=sorted(PRESETS), default=None,
                       help=f"start from a preset (default {DEFAULT_PRESET}, or the config file's)")
    train.add_argument("--config", type=Path, default=None, help="a JSON or TOML file of settings")
    train.add_argument("--out", type=_folder, default=None,
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
                             formatter_class=_HelpFormatter)
    compare.add_argument("--preset", choices=sorted(PRESETS), default=None,
                         help=f"start from a preset (default {DEFAULT_PRESET}, or the config file's)")
    compare.add_argument("--config", type=Path, default=None, help="a JSON or TOML file of settings")
    compare.add_argument("--methods", type=_csv(str), default=list(METHODS), help="comma-separated methods")
    compare.add_argument("--seeds", type=_csv(int), default=[0, 1, 2], help="comma-separated seeds")
    compare.add_argument("--out", type=_folder, default=None, help="folder (default runs/compare-<preset>)")
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


def _csv(kind):
    def parse(text: str) -> list:
        items = [kind(x) for x in text.split(",") if x.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        twice = sorted({str(x) for x in items if items.count(x) > 1})
        if twice:  # a run counted twice would weigh twice in the mean and shrink the spread
            raise argparse.ArgumentTypeError(f"{', '.join(twice)} given more than once")
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
        return _fail("compare", e)
    except (FederationStalled, OSError) as e:
        print(f"spafl compare: {e}", file=sys.stderr)
        return 1
    from .compare import aggregate_runs, table_markdown

    print(table_markdown(aggregate_runs(runs)), end="")
    print(f"wrote {out / 'comparison.md'}, {out / 'comparison.csv'} and the run folders")
    return 0


def _overrides(args: argparse.Namespace) -> dict:
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(FedConfig) if getattr(args, f.name) is not None}


def _default_out(preset: str | None, config: FedConfig) -> Path:
    """``runs/<preset>[-<method>]-seed<seed>``: where ``spafl train`` writes without ``--out``."""
    tag = "" if config.method == "spafl" else f"-{config.method}"
    return Path("runs") / f"{preset or 'custom'}{tag}-seed{config.seed}"


@dataclasses.dataclass
class _Plan:
    """What ``spafl train`` does: run ``config`` into ``out``, continuing ``found`` (None: a
    new run), or only report a finished run (``finished``)."""

    config: FedConfig
    out: Path
    found: object = None  # runfolder.Resumable
    meta: dict | None = None
    finished: bool = False


def _plan_train(args: argparse.Namespace, overrides: dict) -> _Plan:
    """Decide what ``spafl train`` does with the folder it writes to (raises ``ValueError`` or
    ``FileNotFoundError`` with the message for the user; changes nothing):

    - ``--resume``: continue the run in ``--out`` (default: the default preset's folder for
      ``--method`` and ``--seed``), with its own settings; flags may change ``rounds`` and the
      other resumable settings only.
    - no run in the folder, or ``--overwrite``: a new run.
    - a run with the same settings (but the resumable ones): continue it, or, when it has done
      ``rounds`` rounds, report it (``finished``).
    - a run with other settings: refuse, naming the differences and the ways out."""
    from . import runfolder

    if args.resume:
        defaults = build_config(DEFAULT_PRESET, None, {k: v for k, v in overrides.items() if k in ("method", "seed")})
        out = args.out or _default_out(DEFAULT_PRESET, defaults)
        if not runfolder.holds_run(out, own=False):
            raise FileNotFoundError(f"--resume: no run in {out}"
                                    + ("" if args.out else " (the default folder; name the run's folder with --out)"))
        found = runfolder.open_checkpoint(out)
        saved = found.ckpt["config"]
        try:
            config = FedConfig(**{**saved, **overrides}).validate()
        except TypeError as e:
            raise runfolder.RunFolderError(f"{found.file} holds settings this spafl does not know: {e}") from e
        problems = config_mismatch(saved, config)
        if problems:
            raise ValueError(f"--resume: {out} holds a run of a different configuration; only "
                             f"{', '.join(sorted(RESUMABLE_CHANGES))} may change:\n  " + "\n  ".join(problems))
        return _Plan(config, out, found, found.meta, finished=found.rounds_done >= config.rounds)

    config, preset = _base_config(args)
    out = args.out or _default_out(preset, config)
    if args.overwrite or not runfolder.holds_run(out):
        return _Plan(config, out)
    ways_out = "pass --overwrite to replace it, or --out to write this run elsewhere"
    try:
        found = runfolder.open_checkpoint(out)
    except FileNotFoundError:  # a history without a checkpoint
        found = None
    except runfolder.RunFolderError as e:
        raise runfolder.RunFolderError(f"{e}; {ways_out}") from e
    meta = found.meta if found is not None else runfolder.read_history(out)
    saved = found.ckpt["config"] if found is not None else meta["config"]
    differences = runfolder.settings_differences(saved, config.to_dict())
    if differences:
        raise runfolder.RunFolderError(f"{out} holds a run with other settings (the run's vs now: "
                                       f"{', '.join(differences)}); {ways_out}")
    if found is None:
        if len(meta["history"]) >= config.rounds:
            return _Plan(config, out, None, meta, finished=True)
        raise runfolder.RunFolderError(f"{out} holds this run's history ({len(meta['history'])} rounds) but no "
                                       f"checkpoint to continue it from; {ways_out}")
    return _Plan(config, out, found, meta, finished=found.rounds_done >= config.rounds)


def _train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from . import runfolder
    from .engine import FederationStalled
    from .simulator import Simulator

    if args.resume and (args.preset or args.config):
        parser.error("--resume takes the run's settings from its checkpoint; drop --preset/--config")
    if args.resume and args.overwrite:
        parser.error("--resume continues the folder's run and --overwrite replaces it: pass one of them")
    overrides = _overrides(args)
    command = "spafl " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    try:
        plan = _plan_train(args, overrides)
    except (ValueError, FileNotFoundError) as e:
        return _fail("train", e)
    config, out, found = plan.config, plan.out, plan.found
    notes = found.notes if found is not None else []
    for note in notes:
        print(f"spafl train: {note}", file=sys.stderr)
    if plan.finished:
        return _report_finished(plan, command)

    policy = thread_policy(args, parser, config)
    with policy.applied():
        try:
            kwargs = dict(out_dir=out, progress=args.progress, command=command, workers=policy.workers)
            if found is not None:
                sim = Simulator.from_checkpoint(found.ckpt, config, source=found.file, **kwargs)
                if found.file.parent == Path(out):
                    runfolder.adopt(found)  # checked as the folder's run (or named so by --resume)
            else:
                sim = Simulator(config, **kwargs)
            stale = runfolder.prepare(out)  # writable, before any training and before removing anything
            removed, kept = runfolder.clear_run(out) if args.overwrite else ([], [])
        except (ValueError, FileNotFoundError) as e:
            return _fail("train", e)
        if stale:
            print(f"removed {len(stale)} temporary file(s) that interrupted writes left in {out}")
        if removed:
            print(f"--overwrite: removed the previous run's {len(removed)} file(s) from {out}"
                  + (f"; kept what is not a run's: {', '.join(p.name for p in kept)}" if kept else ""))
        cfg = sim.config
        if found is not None:
            print(f"continuing the run in {out}: {sim.round} of {cfg.rounds} rounds done")
        size = f"{sim.num_thresholds} thresholds" if cfg.method == "spafl" else f"{sim.num_weights} prunable weights"
        print(f"spafl train: {cfg.method}, {cfg.dataset} / {cfg.model}, {cfg.num_clients} clients, "
              f"{cfg.clients_per_round} per round, rounds {sim.round + 1} to {cfg.rounds}, alpha {cfg.alpha}, "
              f"device {sim.device}, {size}, run folder {out}")
        print(f"threads: {policy.describe()}")
        print(f"disk: {disk_estimate(sim.model, cfg)}")
        try:
            with warnings.catch_warnings(), sim:
                warnings.simplefilter("always")
                sim.run()
        except KeyboardInterrupt:
            print(f"spafl train: interrupted in round {sim.round + 1} of {cfg.rounds}; {_kept(out)}; run the same "
                  f"command again to continue: {command}", file=sys.stderr)
            return 130
        except FederationStalled as e:
            print(f"spafl train: stopped after round {sim.round} of {cfg.rounds}: {e}; the rounds run are saved in "
                  f"{out}", file=sys.stderr)
            return 1
        except OSError as e:
            print(f"spafl train: writing to {out} failed after round {sim.round}: {e}; the last checkpoint written "
                  "before it is kept", file=sys.stderr)
            return 1
    _print_summary(sim.summary())
    if args.plot:
        try:
            _draw(out)
        except (ValueError, OSError) as e:  # the run is saved; only its plots failed
            print(f"spafl train: the run is saved in {out}, but its plots were not drawn: {e}", file=sys.stderr)
            return 1
    return 0


def _report_finished(plan: _Plan, command: str) -> int:
    """A run that has done its rounds: say so and print its summary (from its history, or from
    its checkpoint when the history lags behind it, which is then rewritten)."""
    from .simulator import Simulator

    done = plan.found.rounds_done if plan.found is not None else len(plan.meta["history"])
    asked = f", more than the {plan.config.rounds} asked for" if done > plan.config.rounds else ""
    print(f"{plan.out} already holds this run, finished ({done} rounds{asked}); its summary follows. Pass --rounds to "
          "extend it, --overwrite to run it again, or --out for another folder.")
    summary = plan.meta.get("summary") if plan.meta is not None else None
    if plan.found is not None and (plan.meta is None or len(plan.meta["history"]) != done):
        try:
            sim = Simulator.from_checkpoint(plan.found.ckpt, plan.config, source=plan.found.file, out_dir=plan.out,
                                            command=command)
            sim.write_history()
        except (ValueError, FileNotFoundError, OSError) as e:
            return _fail("train", e)
        summary = sim.summary()
    _print_summary(summary or {})
    return 0


def disk_estimate(model, config: FedConfig) -> str:
    """What a run's checkpoints take, from the model before any training: every client's model
    state (weights, buffers, thresholds) and, with a per-run optimiser, its momentum, stored
    once the client has trained; an upper bound (clients not yet trained take less)."""
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    momentum = (sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
                if config.optimizer_lifetime == "per-run" else 0)
    per_client = state + momentum
    what = "weights, buffers and momentum" if momentum else "weights and buffers"
    return (f"each checkpoint up to {_megabytes(config.num_clients * per_client)} ({config.num_clients} clients x "
            f"{_megabytes(per_client)} of {what}, once trained); two are kept (checkpoint.pt, checkpoint.prev.pt)")


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.3g} MB"


def _kept(out: Path) -> str:
    """Where an interrupted run stands: the round of the last checkpoint in ``out``."""
    from . import runfolder

    try:
        done = runfolder.open_checkpoint(out).rounds_done
    except (FileNotFoundError, ValueError, OSError):
        return f"no checkpoint in {out} yet"
    return f"{out} holds its checkpoint after round {done}"


def _fail(command: str, error: BaseException) -> int:
    """Print ``spafl <command>: <error>`` on stderr; the exit status 2."""
    print(f"spafl {command}: {error}", file=sys.stderr)
    return 2


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
    """Redraw a run folder's plots, or a comparison folder's (``spafl compare``)."""
    if (args.run / "history.json").is_file():
        try:
            _draw(args.run)
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
