"""A run folder: the files a run writes there, the checks before it writes, its two newest
checkpoints, and what ``--overwrite`` removes.

=====================================  ======================================================
``history.json``, ``history.csv``,     the history (:func:`write_history`); the JSON
``masks.npz``, ``clients.npz``         also holds the settings, the split's digest and the run id
``checkpoint.pt``                      the newest checkpoint
``checkpoint.prev.pt``                 the one before it, kept until the newest is durable
``accuracy.png`` ... ``thresholds.png``  the plots (:data:`PLOT_FILES`)
``.<file>-<random>.tmp``               a write in progress (left only by a killed process)
``.spafl-run.json``                    the manifest: the files above that this project wrote
                                       here (:func:`own_files`)
=====================================  ======================================================

A run writes a file only where the folder holds no file of that name that this project did not
write (:func:`foreign_files`, checked by :func:`prepare`); ``--overwrite`` removes only the files
the manifest lists (:func:`clear_run`). A failed write (a full disk, no permission) is an
:class:`OSError` naming the file, and the file it would have replaced is intact.

Every file is written atomically (a temporary file, fsync'd, renamed over the old one, the
folder fsync'd). A checkpoint is read with ``torch.load(weights_only=True)``: a crafted file
cannot run code. A run is identified by the run id it draws when it starts (in the checkpoint
and in ``history.json``), its settings and its data split: a checkpoint that is not the
folder's own run is refused before anything in the folder changes.

The names of the files are in :mod:`.layout`, reading them in :mod:`.reading`, writing them
in :mod:`.writing`.
"""

from .layout import (
    CHECKPOINT,
    CHECKPOINT_VERSION,
    HISTORY_FILES,
    HISTORY_FORMAT,
    MANIFEST,
    PLOT_FILES,
    PREVIOUS,
    PROBE_PREFIX,
    RUN_FILES,
    RunFolderError,
    is_temporary,
    previous_path,
)
from .reading import (
    ENGINES,
    CheckpointWarning,
    Resumable,
    identity_problems,
    load_file,
    open_checkpoint,
    read_checkpoint,
    read_client_state,
    read_history,
    settings_differences,
    warn_notes,
)
from .writing import (
    adopt,
    atomic_write,
    check_foreign,
    check_writable,
    clear_run,
    foreign_files,
    fsync_dir,
    holds_run,
    own_files,
    prepare,
    remove_stale_temporaries,
    save_checkpoint,
    write_history,
)

__all__ = [
    "CHECKPOINT",
    "CHECKPOINT_VERSION",
    "CheckpointWarning",
    "ENGINES",
    "HISTORY_FILES",
    "HISTORY_FORMAT",
    "MANIFEST",
    "PLOT_FILES",
    "PROBE_PREFIX",
    "PREVIOUS",
    "RUN_FILES",
    "Resumable",
    "RunFolderError",
    "adopt",
    "atomic_write",
    "check_foreign",
    "check_writable",
    "clear_run",
    "foreign_files",
    "fsync_dir",
    "holds_run",
    "identity_problems",
    "is_temporary",
    "load_file",
    "open_checkpoint",
    "own_files",
    "prepare",
    "previous_path",
    "read_checkpoint",
    "read_client_state",
    "read_history",
    "remove_stale_temporaries",
    "save_checkpoint",
    "settings_differences",
    "warn_notes",
    "write_history",
]
