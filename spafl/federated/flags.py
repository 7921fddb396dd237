"""What the command line's flags build, shared by its commands: the run's settings (preset <
``--config`` file < flags), the thread flags and policy, the argument types and the help
layout. The flags of the :class:`FedConfig` fields are declared in :mod:`.cli`."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from .._threads import ThreadPolicy
from .config import (
    DEFAULT_PRESET,
    FedConfig,
    build_config,
    load_config_file,
)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default where it has one (not ``None``, ``False`` of a switch, or a
    value its help already states)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def folder_arg(text: str) -> Path:
    """A folder argument: an empty one (``--out ''``) would mean the current folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty folder name; name a folder (e.g. runs/my-run)")
    return Path(text)


def optional_value(kind, off=None):
    """A parser of an optional setting: "none" / "null" give None; "off" gives ``off`` (None where
    None turns the setting off; ``float("inf")`` for the limits whose None is the method's
    default)."""
    def parse(text: str):
        if text.lower() == "off":
            return off
        return None if text.lower() in ("none", "null") else kind(text)

    parse.__name__ = kind.__name__
    return parse


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


def csv_list(kind):
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


def base_config(args: argparse.Namespace) -> tuple[FedConfig, str | None]:
    file_values = load_config_file(args.config) if args.config else {}
    preset = args.preset or (None if "preset" in file_values else DEFAULT_PRESET)
    return build_config(preset, file_values, config_overrides(args)), preset or file_values.get("preset")


def config_overrides(args: argparse.Namespace) -> dict:
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(FedConfig) if getattr(args, f.name) is not None}


def fail(command: str, error: BaseException) -> int:
    """Print ``spafl <command>: <error>`` on stderr; the exit status 2."""
    print(f"spafl {command}: {error}", file=sys.stderr)
    return 2


