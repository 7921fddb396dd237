"""The launch cost model (benchmarks/model.py) on cases whose answer is known by hand."""

import csv
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from spafl._checks import interpreter_enabled

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import model  # noqa: E402

pytestmark = [pytest.mark.interpreter,
              pytest.mark.skipif(not interpreter_enabled(), reason="the model counts in Triton's interpreter")]

H100 = model.DEVICES["h100"]
US = 1e-6


@triton.jit
def _gemm_tile_kernel(a_ptr, b_ptr, out_ptr, n_active, BLOCK: tl.constexpr):
    # One BLOCK^3 tile per program; programs at or past n_active exit before any work.
    pid = tl.program_id(0)
    if pid >= n_active:
        return
    offs = tl.arange(0, BLOCK)
    a = tl.load(a_ptr + offs[:, None] * BLOCK + offs[None, :])
    b = tl.load(b_ptr + offs[:, None] * BLOCK + offs[None, :])
    tl.store(out_ptr + pid * BLOCK * BLOCK + offs[:, None] * BLOCK + offs[None, :], tl.dot(a, b))


@triton.jit
def _gather_kernel(src_ptr, idx_ptr, out_ptr):
    i = tl.program_id(0)
    tl.store(out_ptr + i, tl.load(src_ptr + tl.load(idx_ptr + i)))


def _one(fn):
    rec = model.Recorder()
    with rec:
        fn()
    return rec.launches


def test_a_single_gemm_launch_by_hand():
    a, b = torch.randn(16, 16), torch.randn(16, 16)
    out = torch.zeros(4, 16, 16)
    (la,) = _one(lambda: _gemm_tile_kernel[(4,)](a, b, out, 4, BLOCK=16))
    assert (la.source, la.programs, la.mac_programs) == ("triton", 4, 4)
    assert la.macs == 4 * 16**3 and la.max_program_macs == 16**3
    # a and b (1 KiB each) read by every program but counted once; 4 KiB stored.
    assert (la.read_bytes, la.write_bytes) == (2 * 1024, 4 * 1024)
    torch.testing.assert_close(out[3], a @ b)
    cost = model.price(la, H100)
    # fp32 operands: IEEE fp32 or TF32, as torch.backends.cuda.matmul.allow_tf32 says
    assert la.precision == ("tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32")
    peak = {"tf32": 494.7e12, "fp32": 66.9e12}[la.precision]
    compute = 1 * 16**3 * 2 / (peak * 0.75 / 132)  # one wave of the largest program
    memory = 6 * 1024 / (3.35e12 * 0.85)
    assert cost.waves == 1
    assert cost.compute_s == pytest.approx(compute) and cost.memory_s == pytest.approx(memory)
    assert cost.seconds == pytest.approx(2 * US + max(compute, memory))


def test_programs_that_exit_early_issue_no_macs():
    a, b = torch.randn(16, 16), torch.randn(16, 16)
    out = torch.zeros(4, 16, 16)
    (la,) = _one(lambda: _gemm_tile_kernel[(4,)](a, b, out, 1, BLOCK=16))
    assert (la.programs, la.mac_programs, la.macs, la.max_program_macs) == (4, 1, 16**3, 16**3)
    assert la.write_bytes == 1024 and not out[1:].any()
    (none,) = _one(lambda: _gemm_tile_kernel[(4,)](a, b, out, 0, BLOCK=16))
    assert (none.programs, none.macs, none.read_bytes) == (4, 0, 0)
    assert model.price(none, H100).seconds == pytest.approx(2 * US)


def test_bytes_are_counted_in_whole_sectors():
    src = torch.arange(64, dtype=torch.float32)
    out = torch.zeros(2)
    # Two fp32 elements 4 bytes apart share a sector; 32 bytes apart they do not. (The storage
    # of src starts sector-aligned: PyTorch's CPU allocator aligns to 64 bytes.)
    assert src.data_ptr() % 32 == 0
    for idx, sectors in (([0, 1], 1), ([0, 8], 2), ([7, 8], 2)):
        (la,) = _one(lambda idx=idx: _gather_kernel[(2,)](src, torch.tensor(idx, dtype=torch.int32), out))
        # the index tensor (8 bytes) is one sector more; the two stores to out share one
        assert la.read_bytes == 32 * (sectors + 1) and la.write_bytes == 32
    assert model.tensor_bytes(torch.zeros(1, dtype=torch.bfloat16)) == 32
    assert model.tensor_bytes(torch.zeros(17, dtype=torch.bfloat16)) == 64
    assert model.tensor_bytes(torch.zeros(16, dtype=torch.bfloat16)) == 32
    assert model.tensor_bytes(torch.zeros(1, 8).expand(1000, 8)) == 32  # broadcast rows count once


def test_waves_at_132_and_133_programs():
    la = model.Launch("fwd", "triton", "k", "bf16", programs=132, mac_programs=132, macs=132 * 10**6,
                      max_program_macs=10**6)
    one = model.price(la, H100)
    two = model.price(model.replace(la, programs=133, mac_programs=133, macs=133 * 10**6), H100)
    assert (one.waves, two.waves) == (1, 2)
    assert two.compute_s == pytest.approx(2 * one.compute_s)
    assert one.compute_s == pytest.approx(10**6 * 2 * 132 / (989.4e12 * 0.75))
    # the same work on H200: same compute, faster memory
    assert model.price(la, model.DEVICES["h200"]).compute_s == pytest.approx(one.compute_s)


def test_the_dense_baseline_is_one_gemm_per_pass():
    m, n, k = 128, 256, 512
    x = torch.randn(m, k, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(n, k, dtype=torch.bfloat16, requires_grad=True)
    fwd, y = model.record(lambda: F.linear(x, w), "fwd")
    bwd, _ = model.record(lambda: torch.autograd.grad(y, (x, w), torch.ones_like(y)), "bwd")
    gemms = [la for la in fwd + bwd if la.macs]
    assert [la.macs for la in gemms] == [m * n * k] * 3
    (f,) = fwd
    assert (f.read_bytes, f.write_bytes) == (2 * (m * k + n * k), 2 * m * n)
    expect = 2 * US + max(2 * m * n * k / (989.4e12 * 0.75), 2 * (m * k + n * k + m * n) / (3.35e12 * 0.85))
    assert model.price(f, H100).seconds == pytest.approx(expect)


def test_density_follows_the_active_rows():
    from spafl.kernels._config import covered_units

    case = model.bench_kernels.LinearCase("t", 128, 256, 128, bias=False)
    counts = {}
    for density in (1.0, 0.1):
        active, out = model.layer_launches(case, torch.bfloat16, density, ["skip"])
        assert active == round(density * 256)
        (fwd,) = [la for la in out[("spafl-skip", "fwd")] if la.name == "_threshold_linear_fwd_kernel"]
        counts[density] = fwd.macs
        # the forward issues the active rows rounded up to the tile class that covers them
        assert fwd.macs == 128 * 128 * covered_units(active, 128)
    assert counts[0.1] == 128 * 128 * 32 and counts[1.0] == 128 * 128 * 256  # 26 active: a 32-wide tile


def test_interpreter_macs_agree_with_the_analytic_count():
    # Every dimension a multiple of every tile: at density 1 the three GEMMs issue the dense MACs.
    case = model.bench_kernels.LinearCase("t", 128, 128, 128, bias=False)
    _, out = model.layer_launches(case, torch.bfloat16, 1.0, ["skip", "exact"])
    dense = 128**3
    for provider in ("dense", "spafl-skip", "spafl-exact"):
        assert sum(la.macs for la in out[(provider, "fwd")]) == dense
        assert sum(la.macs for la in out[(provider, "fwd+bwd")]) == 3 * dense
    names = [la.name for la in out[("spafl-skip", "fwd+bwd")] if la.source == "triton"]
    assert names[:2] == ["_row_mask_kernel", "_threshold_linear_fwd_kernel"]


def test_linear_cases_are_counted_whole():
    # The persistent forward and dX split their reductions by the shape: counts at probe sizes
    # are not bilinear in the rows and features any more, so no case is extrapolated.
    case = model.bench_kernels.LinearCase("t", 384, 72, 384)
    assert model.probe_plan(case) is None
    _, full = model.layer_launches(case, torch.bfloat16, 0.1, ["skip"])
    _, out, how = model.case_launches(case, torch.bfloat16, 0.1, ["skip"])
    assert how == "executed" and out == full


def test_bilinear_refuses_what_is_not_bilinear():
    base = model.Launch("fwd", "torch", "k")
    probes = {(1, 1): [model.replace(base, macs=9)], (2, 1): [model.replace(base, macs=1)],
              (1, 2): [model.replace(base, macs=9)], (2, 2): [model.replace(base, macs=1)]}
    assert model.bilinear(probes, (1, 5))[0].macs == 9
    with pytest.raises(ValueError, match="not bilinear"):  # a count that would turn negative
        model.bilinear(probes, (3, 3))
    probes[(2, 2)] = [model.replace(base, name="other")]
    with pytest.raises(ValueError, match="different kernels"):
        model.bilinear(probes, (3, 3))


def test_pair_writes_the_model_beside_each_measured_row(tmp_path, capsys):
    measured = tmp_path / "kernels.csv"
    rows = [{"case": "smoke-linear", "layer": "linear", "shape": "M=33 N=48 K=40", "dtype": "float32",
             "density": "0.5", "active": "24", "provider": "spafl-skip", "op": "fwd", "ms": "0.01",
             "device": "NVIDIA H100"},
            {"case": "no-such-case", "layer": "linear", "shape": "M=1 N=1 K=1", "dtype": "float32",
             "density": "1.0", "active": "1", "provider": "dense", "op": "fwd", "ms": "0.01", "device": "x"}]
    with measured.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "pairs.csv"
    assert model.main(["pair", "--measured", str(measured), "--device", "h100", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "no-such-case" in printed and "unknown case" in printed
    with out.open() as f:
        pairs = list(csv.DictReader(f))
    assert len(pairs) == 2
    modelled = float(pairs[0]["model_ms"])
    assert math.isfinite(modelled) and modelled > 0.002  # more than one launch's 2 us
    assert float(pairs[0]["measured_over_model"]) == pytest.approx(0.01 / modelled)
    assert pairs[1]["model_ms"] == "" and pairs[1]["note"] == "unknown case"
    # an existing output is not overwritten without --force; a missing input is one line, exit 0
    assert model.main(["pair", "--measured", str(measured), "--device", "h100", "--out", str(out)]) == 2
    assert model.main(["pair", "--measured", str(tmp_path / "none.csv"), "--device", "h100",
                       "--out", str(tmp_path / "p2.csv")]) == 0
    assert "does not exist" in capsys.readouterr().out


def test_per_launch_csv_round_trips_for_repricing(tmp_path, capsys):
    launches = [model.Launch("fwd", "triton", "k", "bf16", programs=133, mac_programs=133, macs=133 * 10**6,
                             max_program_macs=10**6, read_bytes=64, write_bytes=32),
                model.Launch("step", "torch", "_foreach_add_", read_bytes=320, write_bytes=160, launches=2)]
    base = {"device": "h100", "case": "c", "density": 1.0, "provider": "spafl-skip", "op": "fwd"}
    path = tmp_path / "c-launches.csv"
    model.write_csv(path, model.launch_rows(launches, H100, base), model.LAUNCH_COLUMNS)
    assert [la for _, la in model.launches_from_csv(path)] == launches
    assert model.main(["reprice", str(path), "--launch-us", "5"]) == 0
    slow = model.replace(H100, launch_s=5e-6)
    assert f"{model.total_seconds(launches, slow) * 1e6:.3g}" in capsys.readouterr().out


def test_the_sgd_step_is_multi_tensor_launches():
    params = [torch.randn(1000, requires_grad=True) for _ in range(3)]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, foreach=True)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()  # momentum buffers exist from here on: the steady state
    launches, _ = model.record(opt.step, "step")
    assert launches and all(la.name.startswith("_foreach_") and la.launches == 1 for la in launches)
    # p += -lr * buf: reads three parameters and three buffers, writes the parameters (4000 B each)
    update = launches[-1]
    assert (update.read_bytes, update.write_bytes) == (6 * 4000, 3 * 4000)


def test_retable_drops_ops_that_launch_nothing(tmp_path):
    gemm = model.Launch("fwd", "torch", "mm", "bf16", macs=10**9, read_bytes=2**20, write_bytes=2**20)
    view = model.Launch("fwd", "torch", "_unsafe_view", read_bytes=64, write_bytes=64)  # a view, not a copy
    base = {"device": "h100", "case": "c", "density": 1.0, "op": "fwd"}
    rows = (model.launch_rows([gemm], H100, {**base, "provider": "dense"})
            + model.launch_rows([gemm, view], H100, {**base, "provider": "spafl-skip"}))
    model.write_csv(tmp_path / "c-h100-launches.csv", rows, model.LAUNCH_COLUMNS)
    table = [{**base, "layer": "linear", "shape": "s", "dtype": "bfloat16", "active": 1, "provider": p,
              "launches": 0, "triton_launches": 0, "torch_launches": 0, "macs": 0, "bytes": 0, "model_us": 1.0,
              "dense_model_us": 1.0, "vs_dense": 1.0, "host_us": "", "counted": "executed"}
             for p in ("dense", "spafl-skip")]
    model.write_csv(tmp_path / "c-h100.csv", table, model.LAYER_COLUMNS)
    assert model.main(["retable", str(tmp_path)]) == 0
    with (tmp_path / "c-h100.csv").open() as f:
        dense, ours = list(csv.DictReader(f))
    assert ours["launches"] == "1" and float(ours["model_us"]) == pytest.approx(model.price(gemm, H100).seconds * 1e6)
    assert float(ours["vs_dense"]) == pytest.approx(1.0) and dense["macs"] == str(10**9)


def test_pair_reads_committed_tables_and_keeps_to_its_budget(tmp_path, capsys):
    tables = tmp_path / "tables"
    tables.mkdir()
    row = {"device": "h100", "layer": "conv2d", "case": "smoke-conv", "shape": "s", "dtype": "bfloat16",
           "density": 0.5, "active": 6, "provider": "spafl-skip", "op": "fwd", "model_us": 12.5}
    model.write_csv(tables / "smoke-conv-bfloat16-h100.csv", [row], model.LAYER_COLUMNS)
    measured = tmp_path / "kernels.csv"
    rows = [{**row, "ms": "0.025"}, {**row, "case": "smoke-linear", "layer": "linear", "ms": "0.01"}]
    model.write_csv(measured, rows, list(rows[0]))
    out = tmp_path / "pairs.csv"
    assert model.main(["pair", "--measured", str(measured), "--device", "h100", "--out", str(out),
                       "--tables", str(tables), "--budget-s", "0"]) == 0
    with out.open() as f:
        from_table, over_budget = list(csv.DictReader(f))
    assert float(from_table["model_ms"]) == pytest.approx(0.0125) and float(from_table["measured_over_model"]) == 2
    assert over_budget["model_ms"] == "" and "budget" in over_budget["note"]
    assert "smoke-linear" in capsys.readouterr().out


# ----------------------------------------------------------------------------- training steps

import model_steps  # noqa: E402  (benchmarks/model_steps.py)


def _fp32_params(*numels):
    params = [torch.randn(n, requires_grad=True) for n in numels]
    for p in params:
        p.grad = torch.ones_like(p)
    return params


def test_the_adam_step_is_seven_multi_tensor_launches_and_its_step_counters_stay_on_the_host():
    params = _fp32_params(1000, 1000, 1000)
    opt = model_steps.torch_adam(params, model_steps.Hyper(lr=1e-3))
    opt.step()  # the moments exist from here on
    rec = model.Recorder()
    rec.host_tensors(model_steps.host_state(opt))
    assert len(model_steps.host_state(opt)) == 3
    with rec:
        launches, _ = model.record(opt.step, "step", rec)
    # torch.optim's _multi_tensor_adam: m.lerp_(g), v.mul_(b2), v.addcmul_(g, g), sqrt(v), /= bias
    # correction, += eps, p.addcdiv_(m, denom); the step counters (CPU tensors on CUDA) and their
    # .item() neither launch nor synchronise.
    assert [la.name.split(".")[0] for la in launches] == [
        "_foreach_lerp_", "_foreach_mul_", "_foreach_addcmul_", "_foreach_sqrt", "_foreach_div_", "_foreach_add_",
        "_foreach_addcdiv_"]
    assert all(la.launches == 1 for la in launches) and rec.syncs == 0
    lerp, addcdiv = launches[0], launches[-1]
    assert (lerp.read_bytes, lerp.write_bytes) == (6 * 4000, 3 * 4000)  # m and g read, m written
    assert (addcdiv.read_bytes, addcdiv.write_bytes) == (9 * 4000, 3 * 4000)  # p, m, denom read; p written


def test_without_host_state_the_adam_step_counters_would_count():
    params = _fp32_params(1000)
    opt = model_steps.torch_adam(params, model_steps.Hyper(lr=1e-3))
    opt.step()
    rec = model.Recorder()
    with rec:
        launches, _ = model.record(opt.step, "step", rec)
    assert len(launches) == 8 and rec.syncs > 0  # the counter's increment and its .item()


def test_multi_tensor_launches_split_at_the_tensor_and_chunk_limits():
    # One tensor list (zero_ style) holds 110 tensors per launch; SGD's update (two lists) 64.
    params = _fp32_params(*([8] * 65))
    opt = torch.optim.SGD(params, lr=0.1, foreach=True)  # no momentum: one _foreach_add_ of two lists
    launches, _ = model.record(opt.step, "step")
    (update,) = launches
    assert update.launches == 2
    # 320 chunks of 65536 elements per launch: a tensor of 321 chunks needs two
    big = _fp32_params(65536 * 320 + 1)
    launches, _ = model.record(torch.optim.SGD(big, lr=0.1, foreach=True).step, "step")
    assert launches[0].launches == 2


def _linear_case(bias=True):
    return model.bench_kernels.LinearCase("t", 33, 48, 40, bias=bias)


def test_a_dense_layer_step_by_hand():
    m, n, k = 33, 48, 40
    out = model_steps.layer_step_launches(_linear_case(), torch.bfloat16, 1.0, None, "torch-sgd")
    assert [la.name for la in out["fwd"]] == ["addmm"]
    assert [la.macs for la in out["bwd"] if la.macs] == [m * n * k] * 2  # dX and dW
    # SGD with momentum in steady state: buf *= momentum, buf += g, p -= lr * buf over W and b
    names = [la.name.split(".")[0] for la in out["step"]]
    assert names == ["_foreach_mul_", "_foreach_add_", "_foreach_add_"]
    w, b = 2 * n * k, 96  # bf16 bytes: 3840 and 96, whole sectors both
    assert (out["step"][0].read_bytes, out["step"][0].write_bytes) == (w + b, w + b)
    assert (out["step"][2].read_bytes, out["step"][2].write_bytes) == (2 * (w + b), w + b)


def test_a_layer_step_follows_an_optimizer_step_and_plain_torch_optim_scores_rows_itself():
    out = model_steps.layer_step_launches(_linear_case(bias=False), torch.bfloat16, 0.5, "skip", "torch-sgd")
    fwd = [la.name for la in out["fwd"] if la.source == "triton"]
    assert fwd == ["_row_mask_kernel", "_threshold_linear_fwd_kernel"]
    # the optimizer steps the weight and the thresholds: two tensors per list
    assert [la.name.split(".")[0] for la in out["step"]] == ["_foreach_mul_", "_foreach_add_", "_foreach_add_"]
    w = 2 * 48 * 40
    tau = model.tensor_bytes(torch.zeros(48, dtype=torch.bfloat16))
    assert out["step"][0].write_bytes == w + tau


def test_layer_step_rows_pair_every_provider_with_the_dense_layer():
    rows = model_steps.layer_step_rows(_linear_case(), torch.bfloat16, 0.1, ["skip"], ["torch-sgd"])
    assert set(rows) == {(p, op) for p in ("dense", "spafl-skip") for op in model_steps.STEP_OPS}
    for p in ("dense", "spafl-skip"):
        assert rows[(p, "step")] == rows[(p, "steady-fwd+bwd")] + rows[(p, "opt")]
    with pytest.raises(ValueError, match="do not share"):
        model_steps.layer_step_rows(_linear_case(), torch.bfloat16, 0.1, ["skip"], ["torch-sgd", "torch-adam"])


def test_the_fused_optimizer_hook():
    try:
        from spafl import optim  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="spafl.optim"):
            model_steps.layer_step_launches(_linear_case(bias=False), torch.bfloat16, 0.5, "skip", "spafl-sgd")
        return
    out = model_steps.layer_step_launches(_linear_case(bias=False), torch.bfloat16, 0.5, "skip", "spafl-sgd")
    # the fused step builds the next forward's row mask: the forward does not score W again
    assert any(la.source == "triton" for la in out["step"])
    assert "_row_mask_kernel" not in [la.name for la in out["fwd"]]


def test_unknown_optimizer_is_refused_by_name():
    with pytest.raises(ValueError, match="optimizer must be one of"):
        model_steps.optimizer_factory("lion")


def test_a_custom_factory_prices_its_own_step():
    calls = []

    def factory(params, hyper):
        calls.append(len(params))
        return torch.optim.SGD(params, lr=hyper.lr, foreach=True)  # no momentum: one launch

    out = model_steps.layer_step_launches(_linear_case(), torch.bfloat16, 1.0, None, factory)
    assert calls == [2] and [la.name.split(".")[0] for la in out["step"]] == ["_foreach_add_"]


def test_host_us_times_our_call_with_the_launches_stubbed():
    case = _linear_case()
    us = model.host_us(case, torch.bfloat16, 0.5, "spafl-skip", "fwd", reps=3, min_sample_ms=1)
    assert isinstance(us, float) and us > 0
    assert model.host_us(case, torch.bfloat16, 0.5, "dense", "fwd") == ""
    assert model.host_us(case, torch.bfloat16, 0.5, "spafl-skip", "step") == ""


def test_a_convolution_layer_step_by_hand():
    case = model.bench_kernels.ConvCase("t", 2, 8, 12, 9, 3, 1, 1)
    dense = model_steps.layer_step_launches(case, torch.float32, 1.0, None, "torch-sgd")
    assert [la.name for la in dense["fwd"]] == ["convolution"]
    assert [la.name for la in dense["bwd"]] == ["convolution_backward.dgrad", "convolution_backward.wgrad",
                                                "convolution_backward.bias"]
    w, b = 4 * 12 * 8 * 9, model.tensor_bytes(torch.zeros(12))
    assert [(la.read_bytes, la.write_bytes) for la in dense["step"]] == [(w + b, w + b), (2 * (w + b), w + b),
                                                                         (2 * (w + b), w + b)]
    ours = model_steps.layer_step_launches(case, torch.float32, 0.5, "skip", "torch-sgd")
    assert [la.name for la in ours["fwd"] if la.source == "triton"] == ["_row_mask_kernel",
                                                                        "_threshold_conv2d_fwd_kernel"]
    # weight, thresholds and bias, each once per list
    tau = model.tensor_bytes(torch.zeros(12))
    assert ours["step"][0].write_bytes == w + tau + b


def test_a_model_step_command_by_hand(tmp_path, capsys, monkeypatch):
    # The quick start's digits-cnn (LeNet-5's structure on 8x8 images) stands in for LeNet-5:
    # the same code path at a size the interpreter runs in seconds. SGD with momentum, no clipping.
    monkeypatch.setitem(model_steps.STEP_PRESETS, "digits-cnn", "digits-cnn")
    argv = ["steps", "--models", "digits-cnn", "--batch", "4", "--densities", "1,0.5", "--devices", "h100",
            "--out", str(tmp_path)]
    assert model.main(argv) == 0
    stem = tmp_path / "step-digits-cnn-b4-float32-torch-sgd-h100"
    with stem.with_suffix(".csv").open() as f:
        rows = {(r["density"], r["provider"], r["phase"]): r for r in csv.DictReader(f)}
    assert "not the preset's batch 16" in stem.with_suffix(".md").read_text()
    with (tmp_path / "step-digits-cnn-b4-float32-torch-sgd-h100-launches.csv").open() as f:
        launches = list(csv.DictReader(f))
    # steady-state SGD: buf *= m, buf += g, p -= lr buf, one launch each over every parameter
    weights = [(16, 1, 3, 3), (32, 16, 3, 3), (64, 128), (10, 64)]
    w_bytes = sum(model.tensor_bytes(torch.zeros(s)) for s in weights)
    tau_bytes = sum(model.tensor_bytes(torch.zeros(s[0])) for s in weights)
    for density in ("1.0", "0.5"):
        for provider, params in (("spafl", w_bytes + tau_bytes), ("dense", w_bytes)):
            step = [r for r in launches if r["provider"] == provider and r["op"] == "step" and r["density"] == density]
            assert [r["name"].split(".")[0] for r in step] == ["_foreach_mul_", "_foreach_add_", "_foreach_add_"]
            assert int(step[0]["write_bytes"]) == params and int(step[2]["read_bytes"]) == 2 * params
            assert rows[(density, provider, "step")]["launches"] == "3"
        assert int(rows[(density, "spafl", "fwd")]["triton_launches"]) > 0
        assert rows[(density, "dense", "fwd")]["triton_launches"] == "0"
        total = rows[(density, "spafl", "total")]
        assert float(total["model_us"]) == pytest.approx(sum(float(rows[(density, "spafl", p)]["model_us"])
                                                             for p in ("fwd", "bwd", "step")))
    # half the units: fewer multiply-adds in our step, the dense one unchanged
    assert int(rows[("0.5", "spafl", "total")]["macs"]) < int(rows[("1.0", "spafl", "total")]["macs"])
    assert rows[("0.5", "dense", "total")]["macs"] == rows[("1.0", "dense", "total")]["macs"]
    # the tables are not replaced without --force
    assert model.main(argv) == 2
    assert "exists" in capsys.readouterr().err


def _digits_step_rows(tmp_path, monkeypatch, option: str, value: str, suffix: str) -> list[dict]:
    """The per-launch rows of ``model.py steps`` for the ``digits-cnn`` preset's network (batch 4,
    density 0.5, H100) with ``--<option> <value>``, read from the file named with ``suffix``."""
    monkeypatch.setitem(model_steps.STEP_PRESETS, "digits-cnn", "digits-cnn")
    argv = ["steps", "--models", "digits-cnn", "--batch", "4", "--densities", "0.5", "--devices", "h100",
            f"--{option}", value, "--out", str(tmp_path)]
    assert model.main(argv) == 0
    with (tmp_path / f"step-digits-cnn-b4{suffix}-float32-torch-sgd-h100-launches.csv").open() as f:
        return list(csv.DictReader(f))


def test_a_model_step_runs_channels_last_as_the_simulator_sets_it_on_a_gpu(tmp_path, monkeypatch):
    # --memory-format auto (the default): the convolutional model channels-last, as the simulator
    # runs it on CUDA: the second convolution reads its input in place (no `clone` of it in the
    # forward or the backward) and gathers its active filters inside its tile loads (no weight
    # compaction launch), the 1-channel stem's output channels-last too. "contiguous": the NCHW
    # model, named so in its files and title.
    names = {fmt: [r["name"] for r in _digits_step_rows(tmp_path, monkeypatch, "memory-format", fmt,
                                                         "" if fmt == "auto" else "-contiguous")
                   if r["provider"] == "spafl"] for fmt in ("auto", "contiguous")}
    assert "contiguous" in (tmp_path / "step-digits-cnn-b4-contiguous-float32-torch-sgd-h100.md").read_text()
    # (channels-last, one `clone` remains: flattening the last pooled activation for the Linear)
    assert names["auto"].count("clone") == 1 and "_compact_weight_kernel" not in names["auto"], names["auto"]
    assert names["contiguous"].count("clone") == 2 and "_compact_weight_kernel" in names["contiguous"]
    assert len(names["auto"]) < len(names["contiguous"])
    with pytest.raises(ValueError, match="memory_format must be one of"):
        model_steps.step_launches("lenet5", 0.5, memory_format="nhwc")


def test_a_model_step_adds_the_penalty_gradient_as_the_simulator_does(tmp_path, monkeypatch):
    # --penalty grad (the default): no penalty in the forward, its gradient in four multi-tensor
    # launches after the backward and no add per layer where autograd joined the two threshold
    # gradients; "loss": the term in the loss, named so in the files. The dense side is the same.
    names = {}
    for penalty in ("grad", "loss"):
        suffix = "" if penalty == "grad" else "-penalty-loss"
        rows = _digits_step_rows(tmp_path, monkeypatch, "penalty", penalty, suffix)
        names[penalty] = {(p, ph): [r["name"] for r in rows if r["provider"] == p and r["op"] == ph]
                          for p in ("spafl", "dense") for ph in ("fwd", "bwd", "step")}
    assert "penalty in the loss" in (tmp_path / "step-digits-cnn-b4-penalty-loss-float32-torch-sgd-h100.md").read_text()
    grad, loss = names["grad"], names["loss"]
    assert "exp" not in grad[("spafl", "fwd")] and "exp" in loss[("spafl", "fwd")]
    foreach = [n for n in grad[("spafl", "bwd")] if n.startswith("_foreach")]
    assert foreach == ["_foreach_neg", "_foreach_exp_", "_foreach_mul_.Scalar", "_foreach_sub_.List"], foreach
    layers = 4  # digits-cnn: two convolutions, two Linear layers
    saved = len(loss[("spafl", "fwd")]) + len(loss[("spafl", "bwd")]) - len(grad[("spafl", "fwd")]) \
        - len(grad[("spafl", "bwd")])
    assert saved >= layers + 2, saved
    for ph in ("fwd", "bwd", "step"):
        assert grad[("dense", ph)] == loss[("dense", ph)]
    with pytest.raises(ValueError, match="penalty must be one of"):
        model_steps.step_launches("lenet5", 0.5, penalty="graph")


# ----------------------------------------------------------------------------- the fast convolution count

# (batch, channels, filters, size, kernel, stride, padding, dilation, channels-last, dtype): small
# enough for the interpreter, covering strides (phases of dX), 1x1, even kernels with "same"
# padding (uneven), dilation, a pixel reduction split in two (2048 pixels) and the tile classes.
_FAST_SHAPES = {
    "3x3-nchw": (2, 5, 20, 9, 3, 1, 1, 1, False, torch.bfloat16),
    "3x3-cl-fp32": (2, 5, 20, 9, 3, 1, 1, 1, True, torch.float32),
    "stride2-cl": (2, 16, 40, 8, 3, 2, 1, 1, True, torch.bfloat16),
    "1x1": (1, 3, 24, 10, 1, 1, 0, 1, False, torch.bfloat16),
    "4x4-same": (2, 8, 30, 11, 4, 1, "same", 1, False, torch.bfloat16),
    "dilated": (2, 6, 20, 9, 3, 1, 2, 2, True, torch.bfloat16),
    "split": (2, 4, 20, 32, 3, 1, 1, 1, True, torch.bfloat16),
    # channels-last dY with a multiple of 128 filters: at density 1 dX and dW read it in place
    "dy-in-place": (1, 4, 128, 5, 3, 1, 1, 1, True, torch.bfloat16),
}


def _conv_call(shape, density, mode, fast):
    from spafl import threshold_conv2d

    batch, chans, filters, size, k, stride, padding, dilation, cl, dtype = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, chans, size, size, generator=g).to(dtype)
    w = torch.randn(filters, chans, k, k, generator=g).to(dtype)
    b = torch.randn(filters, generator=g).to(dtype)
    y_shape = F.conv2d(x.float(), w.float(), None, stride, padding, dilation).shape
    dy = torch.randn(y_shape, generator=g).to(dtype)
    if cl:
        x, w, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, w, dy))
    tau = model.unit_thresholds(filters, density)
    x, w, tau, b = (t.requires_grad_() for t in (x, w, tau, b))

    def call():
        y = threshold_conv2d(x, w, tau, b, stride, padding, dilation, backend="triton", backward_mode=mode,
                             collapse_density=None, check_finite=False)
        return y.detach(), torch.autograd.grad(y, (x, w, tau, b), dy)

    model._warm_state()
    call()  # state the kernels keep between calls (the bias gradient's tickets) exists before the record
    rec = model.Recorder(fast_conv=fast, fast_linear=fast)
    with rec:
        _, out = model.record(call, "fwd+bwd", rec)
    return rec, out


# Every density and mode on the plain 3x3 shape; each other shape at one density and mode
# (CI-sized: the interpreter side takes seconds per case).
_FAST_CASES = ([("3x3-nchw", d, m) for d in (0.0, 0.3, 1.0) for m in ("skip", "exact")]
               + [("3x3-cl-fp32", 0.3, "exact"), ("stride2-cl", 1.0, "exact"), ("stride2-cl", 0.0, "skip"),
                  ("1x1", 0.3, "skip"), ("4x4-same", 0.3, "exact"), ("dilated", 1.0, "skip"), ("split", 1.0, "exact"),
                  ("dy-in-place", 1.0, "exact")])


@pytest.mark.parametrize(("name", "density", "mode"), _FAST_CASES)
def test_the_fast_convolution_count_equals_the_interpreter_launch_for_launch(name, density, mode):
    shape = _FAST_SHAPES[name]
    slow, (y0, grads0) = _conv_call(shape, density, mode, fast=False)
    fast, (y1, grads1) = _conv_call(shape, density, mode, fast=True)
    # forward, dX, dW; the row mask and the finish pass by the Linear count
    assert [la.name for la in fast.launches if la.name.startswith("_threshold_conv2d")] == [
        "_threshold_conv2d_fwd_kernel", "_threshold_conv2d_bwd_dx_kernel", "_threshold_conv2d_bwd_dw_kernel"]
    assert slow.fast_launches == 0 and fast.fast_launches == 3 + sum(
        la.name in ("_row_mask_kernel", "_threshold_bwd_finish_kernel") for la in fast.launches)
    assert [la.name for la in fast.launches] == [la.name for la in slow.launches]
    for a, b in zip(slow.launches, fast.launches, strict=True):
        assert vars(a) == vars(b), a.name
    # the outputs the fast path writes with plain torch carry the same values into later launches
    tol = {"atol": 1e-4, "rtol": 1e-4} if shape[-1] == torch.float32 else {"atol": 3e-2, "rtol": 2e-2}
    torch.testing.assert_close(y1, y0, **tol)
    for g1, g0 in zip(grads1, grads0, strict=True):
        torch.testing.assert_close(g1, g0, **tol)


def test_the_fast_count_covers_the_sample_mode_and_a_split_pixel_reduction():
    shape = _FAST_SHAPES["split"]
    slow, (_, grads0) = _conv_call(shape, 0.3, "sample", fast=False)
    fast, (_, grads1) = _conv_call(shape, 0.3, "sample", fast=True)
    for a, b in zip(slow.launches, fast.launches, strict=True):
        assert vars(a) == vars(b), a.name
    (dw,) = [la for la in fast.launches if la.name == "_threshold_conv2d_bwd_dw_kernel"]
    # grid (active block + pruned block, 9 kernel positions, split): the split is not 1 here
    assert dw.programs % (2 * 9) == 0 and dw.programs // (2 * 9) > 1
    for g1, g0 in zip(grads1, grads0, strict=True):
        torch.testing.assert_close(g1, g0, atol=3e-2, rtol=2e-2)


def test_launches_the_fast_count_does_not_know_run_in_the_interpreter():
    a, b = torch.randn(16, 16), torch.randn(16, 16)
    out = torch.zeros(2, 16, 16)
    rec = model.Recorder(fast_conv=True)
    with rec:
        _gemm_tile_kernel[(2,)](a, b, out, 2, BLOCK=16)
    assert rec.fast_launches == 0 and rec.launches[0].macs == 2 * 16**3
    torch.testing.assert_close(out[1], a @ b)


# ----------------------------------------------------------------------------- the fast Linear count

import linear_count  # noqa: E402  (benchmarks/, on the path above)


def _linear_operands(m, k, n, density, dtype, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    dy = torch.randn(m, n, generator=g).to(dtype)
    return x, w, b, dy, model.unit_thresholds(n, density)


def _recorded(call, fast):
    model._warm_state()
    call()  # state the kernels keep between calls exists before the record
    rec = model.Recorder(fast_conv=fast, fast_linear=fast)
    with rec:
        _, out = model.record(call, "fwd+bwd", rec)
    return rec, out


def _linear_call(shape, density, mode, fast):
    from spafl import threshold_linear

    m, k, n, dtype, bias = shape
    x, w, b, dy, tau = _linear_operands(m, k, n, density, dtype, bias)
    params = [t.requires_grad_() for t in (x, w, tau, b) if t is not None]

    def call():
        y = threshold_linear(x, w, tau, b, backend="triton", backward_mode=mode, collapse_density=None,
                             check_finite=False)
        return [y.detach(), *torch.autograd.grad(y, params, dy)]

    return _recorded(call, fast)


def _assert_same_launches(slow, fast, outs0, outs1, dtype):
    assert slow.fast_launches == 0
    assert [la.name for la in fast.launches] == [la.name for la in slow.launches]
    for a, b in zip(slow.launches, fast.launches, strict=True):
        assert vars(a) == vars(b), a.name
    # the outputs the fast count writes with plain torch carry the same values into later launches
    tol = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 2e-2}
    for o1, o0 in zip(outs1, outs0, strict=True):
        torch.testing.assert_close(o1, o0, **tol)


# (rows, features, units, dtype, bias): odd sizes below one tile (45 features: rows that start
# inside a sector); a 1024-long reduction over one tile of units, which the forward splits across
# programs; fp32 (its own tiles).
_LINEAR_SHAPES = {
    "bf16": (33, 48, 40, torch.bfloat16, True),
    "bf16-no-bias": (29, 45, 40, torch.bfloat16, False),
    "fp32": (37, 64, 50, torch.float32, True),
    "split": (64, 1024, 200, torch.bfloat16, False),
}
_LINEAR_CASES = ([("bf16", d, m) for d in (0.0, 0.3, 1.0) for m in ("skip", "exact")]
                 + [("bf16-no-bias", 0.3, "skip"), ("fp32", 0.3, "exact"), ("fp32", 1.0, "skip"),
                    ("split", 0.3, "skip"), ("split", 1.0, "exact")])


@pytest.mark.parametrize(("name", "density", "mode"), _LINEAR_CASES)
def test_the_fast_linear_count_equals_the_interpreter_launch_for_launch(name, density, mode):
    shape = _LINEAR_SHAPES[name]
    slow, outs0 = _linear_call(shape, density, mode, fast=False)
    fast, outs1 = _linear_call(shape, density, mode, fast=True)
    # row mask, forward, the pass over dY, dX, dW: every launch of the training path
    assert fast.fast_launches == len(fast.launches) == 5
    _assert_same_launches(slow, fast, outs0, outs1, shape[3])
    if name == "split":
        fwd = fast.launches[1]
        # one tile of outputs, its reduction split over several programs (workspace and tickets)
        assert fwd.name == "_threshold_linear_fwd_kernel" and fwd.mac_programs > 1


@pytest.mark.parametrize(("name", "density", "mode"), [("bf16", 0.3, "skip"), ("bf16", 1.0, "exact"),
                                                      ("bf16-no-bias", 0.0, "skip"), ("split", 0.3, "skip"),
                                                      ("split", 1.0, "skip")])
def test_the_fast_count_of_dx_and_dw_in_one_launch_equals_the_interpreter(name, density, mode):
    # The backward for compact gradients (a fused optimizer step): dX and dW in one persistent
    # launch, its units dealt to the programs in turn.
    from spafl.kernels import threshold_linear as tlk
    from spafl.kernels.threshold_mask import threshold_row_mask

    m, k, n, dtype, bias = _LINEAR_SHAPES[name]
    x, w, b, dy, tau = _linear_operands(m, k, n, density, dtype, bias)

    def call():
        mask = threshold_row_mask(w, tau)
        z = torch.empty(m, n)
        y = tlk.threshold_linear_fwd(x, w, b, mask, z_out=z, z_all=mode == "exact")
        r = torch.zeros(n)
        dx, dw, dtau = tlk.threshold_linear_bwd(dy, x, w, mask, mode=mode, z=z, r_out=r)
        return [y, dx, dw[mask.perm[:int(mask.count)].long()], dtau, r]

    slow, outs0 = _recorded(call, fast=False)
    fast, outs1 = _recorded(call, fast=True)
    # row mask, forward, the pass over dY, dX and dW in one launch (then the test's own indexing)
    assert [la.name for la in fast.launches if la.source == "triton"] == [
        "_row_mask_kernel", "_threshold_linear_fwd_kernel", "_compact_grad_bias_kernel",
        "_threshold_linear_bwd_kernel"]
    assert fast.fast_launches == 4
    _assert_same_launches(slow, fast, outs0, outs1, dtype)


def test_the_fast_linear_count_covers_the_finish_pass_compact_weights_rows_only_and_the_guard():
    from spafl.kernels import threshold_linear as tlk
    from spafl.kernels.threshold_mask import threshold_row_mask

    x, w, b, dy, tau = _linear_operands(33, 48, 40, 0.3, torch.bfloat16, True)

    def call():
        outs = []
        # the guard fires (density 0.3 <= 0.5): the mask of tau = 0
        guarded = threshold_row_mask(w, tau, collapse_density=0.5)
        outs += [guarded.perm, guarded.count, guarded.score, guarded.collapsed]
        mask = threshold_row_mask(w, tau)
        for mode in ("exact", "skip", "sample"):
            y = tlk.threshold_linear_fwd(x, w, b, mask, compact_weight=True)
            # no Z: dW through its workspace and the finish pass
            outs += [y, *tlk.threshold_linear_bwd(dy, x, w, mask, mode=mode, compact_weight=True)]
            # r for a fused optimizer step: the active rows of dW only
            r = torch.zeros(40)
            z = torch.empty(33, 40)
            tlk.threshold_linear_fwd(x, w, b, mask, z_out=z, z_all=mode == "exact")
            if mode != "sample":
                _, dw, dtau = tlk.threshold_linear_bwd(dy, x, w, mask, mode=mode, z=z, r_out=r)
                outs += [dw[mask.perm[:int(mask.count)].long()], dtau, r]
                # without dX (a first layer): the dW GEMM alone, writing every row
                outs += list(tlk.threshold_linear_bwd(dy, x, w, mask, mode=mode, z=z, need_dx=False)[1:])
        return outs

    slow, outs0 = _recorded(call, fast=False)
    fast, outs1 = _recorded(call, fast=True)
    names = [la.name for la in fast.launches]
    assert {"_threshold_bwd_finish_kernel", "_compact_weight_kernel", "_threshold_linear_bwd_kernel",
            "_threshold_linear_bwd_dw_kernel"} <= set(names)
    counted = [n for n in names if n in linear_count.COUNTERS]
    # the dW GEMMs that do not know r (the three without Z) and the compactions run in the interpreter
    assert fast.fast_launches == len(counted) - 3
    _assert_same_launches(slow, fast, outs0, outs1, torch.bfloat16)
    assert bool(outs1[3]) and int(outs1[1]) == 40  # collapsed: every row with a positive score


@pytest.mark.parametrize("fired", [True, False], ids=["fires", "holds"])
def test_the_fast_count_of_a_forward_with_the_guards_writes_equals_the_interpreter(fired):
    # The forward that takes a fused step's mask makes the collapse guard's writes in its
    # launch (program 0): counted without the interpreter, the same launch fields and the same
    # writes (thresholds, reset counter, stored density), Linear and convolution.
    from spafl._conv import conv_geometry
    from spafl.kernels import threshold_conv2d as tck
    from spafl.kernels import threshold_linear as tlk
    from spafl.kernels.threshold_mask import pending_guard_writes, threshold_row_mask

    m, k, n, dtype, bias = _LINEAR_SHAPES["bf16"]
    x, w, b, _, tau = _linear_operands(m, k, n, 0.3, dtype, bias)
    shape = _FAST_SHAPES["3x3-cl-fp32"]
    batch, chans, filters, size, kk, stride, padding, dilation, _, cdt = shape
    g = torch.Generator().manual_seed(1)
    xc = torch.randn(batch, chans, size, size, generator=g).to(cdt).contiguous(memory_format=torch.channels_last)
    wc = torch.randn(filters, chans, kk, kk, generator=g).to(cdt).contiguous(memory_format=torch.channels_last)
    geo = conv_geometry(kk, stride, padding, dilation)

    def state():
        return [torch.full((n,), 0.5), torch.full((filters,), 0.25), torch.tensor(3), torch.tensor(4),
                torch.ones(()), torch.ones(())]

    def call(s):
        t_lin, t_conv, r_lin, r_conv, p_lin, p_conv = s
        flag = torch.tensor([fired])
        rm = threshold_row_mask(w, tau)
        rm = rm._replace(guard=pending_guard_writes(t_lin, flag, rm.count, p_lin, r_lin))
        y = tlk.threshold_linear_fwd(x, w, b, rm)
        rmc = threshold_row_mask(wc.reshape(filters, -1), model.unit_thresholds(filters, 0.3))
        rmc = rmc._replace(guard=pending_guard_writes(t_conv, flag, rmc.count, p_conv, r_conv))
        yc = tck.threshold_conv2d_fwd(xc, wc, None, rmc, geo)
        return [y, yc]

    runs = []
    for fast in (False, True):
        s = state()
        rec, outs = _recorded(lambda s=s: call(s), fast)
        runs.append((rec, outs, s))
    (slow, outs0, s0), (fast, outs1, s1) = runs
    assert fast.fast_launches == 4  # (the two row masks and the two forwards)
    _assert_same_launches(slow, fast, outs0, outs1, dtype)
    for a, c in zip(s0, s1, strict=True):
        assert torch.equal(a, c)
    assert int(s0[2]) == 3 + 2 * fired and bool((s0[0] == 0).all()) == fired  # (twice: the warm-up call too)
