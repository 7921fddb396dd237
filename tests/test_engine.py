"""The simulator's engine: clients in parallel threads (same history for any worker count),
the optimiser's lifetime, the reference code's sequential RNG, the stuck-federation
diagnostics (threshold statistics, never-sampled clients, clients.npz), the collapse-guard
settings, round numbering and the checkpoint format."""

import csv
import json
import threading
import time
import warnings

import numpy as np
import pytest
import torch
from test_federated import small_config, strip_timing, synthetic

from spafl.federated import FederatedWarning, Simulator, build, keys, training
from spafl.federated.methods import spafl as spafl_method
from spafl.federated.models import build_model
from spafl.federated.runfolder import read_checkpoint
from spafl.federated.workers import check_workers


def run(cfg, data, workers=1, **kwargs):
    sim = Simulator(cfg, dataset=data, workers=workers, **kwargs)
    with sim, warnings.catch_warnings():
        warnings.simplefilter("ignore", FederatedWarning)
        sim.run()
    return sim


def same_states(a, b):
    assert len(a.client_states) == len(b.client_states)
    for x, y in zip(a.client_states, b.client_states, strict=True):
        assert (x is None) == (y is None)
        if x is not None:
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


# --- clients in parallel ---------------------------------------------------------------------


def test_two_workers_give_the_same_history_and_run_in_threads():
    data = synthetic(n_train=300, n_test=100)
    cfg = small_config(rounds=3, clients_per_round=4)
    threads = set()

    def spy(*args, **kwargs):
        threads.add(threading.current_thread().name)
        return spafl_method.client_round(*args, **kwargs)

    one, two = run(cfg, data, 1), run(cfg, data, 2, client_fn=spy)
    assert strip_timing(two.history) == strip_timing(one.history)
    same_states(one, two)
    assert all(torch.equal(one.server.thresholds[k], two.server.thresholds[k]) for k in one.server.thresholds)
    assert len(threads) == 2 and all(name.startswith("spafl-client") for name in threads)


def test_results_are_applied_in_cohort_order_whatever_finishes_first():
    data = synthetic(n_train=300, n_test=100)
    cfg = small_config(rounds=2, clients_per_round=4)
    finished = []

    def slow_first(model, state, message, data_, config, t, cid, macs):
        if cid == keys.sample_clients(config.seed, t, config.num_clients, config.clients_per_round)[0]:
            time.sleep(0.3)  # the cohort's first client finishes last
        result = spafl_method.client_round(model, state, message, data_, config, t, cid, macs)
        finished.append(cid)
        return result

    parallel = run(cfg, data, 2, client_fn=slow_first)
    first = keys.sample_clients(cfg.seed, 0, cfg.num_clients, cfg.clients_per_round)
    assert finished[:4] != first  # completion order differs from the cohort's...
    assert strip_timing(parallel.history) == strip_timing(run(cfg, data, 1).history)  # ...the history does not


def test_a_failing_client_is_dropped_with_any_worker_count():
    data = synthetic(n_train=300, n_test=100)
    cfg = small_config(rounds=2, clients_per_round=4)
    victim = keys.sample_clients(cfg.seed, 0, cfg.num_clients, cfg.clients_per_round)[1]

    def flaky(model, state, message, data_, config, t, cid, macs):
        if cid == victim and t == 0:
            raise RuntimeError("out of memory on the device")
        return spafl_method.client_round(model, state, message, data_, config, t, cid, macs)

    one, two = run(cfg, data, 1, client_fn=flaky), run(cfg, data, 2, client_fn=flaky)
    assert one.history[0]["dropped"] == 1 and "out of memory" in one.history[0]["errors"][0]
    assert strip_timing(two.history) == strip_timing(one.history)
    same_states(one, two)


@pytest.mark.parametrize("method", ["fedavg", "sparsyfed", "local"])
def test_baselines_give_the_same_history_with_two_workers(method):
    data = synthetic(n_train=300, n_test=100)
    cfg = small_config(method=method, rounds=2, clients_per_round=4, sparsity=0.5)
    one, two = run(cfg, data, 1), run(cfg, data, 2)
    assert strip_timing(two.history) == strip_timing(one.history)
    if method != "local":
        assert two.history[-1]["acc_mean"] == one.history[-1]["acc_mean"]


def test_resume_with_another_worker_count_continues_exactly(tmp_path):
    data = synthetic(n_train=300, n_test=100)
    cfg = small_config(rounds=4)
    full = run(cfg, data, 1)
    part = Simulator(cfg, dataset=data, out_dir=tmp_path, workers=1)
    part.run(2)
    resumed = Simulator.resume(tmp_path, dataset=data, workers=2)
    with resumed:
        resumed.run()
    assert strip_timing(resumed.history) == strip_timing(full.history)
    same_states(full, resumed)


def test_workers_are_checked():
    for bad in (0, -1, 1.5, "2", True):
        with pytest.raises(ValueError, match="workers must be a positive integer"):
            check_workers(bad, torch.device("cpu"))
    with pytest.raises(ValueError, match="CPU only"):
        check_workers(2, torch.device("cuda"))
    assert check_workers(1, torch.device("cuda")) == 1
    with pytest.raises(ValueError, match="workers"):
        Simulator(small_config(), dataset=synthetic(n_train=200, n_test=50), workers=0)


# --- the optimiser's lifetime ------------------------------------------------------------------


def _message(tau, delta):
    return {**{f"tau/{k}": v for k, v in tau.items()}, **{f"delta/{k}": v for k, v in delta.items()}}


def _two_rounds_by_hand(cfg, data, initial, messages, per_run: bool):
    """A client's two rounds written out: one SGD optimiser for both (per_run) or one each."""
    torch.manual_seed(0)
    model = build_model("digits-cnn", 10)
    model.load_state_dict(initial)
    opt = None
    for t, message in enumerate(messages):
        spafl_method.set_thresholds(model, {k[4:]: v for k, v in message.items() if k.startswith("tau/")})
        spafl_method.threshold_guided_update(model, {k[6:]: v for k, v in message.items() if k.startswith("delta/")})
        lr = training.learning_rate(cfg, t)
        if opt is None or not per_run:
            opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        for group in opt.param_groups:
            group["lr"] = lr
        g = torch.Generator().manual_seed(keys.derived_seed(cfg.seed, "train", t, 0))
        training.local_train(model, data, cfg, t, g, optimizer=opt)
    return model.state_dict(), opt


@pytest.mark.parametrize("lifetime", ["per-run", "per-round"])
def test_optimizer_lifetime_matches_a_hand_run(lifetime):
    data = synthetic(n_train=200, n_test=50)
    cfg = small_config(optimizer_lifetime=lifetime, lr_decay=0.5, weight_decay=1e-3)
    sim = Simulator(cfg, dataset=data)
    client = sim.clients[0]
    initial = sim.client_states[0]
    g = torch.Generator().manual_seed(5)
    messages = [_message({k: torch.rand(v.shape, generator=g) * 0.01 for k, v in sim.server.thresholds.items()},
                         {k: torch.randn(v.shape, generator=g) * 0.01 for k, v in sim.server.thresholds.items()})
                for _ in range(2)]
    state = initial
    for t, message in enumerate(messages):
        state, _ = spafl_method.client_round(sim.model, state, message, client, cfg, t, 0, sim.macs)
    expected, opt = _two_rounds_by_hand(cfg, client, initial, messages, per_run=lifetime == "per-run")
    momentum = training.momentum_entries(state)
    if lifetime == "per-run":
        params = dict(sim.model.named_parameters())
        assert set(momentum) == set(params)
        named = dict(zip(params, [p for group in opt.param_groups for p in group["params"]], strict=True))
        for name, buffer in momentum.items():
            assert torch.equal(buffer, opt.state[named[name]]["momentum_buffer"]), name
    else:
        assert momentum == {}
    model_state = training.model_entries(state)
    assert model_state.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(model_state[k], v), k
    # and the lifetime matters: the other one ends elsewhere
    other, _ = _two_rounds_by_hand(cfg, client, initial, messages, per_run=lifetime != "per-run")
    assert not torch.equal(other["conv1.weight"], expected["conv1.weight"])


def test_per_run_momentum_is_checkpointed_and_resumed_exactly(tmp_path):
    data = synthetic(n_train=300, n_test=100)
    cfg = small_config(rounds=4, optimizer_lifetime="per-run")
    full = run(cfg, data)
    trained = {int(c) for r in full.history for c in r["sampled"].split()}
    for cid, state in enumerate(full.client_states):
        assert bool(training.momentum_entries(state)) == (cid in trained)
    part = Simulator(cfg, dataset=data, out_dir=tmp_path)
    part.run(2)
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)  # plain tensors only
    assert any(k.startswith("momentum/") for s in saved["client_states"] for k in s)
    resumed = Simulator.resume(tmp_path, dataset=data)
    resumed.run()
    assert strip_timing(resumed.history) == strip_timing(full.history)
    same_states(full, resumed)
    assert strip_timing(full.history) != strip_timing(run(cfg.replace(optimizer_lifetime="per-round"), data).history)


def test_per_run_for_a_global_method_keeps_only_the_momentum():
    data = synthetic(n_train=300, n_test=100)
    cfg = small_config(method="fedavg", rounds=3, optimizer_lifetime="per-run")
    sim = run(cfg, data, 2)
    kept = [s for s in sim.client_states if s is not None]
    assert kept and all(all(k.startswith("momentum/") for k in s) for s in kept)
    assert strip_timing(sim.history) == strip_timing(run(cfg, data, 1).history)
    assert strip_timing(sim.history) != strip_timing(run(cfg.replace(optimizer_lifetime="per-round"), data).history)


def test_momentum_buffers_are_checked():
    model = build_model("digits-cnn", 10)
    cfg = small_config()
    with pytest.raises(ValueError, match="parameters the model does not have"):
        training.sgd(model, cfg, 0, {"fc9.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match="momentum buffer of fc4.threshold: shape"):
        training.sgd(model, cfg, 0, {"fc4.threshold": torch.zeros(3)})
    with pytest.raises(ValueError, match="optimizer_lifetime"):
        small_config(optimizer_lifetime="forever")


def test_presets_follow_the_reference_scripts():
    from spafl.federated.config import PRESETS, build_config

    assert build_config("fmnist-lenet5").optimizer_lifetime == "per-run"
    for name in ("digits-cnn", "cifar10-conv4", "cifar10-vit", "cifar100-resnet18"):
        assert build_config(name).optimizer_lifetime == "per-round", name
    assert all(build_config(name).rng == "keyed" for name in PRESETS)
    # The reference layers test the density of their previous forward (in training and evaluation;
    # evaluation is left to --collapse-in-eval, so that inference changes nothing by default).
    for name in ("fmnist-lenet5", "cifar10-conv4", "cifar10-vit", "cifar100-resnet18"):
        assert build_config(name).collapse_timing == "previous", name
    assert build_config("digits-cnn").collapse_timing == "current"
    assert not any(build_config(name).collapse_in_eval for name in PRESETS)


@pytest.mark.parametrize("backend", ["auto", "compact", "reference"])
def test_backends_reach_the_model(backend):
    cfg = small_config(backend=backend)
    sim = Simulator(cfg, dataset=synthetic(n_train=200, n_test=50))
    assert {m.backend for m in sim.model.modules() if hasattr(m, "threshold")} == {backend}
    with pytest.raises(ValueError, match="backend must be one of"):
        small_config(backend="cuda")


# --- the reference code's sequential RNG --------------------------------------------------------


def test_global_rng_draws_like_the_reference_code():
    data = synthetic(n_train=300, n_test=100)
    cfg = small_config(rounds=3, rng="global", local_epochs=2)
    seen = []

    def spy(*args, train_seeds=None):
        seen.append((args[6], train_seeds))
        return spafl_method.client_round(*args, train_seeds=train_seeds)

    sim = run(cfg, data, client_fn=spy)
    np.random.seed(cfg.seed)  # the reference server: np.random.choice(N, K, replace=False) every round
    cohorts = [[int(i) for i in np.random.choice(cfg.num_clients, cfg.clients_per_round, replace=False)]
               for _ in range(cfg.rounds)]
    assert [r["sampled"] for r in sim.history] == [" ".join(map(str, c)) for c in cohorts]
    assert any(c != sorted(c) for c in cohorts)  # in the order drawn
    g = torch.Generator().manual_seed(cfg.seed)  # one stream; each client's epochs in cohort order
    expected = [(cid, [int(torch.empty((), dtype=torch.int64).random_(generator=g)) for _ in range(2)])
                for cohort in cohorts for cid in cohort]
    assert seen == expected
    assert strip_timing(sim.history) != strip_timing(run(cfg.replace(rng="keyed"), data).history)


def test_global_rng_is_the_same_with_workers_and_resumes_exactly(tmp_path):
    data = synthetic(n_train=300, n_test=100)
    cfg = small_config(rounds=4, rng="global")
    full = run(cfg, data)
    assert strip_timing(run(cfg, data, 2).history) == strip_timing(full.history)
    part = Simulator(cfg, dataset=data, out_dir=tmp_path)
    part.run(2)
    resumed = Simulator.resume(tmp_path, dataset=data, workers=2)
    with resumed:
        resumed.run()
    assert strip_timing(resumed.history) == strip_timing(full.history)
    same_states(full, resumed)


def test_sequential_streams_state_round_trip():
    a = keys.SequentialStreams(3)
    a.sample(10, 4)
    a.epoch_seeds(2)
    b = keys.SequentialStreams(99)
    b.load_state_dict(torch.load(_saved(a.state_dict()), weights_only=True))
    assert a.sample(10, 4) == b.sample(10, 4) and a.epoch_seeds(3) == b.epoch_seeds(3)


def _saved(obj):
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


# --- diagnostics of a stuck federation ----------------------------------------------------------


def test_threshold_statistics_and_never_sampled_in_the_history(tmp_path):
    data = synthetic(n_train=300, n_test=100)
    cfg = small_config(rounds=3, num_clients=12, clients_per_round=2, th_coeff=0.05)
    sim = Simulator(cfg, dataset=data, out_dir=tmp_path)
    thresholds = []
    for _ in range(cfg.rounds):
        sim.run_round()
        thresholds.append({k: v.double().numpy() for k, v in sim.server.thresholds.items()})
    sim.write_history()
    seen = set()
    for t, (row, tau) in enumerate(zip(sim.history, thresholds, strict=True)):
        seen |= set(keys.sample_clients(cfg.seed, t, cfg.num_clients, cfg.clients_per_round))
        assert row["never_sampled"] == cfg.num_clients - len(seen)
        assert set(row["tau"]) == set(sim.layer_names)
        for name, values in tau.items():
            stats = row["tau"][name]
            assert stats["mean"] == pytest.approx(values.mean(), abs=1e-12)
            assert stats["std"] == pytest.approx(values.std(), abs=1e-12)
            assert (stats["min"], stats["max"]) == (pytest.approx(values.min()), pytest.approx(values.max()))
    assert sim.history[-1]["tau"]["fc3"]["max"] > 0  # the penalty moved the thresholds
    rows = list(csv.DictReader((tmp_path / "history.csv").open()))
    for row, ref in zip(rows, sim.history, strict=True):
        assert float(row["tau:fc3:mean"]) == ref["tau"]["fc3"]["mean"]
        assert float(row["tau:conv1:std"]) == ref["tau"]["conv1"]["std"]
        assert int(row["never_sampled"]) == ref["never_sampled"]
    assert "tau" not in rows[0]
    saved = json.loads((tmp_path / "history.json").read_text())
    assert saved["history"][-1]["tau"] == sim.history[-1]["tau"] and saved["history_format"] == 2


def test_baselines_have_no_thresholds_but_count_never_sampled():
    sim = run(small_config(method="fedavg", rounds=2), synthetic(n_train=200, n_test=50))
    assert "tau" not in sim.history[-1] and sim.history[-1]["never_sampled"] >= 8 - 6


def test_clients_file_holds_every_client_every_round_and_survives_resume(tmp_path):
    data = synthetic(n_train=300, n_test=100)
    cfg = small_config(rounds=3, clients_per_round=3)
    full = Simulator(cfg, dataset=data, out_dir=tmp_path / "full")
    evaluations = []
    for _ in range(cfg.rounds):
        full.run_round()
        evaluations.append([dict(e) for e in full.eval_cache])
    full.write_history()
    with np.load(tmp_path / "full" / "clients.npz") as f:
        files = {k: f[k] for k in f.files}
    n = cfg.num_clients
    assert files["rounds"].tolist() == [1, 2, 3]
    assert files["acc"].shape == files["loss"].shape == files["train_loss"].shape == (3, n)
    assert files["acc"].dtype == np.float32 and files["sampled"].dtype == np.bool_
    for t, evals in enumerate(evaluations):
        assert np.array_equal(files["acc"][t], np.array([e["acc"] for e in evals], dtype=np.float32))
        assert np.array_equal(files["density"][t], np.array([e["density"] for e in evals], dtype=np.float32))
        cohort = keys.sample_clients(cfg.seed, t, n, cfg.clients_per_round)
        assert np.flatnonzero(files["sampled"][t]).tolist() == cohort
        trained = np.isfinite(files["train_loss"][t])
        assert np.flatnonzero(trained).tolist() == cohort
    assert np.nanmean(files["train_loss"][0]) == pytest.approx(full.history[0]["train_loss"], rel=1e-6)

    part = Simulator(cfg, dataset=data, out_dir=tmp_path / "part")
    part.run(2)
    resumed = Simulator.resume(tmp_path / "part", dataset=data)
    resumed.run()
    with np.load(tmp_path / "part" / "clients.npz") as f:
        for k, v in files.items():
            assert np.array_equal(f[k], v, equal_nan=v.dtype.kind == "f"), k


def test_plots_of_the_diagnostics(tmp_path):
    pytest.importorskip("matplotlib")
    from spafl.federated.plots import client_accuracy_figure, client_percentiles, plot_run, threshold_figure

    sim = run(small_config(rounds=3), synthetic(n_train=200, n_test=50), out_dir=tmp_path)
    paths = {p.name for p in plot_run(tmp_path)}
    assert {"clients.png", "thresholds.png", "accuracy.png", "masks.png"} <= paths
    acc = np.array([[10.0, 50.0, np.nan, 90.0], [20.0, 40.0, 60.0, 80.0]])
    bands = client_percentiles(acc)
    assert bands[0].tolist() == [10.0, 20.0] and bands[100].tolist() == [90.0, 80.0]
    assert bands[50].tolist() == [50.0, 50.0]  # the client without test data (NaN) left out
    fig = client_accuracy_figure(np.array([1, 2]), acc)
    top, stuck = fig.axes
    assert top.get_ylim() == (0.0, 100.0)
    assert stuck.lines[0].get_ydata().tolist() == [1, 0]  # clients below 20% each round
    assert all(float(t).is_integer() for t in stuck.get_xticks())
    rounds = np.array([r["round"] for r in sim.history])
    fig = threshold_figure(rounds, sim.history)
    assert len(fig.axes) == len(sim.layer_names)
    mean_line = fig.axes[2].lines[0]
    assert mean_line.get_xdata().tolist() == [1, 2, 3]
    assert mean_line.get_ydata().tolist() == [r["tau"]["fc3"]["mean"] for r in sim.history]
    import matplotlib.pyplot as plt

    plt.close("all")


# --- collapse-guard settings --------------------------------------------------------------------


def test_collapse_settings_reach_the_layers(monkeypatch):
    seen = []

    def capture(name, classes, **kwargs):
        seen.append(kwargs)
        return build_model(name, classes)

    monkeypatch.setattr(build, "build_model", capture)
    method = Simulator(small_config(rounds=1), dataset=synthetic(n_train=200, n_test=50)).method
    build.initial_model(small_config(), method, 10, torch.device("cpu"))
    build.initial_model(small_config(collapse_timing="previous", collapse_in_eval=True), method, 10,
                         torch.device("cpu"))
    assert seen[-2]["collapse_timing"] == "current" and seen[-2]["collapse_in_eval"] is False
    assert seen[-1]["collapse_timing"] == "previous" and seen[-1]["collapse_in_eval"] is True
    assert seen[-1]["collapse_density"] == 0.01
    monkeypatch.undo()
    model = build.initial_model(small_config(collapse_timing="previous", collapse_in_eval=True), method, 10,
                                 torch.device("cpu"))
    layers = [m for m in model.modules() if hasattr(m, "threshold")]
    assert len(layers) == 4
    assert all(layer.collapse_timing == "previous" and layer.collapse_in_eval for layer in layers)
    for changes, text in (({"collapse_timing": "next"}, "collapse_timing"),
                          ({"collapse_in_eval": 1}, "collapse_in_eval"), ({"rng": "numpy"}, "rng must be")):
        with pytest.raises(ValueError, match=text):
            small_config(**changes)


def _collapse(sim, cid):
    """Give client ``cid`` a collapsed first layer: every filter pruned, as its last forward saw it."""
    state = dict(sim.client_states[cid])
    state["conv1.threshold"] = torch.full_like(state["conv1.threshold"], 1e3)
    state["conv1.previous_density"] = torch.zeros_like(state["conv1.previous_density"])
    sim.client_states[cid] = state
    sim._refresh([cid] if not sim.config.collapse_in_eval else [])
    if sim.config.collapse_in_eval:  # its last evaluation saw the collapse (the guard reset it then)
        sim.client_states[cid] = state
        sim.eval_cache[cid] = {**sim.eval_cache[cid], "layers": {**sim.eval_cache[cid]["layers"], "conv1": 0.0}}


@pytest.mark.parametrize("timing", ["previous", "current"])
def test_a_reset_during_evaluation_persists_and_matches_evaluating_every_client(monkeypatch, timing):
    """The real guard with ``collapse_in_eval``: a client that is not sampled but whose last
    evaluation left a layer collapsed is evaluated again, the guard resets it there and the reset
    stays in its state. Evaluating only such clients (besides the trained ones) gives exactly what
    evaluating every client every round, as the reference loop does, gives."""
    data = synthetic(n_train=300, n_test=100)
    cfg = small_config(rounds=3, clients_per_round=2, collapse_in_eval=True, collapse_timing=timing,
                       optimizer_lifetime="per-run")
    sampled = [set(keys.sample_clients(cfg.seed, t, cfg.num_clients, cfg.clients_per_round)) for t in (1, 2)]
    victim = next(i for i in range(cfg.num_clients) if i not in sampled[0] | sampled[1])
    sims, evaluated = [], []
    for every_client in (False, True):
        if every_client:
            monkeypatch.setattr(Simulator, "_guard_would_fire", lambda self, i: True)
        sim = Simulator(cfg, dataset=data, model_fn=lambda: build_model("digits-cnn", 10, collapse_timing=timing,
                                                                         collapse_in_eval=True))
        with sim, warnings.catch_warnings():
            warnings.simplefilter("ignore", FederatedWarning)
            sim.run_round()
            _collapse(sim, victim)
            before = sim.client_states[victim]
            calls = []
            real = sim._evaluate_on

            def counted(slot, i, server, calls=calls, real=real):
                calls.append(i)
                return real(slot, i, server)

            monkeypatch.setattr(sim, "_evaluate_on", counted)
            sim.run_round()
            sim.run_round()
        evaluated.append(calls)
        state = sim.client_states[victim]
        assert int(state["conv1.collapse_resets"]) == int(before["conv1.collapse_resets"]) + 1
        assert torch.equal(state["conv1.threshold"], torch.zeros_like(state["conv1.threshold"]))
        assert sim.eval_cache[victim]["layers"]["conv1"] > 0.01
        sims.append(sim)
    assert evaluated[0].count(victim) == 1  # once, in the round after the collapse; then it is healthy
    assert len(evaluated[1]) == 2 * cfg.num_clients
    assert strip_timing(sims[0].history) == strip_timing(sims[1].history)
    same_states(*sims)


def test_without_collapse_in_eval_evaluation_changes_nothing():
    data = synthetic(n_train=300, n_test=100)
    cfg = small_config(rounds=2, clients_per_round=2, collapse_timing="previous", optimizer_lifetime="per-run")
    sim = Simulator(cfg, dataset=data, model_fn=lambda: build_model("digits-cnn", 10, collapse_timing="previous"))
    with sim:
        sim.run_round()
        states = [dict(s) for s in sim.client_states]
        sim._refresh(range(cfg.num_clients))
    for a, b in zip(states, sim.client_states, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- round numbering, checkpoint format ---------------------------------------------------------


def test_rounds_count_from_one_everywhere(tmp_path, capsys):
    sim = Simulator(small_config(rounds=3), dataset=synthetic(n_train=200, n_test=50), out_dir=tmp_path,
                    progress=True)
    sim.run()
    assert [r["round"] for r in sim.history] == [1, 2, 3]
    assert sim.summary()["best_round"] in (1, 2, 3) and sim.round == 3
    err = capsys.readouterr().err
    assert "round 1/3" in err and "round 3/3" in err and "round 0/" not in err
    assert np.load(tmp_path / "masks.npz")["rounds"].tolist() == [1, 2, 3]
    assert [int(r["round"]) for r in csv.DictReader((tmp_path / "history.csv").open())] == [1, 2, 3]


def test_checkpoints_load_with_weights_only_and_old_ones_are_refused(tmp_path):
    sim = run(small_config(rounds=1), synthetic(n_train=200, n_test=50), out_dir=tmp_path)
    ckpt = read_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["version"] == 2 and ckpt["client_flops"].dtype == torch.float64
    assert torch.equal(ckpt["client_flops"], torch.from_numpy(sim.client_flops))
    old = dict(ckpt, client_flops=sim.client_flops, version=1)  # a numpy array: not a plain tensor
    torch.save(old, tmp_path / "old.pt")
    with pytest.raises(ValueError, match="not a checkpoint this spafl can read"):
        read_checkpoint(tmp_path / "old.pt")
    torch.save(dict(ckpt, version=1), tmp_path / "v1.pt")
    with pytest.raises(ValueError, match="checkpoint version 1; this spafl reads 2"):
        Simulator.resume(tmp_path / "v1.pt", dataset=synthetic(n_train=200, n_test=50))
    with pytest.raises(FileNotFoundError):
        read_checkpoint(tmp_path / "missing.pt")


def test_accuracy_band_stays_in_range_and_ticks_are_integers(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from spafl.federated import plots

    run(small_config(rounds=3), synthetic(n_train=200, n_test=50), out_dir=tmp_path)
    meta = json.loads((tmp_path / "history.json").read_text())
    for row in meta["history"]:  # a spread wider than the range: the band must stay inside it
        row["acc_mean"], row["acc_std"] = 20.0, 30.0
    (tmp_path / "history.json").write_text(json.dumps(meta))
    figures = {}

    def keep(fig, path):
        figures[path.name] = fig
        return path

    monkeypatch.setattr(plots, "_save", keep)
    plots.plot_run(tmp_path)
    ax = figures["accuracy.png"].axes[0]
    assert ax.get_ylim() == (0.0, 100.0)
    band = ax.collections[0].get_paths()[0].vertices[:, 1]
    assert band.min() == 0.0 and band.max() == 50.0
    for ax in figures["masks.png"].axes:
        ax.figure.canvas.draw()
        assert all(float(t).is_integer() for t in ax.get_yticks()), ax.get_yticks()
        assert all(float(t).is_integer() for t in ax.get_xticks()), ax.get_xticks()


def test_a_model_of_ones_own_runs_with_the_default_preset():
    """The default preset names mask_layer fc3 (a layer of its digits CNN); a model built by
    model_fn need not have it: the masks of its first threshold layer are recorded, with a
    warning saying how to choose. A built-in model with a wrong mask_layer is still an error."""
    from torch import nn

    import spafl
    from spafl.federated import DEFAULT_PRESET, build_config

    def my_model():
        return spafl.sparsify(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10)))

    config = build_config(DEFAULT_PRESET, None, {"rounds": 1, "device": "cpu"})
    assert config.mask_layer == "fc3"
    with pytest.warns(FederatedWarning, match=r"mask_layer 'fc3' is not a threshold layer.*recording the masks of '0'"):
        sim = Simulator(config, model_fn=my_model)
    assert sim.mask_layer == "0"
    row = sim.run()[0]
    assert row["participants"] == config.clients_per_round
    assert sim.mask_history[0].shape == (config.num_clients, 4)


def test_clients_that_never_trained_are_stored_once_in_a_checkpoint(tmp_path):
    cfg = small_config(num_clients=8, clients_per_round=2, rounds=1, checkpoint_every=1)
    data = synthetic(n_train=300, n_test=60)
    sim = Simulator(cfg, dataset=data, out_dir=tmp_path)
    sim.run()
    ckpt = read_checkpoint(tmp_path / "checkpoint.pt")
    trained = {int(c) for c in sim.history[0]["sampled"].split()}
    assert ckpt["untrained"] == [i for i in range(8) if i not in trained]
    assert all((s is None) == (i not in trained) for i, s in enumerate(ckpt["client_states"]))
    assert set(ckpt["initial_state"]) == set(sim.model.state_dict())
    resumed = Simulator.resume(tmp_path, cfg.replace(rounds=3), dataset=data)
    assert all(resumed.client_states[i] is resumed._initial_state for i in ckpt["untrained"])
    resumed.run()
    straight = Simulator(cfg.replace(rounds=3), dataset=data)
    straight.run()
    assert [{k: v for k, v in r.items() if k not in ("wall_s", "train_s", "eval_s")} for r in resumed.history] == \
        [{k: v for k, v in r.items() if k not in ("wall_s", "train_s", "eval_s")} for r in straight.history]
