"""Test set-up: the Triton kernels run natively on CUDA, else in Triton's CPU interpreter; one
intra-op thread.

TRITON_INTERPRET must be set before any kernel module is imported (``@triton.jit`` reads it
when the kernel is decorated), hence here, at the top of conftest. The tests' models are small:
extra intra-op threads only make them compete for the cores (a shared 2-core machine ran the
suite 3x slower with PyTorch's default), so the process uses one, whatever OMP_NUM_THREADS says.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch starts its thread pool

import torch  # noqa: E402

torch.set_num_threads(1)

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# fp32 references at full precision on CUDA: cuDNN convolutions default to TF32 (matmuls do
# not), and the kernels follow the same switches (tests that check TF32 turn them on).
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False

import pytest  # noqa: E402

# Tolerances per dtype, relative to the largest magnitude of the expected tensor: the kernels
# accumulate in fp32 and round once (twice for dW, whose sign term is added in a second pass),
# the reference computes in fp32 and rounds once. On CUDA, fp32 dots run in IEEE mode in the
# tests (TF32 off, see above), so fp32 is compared at fp32 rounding.
TOLERANCES = {
    torch.float32: 2e-5,
    torch.float16: 4e-3,
    torch.bfloat16: 3e-2,
    torch.float64: 1e-10,
}

DEVICE = "cuda" if HAS_CUDA else "cpu"


@pytest.fixture
def device() -> str:
    return DEVICE


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, name: str) -> None:
    """Compare with a tolerance scaled by the expected tensor's largest magnitude; on failure,
    report where and how large the worst mismatch is."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    assert torch.isfinite(a).all(), f"{name}: non-finite values in the result"
    scale = max(float(e.abs().max()) if e.numel() else 0.0, 1.0)
    tol = TOLERANCES[dtype] * scale
    err = (a - e).abs()
    if err.numel() and float(err.max()) > tol:
        idx = int(err.argmax())
        pos = tuple(int(i) for i in torch.unravel_index(torch.tensor(idx), err.shape))
        bad = int((err > tol).sum())
        raise AssertionError(
            f"{name}: {bad}/{err.numel()} elements off by more than {tol:.3g} (dtype {dtype}); worst at {pos}: "
            f"got {float(a.flatten()[idx]):.6g}, expected {float(e.flatten()[idx]):.6g}"
        )


@pytest.fixture
def poisoned_allocations(monkeypatch):
    """Make every floating-point ``torch.empty`` / ``empty_like`` return NaNs, so that an output
    element a kernel forgets to write shows up as NaN (on CPU, fresh memory is often zeros)."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without a CUDA device, leave the ``gpu`` tests out of the run (deselected, counted in the
    summary line) rather than printing hundreds of skips; ``-m gpu`` still lists them."""
    if HAS_CUDA or config.getoption("markexpr"):
        return
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if not item.get_closest_marker("gpu")]


def pytest_report_header(config: pytest.Config) -> str:
    if HAS_CUDA:
        return f"spafl: CUDA device {torch.cuda.get_device_name()}: the GPU tests run"
    return "spafl: no CUDA device: the GPU tests (marker gpu) are deselected; the kernels run in Triton's interpreter"
