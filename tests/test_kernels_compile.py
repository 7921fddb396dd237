"""Every kernel specialisation the launchers use compiles for Hopper (sm_90), even on a CPU box.

The interpreter executes kernels with NumPy and accepts programs that the real compiler
rejects (loop-carried type changes, layouts); Triton can lower to a cubin offline with the
ptxas it ships, so this catches those failures without a GPU.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest


def _nvidia_backend_available() -> bool:
    try:
        from triton.backends.nvidia import compiler  # noqa: F401
    except Exception:
        return False
    return True


pytestmark = pytest.mark.skipif(not _nvidia_backend_available(), reason="Triton's NVIDIA backend is not installed")


@pytest.fixture(scope="module")
def aot_report() -> subprocess.CompletedProcess:
    # One compile of every case (both specialisations), shared by the tests below. A subprocess,
    # because TRITON_INTERPRET=1 (set by conftest) turns the kernels into interpreted functions.
    script = Path(__file__).with_name("aot_compile.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(script), "--arch", "90"], capture_output=True, text=True, env=env,
                          timeout=900)


def test_all_kernels_compile_for_sm90(aot_report):
    report = aot_report.stdout + aot_report.stderr
    assert aot_report.returncode == 0, report
    assert "0 failed" in aot_report.stdout and aot_report.stdout.count("ok ") >= 120, report


def test_aligned_16bit_gemms_use_wgmma_and_a_cp_async_pipeline(aot_report):
    # A structural guard, not a timing: aligned bf16 inputs (contiguous; for the convolutions,
    # channels-last with channel counts that are multiples of 16) must keep the Hopper
    # tensor-core instructions and the software pipeline (see benchmarks/NOTES.md).
    lines = {line.split(":")[0][5:]: line for line in aot_report.stdout.splitlines() if line.startswith("ok ")}
    for name in ("linear_fwd[*bf16,bias=True][aligned]", "linear_bwd_dx[*bf16][aligned]",
                 "linear_bwd_dw[*bf16,mode=0][aligned]", "conv_fwd[*bf16,n=64,unit=False,bias=True][aligned]",
                 "conv_fwd[*bf16,n=128,unit=False,bias=True][aligned]", "conv_bwd_dx[*bf16,unit=False][aligned]",
                 "conv_bwd_dw[*bf16,p=64,unit=False,mode=0][aligned]"):
        assert name in lines, aot_report.stdout + aot_report.stderr
        fields = dict(part.strip().split("=") for part in lines[name].split(":", 1)[1].split(","))
        assert int(fields["wgmma"]) > 0 and int(fields["cp.async"]) > 0, lines[name]
