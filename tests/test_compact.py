"""The compacting backend against the masked-dense reference, and proof that it skips work."""

import pytest
import torch
import torch.nn.functional as F

import spafl
from conftest import TOLERANCES, assert_close
from spafl import (
    ThresholdConv2d,
    ThresholdLinear,
    chain,
    compact,
    compact_conv,
    threshold_conv2d,
    threshold_for_density,
    threshold_linear,
)
from spafl._checks import resolve_backend

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same'")

MODES = ["exact", "skip", "sample"]
DENSITIES = [0.0, 0.4, 1.0]


def _grads(fn, x, params, backend, dy=None, need_dx=True):
    """``(y, [dx, dW, dtau, db])`` of ``fn(x, *params, backend=backend)`` for the output gradient
    ``dy`` (seeded random when None), on fresh leaves."""
    xi = x.detach().clone().requires_grad_(need_dx)
    leaves = [None if p is None else p.detach().clone().requires_grad_() for p in params]
    y = fn(xi, *leaves, backend=backend)
    if dy is None:
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y.dtype)
    y.backward(dy)
    grads = ([xi.grad] if need_dx else []) + [p.grad for p in leaves if p is not None]
    return y, grads


def _assert_same(fn, x, params, dtype, dy=None, need_dx=True):
    y_ref, g_ref = _grads(fn, x, params, "reference", dy, need_dx)
    y, g = _grads(fn, x, params, "compact", dy, need_dx)
    assert y.dtype == y_ref.dtype
    assert_close(y, y_ref, dtype, "y")
    names = (["dx"] if need_dx else []) + ["dW", "dtau", "db"]
    for name, a, e in zip(names, g, g_ref, strict=False):
        assert a.dtype == e.dtype, name
        assert_close(a, e, dtype, name)
    return y, g


# ----------------------------------------------------------------------------- Linear


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [((7,), 13, 11), ((2, 3), 29, 23), ((1,), 1, 1)], ids=str)
def test_linear_matches_reference(mode, density, bias, shape):
    lead, k, n = shape
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    x = torch.randn(*lead, k, generator=g)

    def fn(x, w, tau, b=None, backend="auto"):
        return threshold_linear(x, w, tau, b, backend=backend, backward_mode=mode, sample_fraction=0.3)

    _assert_same(fn, x, [w, threshold_for_density(w, density), b], torch.float32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", MODES)
def test_linear_dtypes(dtype, mode):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(17, 19, generator=g).to(dtype)
    x = torch.randn(9, 19, generator=g).to(dtype)
    b = torch.randn(17, generator=g).to(dtype)

    def fn(x, w, tau, b, backend):
        return threshold_linear(x, w, tau, b, backend=backend, backward_mode=mode)

    y, grads = _assert_same(fn, x, [w, threshold_for_density(w, 0.5), b], dtype)
    assert y.dtype == dtype and all(t.dtype == dtype for t in grads)


def test_linear_exact_mode_where_relu_zeroes_pruned_gradients():
    # A pruned unit without bias outputs 0; after ReLU its output gradient is 0, so r_i = 0.
    g = torch.Generator().manual_seed(2)
    w = torch.randn(31, 37, generator=g)
    tau = threshold_for_density(w, 0.3)

    def fn(x, w, tau, backend):
        return F.relu(threshold_linear(x, w, tau, backend=backend))

    _, grads = _assert_same(fn, torch.randn(16, 37, generator=g), [w, tau], torch.float32)
    pruned = w.abs().mean(1) <= tau
    assert (grads[2][pruned] == 0).all() and (grads[1][pruned] == 0).all()


def test_linear_without_input_gradient():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(12, 10, generator=g)

    def fn(x, w, tau, backend):
        return threshold_linear(x, w, tau, backend=backend)

    _assert_same(fn, torch.randn(5, 10, generator=g), [w, threshold_for_density(w, 0.5)], torch.float32,
                 need_dx=False)


# ----------------------------------------------------------------------------- Conv2d

# (conv options, channels, filters)
CONVS = [
    ({"stride": 1, "padding": 1}, 5, 11),
    ({"stride": (2, 1), "padding": (0, 2), "dilation": (2, 1)}, 4, 7),
    ({"padding": "same"}, 3, 6),  # kernel 2 below: odd total padding, the extra row / column after
    ({"padding": "same", "dilation": 2}, 4, 5),
    ({"padding": "valid", "stride": 3}, 3, 9),
    ({"groups": 2, "padding": 1}, 6, 10),
    ({"groups": 3, "padding": 1}, 6, 9),
    ({"groups": 6}, 6, 6),  # depthwise
    ({"groups": 4, "stride": 2}, 4, 8),  # depthwise, two filters per channel
]


def _conv_problem(conv, chans, filters, kernel=3, seed=0, bias=True, batch=2, size=(9, 8)):
    g = torch.Generator().manual_seed(seed)
    if conv.get("padding") == "same" and "dilation" not in conv:
        kernel = 2
    w = torch.randn(filters, chans // conv.get("groups", 1), kernel, kernel, generator=g)
    b = torch.randn(filters, generator=g) if bias else None
    x = torch.randn(batch, chans, *size, generator=g)
    return x, w, b


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("conv, chans, filters", CONVS, ids=str)
def test_conv2d_matches_reference(conv, chans, filters, density, mode):
    x, w, b = _conv_problem(conv, chans, filters, bias=density != 1.0)

    def fn(x, w, tau, b=None, backend="auto"):
        return threshold_conv2d(x, w, tau, b, backend=backend, backward_mode=mode, sample_fraction=0.2, **conv)

    _assert_same(fn, x, [w, threshold_for_density(w, density), b], torch.float32)


@pytest.mark.parametrize("density", [0.3, 1.0])
@pytest.mark.parametrize("layout", ["x", "w", "both"])
def test_conv2d_channels_last_in_and_out(layout, density):
    x, w, b = _conv_problem({"padding": 1}, 6, 10)
    if layout in ("x", "both"):
        x = x.to(memory_format=torch.channels_last)
    if layout in ("w", "both"):
        w = w.to(memory_format=torch.channels_last)

    def fn(x, w, tau, b, backend):
        return threshold_conv2d(x, w, tau, b, padding=1, backend=backend)

    tau = threshold_for_density(w, density)
    y, _ = _assert_same(fn, x, [w, tau, b], torch.float32)
    assert y.is_contiguous(memory_format=torch.channels_last)
    # The input gradient as the Function returns it (x.grad takes x's own layout) is
    # channels-last, as F.conv2d's is.
    xi = x.clone().requires_grad_()
    out = fn(xi, w, tau, b, "compact")
    (dx,) = torch.autograd.grad(out, xi, torch.ones_like(out))
    assert dx.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("conv, chans, filters", CONVS, ids=str)
def test_conv2d_channels_last_every_option_and_mode(conv, chans, filters, mode):
    # Channels-last operands take their own gathers of channels (compact._select_channels):
    # the active filters' output gradient, the pruned filters' in exact mode, the kept input
    # channels and the padded groups' slots.
    x, w, b = _conv_problem(conv, chans, filters, batch=3)
    x, w = x.to(memory_format=torch.channels_last), w.to(memory_format=torch.channels_last)

    def fn(x, w, tau, b, backend):
        return threshold_conv2d(x, w, tau, b, backend=backend, backward_mode=mode, sample_fraction=0.2, **conv)

    for density in (0.3, 0.6):
        _assert_same(fn, x, [w, threshold_for_density(w, density), b], torch.float32)


@pytest.mark.parametrize("mode", MODES)
def test_conv2d_channels_last_skipping_zero_input_channels(mode):
    x, w, _ = _conv_problem({"padding": 1}, 6, 10, bias=False, batch=3)
    x[:, [1, 4]] = 0
    x = x.to(memory_format=torch.channels_last)

    def fn(x, w, tau, backend):
        return F.relu(threshold_conv2d(x, w, tau, padding=1, backend=backend, backward_mode=mode,
                                       skip_zero_inputs=True))

    params = [w, threshold_for_density(w, 0.4)]
    y_ref, (dx_ref, *g_ref) = _grads(fn, x, params, "reference")
    y, (dx, *g) = _grads(fn, x, params, "compact")
    assert_close(y, y_ref, torch.float32, "y")
    for name, a, e in zip(("dW", "dtau"), g, g_ref, strict=True):
        assert_close(a, e, torch.float32, name)
    kept = [0, 2, 3, 5]  # the dropped channels' input gradient is 0 by the rule (spafl.layers)
    assert_close(dx[:, kept], dx_ref[:, kept], torch.float32, "dx")
    assert (dx[:, [1, 4]] == 0).all() and dx.is_contiguous(memory_format=torch.channels_last)


def test_select_channels_is_index_select_in_the_input_layout():
    t = torch.randn(3, 7, 4, 5)
    index = torch.tensor([0, 2, 6])
    for x in (t, t.contiguous(memory_format=torch.channels_last), t[:, :, :, :1].contiguous(), t.flatten(2)):
        got = compact._select_channels(x, index)
        assert torch.equal(got, x.index_select(1, index))
        if x.dim() == 4 and not x.is_contiguous():
            assert got.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("mode", MODES)
def test_conv2d_unbatched_pointwise_and_no_input_gradient(mode):
    x, w, b = _conv_problem({}, 7, 13, kernel=1, batch=3)

    def fn(x, w, tau, b, backend):
        return threshold_conv2d(x, w, tau, b, backend=backend, backward_mode=mode)

    params = [w, threshold_for_density(w, 0.4), b]
    _assert_same(fn, x[0], params, torch.float32)
    _assert_same(fn, x, params, torch.float32, need_dx=False)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_conv2d_dtypes(dtype):
    x, w, b = _conv_problem({"padding": 1}, 4, 9)
    x, w, b = x.to(dtype), w.to(dtype), b.to(dtype)

    def fn(x, w, tau, b, backend):
        return threshold_conv2d(x, w, tau, b, padding=1, backend=backend, backward_mode="exact")

    y, grads = _assert_same(fn, x, [w, threshold_for_density(w, 0.5), b], dtype)
    assert y.dtype == dtype and all(t.dtype == dtype for t in grads)


@pytest.mark.parametrize("padding_mode", ["reflect", "replicate", "circular"])
@pytest.mark.parametrize("mode", MODES)
def test_conv2d_layer_padding_modes(padding_mode, mode):
    torch.manual_seed(0)
    ref = ThresholdConv2d(5, 12, 3, padding=2, stride=2, padding_mode=padding_mode, backend="reference",
                          backward_mode=mode)
    with torch.no_grad():
        ref.threshold.copy_(threshold_for_density(ref.weight, 0.5))
    com = ThresholdConv2d.from_dense(ref.to_dense(), backend="compact", backward_mode=mode)
    with torch.no_grad():
        com.weight.copy_(ref.weight)
        com.threshold.copy_(ref.threshold)
    x = torch.randn(2, 5, 9, 10)
    outs = []
    for layer in (ref, com):
        xi = x.clone().requires_grad_()
        y = layer(xi)
        y.backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape))
        outs.append([y, xi.grad, layer.weight.grad, layer.threshold.grad, layer.bias.grad])
    for name, a, e in zip(["y", "dx", "dW", "dtau", "db"], outs[1], outs[0], strict=True):
        assert_close(a, e, torch.float32, name)


# ----------------------------------------------------------------------------- guard, autocast, dispatch


def test_auto_is_compact_on_cpu_and_the_layer_runs_it(monkeypatch):
    assert resolve_backend("auto", torch.zeros(1)) == "compact"
    assert resolve_backend("compact", torch.zeros(1, device="meta")) == "compact"
    assert resolve_backend("auto", torch.zeros(1, device="meta")) == "reference"  # never a host sync
    calls = []
    for module, name in ((compact, "linear_forward"), (compact, "linear_backward"), (compact, "_dense_small_backward"),
                         (compact_conv, "conv2d_forward"), (compact_conv, "conv2d_backward")):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    ThresholdLinear(4, 3)(torch.randn(5, 4)).sum().backward()
    # (every unit active, z kept: the backward of that case is called directly)
    ThresholdLinear(4, 3)(torch.randn(2, 4)).sum().backward()
    ThresholdConv2d(2, 3, 3)(torch.randn(1, 2, 5, 5)).sum().backward()
    assert calls == ["linear_forward", "linear_backward", "linear_forward", "_dense_small_backward", "conv2d_forward",
                     "conv2d_backward"]


def test_collapse_guard_on_the_compact_path():
    layer = ThresholdConv2d(3, 150, 3, backend="compact")
    ref = ThresholdConv2d(3, 150, 3, backend="reference")
    ref.load_state_dict(layer.state_dict())
    for m in (layer, ref):
        with torch.no_grad():
            m.threshold.copy_(threshold_for_density(m.weight, 1 / 150))
    x = torch.randn(2, 3, 6, 6)
    y = layer(x)
    assert (layer.threshold == 0).all() and layer.collapse_resets.item() == 1
    assert_close(y, ref(x), torch.float32, "y after the guard")


def test_autocast_on_the_compact_path_matches_the_reference():
    torch.manual_seed(0)
    com = ThresholdLinear(16, 24, backend="compact")
    ref = ThresholdLinear(16, 24, backend="reference")
    ref.load_state_dict(com.state_dict())
    for m in (com, ref):
        with torch.no_grad():
            m.threshold.copy_(threshold_for_density(m.weight, 0.5))
    x = torch.randn(4, 16)
    results = []
    for m in (com, ref):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(x)
        y.float().square().sum().backward()
        results.append((y, m.weight.grad, m.threshold.grad))
    assert results[0][0].dtype == torch.bfloat16 and results[0][1].dtype == torch.float32
    for name, a, e in zip(["y", "dW", "dtau"], results[0], results[1], strict=True):
        assert_close(a.float(), e.float(), torch.bfloat16, name)


def test_every_output_element_is_written(poisoned_allocations):
    # Fresh allocations are NaN: an element that the scatter forgets shows up.
    for density in (0.0, 0.4):
        x, w, b = _conv_problem({"padding": 1}, 4, 9)

        def fn(x, w, tau, b, backend):
            return threshold_conv2d(x, w, tau, b, padding=1, backend=backend)

        _assert_same(fn, x, [w, threshold_for_density(w, density), b], torch.float32)
        w2 = torch.randn(9, 7)

        def lin(x, w, tau, b, backend):
            return threshold_linear(x, w, tau, b, backend=backend)

        _assert_same(lin, torch.randn(5, 7), [w2, threshold_for_density(w2, density), torch.randn(9)], torch.float32)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"backend": "compacted"}, ValueError, "backend must be one of"),
        ({"skip_zero_inputs": 1}, TypeError, "skip_zero_inputs must be a bool"),
        ({"collapse_timing": "later"}, ValueError, "collapse_timing must be one of"),
        ({"collapse_timing": "previous", "collapse_density": 0.01}, ValueError, "needs previous_density"),
        ({"previous_density": torch.ones(2)}, ValueError, "one-element tensor"),
        ({"previous_density": torch.ones((), dtype=torch.long)}, TypeError, "previous_density must be a floating"),
        ({"previous_density": torch.ones((), device="meta")}, ValueError, "previous_density is on meta"),
        ({"collapse_counter": torch.zeros(3, dtype=torch.long)}, ValueError, "collapse_counter must be a one-element"),
    ],
)
def test_functional_rejects_bad_options(kwargs, exc, match):
    for call in (lambda **k: threshold_linear(torch.randn(2, 3), torch.randn(4, 3), torch.zeros(4), **k),
                 lambda **k: threshold_conv2d(torch.randn(1, 2, 4, 4), torch.randn(4, 2, 3, 3), torch.zeros(4), **k)):
        with pytest.raises(exc, match=match):
            call(**kwargs)


# ----------------------------------------------------------------------------- the work really skipped


@pytest.fixture
def products(monkeypatch):
    """Record every dense product the compact backend runs: ``(op, operand shapes)``."""
    seen = []

    def spy(module, name):
        original = getattr(module, name)

        def wrapped(*args, **kwargs):
            seen.append((name, tuple(tuple(a.shape) for a in args[:2])))
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapped)

    for module, name in ((compact, "_linear"), (compact, "_mm"), (compact_conv, "_conv2d"),
                         (compact_conv, "_conv2d_backward")):
        spy(module, name)
    return seen


def _pruned_threshold(w, active):
    """Thresholds that keep exactly the units in ``active``."""
    score = w.abs().flatten(1).mean(1)
    tau = score + 1.0
    tau[active] = score[active] / 2
    return tau


def test_linear_multiplies_only_active_rows(products):
    w = torch.randn(40, 30)
    active = torch.tensor([3, 17, 29, 31])
    x = torch.randn(8, 30, requires_grad=True)
    y = threshold_linear(x, w.requires_grad_(), _pruned_threshold(w.detach(), active), backward_mode="skip")
    assert products == [("_linear", ((8, 30), (4, 30)))]
    y.backward(torch.randn(8, 40))
    assert products[1:] == [("_mm", ((8, 4), (4, 30))), ("_mm", ((4, 8), (8, 30)))]  # dX, then G


def test_exact_mode_computes_pruned_rows_only_where_the_output_gradient_is_not_zero(products):
    w = torch.randn(40, 30)
    active = torch.tensor([3, 17, 29, 31])
    tau = _pruned_threshold(w, active).requires_grad_()
    x = torch.randn(8, 30)
    y = threshold_linear(x, w.requires_grad_(), tau)
    dy = torch.randn(8, 40)
    dy[:, 4:] = 0  # as after a ReLU on pruned units; pruned units 0, 1, 2 keep a gradient
    y.backward(dy)
    assert products[-1] == ("_linear", ((8, 30), (3, 30)))  # Z of the three live pruned units only
    assert (tau.grad[5:] == 0).all() and (tau.grad[:3] != 0).all()
    products.clear()
    F.relu(threshold_linear(x, w, tau)).sum().backward()  # no bias, ReLU: no pruned row at all
    assert all(shape[1][0] == 4 for op, shape in products if op == "_linear")


def test_sample_mode_multiplies_sampled_rows_only(products):
    w = torch.randn(20, 9)
    tau = _pruned_threshold(w, torch.tensor([0, 5]))
    y = threshold_linear(torch.randn(32, 9), w.requires_grad_(), tau, backward_mode="sample", sample_fraction=0.25)
    y.backward(torch.randn(32, 20))
    assert products[-1] == ("_linear", ((8, 9), (18, 9)))  # 8 of 32 rows, the 18 pruned units


def test_density_one_calls_the_dense_op_on_the_weight_itself(monkeypatch):
    w = torch.randn(6, 5, requires_grad=True)
    seen = []
    original = compact._linear
    monkeypatch.setattr(compact, "_linear", lambda x, ww, b=None: seen.append(ww) or original(x, ww, b))
    threshold_linear(torch.randn(3, 5), w, torch.zeros(6)).sum().backward()
    assert len(seen) == 1 and seen[0].data_ptr() == w.data_ptr()


def test_conv2d_multiplies_only_active_filters(products):
    x, w, _ = _conv_problem({"padding": 1}, 5, 12, bias=False)
    tau = _pruned_threshold(w, torch.tensor([1, 4, 10]))
    y = threshold_conv2d(x, w.requires_grad_(), tau, padding=1, backward_mode="skip")
    y.backward(torch.randn(y.shape))
    assert products == [("_conv2d", ((2, 5, 9, 8), (3, 5, 3, 3))), ("_conv2d_backward", ((2, 3, 9, 8), (2, 5, 9, 8)))]


def test_depthwise_and_grouped_convolutions_skip_pruned_filters(products):
    x = torch.randn(2, 8, 7, 7)
    w = torch.randn(8, 1, 3, 3)
    tau = _pruned_threshold(w, torch.tensor([0, 3, 6]))
    threshold_conv2d(x, w, tau, groups=8)
    assert products == [("_conv2d", ((2, 3, 7, 7), (3, 1, 3, 3)))]  # three channels, three filters
    products.clear()
    w = torch.randn(12, 2, 3, 3)  # groups of 2 input channels and 3 filters
    tau = _pruned_threshold(w, torch.tensor([0, 1, 4, 9]))  # groups 0 (two), 1 (one), 3 (one)
    threshold_conv2d(x, w, tau, groups=4)
    assert products == [("_conv2d", ((2, 6, 7, 7), (6, 2, 3, 3)))]  # three groups, each padded to two filters


def test_zero_inputs_are_dropped_from_every_product(products):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 30, generator=g)
    x[:, 10:25] = 0
    w = torch.randn(40, 30, generator=g)
    tau = _pruned_threshold(w, torch.arange(0, 40, 4))
    y = threshold_linear(x.requires_grad_(), w.requires_grad_(), tau, skip_zero_inputs=True)
    dy = torch.randn(8, 40, generator=g)
    y.backward(dy)
    shapes = [s for _, s in products]
    assert shapes[0] == ((8, 15), (10, 15)) and all(15 in s[0] or 15 in s[1] for s in shapes)
    dx = x.grad.clone()
    assert (dx[:, 10:25] == 0).all()
    # Output and parameter gradients equal the reference; dx equals it where inputs were kept.
    ref_x, ref_w, ref_tau = x.detach().requires_grad_(), w.detach().requires_grad_(), tau.clone().requires_grad_()
    y_ref = threshold_linear(ref_x, ref_w, ref_tau, backend="reference")
    y_ref.backward(dy)
    assert_close(y, y_ref, torch.float32, "y")
    assert_close(w.grad, ref_w.grad, torch.float32, "dW")
    keep = torch.ones(30, dtype=torch.bool)
    keep[10:25] = False
    assert_close(dx[:, keep], ref_x.grad[:, keep], torch.float32, "dx")


def test_zero_input_channels_are_dropped_and_filters_too(products):
    x = torch.randn(4, 10, 8, 8)
    x[:, [1, 2, 5, 7, 8]] = 0
    w = torch.randn(6, 10, 3, 3)
    tau = _pruned_threshold(w, torch.tensor([0, 5]))
    y = threshold_conv2d(x.requires_grad_(), w.requires_grad_(), tau, skip_zero_inputs=True)
    y.backward(torch.randn(y.shape))
    assert products == [("_conv2d", ((4, 5, 8, 8), (2, 5, 3, 3))), ("_conv2d_backward", ((4, 2, 6, 6), (4, 5, 8, 8))),
                        ("_conv2d", ((4, 5, 8, 8), (4, 5, 3, 3)))]  # Z of the 4 pruned filters (exact mode)
    assert (x.grad[:, [1, 2, 5, 7, 8]] == 0).all()


def test_all_inputs_zero():
    w = torch.randn(6, 4, 3, 3, requires_grad=True)
    b = torch.randn(6, requires_grad=True)
    x = torch.zeros(2, 4, 5, 5, requires_grad=True)
    for backend, skip in (("compact", True), ("reference", False)):
        y = threshold_conv2d(x, w, threshold_for_density(w.detach(), 0.5), b, backend=backend, skip_zero_inputs=skip)
        y.backward(torch.ones_like(y))
        assert torch.equal(y, b.detach().view(1, 6, 1, 1).expand_as(y))
        assert (w.grad == 0).all() and torch.equal(b.grad, torch.full((6,), 18.0))
        w.grad = b.grad = None


def test_tolerance_table_covers_the_compute_dtypes():
    assert {torch.float32, torch.float64, torch.float16, torch.bfloat16} <= set(TOLERANCES)
    assert spafl.compact.active_units(torch.tensor([True, True])) is None
    assert spafl.compact.active_units(torch.tensor([False, True, True])).tolist() == [1, 2]


# ----------------------------------------------------------------------------- input-side skipping


def _set_densities(model, densities):
    for (_, layer), density in zip(spafl.named_threshold_layers(model), densities, strict=True):
        with torch.no_grad():
            layer.threshold.copy_(threshold_for_density(layer.weight, density))


def _model_grads(model, x, seed=0):
    xi = x.clone().requires_grad_()
    out = model(xi)
    torch.manual_seed(seed)
    (out * torch.randn(out.shape)).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out, xi.grad, grads


def _assert_models_agree(fast, ref, x):
    out_f, dx_f, g_f = _model_grads(fast, x)
    out_r, dx_r, g_r = _model_grads(ref, x)
    assert_close(out_f, out_r, torch.float32, "output")
    assert_close(dx_f, dx_r, torch.float32, "input gradient")
    assert g_f.keys() == g_r.keys()
    for name in g_r:
        assert_close(g_f[name], g_r[name], torch.float32, name)


@pytest.mark.parametrize("mode", MODES)
def test_lenet5_with_input_skipping_equals_the_reference_model(mode, products):
    from spafl.federated.models import LeNet5

    torch.manual_seed(0)
    fast = LeNet5(backend="compact", backward_mode=mode)
    ref = LeNet5(backend="reference", backward_mode=mode, skip_zero_inputs=False)
    ref.load_state_dict(fast.state_dict())
    for model in (fast, ref):
        _set_densities(model, (0.6, 0.3, 0.05, 1.0))
    assert [n for n, layer in spafl.named_threshold_layers(fast) if layer.skip_zero_inputs] == ["conv2", "fc3", "fc4"]
    _assert_models_agree(fast, ref, torch.randn(6, 1, 28, 28))
    conv2_input = [shapes[0] for op, shapes in products if op == "_conv2d" and shapes[1][1:] != (1, 5, 5)]
    assert conv2_input[0][1] == 12  # the 12 channels of conv1's 12 active filters, of 20
    fc3 = [shapes for op, shapes in products if op == "_linear" and shapes[1][0] == 25]
    assert fc3 and fc3[0][0][1] <= 15 * 16  # features of conv2's 15 active filters, of 800


def test_conv4_bn_before_relu_equals_the_reference_model():
    from spafl.federated.models import Conv4

    torch.manual_seed(0)
    fast = Conv4(backend="compact")
    ref = Conv4(backend="reference", skip_zero_inputs=False)
    ref.load_state_dict(fast.state_dict())
    for model in (fast, ref):
        _set_densities(model, (0.5, 0.3, 0.4, 0.2, 0.3, 0.5, 1.0))
    _assert_models_agree(fast, ref, torch.randn(4, 3, 32, 32))


def test_producer_with_positive_bias_drops_nothing_and_agrees(products):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(9, 20), torch.nn.ReLU(), torch.nn.Linear(20, 7))
    with torch.no_grad():
        model[0].bias.fill_(0.5)
    fast = spafl.sparsify(model, backend="compact")
    ref = spafl.sparsify(torch.nn.Sequential(torch.nn.Linear(9, 20), torch.nn.ReLU(), torch.nn.Linear(20, 7)),
                         backend="reference", skip_zero_inputs=False)
    ref.load_state_dict(fast.state_dict())
    assert fast[2].skip_zero_inputs
    for m in (fast, ref):
        _set_densities(m, (0.3, 0.5))
    products.clear()
    _assert_models_agree(fast, ref, torch.randn(5, 9))
    assert ("_linear", ((5, 20), (4, 20))) in products  # every input feature of the second layer kept


class _Chain(torch.nn.Module):
    """conv -> ``between`` -> conv -> flatten -> linear."""

    def __init__(self, between, relu_before_fc=False):
        super().__init__()
        self.conv1 = ThresholdConv2d(3, 6, 3, bias=False)
        self.conv2 = ThresholdConv2d(6, 4, 3, bias=False)
        self.fc = ThresholdLinear(4 * 4 * 4, 5, bias=False)
        self.between = between
        self.last = torch.nn.ReLU() if relu_before_fc else torch.nn.Identity()

    def forward(self, x):
        return self.fc(self.last(self.conv2(self.between(self.conv1(x)))).flatten(1))


class _Residual(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = ThresholdConv2d(3, 3, 3, padding=1, bias=False)
        self.conv2 = ThresholdConv2d(3, 3, 3, padding=1, bias=False)

    def forward(self, x):
        return self.conv2(F.relu(self.conv1(x)) + x)


class _InPlaceElsewhere(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = ThresholdConv2d(3, 3, 3, padding=1, bias=False)
        self.conv2 = ThresholdConv2d(3, 3, 3, padding=1, bias=False)

    def forward(self, x):
        a = F.relu(self.conv1(x))
        a.add_(1.0)
        return self.conv2(a)


class _CalledTwice(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = ThresholdConv2d(3, 3, 3, padding=1, bias=False)

    def forward(self, x):
        return self.conv(F.gelu(self.conv(F.relu(x))))


@pytest.mark.parametrize(
    "between, flagged",
    [
        (torch.nn.ReLU(), ["conv2", "fc"]),
        (torch.nn.Sequential(torch.nn.BatchNorm2d(6), torch.nn.ReLU(inplace=True), torch.nn.Dropout()),
         ["conv2", "fc"]),
        (torch.nn.Sequential(torch.nn.ReLU(), torch.nn.MaxPool2d(2, stride=1, padding=1)), ["conv2", "fc"]),
        (torch.nn.GELU(), ["fc"]),
        (torch.nn.LeakyReLU(), ["fc"]),
        (torch.nn.Sequential(torch.nn.ReLU(), torch.nn.BatchNorm2d(6)), ["fc"]),
        (torch.nn.Sequential(torch.nn.ReLU(), torch.nn.AvgPool2d(3, stride=1, padding=1)), ["fc"]),
        (torch.nn.Sequential(torch.nn.ReLU(), torch.nn.MaxPool2d(3, 1, 1, return_indices=True)), ["fc"]),
        (lambda t: t.clamp(min=0), ["fc"]),
    ],
    ids=["relu", "bn-relu-dropout", "relu-maxpool", "gelu", "leaky", "relu-bn", "relu-avgpool", "indices", "clamp"],
)
def test_detector_flags_only_relu_chains(between, flagged):
    between = between if isinstance(between, torch.nn.Module) else _Lambda(between)
    model = _Chain(between)
    # conv2's output reaches fc through flatten only, without a ReLU: fc is not flagged ...
    assert spafl.find_zero_input_layers(model) == [name for name in flagged if name != "fc"]
    # ... until a ReLU comes first.
    assert spafl.find_zero_input_layers(_Chain(between, relu_before_fc=True)) == flagged


class _Lambda(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def test_detector_refuses_residual_adds_in_place_writes_and_mixed_call_sites():
    assert spafl.find_zero_input_layers(_Residual()) == []
    assert spafl.find_zero_input_layers(_InPlaceElsewhere()) == []
    assert spafl.find_zero_input_layers(_CalledTwice()) == []


@pytest.mark.parametrize("between", [torch.nn.GELU(), torch.nn.LeakyReLU(0.1), _Lambda(lambda t: t.clamp(min=0))],
                         ids=["gelu", "leaky", "clamp"])
def test_forcing_the_flag_where_the_rule_fails_changes_a_gradient(between):
    # Each of these maps 0 to 0 (so the second layer's input has zero features where the first
    # layer's units are pruned) but has a nonzero gradient at 0: the first layer's pruned units
    # then receive a gradient that skipping would drop.
    torch.manual_seed(0)
    first, second = ThresholdLinear(8, 12, bias=False), ThresholdLinear(12, 5, bias=False)
    _set_densities(torch.nn.Sequential(first, second), (0.5, 1.0))
    x = torch.randn(6, 8)
    grads = {}
    for flag in (False, True):
        second.skip_zero_inputs = flag
        first.threshold.grad = None
        second(between(first(x))).square().sum().backward()
        grads[flag] = first.threshold.grad.clone()
    pruned = ~first.mask
    assert (grads[False][pruned] != 0).all()
    assert (grads[True][pruned] == 0).all()  # what skipping does: wrong here, hence the rule


def test_sparsify_sets_flags_and_can_leave_them_off():
    def net():
        return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                                   torch.nn.Conv2d(4, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                   torch.nn.Linear(4 * 3 * 3, 3))

    flags = lambda m: [n for n, layer in spafl.named_threshold_layers(m) if layer.skip_zero_inputs]  # noqa: E731
    assert flags(spafl.sparsify(net())) == ["3", "6"]
    assert flags(spafl.sparsify(net(), skip_zero_inputs=False)) == []
    with pytest.raises(TypeError, match="skip_zero_inputs must be a bool"):
        spafl.sparsify(net(), skip_zero_inputs="yes")


class _Untraceable(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

    def forward(self, x):
        h = F.relu(self.a(x))
        return self.b(h) if h.sum() > 0 else h  # data-dependent control flow


def test_untraceable_model_gets_no_flags_and_a_warning():
    with pytest.warns(UserWarning, match="could not trace _Untraceable"):
        model = spafl.sparsify(_Untraceable())
    assert not any(layer.skip_zero_inputs for _, layer in spafl.named_threshold_layers(model))
    with pytest.raises(TypeError, match="nn.Module"):
        spafl.find_zero_input_layers("model")


def test_federated_models_get_their_flags_from_the_detector():
    from spafl.federated.models import build_model

    def flags(name, **kwargs):
        model = build_model(name, 10, **kwargs)
        return [n for n, layer in spafl.named_threshold_layers(model) if layer.skip_zero_inputs]

    assert flags("lenet5") == flags("digits-cnn") == ["conv2", "fc3", "fc4"]
    assert flags("vit") == []  # LayerNorm, GELU and attention outputs feed its linears
    assert flags("conv4") == ["convs.1", "convs.2", "convs.3", "dense1", "dense2", "dense3"]
    assert "conv1" not in flags("resnet18") and "blocks.0.conv1" in flags("resnet18")
    assert flags("lenet5", skip_zero_inputs=False) == []
    with pytest.raises(TypeError, match="skip_zero_inputs must be a bool"):
        build_model("lenet5", 10, skip_zero_inputs=None)


@pytest.mark.parametrize("geometry", [((5, 5), (1, 1), (0, 0), (1, 1)), ((3, 2), (2, 3), (1, 2), (2, 1)),
                                      ((1, 1), (2, 2), (0, 0), (1, 1))], ids=str)
def test_single_input_channel_weight_gradient_route(geometry):
    # With one input channel dW comes from a forward convolution of the transposed tensors.
    kernel, stride, padding, dilation = geometry
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 13, 11, generator=g, dtype=torch.float64)
    w = torch.randn(4, 1, *kernel, generator=g, dtype=torch.float64)
    dy = torch.randn(F.conv2d(x, w, None, stride, padding, dilation).shape, generator=g, dtype=torch.float64)
    want = torch.ops.aten.convolution_backward(dy, x, w, None, stride, padding, dilation, False, (0, 0), 1,
                                               (True, True, False))
    dx, dw = compact_conv._conv2d_backward(dy, x, w, stride, padding, dilation, 1, True)
    torch.testing.assert_close(dw, want[1])
    torch.testing.assert_close(dx, want[0])


def test_inference_skips_the_autograd_function():
    layer = ThresholdConv2d(3, 8, 3, backend="compact")
    with torch.no_grad():
        layer.threshold.copy_(threshold_for_density(layer.weight, 0.5))
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        y = layer(x)
    assert y.grad_fn is None
    torch.testing.assert_close(y, layer(x).detach())
    assert layer(x).grad_fn is not None


# ----------------------------------------------------------------------------- compact chains


def _chain_pair(name, mode, densities, skip_zero_inputs=True, **kwargs):
    """The federated model ``name`` on the compacting backend (which takes its chain unless
    ``skip_zero_inputs`` is off) and the same weights on the reference backend without input
    skipping (the layers one by one)."""
    from spafl.federated.models import build_model

    torch.manual_seed(0)
    fast = build_model(name, 10, backend="compact", backward_mode=mode, skip_zero_inputs=skip_zero_inputs, **kwargs)
    ref = build_model(name, 10, backend="reference", backward_mode=mode, skip_zero_inputs=False, **kwargs)
    ref.load_state_dict(fast.state_dict())
    for model in (fast, ref):
        _set_densities(model, densities)
    return fast, ref


@pytest.fixture
def chain_calls(monkeypatch):
    """The layers that ran through ``chain.layer``, by class name."""
    seen = []
    original = chain.layer
    monkeypatch.setattr(chain, "layer", lambda module, *a, **k: seen.append(type(module).__name__)
                        or original(module, *a, **k))
    return seen


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "name, shape, densities",
    [
        ("lenet5", (6, 1, 28, 28), (0.6, 0.3, 0.05, 1.0)),
        ("lenet5", (3, 1, 28, 28), (1.0, 1.0, 1.0, 1.0)),
        ("lenet5", (3, 1, 28, 28), (0.0, 0.5, 0.3, 1.0)),  # nothing passes conv1
        ("lenet5", (3, 1, 28, 28), (0.6, 0.0, 0.3, 0.4)),  # nor conv2
        ("lenet5", (3, 1, 28, 28), (0.6, 0.5, 0.3, 0.0)),  # the classifier is pruned
        ("digits-cnn", (7, 1, 8, 8), (0.5, 0.25, 0.3, 0.6)),
    ],
    ids=str,
)
def test_federated_models_take_the_chain_and_equal_the_reference(name, shape, densities, mode, chain_calls):
    fast, ref = _chain_pair(name, mode, densities, collapse_density=None)
    _assert_models_agree(fast, ref, torch.randn(shape))
    assert chain_calls == ["ThresholdConv2d", "ThresholdConv2d", "ThresholdLinear", "ThresholdLinear"]


@pytest.mark.parametrize("timing", ["current", "previous"])
def test_chain_runs_the_collapse_guard_as_the_layers_do(timing, chain_calls):
    # fc3 at 5% is under the guard's 10%: it resets fc3's thresholds (at once, or a forward later).
    fast, ref = _chain_pair("lenet5", "exact", (0.6, 0.3, 0.05, 1.0), collapse_density=0.1, collapse_timing=timing)
    plain, _ = _chain_pair("lenet5", "exact", (0.6, 0.3, 0.05, 1.0), collapse_density=0.1, collapse_timing=timing,
                           skip_zero_inputs=False)  # compact backend, layers one by one
    x = torch.randn(4, 1, 28, 28)
    for _ in range(2):
        _assert_models_agree(fast, ref, x)
        plain(x)
    assert len(chain_calls) == 8
    for key, value in ref.state_dict().items():
        assert torch.equal(fast.state_dict()[key], value), key
        assert torch.equal(plain.state_dict()[key], value), key
    assert int(fast.fc3.collapse_resets) == 1 and (fast.fc3.threshold == 0).all()


def test_chain_in_inference_matches_and_records_no_graph(chain_calls):
    fast, ref = _chain_pair("lenet5", "exact", (0.6, 0.3, 0.05, 1.0))
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        y = fast(x)
    assert y.grad_fn is None and y.is_contiguous()
    assert_close(y, ref(x), torch.float32, "output")
    fast.eval()
    assert_close(fast(x), ref.eval()(x), torch.float32, "output in eval mode")
    assert len(chain_calls) == 8


def test_chain_writes_every_output_element(poisoned_allocations, chain_calls):
    fast, ref = _chain_pair("lenet5", "exact", (0.6, 0.3, 0.05, 1.0))
    _assert_models_agree(fast, ref, torch.randn(3, 1, 28, 28))
    assert len(chain_calls) == 4


def test_chain_steps_aside_where_it_would_change_behaviour(chain_calls):
    from spafl.federated.models import LeNet5

    torch.manual_seed(0)
    x = torch.randn(2, 1, 28, 28)
    model = LeNet5()
    hooked = []
    handle = model.conv2.register_forward_hook(lambda module, args, out: hooked.append(out.shape))
    model(x)
    assert hooked == [(2, 50, 8, 8)] and chain_calls == []  # the hook sees conv2's whole output
    handle.remove()
    model.fc3.bias = torch.nn.Parameter(torch.zeros(500))  # a producer's pruned units would output the bias
    model(x)
    assert chain_calls == []
    for kwargs in ({"skip_zero_inputs": False}, {"backend": "reference"}):
        LeNet5(**kwargs)(x)
        assert chain_calls == []
    fresh = LeNet5()
    layers = (fresh.conv1, fresh.conv2, fresh.fc3, fresh.fc4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not chain.applies(x, *layers)
    assert chain.applies(x, *layers) and not chain.applies(x.double(), *layers)
    with pytest.raises(ValueError, match="x has shape"):  # the layer's own error, not the chain's
        LeNet5()(torch.randn(2, 3, 28, 28))
    assert not chain.applies(torch.zeros(0, 1, 28, 28), model.conv1)
    LeNet5()(x)
    assert len(chain_calls) == 4


def test_chain_ops_match_the_dense_activation():
    g = torch.Generator().manual_seed(0)
    index = torch.tensor([1, 4, 5])
    c = chain.Compact(torch.randn(2, 3, 6, 6, generator=g), index, 7)
    dense = chain.to_dense(c)
    assert dense.shape == (2, 7, 6, 6) and torch.equal(dense[:, index], c.values)
    assert dense[:, [0, 2, 3, 6]].abs().sum() == 0
    pooled = chain.relu(chain.max_pool2d(c, 2))
    assert pooled.rectified and not c.rectified
    assert torch.equal(chain.to_dense(pooled), F.relu(F.max_pool2d(dense, 2)))
    flat = chain.flatten(pooled)
    assert flat.size == 7 * 9 and flat.rectified
    assert torch.equal(chain.to_dense(flat), F.relu(F.max_pool2d(dense, 2)).flatten(1))
    every = chain.Compact(c.values, None, 3)
    assert chain.to_dense(every) is c.values and chain.flatten(every).index is None
    # No unit stored: pooling keeps the (empty) values in the graph, so gradients still arrive.
    values = torch.zeros(2, 0, 6, 6, requires_grad=True)
    empty = chain.max_pool2d(chain.Compact(values, index[:0], 7), 2)
    assert empty.values.shape == (2, 0, 3, 3) and empty.values.grad_fn is not None


class _ChainNet(torch.nn.Module):
    """A grouped producer, a Linear chain and a convolution ending a chain (its whole output)."""

    def __init__(self, backend, mode):
        super().__init__()
        kw = {"backend": backend, "backward_mode": mode, "collapse_density": None}
        self.conv1 = ThresholdConv2d(4, 6, 3, groups=2, bias=False, **kw)
        self.conv2 = ThresholdConv2d(6, 5, 3, padding=1, padding_mode="reflect", bias=True, **kw)
        self.fc1 = ThresholdLinear(9, 12, bias=False, **kw)
        self.fc2 = ThresholdLinear(12, 4, **kw)

    def forward(self, x, v, use_chain):
        if not use_chain:
            return self.conv2(F.relu(self.conv1(x))), self.fc2(F.relu(self.fc1(v)))
        h = chain.relu(chain.layer(self.conv1, x))
        a = chain.layer(self.conv2, h, compact_output=False)
        b = chain.layer(self.fc2, chain.relu(chain.layer(self.fc1, v)), compact_output=False)
        return a, b


@pytest.mark.parametrize("mode", MODES)
def test_chain_layer_equals_the_layers_called_one_by_one(mode):
    torch.manual_seed(0)
    fast, ref = _ChainNet("compact", mode), _ChainNet("reference", mode)
    ref.load_state_dict(fast.state_dict())
    _set_densities(fast, (0.5, 0.6, 0.4, 0.75))
    _set_densities(ref, (0.5, 0.6, 0.4, 0.75))
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(3, 4, 7, 6, generator=g), torch.randn(5, 9, generator=g)
    results = []
    for model, use_chain in ((fast, True), (ref, False)):
        xi, vi = x.clone().requires_grad_(), v.clone().requires_grad_()
        a, b = model(xi, vi, use_chain)
        (a * torch.randn(a.shape, generator=torch.Generator().manual_seed(2))).sum().backward()
        (b * torch.randn(b.shape, generator=torch.Generator().manual_seed(3))).sum().backward()
        results.append([a, b, xi.grad, vi.grad] + [p.grad for p in model.parameters()])
        model.zero_grad()
    assert results[0][0].is_contiguous()  # a chain's channels-last layout stays inside it
    names = ["conv2 out", "fc2 out", "dx", "dv"] + [n for n, _ in fast.named_parameters()]
    for name, a, e in zip(names, results[0], results[1], strict=True):
        assert_close(a, e, torch.float32, name)


def test_chain_layer_rejects_misuse():
    torch.manual_seed(0)
    conv = ThresholdConv2d(3, 4, 3, bias=False)
    _set_densities(conv, (0.5,))
    fc = ThresholdLinear(4 * 4 * 4, 5)
    x = torch.randn(2, 3, 6, 6)
    out = chain.layer(conv, x)
    assert isinstance(out, chain.Compact) and out.values.shape == (2, 2, 4, 4) and out.size == 4
    with pytest.raises(ValueError, match="must pass chain.relu"):
        chain.layer(fc, chain.flatten(out), compact_output=False)
    with pytest.raises(ValueError, match="compact_output needs a layer without bias"):
        chain.layer(fc, chain.flatten(chain.relu(out)))
    with pytest.raises(TypeError, match="ThresholdLinear or ThresholdConv2d"):
        chain.layer(torch.nn.Linear(3, 3), x)
    with pytest.raises(TypeError, match="tensor or a Compact"):
        chain.layer(conv, x.numpy())
    with pytest.raises(ValueError, match=r"takes \[B, 64\] inputs"):
        chain.layer(fc, chain.relu(out), compact_output=False)
    with pytest.raises(ValueError, match="compacting backend"):
        chain.layer(ThresholdConv2d(3, 4, 3, bias=False, backend="reference"), x)
    with pytest.raises(ValueError, match="groups == 1"):
        chain.layer(ThresholdConv2d(4, 4, 3, groups=2, bias=False), chain.relu(out))
    with pytest.raises(TypeError, match="float64"):
        chain.layer(conv, x.double())
    with pytest.raises(ValueError, match="too small"):
        chain.layer(conv, torch.randn(2, 3, 2, 2))
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ValueError, match="autocast"):
        chain.layer(conv, x)
    with pytest.raises(ValueError, match="non-finite"):
        with torch.no_grad():
            conv.threshold[0] = float("nan")
        chain.layer(conv, x)


@pytest.mark.parametrize("density", [0.5, 1.0])
def test_conv_output_layout_follows_f_conv2d_for_one_channel_inputs(density):
    # A one-channel tensor is contiguous in both formats; PyTorch tells them apart by the strides.
    x = torch.randn(2, 1, 7, 7)
    x_cl = x.as_strided(x.shape, (49, 1, 7, 1))
    w = torch.randn(6, 1, 3, 3)
    tau = threshold_for_density(w, density)
    for inp in (x, x_cl):
        y = threshold_conv2d(inp, w, tau)
        expected = F.conv2d(inp, w)
        assert y.stride() == expected.stride()
        assert_close(y, threshold_conv2d(inp, w, tau, backend="reference"), torch.float32, "y")


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("units, channels", [(None, [0, 2, 5]), ([1, 3, 4, 8], None), ([1, 3, 4, 8], [0, 2, 5]),
                                             ([6], [4])], ids=str)
@pytest.mark.parametrize("chans", [6, 1])
def test_groups_one_plan_is_the_general_plan_in_the_input_layout(units, channels, chans, channels_last):
    # conv2d_state builds the groups == 1 plan with one gather per dimension, the columns straight
    # into the input's layout; it must hold the general plan's values (bit for bit), in the layout
    # the general plan is reordered to, and keep the whole rows W[units] for the sign term.
    if chans == 1 and channels is not None:
        channels = [0]
    w = torch.randn(9, chans, 3, 2, generator=torch.Generator().manual_seed(3))
    units_t = None if units is None else torch.tensor(units)
    channels_t = None if channels is None else torch.tensor(channels)
    general = compact_conv._conv_plan(w, units_t, channels_t, 1).weight
    got = compact_conv._dense_groups_plan(w, units_t, channels_t, channels_last)
    plan = got["plan"]
    assert torch.equal(plan.weight, general) and plan.groups == 1 and plan.slots is None
    assert plan.channels is channels_t
    if channels_last:  # (what .contiguous(memory_format=torch.channels_last) gives)
        assert plan.weight.is_contiguous(memory_format=torch.channels_last)
    else:
        assert plan.weight.is_contiguous()
    rows = got.get("rows")
    if channels is not None and units is not None:
        assert torch.equal(rows, w[units_t])
    else:
        assert rows is None


@pytest.mark.parametrize("mode", MODES)
def test_compact_input_and_output_conv_backward_matches_the_reference(mode):
    # The chain's convolution (compact input in channels-last, compact output): the backward's
    # sign term reads the rows kept by the forward.
    g = torch.Generator().manual_seed(5)
    w = torch.randn(11, 7, 3, 3, generator=g)
    x_index = torch.tensor([0, 2, 3, 6])
    x = F.relu(torch.randn(3, 7, 8, 9, generator=g))
    x[:, [1, 4, 5]] = 0  # what a compact input leaves out
    tau = threshold_for_density(w, 0.5)
    mask = spafl.threshold_row_mask(w, tau).mask
    geo = spafl._conv.conv_geometry(3, 1, 1)
    xc = x.index_select(1, x_index).contiguous(memory_format=torch.channels_last)
    y, state = compact_conv.conv2d_forward(xc, w, None, mask, geo, x_index=x_index, compact_output=True)
    units = mask.nonzero().squeeze(1)
    assert state.rows is not None and torch.equal(state.rows, w[units])
    dy = torch.randn(y.shape, generator=g).contiguous(memory_format=torch.channels_last)
    dx, dw, dtau, _ = compact_conv.conv2d_backward(dy, xc, w, mask, geo, state, has_bias=False, mode=mode)
    # The reference: the whole input and output, the pruned filters' output gradient 0 (a ReLU
    # follows them in a chain).
    dy_full = torch.zeros(3, 11, 8, 9).index_copy_(1, units, dy.contiguous())
    y_ref = spafl.reference.threshold_conv2d_forward(x, w, mask, None, geo)
    rdx, rdw, rdtau, _ = spafl.reference.threshold_conv2d_backward(dy_full, x, w, mask, mask, geo,
                                                                   has_bias=False, mode=mode)
    assert_close(y, y_ref[:, units], torch.float32, "y")
    assert_close(dx, rdx[:, x_index], torch.float32, "dx")
    assert_close(dw, rdw, torch.float32, "dW")
    assert_close(dtau, rdtau, torch.float32, "dtau")
