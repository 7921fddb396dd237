"""The functional API, the autograd Function and the ThresholdConv2d module."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import spafl
from conftest import assert_close
from spafl import ThresholdConv2d, sparsify, threshold_conv2d, threshold_for_density

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same'")


def _layer_pair(density=0.4, mode="exact", device="cpu", dtype=torch.float32, **conv):
    torch.manual_seed(0)
    options = {"in_channels": 5, "out_channels": 23, "kernel_size": 3, "padding": 1}
    options.update(conv)
    ref = ThresholdConv2d(**options, backend="reference", backward_mode=mode, device=device, dtype=dtype)
    with torch.no_grad():
        ref.threshold.copy_(threshold_for_density(ref.weight, density))
    tri = copy.deepcopy(ref)
    tri.backend = "triton"
    return ref, tri


def _run_both(ref, tri, x):
    outs, grads = [], []
    for layer in (ref, tri):
        xi = x.clone().requires_grad_()
        y = layer(xi)
        (y * torch.linspace(-1, 1, y.numel(), device=y.device).reshape(y.shape)).sum().backward()
        outs.append(y)
        grads.append([xi.grad, layer.weight.grad, layer.threshold.grad]
                     + ([layer.bias.grad] if layer.bias is not None else []))
    return outs, grads


def _assert_same(outs, grads, dtype=torch.float32):
    assert_close(outs[1], outs[0], dtype, "y")
    for name, a, e in zip(["dx", "dW", "dtau", "db"][: len(grads[0])], grads[1], grads[0], strict=True):
        assert_close(a, e, dtype, name)


@pytest.mark.interpreter
@pytest.mark.parametrize("mode", ["exact", "skip", "sample"])
@pytest.mark.parametrize("bias", [True, False])
def test_triton_layer_matches_reference_layer_through_autograd(mode, bias, device):
    ref, tri = _layer_pair(mode=mode, device=device, bias=bias, stride=2)
    _assert_same(*_run_both(ref, tri, torch.randn(2, 5, 9, 8, device=device)))


@pytest.mark.interpreter
@pytest.mark.parametrize("channels_last", [False, True])
def test_pointwise_convolution_runs_on_the_linear_kernels_when_channels_last(channels_last, device, monkeypatch):
    ref, tri = _layer_pair(kernel_size=1, padding=0, device=device)
    x = torch.randn(2, 5, 6, 7, device=device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    calls = []
    import spafl.kernels as kernels

    for name in ("threshold_conv2d_fwd", "threshold_linear_fwd"):
        original = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    outs, grads = _run_both(ref, tri, x)
    _assert_same(outs, grads)
    assert calls == ["threshold_linear_fwd" if channels_last else "threshold_conv2d_fwd"]
    assert outs[1].is_contiguous(memory_format=torch.channels_last) == channels_last
    assert grads[1][0].is_contiguous(memory_format=torch.channels_last) == channels_last


@pytest.mark.interpreter
def test_unbatched_input_and_collapse_guard_on_the_triton_path(device):
    ref, tri = _layer_pair(density=1 / 23, device=device, collapse_density=0.05)
    x = torch.randn(5, 6, 6, device=device)
    y = tri(x)
    assert y.shape == (23, 6, 6)
    assert (tri.threshold == 0).all() and tri.collapse_resets.item() == 1
    assert_close(y, ref(x), torch.float32, "y after the guard")


def test_reference_layer_matches_straight_through_surrogate():
    layer, _ = _layer_pair(stride=2, dilation=2)
    x = torch.randn(3, 5, 11, 10, requires_grad=True)
    layer(x).square().sum().backward()
    w, tau, b = (p.detach().clone().requires_grad_() for p in (layer.weight, layer.threshold, layer.bias))
    xs = x.detach().clone().requires_grad_()
    gap = w.abs().flatten(1).mean(1) - tau
    mult = (gap > 0).float() + gap - gap.detach()
    F.conv2d(xs, w * mult[:, None, None, None], b, 2, 1, 2).square().sum().backward()
    for name, a, e in zip(["dx", "dW", "dtau", "db"], [x.grad, layer.weight.grad, layer.threshold.grad,
                                                       layer.bias.grad], [xs.grad, w.grad, tau.grad, b.grad],
                          strict=True):
        torch.testing.assert_close(a, e, msg=name)


@pytest.mark.parametrize(
    "conv",
    [
        {"kernel_size": 3},
        {"kernel_size": (3, 1), "stride": (2, 1), "padding": (1, 0), "bias": False},
        {"kernel_size": 4, "padding": "same", "dilation": 2},
        {"kernel_size": 3, "padding": 1, "padding_mode": "reflect"},
        {"kernel_size": 3, "padding": 2, "padding_mode": "circular", "stride": 2},
        {"kernel_size": 5, "padding": "same", "padding_mode": "replicate"},
        {"kernel_size": 3, "padding": 1, "groups": 2},
        {"kernel_size": 3, "padding": 1, "groups": 8},  # depthwise
    ],
    ids=str,
)
def test_fresh_layer_equals_nn_conv2d_and_to_dense_round_trips(conv):
    torch.manual_seed(1)
    dense = nn.Conv2d(8, 8, **conv)
    layer = ThresholdConv2d.from_dense(dense)
    assert (layer.threshold == 0).all() and layer.density == 1.0
    x = torch.randn(2, 8, 9, 10)
    torch.testing.assert_close(layer(x), dense(x))
    with torch.no_grad():
        layer.threshold.copy_(threshold_for_density(layer.weight, 0.5))
    back = layer.to_dense()
    assert type(back) is nn.Conv2d and back.padding_mode == dense.padding_mode
    torch.testing.assert_close(back(x), layer(x))
    assert (back.weight[~layer.mask] == 0).all()


def test_grouped_convolution_gradients_and_triton_backend_refusal(monkeypatch):
    ref, _ = _layer_pair(in_channels=6, out_channels=9, groups=3)
    x = torch.randn(2, 6, 5, 5, requires_grad=True)
    ref(x).sum().backward()
    assert ref.threshold.grad is not None and (ref.weight.grad[~ref.mask].abs().sum() > 0)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match="supports groups=1"):
        threshold_conv2d(x, ref.weight, ref.threshold, groups=3, backend="triton")


def test_mask_density_repr_memory_format_and_state_dict():
    layer = ThresholdConv2d(3, 10, (3, 5), stride=2, padding=1, bias=False)
    assert layer.weight.shape == (10, 3, 3, 5) and layer.threshold.shape == (10,) and layer.bias is None
    with torch.no_grad():
        layer.threshold.copy_(threshold_for_density(layer.weight, 0.3))
    assert layer.density == pytest.approx(0.3) and layer.mask.shape == (10,)
    text = repr(layer)
    assert "ThresholdConv2d(3, 10, kernel_size=(3, 5), stride=(2, 2)" in text and "density=0.300" in text
    assert "bias=False" in text
    other = ThresholdConv2d(3, 10, (3, 5), stride=2, padding=1, bias=False)
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other.mask, layer.mask)
    assert set(layer.state_dict()) == {"weight", "threshold", "collapse_resets", "previous_density"}
    dense = nn.Conv2d(4, 6, 3).to(memory_format=torch.channels_last)
    assert ThresholdConv2d.from_dense(dense).weight.is_contiguous(memory_format=torch.channels_last)


def test_autocast_runs_in_the_autocast_dtype_with_master_weights_kept():
    layer = ThresholdConv2d(4, 8, 3, padding=1)
    x = torch.randn(2, 4, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32 and layer.threshold.grad.dtype == torch.float32
    assert_close(y.float(), layer.to_dense()(x), torch.bfloat16, "y under autocast")


def test_pruned_filters_come_back_in_exact_mode_only():
    torch.manual_seed(0)
    layer = ThresholdConv2d(3, 12, 3, backward_mode="exact")
    with torch.no_grad():
        layer.threshold.copy_(threshold_for_density(layer.weight, 0.5))
    pruned = ~layer.mask
    layer(torch.randn(4, 3, 8, 8)).square().sum().backward()
    assert (layer.threshold.grad[pruned] != 0).all()
    layer.backward_mode = "skip"
    layer.threshold.grad = layer.weight.grad = None
    layer(torch.randn(4, 3, 8, 8)).square().sum().backward()
    assert (layer.threshold.grad[pruned] == 0).all() and (layer.weight.grad[pruned] == 0).all()


class _Block(nn.Module):
    """A ResNet basic block with a strided 1x1 shortcut, as in torchvision's ResNet-18."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.downsample(x))


def _check_sparsified(model, x):
    model.eval()
    y0 = model(x)
    sparsify(model, exclude=lambda name, m: name == "fc")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert not convs, f"left dense: {convs[:2]}"
    torch.testing.assert_close(model(x), y0)
    names = [n for n, _ in spafl.named_threshold_layers(model)]
    assert names and "fc" not in names
    model.train()
    model(x).sum().backward()
    assert all(layer.threshold.grad is not None for _, layer in spafl.named_threshold_layers(model))
    return names


def test_sparsify_converts_a_resnet_like_model_in_either_memory_format():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _Block(8, 16, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model.add_module("fc", nn.Linear(16, 4))
    names = _check_sparsified(model, torch.randn(2, 3, 12, 12))
    assert names == ["0", "1.conv1", "1.conv2", "1.downsample.0"]
    model = model.to(memory_format=torch.channels_last)
    y = model(torch.randn(2, 3, 12, 12).to(memory_format=torch.channels_last))
    assert y.shape == (2, 4)


def _torchvision():
    try:
        import torchvision
    except Exception as exc:  # not installed, or a build that does not match this torch
        pytest.skip(f"torchvision is not usable here: {type(exc).__name__}: {exc}")
    return torchvision


def test_sparsify_torchvision_resnet18():
    torchvision = _torchvision()
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    names = _check_sparsified(model, torch.randn(2, 3, 64, 64))
    assert len(names) == 20  # 17 3x3 / 7x7 convolutions and 3 strided 1x1 shortcuts


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"x": torch.randn(2, 4, 6, 6)}, ValueError, "4 channels"),
        ({"x": torch.randn(6, 6)}, ValueError, "at least 3 dimension"),
        ({"x": torch.randn(1, 2, 3, 6, 6)}, ValueError, r"\[B, C, H, W\] or \[C, H, W\]"),
        ({"x": torch.randn(2, 3, 2, 2)}, ValueError, "too small"),
        ({"weight": torch.randn(5, 3, 3)}, ValueError, "weight must be 4-D"),
        ({"threshold": torch.zeros(4)}, ValueError, r"threshold must have shape \(5,\)"),
        ({"bias": torch.zeros(4)}, ValueError, r"bias must have shape \(5,\)"),
        ({"x": torch.randn(2, 3, 6, 6).double()}, TypeError, "x is torch.float64"),
        ({"x": torch.randn(2, 3, 6, 6).to("meta")}, ValueError, "same device"),
        ({"bias": torch.zeros(5, dtype=torch.float64)}, TypeError, "bias is torch.float64"),
        ({"weight": torch.randn(5, 3, 3, 3).long()}, TypeError, "weight must be a floating-point"),
        ({"stride": 0}, ValueError, "stride must be >= 1"),
        ({"padding": "same", "stride": 2}, ValueError, "strided"),
        ({"groups": 2}, ValueError, "divisible by groups|expects"),
        ({"threshold": torch.tensor([0.0, float("nan"), 0, 0, 0])}, ValueError, r"non-finite .* \[1\]"),
        ({"backward_mode": "approx"}, ValueError, "backward_mode"),
    ],
)
def test_threshold_conv2d_rejects(kwargs, exc, match):
    args = {"x": torch.randn(2, 3, 6, 6), "weight": torch.randn(5, 3, 3, 3), "threshold": torch.zeros(5)}
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        threshold_conv2d(**args)


def test_layer_constructor_rejects_bad_config():
    with pytest.raises(ValueError, match="in_channels must be a positive integer"):
        ThresholdConv2d(0, 3, 3)
    with pytest.raises(ValueError, match="divisible by groups"):
        ThresholdConv2d(4, 6, 3, groups=4)
    with pytest.raises(ValueError, match="kernel_size"):
        ThresholdConv2d(4, 6, 0)
    with pytest.raises(ValueError, match="padding_mode"):
        ThresholdConv2d(4, 6, 3, padding_mode="mirror")
    with pytest.raises(TypeError, match="nn.Conv2d"):
        ThresholdConv2d.from_dense(nn.Linear(2, 2))


@pytest.mark.parametrize("mode", ["exact", "skip", "sample"])
@pytest.mark.parametrize("bias", [True, False])
def test_compact_layer_matches_reference_layer_through_autograd(mode, bias):
    ref, com = _layer_pair(mode=mode, bias=bias, stride=2)
    com.backend = "compact"
    _assert_same(*_run_both(ref, com, torch.randn(2, 5, 9, 8)))


def test_conv_guard_previous_timing_and_eval():
    torch.manual_seed(0)
    layer = ThresholdConv2d(3, 120, 3, bias=False, collapse_timing="previous")
    with torch.no_grad():
        layer.threshold.copy_(threshold_for_density(layer.weight, 1 / 120))
    x = torch.randn(2, 3, 6, 6)
    layer.eval()
    layer(x)  # eval: no guard, no buffer touched
    assert layer.previous_density.item() == 1.0 and layer.collapse_resets.item() == 0
    layer.train()
    y = layer(x)  # the previous density (1) was healthy: the sparse mask is used
    assert (y.abs().sum(dim=(0, 2, 3)) > 0).sum() == 1 and layer.previous_density.item() == pytest.approx(1 / 120)
    layer(x)  # now the guard fires
    assert (layer.threshold == 0).all() and layer.collapse_resets.item() == 1 and layer.previous_density.item() == 1
