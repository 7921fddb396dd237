"""The quick-start command and the embedded data set."""

import subprocess
import sys

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
