"""The benchmark providers at small sizes, as a pytest-benchmark suite, and the benchmark scripts.

``python -m pytest tests/test_bench.py --benchmark-enable`` times every provider (on CPU the
spafl providers run the reference path); in the normal test run (benchmarks disabled) each
timed function runs once, after the providers have been checked against each other."""

import csv
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import e2e  # noqa: E402

import kernels  # noqa: E402
from spafl import threshold_layers  # noqa: E402
from spafl.federated.models import build_model  # noqa: E402

SMOKE = {c.layer: c for c in kernels.SUITES["smoke"]}


@pytest.mark.parametrize("provider", kernels.PROVIDERS)
@pytest.mark.parametrize("layer", ["linear", "conv2d"])
def test_provider_matches_the_masked_layer(benchmark, layer, provider):
    bench = kernels.Bench(SMOKE[layer], torch.float32, torch.device("cpu"))
    table = bench.providers(0.5)
    fn, params, dy_map = table[provider]
    ref_fn, ref_params, _ = table["masked"]
    dim = -1 if layer == "linear" else 1
    x = bench.xs[0].detach().requires_grad_()
    y = fn(x)
    x_ref = bench.xs[0].detach().requires_grad_()
    y_ref = ref_fn(x_ref)
    dy = bench.dys[0]
    if provider == "smaller":
        assert y.shape[dim] == bench.active == round(0.5 * SMOKE[layer].rows)
        y_ref = y_ref.index_select(dim, bench.active_index)
        dy_small = dy_map(dy)
        (dx,) = torch.autograd.grad(y, (x,), dy_small)
        (dx_ref,) = torch.autograd.grad(y_ref, (x_ref,), dy_small)
    else:
        (dx,) = torch.autograd.grad(y, (x,), dy)
        (dx_ref,) = torch.autograd.grad(y_ref, (x_ref,), dy)
    if provider != "dense":  # the dense layer keeps every row
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-5)
    assert bench.active == round(0.5 * SMOKE[layer].rows)
    benchmark(kernels.timed, bench, fn, params, dy_map, "fwd+bwd", torch.device("cpu"), 1)


def test_ratios_against_dense_and_the_smaller_layer():
    rows = [{"case": "c", "dtype": "float32", "density": 0.5, "op": "fwd", "provider": p, "ms": ms}
            for p, ms in (("dense", 4.0), ("smaller", 1.0), ("spafl-exact", 2.0))]
    rows.append({"case": "c", "dtype": "float32", "density": 0.0, "op": "fwd", "provider": "dense", "ms": 3.0})
    kernels.add_ratios(rows)
    ours = rows[2]
    assert ours["speedup_vs_dense"] == 2.0 and ours["fraction_of_upper_bound"] == 0.5
    assert rows[0]["speedup_vs_dense"] == 1.0 and rows[1]["fraction_of_upper_bound"] == 1.0
    assert math.isnan(rows[3]["fraction_of_upper_bound"])  # no smaller layer without active rows


def test_kernels_script_writes_the_csv_schema_and_plots(tmp_path):
    out = tmp_path / "k.csv"
    assert kernels.main(["--suite", "smoke", "--densities", "1.0", "0.0", "--reps", "1", "--csv", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == list(kernels.COLUMNS)
    # 2 cases x (6 providers at density 1, 4 at density 0: no active row to gather) x 3 ops
    assert len(rows) == 2 * (6 + 4) * 3
    assert {r["provider"] for r in rows if r["density"] == "0.0"} == {"dense", "masked", "spafl-exact", "spafl-skip"}
    for r in rows:
        assert float(r["ms"]) > 0 and r["device"].startswith("cpu") and r["torch"] == torch.__version__
        if r["provider"] == "dense":
            assert float(r["speedup_vs_dense"]) == 1.0
    full = [r for r in rows if r["density"] == "1.0"]
    assert all(int(r["active"]) == (48 if r["layer"] == "linear" else 12) for r in full)
    pytest.importorskip("matplotlib")
    import plot

    written = plot.plot(plot.read(out), tmp_path / "plots", "test")
    assert len(written) == 2 * 3 and all(p.stat().st_size > 0 for p in written)


@pytest.mark.parametrize("density", [1.0, 0.5, 0.1])
def test_e2e_sets_every_layer_to_the_density(density):
    model = build_model("lenet5", 10)
    e2e.set_density(model, density)
    for _, layer in threshold_layers(model):
        assert int(layer.mask.sum()) == round(density * layer.weight.shape[0])


def test_e2e_step_table(tmp_path):
    out = tmp_path / "e.csv"
    assert e2e.main(["--tables", "step", "--models", "lenet5", "--densities", "1.0", "0.2", "--reps", "1",
                     "--csv", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == list(e2e.COLUMNS)
    assert [(r["density"], r["provider"]) for r in rows] == [
        (d, p) for d in ("1.0", "0.2") for p in ("dense", "masked", "spafl")]
    assert all(float(r["ms"]) > 0 for r in rows)


@pytest.mark.parametrize("script", [kernels, e2e])
@pytest.mark.parametrize("argv, message", [(["--densities", "1.5"], "densities must be in"),
                                           (["--reps", "0"], "--reps must be at least 1")])
def test_benchmark_scripts_refuse_bad_arguments(script, argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        script.main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_kernels_script_refuses_an_unknown_case(capsys):
    with pytest.raises(SystemExit):
        kernels.main(["--suite", "smoke", "--cases", "nope"])
    assert "no case of suite 'smoke'" in capsys.readouterr().err
