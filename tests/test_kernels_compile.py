"""Every launch the launchers make compiles for Hopper (sm_90), without spills, even on a CPU box.

The interpreter executes kernels with NumPy and accepts programs that the real compiler
rejects (loop-carried type changes, layouts) or compiles badly (register spills); Triton can
lower to a cubin offline with the ptxas it ships, so this catches those without a GPU.
tests/aot_compile.py records the launches of realistic aligned and ragged cases (bf16, fp16,
fp32 with and without TF32; Linear and Conv2d, NCHW and channels-last, every backward mode), of
the int64-offset variants and of every autotune candidate configuration, and compiles each one
as Triton's launcher would specialise it. CI runs this under Triton 3.9 and 3.6 (the GPU
machines' version).
"""

import json
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

MAIN_KERNELS = ("_threshold_linear_fwd_kernel", "_threshold_linear_bwd_dx_kernel", "_threshold_linear_bwd_dw_kernel",
                "_threshold_conv2d_fwd_kernel", "_threshold_conv2d_bwd_dx_kernel", "_threshold_conv2d_bwd_dw_kernel")


@pytest.fixture(scope="module")
def aot(tmp_path_factory):
    # One compile of every launch, shared by the tests below. A subprocess, because
    # TRITON_INTERPRET=1 (set by conftest) turns the kernels into interpreted functions.
    out = tmp_path_factory.mktemp("aot") / "reports.json"
    script = Path(__file__).with_name("aot_compile.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    jobs = str(min(os.cpu_count() or 1, 4))
    proc = subprocess.run([sys.executable, str(script), "--arch", "90", "--check", "--json", str(out), "--jobs", jobs],
                          capture_output=True, text=True, env=env, timeout=2400)
    reports = json.loads(out.read_text()) if out.exists() else []
    return proc, {r["name"]: r for r in reports}


def _main(reports: dict, prefixes: tuple[str, ...]) -> list[dict]:
    return [r for name, r in reports.items() if name.startswith(prefixes) and r["kernel"] in MAIN_KERNELS]


def test_every_launch_compiles_for_sm90_without_spills(aot):
    proc, reports = aot
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0 and " 0 failed" in proc.stdout, log
    main = _main(reports, ("",))
    # Each GEMM kernel in several specialisations: dtypes, modes, layouts, aligned and ragged.
    assert {r["kernel"] for r in main} == set(MAIN_KERNELS) and len(main) >= 30, log
    spilled = [r["name"] for r in main if r["local_instructions"]]
    assert not spilled, f"register spills in {spilled}\n{log}"


def test_the_grouped_backward_compiles_without_spills(aot):
    # dX and dW in one launch (skip / exact mode with the forward's products): both GEMM loops
    # in one kernel must still fit the registers, and aligned 16-bit keeps wgmma and cp.async.
    _, reports = aot
    grouped = [r for r in reports.values() if r["kernel"] == "_threshold_linear_bwd_kernel"]
    # (compact gradients, skip and exact mode: bf16 aligned and ragged, fp16, TF32)
    assert len(grouped) >= 6 and any(r["name"].startswith("linear-fp32-tf32:") for r in grouped)
    assert any("MODE=0" in r["name"] for r in grouped) and any("MODE=1" in r["name"] for r in grouped)
    assert not [r["name"] for r in grouped if r["local_instructions"]]
    aligned = [r for r in grouped if r["name"].startswith(("linear-bf16:", "linear-fp16:"))]
    assert aligned and all(r["wgmma"] > 0 and r["cp_async"] > 0 for r in aligned), aligned


def test_aligned_16bit_gemms_use_wgmma_and_a_cp_async_pipeline(aot):
    # A structural guard, not a timing: aligned 16-bit operands (contiguous; for the convolutions
    # channels-last, or NCHW converted by the launcher) must keep the Hopper tensor-core
    # instructions and a software pipeline fed by cp.async in the main loop (benchmarks/NOTES.md).
    _, reports = aot
    main = _main(reports, ("linear-bf16:", "linear-fp16:", "conv3x3-bf16-cl:", "conv3x3-fp16-cl:",
                           "conv3x3s2-bf16-nchw:", "conv1x1s2-bf16-cl:"))
    assert len(main) >= 12
    for r in main:
        assert r["wgmma"] > 0 and r["cp_async"] > 0 and r["loop_ldgsts"] > 0, r


def test_fp32_compiles_with_and_without_tf32(aot):
    # TF32 (torch's allow_tf32 settings on) runs on the tensor cores; IEEE fp32 (the default for
    # matmuls) cannot, and its main loop is FFMA.
    _, reports = aot
    tf32 = _main(reports, ("linear-fp32-tf32:", "conv3x3-fp32-tf32:"))
    ieee = _main(reports, ("linear-fp32-ieee:", "conv3x3-fp32-ieee:"))
    assert len(tf32) == len(ieee) >= 6
    assert all(r["wgmma"] > 0 for r in tf32), tf32
    assert all(r["wgmma"] == 0 and r["loop_mma"] > 0 for r in ieee), ieee


def test_int64_variants_and_every_autotune_candidate_compile(aot):
    # The int64-offset kernels (tensors past 2^31 elements) and each candidate the autotuner may
    # pick are compiled too, so the no-spill check above covers them.
    _, reports = aot
    main = _main(reports, ("",))
    assert {r["kernel"] for r in main if "WIDE=True" in r["name"]} == set(MAIN_KERNELS)
    tuned = [r for r in main if "-tuned:" in r["name"]]
    assert {r["kernel"] for r in tuned if "num_stages=4" in r["name"]} == set(MAIN_KERNELS)
    # (No 4-warp candidate for the conv dW, nor for the conv forward at these cases' sizes: with
    # fewer pixel tiles than SMs its fixed pixel tile is halved already, and fewer warps on it
    # would hold a larger tile per thread: candidate_metas drops those.)
    assert {r["kernel"] for r in tuned if "num_warps=4" in r["name"]} == set(MAIN_KERNELS) - {
        "_threshold_conv2d_bwd_dw_kernel", "_threshold_conv2d_fwd_kernel"}


def test_fused_optimizer_step_compiles_without_spills(aot):
    # kernels/threshold_optim.py: SGD (momentum, Nesterov, first step), Adam and AdamW, guard on
    # and off, 16-bit and fp32, aligned and ragged, int32 and int64 offsets.
    proc, reports = aot
    fused = [r for r in reports.values() if r["kernel"] == "_fused_step_kernel"]
    assert len(fused) >= 16, proc.stdout + proc.stderr
    assert any("WIDE=True" in r["name"] for r in fused)
    assert not [r["name"] for r in fused if r["local_instructions"]]
