"""The int64-offset kernels (``WIDE``) against the reference, on small tensors.

The launchers pick these variants only for tensors past 2^31 elements (``fits_int32``), too
large for the interpreter; here ``fits_int32`` answers no, so the same small cases as the
other kernel tests run the WIDE kernels and their launch settings (a halved pixel / row block,
no autotuning: ``_config.WIDE_HALVED``). The GPU runs the real large cases (test_gpu.py).
"""

import pytest
import torch
from test_kernels_conv import GEOMETRIES
from test_kernels_conv import _check_all as check_conv
from test_kernels_conv import _inputs as conv_inputs
from test_kernels_linear import _check_all as check_linear
from test_kernels_linear import _inputs as linear_inputs

from spafl.kernels import _config, threshold_conv2d, threshold_linear, threshold_mask

pytestmark = pytest.mark.interpreter


@pytest.fixture
def wide(monkeypatch):
    """Every launch takes its int64 variant; returns the GEMM launches' ``(family, WIDE, meta)``."""
    launches = []
    real_launch, real_go = _config.launch, threshold_linear._go

    def recording_launch(kernel, family, grid, fixed, args, consts, **kwargs):
        launches.append((family, consts.get("WIDE"), dict(fixed)))
        return real_launch(kernel, family, grid, fixed, args, consts, **kwargs)

    def recording_go(kernel, plan, *args):
        # The Linear launchers run planned launches (the plan already holds the WIDE choice).
        launches.append((plan.family, plan.consts.get("WIDE"), dict(plan.fixed)))
        return real_go(kernel, plan, *args)

    for module in (threshold_linear, threshold_conv2d, threshold_mask):
        monkeypatch.setattr(module, "fits_int32", lambda *tensors, margin=1024: False)
    monkeypatch.setattr(threshold_conv2d, "launch", recording_launch)
    monkeypatch.setattr(threshold_linear, "_go", recording_go)
    # Plans are kept per shape with the fits_int32 answer of their first call: none made
    # outside this test may serve it, nor its plans serve later tests.
    _config._PLANS.clear()
    yield launches
    _config._PLANS.clear()


@pytest.mark.parametrize("mode", ["exact", "skip", "sample"])
@pytest.mark.parametrize("shape", [(37, 53, 41), (70, 67, 1)], ids=lambda s: "x".join(map(str, s)))
def test_linear_wide_kernels_match_reference(wide, shape, mode, device):
    check_linear(*linear_inputs(*shape, torch.float32, 0.4, device), mode, torch.float32)
    families = {family for family, _, _ in wide}
    assert families >= {"linear_fwd", "linear_dx", f"linear_dw{['exact', 'skip', 'sample'].index(mode)}"}
    assert all(flag is True for _, flag, _ in wide), wide


@pytest.mark.parametrize("compact_weight", [False, True])
def test_linear_wide_bf16_and_both_weight_paths(wide, compact_weight, device):
    check_linear(*linear_inputs(33, 97, 65, torch.bfloat16, 0.3, device), "skip", torch.bfloat16,
                 compact_weight=compact_weight)


@pytest.mark.parametrize("mode", ["exact", "sample"])
@pytest.mark.parametrize("name", ["3x3-stride2", "5x5-stride3-pad2", "3x5-mixed"])
def test_conv_wide_kernels_match_reference(wide, name, mode, device):
    check_conv(*conv_inputs(GEOMETRIES[name], torch.float32, 0.4, device), mode, torch.float32)
    assert {family for family, _, _ in wide} >= {"conv_fwd", "conv_dx"}
    assert all(flag is True for _, flag, _ in wide), wide


def test_conv_wide_channels_last_bf16(wide, device):
    check_conv(*conv_inputs(GEOMETRIES["3x3-pad1"], torch.bfloat16, 0.4, device, channels_last=True), "skip",
               torch.bfloat16)
