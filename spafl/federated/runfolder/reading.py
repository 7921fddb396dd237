"""Reading a run folder: checkpoints and client state files with ``torch.load(weights_only=True)``
(a crafted file cannot run code; an unreadable one is named, with why), the history, whether a
checkpoint is the folder's own run, and which checkpoint to resume from (the newest readable
one, else the previous one, with a note)."""

from __future__ import annotations

import json
import pickle
import pickletools
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import RESUMABLE_CHANGES, FedConfig
from .layout import CHECKPOINT, CHECKPOINT_VERSION, PREVIOUS, RunFolderError, previous_path


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
