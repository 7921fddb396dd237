"""CUDA-only checks: native kernels at larger shapes, bf16, TF32, and the CUDA-side options.

Skipped without a CUDA device (the same kernels run in the interpreter in the other tests).
The kernels run with their fixed launch configurations (autotuning has its own test).
``SPAFL_GPU_QUICK=1`` keeps one or two shapes per kernel and dtype (benchmarks/run_gpu.sh runs
that subset in a short GPU slot: every distinct shape is a compile of every kernel).
"""

import copy
import os

import pytest
import torch

import spafl
from conftest import HAS_CUDA, assert_close
from spafl import (
    ThresholdConv2d,
    ThresholdLinear,
    reference,
    sparsify,
    threshold_conv2d,
    threshold_for_density,
    threshold_linear,
)
from spafl._conv import conv_geometry
from spafl.kernels import (
    threshold_conv2d_bwd,
    threshold_conv2d_fwd,
    threshold_linear_bwd,
    threshold_linear_fwd,
    threshold_row_mask,
)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]

QUICK = os.environ.get("SPAFL_GPU_QUICK") == "1"
DTYPES = [torch.float32, torch.bfloat16] if QUICK else [torch.float32, torch.float16, torch.bfloat16]
DENSITIES = [0.0, 0.1, 1.0] if QUICK else [0.0, 0.1, 0.5, 1.0]


@pytest.fixture(autouse=True)
def _fixed_configs():
    from spafl.kernels import _config

    with _config.fixed_configs():
        yield


LINEAR_CASES = [(shape, dtype) for shape in [(1000, 1531, 769), (4096, 1024, 2048), (1, 4096, 4096)]
                for dtype in DTYPES if not QUICK or (shape[0] == 1000 or dtype == torch.bfloat16) and shape[0] > 1]


@pytest.mark.parametrize("shape, dtype", LINEAR_CASES, ids=str)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("mode", ["exact", "skip", "sample"])
def test_large_shapes_match_reference(shape, dtype, density, mode):
    m, n, k = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g).cuda().to(dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).cuda().to(dtype)
    b = torch.randn(n, generator=g).cuda().to(dtype)
    dy = torch.randn(m, n, generator=g).cuda().to(dtype)
    tau = threshold_for_density(w, density)
    rm = threshold_row_mask(w, tau)
    ref = reference.row_mask(w, tau)
    assert torch.equal(rm.mask, ref.mask) and torch.equal(rm.perm, ref.perm)
    assert_close(threshold_linear_fwd(x, w, b, rm), reference.threshold_linear_forward(x, w, ref.mask, b), dtype, "y")
    dx, dw, dtau = threshold_linear_bwd(dy, x, w, rm, mode=mode, threshold_dtype=tau.dtype)
    rdx, rdw, rdtau, _ = reference.threshold_linear_backward(dy, x, w, ref.mask.to(dtype), ref.mask,
                                                             has_bias=False, mode=mode)
    assert_close(dx, rdx, dtype, "dx")
    assert_close(dw, rdw, dtype, "dW")
    assert_close(dtau, rdtau, dtype, "dtau")


@pytest.mark.parametrize("shape", [(1000, 1531, 769), (512, 4096, 4096)], ids=str)
@pytest.mark.parametrize("density", [0.1, 1.0])
@pytest.mark.parametrize("mode", ["exact", "skip"])
def test_grouped_backward_at_large_shapes(shape, density, mode):
    # Compact gradients from the forward's products: dX and dW in one persistent launch (many
    # units per program), against dW's launch alone and against the reference's dX.
    m, n, k = shape
    g = torch.Generator().manual_seed(1)
    x = torch.randn(m, k, generator=g).cuda().bfloat16()
    w = (torch.randn(n, k, generator=g) / k**0.5).cuda().bfloat16()
    dy = torch.randn(m, n, generator=g).cuda().bfloat16()
    rm = threshold_row_mask(w, threshold_for_density(w, density))
    z = torch.empty(m, n, device="cuda")
    threshold_linear_fwd(x, w, None, rm, z_out=z, z_all=mode == "exact")
    r, r_alone = torch.empty(n, device="cuda"), torch.empty(n, device="cuda")
    dx, dw, dtau = threshold_linear_bwd(dy, x, w, rm, mode=mode, z=z, r_out=r)
    _, dw_alone, dtau_alone = threshold_linear_bwd(dy, x, w, rm, mode=mode, z=z, r_out=r_alone, need_dx=False)
    rows = rm.perm[:int(rm.count)].long()
    assert torch.equal(dw[rows], dw_alone[rows]) and torch.equal(dtau, dtau_alone) and torch.equal(r, r_alone)
    rdx = reference.threshold_linear_backward(dy, x, w, rm.mask.bfloat16(), rm.mask, has_bias=False, mode=mode)[0]
    assert_close(dx, rdx, torch.bfloat16, "dx")


def test_tf32_follows_torch_setting():
    x = torch.randn(512, 512, device="cuda")
    w = torch.randn(256, 512, device="cuda") / 20
    tau = torch.zeros(256, device="cuda")
    exact = reference.threshold_linear_forward(x.double(), w.double(), torch.ones(256, dtype=torch.bool,
                                                                                   device="cuda"))
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        err_ieee = (threshold_linear(x, w, tau, backend="triton").double() - exact).abs().max()
        torch.backends.cuda.matmul.allow_tf32 = True
        err_tf32 = (threshold_linear(x, w, tau, backend="triton").double() - exact).abs().max()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert err_ieee < 1e-4 < err_tf32 < 5e-2


def test_check_finite_on_cuda_only_when_asked():
    layer = ThresholdLinear(8, 4, device="cuda")
    with torch.no_grad():
        layer.threshold[1] = float("nan")
    layer(torch.randn(2, 8, device="cuda"))  # default: no check (it would sync every call)
    layer.check_finite = True
    with pytest.raises(ValueError, match="non-finite"):
        layer(torch.randn(2, 8, device="cuda"))


def test_auto_backend_uses_triton_on_cuda_and_layer_trains():
    torch.manual_seed(0)
    layer = ThresholdLinear(64, 32, device="cuda", dtype=torch.bfloat16)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(256, 64, device="cuda", dtype=torch.bfloat16)
    target = torch.randn(256, 32, device="cuda", dtype=torch.bfloat16)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = (layer(x) - target).float().square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_strided_operands_past_int32_offsets():
    # Weight rows 2^31 + 16 elements apart (a view of a 4.3 GB buffer): element offsets pass
    # 2^31, so the launchers must pick the kernels' int64 offsets.
    storage = torch.randn(2**31 + 16 + 65536, device="cuda", dtype=torch.float16)
    w = storage.as_strided((2, 65536), (2**31 + 16, 1))
    tau = torch.zeros(2, device="cuda", dtype=torch.float16)
    rm = threshold_row_mask(w, tau)
    assert torch.equal(rm.mask, reference.row_mask(w, tau).mask)
    x = torch.randn(3, 65536, device="cuda", dtype=torch.float16)
    assert_close(threshold_linear_fwd(x, w, None, rm), reference.threshold_linear_forward(x, w, rm.mask),
                 torch.float16, "y")
    dy = torch.randn(3, 2, device="cuda", dtype=torch.float16)
    dx, dw, dtau = threshold_linear_bwd(dy, x, w, rm, mode="exact")
    rdx, rdw, rdtau, _ = reference.threshold_linear_backward(dy, x, w, rm.mask.half(), rm.mask, has_bias=False)
    for name, got, want in (("dx", dx, rdx), ("dW", dw, rdw), ("dtau", dtau, rdtau)):
        assert_close(got, want, torch.float16, name)


LAYERS = {
    "linear": (lambda mode: ThresholdLinear(96, 200, device="cuda", backward_mode=mode), (64, 96)),
    "conv": (lambda mode: ThresholdConv2d(32, 64, 3, padding=1, device="cuda", backward_mode=mode), (8, 32, 16, 16)),
}


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("mode", ["exact", "skip", "sample"])
def test_training_step_never_synchronises_with_the_host(kind, mode):
    # Mask, compaction, collapse guard, forward and backward: all on the device. PyTorch's sync
    # debug mode raises on any synchronising call (.item(), nonzero(), a device-to-host copy).
    make, x_shape = LAYERS[kind]
    layer = make(mode)
    with torch.no_grad():
        layer.threshold.fill_(10.0)  # forces the collapse guard to fire on the first step
    x = torch.randn(*x_shape, device="cuda")
    if x.dim() == 4:
        x = x.to(memory_format=torch.channels_last)
    layer(x).sum().backward()  # warm-up: kernel compilation may synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            layer(x).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert layer.collapse_resets.item() == 1


@pytest.mark.parametrize("mode", ["exact", "skip"])
def test_prepared_kept_call_per_stream_matches_the_general_call(mode):
    # The kept call's prepared launches hold the current stream's tickets and scratch: a call on
    # another stream prepares its own; every step equals the general call's (the backward runs on
    # autograd's device thread, whose prepared backward is its own too).
    from spafl._functions import PreparedTriton

    torch.manual_seed(11)
    kept = ThresholdLinear(96, 200, device="cuda", backward_mode=mode, dtype=torch.bfloat16, check_finite=False)
    plain = copy.deepcopy(kept)
    with torch.no_grad():
        for layer in (kept, plain):
            layer.threshold.copy_(threshold_for_density(layer.weight, 0.3))
    xs = [torch.randn(64, 96, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    side = torch.cuda.Stream()

    def step(layer, x):
        layer.zero_grad(set_to_none=True)
        x = x.clone().requires_grad_(True)
        y = layer(x)
        y.float().square().sum().backward()
        return [y.detach(), x.grad, layer.weight.grad, layer.threshold.grad, layer.bias.grad]

    got = [step(kept, xs[0]), step(kept, xs[1])]
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got += [step(kept, xs[2]), step(kept, xs[3])]
    torch.cuda.current_stream().wait_stream(side)
    prepared = [v for v in kept.__dict__["_device_call"].prepared.values() if isinstance(v, PreparedTriton)]
    assert len(prepared) == 2
    kept_call = spafl.layers.device_call_of
    spafl.layers.device_call_of = lambda *a, **k: None
    try:
        want = [step(plain, x) for x in xs]
    finally:
        spafl.layers.device_call_of = kept_call
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        for j, (a, b) in enumerate(zip(g, w, strict=True)):
            assert torch.equal(a, b), (i, j)


# (batch, cin, cout, size, kernel, stride, padding): ResNet-18 layers, its stem, a ragged case.
CONV_SHAPES = {
    "resnet-64x64-32px": (64, 64, 64, 32, 3, 1, 1),
    "resnet-64x128-stride2": (32, 64, 128, 32, 3, 2, 1),
    "resnet-shortcut-1x1-stride2": (32, 64, 128, 32, 1, 2, 0),
    "stem-7x7": (8, 3, 64, 64, 7, 2, 3),
    "ragged-5x5": (5, 37, 51, 19, 5, 1, 2),
    "resnet-256x256-8px": (32, 256, 256, 8, 3, 1, 1),  # several filter tiles on the GPU
}


# The quick subset: these (shape, channels-last) pairs at bf16, the first also at fp32.
QUICK_CONV = [("resnet-64x64-32px", True), ("resnet-64x128-stride2", False), ("ragged-5x5", False),
              ("stem-7x7", False)]
CONV_CASES = [(name, cl, dtype) for name in CONV_SHAPES for cl in (False, True) for dtype in DTYPES
              if not QUICK or (name, cl) in QUICK_CONV and (dtype == torch.bfloat16 or (name, cl) == QUICK_CONV[0])]


@pytest.mark.parametrize("name, channels_last, dtype", CONV_CASES, ids=str)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("mode", ["exact", "skip", "sample"])
def test_conv_shapes_match_reference(name, dtype, density, mode, channels_last):
    b, cin, cout, size, k, stride, pad = CONV_SHAPES[name]
    geo = conv_geometry(k, stride, pad)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, cin, size, size, generator=g).cuda().to(dtype)
    w = (torch.randn(cout, cin, k, k, generator=g) / (cin * k * k) ** 0.5).cuda().to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
        w = w.to(memory_format=torch.channels_last)
    bias = torch.randn(cout, generator=g).cuda().to(dtype)
    ho, wo = geo.output_size(size, size)
    dy = torch.randn(b, cout, ho, wo, generator=g).cuda().to(dtype)
    tau = threshold_for_density(w, density)
    rm = threshold_row_mask(w.reshape(cout, -1), tau)
    ref = reference.row_mask(w, tau)
    assert torch.equal(rm.mask, ref.mask) and torch.equal(rm.perm, ref.perm)
    y_ref = reference.threshold_conv2d_forward(x, w, ref.mask, bias, geo)
    assert_close(threshold_conv2d_fwd(x, w, bias, rm, geo), y_ref, dtype, "y")
    dx, dw, dtau = threshold_conv2d_bwd(dy, x, w, rm, geo, mode=mode, threshold_dtype=tau.dtype)
    rdx, rdw, rdtau, _ = reference.threshold_conv2d_backward(dy, x, w, ref.mask.to(dtype), ref.mask, geo,
                                                             has_bias=False, mode=mode)
    assert_close(dx, rdx, dtype, "dx")
    assert_close(dw, rdw, dtype, "dW")
    assert_close(dtau, rdtau, dtype, "dtau")


def test_conv_tf32_follows_the_cudnn_setting():
    x = torch.randn(16, 64, 16, 16, device="cuda")
    w = torch.randn(64, 64, 3, 3, device="cuda") / 24
    tau = torch.zeros(64, device="cuda")
    exact = torch.nn.functional.conv2d(x.double(), w.double(), padding=1)
    old = torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = False
        err_ieee = (threshold_conv2d(x, w, tau, padding=1, backend="triton").double() - exact).abs().max()
        torch.backends.cudnn.allow_tf32 = True
        err_tf32 = (threshold_conv2d(x, w, tau, padding=1, backend="triton").double() - exact).abs().max()
    finally:
        torch.backends.cudnn.allow_tf32 = old
    assert err_ieee < 1e-4 < err_tf32 < 5e-2


def test_torchvision_resnet18_trains_on_the_triton_path():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = sparsify(torchvision.models.resnet18(num_classes=10)).cuda().to(memory_format=torch.channels_last)
    reference_model = copy.deepcopy(model)
    for layer in reference_model.modules():
        if hasattr(layer, "backend"):
            layer.backend = "reference"
    with torch.no_grad():
        for (_, a), (_, b) in zip(spafl.named_threshold_layers(model), spafl.named_threshold_layers(reference_model),
                                  strict=True):
            a.threshold.copy_(threshold_for_density(a.weight, 0.5))
            b.threshold.copy_(a.threshold)
    x = torch.randn(16, 3, 64, 64, device="cuda").to(memory_format=torch.channels_last)
    outs = []
    for m in (model, reference_model):
        m.train()
        y = m(x)
        y.square().mean().backward()
        outs.append(y)
    # Twenty layers with batch norm between them: summation-order differences grow with depth.
    assert_close(outs[0], outs[1], torch.float16, "logits")
    for (name, a), (_, b) in zip(spafl.named_threshold_layers(model), spafl.named_threshold_layers(reference_model),
                                 strict=True):
        assert_close(a.threshold.grad, b.threshold.grad, torch.bfloat16, f"{name} dtau")


GEOMETRIES = [(3, 1, 2, 2), (5, 3, 2, 1), (2, 1, "same", 1), ((3, 1), (2, 1), (1, 0), 1), (3, 1, "valid", (2, 3))]


@pytest.mark.parametrize("kernel, stride, padding, dilation", GEOMETRIES[:2] if QUICK else GEOMETRIES, ids=str)
@pytest.mark.parametrize("mode", ["exact", "skip", "sample"])
def test_conv_geometries_and_strided_views_match_reference(kernel, stride, padding, dilation, mode):
    geo = conv_geometry(kernel, stride, padding, dilation)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 48, 23, 42, generator=g).cuda()[..., ::2]  # no unit stride
    w = (torch.randn(200, 48, *geo.kernel, generator=g) / 20).cuda()
    ho, wo = geo.output_size(23, 21)
    dy = torch.randn(6, 200, wo, ho, generator=g).cuda().transpose(2, 3)
    tau = threshold_for_density(w, 0.3)
    rm = threshold_row_mask(w.reshape(200, -1), tau)
    y_ref = reference.threshold_conv2d_forward(x, w, rm.mask, None, geo)
    assert_close(threshold_conv2d_fwd(x, w, None, rm, geo), y_ref, torch.float32, "y")
    got = threshold_conv2d_bwd(dy, x, w, rm, geo, mode=mode, split=3)
    want = reference.threshold_conv2d_backward(dy, x, w, rm.mask.float(), rm.mask, geo, has_bias=False, mode=mode)
    for name, a, e in zip(("dx", "dW", "dtau"), got, want[:3], strict=True):
        assert_close(a, e, torch.float32, name)


def test_conv_offsets_past_int32():
    # A channels-last image of 16 x 16384 x 8200 half elements (4.3 GB): pixel offsets pass
    # 2^31, so the launchers must pick the kernels' int64 offsets.
    x = torch.zeros(1, 16, 16384, 8200, device="cuda", dtype=torch.float16).to(memory_format=torch.channels_last)
    x[0, :, -1, -1] = torch.arange(16, device="cuda", dtype=torch.float16)
    x[0, :, 0, 0] = 1.0
    w = torch.ones(4, 16, 3, 3, device="cuda", dtype=torch.float16).to(memory_format=torch.channels_last)
    tau = torch.zeros(4, device="cuda", dtype=torch.float16)
    rm = threshold_row_mask(w.reshape(4, -1), tau)
    y = threshold_conv2d_fwd(x, w, None, rm, conv_geometry(3, 1, 1))
    assert y[0, :, -1, -1].tolist() == [120.0] * 4 and y[0, :, -2, -2].tolist() == [120.0] * 4
    assert y[0, :, 0, 0].tolist() == [16.0] * 4 and y[0, :, 2, 2].tolist() == [0.0] * 4


def test_fused_row_mask_is_identical_from_launch_to_launch():
    # One launch scores the rows and the last program to finish compacts them (a ticket
    # counter): many programs, repeated launches, always the reference's sorted list.
    w = torch.randn(100_003, 64, device="cuda")
    tau = threshold_for_density(w, 0.3)
    ref = reference.row_mask(w, tau)
    for _ in range(20):
        rm = threshold_row_mask(w, tau)
        assert torch.equal(rm.perm, ref.perm) and torch.equal(rm.count, ref.count)


@pytest.mark.parametrize("compact_weight", [False, True])
def test_autotuned_launches_match_reference(compact_weight):
    # Autotuning (its candidates compile and run, the grid follows each one) and both weight
    # paths, with a density hint.
    from spafl.kernels import _config

    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 768, generator=g).cuda().bfloat16()
    w = (torch.randn(640, 768, generator=g) / 28).cuda().bfloat16()
    dy = torch.randn(512, 640, generator=g).cuda().bfloat16()
    tau = threshold_for_density(w, 0.3)
    with _config.autotuning(True):
        rm = threshold_row_mask(w, tau)
        y = threshold_linear_fwd(x, w, None, rm, density_hint=0.3, compact_weight=compact_weight)
        dx, dw, dtau = threshold_linear_bwd(dy, x, w, rm, mode="skip", density_hint=0.3, compact_weight=compact_weight)
        xc = torch.randn(16, 64, 16, 16, generator=g).cuda().bfloat16().to(memory_format=torch.channels_last)
        wc = (torch.randn(96, 64, 3, 3, generator=g) / 24).cuda().bfloat16()
        dyc = torch.randn(16, 96, 16, 16, generator=g).cuda().bfloat16()
        tauc = threshold_for_density(wc, 0.3)
        rmc = threshold_row_mask(wc.reshape(96, -1), tauc)
        geo = conv_geometry(3, 1, 1)
        yc = threshold_conv2d_fwd(xc, wc, None, rmc, geo, density_hint=0.3, compact_weight=compact_weight)
        gc = threshold_conv2d_bwd(dyc, xc, wc, rmc, geo, mode="skip", density_hint=0.3, compact_weight=compact_weight)
    assert _config._tuners, "no autotuner ran"
    assert_close(y, reference.threshold_linear_forward(x, w, rm.mask), torch.bfloat16, "y")
    want = reference.threshold_linear_backward(dy, x, w, rm.mask.bfloat16(), rm.mask, has_bias=False, mode="skip")
    for name, got, exp in zip(("dx", "dW", "dtau"), (dx, dw, dtau), want[:3], strict=True):
        assert_close(got, exp, torch.bfloat16, name)
    assert_close(yc, reference.threshold_conv2d_forward(xc, wc, rmc.mask, None, geo), torch.bfloat16, "conv y")
    wantc = reference.threshold_conv2d_backward(dyc, xc, wc, rmc.mask.bfloat16(), rmc.mask, geo, has_bias=False,
                                                mode="skip")
    for name, got, exp in zip(("dx", "dW", "dtau"), gc, wantc[:3], strict=True):
        assert_close(got, exp, torch.bfloat16, f"conv {name}")


def test_warmup_compiles_exactly_what_the_run_launches():
    # benchmarks/warmup.py compiles with compile-only launches (Triton's own warmup path), so
    # that the timed runs compile nothing: the real launches after it must find every kernel in
    # Triton's cache (no new entry) and still match the reference.
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from warmup import compile_only

    from spafl.kernels import threshold_linear as tl_mod
    from spafl.kernels import threshold_mask

    g = torch.Generator().manual_seed(3)
    x = torch.randn(256, 384, generator=g).cuda().bfloat16()
    w = (torch.randn(320, 384, generator=g) / 20).cuda().bfloat16()
    dy = torch.randn(256, 320, generator=g).cuda().bfloat16()
    tau = threshold_for_density(w, 0.4)

    def step():
        rm = threshold_row_mask(w, tau)
        return rm, threshold_linear_fwd(x, w, None, rm), threshold_linear_bwd(dy, x, w, rm, mode="skip")

    kernels = [threshold_mask._row_mask_kernel, tl_mod._threshold_linear_fwd_kernel, tl_mod._compact_grad_kernel,
               tl_mod._threshold_linear_bwd_dx_kernel, tl_mod._threshold_linear_bwd_dw_kernel,
               tl_mod._threshold_bwd_finish_kernel]
    device = torch.cuda.current_device()

    def cached():
        return [len(k.device_caches[device][0]) for k in kernels]

    with compile_only(4) as seen:
        step()
    assert seen["launches"] >= len(kernels)
    after_warmup = cached()
    assert all(n >= 1 for n in after_warmup), after_warmup
    rm, y, (dx, dw, dtau) = step()
    torch.cuda.synchronize()
    assert cached() == after_warmup, "the real launches compiled again"
    assert_close(y, reference.threshold_linear_forward(x, w, rm.mask), torch.bfloat16, "y")
    want = reference.threshold_linear_backward(dy, x, w, rm.mask.bfloat16(), rm.mask, has_bias=False, mode="skip")
    for name, got, exp in zip(("dx", "dW", "dtau"), (dx, dw, dtau), want[:3], strict=True):
        assert_close(got, exp, torch.bfloat16, name)
