"""What a run folder holds: the names of a run's files, the formats' versions, and the error a
folder that cannot be used raises (the table is in :mod:`spafl.federated.runfolder`)."""

from __future__ import annotations

from pathlib import Path

CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"
HISTORY_FILES = ("history.json", "history.csv", "masks.npz", "clients.npz")
PLOT_FILES = ("accuracy.png", "density.png", "masks.png", "clients.png", "thresholds.png")
RUN_FILES = (*HISTORY_FILES, CHECKPOINT, PREVIOUS, *PLOT_FILES)
MANIFEST = ".spafl-run.json"
PROBE_PREFIX = ".write-check"  # the writability probe's prefix

CHECKPOINT_VERSION = 2


# history.json's layout: 2 numbers rounds from 1 (the first round is round 1), 1 (no field) from 0.
HISTORY_FORMAT = 2


class RunFolderError(ValueError):
    """A run folder cannot be used as asked (not writable, another run's checkpoint, nothing
    readable to resume from); nothing in it was changed."""


def previous_path(path: Path) -> Path:
    """Where the checkpoint before ``path`` is kept: ``checkpoint.pt`` -> ``checkpoint.prev.pt``."""
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def is_temporary(name: str) -> bool:
    """A file an atomic write (or the writability probe) of a run leaves when it is killed."""
    return name.endswith(".tmp") and (name.startswith(PROBE_PREFIX)
                                      or any(name.startswith(f".{f}-") for f in RUN_FILES))
