"""A no-op stand-in for ``wandb`` (Weights & Biases), for running the SpaFL authors' code offline.

Only what their FMNIST code calls: ``wandb.init(...)`` returning a run, ``wandb.log(dict)``,
``wandb.finish()``. Nothing is recorded: the side-by-side script reads the per-round figures
from the authors' own log file.
"""

from __future__ import annotations

__version__ = "0+spafl.shim"


class Run:
    """What ``wandb.init`` returns: ``config`` (the dict it was given), ``log``, ``finish``."""

    def __init__(self, config: dict | None = None, **settings):
        self.config = dict(config or {})
        self.settings = settings

    def log(self, data: dict, *args, **kwargs) -> None:
        if not isinstance(data, dict):
            raise TypeError(f"wandb.log expects a dict, got {type(data).__name__}")

    def finish(self, *args, **kwargs) -> None:
        pass


run: Run | None = None
config: dict = {}


def init(*args, **kwargs) -> Run:
    global run, config
    run = Run(kwargs.pop("config", None), **kwargs)
    config = run.config
    return run


def log(data: dict, *args, **kwargs) -> None:
    (run or Run()).log(data, *args, **kwargs)


def finish(*args, **kwargs) -> None:
    global run
    run = None
