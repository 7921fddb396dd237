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


@pytest.mark.skipif(not _nvidia_backend_available(), reason="Triton's NVIDIA backend is not installed")
def test_all_kernels_compile_for_sm90():
    script = Path(__file__).with_name("aot_compile.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(script), "--arch", "90"], capture_output=True, text=True, env=env,
                          timeout=900)
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report
    assert "0 failed" in proc.stdout and proc.stdout.count("ok ") >= 20, report


@pytest.mark.skipif(not _nvidia_backend_available(), reason="Triton's NVIDIA backend is not installed")
def test_aligned_16bit_gemms_use_wgmma_and_a_cp_async_pipeline():
    # A structural guard, not a timing: contiguous aligned bf16 inputs must keep the Hopper
    # tensor-core instructions and the software pipeline (see benchmarks/NOTES.md).
    script = Path(__file__).with_name("aot_compile.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(script), "-k", "bf16"], capture_output=True, text=True, env=env,
                          timeout=900)
    lines = {line.split(":")[0][5:]: line for line in proc.stdout.splitlines() if line.startswith("ok ")}
    for name in ("linear_fwd[*bf16,bias=True][aligned]", "linear_bwd_dx[*bf16][aligned]",
                 "linear_bwd_dw[*bf16,mode=0][aligned]"):
        assert name in lines, proc.stdout + proc.stderr
        fields = dict(part.strip().split("=") for part in lines[name].split(":", 1)[1].split(","))
        assert int(fields["wgmma"]) > 0 and int(fields["cp.async"]) > 0, lines[name]
