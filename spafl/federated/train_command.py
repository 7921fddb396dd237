"""``spafl train``: decide what to do with the run folder (start, continue, report a finished
run, or refuse, naming the differences), run the simulator, and print the summary."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import warnings
from pathlib import Path

from .config import (
    DEFAULT_PRESET,
    RESUMABLE_CHANGES,
    FedConfig,
    build_config,
    config_mismatch,
)
from .flags import base_config, config_overrides, fail, thread_policy


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


def plan_train(args: argparse.Namespace, overrides: dict) -> _Plan:
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

    config, preset = base_config(args)
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


def train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from . import runfolder
    from .engine import FederationStalled
    from .simulator import Simulator

    if args.resume and (args.preset or args.config):
        parser.error("--resume takes the run's settings from its checkpoint; drop --preset/--config")
    if args.resume and args.overwrite:
        parser.error("--resume continues the folder's run and --overwrite replaces it: pass one of them")
    overrides = config_overrides(args)
    command = "spafl " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    try:
        plan = plan_train(args, overrides)
    except (ValueError, FileNotFoundError) as e:
        return fail("train", e)
    config, out, found = plan.config, plan.out, plan.found
    notes = found.notes if found is not None else []
    for note in notes:
        print(f"spafl train: {note}", file=sys.stderr)
    if plan.finished:
        return report_finished(plan, command)

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
            return fail("train", e)
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
    print_summary(sim.summary())
    if args.plot:
        try:
            draw_plots(out)
        except (ValueError, OSError) as e:  # the run is saved; only its plots failed
            print(f"spafl train: the run is saved in {out}, but its plots were not drawn: {e}", file=sys.stderr)
            return 1
    return 0


def report_finished(plan: _Plan, command: str) -> int:
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
            return fail("train", e)
        summary = sim.summary()
    print_summary(summary or {})
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


def print_summary(s: dict) -> None:
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


def draw_plots(run: Path) -> None:
    try:
        from .plots import plot_run
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install matplotlib)")
        return
    for path in plot_run(run):
        print(f"wrote {path}")


