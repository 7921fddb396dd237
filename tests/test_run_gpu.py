"""benchmarks/run_gpu.sh itself, on the CPU: its smoke run (every Python step, tiny shapes) and
its preflight's one-line stops. The GPU run is the same script without ``--smoke``."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "run_gpu.sh"

# A stand-in for benchmarks/model.py: records its arguments, writes one line, then fails (the
# script must carry on after a failing cost model).
FAKE_MODEL = """import sys
from pathlib import Path
Path(sys.argv[0]).with_name("model_args.txt").write_text("\\n".join(sys.argv[1:]))
sys.exit(3)
"""


def _run(out: Path, *extra: str, env: dict | None = None, timeout: float = 1800) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    full_env.update(env or {})
    return subprocess.run(["bash", str(SCRIPT), *extra, str(out)], capture_output=True, text=True, env=full_env,
                          timeout=timeout, cwd=ROOT)


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_smoke_run_executes_every_step(tmp_path):
    model = tmp_path / "model.py"
    model.write_text(FAKE_MODEL)
    out = tmp_path / "out"
    proc = _run(out, "--smoke", env={"PYTHON": sys.executable, "SPAFL_COST_MODEL": str(model),
                                     "OMP_NUM_THREADS": "1"})
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    progress = (out / "progress.log").read_text()
    assert "preflight passed" in progress, log
    ends = [line for line in progress.splitlines() if "] end " in line]
    names = [line.split("end", 1)[1].split(":")[0].strip() for line in ends]
    assert names == ["warmup", "kernels_smoke", "model_pairs", "e2e", "kernels_tuned", "kernels_compact", "summary",
                     "plot_kernels", "plot_e2e"], progress
    # Every step but the (failing) stand-in cost model ran to its end, none was cut.
    for line in ends:
        assert ("exit 3" if "model_pairs" in line else "exit 0") in line, progress
    assert "0 kernel rows" not in progress and "skip" not in progress, progress
    # The cost model was called on the kernel rows, with the device named.
    assert (tmp_path / "model_args.txt").read_text().split("\n") == [
        "pair", "--measured", str(out / "kernels.csv"), "--device", "h100", "--out", str(out / "model_pairs.csv")]
    kernels = _rows(out / "kernels.csv")
    assert {r["case"] for r in kernels} == {"smoke-linear", "smoke-conv"}
    assert {r["provider"] for r in kernels} >= {"dense", "spafl-exact", "spafl-skip"}
    assert {r["op"] for r in kernels} == {"fwd", "fwd+bwd"}
    assert {r["provider"] for r in _rows(out / "kernels_tuned.csv")} == {"dense", "smaller", "spafl-skip"}
    assert _rows(out / "kernels_compact.csv") and _rows(out / "e2e.csv")
    assert (out / "summary.md").stat().st_size > 0
    preflight = (out / "preflight.txt").read_text()
    for check in ("row mask", "linear fwd+bwd", "conv2d fwd+bwd"):
        assert f"ok   {check} kernels match the reference" in preflight, preflight


def test_a_missing_interpreter_stops_with_one_line(tmp_path):
    proc = _run(tmp_path / "out", "--smoke", env={"PYTHON": str(tmp_path / "no-such-python")}, timeout=60)
    assert proc.returncode == 1
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and "preflight failed: no Python interpreter" in lines[0], proc.stdout + proc.stderr


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX virtual environment layout")
def test_an_interpreter_without_torch_stops_at_the_preflight(tmp_path):
    venv = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    out = tmp_path / "out"
    proc = _run(out, env={"PYTHON": str(venv / "bin" / "python")}, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert "preflight failed: PyTorch does not import" in last, proc.stdout
    # Nothing after the preflight started.
    assert " start " not in (out / "progress.log").read_text()
