"""Prepared launches (``spafl.kernels``' ``PreparedRowMask``, ``PreparedForward``,
``PreparedBackward``; ``spafl._functions.PreparedTriton``): what the launchers compute, bit for
bit, from launches prepared once per layout; refused where a launcher would copy or convert; and
the layers' kept Triton call running on them, per input layout, thread and settings."""

from __future__ import annotations

import threading

import pytest
import torch

from spafl import ThresholdLinear, threshold_for_density

pytestmark = pytest.mark.interpreter

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _kernels():
    from spafl.kernels import threshold_linear as tl_mod
    from spafl.kernels import threshold_mask as tm

    return tl_mod, tm


def _weight(n, k, dtype, density, seed=0):
    torch.manual_seed(seed)
    w = torch.randn(n, k).to(dtype)
    tau = threshold_for_density(w, density) if density > 0 else torch.full((n,), 1e4)
    return w, tau.float().contiguous()


@pytest.mark.parametrize("density", [0.0, 1 / 70, 0.3, 1.0])
@pytest.mark.parametrize("guard, timing", [(None, "current"), (0.01, "current"), (0.01, "previous")])
def test_prepared_row_mask_is_the_launcher(density, guard, timing):
    _, tm = _kernels()
    w, tau = _weight(70, 33, torch.bfloat16, density)
    previous = timing == "previous"
    states = []
    for prepared in (False, True):
        t, counter, stored = tau.clone(), torch.zeros((), dtype=torch.long), torch.tensor(0.005)
        if prepared:
            run = tm.PreparedRowMask(w, t, guard, previous, stored, counter)
            rms = [run(), run()]
        elif guard is None:
            rms = [tm.threshold_row_mask(w, t) for _ in range(2)]
        else:
            rms = [tm.guarded_row_mask(w, t, guard, previous, stored, counter) for _ in range(2)]
        states.append([*(x for rm in rms for x in (rm.mask, rm.perm, rm.count)), t, counter, stored])
        if prepared:  # fresh outputs per call
            assert rms[0].mask.data_ptr() != rms[1].mask.data_ptr()
            assert rms[0].score is None and rms[0].collapsed is None
    for i, (a, b) in enumerate(zip(*states, strict=True)):
        assert a.dtype == b.dtype and torch.equal(a, b), i


def test_prepared_row_mask_bumps_the_versions_of_what_it_writes():
    _, tm = _kernels()
    w, tau = _weight(20, 8, torch.float32, 0.5)
    counter, stored = torch.zeros((), dtype=torch.long), torch.tensor(0.5)
    before = [t._version for t in (tau, counter, stored)]
    tm.PreparedRowMask(w, tau, 0.01, True, stored, counter)()
    assert all(t._version > v for t, v in zip((tau, counter, stored), before, strict=True))


def test_prepared_row_mask_refuses_what_it_cannot_hold():
    _, tm = _kernels()
    w, tau = _weight(20, 8, torch.float32, 0.5)
    strided = torch.stack([tau, tau], 1)[:, 0]
    with pytest.raises(ValueError, match="unit stride"):
        tm.PreparedRowMask(w, strided, None)
    with pytest.raises(ValueError, match="threshold must have shape"):
        tm.PreparedRowMask(w, tau[:5], None)
    with pytest.raises(ValueError, match="int64 one-element counter"):
        tm.PreparedRowMask(w, tau, 0.01, False, None, torch.zeros((), dtype=torch.int32))


def _row_mask(w, tau):
    _, tm = _kernels()
    return tm.threshold_row_mask(w, tau)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("bias, store_z, z_all", [(True, False, False), (False, True, False), (True, True, True)])
def test_prepared_forward_is_the_launcher(dtype, density, bias, store_z, z_all):
    lin, _ = _kernels()
    w, tau = _weight(70, 33, dtype, density)
    b = torch.randn(70).to(dtype) if bias else None
    x = torch.randn(5, 33).to(dtype)
    rm = _row_mask(w, tau)
    z_want = torch.full((5, 70), -1.0) if store_z else None
    y_want = lin.threshold_linear_fwd(x, w, b, rm, z_out=z_want, z_all=z_all)
    run = lin.PreparedForward(x, w, b, store_z=store_z, z_all=z_all)
    y, z = run(x, w, b, rm)
    assert y.dtype == y_want.dtype and torch.equal(y, y_want)
    assert (z is None) == (not store_z)
    if store_z:
        written = 70 if z_all else int(rm.count)
        assert torch.equal(z[:, :written], z_want[:, :written])
    x2 = torch.randn(5, 33).to(dtype)  # another input of the same layout
    assert torch.equal(run(x2, w, b, rm)[0], lin.threshold_linear_fwd(x2, w, b, rm))


def test_prepared_forward_refuses_layouts_the_launcher_copies():
    lin, _ = _kernels()
    w, _ = _weight(12, 8, torch.float32, 1.0)
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="K-contiguous"):
        lin.PreparedForward(torch.randn(8, 4).t(), w, None, store_z=False)
    with pytest.raises(ValueError, match="unit-stride bias"):
        lin.PreparedForward(x, w, torch.randn(12, 2)[:, 0], store_z=False)
    with pytest.raises(ValueError, match="rows"):
        lin.PreparedForward(x[:0], w, None, store_z=False)
    with pytest.raises(ValueError, match=r"bias must be \[12\] torch.float32"):
        lin.PreparedForward(x, w, torch.randn(11), store_z=False)
    with pytest.raises(ValueError, match="bias must be"):
        lin.PreparedForward(x, w, torch.randn(12, dtype=torch.float64), store_z=False)
    with pytest.raises(ValueError, match="one supported dtype"):
        lin.PreparedForward(x.double(), w.double(), None, store_z=False)
    with pytest.raises(ValueError, match="expected x"):
        lin.PreparedForward(x[:, :5], w, None, store_z=False)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["skip", "exact"])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("need_dx, rows, has_db, strided_dy", [(True, False, True, False), (True, True, False, True),
                                                                (False, False, False, False)])
def test_prepared_backward_is_the_launcher(dtype, mode, density, need_dx, rows, has_db, strided_dy):
    lin, _ = _kernels()
    w, tau = _weight(70, 33, dtype, density)
    x = torch.randn(5, 33).to(dtype)
    rm = _row_mask(w, tau)
    z = torch.zeros(5, 70)
    lin.threshold_linear_fwd(x, w, None, rm, z_out=z, z_all=mode == "exact")
    dy = torch.randn(70, 5).to(dtype).t() if strided_dy else torch.randn(5, 70).to(dtype)
    results = []
    for prepared in (False, True):
        r = torch.full((70,), -3.0) if rows else None
        db = torch.full((70,), -3.0, dtype=dtype) if has_db else None
        if prepared:
            run = lin.PreparedBackward(dy, x, w, mode=mode, sample_fraction=0.125, need_dx=need_dx,
                                       threshold_dtype=torch.float32, rows=rows, has_db=has_db)
            out = run(dy, x, w, rm, z, r, db)
        else:
            out = lin.threshold_linear_bwd(dy, x, w, rm, mode=mode, need_dx=need_dx, r_out=r, z=z, db_out=db)
        results.append([*out, r, db])
    active = int(rm.count)
    for i, (a, b) in enumerate(zip(*results, strict=True)):
        if a is None or b is None:
            assert a is None and b is None, i
            continue
        if i == 1 and rows:  # dW: the active rows only (the others are left unwritten)
            rows_idx = rm.perm[:active].long()
            a, b = a[rows_idx], b[rows_idx]
        assert a.dtype == b.dtype and torch.equal(a, b), i


def test_prepared_backward_refuses_what_the_launcher_converts():
    lin, _ = _kernels()
    w, _ = _weight(12, 8, torch.bfloat16, 1.0)
    x, dy = torch.randn(4, 8).to(torch.bfloat16), torch.randn(4, 12).to(torch.bfloat16)
    kwargs = dict(sample_fraction=0.125, need_dx=True, threshold_dtype=torch.float32, rows=False, has_db=False)
    with pytest.raises(ValueError, match="skip or exact"):
        lin.PreparedBackward(dy, x, w, mode="sample", **kwargs)
    with pytest.raises(ValueError, match="one supported dtype"):
        lin.PreparedBackward(dy.float(), x, w, mode="skip", **kwargs)
    with pytest.raises(ValueError, match="rows"):
        lin.PreparedBackward(dy[:0], x[:0], w, mode="skip", **kwargs)


# ----------------------------------------------------------------------------- the layers' kept call


def _prepared_of(layer):
    from spafl._functions import PreparedTriton

    call = layer.__dict__["_device_call"]
    return [v for v in call.prepared.values() if isinstance(v, PreparedTriton)]


@pytest.mark.parametrize("mode", ["skip", "exact"])
def test_the_kept_call_runs_prepared_launches_per_layout(mode):
    torch.manual_seed(8)
    kwargs = dict(backend="triton", backward_mode=mode, check_finite=False)
    layer = ThresholdLinear(33, 70, **kwargs)
    plain = ThresholdLinear(33, 70, **kwargs)
    plain.load_state_dict(layer.state_dict())
    with torch.no_grad():
        for m in (layer, plain):
            m.threshold.copy_(threshold_for_density(m.weight, 0.4))

    def run(m, x, dy):
        m.zero_grad(set_to_none=True)
        x = x.clone().requires_grad_(True)
        y = m(x)
        y.backward(dy)
        return [y.detach(), x.grad, m.weight.grad, m.threshold.grad, m.bias.grad]

    import spafl.layers

    original = spafl.layers.device_call_of
    inputs = [(torch.randn(9, 33), torch.randn(9, 70)), (torch.randn(9, 33), torch.randn(70, 9).t()),
              (torch.randn(4, 33), torch.randn(4, 70)), (torch.randn(9, 33), torch.randn(9, 70))]
    got = [run(layer, x, dy) for x, dy in inputs]
    prepared = _prepared_of(layer)
    assert len(prepared) == 2  # batch 9 and batch 4 (the first call of all is the general one)
    assert any(p._backwards for p in prepared)
    spafl.layers.device_call_of = lambda *a, **k: None
    try:
        want = [run(plain, x, dy) for x, dy in inputs]
    finally:
        spafl.layers.device_call_of = original
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        for i, (a, b) in enumerate(zip(g, w, strict=True)):
            assert torch.equal(a, b), (step, i)
    with torch.no_grad():  # the forward without z, from the same prepared launches
        assert torch.equal(layer(inputs[0][0]), plain(inputs[0][0]))


def test_the_kept_call_prepares_per_thread():
    torch.manual_seed(9)
    layer = ThresholdLinear(16, 24, backend="triton", check_finite=False)
    x = torch.randn(3, 16)
    layer(x)
    first = layer(x).detach()
    out = {}
    worker = threading.Thread(target=lambda: out.setdefault("y", layer(x).detach()))
    worker.start()
    worker.join()
    assert torch.equal(out["y"], first)
    assert len(_prepared_of(layer)) == 2  # (scratch and tickets are per thread: so are prepared launches)


def test_the_kept_call_leaves_layouts_it_cannot_prepare_to_the_launchers():
    torch.manual_seed(10)
    layer = ThresholdLinear(16, 24, backend="triton", check_finite=False)
    x = torch.randn(16, 3).t()  # K-strided: the launcher copies it
    want = ThresholdLinear(16, 24, backend="triton", check_finite=False)
    want.load_state_dict(layer.state_dict())
    layer(x)
    y = layer(x)
    assert False in layer.__dict__["_device_call"].prepared.values()
    assert torch.equal(y, want(x.contiguous()))


def test_prepared_launches_hold_no_buffer_the_launchers_would_not_keep(monkeypatch):
    # Scratch over the kept size is allocated per call by the launchers; a prepared launch,
    # which lives as long as its layer, must not hold it either.
    lin, tm = _kernels()
    monkeypatch.setattr(tm, "_SCRATCH_BYTES", 64)
    w, tau = _weight(70, 33, torch.float32, 0.4)
    x, dy = torch.randn(5, 33), torch.randn(5, 70)
    rm = _row_mask(w, tau)
    z = torch.zeros(5, 70)
    lin.threshold_linear_fwd(x, w, None, rm, z_out=z)
    run = lin.PreparedBackward(dy, x, w, mode="skip", sample_fraction=0.125, need_dx=True,
                               threshold_dtype=torch.float32, rows=False, has_db=False)
    assert run._dyc.buffer is None and run._r.buffer is None and run._dx_ops[1].buffer is None
    got = run(dy, x, w, rm, z)
    want = lin.threshold_linear_bwd(dy, x, w, rm, mode="skip", z=z)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    fwd = lin.PreparedForward(x, w, None, store_z=False)
    assert fwd._operands[1].buffer is None
    assert torch.equal(fwd(x, w, None, rm)[0], lin.threshold_linear_fwd(x, w, None, rm))
