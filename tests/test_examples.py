"""The examples run as a user runs them (a subprocess, from the repository root), at CI sizes
given by their own flags, and print what they promise."""

import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def _run(script: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, f"examples/{script}", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.stdout


def test_every_example_is_tested():
    tested = {"own_model.py", "federated_run.py", "kernel_benchmark.py"}
    assert {p.name for p in (ROOT / "examples").glob("*.py")} == tested


def test_own_model_learns_and_prunes():
    out = _run("own_model.py", "--epochs", "3")
    last = out.strip().splitlines()[-1]
    m = re.match(r"epoch 3: test accuracy ([\d.]+)%, density ([\d.]+) ", last)
    assert m, out
    assert float(m.group(1)) > 50.0, out  # 10 classes: chance is 10%
    assert float(m.group(2)) < 1.0, out  # the penalty pruned some units


def test_federated_run_from_python(tmp_path):
    out = _run("federated_run.py", "--rounds", "2", "--clients", "4", "--out", str(tmp_path / "run"))
    rounds = re.findall(r"round (\d+): accuracy ([\d.]+)% .*, (\d+) bytes exchanged", out)
    assert [r[0] for r in rounds] == ["1", "2"], out
    assert all(int(r[2]) > 0 for r in rounds)
    assert (tmp_path / "run" / "history.csv").is_file() and (tmp_path / "run" / "checkpoint.pt").is_file()


def test_kernel_benchmark_times_every_side():
    out = _run("kernel_benchmark.py", "--size", "96", "--batch", "16", "--reps", "2", "--densities", "1", "0.25")
    rows = re.findall(r"density ([\d.]+): dense ([\d.]+) ms, masked ([\d.]+) ms .* spafl ([\d.]+) ms", out)
    assert [r[0] for r in rows] == ["1.00", "0.25"], out  # the density asked for is the density measured
    assert all(float(v) > 0 for r in rows for v in r[1:])


@pytest.mark.parametrize("script", ["own_model.py", "federated_run.py", "kernel_benchmark.py"])
def test_examples_have_help(script, capsys):
    namespace = runpy.run_path(str(ROOT / "examples" / script))  # in this process: no second start of torch
    with pytest.raises(SystemExit) as exit_:
        namespace["main"](["--help"])
    assert exit_.value.code == 0 and "usage:" in capsys.readouterr().out
