"""Run folders and the command line around them: a rerunnable ``spafl train``, checkpoints that
cannot run code, belong to their folder's run and fall back to the previous one, ``--overwrite``,
the write check before training, and one-line errors; each issue reproduction is a test."""

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from test_federated import small_config, synthetic

from spafl.cli import main
from spafl.federated import FedConfig, FederatedWarning, Simulator, runfolder
from spafl.federated.build import resolve_device
from spafl.federated.config import PRESETS
from spafl.federated.runfolder import CheckpointWarning, RunFolderError

TINY = ["--num-clients", "6", "--clients-per-round", "3", "--local-epochs", "1", "--no-progress", "--no-plot",
        "--device", "cpu", "--workers", "1"]


def train(*args: str) -> int:
    return main(["train", *TINY, *args])


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


class _Payload:
    """Pickles to a call of os.system: what a crafted checkpoint carries."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _run(folder: Path, rounds: int, **changes) -> Simulator:
    sim = Simulator(small_config(rounds=rounds, **changes), dataset=synthetic(n_train=200, n_test=50),
                    out_dir=folder)
    sim.run()
    return sim


# --- the quick start, run twice ------------------------------------------------------------------


def test_the_quick_start_command_runs_twice_with_the_same_summary(tmp_path, monkeypatch, capsys):
    """The second ``python -m spafl train`` used to fail ("already holds a run"); the advice it
    gave (``--resume``) failed too ("--resume needs --out"). The preset is shortened to 3
    rounds here; the command is the quick start's."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(PRESETS, "digits-cnn", {**PRESETS["digits-cnn"], "rounds": 3, "num_clients": 6,
                                                "clients_per_round": 3, "local_epochs": 1})
    assert main(["train"]) == 0
    first = capsys.readouterr().out
    run = Path("runs/digits-cnn-seed0")
    summary = [line for line in first.splitlines() if line.startswith(("rounds 3:", "density "))]
    assert len(summary) == 2 and (run / "accuracy.png").is_file()
    before = files(run)
    assert main(["train"]) == 0
    second = capsys.readouterr().out
    assert "already holds this run, finished (3 rounds)" in second
    assert [line for line in second.splitlines() if line.startswith(("rounds 3:", "density "))] == summary
    assert files(run) == before  # nothing trained, nothing rewritten
    # --resume without --out: the default folder
    assert main(["train", "--resume"]) == 0
    assert "finished (3 rounds)" in capsys.readouterr().out
    # more rounds: the same command continues the run
    assert main(["train", "--rounds", "4", "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert "continuing the run in runs/digits-cnn-seed0: 3 of 4 rounds done" in out and "rounds 4:" in out
    history = json.loads((run / "history.json").read_text())
    assert [r["round"] for r in history["history"]] == [1, 2, 3, 4]


def test_a_run_with_other_settings_is_refused_naming_them_and_the_ways_out(tmp_path, capsys):
    out = tmp_path / "run"
    assert train("--rounds", "1", "--out", str(out)) == 0
    capsys.readouterr()
    before = files(out)
    assert train("--rounds", "1", "--out", str(out), "--lr", "0.1", "--alpha", "2") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "holds a run with other settings (the run's vs now: alpha 0.5 vs 2.0, lr 0.05 vs 0.1)" in err
    assert "pass --overwrite to replace it, or --out to write this run elsewhere" in err
    assert files(out) == before
    assert train("--out", str(out), "--resume", "--lr", "0.5") == 2
    assert "different configuration" in capsys.readouterr().err and files(out) == before
    assert train("--out", str(tmp_path / "none"), "--resume") == 2
    assert "--resume: no run in" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train("--out", str(out), "--resume", "--overwrite")
    assert "pass one of them" in capsys.readouterr().err


# --- checkpoints: no code, the folder's own run, the previous one as fallback ---------------------


@pytest.mark.parametrize("form", ["zip", "pickle"])
def test_a_crafted_checkpoint_runs_no_code(tmp_path, capsys, form):
    """The reproduction: a checkpoint.pt with an embedded payload executed it on --resume."""
    out = tmp_path / "run"
    marker = tmp_path / "pwned"
    out.mkdir()
    evil = {"version": 2, "config": {}, "x": _Payload(marker)}
    if form == "zip":
        torch.save(evil, out / "checkpoint.pt")
    else:
        (out / "checkpoint.pt").write_bytes(pickle.dumps(evil))
    assert train("--out", str(out), "--resume") == 2
    err = capsys.readouterr().err
    assert f"{out / 'checkpoint.pt'} is not a checkpoint this spafl can read: it names code to run" in err
    assert not marker.exists()
    assert train("--out", str(out)) == 2  # the same command without --resume
    err = capsys.readouterr().err  # not this project's file: moved away by the user, never removed by spafl
    assert "checkpoint.pt, not written by a spafl run" in err and "--overwrite" not in err and not marker.exists()
    with pytest.raises(RunFolderError, match="refused without running it"):
        runfolder.read_checkpoint(out / "checkpoint.pt")
    assert not marker.exists()


def test_another_runs_checkpoint_is_refused_and_the_history_kept(tmp_path, capsys):
    """The reproduction: a checkpoint of another configuration copied into a run folder was
    adopted by --resume and replaced the folder's 10-row history with its 6 rows."""
    mine, other, twin = tmp_path / "mine", tmp_path / "other", tmp_path / "twin"
    assert train("--rounds", "3", "--out", str(mine)) == 0
    assert train("--rounds", "2", "--out", str(other), "--seed", "1") == 0
    assert train("--rounds", "2", "--out", str(twin)) == 0  # the same settings, another run
    capsys.readouterr()
    for source, match in [(other, r"run id .* vs the history's .*settings differ.*seed 1 vs 0"),
                          (twin, r"run id [0-9a-f]+ vs the history's [0-9a-f]+")]:
        shutil.copy(source / "checkpoint.pt", mine / "checkpoint.pt")
        before = files(mine)
        assert train("--out", str(mine), "--resume", "--rounds", "4") == 2
        err = capsys.readouterr().err
        assert f"{mine / 'checkpoint.pt'} is not the checkpoint of the run in {mine / 'history.json'}" in err
        assert "Nothing was changed" in err
        assert re.search(match, err), err
        assert files(mine) == before
        with pytest.raises(RunFolderError, match="is not the checkpoint of the run"):
            Simulator.resume(mine, dataset=synthetic())
        assert files(mine) == before
        assert len(json.loads((mine / "history.json").read_text())["history"]) == 3


def test_an_unreadable_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    """The reproduction: a truncated or zero-byte checkpoint gave a raw EOFError /
    PytorchStreamReader traceback naming no file, and no older checkpoint was kept."""
    data = synthetic(n_train=200, n_test=50)
    folder = tmp_path / "run"
    full = _run(tmp_path / "full", 4, checkpoint_every=1)
    sim = _run(folder, 3, checkpoint_every=1)
    prev = runfolder.read_checkpoint(folder / "checkpoint.prev.pt")
    assert len(prev["history"]) == 2 and prev["run_id"] == sim.run_id
    good = (folder / "checkpoint.pt").read_bytes()
    for damage, reason in [(b"", "the file is empty"),
                           (good[: len(good) // 2], "not a complete checkpoint archive: truncated"),
                           (good[:100], "not a complete checkpoint archive: truncated"),
                           (b"not a zip file" * 10, "not a complete checkpoint archive")]:
        (folder / "checkpoint.pt").write_bytes(damage)
        with pytest.warns(CheckpointWarning) as caught:
            resumed = Simulator.resume(folder, small_config(rounds=4, checkpoint_every=1), dataset=data)
        notes = [str(w.message) for w in caught]
        assert any(f"{folder / 'checkpoint.pt'} is not a checkpoint this spafl can read: {reason}" in n
                   for n in notes), notes
        assert any(f"resuming from the previous checkpoint {folder / 'checkpoint.prev.pt'} (after round 2); "
                   "rounds 3 to 3 of the history will be run again" in n for n in notes), notes
        assert resumed.round == 2 and resumed.run_id == sim.run_id
    resumed.run()
    strip = lambda h: [{k: v for k, v in r.items() if k not in ("wall_s", "train_s", "eval_s")} for r in h]  # noqa: E731
    assert strip(resumed.history) == strip(full.history)  # the rounds run again are the same rounds
    # both unreadable: a clear error naming both files
    (folder / "checkpoint.pt").write_bytes(b"")
    (folder / "checkpoint.prev.pt").write_bytes(b"")
    with pytest.raises(RunFolderError, match=r"no readable checkpoint in .*checkpoint.pt is not .*"
                                             r"checkpoint.prev.pt is not"):
        Simulator.resume(folder, dataset=data)


def test_the_command_line_says_which_checkpoint_it_resumes_from(tmp_path, capsys):
    out = tmp_path / "run"
    assert train("--rounds", "2", "--checkpoint-every", "1", "--out", str(out)) == 0
    (out / "checkpoint.pt").write_bytes(b"")
    capsys.readouterr()
    assert train("--rounds", "3", "--checkpoint-every", "1", "--out", str(out)) == 0
    captured = capsys.readouterr()
    assert f"{out / 'checkpoint.pt'} is not a checkpoint this spafl can read: the file is empty" in captured.err
    assert "resuming from the previous checkpoint" in captured.err and "(after round 1)" in captured.err
    assert "continuing the run in" in captured.out and "1 of 3 rounds done" in captured.out
    assert len(runfolder.read_checkpoint(out / "checkpoint.pt")["history"]) == 3


def test_the_previous_checkpoint_is_kept_until_the_new_one_is_in_place(tmp_path, monkeypatch):
    sim = _run(tmp_path, 1)
    first = (tmp_path / "checkpoint.pt").read_bytes()
    sim.run(rounds=2)
    assert (tmp_path / "checkpoint.prev.pt").read_bytes() == first
    second = (tmp_path / "checkpoint.pt").read_bytes()

    def crash(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="No space left"):
        sim.save_checkpoint()
    assert (tmp_path / "checkpoint.pt").read_bytes() == second
    assert (tmp_path / "checkpoint.prev.pt").read_bytes() == first
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_failed_write_during_the_run_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert train("--rounds", "1", "--out", str(out)) == 0
    good = (out / "checkpoint.pt").read_bytes()
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        if isinstance(obj, dict) and "run_id" in obj:
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    capsys.readouterr()
    assert train("--rounds", "2", "--out", str(out)) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"spafl train: writing to {out} failed after round 2: [Errno 28] cannot write "
                          f"{out / 'checkpoint.pt'}: No space left on device")
    assert len(err.splitlines()) == 1 and (out / "checkpoint.pt").read_bytes() == good


# --- the folder itself --------------------------------------------------------------------------


def test_stale_temporary_files_are_removed_on_start_and_resume(tmp_path, capsys):
    """The reproduction: a killed write left .checkpoint.pt-*.tmp files forever."""
    out = tmp_path / "run"
    out.mkdir()
    stale = [out / ".checkpoint.pt-k1l2.tmp", out / ".history.json-x9.tmp", out / ".write-check-a.tmp"]
    keep = [out / ".mine.tmp", out / "notes.tmp"]
    for p in stale + keep:
        p.write_bytes(b"x")
    assert train("--rounds", "1", "--out", str(out)) == 0
    assert "removed 3 temporary file(s) that interrupted writes left" in capsys.readouterr().out
    assert not any(p.exists() for p in stale) and all(p.exists() for p in keep)
    (out / ".checkpoint.pt-zz.tmp").write_bytes(b"x")
    sim = Simulator.resume(out)
    sim.run(rounds=2)
    assert not (out / ".checkpoint.pt-zz.tmp").exists()
    assert runfolder.remove_stale_temporaries(tmp_path / "missing") == []


def _read_only(folder: Path, monkeypatch) -> None:
    """Make ``folder`` refuse new files: its mode, and (for root, whom the mode does not stop)
    the file creation the write check makes there."""
    folder.chmod(0o555)
    real = tempfile.mkstemp

    def refuse(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == folder:
            raise PermissionError(13, "Permission denied", str(folder))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", refuse)


def test_a_read_only_run_folder_fails_before_any_training(tmp_path, monkeypatch, capsys):
    """The reproduction: a read-only run folder with --checkpoint-every 0 trained all its rounds,
    then lost everything on an OSError traceback."""
    out = tmp_path / "run"
    out.mkdir()
    _read_only(out, monkeypatch)
    trained = []
    real_round = Simulator.run_round
    monkeypatch.setattr(Simulator, "run_round", lambda self: trained.append(1) or real_round(self))
    try:
        assert train("--rounds", "20", "--checkpoint-every", "0", "--out", str(out)) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"spafl train: the run folder {out} is not writable (Permission denied); nothing was trained"
        assert not trained
        sim = Simulator(small_config(rounds=2), dataset=synthetic(n_train=200, n_test=50), out_dir=out)
        with pytest.raises(RunFolderError, match="not writable"):
            sim.run()
        assert not trained and sim.round == 0
    finally:
        out.chmod(0o755)
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunFolderError, match="is a file, not a folder"):
        runfolder.check_writable(tmp_path / "file")


def test_overwrite_removes_every_file_of_the_old_run_and_nothing_else(tmp_path, capsys):
    """The reproduction: --overwrite --method fedavg over a SpaFL run kept the old masks.npz
    and redrew masks.png from it."""
    out = tmp_path / "run"
    assert main(["train", *[a for a in TINY if a != "--no-plot"], "--rounds", "2", "--out", str(out)]) == 0
    assert {"masks.npz", "masks.png", "thresholds.png", "checkpoint.pt"} <= set(files(out))
    (out / "notes.txt").write_text("mine")
    (out / "extra").mkdir()
    capsys.readouterr()
    assert main(["train", *[a for a in TINY if a != "--no-plot"], "--rounds", "1", "--out", str(out), "--overwrite",
                 "--method", "fedavg"]) == 0
    text = capsys.readouterr().out
    assert "--overwrite: removed the previous run's" in text and "kept what is not a run's: extra, notes.txt" in text
    left = set(files(out))
    assert not {"masks.npz", "masks.png", "thresholds.png", "checkpoint.prev.pt"} & left
    assert {"history.json", "checkpoint.pt", "accuracy.png", "notes.txt"} <= left
    assert json.loads((out / "history.json").read_text())["config"]["method"] == "fedavg"
    # a bad new configuration removes nothing
    before = files(out)
    assert train("--out", str(out), "--overwrite", "--lr", "-1") == 2
    assert files(out) == before


# --- persistent failure, bad values: one line and a non-zero exit ----------------------------------


def test_lr_1e30_stops_with_a_clear_error_and_a_non_zero_exit(tmp_path, capsys):
    """The reproduction: --lr 1e30 ran to the end with every client dropped every round and
    exited 0."""
    out = tmp_path / "run"
    with pytest.warns(FederatedWarning) as caught:  # printed on stderr outside pytest
        assert train("--rounds", "10", "--lr", "1e30", "--out", str(out)) == 1
    err = capsys.readouterr().err
    line = [x for x in err.splitlines() if x.startswith("spafl train: stopped")]
    assert len(line) == 1, err
    assert line[0].startswith("spafl train: stopped after round 3 of 10: 3 rounds in a row aggregated nothing "
                              "(rounds 1 to 3, max_failed_rounds = 3); round 1: client")
    assert "non-finite" in line[0] and "local training diverged (lr 1e+30" in line[0]
    history = json.loads((out / "history.json").read_text())["history"]
    assert [r["round_failed"] for r in history] == [1, 1, 1]
    assert "round 1 aggregated nothing: 3 sampled, 3 dropped, 0 rejected" in [str(w.message) for w in caught]


def test_bad_device_strings_are_one_line_errors_naming_the_value(capsys):
    for device in ("cpu:abc", "cuda:x", "mps", "cpu:1", "gpu"):
        assert main(["train", "--device", device, "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert err == ("spafl train: invalid configuration: device must be auto, cpu, cuda or cuda:<index>, "
                       f"got {device!r}")
    with pytest.raises(ValueError, match="'cpu:abc' is not a device"):
        resolve_device("cpu:abc")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="'cuda:0' requested but CUDA is not available"):
            resolve_device("cuda:0")
    else:
        with pytest.raises(ValueError, match="'cuda:99' requested but this machine has"):
            resolve_device("cuda:99")
    assert FedConfig(device="cpu:0").validate().device == "cpu:0"


def test_download_without_torchvision_is_a_one_line_error(tmp_path, capsys):
    try:
        import torchvision.datasets  # noqa: F401
        has_torchvision = True
    except Exception:  # noqa: BLE001
        has_torchvision = False
    if has_torchvision:
        pytest.skip("torchvision imports here: --download would fetch the data")
    assert main(["train", "--preset", "fmnist-lenet5", "--data-root", str(tmp_path), "--download",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("spafl train: download needs torchvision, which does not import here")
    assert "pip install torchvision" in err and f"under {tmp_path} as FashionMNIST/raw/" in err


# --- the other commands ------------------------------------------------------------------------------


def test_plot_redraws_a_comparison_folder(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "cmp"
    assert main(["compare", "--methods", "spafl,local", "--seeds", "0", "--rounds", "1", "--num-clients", "4",
                 "--clients-per-round", "2", "--local-epochs", "1", "--out", str(out), "--no-progress",
                 "--device", "cpu"]) == 0
    for name in ("accuracy_vs_round.png", "accuracy_vs_gbit.png"):
        (out / name).unlink()
    capsys.readouterr()
    assert main(["plot", str(out)]) == 0
    assert (out / "accuracy_vs_round.png").is_file() and (out / "accuracy_vs_gbit.png").is_file()
    assert "wrote" in capsys.readouterr().out
    assert main(["plot", str(out / "spafl-seed0")]) == 0  # a run folder inside it
    assert (out / "spafl-seed0" / "accuracy.png").is_file()
    shutil.rmtree(out / "local-seed0")
    assert main(["plot", str(out)]) == 2
    assert "local-seed0 has no history.json" in capsys.readouterr().err
    history = out / "spafl-seed0" / "history.json"  # before: a JSONDecodeError naming no file
    history.write_bytes(history.read_bytes()[:100])
    assert main(["plot", str(out)]) == 2
    assert f"{history} is not readable" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["plot", str(tmp_path)])
    assert "neither a run (history.json) nor a comparison (comparison.csv)" in capsys.readouterr().err


def test_help_and_version():
    run = lambda *a: subprocess.run([sys.executable, "-m", "spafl", *a], capture_output=True, text=True)  # noqa: E731
    top = run("--help")
    assert top.returncode == 0
    for command in ("demo", "train", "compare", "presets", "plot"):
        assert any(line.split()[:1] == [command] and len(line.split()) > 1 for line in top.stdout.splitlines()), \
            top.stdout
    train_help = run("train", "--help").stdout
    assert "(default: None)" not in train_help and "default: None" not in train_help
    assert "--max-failed-rounds INT\n" in train_help and "aggregate nothing (0: never)" in train_help
    assert "rounds to run (with --resume: the new total) (default: 60)" in " ".join(train_help.split())  # digits-cnn
    for flag in ("--aggregator", "--trim-fraction", "--update-bounds", "--grad-bound", "--max-failed-rounds"):
        block = train_help.split(flag, 2)[-1].split("\n  --")[0]
        assert len(block.split()) > 4, (flag, block)
    version = run("--version")
    assert version.returncode == 0 and version.stdout.startswith("spafl 0.")


def test_checkpoint_notes_go_to_the_log_or_are_warned():
    seen = []
    runfolder.warn_notes(["a", "b"], seen.append)
    assert seen == ["a", "b"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runfolder.warn_notes(["c"])
    assert [str(w.message) for w in caught] == ["c"] and caught[0].category is CheckpointWarning


def test_every_run_folder_records_where_its_history_came_from(tmp_path):
    """Provenance: the package version, the commit and dirty flag when run from a checkout,
    torch / Triton / NumPy versions, the CPU model and the thread count."""
    import platform

    import numpy as np

    import spafl

    sim = Simulator(small_config(rounds=1), dataset=synthetic(n_train=200, n_test=40), out_dir=tmp_path)
    sim.run()
    env = json.loads((tmp_path / "history.json").read_text())["environment"]
    assert env["spafl"] == spafl.__version__ and env["torch"] == torch.__version__
    assert env["numpy"] == np.__version__ and env["python"] == platform.python_version()
    assert env["threads"] == torch.get_num_threads() and env["cpu"]
    assert "triton" in env
    root = Path(spafl.__file__).resolve().parent.parent
    if (root / ".git").exists() and shutil.which("git"):
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, check=True).stdout.strip())
        assert env["git_commit"] == head and env["git_dirty"] is dirty
    else:
        assert env["git_commit"] == "" and env["git_dirty"] is None
