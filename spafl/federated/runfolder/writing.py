"""Writing a run folder: every file atomically (the file it replaces intact until the new one
is durable; the previous checkpoint kept), the manifest of the files this project wrote, the
checks before a run writes (no foreign file replaced, writable, stale temporaries removed), and
what ``--overwrite`` removes."""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..history import TAU_STATS, ClientRecord
from .layout import (
    CHECKPOINT,
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
from .reading import Resumable, read_history


def write_history(out: Path, meta: dict, history: list[dict], layer_names: list[str],
                  mask_history: list[np.ndarray] | None = None, mask_layer: str | None = None,
                  clients: ClientRecord | None = None) -> None:
    """``history.csv`` (one row per round; per-layer densities as ``density:<layer>`` columns,
    the global thresholds' statistics as ``tau:<layer>:<mean|std|min|max>``), ``history.json``
    (``meta`` plus the rows, the thresholds' statistics as ``tau: {layer: {stat: value}}``),
    ``masks.npz`` (when there are masks) and ``clients.npz`` (with ``clients``: every client's
    numbers every round, :class:`ClientRecord`), each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    body = {**meta, "history_format": HISTORY_FORMAT, "history": history}
    atomic_write(out / "history.json", lambda f: f.write(json.dumps(body, indent=1).encode()))
    # every row's columns in the order they first appear (a column only some rounds have, as
    # ``rolled_back_to``, is empty in the others)
    columns = list(dict.fromkeys(k for row in history for k in row if k not in ("layers", "errors", "tau")))
    columns += [f"density:{name}" for name in layer_names]
    tau_layers = list(history[0].get("tau", {})) if history else []
    columns += [f"tau:{name}:{stat}" for name in tau_layers for stat in TAU_STATS]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in history:
        flat = {k: row[k] for k in columns if k in row}
        flat.update({f"density:{k}": v for k, v in row["layers"].items()})
        flat.update({f"tau:{k}:{stat}": v[stat] for k, v in row.get("tau", {}).items() for stat in TAU_STATS})
        writer.writerow(flat)
    atomic_write(out / "history.csv", lambda f: f.write(buffer.getvalue().encode()))
    if mask_history:
        masks = np.stack(mask_history)
        rounds = np.array([r["round"] for r in history])
        atomic_write(out / "masks.npz", lambda f: np.savez_compressed(f, masks=masks, rounds=rounds, layer=mask_layer))
    if clients is not None and len(clients):
        arrays = clients.arrays()
        atomic_write(out / "clients.npz", lambda f: np.savez_compressed(f, **arrays))


def atomic_write(path: Path, write: Callable, keep_previous: Path | None = None) -> None:
    """``write(file)`` into a temporary file beside ``path``, fsync it, rename it over ``path``
    and fsync the folder: a crash leaves either the old file or the new one, never a partial
    one. With ``keep_previous``, the file being replaced stays there under that name (a hard
    link made before the rename, or the old file renamed where links are not supported)."""
    if path.name in RUN_FILES:  # listed before it exists: a crash leaves no unlisted file of ours
        _record(path.parent, [path.name] + ([keep_previous.name] if keep_previous is not None else []))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous is not None and path.is_file():
            keep_previous.unlink(missing_ok=True)
            try:
                os.link(path, keep_previous)  # path stays in place: there is a checkpoint at every moment
            except OSError:
                os.replace(path, keep_previous)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        failure = _write_failure(path, e)
        if failure is not None:
            raise failure from e
        raise
    fsync_dir(path.parent)  # make the rename durable


def _write_failure(path: Path, e: BaseException) -> OSError | None:
    """A failed write of ``path`` as one :class:`OSError` naming it (None: not a write failure).
    ``torch.save`` reports a full disk as a ``RuntimeError`` of its archive writer, either alone or
    raised while closing the archive after the ``OSError`` itself (then found in the chain)."""
    cause, chain = e, 0
    while cause is not None and chain < 8:  # (bounded: a chain can loop)
        if isinstance(cause, OSError):
            reason = cause.strerror or str(cause)
            return OSError(cause.errno, f"cannot write {path}: {reason}; the file it would replace is intact")
        cause, chain = cause.__cause__ or cause.__context__, chain + 1
    if isinstance(e, RuntimeError) and "write" in str(e).lower():
        first = str(e).strip().splitlines()[0][:200]
        return OSError(None, f"cannot write {path}: {first} (a full disk or a file size limit?); the file it "
                       "would replace is intact")
    return None


def own_files(folder: str | Path) -> set[str]:
    """The names of the run files this project wrote in ``folder``: those its manifest lists. A
    folder written before the manifest existed counts as this project's when its
    ``history.json`` is a run's history with a run id: then the history and checkpoint files
    (not the plots, which carry no mark: continuing the run adopts them, :func:`adopt`)."""
    folder = Path(folder)
    try:
        listed = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        if isinstance(listed, dict) and isinstance(listed.get("files"), list):
            return {n for n in listed["files"] if isinstance(n, str) and n in RUN_FILES}
    except (OSError, UnicodeDecodeError, ValueError):
        pass
    try:
        meta = read_history(folder)
    except RunFolderError:
        return set()
    if meta is not None and isinstance(meta.get("run_id"), str):
        return {n for n in (*HISTORY_FILES, CHECKPOINT, PREVIOUS) if (folder / n).is_file()}
    return set()


def foreign_files(folder: str | Path) -> list[Path]:
    """The files of ``folder`` named like a run's files that this project did not write there
    (not in its manifest): a run would overwrite them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    ours = own_files(folder)
    return [folder / n for n in RUN_FILES if n not in ours and (folder / n).exists()]


def _record(folder: Path, names: list[str]) -> None:
    """Add ``names`` to ``folder``'s manifest (written atomically)."""
    folder.mkdir(parents=True, exist_ok=True)
    ours = own_files(folder)
    if set(names) <= ours and (folder / MANIFEST).is_file():
        return
    body = json.dumps({"written_by": "spafl", "files": sorted(ours | set(names))}, indent=1).encode()
    atomic_write(folder / MANIFEST, lambda f: f.write(body))


def fsync_dir(folder: Path) -> None:
    """fsync a folder, so that a rename or removal in it survives a crash (where the
    platform allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)




def holds_run(folder: str | Path, own: bool = True) -> bool:
    """Whether ``folder`` holds a run: a history or a checkpoint (that this project wrote
    there, with ``own``)."""
    folder = Path(folder)
    ours = own_files(folder) if own and folder.is_dir() else set(RUN_FILES)
    return any(name in ours and (folder / name).is_file() for name in ("history.json", CHECKPOINT, PREVIOUS))


def adopt(found: Resumable) -> None:
    """Record in the manifest of its folder the files of a run that is being continued there
    (``--resume`` names them the run's; :func:`open_checkpoint` checked the checkpoint against
    the history): its checkpoint files and, when it has one, its history files."""
    folder = found.file.parent
    names = [n for n in (CHECKPOINT, PREVIOUS) if (folder / n).is_file()]
    if found.meta is not None:
        names += [n for n in (*HISTORY_FILES, *PLOT_FILES) if (folder / n).is_file()]
    _record(folder, names)


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Remove the temporary files killed writes left in ``folder``; return them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = sorted(p for p in folder.iterdir() if is_temporary(p.name) and p.is_file())
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def check_writable(folder: str | Path) -> None:
    """Create ``folder`` if needed and write, fsync and remove a probe file there; raise
    :class:`RunFolderError` naming the folder when that fails (before any training)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"the run folder {folder} is a file, not a folder; nothing was trained")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=f"{PROBE_PREFIX}-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(b"spafl")
                f.flush()
                os.fsync(f.fileno())
        finally:
            os.unlink(probe)
    except OSError as e:
        raise RunFolderError(f"the run folder {folder} is not writable ({e.strerror or e}); nothing was "
                             "trained") from e


def check_foreign(folder: str | Path) -> None:
    """:class:`RunFolderError` naming the files of ``folder`` a run would overwrite that this
    project did not write (:func:`foreign_files`)."""
    foreign = foreign_files(folder)
    if foreign:
        names = ", ".join(p.name for p in foreign)
        raise RunFolderError(f"{Path(folder)} holds {names}, not written by a spafl run there (no record of "
                             f"it in {MANIFEST}); a run would overwrite it. Nothing was changed: move it away, "
                             "or choose another folder with --out")


def prepare(folder: str | Path) -> list[Path]:
    """Before a run writes to ``folder``: refuse a folder holding files of a run's names that
    this project did not write (:func:`check_foreign`), check it is writable, remove stale
    temporary files (returned)."""
    check_foreign(folder)
    check_writable(folder)
    return remove_stale_temporaries(folder)


def clear_run(folder: str | Path) -> tuple[list[Path], list[Path]]:
    """Remove the files of a run this project wrote in ``folder`` (those its manifest lists,
    :func:`own_files`, the temporaries of its writes, then the manifest), nothing else; return
    ``(removed, kept)``, ``kept`` being what else the folder holds (a file named like a run's
    file that the manifest does not list is kept)."""
    folder = Path(folder)
    if not folder.is_dir():
        return [], []
    ours = own_files(folder)
    removed, kept = [], []
    for p in sorted(folder.iterdir()):
        if p.name == MANIFEST:
            continue
        if p.is_file() and (p.name in ours or is_temporary(p.name)):
            p.unlink()
            removed.append(p)
        else:
            kept.append(p)
    (folder / MANIFEST).unlink(missing_ok=True)
    fsync_dir(folder)
    return removed, kept


def save_checkpoint(path: Path, state: dict) -> Path:
    """``torch.save(state)`` to ``path`` atomically, keeping the checkpoint it replaces as
    :func:`previous_path` until the new one is written, fsync'd and renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: torch.save(state, f), keep_previous=previous_path(path))
    return path


