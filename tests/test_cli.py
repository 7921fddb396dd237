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
