"""The command line's first hour: the quick start, the demo, threads, --help, --download, Ctrl-C, disk
use, compare's table."""

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spafl.cli import main
from spafl.datasets import load_digits


def test_embedded_digits():
    images, labels = load_digits()
    assert images.shape == (1797, 8, 8) and images.dtype == torch.float32
    assert 0.0 <= float(images.min()) and float(images.max()) == 1.0
    assert torch.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


def test_demo_trains_and_prunes(capsys):
    assert main(["demo", "--epochs", "6", "--log-every", "3", "--th-coeff", "0.01"]) == 0
    out = capsys.readouterr().out
    final = [line for line in out.splitlines() if line.startswith("done in")][0]
    accuracy = float(final.split("test accuracy ")[1].split("%")[0])
    active = float(final.split(", ")[1].split("%")[0])
    assert accuracy > 85.0, out  # 10 classes: chance is 10 %
    assert active < 100.0, out  # the penalty pruned some neurons


def test_python_dash_m_entry_point_and_bad_flags():
    proc = subprocess.run([sys.executable, "-m", "spafl", "demo", "--epochs", "0"], capture_output=True, text=True)
    assert proc.returncode == 2 and "--epochs must be positive" in proc.stderr
    with pytest.raises(SystemExit):
        main(["demo", "--backend", "cudnn"])


# --- the thread policy -------------------------------------------------------------------------


def test_thread_policy_choices(monkeypatch):
    from spafl import _threads
    from spafl._threads import ThreadPolicy

    monkeypatch.setattr(_threads, "cpu_cores", lambda: 8)
    p = ThreadPolicy.choose(clients_per_round=5, environ={})
    assert (p.workers, p.intra_op, p.cores, p.source) == (5, 1, 8, "default")  # one worker per sampled client
    inter = torch.get_num_interop_threads()
    assert p.describe() == f"5 workers x 1 intra-op thread (default), {inter} inter-op, 8 cores"
    assert ThreadPolicy.choose(clients_per_round=10, environ={}).workers == 8  # one per core
    p = ThreadPolicy.choose(clients_per_round=10, threads=2, environ={"OMP_NUM_THREADS": "3"})
    assert (p.workers, p.intra_op, p.source) == (4, 2, "--threads")  # the flag wins over the environment
    p = ThreadPolicy.choose(clients_per_round=10, environ={"OMP_NUM_THREADS": "3"})
    assert (p.workers, p.intra_op, p.source) == (2, 3, "OMP_NUM_THREADS")  # the user's setting is respected
    assert ThreadPolicy.choose(clients_per_round=10, workers=3, environ={"OMP_NUM_THREADS": "3"}).workers == 3
    assert ThreadPolicy.choose(clients_per_round=10, device="cuda", environ={}).workers == 1
    assert ThreadPolicy.choose(clients_per_round=10, threads=16, environ={}).workers == 1
    for kwargs, text in (({"threads": 0}, "threads must"), ({"workers": -2}, "workers must"),
                         ({"environ": {"OMP_NUM_THREADS": "many"}}, "OMP_NUM_THREADS must")):
        with pytest.raises(ValueError, match=text):
            ThreadPolicy.choose(**{"environ": {}, **kwargs})
    before = torch.get_num_threads()
    with ThreadPolicy.choose(threads=3, environ={}).applied():
        assert torch.get_num_threads() == 3
    assert torch.get_num_threads() == before


def test_train_chooses_and_shows_its_threads(tmp_path, capsys, monkeypatch):
    from spafl import _threads
    from spafl.federated.simulator import Simulator

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(_threads, "cpu_cores", lambda: 2)
    seen = {}
    real_run = Simulator.run

    def spy(self, rounds=None):
        seen.update(threads=torch.get_num_threads(), workers=self.workers)
        return real_run(self, rounds)

    monkeypatch.setattr(Simulator, "run", spy)
    args = ["train", "--rounds", "1", "--num-clients", "6", "--clients-per-round", "3", "--local-epochs", "1",
            "--no-progress", "--no-plot", "--device", "cpu"]
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # what torch starts with on 2 cores
    try:
        assert main([*args, "--out", str(tmp_path / "a")]) == 0
        out = capsys.readouterr().out
        assert "threads: 2 workers x 1 intra-op thread (default)" in out and "2 cores" in out
        assert seen == {"threads": 1, "workers": 2}
        assert torch.get_num_threads() == 2  # restored after the run
        assert main([*args, "--out", str(tmp_path / "b"), "--workers", "1", "--threads", "2"]) == 0
        assert "threads: 1 worker x 2 intra-op threads (--threads)" in capsys.readouterr().out
        assert seen == {"threads": 2, "workers": 1}
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert main([*args, "--out", str(tmp_path / "c")]) == 0
        assert "2 workers x 1 intra-op thread (OMP_NUM_THREADS)" in capsys.readouterr().out
    finally:
        torch.set_num_threads(before)
    with pytest.raises(SystemExit):
        main([*args, "--out", str(tmp_path / "d"), "--workers", "0"])
    assert "--workers must be a positive integer" in capsys.readouterr().err


def test_demo_shows_its_threads(capsys):
    assert main(["demo", "--epochs", "1", "--threads", "1"]) == 0
    assert "threads: 1 intra-op thread (--threads)" in capsys.readouterr().out


# --- the first hour: threads in one's own loop, --help, --download, Ctrl-C, disk use, compare ----------


def _train_one_step(model):
    x = torch.randn(4, 1, 8, 8)
    model(x).sum().backward()


def test_layers_warn_once_about_unchosen_threads(monkeypatch):
    import warnings

    from torch import nn

    import spafl
    from spafl import _threads

    model = spafl.sparsify(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)))
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        torch.set_num_threads(2)  # torch's default on 2 cores
        monkeypatch.setattr(_threads, "_warned", False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.eval()
            _train_one_step(model)  # inference: not a training loop, no warning, the check still to come
            assert not caught and not _threads._warned
            model.train()
            _train_one_step(model)
            _train_one_step(model)  # once per process
        assert [type(w.message) for w in caught] == [_threads.ThreadsWarning]
        text = str(caught[0].message)
        assert "2 intra-op threads" in text and "torch.set_num_threads(1)" in text and "OMP_NUM_THREADS=1" in text
        assert caught[0].filename == __file__  # points at the user's call, not at spafl
        for setup in (lambda: monkeypatch.setenv("OMP_NUM_THREADS", "2"),  # the user chose
                      lambda: torch.set_num_threads(1),  # one thread: nothing to say
                      lambda: _threads.ThreadPolicy.choose(threads=2, environ={}).applied().__enter__()):
            monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
            torch.set_num_threads(2)
            monkeypatch.setattr(_threads, "_warned", False)
            setup()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                _train_one_step(model)
            assert not caught
    finally:
        torch.set_num_threads(before)


def test_help_lists_choices_and_each_default_once(capsys):
    from spafl.cli import build_parser
    from spafl.federated.config import BACKENDS, MODELS

    train = build_parser()._subparsers._group_actions[0].choices["train"]
    actions = {a.dest: a for a in train._actions}
    assert tuple(actions["model"].choices) == MODELS and tuple(actions["backend"].choices) == BACKENDS
    assert tuple(actions["penalty_schedule"].choices) == ("sigmoid", "constant")
    assert "sigmoid(10 t / penalty_scheduler - 5)" in actions["penalty_scheduler"].help
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--model {digits-cnn,lenet5,conv4,vit,resnet18}", "--backend {auto,compact,reference,triton}"):
        assert flag in text
    formatter = train._get_formatter()
    for action in train._actions:  # each option's help, as printed: its default at most once
        if action.help:
            shown = formatter._expand_help(action)
            assert shown.count("default:") <= 1, shown
    assert "--mask-layer STR threshold layer whose masks are recorded for the mask plot ('none': the model's first) " \
           "(default: fc3)" in text
    with pytest.raises(SystemExit):
        main(["train", "--model", "resnet50"])
    assert "invalid choice: 'resnet50'" in capsys.readouterr().err


def _fake_torchvision(monkeypatch, fail: BaseException | None):
    """A torchvision whose FashionMNIST download makes torchvision's folders and a partial
    archive, then fails as an offline machine does."""
    import types

    def fashion(root, train, download):
        raw = Path(root) / "FashionMNIST" / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        (raw / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b partial")
        if fail is not None:
            raise fail

    datasets = types.ModuleType("torchvision.datasets")
    datasets.FashionMNIST = fashion
    vision = types.ModuleType("torchvision")
    vision.datasets = datasets
    monkeypatch.setitem(sys.modules, "torchvision", vision)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", datasets)


def test_download_without_a_network_fails_in_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    from urllib.error import URLError

    args = ["train", "--preset", "fmnist-lenet5", "--download", "--no-progress", "--out", str(tmp_path / "run")]
    _fake_torchvision(monkeypatch, URLError("[Errno -3] Temporary failure in name resolution"))
    root = tmp_path / "data" / "sub"  # neither folder exists: both are the download's to remove
    assert main([*args, "--data-root", str(root)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"spafl train: could not download fmnist into {root} (URLError: ")
    assert "Temporary failure in name resolution" in err and "FashionMNIST/raw/<file>.gz" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no data folder, no run folder
    # a data root that exists keeps what it held, and loses what the attempt added
    root.mkdir(parents=True)
    (root / "mine.txt").write_text("kept")
    assert main([*args, "--data-root", str(root)]) == 2
    assert [p.name for p in root.iterdir()] == ["mine.txt"]
    assert capsys.readouterr().err.count("\n") == 1
    # no torchvision at all: one line saying which one to install
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)
    assert main([*args, "--data-root", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install torchvision==0.28.0" in err and "download needs torchvision" in err
    assert not (tmp_path / "other").exists()


def test_ctrl_c_ends_in_one_line_saying_how_to_continue(tmp_path):
    import signal
    import time

    args = ["train", "--rounds", "400", "--num-clients", "4", "--clients-per-round", "2", "--local-epochs", "1",
            "--checkpoint-every", "1", "--no-plot", "--out", str(tmp_path / "run")]
    # SIGINT's default handler, whatever the test runner's (a background job ignores SIGINT)
    proc = subprocess.Popen([sys.executable, "-m", "spafl", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not (tmp_path / "run" / "checkpoint.pt").is_file():
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    last = err.rstrip("\n").split("\n")[-1].split("\r")[-1]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert re.fullmatch(r"spafl train: interrupted in round (\d+) of 400; .* holds its checkpoint after round (\d+); "
                        r"run the same command again to continue: spafl train .*", last), err
    # and the same command does continue from there
    again = subprocess.run([sys.executable, "-m", "spafl", *args[:2], "3", *args[3:]], capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr
    assert re.search(r"continuing the run in .*: [1-9]\d* of 3 rounds done|already holds this run", again.stdout)


def test_run_header_states_the_disk_use_and_it_bounds_the_checkpoint(tmp_path, capsys):
    from spafl.federated import Simulator, build_config
    from spafl.federated.train_command import disk_estimate

    args = ["train", "--rounds", "2", "--num-clients", "4", "--clients-per-round", "4", "--local-epochs", "1",
            "--optimizer-lifetime", "per-run", "--no-progress", "--no-plot", "--out", str(tmp_path / "run")]
    assert main(args) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("disk: "))
    m = re.fullmatch(r"disk: each checkpoint up to ([\d.]+) MB \(4 clients x ([\d.]+) MB of weights, buffers and "
                     r"momentum, once trained\); two are kept \(checkpoint.pt, checkpoint.prev.pt\)", line)
    assert m, line
    config = build_config("digits-cnn", overrides={"num_clients": 4, "clients_per_round": 4,
                                                   "optimizer_lifetime": "per-run"})
    model = Simulator(config).model
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    assert float(m.group(2)) == pytest.approx((state + params) / 1e6, rel=1e-2)
    # every client trained (4 of 4 a round): the checkpoint is near the bound, and not above it
    size = (tmp_path / "run" / "checkpoint.pt").stat().st_size
    assert 0.5 * float(m.group(1)) * 1e6 < size <= float(m.group(1)) * 1e6 * 1.01 + 200_000
    assert "weights and buffers, once" in disk_estimate(model, config.replace(optimizer_lifetime="per-round"))


def test_compare_table_names_its_sparsity_columns_and_says_n_1():
    from spafl.federated.compare import aggregate_runs, table_markdown

    def run(method, seed, acc, units, weights):
        return {"method": method, "seed": seed, "rounds": 5, "final_acc": acc, "final_acc_global": float("nan"),
                "final_density": units, "final_density_weighted": weights, "comm_gbit_paper": 0.1,
                "bytes_exchanged": 1e6, "flops_per_client": 1e9, "wall_s": 1.0, "mean_round_s": 0.2}

    one = table_markdown(aggregate_runs([run("spafl", 0, 80.0, 0.7, 0.5), run("sparsyfed", 0, 70.0, 0.4, 0.1)]))
    header, _, spafl_row, sparsyfed_row = one.splitlines()
    assert "| active units | non-zero weights |" in header and "| density |" not in header
    assert "+-" not in one and "| 80.00 (n=1) |" in spafl_row
    assert "| 0.700 | 0.500 |" in spafl_row  # SpaFL: its active units, and the weights they hold
    assert "| - | 0.100 |" in sparsyfed_row  # SparsyFed prunes weights, not units
    two = table_markdown(aggregate_runs([run("spafl", 0, 80.0, 0.7, 0.5), run("spafl", 1, 78.0, 0.7, 0.5)]))
    assert "| 79.00 +- 1.00 |" in two


def test_compare_reports_overall_progress_with_an_eta(tmp_path):
    from spafl.federated import build_config
    from spafl.federated.compare import run_comparison

    config = build_config("digits-cnn", overrides={"rounds": 2, "num_clients": 4, "clients_per_round": 2,
                                                   "local_epochs": 1})
    log = []
    run_comparison(config, ["spafl", "local"], [0], tmp_path, log=log.append)
    lines = [x for x in log if x.startswith("[run ")]
    assert lines[0].startswith("[run 1/2] spafl seed 0: starting") and "0 of 4 rounds done overall" in lines[0]
    assert "2 of 4 rounds done overall" in lines[1] and "s left" in lines[1]  # an ETA once a round was timed
    assert lines[-1].startswith("[run 2/2] all done; 4 of 4 rounds done overall")
    log.clear()
    run_comparison(config.replace(rounds=3), ["spafl", "local"], [0], tmp_path, log=log.append)
    assert "2 of 6 rounds done overall" in [x for x in log if x.startswith("[run 1/2]")][0]  # done before: counted


def test_ctrl_c_in_the_demo_is_one_line(monkeypatch, capsys):
    import spafl.cli

    def interrupted(args, policy):
        raise KeyboardInterrupt

    monkeypatch.setattr(spafl.cli, "_demo", interrupted)
    assert main(["demo", "--epochs", "1"]) == 130
    assert capsys.readouterr().err == "spafl demo: interrupted\n"


def test_the_limit_flags_read_off_as_off_and_none_as_the_methods_default():
    """``--cohort-clip off`` (and every other limit against the cohort) turns the limit off
    (inf): for these settings None is the method's default, which ``none`` still gives; other
    optional settings keep ``off`` as None (``--clip off``: no gradient clipping)."""
    import math

    from spafl.cli import build_parser
    from spafl.federated.config import COHORT_LIMITS, FedConfig

    assert set(COHORT_LIMITS) <= {f.name for f in dataclasses.fields(FedConfig)}
    parser = build_parser()
    for name in COHORT_LIMITS:
        flag = "--" + name.replace("_", "-")
        assert getattr(parser.parse_args(["train", flag, "off"]), name) == math.inf, name
        assert getattr(parser.parse_args(["train", flag, "none"]), name) is None, name
        assert getattr(parser.parse_args(["train", flag, "3.5"]), name) == 3.5, name
    assert parser.parse_args(["train", "--clip", "off"]).clip is None
    with pytest.raises(ValueError, match="cohort_clip must be"):
        FedConfig(cohort_clip=0.5).validate()
