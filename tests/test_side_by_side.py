"""scripts/authors_side_by_side.py and its shims, without the authors' code: the log parser,
the shim Fashion-MNIST on small IDX files, the export, the summary, and a whole run against a
stand-in train.py that logs as the authors' does."""

import csv
import gzip
import importlib.util
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SHIMS = ROOT / "scripts" / "authors_shims"
sys.path.insert(0, str(ROOT / "scripts"))

import authors_side_by_side as sbs  # noqa: E402


def _load(name: str, path: Path):
    # Loaded under a private name: putting the shims on sys.path would shadow torchvision and
    # wandb for every other test of the session.
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


shim_datasets = _load("shim_torchvision_datasets", SHIMS / "torchvision" / "datasets.py")
shim_transforms = _load("shim_torchvision_transforms", SHIMS / "torchvision" / "transforms.py")
shim_wandb = _load("shim_wandb", SHIMS / "wandb" / "__init__.py")


def write_idx(path: Path, array: np.ndarray, magic: int, compress: bool) -> None:
    data = struct.pack(">i", magic) + struct.pack(f">{array.ndim}i", *array.shape) + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)


def fake_fmnist(root: Path, n_train: int = 7, n_test: int = 3, compress: bool = True):
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    parts = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", x, 2051, compress)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", y, 2049, compress)
        parts[prefix] = (x, y)
    return parts


# --- the log parser --------------------------------------------------------------------------


def test_the_log_parser_reads_the_authors_round_lines():
    lines = [
        "learning_rate    : 0.001",
        "------------------------------Epoch start------------------------------",
        "round: 0, avg_acc: 14.293, avg_density: 0.987, spent: 67.79",
        "new best acc model with acc: 14.293022155761719 and density: 0.9865100383758545",
        "round: 1, avg_acc: 17.434, avg_density: 0.952, spent: 100.45",
        "round: 12, avg_acc: nan, avg_density: 0.500, spent: 3.00",
        "round: 2, avg_acc: 18.0",  # a line cut while being written: not a round yet
    ]
    rows = sbs.parse_authors_log(lines)
    # numbered from 1, as our history
    assert [(r["round"], r["seconds"], r["density"]) for r in rows] == [(1, 67.79, 0.987), (2, 100.45, 0.952),
                                                                         (13, 3.0, 0.5)]
    assert rows[0]["acc"] == 14.293 and np.isnan(rows[2]["acc"])


# --- the shims -------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [True, False])
def test_shim_fashion_mnist_reads_the_idx_files_as_torchvision_exposes_them(tmp_path, compress):
    parts = fake_fmnist(tmp_path, compress=compress)
    for train, prefix in ((True, "train"), (False, "t10k")):
        ds = shim_datasets.FashionMNIST(str(tmp_path), train=train, transform=shim_transforms.ToTensor(),
                                        download=True)
        x, y = parts[prefix]
        assert ds.data.dtype == torch.uint8 and tuple(ds.data.shape) == x.shape
        assert ds.targets.dtype == torch.int64 and ds.targets.tolist() == y.tolist()
        assert torch.equal(ds.data, torch.from_numpy(x)) and len(ds) == len(y)
        image, target = ds[1]
        assert tuple(image.shape) == (1, 28, 28) and image.dtype == torch.float32
        torch.testing.assert_close(image[0], torch.from_numpy(x[1]).float() / 255)
        assert target == int(y[1])
    # What the authors' Non_iid_split does with it.
    ds = shim_datasets.FashionMNIST(str(tmp_path), train=True)
    idx = np.where(ds.targets == int(parts["train"][1][0]))[0]
    assert len(idx) >= 1 and tuple(ds.data[idx.tolist()].shape[1:]) == (28, 28)


def test_shim_fashion_mnist_says_where_it_looked(tmp_path):
    with pytest.raises(RuntimeError, match="FashionMNIST/raw.*cannot download"):
        shim_datasets.FashionMNIST(str(tmp_path), train=True, download=True)


def test_shim_to_tensor_refuses_a_non_image():
    with pytest.raises(ValueError, match="expects an image"):
        shim_transforms.ToTensor()(np.zeros((2, 3, 4, 5), dtype=np.uint8))


def test_shim_wandb_records_nothing_and_checks_its_argument():
    run = shim_wandb.init(project="SpaFL", config={"model": "lenet5"})
    assert run.config == {"model": "lenet5"} and shim_wandb.config == {"model": "lenet5"}
    shim_wandb.log({"round": round, "te_accuracy": 1.0})  # the authors log the builtin round: fine
    with pytest.raises(TypeError, match="expects a dict"):
        shim_wandb.log([1, 2])


# --- the export ------------------------------------------------------------------------------

STAND_IN = textwrap.dedent("""\
    # A stand-in for the authors' main/fmnist/train.py: same flags and log format, no training.
    import argparse, logging, os, time
    import torchvision
    import wandb
    p = argparse.ArgumentParser()
    for flag in ("--data_root", "--log_root", "--model_root", "--affix"):
        p.add_argument(flag)
    for flag in ("--comm_rounds", "--seed", "--local_epoch"):
        p.add_argument(flag, type=int)
    for flag in ("--learning_rate", "--th_coeff"):
        p.add_argument(flag, type=float)
    a = p.parse_args()
    assert os.environ["OMP_NUM_THREADS"] == "1" and (a.learning_rate, a.th_coeff, a.local_epoch) == (0.001, 0.002, 5)
    wandb.init(project="SpaFL", config={})
    ds = torchvision.datasets.FashionMNIST(a.data_root, train=True, transform=torchvision.transforms.ToTensor(),
                                           download=True)
    os.makedirs(os.path.join(a.log_root, a.affix))
    log = logging.getLogger()
    log.setLevel(logging.INFO)
    log.addHandler(logging.FileHandler(os.path.join(a.log_root, a.affix, "train_log.txt"), mode="w"))
    for t in range(a.comm_rounds):
        time.sleep(0.05)
        log.info("round: %d, avg_acc: %.3f, avg_density: %.3f, spent: %.2f" % (t, 10.0 + t, 1.0 - 0.1 * t,
                                                                             len(ds) + t))
""")


def make_authors_repo(folder: Path, git: bool) -> Path:
    code = folder / "main" / "fmnist"
    code.mkdir(parents=True)
    (code / "train.py").write_text(STAND_IN)
    (code / "run_command.txt").write_text("python train.py --learning_rate 0.001 --th_coeff 0.002 --local_epoch 5\n")
    if not git:
        return folder
    run = lambda *a: subprocess.run(["git", "-C", str(folder), *a], check=True, capture_output=True)  # noqa: E731
    run("init", "-q")
    run("add", ".")
    run("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "stand-in")
    return folder / ".git"


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
@pytest.mark.parametrize("git", [True, False])
def test_export_copies_main_fmnist_out_of_the_repository(tmp_path, git):
    repo = make_authors_repo(tmp_path / "authors", git)
    folder, commit = sbs.export_authors_code(repo, tmp_path / "export")
    assert (folder / "train.py").read_text() == STAND_IN and folder == tmp_path / "export" / "main" / "fmnist"
    assert len(commit) == 40 if git else commit == "unknown"
    with pytest.raises(ValueError, match="inside this repository"):
        sbs.export_authors_code(repo, ROOT / "authors-export")
    assert not (ROOT / "authors-export").exists()
    with pytest.raises(FileNotFoundError, match="neither a git directory nor a checkout"):
        sbs.export_authors_code(tmp_path / "export" / "main", tmp_path / "export2")


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_a_run_against_a_stand_in_writes_rows_and_summary(tmp_path, capsys):
    repo = make_authors_repo(tmp_path / "authors", git=True)
    fake_fmnist(tmp_path / "data", n_train=7)
    out, summary = tmp_path / "sbs.csv", tmp_path / "sbs.md"
    assert sbs.main(["--authors-repo", str(repo), "--data-root", str(tmp_path / "data"), "--rounds", "3", "--sides",
                     "authors", "--csv", str(out), "--summary", str(summary), "--poll-s", "0.05"]) == 0
    with out.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(sbs.COLUMNS)
    assert [(r["side"], r["round"], float(r["seconds"]), float(r["acc"])) for r in rows] == [
        ("authors", str(t + 1), 7.0 + t, 10.0 + t) for t in range(3)]  # 7 = the shim's dataset length
    assert all(r["threads"] == "1" and len(r["authors_commit"]) == 40 and "train.py" in r["command"] for r in rows)
    text = summary.read_text()
    assert "| authors | 3 | 8.00" in text and "(extrapolated)" in text
    printed = capsys.readouterr().out
    assert printed.count("authors          round") == 3
    pytest.importorskip("matplotlib")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import plot

    assert [p.name for p in plot.plot(rows, tmp_path / "plots", "test")] == ["side_by_side.png"]


def test_a_failing_side_reports_its_output(tmp_path, capsys):
    repo = make_authors_repo(tmp_path / "authors", git=False)
    (repo / "main" / "fmnist" / "train.py").write_text("raise SystemExit('no data here')\n")
    fake_fmnist(tmp_path / "data")
    assert sbs.main(["--authors-repo", str(repo), "--data-root", str(tmp_path / "data"), "--rounds", "2", "--sides",
                     "authors", "--csv", str(tmp_path / "x.csv"), "--poll-s", "0.05"]) == 1
    assert "no data here" in capsys.readouterr().err


# --- our side and the summary ----------------------------------------------------------------


def test_read_history_takes_wall_time_accuracy_and_density(tmp_path):
    path = tmp_path / "history.csv"
    path.write_text("round,acc_mean,density,wall_s,train_s\n0,12.5,0.99,8.25,8.0\n1,18.0,0.97,7.5,7.0\n")
    assert sbs.read_history(path) == [{"round": 0, "seconds": 8.25, "acc": 12.5, "density": 0.99},
                                      {"round": 1, "seconds": 7.5, "acc": 18.0, "density": 0.97}]


def test_our_side_runs_spafl_train_with_the_extra_arguments(tmp_path):
    fake_fmnist(tmp_path / "data")
    out, work = tmp_path / "o.csv", tmp_path / "work"
    tiny = "--dataset digits --model digits-cnn --num-clients 4 --clients-per-round 2 --local-epochs 1"
    assert sbs.main(["--data-root", str(tmp_path / "data"), "--sides", "ours", "--rounds", "1", "--ours",
                     f"tiny={tiny} --normalize standard", "--csv", str(out), "--workdir", str(work),
                     "--poll-s", "0.2"]) == 0
    with out.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["side"], r["round"]) for r in rows] == [("tiny", "1")]
    history = sbs.read_history(work / "ours-tiny" / "history.csv")
    assert float(rows[0]["seconds"]) == history[0]["seconds"] > 0 and 0 <= float(rows[0]["acc"]) <= 100
    assert tiny in rows[0]["command"] and "--preset fmnist-lenet5" in rows[0]["command"]


def test_summary_ratio_drift_and_extrapolation():
    authors = [{"round": t, "seconds": 60.0 + (t >= 3) * 6, "acc": 10.0 + t, "density": 1.0 - 0.01 * t}
               for t in range(6)]
    ours = [{"round": t, "seconds": 10.0, "acc": 11.0 + t, "density": 1.0 - 0.02 * t} for t in range(6)]
    env = {"device": "cpu", "torch": "2", "python": "3", "spafl": "0.1"}
    text = sbs.summarize({"authors": authors, "spafl": ours}, 1, env, {"authors": "a", "spafl": "b"})
    # medians 63 s and 10 s; the authors' last third (66 s) over the first (60 s) is the drift
    assert "spafl is 6.30x faster per round" in text and "| authors | 6 | 63.00" in text and "| 1.10x |" in text
    # 500 rounds: the 6 measured plus 494 at the median of the last (up to) 10
    assert f"{6 * 10 + 494 * 10:.0f} (extrapolated)" in text
    assert f"{sum(r['seconds'] for r in authors) + 494 * 63:.0f} (extrapolated)" in text
    assert "evaluates all 100 clients" in text
    full = sbs.summarize({"spafl": [dict(r, round=t) for t, r in enumerate(ours * 100)]}, 1, env, {}, full_run=500)
    assert "5000 (measured)" in full


@pytest.mark.parametrize("argv, message", [
    (["--rounds", "0"], "--rounds must be at least 1"),
    (["--threads", "0"], "--threads must be at least 1"),
    (["--sides", "authors"], "--authors-repo is needed"),
    (["--ours", "no label"], "LABEL=ARGS"),
    (["--ours", "authors=--x"], "LABEL=ARGS"),
    (["--ours", "a=", "--ours", "a=--workers 2"], "labels must differ"),
    (["--workdir", str(ROOT / "tmp-work")], "inside this repository"),
])
def test_bad_arguments_are_refused(tmp_path, argv, message, capsys):
    fake_fmnist(tmp_path / "data")
    with pytest.raises(SystemExit) as exc:
        sbs.main(["--data-root", str(tmp_path / "data"), "--csv", str(tmp_path / "x.csv"), "--sides", "ours", *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_a_data_root_without_fashion_mnist_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        sbs.main(["--data-root", str(tmp_path), "--csv", str(tmp_path / "x.csv"), "--sides", "ours"])
    assert "no FashionMNIST/raw" in capsys.readouterr().err
