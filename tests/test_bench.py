"""The benchmark providers at small sizes, as a pytest-benchmark suite, and the benchmark scripts.

``python -m pytest tests/test_bench.py --benchmark-enable`` times every provider (on CPU the
spafl providers run the default CPU backend); in the normal test run (benchmarks disabled) each
timed function runs once, after the providers have been checked against each other."""

import csv
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import _common  # noqa: E402
import cpu_costs  # noqa: E402
import e2e  # noqa: E402
import step_profile  # noqa: E402

import kernels  # noqa: E402
from spafl import named_threshold_layers  # noqa: E402
from spafl._checks import resolve_backend  # noqa: E402
from spafl.federated.models import build_model  # noqa: E402

SMOKE = {c.layer: c for c in kernels.SUITES["smoke"]}
CPU = torch.device("cpu")


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --- providers -------------------------------------------------------------------------------


@pytest.mark.parametrize("provider", kernels.PROVIDERS)
@pytest.mark.parametrize("layer", ["linear", "conv2d"])
def test_provider_matches_the_masked_layer(benchmark, layer, provider):
    bench = kernels.Bench(SMOKE[layer], torch.float32, CPU)
    table = bench.providers(0.5)
    fn, params, dy_map, backend = table[provider]
    ref_fn, ref_params, _, ref_backend = table["masked"]
    assert ref_backend == "reference"
    if provider.startswith("spafl"):
        assert backend == resolve_backend("auto", bench.weight)  # the backend "auto" runs, named in the rows
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
    else:
        assert not torch.allclose(y, y_ref, rtol=1e-5, atol=1e-5)  # the pruned rows are computed
    assert bench.active == round(0.5 * SMOKE[layer].rows)
    benchmark(kernels.runner(bench, fn, params, dy_map, "fwd+bwd"))


@pytest.mark.parametrize("op", kernels.OPS)
def test_runner_rotates_the_inputs_and_differentiates_every_parameter(op):
    bench = kernels.Bench(SMOKE["linear"], torch.float32, CPU)
    fn, params, dy_map, _ = bench.providers(0.5)["spafl-exact"]
    seen = []
    run = kernels.runner(bench, lambda x: seen.append(x.data_ptr()) or fn(x), params, dy_map, op)
    before = len(seen)
    for _ in range(4):
        run()
    calls = seen[before:] if op != "bwd" else seen
    assert len(set(calls)) == 4  # four input sets, no operand found in cache twice in a row
    if op != "fwd":  # torch.autograd.grad returns the gradients: nothing accumulates between calls
        assert all(p.grad is None for p in params)


# --- the noise rule --------------------------------------------------------------------------


def test_ratio_from_paired_samples():
    base = _common.Timing((4.0, 4.1, 3.9, 4.0, 4.0))
    side = _common.Timing((2.0, 2.05, 1.95, 2.0, 2.0))
    r = _common.ratio(base, side)
    assert r.value == pytest.approx(2.0) and not r.noisy
    assert r.p20 == pytest.approx(2.0) and r.p80 == pytest.approx(2.0)


def test_a_machine_wide_slowdown_that_hits_both_sides_is_not_noise():
    # Repetition 3 ran ten times slower for both sides: each side's own spread is huge, but the
    # interleaved pairs keep the ratio tight.
    base = _common.Timing((4.0, 4.0, 40.0, 4.0, 4.0, 4.0))
    side = _common.Timing((2.0, 2.0, 20.0, 2.0, 2.0, 2.0))
    r = _common.ratio(base, side)
    assert r.value == pytest.approx(2.0) and not r.noisy


def test_a_ratio_whose_pairs_spread_beyond_the_tolerance_is_noisy():
    # The case: one side's p20-p80 spans 0.46-6.9 ms, which makes "20x" meaningless.
    base = _common.Timing((0.46, 6.9, 0.5, 6.0, 3.0))
    side = _common.Timing((0.3, 0.3, 0.3, 0.3, 0.3))
    r = _common.ratio(base, side)
    assert r.noisy and r.p20 < r.value / 1.2


@pytest.mark.parametrize("tolerance, noisy", [(0.05, True), (0.2, False)])
def test_the_tolerance_decides(tolerance, noisy):
    base = _common.Timing((1.0,) * 5)
    side = _common.Timing((0.9, 0.95, 1.0, 1.05, 1.1))  # paired ratios 0.91..1.11 around 1.0
    assert _common.ratio(base, side, tolerance).noisy is noisy


def test_fewer_than_three_repetitions_leave_the_spread_unknown():
    assert _common.ratio(_common.Timing((2.0, 2.0)), _common.Timing((1.0, 1.0))).noisy
    assert not _common.ratio(_common.Timing((2.0,) * 3), _common.Timing((1.0,) * 3)).noisy


def test_ratio_needs_paired_samples():
    with pytest.raises(ValueError, match="paired samples"):
        _common.ratio(_common.Timing((1.0, 1.0, 1.0)), _common.Timing((1.0, 1.0)))


def test_interleaved_runs_every_side_once_per_repetition_in_rotating_order():
    order = []
    fns = {name: (lambda name=name: order.append(name)) for name in "abc"}
    timings = _common.interleaved(fns, CPU, reps=4, min_sample_ms=0.0, warmup=0)
    assert order[:3] == ["a", "b", "c"]  # calibration: one call each
    assert order[3:] == list("abc" "bca" "cab" "abc")
    assert all(len(t.samples) == 4 and t.inner == 1 for t in timings.values())


def test_interleaved_repeats_short_calls_to_fill_a_sample():
    calls = [0]

    def fn():
        calls[0] += 1

    timings = _common.interleaved({"f": fn}, CPU, reps=2, min_sample_ms=1.0, warmup=0)
    assert timings["f"].inner > 1 and calls[0] == 1 + 2 * timings["f"].inner


def test_group_rows_ratios_against_dense_and_the_smaller_layer():
    case = SMOKE["linear"]
    timings = {p: _common.Timing((ms,) * 3) for p, ms in (("dense", 4.0), ("smaller", 1.0), ("spafl-exact", 2.0))}
    backends = {"dense": "torch", "smaller": "torch", "spafl-exact": "compact"}
    rows = {r["provider"]: r for r in kernels.group_rows(case, "float32", 0.5, 24, "fwd", timings, backends, 0.2)}
    ours = rows["spafl-exact"]
    assert ours["speedup_vs_dense"] == 2.0 and ours["fraction_of_upper_bound"] == 0.5
    assert ours["backend"] == "compact" and ours["reps"] == 3 and ours["noisy"] is False
    assert rows["dense"]["speedup_vs_dense"] == 1.0 and rows["smaller"]["fraction_of_upper_bound"] == 1.0
    without_smaller = kernels.group_rows(case, "float32", 0.0, 0, "fwd", {"dense": timings["dense"]}, backends, 0.2)
    assert math.isnan(without_smaller[0]["fraction_of_upper_bound"])  # no smaller layer without active rows


def test_a_noisy_ratio_is_marked_where_it_is_printed(capsys):
    timings = {"dense": _common.Timing((4.0,) * 5), "smaller": _common.Timing((1.0, 3.0, 1.0, 3.0, 1.0)),
               "spafl-exact": _common.Timing((2.0,) * 5)}
    backends = {"dense": "torch", "smaller": "torch", "spafl-exact": "compact"}
    rows = kernels.group_rows(SMOKE["linear"], "float32", 0.5, 24, "fwd", timings, backends, 0.2)
    ours = rows[-1]
    assert not ours["speedup_vs_dense_noisy"] and ours["fraction_of_upper_bound_noisy"] and ours["noisy"]
    kernels.show_row(ours)
    printed = capsys.readouterr().out
    assert "2.00x (2.00-2.00) " in printed and "0.50x (0.50-1.50)?" in printed


# --- the CSV ---------------------------------------------------------------------------------

QUICK = ["--suite", "smoke", "--cases", "smoke-linear", "--densities", "0.5", "--ops", "fwd", "--providers", "dense",
         "spafl-exact", "--reps", "1", "--min-sample-ms", "0"]


def test_kernels_script_writes_the_csv_schema_and_plots(tmp_path):
    out = tmp_path / "k.csv"
    assert kernels.main(["--suite", "smoke", "--densities", "1.0", "0.0", "--reps", "3", "--min-sample-ms", "0",
                         "--csv", str(out)]) == 0
    rows = read_csv(out)
    assert list(rows[0]) == list(kernels.COLUMNS)
    # 2 cases x (6 providers at density 1, 4 at density 0: no active row to gather) x 3 ops
    assert len(rows) == 2 * (6 + 4) * 3
    assert {r["provider"] for r in rows if r["density"] == "0.0"} == {"dense", "masked", "spafl-exact", "spafl-skip"}
    ours = resolve_backend("auto", torch.empty(1))
    for r in rows:
        assert float(r["ms"]) > 0 and r["device"].startswith("cpu") and r["torch"] == torch.__version__
        assert r["threads"] == "1" and r["reps"] == "3"
        flags = [r["speedup_vs_dense_noisy"], r["fraction_of_upper_bound_noisy"]]
        assert r["noisy"] == str("True" in flags) and set(flags) <= {"True", "False"}
        assert float(r["speedup_vs_dense_p20"]) <= float(r["speedup_vs_dense_p80"])
        assert r["backend"] == {"masked": "reference", "spafl-exact": ours, "spafl-skip": ours}.get(r["provider"],
                                                                                                   "torch")
        if r["provider"] == "dense":
            assert float(r["speedup_vs_dense"]) == float(r["speedup_vs_dense_p20"]) == 1.0
            assert r["speedup_vs_dense_noisy"] == "False"  # a side against itself
    full = [r for r in rows if r["density"] == "1.0"]
    assert all(int(r["active"]) == (48 if r["layer"] == "linear" else 12) for r in full)
    pytest.importorskip("matplotlib")
    import plot

    written = plot.plot(plot.read(out), tmp_path / "plots", "test")
    assert len(written) == 2 * 3 and all(p.stat().st_size > 0 for p in written)
    import summary

    text = summary.kernel_tables(summary.read(out))
    assert "spafl-exact (" + ours + ")" in text and "masked (reference)" in text


def test_cpu_costs_script_times_every_group_against_its_first_side(tmp_path):
    out = tmp_path / "c.csv"
    assert cpu_costs.main(["--reps", "3", "--min-sample-ms", "0", "--csv", str(out)]) == 0
    rows = read_csv(out)
    assert list(rows[0]) == list(cpu_costs.COLUMNS)
    sides = {g: [r["side"] for r in rows if r["group"] == g] for g in cpu_costs.GROUPS}
    assert sides == {"fc3-floor": ["dense", "smaller", "spafl-skip", "row-scores", "grad-fill"],
                     "cl-gather": ["index_select", "_select_channels"], "elementwise": ["add", "ge", "where"],
                     "call-floor": ["nn.Linear", "layer", "floor", "guard", "function", "guard+function"]}
    for r in rows:
        assert float(r["ms"]) > 0 and r["threads"] == "1" and r["device"].startswith("cpu")
        if r["side"] in ("dense", "index_select", "add", "nn.Linear"):
            assert float(r["ratio_vs_first"]) == 1.0
    with pytest.raises(SystemExit):
        cpu_costs.main(["--groups", "nothing"])


def test_the_cpu_suite_holds_the_targets_shapes():
    names = {c.name: c for c in kernels.SUITES["cpu"]}
    big = names["linear-4096x4096-b256"]
    assert (big.m, big.n, big.k) == (256, 4096, 4096)
    conv2 = names["lenet5-conv2-b64"]
    assert (conv2.batch, conv2.cin, conv2.cout, conv2.size, conv2.kernel, conv2.out) == (64, 20, 50, 12, 5, 8)
    fc3 = names["lenet5-fc3-b64"]
    assert (fc3.m, fc3.n, fc3.k) == (64, 500, 800)
    assert {"lenet5-conv1-b64", "lenet5-fc4-b64"} <= set(names)
    model = build_model("lenet5", 10)  # the cases are the model's layers
    assert tuple(model.conv2.weight.shape) == (50, 20, 5, 5) and tuple(model.fc3.weight.shape) == (500, 800)


def test_csv_is_fresh_by_default_and_appended_with_append(tmp_path):
    out = tmp_path / "k.csv"
    assert kernels.main([*QUICK, "--csv", str(out)]) == 0
    assert len(read_csv(out)) == 2
    assert kernels.main([*QUICK, "--csv", str(out)]) == 0  # a rerun replaces, not doubles
    assert len(read_csv(out)) == 2
    assert kernels.main([*QUICK, "--csv", str(out), "--append"]) == 0
    assert len(read_csv(out)) == 4
    assert out.read_text().count("timestamp,") == 1  # one header


def test_append_refuses_a_file_of_another_schema(tmp_path, capsys):
    out = tmp_path / "e.csv"
    out.write_text("timestamp,table,case\nx,step,lenet5\n")
    with pytest.raises(SystemExit) as exc:
        kernels.main([*QUICK, "--csv", str(out), "--append"])
    assert exc.value.code == 2 and "another header" in capsys.readouterr().err
    assert out.read_text() == "timestamp,table,case\nx,step,lenet5\n"  # untouched


def test_append_to_a_missing_file_writes_the_header(tmp_path):
    sink = _common.CsvSink(tmp_path / "new.csv", ("a", "b"), append=True)
    sink.write({"a": 1, "b": 2})
    assert read_csv(tmp_path / "new.csv") == [{"a": "1", "b": "2"}]
    with pytest.raises(KeyError, match="lacks the columns"):
        sink.write({"a": 1})


def _two_rows_then_interrupt(rows):
    def measure(*args, **kwargs):
        yield from rows[:2]
        raise KeyboardInterrupt

    return measure


def test_an_interrupted_kernels_run_keeps_the_rows_measured(tmp_path, monkeypatch, capsys):
    out = tmp_path / "k.csv"
    base = {k: "x" for k in ("device", "torch", "triton", "python", "spafl", "threads", "command")}
    rows = list(kernels.measure([SMOKE["linear"]], ["float32"], [0.5], ["fwd", "bwd"], ["dense", "spafl-exact"], CPU,
                                1, 0.0, 0.2, base))
    monkeypatch.setattr(kernels, "measure", _two_rows_then_interrupt(rows[:3]))
    capsys.readouterr()
    assert kernels.main([*QUICK, "--csv", str(out)]) == 130
    assert len(read_csv(out)) == 2
    printed = capsys.readouterr().out
    assert sum(line.startswith("smoke-linear") for line in printed.splitlines()) == 2 and "interrupted" in printed


def test_an_interrupted_e2e_run_keeps_the_rows_measured(tmp_path, monkeypatch):
    row = {k: 1.0 for k in e2e.COLUMNS if k not in ("timestamp", "device", "torch", "triton", "python", "spafl",
                                                    "threads", "command")}
    row.update(table="step", case="lenet5", profile="uniform", provider="dense", backend="torch", noisy=False)
    monkeypatch.setattr(e2e, "step_rows", _two_rows_then_interrupt([row, row, row]))
    out = tmp_path / "e.csv"
    assert e2e.main(["--tables", "step", "--models", "lenet5", "--csv", str(out)]) == 130
    assert len(read_csv(out)) == 2


def test_rows_are_printed_as_they_are_produced():
    seen = []

    def rows():
        for i in range(3):
            yield {"i": i}
            assert seen == list(range(i + 1))  # printed before the next row is measured

    assert _common.emit(rows(), None, lambda r: seen.append(r["i"])) == 3


# --- e2e -------------------------------------------------------------------------------------


@pytest.mark.parametrize("density", [1.0, 0.5, 0.1])
def test_e2e_sets_every_layer_to_the_density(density):
    model = build_model("lenet5", 10)
    e2e.set_density(model, density)
    for _, layer in named_threshold_layers(model):
        assert int(layer.mask.sum()) == round(density * layer.weight.shape[0])


def test_e2e_sets_a_profile_layer_by_layer():
    model = build_model("lenet5", 10)
    profile = e2e.PROFILES["late-spafl"]["lenet5"]
    e2e.set_density(model, profile)
    for name, layer in named_threshold_layers(model):
        assert int(layer.mask.sum()) == round(profile[name] * layer.weight.shape[0])
    with pytest.raises(ValueError, match="threshold layers"):
        e2e.set_density(model, {"conv1": 0.5})


def test_e2e_step_table(tmp_path):
    out = tmp_path / "e.csv"
    assert e2e.main(["--tables", "step", "--models", "lenet5", "--densities", "1.0", "0.2", "--reps", "1",
                     "--min-sample-ms", "0", "--csv", str(out)]) == 0
    rows = read_csv(out)
    assert list(rows[0]) == list(e2e.COLUMNS)
    assert [(r["profile"], r["density"], r["provider"]) for r in rows] == [
        (profile, d, p) for profile, d in (("uniform", "1.0"), ("uniform", "0.2"), ("late-spafl", "0.4875"))
        for p in ("dense", "masked", "spafl")]
    late = rows[-1]
    assert late["layer_densities"] == "conv1=0.6 conv2=0.3 fc3=0.05 fc4=1"
    assert {r["backend"] for r in rows if r["provider"] == "spafl"} == {resolve_backend("auto", torch.empty(1))}
    assert all(float(r["ms"]) > 0 and r["noisy"] == "True" for r in rows)  # 1 repetition: spread unknown
    import summary

    text = summary.e2e_tables(rows)
    assert "| lenet5 | conv1=0.6 conv2=0.3 fc3=0.05 fc4=1 |" in text and "x? |" in text
    pytest.importorskip("matplotlib")
    import plot

    written = plot.plot(rows, tmp_path / "plots", "test")
    assert sorted(p.name for p in written) == ["e2e_profiles_and_rounds.png", "step_train-step_float32.png"]


def test_e2e_step_table_times_only_the_providers_named(tmp_path):
    out = tmp_path / "e.csv"
    assert e2e.main(["--tables", "step", "--models", "lenet5", "--densities", "0.2", "--profiles",
                     "--providers", "dense", "spafl", "--reps", "1", "--min-sample-ms", "0", "--csv", str(out)]) == 0
    rows = read_csv(out)
    assert [r["provider"] for r in rows] == ["dense", "spafl"]
    spafl_row = rows[1]
    assert float(spafl_row["speedup_vs_dense"]) > 0 and math.isnan(float(spafl_row["speedup_vs_masked"]))


def test_step_profile_attributes_the_step_and_restores_the_functions(capsys):
    from spafl import chain, compact, compact_conv

    originals = [getattr(owner, name) for owner, name, _ in step_profile._WRAPPED]
    total, shares = step_profile.attribution("late-spafl", 5, warmup=1)
    assert [getattr(owner, name) for owner, name, _ in step_profile._WRAPPED] == originals
    assert compact_conv._conv2d is originals[0] and chain.layer is not None and compact.linear_forward is originals[4]
    measured = {k: v for k, v in shares.items() if not k.startswith("the rest")}
    assert all(v > 0 for v in measured.values()), shares  # every wrapped function ran in the step
    assert sum(shares.values()) == pytest.approx(total)
    assert step_profile.main(["--steps", "5", "--profile", "uniform-0.1"]) == 0
    printed = capsys.readouterr().out
    assert "dense / spafl:" in printed and "conv kernels, backward (oneDNN)" in printed


def test_step_profile_runs_of_steps(monkeypatch):
    # --run N: N steps of one network, then N of the other, the first network alternating;
    # each ends with the number of steps asked for, a last run cut short.
    calls = []
    monkeypatch.setattr(step_profile, "_models", lambda profile: ("spafl-model", "dense-model"))
    monkeypatch.setattr(step_profile, "_stepper",
                        lambda model, penalty: lambda: calls.append(model.split("-")[0]) or (0.0, 0.0, 0.0))
    out = step_profile.phases("late-spafl", 7, warmup=0, run=3)
    assert {k: len(v) for k, v in out.items()} == {"spafl": 7, "dense": 7}
    assert "".join(c[0] for c in calls) == "sssddd" "dddsss" "sd"
    with pytest.raises(SystemExit):
        step_profile.main(["--run", "0"])


def test_e2e_round_table_keeps_the_set_densities(tmp_path, capsys):
    out = tmp_path / "r.csv"
    assert e2e.main(["--tables", "round", "--presets", "digits-cnn", "--round-densities", "0.5", "--round-reps", "1",
                     "--csv", str(out)]) == 0
    rows = read_csv(out)
    assert [r["provider"] for r in rows] == ["masked", "spafl"]
    model = build_model("digits-cnn", 10)
    want = sum(round(0.5 * layer.weight.shape[0]) / layer.weight.shape[0] for _, layer in named_threshold_layers(model))
    want /= len(list(named_threshold_layers(model)))
    for r in rows:
        assert float(r["density"]) == pytest.approx(want, abs=1e-6)  # the tiny learning rate kept the masks
        assert r["profile"] == "uniform" and r["layer_densities"] == "all=0.5" and float(r["ms"]) > 0
    printed = capsys.readouterr().out
    assert printed.count("digits-cnn uniform round") == 2  # each round reported as it ends
    assert "warning" not in printed


def test_e2e_round_skips_a_profile_that_does_not_cover_the_model(capsys):
    assert e2e.main(["--tables", "round", "--presets", "digits-cnn", "--round-densities", "late-spafl"]) == 0
    assert "does not cover digits-cnn; skipped" in capsys.readouterr().out


# --- the command lines -----------------------------------------------------------------------


@pytest.mark.parametrize("script", [kernels, e2e])
@pytest.mark.parametrize("argv, message", [(["--densities", "1.5"], "densities must be in"),
                                           (["--densities", "nan"], "densities must be in"),
                                           (["--reps", "0"], "--reps must be at least 1"),
                                           (["--threads", "0"], "--threads must be at least 1"),
                                           (["--tolerance", "0"], "--tolerance must be a positive"),
                                           (["--append"], "--append needs --csv")])
def test_benchmark_scripts_refuse_bad_arguments(script, argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        script.main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [(["--round-densities", "most"], "--round-densities takes"),
                                           (["--round-densities", "2"], "densities must be in"),
                                           (["--round-reps", "0"], "--round-reps must be at least 1"),
                                           (["--presets", "nope"], "unknown preset")])
def test_e2e_refuses_bad_round_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        e2e.main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_kernels_script_refuses_an_unknown_case(capsys):
    with pytest.raises(SystemExit):
        kernels.main(["--suite", "smoke", "--cases", "nope"])
    assert "no case of suite 'smoke'" in capsys.readouterr().err


@pytest.mark.parametrize("script", [kernels, e2e])
def test_help_is_complete(script, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "10000")  # no wrapping, so that the text compares whitespace-free
    with pytest.raises(SystemExit) as exc:
        script.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert exc.value.code == 0
    doc = " ".join(script.__doc__.split())
    assert doc.endswith(".") and doc in text  # the whole docstring, not a first line cut mid-sentence
    for action in script.build_parser(False)._actions:
        assert action.help, f"{action.option_strings} has no help"
        assert all(flag in text for flag in action.option_strings)
        assert " ".join(action.help.split()).split("%(")[0] in text


# --- progress and the summary's opening ----------------------------------------------------------


def test_kernels_prints_progress_with_an_eta(tmp_path, capsys):
    quick = ["--suite", "smoke", "--densities", "0.5", "1.0", "--ops", "fwd", "bwd", "--providers", "dense",
             "spafl-exact", "--reps", "1", "--min-sample-ms", "0"]
    assert kernels.main([*quick, "--csv", str(tmp_path / "k.csv")]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[")]
    # 2 cases x 2 densities x 2 ops: one line per comparison, counted to the total, with an ETA
    assert [line.split("]")[0] for line in lines] == [f"[{k}/8" for k in range(1, 9)]
    assert lines[0].startswith("[1/8] smoke-linear float32 density 0.5 fwd: ") and "s left" in lines[0]
    assert lines[-1].endswith("about 0 s left")
    assert kernels.main([*quick, "--csv", str(tmp_path / "k2.csv"), "--no-progress"]) == 0
    assert "[1/8]" not in capsys.readouterr().err


def test_progress_line_eta():
    assert kernels.progress_line(1, 4, 10.0, "x") == "[1/4] x: 10 s elapsed, about 30 s left"
    assert kernels.progress_line(4, 4, 12.0, "x") == "[4/4] x: 12 s elapsed, about 0 s left"


def test_summary_does_not_open_with_unmeasured_targets(tmp_path):
    import summary

    rows = [{"layer": "linear", "op": "fwd", "provider": "spafl-exact", "case": "large-8192x4096", "density": "0.5",
             "dtype": "bfloat16", "device": "NVIDIA H100", "speedup_vs_dense": "2.5",
             "speedup_vs_dense_noisy": "False"}]
    table = summary.target_table(rows)
    # only the measured target has a row, with its ratio; no "not measured" filler
    assert table.count("\n") == 2 and "| linear fwd (spafl-exact) | 0.5 | >= 1.8x | 2.50x | large-8192x4096 |" in table
    cpu = [{**rows[0], "dtype": "float32", "device": "cpu (x86_64, 2 cores)"}]
    note = summary.target_table(cpu)
    assert "not measured" not in note and "|" not in note
    assert "cpu (x86_64, 2 cores); float32" in note and "bfloat16 on a GPU" in note


def test_the_cpu_suite_starts_with_its_quick_cases():
    """The default suite without CUDA prints rows at once: the 4096x4096 Linear, minutes per
    density on a CPU, comes last."""
    cases = kernels.SUITES["cpu"]
    flops = [c.flops() for c in cases]
    assert cases[-1].name == "linear-4096x4096-b256" and flops[-1] == max(flops)
    assert cases[0].name.startswith("lenet5-")
