"""The functional API, the autograd Function and the ThresholdLinear module."""

import copy

import pytest
import torch
from torch import nn

import spafl
from conftest import assert_close
from spafl import ThresholdConv2d, ThresholdLinear, reference, sparsify, threshold_for_density, threshold_linear


def _layer_pair(in_f=29, out_f=23, density=0.4, bias=True, mode="exact", device="cpu", dtype=torch.float32):
    torch.manual_seed(0)
    ref = ThresholdLinear(in_f, out_f, bias=bias, backend="reference", backward_mode=mode, device=device, dtype=dtype)
    with torch.no_grad():
        ref.threshold.copy_(threshold_for_density(ref.weight, density))
    tri = copy.deepcopy(ref)
    tri.backend = "triton"
    return ref, tri


@pytest.mark.interpreter
@pytest.mark.parametrize("mode", ["exact", "skip", "sample"])
@pytest.mark.parametrize("bias", [True, False])
def test_triton_layer_matches_reference_layer_through_autograd(mode, bias, device):
    ref, tri = _layer_pair(bias=bias, mode=mode, device=device)
    x = torch.randn(2, 3, 5, 29, device=device)  # any leading shape, like nn.Linear
    outs, grads = [], []
    for layer in (ref, tri):
        xi = x.clone().requires_grad_()
        y = layer(xi)
        (y * torch.linspace(-1, 1, y.numel(), device=device).reshape(y.shape)).sum().backward()
        outs.append(y)
        grads.append([xi.grad, layer.weight.grad, layer.threshold.grad] + ([layer.bias.grad] if bias else []))
    assert outs[0].shape == (2, 3, 5, 23)
    assert_close(outs[1], outs[0], torch.float32, "y")
    for name, a, e in zip(["dx", "dW", "dtau", "db"][: len(grads[0])], grads[1], grads[0], strict=True):
        assert_close(a, e, torch.float32, name)


def test_reference_layer_matches_straight_through_surrogate():
    layer, _ = _layer_pair()
    x = torch.randn(8, 29, requires_grad=True)
    layer(x).square().sum().backward()
    params = [p.detach().clone().requires_grad_() for p in (layer.weight, layer.threshold, layer.bias)]
    xs = x.detach().clone().requires_grad_()
    reference.straight_through_surrogate(xs, *params[:2], params[2]).square().sum().backward()
    got = [x.grad, layer.weight.grad, layer.threshold.grad, layer.bias.grad]
    want = [xs.grad] + [p.grad for p in params]
    for name, a, e in zip(["dx", "dW", "dtau", "db"], got, want, strict=True):
        torch.testing.assert_close(a, e, msg=name)


def test_fresh_layer_is_dense_and_equals_nn_linear():
    torch.manual_seed(1)
    dense = nn.Linear(10, 6)
    layer = ThresholdLinear.from_dense(dense)
    assert (layer.threshold == 0).all() and layer.density == 1.0 and layer.mask.all()
    x = torch.randn(4, 10)
    torch.testing.assert_close(layer(x), dense(x))
    assert layer.weight.data_ptr() != dense.weight.data_ptr()  # a copy, not shared storage


def test_to_dense_computes_the_same_function():
    layer, _ = _layer_pair(density=0.5)
    dense = layer.to_dense()
    assert type(dense) is nn.Linear
    x = torch.randn(6, 29)
    torch.testing.assert_close(dense(x), layer(x))
    assert (dense.weight[~layer.mask] == 0).all()


def test_mask_density_repr_and_defaults():
    layer = ThresholdLinear(7, 10)
    assert layer.weight.shape == (10, 7) and layer.threshold.shape == (10,) and layer.bias.shape == (10,)
    assert layer.mask.dtype == torch.bool and layer.mask.shape == (10,)
    with torch.no_grad():
        layer.threshold.copy_(threshold_for_density(layer.weight, 0.3))
    assert layer.density == pytest.approx(0.3)
    assert "density=0.300" in repr(layer) and "in_features=7" in repr(layer)
    assert ThresholdLinear(3, 4, bias=False).bias is None
    half = ThresholdLinear(3, 4, dtype=torch.float64)
    assert half.weight.dtype == half.threshold.dtype == torch.float64


def test_collapse_guard_resets_thresholds_and_counts_without_changing_healthy_layers():
    layer = ThresholdLinear(16, 200)
    with torch.no_grad():
        layer.threshold.fill_(10.0)  # everything pruned
    y = layer(torch.randn(3, 16))
    assert (layer.threshold == 0).all() and layer.collapse_resets.item() == 1
    assert layer.density == 1.0 and (y != layer.bias).any()  # this forward already used tau = 0
    with torch.no_grad():
        layer.threshold.copy_(threshold_for_density(layer.weight, 0.5))
    before = layer.threshold.clone()
    layer(torch.randn(3, 16))
    assert torch.equal(layer.threshold, before) and layer.collapse_resets.item() == 1
    off = ThresholdLinear(16, 200, collapse_density=None)
    with torch.no_grad():
        off.threshold.fill_(10.0)
    off(torch.randn(3, 16))
    assert (off.threshold == 10).all() and off.density == 0.0


@pytest.mark.interpreter
def test_collapse_guard_on_the_triton_path(device):
    _, tri = _layer_pair(out_f=150, density=1 / 150, device=device)
    tri(torch.randn(3, 29, device=device))
    assert (tri.threshold == 0).all() and tri.collapse_resets.item() == 1


def test_pruned_neurons_can_come_back_in_exact_mode_only():
    torch.manual_seed(0)
    layer = ThresholdLinear(12, 10, backward_mode="exact")
    with torch.no_grad():
        layer.threshold.copy_(threshold_for_density(layer.weight, 0.5))
    pruned = ~layer.mask
    layer(torch.randn(16, 12)).square().sum().backward()
    assert (layer.threshold.grad[pruned] != 0).all()
    layer.backward_mode = "skip"
    layer.threshold.grad = layer.weight.grad = None
    layer(torch.randn(16, 12)).square().sum().backward()
    assert (layer.threshold.grad[pruned] == 0).all() and (layer.weight.grad[pruned] == 0).all()


def test_state_dict_round_trip_and_penalty():
    a = ThresholdLinear(5, 4)
    with torch.no_grad():
        a.threshold.uniform_(0, 0.5)
    b = ThresholdLinear(5, 4)
    b.load_state_dict(a.state_dict())
    assert set(a.state_dict()) == {"weight", "threshold", "bias", "collapse_resets", "previous_density"}
    assert torch.equal(a.mask, b.mask)
    model = nn.Sequential(a, nn.ReLU(), b)
    torch.testing.assert_close(spafl.threshold_penalty(model), 2 * torch.exp(-a.threshold).sum())


def _aten_ops(fn):
    """The aten operations ``fn()`` dispatches, in order."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with Seen() as seen:
        fn()
    return seen.ops


def test_threshold_penalty_in_one_expression_on_the_kernel_path():
    # Layers on the Triton path: one expression over the concatenated thresholds (four operations
    # forward, two backward, whatever the number of layers); the plain path on the CPU keeps the
    # per-layer sums (bit for bit what it was). Same value and gradients to fp32 rounding, and
    # differentiable twice.
    from spafl import ThresholdConv2d

    torch.manual_seed(0)

    def model(backend):
        torch.manual_seed(1)
        m = nn.Sequential(ThresholdConv2d(3, 7, 3, backend=backend), ThresholdLinear(11, 5, backend=backend),
                          ThresholdLinear(5, 3, backend=backend))
        with torch.no_grad():
            for layer in spafl.threshold_layers(m):
                layer.threshold.uniform_(-0.5, 2.0)
        return m

    plain, kernel = model("auto"), model("triton")
    taus = [layer.threshold for layer in spafl.threshold_layers(plain)]
    want = torch.stack([torch.exp(-t).sum() for t in taus]).sum()
    got_plain = spafl.threshold_penalty(plain)
    assert torch.equal(got_plain, want)  # the recorded histories' order, bit for bit
    got = spafl.threshold_penalty(kernel)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    got.backward(torch.tensor(0.3))
    got_plain.backward(torch.tensor(0.3))
    for a, b in zip(spafl.threshold_layers(kernel), spafl.threshold_layers(plain), strict=True):
        assert torch.equal(a.threshold.grad, b.threshold.grad)  # -(g e^-tau), elementwise either way
    metadata = {"view", "detach", "alias", "expand", "_unsafe_view", "slice", "narrow"}  # (no launch)
    fwd = [op for op in _aten_ops(lambda: spafl.threshold_penalty(kernel)) if op not in metadata]
    assert fwd == ["cat", "neg", "exp", "sum"], fwd
    value = spafl.threshold_penalty(kernel)
    bwd = [op for op in _aten_ops(lambda: value.backward()) if op not in metadata]
    assert bwd.count("neg") == 1 and bwd.count("mul") == 1 and "stack" not in bwd, bwd
    # higher order: d2/dtau2 sum exp(-tau) = exp(-tau)
    tau = next(spafl.threshold_layers(kernel)).threshold
    (g,) = torch.autograd.grad(spafl.threshold_penalty(kernel), tau, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), tau)
    torch.testing.assert_close(h, torch.exp(-tau.detach()))
    # thresholds of different dtypes: per layer, as before
    mixed = model("triton")
    mixed[2].threshold.data = mixed[2].threshold.data.double()
    ops = _aten_ops(lambda: spafl.threshold_penalty(mixed))
    assert "cat" not in ops and "stack" in ops


def test_sparsify_swaps_linear_layers_keeping_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 3)))
    x = torch.randn(5, 6)
    y0 = model(x)
    out = sparsify(model, exclude=("2.1",), backward_mode="skip")
    assert out is model
    assert isinstance(model[0], ThresholdLinear) and isinstance(model[2][0], ThresholdLinear)
    assert type(model[2][1]) is nn.Linear
    assert model[0].backward_mode == "skip"
    torch.testing.assert_close(model(x), y0)
    assert [n for n, _ in spafl.named_threshold_layers(model)] == ["0", "2.0"]
    d = spafl.model_density(model)
    assert d == {"mean": 1.0, "weighted": 1.0, "layers": {"0": 1.0, "2.0": 1.0}}


def test_sparsify_leaves_attention_projections_alone_and_accepts_a_predicate():
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2), "head": nn.Linear(8, 2), "keep": nn.Linear(8, 2)})
    with pytest.warns(UserWarning, match=r"left these layers dense: attn.out_proj \(NonDynamicallyQuantizableLinear\)"):
        sparsify(model, exclude=lambda name, m: name == "keep")
    assert type(model["attn"].out_proj) is not ThresholdLinear  # MHA reads out_proj.weight directly
    assert isinstance(model["head"], ThresholdLinear) and type(model["keep"]) is nn.Linear


def test_sparsify_errors():
    with pytest.raises(ValueError, match="do not exist"):
        sparsify(nn.Sequential(nn.Linear(2, 2)), exclude=("nope",))
    with pytest.raises(TypeError, match="nn.Module"):
        sparsify("model")
    with pytest.raises(TypeError, match="from_dense"):
        sparsify(nn.Linear(2, 2))


def test_autocast_runs_in_the_autocast_dtype_with_master_weights_kept():
    layer = ThresholdLinear(16, 8)
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32 and layer.threshold.grad.dtype == torch.float32
    assert_close(y.float(), layer.to_dense()(x), torch.bfloat16, "y under autocast")


def test_autocast_takes_the_mask_from_the_master_weight():
    # bf16(1.001) == 1.0: a mask computed from the cast weight would prune both units.
    layer = ThresholdLinear(4, 2, bias=False)
    with torch.no_grad():
        layer.weight.fill_(1.001)
        layer.threshold.fill_(1.0005)
    assert layer.mask.all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(torch.ones(1, 4))
    assert (y != 0).all()


def test_functional_matches_layer_and_train_only_thresholds():
    layer, _ = _layer_pair()
    layer.weight.requires_grad_(False)  # the paper's "train only the thresholds" setting
    x = torch.randn(3, 29)
    y = threshold_linear(x, layer.weight, layer.threshold, layer.bias)
    torch.testing.assert_close(y, layer(x))
    y.sum().backward()
    assert layer.threshold.grad is not None and layer.weight.grad is None


# ----------------------------------------------------------------------------- collapse guard options


class _AuthorsGuard:
    """The SpaFL authors' guard written out (their MaskedMLP.forward): the density of the PREVIOUS
    forward (``ratio``, 1 at first) is tested; a reset zeroes the thresholds for good and counts."""

    def __init__(self):
        self.ratio, self.resets = 1.0, 0

    def forward(self, weight, threshold, x):
        if self.ratio <= 0.01:
            threshold.fill_(0.0)
            self.resets += 1
        mask = weight.abs().mean(1) > threshold
        self.ratio = float(mask.float().mean())
        return x @ (weight * mask[:, None]).t()


@pytest.mark.parametrize("backend", ["compact", "reference"])
def test_previous_timing_reproduces_the_authors_sequence(backend):
    torch.manual_seed(0)
    layer = ThresholdLinear(6, 200, bias=False, backend=backend, collapse_timing="previous")
    oracle = _AuthorsGuard()
    oracle_tau = layer.threshold.detach().clone()
    # healthy, then 1 unit of 200 (0.5% <= 1%), then left alone for three forwards
    schedule = [0.5, 1 / 200, None, None, None]
    fired_at = []
    for step, density in enumerate(schedule):
        if density is not None:
            with torch.no_grad():
                layer.threshold.copy_(threshold_for_density(layer.weight, density))
            oracle_tau.copy_(layer.threshold)
        x = torch.randn(3, 6)
        resets = layer.collapse_resets.item()
        y = layer(x)
        want = oracle.forward(layer.weight.detach(), oracle_tau, x)
        if layer.collapse_resets.item() > resets:
            fired_at.append(step)
        torch.testing.assert_close(y, want)
        torch.testing.assert_close(layer.threshold.detach(), oracle_tau)
        assert layer.collapse_resets.item() == oracle.resets
        assert layer.previous_density.item() == pytest.approx(oracle.ratio)
    # the sparse mask was used once (step 1), the reset came one forward later and persisted
    assert fired_at == [2] and layer.density == 1.0


def test_current_timing_fires_in_the_same_forward():
    layer = ThresholdLinear(6, 200, bias=False)
    with torch.no_grad():
        layer.threshold.copy_(threshold_for_density(layer.weight, 1 / 200))
    y = layer(torch.randn(3, 6))
    assert layer.collapse_resets.item() == 1 and (y != 0).sum() > 150
    assert layer.previous_density.item() == 1.0  # this forward's density, after the reset


@pytest.mark.parametrize("timing", ["current", "previous"])
def test_eval_forward_changes_nothing_unless_asked(timing):
    layer = ThresholdLinear(6, 200, collapse_timing=timing)
    with torch.no_grad():
        layer.threshold.fill_(10.0)  # everything pruned
        layer.previous_density.fill_(0.0)
    layer.eval()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(3, 6)
    y = layer(x)
    with torch.no_grad():
        layer(x)
    assert torch.equal(y, layer.bias.detach().expand(3, 200))  # the pruned mask, no reset
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k
    layer.train()
    layer(x)
    assert (layer.threshold == 0).all() and layer.collapse_resets.item() == 1
    authors = ThresholdLinear(6, 200, collapse_timing=timing, collapse_in_eval=True).eval()
    with torch.no_grad():
        authors.threshold.fill_(10.0)
        authors.previous_density.fill_(0.0)
        authors(x)
    assert (authors.threshold == 0).all() and authors.collapse_resets.item() == 1


def test_previous_density_travels_in_the_state_dict_and_old_checkpoints_load():
    a = ThresholdLinear(5, 4, collapse_timing="previous")
    with torch.no_grad():
        a.previous_density.fill_(0.25)
    b = ThresholdLinear(5, 4, collapse_timing="previous")
    b.load_state_dict(a.state_dict())
    assert b.previous_density.item() == 0.25
    old = {k: v for k, v in a.state_dict().items() if k != "previous_density"}  # no version metadata
    c = ThresholdLinear(5, 4)
    c.load_state_dict(old)
    assert c.previous_density.item() == 1.0 and torch.equal(c.weight, a.weight)
    with pytest.raises(RuntimeError, match="Missing key"):
        c.load_state_dict({k: v for k, v in old.items() if k != "threshold"})


def test_guard_runs_on_the_device_without_host_synchronisation():
    # Meta tensors have no values: any .item(), bool() or nonzero() on the guard's path would raise.
    for timing in ("current", "previous"):
        layer = ThresholdLinear(8, 200, collapse_timing=timing, device="meta")
        layer(torch.randn(3, 8, device="meta")).sum().backward()
        assert layer.threshold.grad.shape == (200,) and layer.previous_density.device.type == "meta"


def test_guard_options_are_validated_and_shown():
    with pytest.raises(ValueError, match="collapse_timing must be one of"):
        ThresholdLinear(3, 3, collapse_timing="next")
    with pytest.raises(TypeError, match="collapse_in_eval must be a bool"):
        ThresholdLinear(3, 3, collapse_in_eval=1)
    with pytest.raises(TypeError, match="skip_zero_inputs must be a bool"):
        ThresholdLinear(3, 3, skip_zero_inputs="no")
    text = repr(ThresholdLinear(3, 3, collapse_timing="previous", collapse_in_eval=True, skip_zero_inputs=True))
    assert "collapse_timing='previous', collapse_in_eval=True, skip_zero_inputs=True" in text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_previous_timing_on_cuda_does_not_synchronise(kind):
    if kind == "linear":
        layer, x = ThresholdLinear(64, 200, collapse_timing="previous", device="cuda"), torch.randn(8, 64)
    else:
        layer, x = ThresholdConv2d(16, 200, 3, collapse_timing="previous", device="cuda"), torch.randn(2, 16, 8, 8)
    x = x.cuda()
    with torch.no_grad():
        layer.threshold.fill_(10.0)
    layer(x).sum().backward()  # warm-up (compilation may synchronise); measures density 0, no reset yet
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        layer(x).sum().backward()  # the reset fires here
        layer.eval()
        layer(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert layer.collapse_resets.item() == 1 and layer.previous_density.item() == 1.0


@pytest.mark.parametrize("timing", ["current", "previous"])
def test_host_and_device_guard_paths_agree(timing):
    # On CPU the guard decides on the host; the device-side path (no synchronisation) is what
    # CUDA runs. Same masks, thresholds, counters and stored densities, edge cases included.
    from spafl._options import ThresholdOptions
    from spafl.functional import _guarded_row_mask

    torch.manual_seed(0)
    w = torch.randn(200, 7)
    for density in (0.5, 2 / 200, 3 / 200, 1 / 200, 0.0, 1.0):
        for previous in (1.0, 0.0100001, 0.01, 0.005, 0.0):
            results = []
            for with_perm in (False, True):  # False on CPU: the host path
                tau = threshold_for_density(w, density)
                counter = torch.zeros((), dtype=torch.long)
                stored = torch.tensor(previous)
                options = ThresholdOptions(collapse_density=0.01, collapse_timing=timing)
                rm = _guarded_row_mask(w, tau, "reference", with_perm, options, counter, stored)
                results.append((rm.mask, tau, counter, stored))
            for a, b in zip(*results, strict=True):
                assert torch.equal(a, b), (density, previous)
