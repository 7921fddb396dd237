"""Run folders against careless and hostile use: the user's own files are never overwritten or
removed, an empty ``--out`` is refused, an inconsistent checkpoint is refused, and a failed write
(a full disk, a file size limit, no permission) is one line naming the file with nothing lost."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import tempfile

import pytest
import torch

from spafl.cli import main as cli_main
from spafl.federated import runfolder
from spafl.federated.runfolder import RunFolderError

FAST = ["--num-clients", "6", "--clients-per-round", "3", "--local-epochs", "1", "--no-progress", "--no-plot",
        "--device", "cpu", "--workers", "1"]


def train(*args: str) -> int:
    return cli_main(["train", *FAST, *args])


def test_the_users_own_history_csv_is_never_overwritten(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "history.csv").write_text("my,own\n1,2\n")
    assert train("--rounds", "1", "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert "history.csv, not written by a spafl run" in err and len(err.strip().splitlines()) == 1
    assert (out / "history.csv").read_text() == "my,own\n1,2\n"
    assert sorted(p.name for p in out.iterdir()) == ["history.csv"]  # nothing written
    # --overwrite removes only this project's files: the user's file still blocks the run
    assert train("--rounds", "1", "--out", str(out), "--overwrite") == 2
    assert (out / "history.csv").read_text() == "my,own\n1,2\n"


def test_overwrite_removes_only_the_files_the_run_wrote(tmp_path, capsys):
    out = tmp_path / "run"
    assert train("--rounds", "1", "--out", str(out)) == 0
    (out / "notes.txt").write_text("keep me")
    assert train("--rounds", "1", "--out", str(out), "--seed", "3", "--overwrite") == 0
    assert (out / "notes.txt").read_text() == "keep me"
    assert runfolder.read_history(out)["config"]["seed"] == 3


def test_overwrite_does_not_remove_a_foreign_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    torch.save({"mine": torch.ones(2)}, out / "checkpoint.pt")
    before = (out / "checkpoint.pt").read_bytes()
    for extra in ([], ["--overwrite"]):
        assert train("--rounds", "1", "--out", str(out), *extra) == 2
        err = capsys.readouterr().err
        assert "checkpoint.pt, not written by a spafl run" in err and "pass --overwrite" not in err
        assert (out / "checkpoint.pt").read_bytes() == before


def test_an_empty_out_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        train("--rounds", "1", "--out", "")
    assert e.value.code == 2
    assert "--out" in capsys.readouterr().err and list(tmp_path.iterdir()) == []


def test_a_checkpoint_whose_history_is_shorter_than_its_round_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert train("--rounds", "3", "--out", str(out)) == 0
    ckpt = runfolder.read_checkpoint(out / "checkpoint.pt")
    assert ckpt["server"]["round"] == 3
    ckpt["history"] = ckpt["history"][:1]
    torch.save(ckpt, out / "checkpoint.pt")  # weights-only legal
    history = (out / "history.json").read_bytes()
    with pytest.raises(RunFolderError, match="after round 3 but its history holds 1 row"):
        runfolder.read_checkpoint(out / "checkpoint.pt")
    assert train("--rounds", "4", "--out", str(out), "--resume") == 2
    assert "checkpoint.pt is inconsistent" in capsys.readouterr().err
    assert (out / "history.json").read_bytes() == history


def test_torch_saves_full_disk_error_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert train("--rounds", "1", "--out", str(out)) == 0
    good = (out / "checkpoint.pt").read_bytes()
    real_save = torch.save

    def full_disk(obj, f, *a, **k):  # what torch's archive writer raises when a write fails
        if isinstance(obj, dict) and "run_id" in obj:
            raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing "
                               "file data/0: file write failed")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    capsys.readouterr()
    assert train("--rounds", "2", "--out", str(out)) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"cannot write {out / 'checkpoint.pt'}" in err
    assert (out / "checkpoint.pt").read_bytes() == good
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_a_real_file_size_limit_is_one_line_with_the_files_intact(tmp_path):
    """``ulimit -f``: the kernel refuses the write past the limit (SIGXFSZ ignored, EFBIG)."""
    out = tmp_path / "run"
    assert train("--rounds", "1", "--out", str(out)) == 0
    good = (out / "checkpoint.pt").read_bytes()
    limit = len(good) // 2

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    code = ("import sys; from spafl.cli import main; "
            f"sys.exit(main(['train', *{FAST!r}, '--rounds', '2', '--out', {str(out)!r}]))")
    r = subprocess.run([sys.executable, "-c", code], preexec_fn=limited, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 1, r.stderr
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and "cannot write" in err and str(out) in err, err
    assert (out / "checkpoint.pt").read_bytes() == good


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_one_line_naming_it(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    out.chmod(0o500)
    try:
        assert train("--rounds", "1", "--out", str(out)) == 2
    finally:
        out.chmod(0o700)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(out) in err and "not writable" in err


def test_atomic_write_permission_error_names_the_file(tmp_path, monkeypatch):
    target = tmp_path / "comparison.csv"
    target.write_text("old")

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    with pytest.raises(OSError, match=f"cannot write {target}: Permission denied"):
        runfolder.atomic_write(target, lambda f: f.write(b"new"))
    assert target.read_text() == "old"


def test_atomic_write_names_a_size_limit_raised_while_torch_closes_its_archive(tmp_path):
    """``torch.save`` past a file size limit: the OSError of the write, then a RuntimeError of the
    archive writer ("unexpected pos") while it closes; the OSError in the chain is what counts."""
    target = tmp_path / "checkpoint.pt"
    target.write_bytes(b"old")

    def write(f):
        try:
            raise OSError(27, "File too large")
        finally:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 101312 vs 101204")

    with pytest.raises(OSError, match=f"cannot write {target}: File too large; the file it would replace is intact"):
        runfolder.atomic_write(target, write)
    assert target.read_bytes() == b"old"
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temporary file left


def _plotted_run(tmp_path):
    out = tmp_path / "run"
    assert train("--rounds", "2", "--out", str(out)) == 0
    return out


def test_plot_on_damaged_run_files_is_one_line_naming_the_file(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = _plotted_run(tmp_path)
    assert cli_main(["plot", str(out)]) == 0
    good = (out / "history.json").read_bytes()
    for name, content in [("masks.npz", b"junk, not a zip"), ("history.json", good[: len(good) // 2])]:
        (out / name).write_bytes(content)
        capsys.readouterr()
        assert cli_main(["plot", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(out / name) in err, err
    # an npz without the expected arrays
    (out / "history.json").write_bytes(good)
    import numpy as np
    with open(out / "masks.npz", "wb") as f:
        np.savez(f, other=np.zeros(2))
    assert cli_main(["plot", str(out)]) == 2
    assert str(out / "masks.npz") in capsys.readouterr().err


def test_plot_does_not_overwrite_the_users_own_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "mine"
    out.mkdir()
    run = _plotted_run(tmp_path)
    for name in ("history.json", "history.csv"):
        (out / name).write_bytes((run / name).read_bytes())
    (out / "accuracy.png").write_bytes(b"my picture")
    assert cli_main(["plot", str(out)]) == 2
    assert (out / "accuracy.png").read_bytes() == b"my picture"


# --- dataset files ------------------------------------------------------------------------------


def _fmnist_files(root, test_images=None):
    import gzip
    import struct

    import numpy as np

    def idx(array, magic, shape=None):
        shape = array.shape if shape is None else shape
        return struct.pack(">i", magic) + struct.pack(f">{len(shape)}i", *shape) + array.astype(np.uint8).tobytes()

    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    files = {"train-images-idx3-ubyte": idx(rng.integers(0, 256, (7, 28, 28)), 2051),
             "train-labels-idx1-ubyte": idx(rng.integers(0, 10, 7), 2049),
             "t10k-images-idx3-ubyte": test_images or idx(rng.integers(0, 256, (3, 28, 28)), 2051),
             "t10k-labels-idx1-ubyte": idx(rng.integers(0, 10, 3), 2049)}
    for name, data in files.items():
        (raw / f"{name}.gz").write_bytes(gzip.compress(data))
    return raw, idx


def test_a_gzip_bomb_stops_at_the_size_its_header_declares(tmp_path):
    import gzip
    import struct

    from spafl.federated.datafiles import read_fashion_mnist

    raw, _ = _fmnist_files(tmp_path)
    header = struct.pack(">i", 2051) + struct.pack(">3i", 7, 28, 28)
    bomb = gzip.compress(header + bytes(256 << 20), compresslevel=9)  # 256 MB behind a 7-image header
    assert len(bomb) < 1 << 20
    (raw / "train-images-idx3-ubyte.gz").write_bytes(bomb)
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz: header says .* holds more after it"):
        read_fashion_mnist(tmp_path)
    # a header declaring an absurd size is refused before reading the body
    huge = gzip.compress(struct.pack(">i", 2051) + struct.pack(">3i", 2**31 - 1, 28, 28))
    (raw / "train-images-idx3-ubyte.gz").write_bytes(huge)
    with pytest.raises(ValueError, match="more than the .* bytes this reader accepts"):
        read_fashion_mnist(tmp_path)


def test_a_bad_test_split_header_is_named_not_a_model_traceback(tmp_path):
    import numpy as np

    from spafl.federated.datafiles import read_fashion_mnist

    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (3, 28, 28))
    _, idx = _fmnist_files(tmp_path, test_images=None)
    raw = tmp_path / "FashionMNIST" / "raw"
    import gzip
    # the same bytes under a header that reshapes them to 3 images of 14 x 56
    (raw / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx(images, 2051, shape=(3, 14, 56))))
    with pytest.raises(ValueError, match=r"test split's images are \(1, 14, 56\) but the train split's \(1, 28, 28\)"):
        read_fashion_mnist(tmp_path)


# --- compare ------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag", [["--seeds", "0,0"], ["--methods", "spafl,fedavg,spafl"]])
def test_compare_refuses_a_seed_or_method_given_twice(tmp_path, capsys, flag):
    with pytest.raises(SystemExit) as e:
        cli_main(["compare", "--rounds", "1", "--out", str(tmp_path / "c"), *flag])
    assert e.value.code == 2
    assert "given more than once" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_run_comparison_refuses_duplicates(tmp_path):
    from spafl.federated import FedConfig
    from spafl.federated.compare import run_comparison

    with pytest.raises(ValueError, match="1 given more than once"):
        run_comparison(FedConfig(rounds=1), ["spafl"], [1, 1], tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_demo_with_the_triton_backend_on_a_cpu_is_one_line(capsys, monkeypatch):
    from spafl._checks import triton_available

    if not triton_available():
        pytest.skip("triton is not installed (the message then names the package)")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert cli_main(["demo", "--backend", "triton", "--device", "cpu", "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs a CUDA device" in err and "TRITON_INTERPRET=1" in err
