"""The fused optimizers (spafl.optim): torch.optim's updates, and the next forward's row mask.

CPU path: bit-identical to torch.optim driving the same layer, and within fp32 rounding of
torch.optim driving the reference layer. Triton path (the interpreter, small odd shapes): the
fused kernel against torch.optim for fp32 / bf16 / fp16, all-pruned and all-active layers.
"""

from __future__ import annotations

import copy

import pytest
import torch

import spafl.optim as so
from spafl import ThresholdConv2d, ThresholdLinear, reference
from spafl._checks import interpreter_enabled

OPTIMIZERS = [
    ("sgd", so.SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-3)),
    ("nesterov", so.SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=True)),
    ("dampened", so.SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.8, dampening=0.3)),
    ("plain-sgd", so.SGD, torch.optim.SGD, dict(lr=0.1)),
    ("adam", so.Adam, torch.optim.Adam, dict(lr=1e-2, weight_decay=1e-3)),
    ("adamw", so.AdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2)),
]


def _layer(kind: str, **kw):
    if kind == "linear":
        layer = ThresholdLinear(23, 37, **kw)
    else:
        layer = ThresholdConv2d(5, 19, 3, padding=1, **kw)
    with torch.no_grad():
        # Thresholds around the scores: a part of the units pruned, and moving as training goes.
        layer.threshold.copy_(reference.row_scores(layer.weight).to(layer.threshold.dtype)
                              * torch.linspace(0.6, 1.3, layer.threshold.shape[0]))
    return layer


def _input(kind: str, gen, dtype=torch.float32):
    shape = (9, 23) if kind == "linear" else (3, 5, 7, 6)
    return torch.randn(shape, generator=gen).to(dtype)


def _train_step(layer, opt, x):
    opt.zero_grad()
    y = layer(x).float()
    # The penalty of SpaFL's objective: every threshold gets a gradient, pruned units' too.
    loss = y.square().mean() + 1e-2 * torch.exp(-layer.threshold.float()).sum()
    loss.backward()
    opt.step()


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("mode", ["exact", "skip"])
@pytest.mark.parametrize("name,fused,plain,kw", OPTIMIZERS, ids=[o[0] for o in OPTIMIZERS])
def test_cpu_matches_torch_optim(kind, mode, name, fused, plain, kw, monkeypatch):
    torch.manual_seed(0)
    a = _layer(kind, backward_mode=mode)
    b = copy.deepcopy(a)
    ref = copy.deepcopy(a)
    ref.backend = "reference"
    oa, ob, oref = fused(a.parameters(), **kw), plain(b.parameters(), **kw), plain(ref.parameters(), **kw)
    gen = torch.Generator().manual_seed(1)
    scored = []
    real_scores = reference.row_scores
    monkeypatch.setattr(reference, "row_scores", lambda w: scored.append(w) or real_scores(w))
    densities = set()
    for i in range(25):
        x = _input(kind, gen)
        scored.clear()
        _train_step(a, oa, x)
        # After the first step, the forward takes the step's scores: one scoring pass a step.
        assert len(scored) == (2 if i == 0 else 1), (i, len(scored))
        scored.clear()
        _train_step(b, ob, x)
        assert len(scored) >= 1  # (plain torch.optim: the layer scores rows itself)
        _train_step(ref, oref, x)
        densities.add(round(a.density, 4))
    # Same arithmetic as torch.optim on the same backend: bit-identical.
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    for pa, pb in zip(oa.state.values(), ob.state.values(), strict=True):
        for key in pa:
            assert torch.equal(torch.as_tensor(pa[key]), torch.as_tensor(pb[key])), key
    # Against the reference layer: within fp32 rounding (the compact backend sums differently).
    torch.testing.assert_close(a.weight, ref.weight, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.threshold, ref.threshold, rtol=1e-4, atol=1e-5)
    assert torch.equal(a.mask, ref.mask)
    assert len(densities) > 1 or 0 < min(densities) < 1, densities  # units were pruned on the way


def test_state_dict_round_trip_with_torch_optim():
    torch.manual_seed(0)
    layer = _layer("linear")
    twin = copy.deepcopy(layer)
    opt = so.SGD(layer.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        _train_step(layer, opt, _input("linear", gen))
    # The state loads into torch.optim.SGD and back (same keys), and training continues the same.
    plain = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9)
    twin.load_state_dict(layer.state_dict())
    # (deep copies: load_state_dict keeps the given buffers, which two optimizers would then share)
    plain.load_state_dict(copy.deepcopy(opt.state_dict()))
    again = so.SGD(layer.parameters(), lr=0.05, momentum=0.9)
    again.load_state_dict(copy.deepcopy(plain.state_dict()))
    for _ in range(3):
        x = _input("linear", gen)
        _train_step(layer, again, x)
        _train_step(twin, plain, x)
    assert torch.equal(layer.weight, twin.weight)
    assert torch.equal(layer.threshold, twin.threshold)


@pytest.mark.parametrize("edit", ["copy_weight", "load_state_dict", "edit_threshold", "mul_weight", "replace"])
def test_edits_invalidate_the_kept_mask(edit):
    torch.manual_seed(0)
    layer = _layer("linear", collapse_density=None)
    opt = so.SGD(layer.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(2)
    _train_step(layer, opt, _input("linear", gen))
    assert "_next_mask" in layer.__dict__
    with torch.no_grad():
        if edit == "copy_weight":
            layer.weight.copy_(torch.randn_like(layer.weight))
        elif edit == "load_state_dict":
            state = {k: v.clone() for k, v in layer.state_dict().items()}
            state["weight"] = torch.randn_like(layer.weight)
            layer.load_state_dict(state)
        elif edit == "edit_threshold":
            layer.threshold[::2] += 0.05
        elif edit == "mul_weight":
            layer.weight[::3] *= 0.1
        else:
            layer.weight = torch.nn.Parameter(torch.randn_like(layer.weight))
    x = _input("linear", gen)
    expected = reference.threshold_linear_forward(x, layer.weight, reference.row_mask(layer.weight,
                                                                                       layer.threshold).mask,
                                                  layer.bias)
    assert layer._kept_mask(layer.forward_options) is None
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


def test_threshold_gradient_and_plain_torch_optim_unchanged():
    torch.manual_seed(0)
    layer = _layer("linear", backward_mode="exact", collapse_density=None)
    opt = so.SGD(layer.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(4)
    _train_step(layer, opt, _input("linear", gen))
    x = _input("linear", gen)
    twin = copy.deepcopy(layer)
    twin.forget_next_mask()
    for m in (layer, twin):
        m.zero_grad()
        m(x).square().sum().backward()
    assert layer.threshold.grad is not None and layer.threshold.grad.abs().sum() > 0
    for pa, pb in zip(layer.parameters(), twin.parameters(), strict=True):
        assert torch.equal(pa.grad, pb.grad)


def test_collapse_guard_with_kept_mask():
    # The guard fires in the forward that uses the step's mask: thresholds reset, counter up.
    torch.manual_seed(0)
    layer = _layer("linear", collapse_density=0.5)
    twin = copy.deepcopy(layer)
    oa, ob = so.SGD(layer.parameters(), lr=0.05), torch.optim.SGD(twin.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in (layer, twin):
            m.threshold.fill_(0.0)
    for step in range(4):
        x = _input("linear", gen)
        _train_step(layer, oa, x)
        _train_step(twin, ob, x)
        with torch.no_grad():  # push most units under their thresholds for the next forward
            for m in (layer, twin):
                if step == 1:
                    m.threshold.add_(1.0)
    assert int(layer.collapse_resets) == int(twin.collapse_resets) >= 1
    assert torch.equal(layer.weight, twin.weight)
    assert torch.equal(layer.threshold, twin.threshold)


def test_unsupported_groups_fall_back_to_torch_optim():
    torch.manual_seed(0)
    layer = _layer("linear")
    twin = copy.deepcopy(layer)
    kw = dict(lr=1e-2, amsgrad=True)
    oa, ob = so.Adam(layer.parameters(), **kw), torch.optim.Adam(twin.parameters(), **kw)
    gen = torch.Generator().manual_seed(6)
    for _ in range(4):
        x = _input("linear", gen)
        _train_step(layer, oa, x)
        _train_step(twin, ob, x)
    assert torch.equal(layer.weight, twin.weight)


# ----------------------------------------------------------------------------- Triton path

triton_only = pytest.mark.skipif(not interpreter_enabled() and not torch.cuda.is_available(),
                                 reason="needs TRITON_INTERPRET=1 or CUDA")


def _exact_fma() -> bool:
    # Triton 3.9's interpreter gives tl.fma torch's CPU bits here; 3.6's does not (measured).
    import triton

    return tuple(int(v) for v in triton.__version__.split(".")[:2]) >= (3, 9)


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@triton_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name,fused,plain,kw", [OPTIMIZERS[1], OPTIMIZERS[2], OPTIMIZERS[4], OPTIMIZERS[5]],
                         ids=["nesterov", "dampened", "adam", "adamw"])
def test_fused_kernel_matches_torch_optim(dtype, name, fused, plain, kw):
    from spafl.kernels.threshold_optim import fused_step

    torch.manual_seed(0)
    dev = _device()
    n, k = 37, 45
    w = (torch.randn(n, k) * 0.1).to(dev, dtype)
    tau = torch.full((n,), 0.08, device=dev)
    p = w.clone().requires_grad_()
    opt = plain([p], **kw, **({"eps": 1e-3} if name.startswith("adam") else {}))
    w2 = w.clone()
    s1 = torch.zeros_like(w)
    s2 = torch.zeros_like(w)
    ulp = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
    for step in range(1, 4):
        g = (torch.randn(n, k) * 0.1).to(dev, dtype)
        g[::4] = 0  # rows with no gradient still move (momentum, decay)
        p.grad = g.clone()
        opt.step()
        if fused is so.SGD:
            rm = fused_step(w2, g, tau, kind="sgd", lr=kw["lr"], weight_decay=kw.get("weight_decay", 0.0), state1=s1,
                            momentum=kw["momentum"], dampening=kw.get("dampening", 0.0),
                            nesterov=kw.get("nesterov", False), first=step == 1)
        else:
            rm = fused_step(w2, g, tau, kind=name, lr=kw["lr"], weight_decay=kw["weight_decay"], state1=s1,
                            state2=s2, eps=1e-3, step=step)
        torch.testing.assert_close(w2.float(), p.detach().float(), rtol=ulp, atol=ulp)
        if fused is so.SGD and dtype == torch.float32 and not torch.cuda.is_available() and _exact_fma():
            # torch's CPU add(alpha=) is a fused multiply-add, and so is the kernel's: same bits
            assert torch.equal(w2, p.detach()) and torch.equal(s1, opt.state[p]["momentum_buffer"])
        # The mask, scores and active list are those of the row-mask kernel on the updated weight.
        from spafl.kernels import threshold_row_mask

        expected = threshold_row_mask(w2, tau)
        assert torch.equal(rm.score, expected.score)
        assert torch.equal(rm.mask, expected.mask)
        assert torch.equal(rm.perm, expected.perm) and torch.equal(rm.count, expected.count)


@triton_only
@pytest.mark.parametrize("level", ["all-pruned", "all-active"])
def test_fused_kernel_extremes_and_guard(level):
    from spafl.kernels import threshold_row_mask
    from spafl.kernels.threshold_optim import fused_step

    torch.manual_seed(0)
    dev = _device()
    w = torch.randn(70, 33, device=dev)
    g = torch.randn(70, 33, device=dev)
    tau = torch.full((70,), 10.0 if level == "all-pruned" else -1.0, device=dev)
    for guard in (None, 0.05):
        w2 = w.clone()
        rm = fused_step(w2, g, tau, kind="sgd", lr=0.1, collapse_density=guard)
        expected = threshold_row_mask(w2, tau, collapse_density=guard)
        for a, b in zip(rm, expected, strict=True):
            assert (a is None and b is None) or torch.equal(a, b)
        torch.testing.assert_close(w2, w - 0.1 * g)
        if level == "all-active" or guard is None:
            assert int(rm.count) == (70 if level == "all-active" else 0)
        else:
            assert bool(rm.collapsed) and int(rm.count) == 70


@triton_only
@pytest.mark.parametrize("kind,mode,which", [
    ("linear", "exact", 1), ("linear", "skip", 1), ("linear", "exact", 4), ("linear", "skip", 4),
    ("conv", "exact", 1), ("conv", "skip", 4),  # (the interpreter's convolutions are slow: two of four)
], ids=lambda v: OPTIMIZERS[v][0] if isinstance(v, int) else v)
def test_triton_training_loop(kind, mode, which):
    name, fused, plain, kw = OPTIMIZERS[which]
    torch.manual_seed(0)
    a = _layer(kind, backend="triton", backward_mode=mode, device=_device())
    b = copy.deepcopy(a)
    ref = copy.deepcopy(a)
    ref.backend = "reference"
    oa, ob, oref = fused(a.parameters(), **kw), plain(b.parameters(), **kw), plain(ref.parameters(), **kw)
    gen = torch.Generator().manual_seed(1)
    steps = 6 if kind == "linear" else 4
    for _ in range(steps):
        x = _input(kind, gen).to(_device())
        if kind == "conv":
            x = x[:2]
        for layer, opt in ((a, oa), (b, ob), (ref, oref)):
            _train_step(layer, opt, x)
    assert oa.fused_launches == steps
    for other in (b, ref):
        torch.testing.assert_close(a.weight, other.weight, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a.threshold, other.threshold, rtol=1e-4, atol=1e-5)
        assert torch.equal(a.mask, other.mask)


@triton_only
@pytest.mark.parametrize("mode", ["exact", "skip"])
@pytest.mark.parametrize("which", [0, 4, 5], ids=["sgd", "adam", "adamw"])
def test_triton_compact_training_loop_adds_the_term_once(mode, which):
    """Compact gradients on the Triton path against torch.optim driving the reference layer (fp32,
    momentum and weight decay, Adam, AdamW): the active rows' sign(W) r / K, which the dW GEMM
    leaves to the fused step, is added once. The same loop with the term dropped, or added twice
    (as if the GEMM added it too), leaves the tolerance: the check can fail."""
    from spafl.kernels import threshold_optim

    name, fused, plain, kw = OPTIMIZERS[which]
    real = threshold_optim.fused_step

    def run(fault):
        taken = []

        def step(weight2d, grad2d, threshold, **k):
            rows = k.get("grad_rows")
            if rows is not None and len(rows) == 3 and rows[2]:
                taken.append(True)
                mask, r = rows[:2]
                if fault == "dropped":
                    k["grad_rows"] = (mask, r)  # the active rows taken as complete
                elif fault == "twice":
                    term = torch.sign(weight2d) * (r / weight2d.shape[1])[:, None]
                    grad2d = torch.where(mask[:, None], grad2d + term, grad2d)
            return real(weight2d, grad2d, threshold, **k)

        torch.manual_seed(0)
        a = _layer("linear", backend="triton", backward_mode=mode, device=_device())
        ref = copy.deepcopy(a)
        ref.backend = "reference"
        oa, oref = fused(a.parameters(), compact_grads=True, **kw), plain(ref.parameters(), **kw)
        gen = torch.Generator().manual_seed(1)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(threshold_optim, "fused_step", step)
            for _ in range(6):
                x = _input("linear", gen).to(_device())
                _train_step(a, oa, x)
                _train_step(ref, oref, x)
        assert oa.fused_launches == len(taken) == 6
        return a, ref

    a, ref = run(None)
    torch.testing.assert_close(a.weight, ref.weight, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.threshold, ref.threshold, rtol=1e-4, atol=1e-5)
    assert torch.equal(a.mask, ref.mask)
    for fault in ("dropped", "twice"):
        a, ref = run(fault)
        assert not torch.allclose(a.weight, ref.weight, rtol=1e-4, atol=1e-5), fault


def _guarded_twins(timing: str):
    """A Triton layer with the collapse guard stepped by spafl.optim.SGD, and its copy stepped by
    torch.optim.SGD."""
    torch.manual_seed(0)
    a = _layer("linear", backend="triton", collapse_density=0.3, collapse_timing=timing, device=_device())
    b = copy.deepcopy(a)
    return a, b, so.SGD(a.parameters(), lr=0.05, momentum=0.9), torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9)


@triton_only
@pytest.mark.parametrize("timing", ["current", "previous"])
def test_triton_collapse_guard_in_the_fused_step(timing):
    # The fused kernel makes the guard's decision for the next forward (either timing); that
    # forward resets the thresholds and stores its density as the row-mask kernel's path does.
    a, b, oa, ob = _guarded_twins(timing)
    gen = torch.Generator().manual_seed(7)
    for step in range(5):
        x = _input("linear", gen).to(_device())
        for layer, opt in ((a, oa), (b, ob)):
            _train_step(layer, opt, x)
            if step == 1:
                with torch.no_grad():  # most units under their thresholds: the guard must fire
                    layer.threshold.add_(1.0)
                if layer is a:  # (an in-place edit: the kept mask is dropped, as the next forward shows)
                    assert a._kept_mask(a.forward_options) is None
    assert oa.fused_launches == 5
    assert int(a.collapse_resets) == int(b.collapse_resets) >= 1
    assert torch.equal(a.previous_density, b.previous_density)
    torch.testing.assert_close(a.weight, b.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.threshold, b.threshold, rtol=1e-5, atol=1e-6)
    assert torch.equal(a.mask, b.mask)


@triton_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1, 70, 1531])
def test_guard_writes_match_the_host_operations(dtype, n):
    # The one launch that applies a kept mask's guard decision against what the host issued
    # (masked_fill_, add_, div): thresholds, counter and stored density bit for bit, fired or
    # not, with and without the counter and the stored density; every written tensor's version
    # bumped. n = 1531 spans several of the kernel's blocks.
    from spafl.kernels.threshold_mask import guard_writes

    device = _device()
    gen = torch.Generator().manual_seed(n)
    for fired in (True, False):
        for active in (0, 1, n // 3, n):
            for with_counter, with_density in ((True, True), (False, True), (True, False), (False, False)):
                tau = torch.randn(n, generator=gen).to(dtype).to(device)
                counter = torch.tensor(5, dtype=torch.int64, device=device) if with_counter else None
                stored = torch.tensor(0.75, device=device) if with_density else None
                flag = torch.tensor([fired], device=device)
                count = torch.tensor([active], dtype=torch.int32, device=device)
                want_tau = tau.masked_fill(flag, 0.0)
                versions = [t._version for t in (tau, counter, stored) if t is not None]
                guard_writes(tau, flag, count, stored, counter)
                assert torch.equal(tau, want_tau), (fired, active)
                if counter is not None:
                    assert int(counter) == 5 + fired
                if stored is not None:
                    want = torch.div(torch.tensor([active], dtype=torch.int32), torch.tensor(float(n)))
                    assert torch.equal(stored.cpu().view(1), want), (stored, want)
                assert all(t._version > v for t, v in zip([t for t in (tau, counter, stored) if t is not None],
                                                          versions, strict=True))
    # an int8 flag as the fused step's kernel writes it
    tau = torch.ones(n, dtype=dtype, device=device)
    guard_writes(tau, torch.ones(1, dtype=torch.int8, device=device), torch.zeros(1, dtype=torch.int32,
                 device=device), None, None)
    assert not tau.any()


@triton_only
def test_guard_writes_refuse_what_they_cannot_write():
    from spafl.kernels.threshold_mask import guard_writes

    device = _device()
    tau = torch.zeros(8, device=device)
    flag = torch.zeros(1, dtype=torch.bool, device=device)
    count = torch.zeros(1, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="unit-stride threshold"):
        guard_writes(torch.zeros(8, 2, device=device)[:, 0], flag, count, None, None)
    with pytest.raises(ValueError, match="int64 one-element counter"):
        guard_writes(tau, flag, count, None, torch.zeros(1, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="fp32 one-element previous density"):
        guard_writes(tau, flag, count, torch.zeros(2, device=device), None)
    with pytest.raises(ValueError, match="collapsed must be one bool or int8"):
        guard_writes(tau, torch.zeros(2, dtype=torch.bool, device=device), count, None, None)
    with pytest.raises(ValueError, match="count must be one int32"):
        guard_writes(tau, flag, torch.zeros(1, dtype=torch.int64, device=device), None, None)
    with pytest.raises(ValueError, match="one-dimensional floating-point thresholds"):
        guard_writes(torch.zeros(8, 1, device=device), flag, count, None, None)
    with pytest.raises(ValueError, match="one-dimensional floating-point thresholds"):
        guard_writes(torch.zeros(8, dtype=torch.int32, device=device), flag, count, None, None)


def _guarded_fused_pair(kind: str, timing: str, fire: bool):
    """Two copies of a Triton layer with the collapse guard, each stepped twice by
    spafl.optim.SGD (the second step leaves a kept mask; ``fire``: the thresholds raised before
    it, so that the guard fires in the forward that takes it), and that forward's input."""
    torch.manual_seed(0)
    kw = dict(backend="triton", collapse_density=0.3, collapse_timing=timing, device=_device())
    if kind == "conv1x1":  # (the Triton path runs it as a Linear GEMM over the pixels)
        a = ThresholdConv2d(5, 19, 1, **kw).to(memory_format=torch.channels_last)
        with torch.no_grad():
            a.threshold.copy_(reference.row_scores(a.weight) * torch.linspace(0.6, 1.3, 19, device=_device()))
    else:
        a = _layer(kind, **kw)
        if kind == "conv":  # (as the simulator runs it on a GPU: the filters gathered in the tile loads)
            a = a.to(memory_format=torch.channels_last)
    b = copy.deepcopy(a)
    gen = torch.Generator().manual_seed(3)
    x = _input("linear" if kind == "linear" else "conv", gen).to(_device())
    if kind != "linear":
        x = x.contiguous(memory_format=torch.channels_last)
    opts = [so.SGD(layer.parameters(), lr=0.05, momentum=0.9) for layer in (a, b)]
    for step in range(2):
        for layer, opt in zip((a, b), opts, strict=True):
            opt.zero_grad()
            (layer(x).float().square().mean() + 1e-2 * torch.exp(-layer.threshold.float()).sum()).backward()
            if step == 1 and fire:
                with torch.no_grad():  # (before the step: the mask it builds collapses, either timing)
                    layer.threshold.add_(1.0)
                    layer.previous_density.fill_(0.0)
            opt.step()
    for layer in (a, b):
        assert layer._kept_mask(layer.forward_options) is not None
    return a, b, x


@triton_only
@pytest.mark.parametrize("kind", ["linear", "conv", "conv1x1"])
@pytest.mark.parametrize("timing", ["current", "previous"])
@pytest.mark.parametrize("fire", [False, True], ids=["holds", "fires"])
def test_triton_forward_after_a_fused_step_makes_the_guard_writes_in_its_gemm_launch(kind, timing, fire, monkeypatch):
    # The forward that takes the step's mask makes the guard's reset, count and stored density in
    # its GEMM's launch (program 0): one launch per forward, no row-mask launch, no launch of the
    # guard's own; bit for bit what the guard's own launch writes (the twin, with the deferral
    # turned off), with grad mode on and off, and the thresholds' version bumped once either way.
    from work_count import WorkCounter

    from spafl import functional

    outputs = []
    for defer in (True, False):
        a, _, x = _guarded_fused_pair(kind, timing, fire)
        if not defer:
            monkeypatch.setattr(functional, "_guarded_row_mask",
                                lambda *args, real=functional._guarded_row_mask: real(*args[:-1], False))
        version = a.threshold._version
        with WorkCounter() as wc:
            y = a(x)
        monkeypatch.undo()
        names = set(wc.kernels)
        gemm = "_threshold_linear_fwd_kernel" if kind != "conv" else "_threshold_conv2d_fwd_kernel"
        if defer:
            assert names == {gemm}, names
        else:
            assert names == {gemm, "_guard_writes_kernel"}, names
        assert wc.kernels[gemm].launches == 1
        assert a.threshold._version == version + 1
        y.float().square().mean().backward()  # (the autograd graph takes the write)
        outputs.append((y.detach(), a.threshold.detach().clone(), a.threshold.grad.clone(), a.weight.grad.clone(),
                        int(a.collapse_resets), a.previous_density.clone()))
    (y1, t1, gt1, gw1, r1, p1), (y2, t2, gt2, gw2, r2, p2) = outputs
    assert torch.equal(y1, y2) and torch.equal(t1, t2) and torch.equal(gt1, gt2) and torch.equal(gw1, gw2)
    assert r1 == r2 and torch.equal(p1, p2)
    assert (r1 >= 1) == fire and (bool((t1 == 0).all()) or not fire)


@triton_only
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_triton_guard_writes_fall_back_to_their_own_launch(kind, monkeypatch):
    # Where the GEMM's launch could run more than once (a tuner's trials), is an int64-offset
    # variant or does not run (an empty batch), the guard's writes take their own launch: once,
    # with the same results.
    from work_count import WorkCounter

    from spafl.kernels import _config, threshold_conv2d, threshold_linear

    def forward(case):
        a, b, x = _guarded_fused_pair(kind, "previous", True)
        if case == "empty":
            x = x[:0]
        with WorkCounter() as wc:
            if case == "tuned":
                with monkeypatch.context() as mp:
                    mp.setattr(_config, "autotune_enabled", lambda: True)
                    mp.setattr(_config, "_every_candidate", True)  # (every candidate once: no timing)
                    a(x)
            elif case == "wide":  # (the int64-offset variants, as for tensors past 2^31 elements)
                with monkeypatch.context() as mp:
                    for module in (threshold_linear, threshold_conv2d):
                        mp.setattr(module, "fits_int32", lambda *tensors, margin=1024: False)
                    _config._PLANS.clear()
                    a(x)
                _config._PLANS.clear()
            else:
                a(x)
        return a, wc

    for case in ("tuned", "wide", "empty"):
        a, wc = forward(case)
        assert wc.kernels["_guard_writes_kernel"].launches == 1, case
        assert int(a.collapse_resets) == 1 and bool((a.threshold == 0).all()), case
        if case == "empty":
            assert "_threshold_linear_fwd_kernel" not in wc.kernels and "_threshold_conv2d_fwd_kernel" not in wc.kernels
    a, wc = forward("plain")
    assert "_guard_writes_kernel" not in wc.kernels
    assert int(a.collapse_resets) == 1 and bool((a.threshold == 0).all())


@triton_only
def test_triton_forward_refuses_foreign_pending_guard_writes():
    from spafl.kernels.threshold_linear import threshold_linear_fwd
    from spafl.kernels.threshold_mask import pending_guard_writes, threshold_row_mask

    w, x = torch.randn(6, 4), torch.randn(3, 4)
    rm = threshold_row_mask(w, torch.zeros(6))
    other = pending_guard_writes(torch.zeros(5), torch.zeros(1, dtype=torch.bool), rm.count, None, None)
    with pytest.raises(ValueError, match="pending guard writes"):
        threshold_linear_fwd(x, w, None, rm._replace(guard=other))
    with pytest.raises(ValueError, match="pending guard writes"):
        threshold_linear_fwd(x, w, None, rm._replace(guard=("not", "guard writes")))


def test_eval_forward_and_copies_leave_the_kept_mask_current(monkeypatch):
    torch.manual_seed(0)
    layer = _layer("linear")
    opt = so.SGD(layer.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(8)
    _train_step(layer, opt, _input("linear", gen))
    x = _input("linear", gen)
    clone = copy.deepcopy(layer)  # a copy's tensors are new: it scores its weight itself
    assert clone._kept_mask(clone.forward_options) is None
    torch.testing.assert_close(clone(x), layer(x))
    scored = []
    real_scores = reference.row_scores
    monkeypatch.setattr(reference, "row_scores", lambda w: scored.append(w) or real_scores(w))
    layer.eval()
    with torch.no_grad():
        layer(x)  # (no guard in eval mode: another key, the layer scores itself)
    assert len(scored) == 1
    layer.train()
    layer(x)
    assert len(scored) == 1  # the training forward still takes the step's scores


# ----------------------------------------------------------------------------- compact gradients (CPU)


def _pending(layer):
    """The layer's weight gradient left as rows by the backward (None if none is pending)."""
    from spafl._functions import _GRAD_SINKS

    sink = _GRAD_SINKS.get(layer.weight)
    return None if sink is None else sink.grad


def _backward(layer, x):
    y = layer(x).float()
    (y.square().mean() + 1e-2 * torch.exp(-layer.threshold.float()).sum()).backward()


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("mode", ["exact", "skip", "sample"])
@pytest.mark.parametrize("name,fused,plain,kw", OPTIMIZERS, ids=[o[0] for o in OPTIMIZERS])
def test_compact_grads_match_torch_optim(kind, mode, name, fused, plain, kw):
    torch.manual_seed(0)
    a = _layer(kind, backward_mode=mode)
    b = copy.deepcopy(a)
    oa, ob = fused(a.parameters(), compact_grads=True, **kw), plain(b.parameters(), **kw)
    gen = torch.Generator().manual_seed(1)
    compact_steps = 0
    for _ in range(25):
        x = _input(kind, gen)
        oa.zero_grad()
        _backward(a, x)
        pending = _pending(a)
        if pending is not None:
            compact_steps += 1
            assert a.weight.grad is None
            mask = a.mask
            active = mask.nonzero().squeeze(1)
            # The active rows' dW, and in exact mode the pruned rows owed a sign term: never the
            # pruned rows of skip mode.
            assert set(active.tolist()) <= set(pending.rows.tolist())
            if mode == "skip":
                assert pending.rows.numel() == active.numel()
        ob.zero_grad()
        _backward(b, x)
        assert torch.equal(a.threshold.grad, b.threshold.grad)
        if pending is not None:
            assert torch.equal(pending.dense(), b.weight.grad)
        oa.step()
        ob.step()
        assert a.weight.grad is None or pending is None
    assert compact_steps >= 5, compact_steps  # (steps with every unit active take full gradients)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    for pa, pb in zip(oa.state.values(), ob.state.values(), strict=True):
        assert pa.keys() == pb.keys()
        for key in pa:
            assert torch.equal(torch.as_tensor(pa[key]), torch.as_tensor(pb[key])), key
    assert torch.equal(a.mask, b.mask)


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("level", ["all-pruned", "all-active"])
def test_compact_grads_extremes(kind, level):
    torch.manual_seed(0)
    a = _layer(kind, backward_mode="exact", collapse_density=None)
    with torch.no_grad():
        a.threshold.fill_(1e3 if level == "all-pruned" else -1.0)
    b = copy.deepcopy(a)
    kw = dict(lr=0.05, momentum=0.9, weight_decay=1e-3)
    oa, ob = so.SGD(a.parameters(), compact_grads=True, **kw), torch.optim.SGD(b.parameters(), **kw)
    gen = torch.Generator().manual_seed(2)
    for _ in range(4):
        x = _input(kind, gen)
        oa.zero_grad()
        _backward(a, x)
        pending = _pending(a)
        if level == "all-active":  # nothing to skip: the full gradient, as without the opt-in
            assert pending is None and a.weight.grad is not None
        else:
            assert a.weight.grad is None and pending is not None and pending.rows.numel() <= a.weight.shape[0]
        ob.zero_grad()
        _backward(b, x)
        oa.step()
        ob.step()
    assert torch.equal(a.weight, b.weight)
    assert torch.equal(oa.state[a.weight]["momentum_buffer"], ob.state[b.weight]["momentum_buffer"])


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_compact_grads_accumulation_second_forward_zero_grad_clipping(kind):
    """Two backwards before a step (the second moves the first into ``.grad`` and adds its full
    gradient), a forward whose graph is dropped, ``zero_grad`` dropping pending rows, and clipping
    after ``full_grads()``: the same as torch.optim with full gradients."""
    torch.manual_seed(0)
    a = _layer(kind, backward_mode="exact")
    b = copy.deepcopy(a)
    kw = dict(lr=1e-3, weight_decay=1e-3)
    oa, ob = so.Adam(a.parameters(), compact_grads=True, **kw), torch.optim.Adam(b.parameters(), **kw)
    gen = torch.Generator().manual_seed(4)
    seen = 0
    for step in range(6):
        x1, x2 = _input(kind, gen), _input(kind, gen)
        for layer, opt, compact in ((a, oa, True), (b, ob, False)):
            # rows left pending by a backward, then dropped by zero_grad
            _backward(layer, x2)
            opt.zero_grad()
            assert _pending(layer) is None
            layer(x1)  # a second forward, its graph never used
            _backward(layer, x1)
            if compact and layer.density < 1:
                assert layer.weight.grad is None and _pending(layer) is not None
                seen += 1
            if step % 2:  # accumulation
                _backward(layer, x2)
                assert _pending(layer) is None and layer.weight.grad is not None
            if step >= 3:  # clipping reads every gradient: full_grads first
                if compact:
                    opt.full_grads()
                    assert layer.weight.grad is not None
                torch.nn.utils.clip_grad_norm_(layer.parameters(), 0.05)
            opt.step()
    assert seen >= 4, seen  # (a step with every unit active takes full gradients)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    # The state dict moves to torch.optim and back, and training goes on the same.
    back = so.Adam(a.parameters(), compact_grads=True, **kw)
    back.load_state_dict(copy.deepcopy(ob.state_dict()))
    plain = torch.optim.Adam(b.parameters(), **kw)
    plain.load_state_dict(copy.deepcopy(oa.state_dict()))
    for _ in range(3):
        x = _input(kind, gen)
        _train_step(a, back, x)
        _train_step(b, plain, x)
    assert torch.equal(a.weight, b.weight)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compact_grads_16bit_weights_take_full_gradients(dtype):
    torch.manual_seed(0)
    a = _layer("linear", dtype=dtype)
    b = copy.deepcopy(a)
    oa, ob = so.SGD(a.parameters(), lr=0.05, momentum=0.9, compact_grads=True), torch.optim.SGD(
        b.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        x = _input("linear", gen, dtype)
        oa.zero_grad()
        _backward(a, x)
        assert _pending(a) is None and a.weight.grad is not None
        oa.step()
        _train_step(b, ob, x)
    assert torch.equal(a.weight, b.weight)


def test_compact_grads_off_by_default_and_checked():
    layer = _layer("linear")
    opt = so.SGD(layer.parameters(), lr=0.1)
    assert not opt.compact_grads
    _backward(layer, torch.randn(4, 23))
    assert layer.weight.grad is not None and _pending(layer) is None
    with pytest.raises(TypeError, match="compact_grads must be a bool"):
        so.SGD(layer.parameters(), lr=0.1, compact_grads=1)


# ----------------------------------------------------------------------------- compact gradients (Triton)


def _triton_linear(dtype, mode, **kw):
    layer = ThresholdLinear(23, 37, backend="triton", backward_mode=mode, dtype=dtype, device=_device(), **kw)
    with torch.no_grad():
        layer.threshold.copy_(reference.row_scores(layer.weight).float() * torch.linspace(0.6, 1.3, 37))
    return layer


TRITON_COMPACT = [
    ("nesterov", so.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=True)),
    # (eps that fp16 holds: 1e-8 is 0 there, and Adam divides by it)
    ("adam", so.Adam, dict(lr=1e-2, weight_decay=1e-3, eps=1e-3)),
]


@triton_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["exact", "skip", "sample"])
@pytest.mark.parametrize("name,opt_cls,kw", TRITON_COMPACT, ids=[c[0] for c in TRITON_COMPACT])
def test_triton_compact_grads_match_full_gradients(dtype, mode, name, opt_cls, kw):
    """The rows-only backward and the fused step that forms the pruned rows' gradient: the same
    bits as the fused step from the full gradient. 16-bit skip / exact mode: there the Linear
    GEMM stores G rounded and the step adds every row's sign(W) r / K, rounding again, where the
    full gradient rounds G + the term once: the gradient is within two ulps of the full one, and
    the step gives the same bits as the full-gradient step from that gradient (the active rows
    as ``pending.dense()`` forms them, the pruned rows as the full backward writes them: the
    interpreter's conversion truncates there, torch rounds)."""
    torch.manual_seed(0)
    a = _triton_linear(dtype, mode)
    b = copy.deepcopy(a)
    oa, ob = opt_cls(a.parameters(), compact_grads=True, **kw), opt_cls(b.parameters(), **kw)
    rounded_twice = dtype != torch.float32 and mode != "sample"
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        x = _input("linear", gen, dtype).to(_device())
        oa.zero_grad()
        _backward(a, x)
        pending = _pending(a)
        assert a.weight.grad is None and pending is not None
        assert pending.lacks_term == (mode != "sample")
        ob.zero_grad()
        _backward(b, x)
        assert torch.equal(a.threshold.grad, b.threshold.grad)
        if rounded_twice:
            _ulps_close(pending.dense(), b.weight.grad, ulps=2)
            b.weight.grad = torch.where(pending.mask[:, None], pending.dense(), b.weight.grad)
        elif dtype == torch.float32:  # (16-bit sample: torch rounds the owed term, the interpreter truncates)
            assert torch.equal(pending.dense(), b.weight.grad)
        oa.step()
        ob.step()
    assert oa.fused_launches == ob.fused_launches == 5
    assert torch.equal(a.weight, b.weight)
    assert torch.equal(a.threshold, b.threshold)
    assert torch.equal(a.mask, b.mask)
    for pa, pb in zip(oa.state.values(), ob.state.values(), strict=True):
        for key in pa:
            assert torch.equal(torch.as_tensor(pa[key]), torch.as_tensor(pb[key])), key


def _ulps_close(a, b, ulps=2):
    """Within ``ulps`` units in the last place of ``b``'s dtype, of each element plus of the
    largest one (16-bit values rounded at different points: where G and the sign term cancel,
    G's own rounding is large against the result)."""
    eps = torch.finfo(b.dtype).eps
    a, b = a.detach().double(), b.detach().double()
    tol = ulps * eps * (b.abs() + b.abs().max())
    bad = (a - b).abs() > tol
    assert not bad.any(), f"{int(bad.sum())} elements off by more than {ulps} ulps: {(a - b).abs().max():.3g}"
    return True


@triton_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("level", ["all-pruned", "all-active"])
def test_triton_compact_grads_extremes(dtype, level):
    torch.manual_seed(0)
    a = _triton_linear(dtype, "exact", collapse_density=None)
    with torch.no_grad():
        a.threshold.fill_(1e3 if level == "all-pruned" else -1.0)
    b = copy.deepcopy(a)
    kw = dict(lr=0.05, momentum=0.9, weight_decay=1e-3)
    oa, ob = so.SGD(a.parameters(), compact_grads=True, **kw), so.SGD(b.parameters(), **kw)
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        x = _input("linear", gen, dtype).to(_device())
        oa.zero_grad()
        _backward(a, x)
        assert a.weight.grad is None
        ob.zero_grad()
        _backward(b, x)
        oa.step()
        ob.step()
    # (16-bit with active rows: G rounded before the step adds its term, see above)
    same = torch.equal if dtype == torch.float32 or level == "all-pruned" else _ulps_close
    assert same(a.weight, b.weight)
    assert same(oa.state[a.weight]["momentum_buffer"], ob.state[b.weight]["momentum_buffer"])


@triton_only
def test_triton_compact_grads_accumulation_and_fallbacks():
    """Accumulation, and an optimizer group the fused kernel does not take (amsgrad): the rows
    become a full ``.grad`` and torch.optim steps it."""
    torch.manual_seed(0)
    for kw in (dict(lr=1e-2), dict(lr=1e-2, amsgrad=True)):
        a = _triton_linear(torch.float32, "exact")
        b = copy.deepcopy(a)
        oa, ob = so.Adam(a.parameters(), compact_grads=True, **kw), so.Adam(b.parameters(), **kw)
        gen = torch.Generator().manual_seed(3)
        for _ in range(3):
            x1, x2 = _input("linear", gen).to(_device()), _input("linear", gen).to(_device())
            for layer, opt in ((a, oa), (b, ob)):
                opt.zero_grad()
                _backward(layer, x1)
                _backward(layer, x2)
                assert _pending(layer) is None and layer.weight.grad is not None
                opt.step()
        assert torch.equal(a.weight, b.weight)


@pytest.mark.skipif(not interpreter_enabled(), reason="counts the interpreter's loads and stores")
def test_triton_compact_steady_state_touches_active_rows_only():
    """After a fused step, a skip-mode forward, backward and step: only the fused step reads or
    writes a pruned row of the weight or of its gradient, and no row-mask kernel runs."""
    from work_count import WorkCounter

    torch.manual_seed(0)
    layer = ThresholdLinear(23, 70, backend="triton", backward_mode="skip", collapse_density=None)
    with torch.no_grad():
        layer.threshold.copy_(reference.row_scores(layer.weight) * torch.linspace(0.6, 1.3, 70))
    opt = so.SGD(layer.parameters(), lr=0.05, momentum=0.9, compact_grads=True)
    gen = torch.Generator().manual_seed(4)
    for _ in range(2):
        opt.zero_grad()
        layer(torch.randn(9, 23, generator=gen)).square().mean().backward()
        opt.step()
    active = int(layer.mask.sum())
    assert 0 < active < 70
    rows_bytes = active * 23 * 4
    with WorkCounter() as wc:
        opt.zero_grad()
        layer(torch.randn(9, 23, generator=gen)).square().mean().backward()
        opt.step()
    assert "_row_mask_kernel" not in wc.kernels
    assert wc.kernels["_fused_step_kernel"].launches == 1
    assert wc.kernels["_fused_step_kernel"].by_arg["w_ptr"] == [70 * 23 * 4] * 2  # every row, once
    assert wc.kernels["_fused_step_kernel"].by_arg["g_ptr"] == [rows_bytes, 0]  # the gradient's active rows
    for name, work in wc.kernels.items():
        if name == "_fused_step_kernel":
            continue
        for arg in ("w_ptr", "wdx_ptr", "g_ptr", "dw_ptr"):
            loaded, stored = work.by_arg.get(arg, (0, 0))
            assert loaded <= rows_bytes and stored <= rows_bytes, (name, arg, loaded, stored, rows_bytes)
    # dW: the active rows, written by the GEMM itself (no second pass over the weight gradient).
    assert "_threshold_bwd_finish_kernel" not in wc.kernels
    # (the input needs no gradient: the dW GEMM runs alone)
    assert wc.kernels["_threshold_linear_bwd_dw_kernel"].by_arg["g_ptr"][1] == rows_bytes


@pytest.mark.skipif(not interpreter_enabled(), reason="counts the interpreter's launches")
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_triton_compact_steady_forward_backward_is_three_launches(bias):
    """The skip-mode forward and backward after a fused step: the forward, one pass over dY
    (compaction, r, bias gradient), dX and dW in one launch; no other kernel, and no PyTorch
    reduction or cast for the bias."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from work_count import WorkCounter

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    layer = ThresholdLinear(23, 70, bias=bias, backend="triton", backward_mode="skip", collapse_density=None)
    with torch.no_grad():
        layer.threshold.copy_(reference.row_scores(layer.weight) * torch.linspace(0.6, 1.3, 70))
    opt = so.SGD(layer.parameters(), lr=0.05, momentum=0.9, compact_grads=True)
    gen = torch.Generator().manual_seed(4)
    for _ in range(2):
        opt.zero_grad()
        layer(torch.randn(9, 23, generator=gen)).square().mean().backward()
        opt.step()
    opt.zero_grad()
    x = torch.randn(9, 23, generator=gen, requires_grad=True)
    dy = torch.randn(9, 70, generator=gen)
    with WorkCounter() as wc:
        y = layer(x)
        with Ops() as ops:
            y.backward(dy)
    assert {name: work.launches for name, work in wc.kernels.items()} == {
        "_threshold_linear_fwd_kernel": 1, "_compact_grad_bias_kernel": 1, "_threshold_linear_bwd_kernel": 1}
    # (the interpreter's own copy_ of each launch's arguments is not a launch on the GPU)
    assert not [n for n in ops.names if n.startswith(("sum", "_to_copy", "zero_", "fill_", "add"))], ops.names
    assert {n.split(".")[0] for n in ops.names} <= {"copy_", "detach", "empty", "empty_like", "lift_fresh",
                                                     "new_empty", "set_"}, sorted(set(ops.names))
    assert layer.weight.grad is None and _pending(layer) is not None
    if bias:
        assert torch.allclose(layer.bias.grad, dy.sum(0), atol=1e-5)


@triton_only
@pytest.mark.parametrize("dtype,mode", [(torch.float32, "exact"), (torch.bfloat16, "skip"), (torch.float16, "exact")])
@pytest.mark.parametrize("pointwise", [False, True], ids=["3x3", "1x1-channels-last"])
def test_triton_compact_grads_conv(dtype, mode, pointwise):
    """Conv2d on the Triton path (and a 1x1 convolution on a channels-last input, which runs the
    Linear kernels): the same bits as the fused step from the full gradient."""
    torch.manual_seed(0)
    size = 1 if pointwise else 3
    a = ThresholdConv2d(5, 19, size, padding=size // 2, backend="triton", backward_mode=mode, dtype=dtype,
                        device=_device())
    with torch.no_grad():
        a.threshold.copy_(reference.row_scores(a.weight).float() * torch.linspace(0.6, 1.3, 19))
    _assert_compact_steps_match_full(a, dtype, channels_last_input=pointwise)


def _assert_compact_steps_match_full(a, dtype, channels_last_input):
    """Three SGD steps (momentum, decay) of ``a`` from compact gradients and of a copy from full
    ones: the same weights, momentum and mask, bit for bit, each step fused."""
    b = copy.deepcopy(a)
    kw = dict(lr=0.05, momentum=0.9, weight_decay=1e-3)
    oa, ob = so.SGD(a.parameters(), compact_grads=True, **kw), so.SGD(b.parameters(), **kw)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = _input("conv", gen, dtype)[:2].to(_device())
        if channels_last_input:
            x = x.contiguous(memory_format=torch.channels_last)
        oa.zero_grad()
        _backward(a, x)
        assert a.weight.grad is None and _pending(a) is not None
        ob.zero_grad()
        _backward(b, x)
        oa.step()
        ob.step()
    assert oa.fused_launches == ob.fused_launches == 3
    assert torch.equal(a.weight, b.weight)
    assert torch.equal(oa.state[a.weight]["momentum_buffer"], ob.state[b.weight]["momentum_buffer"])
    assert torch.equal(a.mask, b.mask)


# ----------------------------------------------------------------------------- channels-last convolution weights


def _channels_last_conv(mode, dtype=torch.float32, **kw):
    layer = ThresholdConv2d(5, 19, 3, padding=1, backend="triton", backward_mode=mode, dtype=dtype,
                            device=_device(), **kw).to(memory_format=torch.channels_last)
    with torch.no_grad():
        layer.threshold.copy_(reference.row_scores(layer.weight).float() * torch.linspace(0.6, 1.3, 19))
    assert layer.weight.is_contiguous(memory_format=torch.channels_last) and not layer.weight.is_contiguous()
    return layer


@triton_only
@pytest.mark.parametrize("compact", [False, True], ids=["full-grads", "compact-grads"])
@pytest.mark.parametrize("mode,which", [("exact", 0), ("skip", 1), ("exact", 4), ("skip", 5)],
                         ids=lambda v: OPTIMIZERS[v][0] if isinstance(v, int) else v)
def test_triton_channels_last_conv_fused_step(mode, which, compact):
    """A channels-last convolution weight is stepped by the fused kernel (its rows in memory
    order, (r, s, c)), momentum / decay / Adam's moments included, as torch.optim steps the same
    layer and the reference layer; the kept mask is the one the forward would score, and the
    weight and its state stay channels-last."""
    from spafl._guard import weight_rows
    from spafl.kernels import threshold_row_mask

    name, fused, plain, kw = OPTIMIZERS[which]
    torch.manual_seed(0)
    a = _channels_last_conv(mode)
    b = copy.deepcopy(a)
    ref = copy.deepcopy(a)
    ref.backend = "reference"
    oa = fused(a.parameters(), compact_grads=compact, **kw)
    ob, oref = plain(b.parameters(), **kw), plain(ref.parameters(), **kw)
    gen = torch.Generator().manual_seed(1)
    steps = 4
    for _ in range(steps):
        x = _input("conv", gen)[:2].to(_device()).contiguous(memory_format=torch.channels_last)
        for layer, opt in ((a, oa), (b, ob), (ref, oref)):
            _train_step(layer, opt, x)
        kept = a._kept_mask(a.forward_options)
        assert kept is not None and kept[0] == "triton"
        scored = threshold_row_mask(weight_rows(a.weight), a.threshold.detach())
        assert torch.equal(kept[1].score, scored.score) and torch.equal(kept[1].perm, scored.perm)
    assert oa.fused_launches == steps
    for other in (b, ref):
        torch.testing.assert_close(a.weight, other.weight, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a.threshold, other.threshold, rtol=1e-4, atol=1e-5)
        assert torch.equal(a.mask, other.mask)
    assert a.weight.is_contiguous(memory_format=torch.channels_last)
    for key, value in oa.state[a.weight].items():
        if isinstance(value, torch.Tensor) and value.dim() == 4:
            assert value.stride() == a.weight.stride(), key
            torch.testing.assert_close(value, ob.state[b.weight][key], rtol=1e-4, atol=1e-5)


@triton_only
@pytest.mark.parametrize("dtype,mode", [(torch.float32, "exact"), (torch.bfloat16, "skip")])
def test_triton_channels_last_conv_compact_grads_match_full_gradients(dtype, mode):
    """Compact gradients of a channels-last weight (the active rows of dW and r, the pruned rows'
    term formed by the fused step): the same bits as the fused step from the full gradient."""
    torch.manual_seed(0)
    _assert_compact_steps_match_full(_channels_last_conv(mode, dtype), dtype, channels_last_input=True)


@triton_only
@pytest.mark.parametrize("edit", ["copy_weight", "load_state_dict", "state_from_torch_optim"])
def test_triton_channels_last_conv_edits(edit):
    """``copy_`` and ``load_state_dict`` invalidate the kept mask of a channels-last weight; a
    contiguous state (from torch.optim stepping a contiguous copy) is taken in the weight's layout."""
    from spafl._conv import conv_geometry

    torch.manual_seed(0)
    a = _channels_last_conv("skip", collapse_density=None)
    kw = dict(lr=0.05, momentum=0.9)
    oa = so.SGD(a.parameters(), **kw)
    gen = torch.Generator().manual_seed(2)
    x = _input("conv", gen)[:2].to(_device()).contiguous(memory_format=torch.channels_last)
    _train_step(a, oa, x)
    assert a._kept_mask(a.forward_options) is not None
    if edit == "state_from_torch_optim":
        b = copy.deepcopy(a).to(memory_format=torch.contiguous_format)
        ob = torch.optim.SGD(b.parameters(), **kw)
        ob.load_state_dict(copy.deepcopy(oa.state_dict()))
        ob.state[b.weight]["momentum_buffer"] = ob.state[b.weight]["momentum_buffer"].contiguous()
        a2 = copy.deepcopy(a)
        oa2 = so.SGD(a2.parameters(), **kw)
        oa2.load_state_dict(copy.deepcopy(ob.state_dict()))
        assert oa2.state[a2.weight]["momentum_buffer"].is_contiguous()
        for layer, opt in ((a2, oa2), (b, ob)):
            _train_step(layer, opt, x)
        assert oa2.fused_launches == 1
        assert oa2.state[a2.weight]["momentum_buffer"].stride() == a2.weight.stride()
        torch.testing.assert_close(a2.weight, b.weight, rtol=1e-5, atol=1e-6)
        return
    with torch.no_grad():
        if edit == "copy_weight":
            a.weight.copy_(torch.randn_like(a.weight))
        else:
            state = {k: v.clone() for k, v in a.state_dict().items()}
            state["weight"] = torch.randn_like(a.weight)
            a.load_state_dict(state)
    assert a._kept_mask(a.forward_options) is None
    expected = reference.threshold_conv2d_forward(x, a.weight, reference.row_mask(a.weight, a.threshold).mask,
                                                  a.bias, conv_geometry(3, 1, 1))
    torch.testing.assert_close(a(x), expected, rtol=1e-4, atol=1e-5)
