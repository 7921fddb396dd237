"""torch.compile: threshold-layer models compile with fullgraph=True, without graph breaks, and
train exactly like eager; the torch.library operators pass torch.library.opcheck."""

import copy
import warnings

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import spafl
from conftest import assert_close
from spafl import _ops
from spafl._options import ThresholdOptions
from spafl.federated.models import LeNet5


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _model(kind, **layer_kwargs):
    """A sparsified model (about 60% of every layer's units active, one layer collapsed so that the
    guard fires in the first forward) and an input for it."""
    torch.manual_seed(0)
    skip = layer_kwargs.pop("skip_zero_inputs", True)
    if kind == "mlp":
        dense = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 5))
        model, x = spafl.sparsify(dense, skip_zero_inputs=skip, **layer_kwargs), torch.randn(7, 20)
    elif kind == "cnn":  # padding modes, "same", groups, a pointwise convolution, channels-last input
        dense = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect"), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 3, padding="same", groups=2), nn.ReLU(),
            nn.Conv2d(8, 12, 1), nn.ReLU(), nn.Flatten(), nn.Linear(12 * 4 * 4, 5),
        )
        model = spafl.sparsify(dense, skip_zero_inputs=skip, **layer_kwargs)
        x = torch.randn(3, 3, 8, 8).to(memory_format=torch.channels_last)
    else:
        model, x = LeNet5(skip_zero_inputs=skip, **layer_kwargs), torch.randn(4, 1, 28, 28)
    layers = list(spafl.threshold_layers(model))
    with torch.no_grad():
        for layer in layers:
            layer.threshold.copy_(spafl.threshold_for_density(layer.weight, 0.6))
        layers[-1].threshold.fill_(100.0)  # every unit pruned: the collapse guard fires
    return model, x


def _train_both(model, x, steps=3, backend="aot_eager", optimizer=torch.optim.SGD, **compile_kwargs):
    """Train an eager copy and the compiled model side by side; compare outputs, the input's and
    every parameter's gradient, and the parameters and buffers after each step."""
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend=backend, **compile_kwargs)
    runs = [(eager, eager), (model, compiled)]
    optimizers = [optimizer(m.parameters(), lr=0.05, momentum=0.9) for m, _ in runs]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(steps):
            results = []
            for (module, fn), opt in zip(runs, optimizers, strict=True):
                opt.zero_grad()
                xi = x.clone().requires_grad_()
                y = fn(xi)
                (y.square().mean() + 1e-3 * spafl.threshold_penalty(module)).backward()
                results.append((y, xi.grad, {n: p.grad for n, p in module.named_parameters()}))
                opt.step()
            (ye, dxe, ge), (yc, dxc, gc) = results
            assert_close(yc, ye, torch.float32, f"step {step}: y")
            assert_close(dxc, dxe, torch.float32, f"step {step}: dx")
            assert ge.keys() == gc.keys()
            for name in ge:
                assert_close(gc[name], ge[name], torch.float32, f"step {step}: grad of {name}")
            for (name, a), b in zip(model.state_dict().items(), eager.state_dict().values(), strict=True):
                assert_close(a.double(), b.double(), torch.float32, f"step {step}: {name}")
        model.eval()
        eager.eval()
        assert_close(compiled(x), eager(x), torch.float32, "eval")
    assert not counters["graph_break"], dict(counters["graph_break"])
    dynamo = [str(w.message) for w in caught if "dynamo" in str(w.filename) or "graph break" in str(w.message).lower()]
    assert not dynamo, dynamo
    return eager, compiled


@pytest.mark.parametrize("skip_zero_inputs", [True, False])
@pytest.mark.parametrize("mode", ["exact", "skip", "sample"])
@pytest.mark.parametrize("kind", ["mlp", "cnn", "lenet5"])
def test_compiled_model_trains_like_eager(kind, mode, skip_zero_inputs):
    model, x = _model(kind, backward_mode=mode, skip_zero_inputs=skip_zero_inputs, sample_fraction=0.5)
    flagged = [layer.skip_zero_inputs for layer in spafl.threshold_layers(model)]
    assert any(flagged) == skip_zero_inputs
    _train_both(model, x)  # buffers compared there too
    assert list(spafl.threshold_layers(model))[-1].collapse_resets.item() == 1  # the guard ran inside the graph


@pytest.mark.parametrize("timing", ["current", "previous"])
def test_fused_optimizer_eager_and_compiled(timing):
    # spafl.optim.SGD: the eager layers take the step's masks, the compiled graph builds its own
    # (no graph break); both train alike, the collapse guard included.
    import spafl.optim

    model, x = _model("lenet5", backward_mode="skip", collapse_timing=timing)
    eager, _ = _train_both(model, x, optimizer=spafl.optim.SGD)
    assert all("_next_mask" in layer.__dict__ for layer in spafl.threshold_layers(eager))
    assert list(spafl.threshold_layers(model))[-1].collapse_resets.item() >= 1


def test_compiled_model_with_the_previous_guard_timing_and_new_batch_sizes():
    model, x = _model("mlp", collapse_timing="previous", collapse_in_eval=True)
    eager, compiled = _train_both(model, x, steps=3, dynamic=True)
    last = list(spafl.threshold_layers(model))[-1]
    assert last.collapse_resets.item() == 1 and last.previous_density.item() == 1.0
    for batch in (3, 11):  # symbolic batch size: the fake implementations follow it
        xb = torch.randn(batch, 20)
        assert_close(compiled(xb), eager(xb), torch.float32, f"batch {batch}")
    assert not counters["graph_break"]


def test_inductor_compiles_lenet5_and_trains_like_eager():
    model, x = _model("lenet5", backward_mode="exact")
    _train_both(model, x, steps=2, backend="inductor")


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_other_backends_compile(backend, device):
    # Triton: natively on CUDA, in the interpreter on CPU (real kernels behind the traced operators)
    for kind in ("mlp", "cnn"):
        torch._dynamo.reset()
        model, x = _model(kind, backend=backend)
        if backend == "triton" and kind == "cnn":  # the kernels take groups=1 only
            model[3] = spafl.ThresholdConv2d(8, 8, 3, padding="same", backend=backend)
        slow = backend == "triton" and device == "cpu"
        _train_both(model.to(device), x.to(device), steps=1 if slow else 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_inductor_compiles_lenet5_on_cuda():
    model, x = _model("lenet5")
    _train_both(model.cuda(), x.cuda(), steps=2, backend="inductor")


def test_a_non_finite_threshold_or_weight_fails_inside_the_compiled_graph():
    model, x = _model("mlp")
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    compiled(x)
    with torch.no_grad():
        model[2].threshold[3] = float("nan")
    with pytest.raises(ValueError, match=r"threshold has non-finite values \(NaN or inf\) at units \[3\]"):
        compiled(x)
    with torch.no_grad():
        model[2].threshold[3] = 0.0
        model[0].weight[5, 2] = float("inf")
    with pytest.raises(ValueError, match=r"weight has non-finite values \(NaN or inf\) in units \[5\]"):
        compiled(x)
    assert not counters["graph_break"]


# ----------------------------------------------------------------------------- the operators


def _key(mode="exact", skip=False):
    # The options the operators take, as the string they carry.
    return ThresholdOptions(backward_mode=mode, sample_fraction=0.5, skip_zero_inputs=skip).key


def _linear_args(backend, bias, skip, with_perm=False):
    torch.manual_seed(0)
    x = torch.relu(torch.randn(6, 9))
    x[:, 2] = 0  # a dropped feature with skip_zero_inputs
    w, tau = torch.randn(7, 9), torch.zeros(7)
    tau.copy_(spafl.threshold_for_density(w, 4 / 7))
    mask, perm, count = torch.ops.spafl.row_mask(w, tau.clone(), None, None, backend, with_perm, _key(), True)
    b = torch.randn(7) if bias else None
    return x, w, tau, b, mask, perm, count


@pytest.mark.parametrize("backend", ["compact", "reference"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("mode", ["exact", "sample"])
def test_opcheck_linear(backend, bias, mode):
    x, w, tau, b, mask, perm, count = _linear_args(backend, bias, True)
    args = (x.requires_grad_(), w.requires_grad_(), tau.requires_grad_(),
            b.requires_grad_() if bias else None, mask, perm, count, backend, _key(mode, True))
    torch.library.opcheck(torch.ops.spafl.threshold_linear.default, args)
    grad = torch.randn(6, 7)
    for need_dx in (True, False):
        torch.library.opcheck(torch.ops.spafl.threshold_linear_backward.default,
                              (grad, x.detach(), w.detach(), mask, perm, count, backend, _key(mode, True),
                               torch.float32, need_dx, bias))


@pytest.mark.parametrize("backend", ["compact", "reference"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("groups", [1, 2])
def test_opcheck_conv2d(backend, layout, groups):
    torch.manual_seed(0)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.relu(torch.randn(2, 4, 7, 6)).to(memory_format=fmt)
    x[:, 1] = 0
    w = torch.randn(6, 4 // groups, 3, 3).to(memory_format=fmt)
    tau = spafl.threshold_for_density(w, 0.5)
    mask, perm, count = torch.ops.spafl.row_mask(w, tau.clone(), None, None, backend, False, _key(), True)
    geometry = ([2, 1], [1, 0], [1, 1], [1, 2], groups)  # stride, pad_begin, pad_end, dilation, groups
    args = (x.clone().requires_grad_(), w.clone().requires_grad_(), tau.clone().requires_grad_(),
            torch.randn(6, requires_grad=True), mask, perm, count, *geometry, backend, _key("exact", True))
    torch.library.opcheck(torch.ops.spafl.threshold_conv2d.default, args)
    y = torch.ops.spafl.threshold_conv2d(*args)
    assert y.is_contiguous(memory_format=fmt)
    for need_dx in (True, False):
        torch.library.opcheck(torch.ops.spafl.threshold_conv2d_backward.default,
                              (torch.randn_like(y), x, w, mask, perm, count, *geometry, backend, _key("sample", True),
                               torch.float32, need_dx, True))


@pytest.mark.parametrize("timing", ["current", "previous"])
def test_opcheck_row_mask(timing):
    torch.manual_seed(0)
    w = torch.randn(50, 8)
    for tau_value, previous in ((0.01, 1.0), (100.0, 0.0)):  # healthy; collapsed (the guard fires)
        args = (w, torch.full((50,), tau_value), torch.zeros((), dtype=torch.long), torch.tensor(previous),
                "reference", False, ThresholdOptions(collapse_density=0.01, collapse_timing=timing).key, True)
        torch.library.opcheck(torch.ops.spafl.row_mask.default, args)
        mask, perm, count = torch.ops.spafl.row_mask(*args)
        assert mask.all() and perm.numel() == count.numel() == 0
        assert args[2].item() == (tau_value == 100.0) and (args[1] == 0).all() == (tau_value == 100.0)


@pytest.mark.interpreter
def test_opcheck_triton_operators(device):
    x, w, tau, b, mask, perm, count = _linear_args("triton", True, False, with_perm=True)
    x, w, tau, b = (t.to(device) for t in (x, w, tau, b))
    mask, perm, count = torch.ops.spafl.row_mask(w, tau.clone(), None, None, "triton", True, _key(), False)
    assert perm.shape == (7,) and count.shape == (1,) and int(count) == 4
    torch.library.opcheck(torch.ops.spafl.threshold_linear.default,
                          (x.requires_grad_(), w.requires_grad_(), tau.requires_grad_(), b.requires_grad_(), mask,
                           perm, count, "triton", _key()),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_compact_backward_state_rebuilt_as_the_forward_builds_it():
    # The operators' compact backward rebuilds the forward's index lists; they must be the same.
    from spafl import compact, compact_conv
    from spafl._conv import conv_geometry

    torch.manual_seed(0)
    for skip in (True, False):
        x = torch.relu(torch.randn(5, 12))
        x[:, [1, 7]] = 0
        w = torch.randn(9, 12)
        mask = spafl.threshold_row_mask(w, spafl.threshold_for_density(w, 5 / 9)).mask
        _, state = compact.linear_forward(x, w, None, mask, skip)
        rebuilt = _ops._compact_linear_state(x, w, mask, skip)
        for a, b in zip(state[:4], rebuilt[:4], strict=True):
            assert (a is None and b is None) or torch.equal(a, b)
        for groups, channels_zero in ((1, [2]), (1, [0, 1, 2, 3]), (2, [])):
            xc = torch.relu(torch.randn(2, 4, 6, 6))
            xc[:, channels_zero] = 0
            wc = torch.randn(6, 4 // groups, 3, 3)
            geometry = conv_geometry((3, 3), 1, 1, 1, groups)
            for density in (1.0, 0.5, 0.0):
                m = spafl.threshold_row_mask(wc, spafl.threshold_for_density(wc, density)).mask
                _, state = compact_conv.conv2d_forward(xc, wc, None, m, geometry, skip)
                rebuilt = _ops._compact_conv2d_state(xc, wc, m, geometry, skip)
                _assert_same_state(state, rebuilt)


def _assert_same_state(a, b):
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, tuple):
        assert len(a) == len(b)
        for u, v in zip(a, b, strict=True):
            _assert_same_state(u, v)
    else:
        assert a == b
