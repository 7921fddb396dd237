"""The Triton path's host-side savings: the collapse guard's writes done by the row-mask launch
itself (the same masks, thresholds, counters and stored densities as the host-issued writes),
and the launchers' scratch buffers kept between calls (never an output a caller can hold)."""

from __future__ import annotations

import threading

import pytest
import torch

from spafl import ThresholdLinear, threshold_for_density

pytestmark = pytest.mark.interpreter


def _guard_results(w, backend, timing, density, previous, tau_dtype=torch.float32, counter_dtype=torch.long,
                   stored_dtype=torch.float32, with_counter=True, with_stored=True, strided_tau=False):
    from spafl._guard import _guarded_row_mask
    from spafl._options import ThresholdOptions

    tau = threshold_for_density(w, density).to(tau_dtype)
    if strided_tau:  # a view with stride 2 (the launch cannot write it where it is)
        tau = torch.stack([tau, torch.full_like(tau, 7.0)], 1)[:, 0]
    counter = torch.zeros((), dtype=counter_dtype, device=w.device) if with_counter else None
    stored = torch.tensor(previous, dtype=stored_dtype, device=w.device) if with_stored else None
    versions = [t._version for t in (tau, counter, stored) if t is not None]
    options = ThresholdOptions(collapse_density=0.01, collapse_timing=timing)
    rm = _guarded_row_mask(w, tau, backend, True, options, counter, stored)
    bumped = [t._version > v for t, v in zip([t for t in (tau, counter, stored) if t is not None], versions,
                                              strict=True)]
    return (rm.mask, rm.perm, rm.count.reshape(1), tau, counter, stored), bumped


@pytest.mark.parametrize("timing", ["current", "previous"])
def test_guard_written_by_the_launch_matches_the_host_writes(timing, device):
    # "reference" with the index list: the same decisions device-side through PyTorch operations
    # (what the Triton path issued before its launch wrote them); at and around the guard's edge.
    import spafl.kernels.threshold_mask as masks

    launched = []
    original = masks.guarded_row_mask
    masks.guarded_row_mask = lambda *a, **k: (launched.append(1), original(*a, **k))[1]
    try:
        torch.manual_seed(0)
        w = torch.randn(200, 7, device=device)
        cases = 0
        for density in (0.5, 2 / 200, 3 / 200, 1 / 200, 0.0, 1.0):
            for previous in (1.0, 0.0100001, 0.01, 0.005, 0.0):
                want, _ = _guard_results(w, "reference", timing, density, previous)
                got, bumped = _guard_results(w, "triton", timing, density, previous)
                for name, a, b in zip(("mask", "perm", "count", "tau", "counter", "stored"), got, want, strict=True):
                    assert a.dtype == b.dtype and torch.equal(a, b), (name, density, previous)
                assert all(bumped), (density, previous)  # as the host's in-place writes bumped them
                cases += 1
        assert len(launched) == cases
    finally:
        masks.guarded_row_mask = original


@pytest.mark.parametrize("variant", [
    {"tau_dtype": torch.bfloat16}, {"tau_dtype": torch.float16}, {"with_counter": False},
    {"with_stored": False},  # (current timing only: previous needs the stored density)
])
@pytest.mark.parametrize("density", [0.5, 1 / 300, 0.0])
def test_guard_in_the_launch_with_other_tensors(variant, density, device):
    torch.manual_seed(1)
    w = torch.randn(300, 19, device=device)
    for timing in (("current",) if not variant.get("with_stored", True) else ("current", "previous")):
        for previous in (1.0, 0.005):
            want, _ = _guard_results(w, "reference", timing, density, previous, **variant)
            got, bumped = _guard_results(w, "triton", timing, density, previous, **variant)
            for a, b in zip(got, want, strict=True):
                assert (a is None and b is None) or (a.dtype == b.dtype and torch.equal(a, b)), (timing, previous)
            assert all(bumped)


@pytest.mark.parametrize("variant", [{"counter_dtype": torch.int32}, {"stored_dtype": torch.float64},
                                     {"strided_tau": True}])
def test_tensors_the_launch_cannot_write_take_the_host_writes(variant, device):
    import spafl.kernels.threshold_mask as masks

    torch.manual_seed(2)
    w = torch.randn(100, 5, device=device)
    tau = torch.zeros(100, device=device)
    if variant.get("strided_tau"):
        tau = torch.zeros(100, 2, device=device)[:, 0]
    stored = torch.ones((), dtype=variant.get("stored_dtype", torch.float32), device=device)
    counter = torch.zeros((), dtype=variant.get("counter_dtype", torch.long), device=device)
    assert not masks.writes_guard(tau, stored, counter)
    for density in (0.5, 0.0):
        for timing in ("current", "previous"):
            want, _ = _guard_results(w, "reference", timing, density, 0.005, **variant)
            got, _ = _guard_results(w, "triton", timing, density, 0.005, **variant)
            for a, b in zip(got, want, strict=True):
                assert a.dtype == b.dtype and torch.equal(a, b), (density, timing)


def test_a_reset_by_the_launch_is_seen_by_autograd(device):
    # A graph that saved the thresholds before a forward reset them must refuse its backward,
    # as it did when the host reset them in place.
    layer = ThresholdLinear(16, 100, backend="triton", device=device)
    with torch.no_grad():
        layer.threshold.fill_(10.0)  # every unit pruned: the guard fires
    penalty = (layer.threshold ** 2).sum()  # (pow saves tau for its backward)
    layer(torch.randn(3, 16, device=device))
    assert layer.collapse_resets.item() == 1 and (layer.threshold == 0).all()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        penalty.backward()


def test_scratch_is_kept_per_role_shape_dtype_and_thread():
    from spafl.kernels.threshold_mask import _SCRATCH_BYTES, scratch

    cpu = torch.device("cpu")
    a = scratch("test.a", (8,), torch.float32, cpu)
    assert scratch("test.a", (8,), torch.float32, cpu) is a
    assert scratch("test.b", (8,), torch.float32, cpu) is not a
    assert scratch("test.a", (9,), torch.float32, cpu) is not a
    assert scratch("test.a", (8,), torch.float64, cpu) is not a
    other = []
    thread = threading.Thread(target=lambda: other.append(scratch("test.a", (8,), torch.float32, cpu)))
    thread.start()
    thread.join()
    assert other[0] is not a and other[0].data_ptr() != a.data_ptr()
    big = (_SCRATCH_BYTES // 4 + 1,)
    assert scratch("test.big", big, torch.float32, cpu) is not scratch("test.big", big, torch.float32, cpu)


@pytest.mark.parametrize("mode", ["skip", "exact", "sample"])
def test_outputs_of_consecutive_calls_never_share_memory(mode, device):
    # Two forwards and two backwards of the same shapes: every output and saved tensor of the
    # first call is its own memory and keeps its values through the second call.
    torch.manual_seed(3)
    layer = ThresholdLinear(40, 50, backend="triton", backward_mode=mode, device=device)
    with torch.no_grad():
        layer.threshold.copy_(threshold_for_density(layer.weight, 0.5))
    x1 = torch.randn(6, 40, device=device, requires_grad=True)
    x2 = torch.randn(6, 40, device=device, requires_grad=True)
    dy1, dy2 = torch.randn(6, 50, device=device), torch.randn(6, 50, device=device)

    def grads(x, dy):
        layer.zero_grad(set_to_none=True)
        x.grad = None
        y = layer(x)
        y.backward(dy)
        return [y.detach(), x.grad, layer.weight.grad, layer.threshold.grad, layer.bias.grad]

    alone = [t.clone() for t in grads(x1, dy1)]
    x1.grad = None
    layer.zero_grad(set_to_none=True)
    y1, y2 = layer(x1), layer(x2)  # two graphs alive at once
    assert y1.data_ptr() != y2.data_ptr()
    y1_values = y1.detach().clone()
    y2.backward(dy2)
    second = [x2.grad, layer.weight.grad, layer.threshold.grad, layer.bias.grad]
    second = [t.clone() for t in second]
    layer.zero_grad(set_to_none=True)
    y1.backward(dy1)  # the first graph's saved state is untouched by the second call
    first = [y1_values, x1.grad, layer.weight.grad, layer.threshold.grad, layer.bias.grad]
    for name, a, b in zip(("y", "dx", "dw", "dtau", "db"), first, alone, strict=True):
        assert torch.equal(a, b), name
    again = grads(x2, dy2)[1:]
    for name, a, b in zip(("dx", "dw", "dtau", "db"), again, second, strict=True):
        assert torch.equal(a, b), name


# ----------------------------------------------------------------------------- the kept Triton call


def _pair(mode, bias, timing, check_finite=False, seed=4):
    torch.manual_seed(seed)
    kwargs = dict(backend="triton", backward_mode=mode, bias=bias, collapse_timing=timing, check_finite=check_finite)
    a = ThresholdLinear(33, 70, **kwargs)
    b = ThresholdLinear(33, 70, **kwargs)
    b.load_state_dict(a.state_dict())
    return a, b


def _steps(layer, xs, dys, densities):
    out = []
    for x, dy, density in zip(xs, dys, densities, strict=True):
        with torch.no_grad():
            layer.threshold.copy_(threshold_for_density(layer.weight, density))
        layer.zero_grad(set_to_none=True)
        x = x.clone().requires_grad_(True)
        y = layer(x)
        y.backward(dy)
        grads = [x.grad, layer.weight.grad, layer.threshold.grad]
        grads += [layer.bias.grad] if layer.bias is not None else []
        out.append([y.detach().clone(), *[g.clone() for g in grads], layer.threshold.detach().clone(),
                    layer.collapse_resets.clone(), layer.previous_density.clone()])
        with torch.no_grad():
            layer.weight.mul_(0.99)  # (a step between forwards)
    return out


@pytest.mark.parametrize("mode", ["skip", "exact", "sample"])
@pytest.mark.parametrize("bias, timing", [(True, "current"), (False, "current"), (True, "previous")])
def test_kept_triton_call_is_the_general_call_bit_for_bit(monkeypatch, mode, bias, timing):
    import spafl.layers

    general = []
    original = spafl.layers.linear_call
    monkeypatch.setattr(spafl.layers, "linear_call", lambda *a, **k: (general.append(1), original(*a, **k))[1])
    kept, plain = _pair(mode, bias, timing)
    torch.manual_seed(5)
    xs = [torch.randn(9, 33) for _ in range(4)]
    dys = [torch.randn(9, 70) for _ in range(4)]
    densities = [0.5, 1 / 140, 0.3, 1.0]  # the second fires the guard ("previous": the third)
    got = _steps(kept, xs, dys, densities)
    assert len(general) == 1  # the first call only
    monkeypatch.setattr(spafl.layers, "device_call_of", lambda *a, **k: None)
    want = _steps(plain, xs, dys, densities)
    assert len(general) == 5
    assert kept.collapse_resets.item() == 1
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        for i, (a, b) in enumerate(zip(g, w, strict=True)):
            assert a.dtype == b.dtype and torch.equal(a, b), (step, i)


def test_kept_triton_call_leaves_every_other_call_to_the_general_path(monkeypatch):
    import spafl.layers
    from spafl.functional import linear_call

    general = []
    monkeypatch.setattr(spafl.layers, "linear_call", lambda *a, **k: (general.append(1), linear_call(*a, **k))[1])
    torch.manual_seed(6)
    layer = ThresholdLinear(12, 20, backend="triton", check_finite=False)
    x = torch.randn(5, 12)

    def general_calls(fn):
        layer(x)  # (the call that keeps the tensors and options)
        before = len(general)
        fn()
        return len(general) - before

    def same_as_fresh():
        fresh = ThresholdLinear(12, 20, backend="triton", check_finite=False, bias=layer.bias is not None,
                                dtype=layer.weight.dtype)
        fresh.load_state_dict(layer.state_dict())
        with torch.no_grad():
            want = fresh(x.to(layer.weight.dtype))
        assert torch.equal(layer(x.to(layer.weight.dtype)), want)

    assert general_calls(lambda: layer(x)) == 0
    assert general_calls(lambda: layer(torch.randn(2, 3, 12))) == 1  # (not 2-D)
    with pytest.raises(TypeError, match="x is torch.float64 but weight is torch.float32"):
        general_calls(lambda: layer(x.double()))
    with pytest.raises(ValueError, match="7 features in its last dimension"):
        general_calls(lambda: layer(torch.randn(5, 7)))

    def new_data():
        layer.weight.data = torch.randn(20, 12)
        same_as_fresh()
    assert general_calls(new_data) >= 1

    def new_parameter():
        layer.weight = torch.nn.Parameter(torch.randn(20, 12))
        same_as_fresh()
    assert general_calls(new_parameter) >= 1

    def new_buffer():
        layer.previous_density = torch.ones(())
        layer(x)
    assert general_calls(new_buffer) == 1

    def new_options():
        layer.backward_mode = "exact"
        layer(x)
    assert general_calls(new_options) == 1

    def eval_mode():
        layer.eval()
        layer(x)
        layer.train()
    assert general_calls(eval_mode) == 1

    def under_autocast():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            layer(x)
    assert general_calls(under_autocast) == 1

    def fused_step_mask():
        layer.keep_next_mask("triton", spafl_row_mask(layer))
        layer(x)
    assert general_calls(fused_step_mask) == 1

    def strided_threshold():
        layer.threshold.data = torch.zeros(20, 2)[:, 0]
        same_as_fresh()
    assert general_calls(strided_threshold) >= 1
    assert "_device_call" in layer.__dict__ and layer.__dict__["_device_call"] is None  # (the launch cannot write it)

    layer.threshold.data = torch.zeros(20)
    layer(x)
    layer.half()  # (.to() and the like drop it)
    assert "_device_call" not in layer.__dict__
    same_as_fresh()


def spafl_row_mask(layer):
    from spafl import kernels

    return kernels.threshold_row_mask(layer.weight, layer.threshold.detach(), collapse_density=0.01)
