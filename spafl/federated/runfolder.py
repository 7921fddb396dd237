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
"""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
import pickletools
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .config import RESUMABLE_CHANGES, FedConfig
from .history import TAU_STATS, ClientRecord

CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"
HISTORY_FILES = ("history.json", "history.csv", "masks.npz", "clients.npz")
PLOT_FILES = ("accuracy.png", "density.png", "masks.png", "clients.png", "thresholds.png")
RUN_FILES = (*HISTORY_FILES, CHECKPOINT, PREVIOUS, *PLOT_FILES)
MANIFEST = ".spafl-run.json"
_PROBE = ".write-check"  # the writability probe's prefix

CHECKPOINT_VERSION = 2


# history.json's layout: 2 numbers rounds from 1 (the first round is round 1), 1 (no field) from 0.
HISTORY_FORMAT = 2


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
    columns = [k for k in history[0] if k not in ("layers", "errors", "tau")] if history else []
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
    ``torch.save`` reports a full disk as a ``RuntimeError`` of its archive writer."""
    if isinstance(e, OSError):
        reason = e.strerror or str(e)
        return OSError(e.errno, f"cannot write {path}: {reason}; the file it would replace is intact")
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




class RunFolderError(ValueError):
    """A run folder cannot be used as asked (not writable, another run's checkpoint, nothing
    readable to resume from); nothing in it was changed."""


def previous_path(path: Path) -> Path:
    """Where the checkpoint before ``path`` is kept: ``checkpoint.pt`` -> ``checkpoint.prev.pt``."""
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def is_temporary(name: str) -> bool:
    """A file an atomic write (or the writability probe) of a run leaves when it is killed."""
    return name.endswith(".tmp") and (name.startswith(_PROBE) or any(name.startswith(f".{f}-") for f in RUN_FILES))


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
        fd, probe = tempfile.mkstemp(dir=folder, prefix=f"{_PROBE}-", suffix=".tmp")
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


# --- reading ---------------------------------------------------------------------------------


def _load_error(file: Path, e: BaseException) -> str:
    """Why ``torch.load`` refused ``file``, in a line."""
    text = str(e)
    first = text.strip().splitlines()[0][:200] if text.strip() else ""
    if file.stat().st_size == 0:
        return "the file is empty"
    if isinstance(e, pickle.UnpicklingError):
        # A pickle that names a callable (GLOBAL / STACK_GLOBAL) is refused by name; any other
        # refusal (an opcode the restricted unpickler does not know) is a damaged or foreign file.
        lines = [ln.strip() for ln in text.splitlines() if "GLOBAL" in ln]
        if lines:
            return f"it names code to run, refused without running it ({lines[0][:200]})"
        called = _pickle_calls(file)
        if called:
            return f"it names code to run, refused without running it (a pickle that calls {called})"
        if "Unsupported operand" not in text:
            return f"refused by torch.load(weights_only=True) ({first})"
    return f"not a complete checkpoint archive: truncated, damaged or another format ({type(e).__name__}: {first})"


def _pickle_calls(file: Path, limit: int = 1 << 20) -> str | None:
    """The first callable a plain pickle in ``file`` imports and calls (``"module.name"``), or
    None: its opcodes are read with :func:`pickletools.genops`, which runs nothing. Only for
    the message: ``torch.load(weights_only=True)`` has refused the file already (it stops at
    the first opcode it does not support, before naming anything)."""
    try:
        with file.open("rb") as f:
            data = f.read(limit)
    except OSError:
        return None
    strings, imported = [], None
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                strings.append(str(arg))
            elif op.name == "GLOBAL":
                imported = str(arg).replace(" ", ".")
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                imported = f"{strings[-2]}.{strings[-1]}"
            elif op.name in ("REDUCE", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX") and imported:
                return imported[:200]
    except Exception:  # noqa: BLE001 (not a pickle, or a damaged one: nothing to name)
        return None
    return None


def load_file(file: str | Path, what: str = "checkpoint") -> object:
    """``torch.load(file, weights_only=True)`` (tensors, plain containers and numbers only: a
    file cannot run code here); :class:`RunFolderError` naming the file and why it could not be
    read (empty, truncated, another format, code in it)."""
    file = Path(file)
    try:
        with warnings.catch_warnings():  # torch's note on the pickle protocol of a foreign file
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (a hostile file can make torch.load raise anything)
        raise RunFolderError(f"{file} is not a {what} this spafl can read: {_load_error(file, e)} (version "
                             f"{CHECKPOINT_VERSION} files hold tensors and plain containers only)") from e


ENGINES = {"simulator": "the simulator (spafl train)", "flower": "spafl's Flower server (flwr run)"}


def read_checkpoint(file: str | Path, engine: str = "simulator") -> dict:
    """A checkpoint of ``engine`` (``"simulator"`` or ``"flower"``), read with
    :func:`load_file`. ``FileNotFoundError`` when absent, :class:`RunFolderError` naming the
    file when it is unreadable, crafted, another engine's or of another version."""
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"no checkpoint at {file}")
    ckpt = load_file(file)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("config"), dict):
        raise RunFolderError(f"{file} is not a {engine} checkpoint")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise RunFolderError(f"{file}: checkpoint version {ckpt.get('version')!r}; this spafl reads "
                             f"{CHECKPOINT_VERSION}")
    written_by = ckpt.get("engine", "simulator")
    if written_by != engine:
        raise RunFolderError(f"{file} was written by {ENGINES.get(written_by, written_by)}; continue that run "
                             "there")
    rows, server = ckpt.get("history"), ckpt.get("server")
    done = server.get("round") if isinstance(server, dict) else None
    if not isinstance(rows, list) or isinstance(done, bool) or not isinstance(done, int):
        raise RunFolderError(f"{file} is not a {engine} checkpoint (no history rows or server round)")
    numbers = [r.get("round") if isinstance(r, dict) else None for r in rows]
    if numbers != list(range(1, done + 1)):
        raise RunFolderError(f"{file} is inconsistent: its server is after round {done} but its history holds "
                             f"{len(rows)} row(s) (rounds {numbers[:5]}{' ...' if len(rows) > 5 else ''}); "
                             "refused, so that no round of the history is lost")
    return ckpt


def read_history(folder: str | Path) -> dict | None:
    """``folder/history.json`` (None when absent); :class:`RunFolderError` naming it when it
    cannot be read."""
    file = Path(folder) / "history.json"
    if not file.is_file():
        return None
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise RunFolderError(f"{file} is not readable ({type(e).__name__}: {e}); move it away to use this "
                             "folder") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict) \
            or not isinstance(meta.get("history"), list):
        raise RunFolderError(f"{file} is not a run's history (no config and rows)")
    return meta


def settings_differences(a: dict, b: dict, ignore=RESUMABLE_CHANGES) -> list[str]:
    """``"name: x vs y"`` for every setting (but ``ignore``) two runs' configs differ in; a
    setting one of them lacks counts as its default."""
    defaults = FedConfig().to_dict()
    a, b = {**defaults, **a}, {**defaults, **b}
    return [f"{k} {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if k not in ignore and a.get(k) != b.get(k)]


def identity_problems(ckpt: dict, meta: dict, engine: str = "simulator") -> list[str]:
    """How checkpoint ``ckpt`` differs from the run whose history is ``meta`` (empty: the same
    run): its run id, settings (but the resumable ones), data split, engine, and the rounds the
    two have in common (their numbers and cohorts)."""
    problems = []
    if meta.get("engine", "simulator") != engine:
        problems.append(f"the history was written by spafl's {meta.get('engine')} server")
    ours, theirs = ckpt.get("run_id"), meta.get("run_id")
    if ours and theirs and ours != theirs:
        problems.append(f"run id {ours} vs the history's {theirs}")
    differences = settings_differences(ckpt["config"], meta["config"])
    if differences:
        problems.append("settings differ (checkpoint vs history): " + ", ".join(differences))
    if meta.get("split_digest") and ckpt.get("split_digest") != meta["split_digest"]:
        problems.append("the data split differs")
    rows = ckpt.get("history")
    for mine, row in zip(rows if isinstance(rows, list) else [], meta["history"], strict=False):
        key = lambda r: (r.get("round"), r.get("sampled")) if isinstance(r, dict) else r  # noqa: E731
        if key(mine) != key(row):
            problems.append(f"the rounds they share differ (checkpoint {key(mine)!r} vs history {key(row)!r})")
            break
    return problems


@dataclass
class Resumable:
    """What a run folder can be continued from: the checkpoint (``ckpt``, read from ``file``),
    the folder's history (``meta``, None without one) and ``notes`` for the user (an unreadable
    newest checkpoint, the fallback taken)."""

    ckpt: dict
    file: Path
    meta: dict | None
    notes: list[str] = field(default_factory=list)

    @property
    def rounds_done(self) -> int:
        return len(self.ckpt.get("history", []))


def open_checkpoint(path: str | Path, history_folder: str | Path | None = None,
                    engine: str = "simulator") -> Resumable:
    """The checkpoint to resume from and the run it must continue.

    ``path`` is a checkpoint file (read as it is) or a run folder: then its ``checkpoint.pt``,
    or, when that is missing or unreadable (empty, truncated, not an archive, crafted), the
    previous one, ``checkpoint.prev.pt``, with a note saying so and from which round. The
    checkpoint must be the run of ``history_folder``'s ``history.json`` (default: the
    checkpoint's folder), :func:`identity_problems`; otherwise :class:`RunFolderError` (no
    fallback to another file: it is not this run's) and nothing is changed."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    history_folder = Path(history_folder) if history_folder is not None else folder
    meta = read_history(history_folder)
    candidates = [folder / CHECKPOINT, folder / PREVIOUS] if path.is_dir() else [path]
    notes, errors = [], []
    for file in candidates:
        if not file.is_file():
            if path.is_dir() and file.name == CHECKPOINT and (folder / PREVIOUS).is_file():
                notes.append(f"{file} is missing")
            continue
        try:
            ckpt = read_checkpoint(file, engine)
        except RunFolderError as e:
            if not path.is_dir():
                raise
            errors.append(str(e))
            notes.append(str(e))
            continue
        if meta is not None:
            problems = identity_problems(ckpt, meta, engine)
            if problems:
                raise RunFolderError(f"{file} is not the checkpoint of the run in {history_folder / 'history.json'}: "
                                     f"{'; '.join(problems)}. Nothing was changed; move one of them away, or "
                                     "continue the checkpoint in another folder")
        if file.name == PREVIOUS and path.is_dir():
            done = len(ckpt.get("history", []))
            ahead = len(meta["history"]) - done if meta is not None else 0
            notes.append(f"resuming from the previous checkpoint {file} (after round {done})"
                         + (f"; rounds {done + 1} to {done + ahead} of the history will be run again"
                            if ahead > 0 else ""))
        return Resumable(ckpt, file, meta, notes)
    if errors:
        raise RunFolderError(f"no readable checkpoint in {folder}: " + "; ".join(errors))
    raise FileNotFoundError(f"no checkpoint in {folder}" if path.is_dir() else f"no checkpoint at {path}")


def warn_notes(notes: list[str], log: Callable[[str], None] | None = None) -> None:
    """Pass ``notes`` to ``log``, or warn them (:class:`CheckpointWarning`)."""
    for note in notes:
        if log is not None:
            log(note)
        else:
            warnings.warn(note, CheckpointWarning, stacklevel=3)


def read_client_state(file: str | Path) -> tuple[dict | None, list[str]]:
    """A Flower client's state file (``partition-<p>.pt``, :func:`save_checkpoint` keeps the one
    before it beside it) and notes for the user: the newest file, or, when it is unreadable, the
    previous one (with a note naming both). ``(None, [])`` when neither exists;
    :class:`RunFolderError` naming the files when neither can be read."""
    file = Path(file)
    errors, notes = [], []
    for candidate in (file, previous_path(file)):
        if not candidate.is_file():
            continue
        try:
            record = load_file(candidate, "client state file")
            if not isinstance(record, dict) or not isinstance(record.get("config"), dict) \
                    or not isinstance(record.get("round"), int):
                raise RunFolderError(f"{candidate} is not a client state file of spafl's Flower client")
        except RunFolderError as e:
            errors.append(str(e))
            continue
        if candidate != file:
            notes.append(f"{'; '.join(errors) or f'{file} is missing'}; using the previous state {candidate} "
                         f"(after round {record['round'] + 1})")
        return record, notes
    if errors:
        raise RunFolderError("; ".join(errors) + "; move the file away to start this client again")
    return None, []


class CheckpointWarning(UserWarning):
    """The newest checkpoint could not be used and an older one was (the run goes on)."""
