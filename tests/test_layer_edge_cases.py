"""Edge cases of the threshold layers: non-finite weights, empty batches, meta tensors, copies,
pickling and reprs."""

import copy
import io
import pickle

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import spafl
from conftest import assert_close
from spafl import ThresholdConv2d, ThresholdLinear, threshold_for_density

BACKENDS = ["compact", "reference", pytest.param("triton", marks=pytest.mark.interpreter)]


def _layer(kind, backend, device="cpu", bias=True, **options):
    torch.manual_seed(0)
    if kind == "linear":
        layer = ThresholdLinear(13, 7, bias=bias, backend=backend, device=device, **options)
        x = torch.randn(5, 13, device=device)
    else:
        layer = ThresholdConv2d(3, 7, 3, padding=1, bias=bias, backend=backend, device=device, **options)
        x = torch.randn(2, 3, 6, 6, device=device)
    if device != "meta":
        with torch.no_grad():
            layer.threshold.copy_(threshold_for_density(layer.weight, 4 / 7))
    return layer, x


def _unit(y, unit):
    return y[:, unit] if y.dim() == 2 else y[:, unit].flatten(1)


# ----------------------------------------------------------------------------- non-finite weights


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("bias", [True, False])
def test_a_nan_weight_prunes_its_unit_exactly_on_every_backend(kind, backend, bias, device):
    layer, x = _layer(kind, backend, device, bias=bias, check_finite=False)
    unit = int(layer.mask.nonzero()[0])  # an active unit: the NaN must prune it
    clean = copy.deepcopy(layer)
    with torch.no_grad():
        layer.weight[unit].view(-1)[3] = float("nan")
        clean.weight[unit] = 0.0  # score 0 <= tau: pruned, and no NaN anywhere
        clean.threshold[unit] = 0.0
    assert not layer.mask[unit] and torch.equal(layer.mask, clean.mask)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    ys = [m(xi) for m, xi in zip((layer, clean), xs, strict=True)]
    want = 0.0 if layer.bias is None else float(layer.bias[unit].detach())
    assert (_unit(ys[0], unit) == want).all()  # exactly the bias (0 without bias), no NaN
    assert_close(ys[0], ys[1], torch.float32, "y")
    for y in ys:
        y.square().sum().backward()
    assert_close(xs[0].grad, xs[1].grad, torch.float32, "dx")  # the pruned NaN row adds nothing to dx
    dense = layer.to_dense()
    assert (dense.weight[unit] == 0).all() and bool(torch.isfinite(dense.weight).all())
    assert_close(dense(x), ys[0], torch.float32, "to_dense")


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_weight_is_an_error_where_values_are_checked(kind, bad):
    layer, x = _layer(kind, "auto")
    with torch.no_grad():
        layer.weight[2].view(-1)[0] = bad
    for run in (lambda: layer(x), lambda: layer.mask, lambda: layer.to_dense(), lambda: spafl.model_density(
            nn.Sequential(layer))):
        with pytest.raises(ValueError, match=r"weight has non-finite values \(NaN or inf\) in units \[2\]"):
            run()
    layer.check_finite = False  # then the documented semantics: NaN prunes, inf keeps the unit active
    assert bool(layer.mask[2]) == (bad == float("inf"))
    with pytest.raises(ValueError, match="threshold has non-finite values"):
        spafl.threshold_row_mask(layer.weight, torch.full_like(layer.threshold, float("nan")))
    with pytest.raises(TypeError, match="check_finite must be None or a bool"):
        spafl.threshold_row_mask(layer.weight, layer.threshold, check_finite="yes")


def test_non_finite_weights_are_refused_before_the_guard_changes_anything():
    layer = ThresholdLinear(4, 200)
    with torch.no_grad():
        layer.threshold.fill_(10.0)  # collapsed: the guard would fire in this forward
        layer.weight[5, 1] = float("nan")
    with pytest.raises(ValueError, match=r"units \[5\]"):
        layer(torch.randn(2, 4))
    assert (layer.threshold == 10).all() and layer.collapse_resets.item() == 0


def test_check_finite_is_validated_and_shown():
    with pytest.raises(TypeError, match="check_finite must be None or a bool, got 1"):
        ThresholdLinear(3, 3, check_finite=1)
    with pytest.raises(TypeError, match="check_finite must be None or a bool"):
        spafl.threshold_linear(torch.randn(2, 3), torch.randn(4, 3), torch.zeros(4), check_finite="no")
    assert "check_finite=False" in repr(ThresholdConv2d(2, 3, 1, check_finite=False))


# ----------------------------------------------------------------------------- empty batches


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("mode", ["exact", "skip", "sample"])
def test_an_empty_batch_runs_forward_and_backward_in_every_mode(kind, backend, mode, device):
    layer, x = _layer(kind, backend, device, backward_mode=mode)
    x = x[:0].clone().requires_grad_()
    y = layer(x)
    assert y.shape[0] == 0 and y.shape[1] == 7
    y.sum().backward()
    assert x.grad.shape == x.shape
    for p in (layer.weight, layer.threshold, layer.bias):
        assert p.grad is not None and (p.grad == 0).all()


# ----------------------------------------------------------------------------- meta tensors


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_meta_tensors_work_as_for_the_dense_layers(kind):
    layer, x = _layer(kind, "auto", "meta")
    dense = nn.Linear(13, 7, device="meta") if kind == "linear" else nn.Conv2d(3, 7, 3, padding=1, device="meta")
    assert "density=?" in repr(layer)
    with pytest.raises(ValueError, match="density needs the weights' values, and this layer is on the meta device"):
        _ = layer.density
    for train in (True, False):
        layer.train(train)
        y = layer(x)
        assert y.device.type == "meta" and y.shape == dense(x).shape
        with torch.no_grad():
            assert layer(x).shape == y.shape
    layer.train()
    xg = x.clone().requires_grad_()
    layer(xg).sum().backward()
    assert xg.grad.shape == x.shape and layer.weight.grad.device.type == "meta"
    with torch.autocast("cpu", dtype=torch.bfloat16):  # CPU autocast does not reach meta tensors
        assert layer(x).dtype == dense(x).dtype
    assert layer.mask.device.type == "meta" and type(layer.to_dense()) is type(dense)
    assert layer.to_dense().weight.device.type == "meta"
    assert type(layer).from_dense(dense).weight.device.type == "meta"
    # the usual big-model route: build on meta, materialise, initialise
    layer.to_empty(device="cpu")
    layer.reset_parameters()
    assert layer.density == 1.0 and layer(torch.randn(x.shape)).device.type == "cpu"


def test_sparsify_a_meta_model():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 6)).to("meta")
    spafl.sparsify(model)
    assert model(torch.randn(2, 1, 6, 6, device="meta")).shape == (2, 6)
    assert all(p.device.type == "meta" for p in model.parameters())


# ----------------------------------------------------------------------------- copies, pickling, reprs


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_deepcopy_pickle_and_torch_save_keep_everything(kind):
    layer, x = _layer(kind, "auto", backward_mode="sample", sample_fraction=0.5, collapse_timing="previous",
                      collapse_in_eval=True, skip_zero_inputs=True, collapse_density=0.05)
    layer(x)
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    copies = [copy.deepcopy(layer), pickle.loads(pickle.dumps(layer)), torch.load(buffer, weights_only=False)]
    for other in copies:
        assert repr(other) == repr(layer)
        for a, b in zip(layer.state_dict().values(), other.state_dict().values(), strict=True):
            assert torch.equal(a, b)
        assert other.weight is not layer.weight
        torch.testing.assert_close(other(x), layer(x))


def test_repr_shows_every_option_that_differs_from_the_default():
    layer = ThresholdLinear(3, 4, backend="compact", backward_mode="sample", sample_fraction=0.25,
                            collapse_density=None, collapse_timing="previous", collapse_in_eval=True,
                            skip_zero_inputs=True, check_finite=True)
    assert repr(layer) == (
        "ThresholdLinear(in_features=3, out_features=4, bias=True, density=1.000, backend='compact', "
        "backward_mode='sample', sample_fraction=0.25, collapse_density=None, collapse_timing='previous', "
        "collapse_in_eval=True, skip_zero_inputs=True, check_finite=True)"
    )
    assert repr(ThresholdLinear(3, 4)) == (
        "ThresholdLinear(in_features=3, out_features=4, bias=True, density=1.000, backend='auto', "
        "backward_mode='exact')"
    )
    conv = ThresholdConv2d(2, 4, 3, padding="same", padding_mode="reflect", collapse_density=0.1)
    assert repr(conv) == (
        "ThresholdConv2d(2, 4, kernel_size=(3, 3), stride=(1, 1), padding='same', padding_mode='reflect', "
        "density=1.000, backend='auto', backward_mode='exact', collapse_density=0.1)"
    )


@pytest.mark.parametrize("copy_weights", [True, False])
def test_from_dense_keeps_memory_format_requires_grad_and_mode(copy_weights):
    dense = nn.Conv2d(4, 6, 3, bias=True).to(memory_format=torch.channels_last).eval()
    dense.weight.requires_grad_(False)
    layer = ThresholdConv2d.from_dense(dense, copy=copy_weights, backward_mode="skip")
    assert layer.weight.is_contiguous(memory_format=torch.channels_last)
    assert not layer.weight.requires_grad and layer.bias.requires_grad and layer.threshold.requires_grad
    assert not layer.training and layer.backward_mode == "skip"
    assert (layer.weight is dense.weight) == (not copy_weights)
    assert torch.equal(layer.weight, dense.weight) and (layer.threshold == 0).all()
    x = torch.randn(2, 4, 7, 7).to(memory_format=torch.channels_last)
    y = layer(x)
    torch.testing.assert_close(y, dense(x))
    assert y.is_contiguous(memory_format=torch.channels_last)
    lin = nn.Linear(3, 2, dtype=torch.float64)
    shared = ThresholdLinear.from_dense(lin, copy=False)
    assert shared.weight is lin.weight and shared.bias is lin.bias and shared.threshold.dtype == torch.float64
    assert shared.collapse_resets.device == lin.weight.device
    # and back: to_dense keeps the flags and the mode
    back = layer.to_dense()
    assert not back.weight.requires_grad and back.bias.requires_grad and not back.training
    assert back.weight.is_contiguous(memory_format=torch.channels_last)


def test_from_dense_rejects_bad_input():
    with pytest.raises(TypeError, match="copy must be a bool"):
        ThresholdLinear.from_dense(nn.Linear(2, 2), copy="no")
    with pytest.raises(TypeError, match="takes the device of the dense layer"):
        ThresholdLinear.from_dense(nn.Linear(2, 2), device="cpu")
    with pytest.raises(TypeError, match="from_dense expects an nn.Conv2d, got Linear"):
        ThresholdConv2d.from_dense(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="backward_mode"):
        ThresholdLinear.from_dense(nn.Linear(2, 2), backward_mode="fast")
    with pytest.raises(ValueError, match="the LazyLinear is not initialised yet; run a forward first"):
        ThresholdLinear.from_dense(nn.LazyLinear(3))
    pruned = prune.random_unstructured(nn.Linear(4, 3), "weight", amount=0.5)
    with pytest.raises(ValueError, match="its weight is a Tensor computed from others"):
        ThresholdLinear.from_dense(pruned, copy=False)
