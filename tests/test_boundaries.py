"""Boundaries and formulas that a small planted bug could move without the other tests
noticing: each test pins a value at the edge (``<=`` against ``<``), a constant (1e9 against
2**30) or a column's exact formula."""

import math

import pytest
import torch
from test_federated import small_config, synthetic

from spafl.federated import Simulator, accounting, rules, training
from spafl.federated.engine import RoundTally
from spafl.federated.methods import make_method
from spafl.federated.methods import spafl as spafl_method
from spafl.federated.models import build_model
from spafl.federated.rules import UpdateBounds, UpdateRejected


def test_paper_gbit_total_for_lenet5_is_0_1856():
    """spafl-algorithm.md section 5: LeNet-5 (580 thresholds), K = 10, 500 rounds -> 0.1856 Gbit,
    through the round's own column (decimal gigabits: 2**30 would give 0.1729)."""
    config = small_config(model="lenet5", dataset="fmnist", num_clients=100, clients_per_round=10, rounds=500)
    method = make_method(config)
    model = method.prepare_model(build_model("lenet5", 10))
    server = method.init_server(model)
    message = method.broadcast(server)
    totals = {"comm_bits_paper": 0.0, "bytes": 0, "wall_s": 0.0}
    flops = torch.zeros(config.num_clients).numpy()
    for t in range(500):
        row = RoundTally(method, server, list(range(10))).columns(config, t, message, 0, totals, flops, {}, {})
    assert row["comm_bits_paper"] == 2 * 10 * 580 * 32
    assert row["comm_gbit_paper_total"] == pytest.approx(0.1856, rel=1e-12)
    assert accounting.gbit(185_600_000) == pytest.approx(0.1856, rel=1e-15)


def test_the_guard_fires_again_at_exactly_the_collapse_density():
    """``_guard_would_fire``: a layer at or below the guard's density makes an untrained client
    be evaluated again (the layer's guard fires at ``<=``)."""
    cfg = small_config(rounds=1, collapse_density=0.25, collapse_timing="previous", collapse_in_eval=True)
    sim = Simulator(cfg, dataset=synthetic(n_train=200, n_test=40))
    layers = sim.layer_names
    for density, fires in [(0.25, True), (0.2499, True), (math.nextafter(0.25, 1.0), False), (0.9, False)]:
        sim.eval_cache[0] = {**sim.eval_cache[0], "layers": {**{n: 1.0 for n in layers}, layers[-1]: density}}
        assert sim._guard_would_fire(0) is fires, density
    sim.eval_cache[0] = None
    assert sim._guard_would_fire(0)  # never evaluated: evaluate it


def test_an_update_exactly_at_its_bound_is_accepted_and_one_ulp_beyond_is_not():
    ref = torch.zeros(3, dtype=torch.float64)
    limit = 1.0
    edge = 1.0 + 1e-5 * (1.0 + 0.0)  # the limit plus the float32 slack at |reference| 0
    bounds = UpdateBounds(max_change=limit)
    rules.check_bounds("w", torch.tensor([edge, -edge, 0.0], dtype=torch.float64), ref, bounds)
    with pytest.raises(UpdateRejected, match="further from the global value"):
        rules.check_bounds("w", torch.tensor([math.nextafter(edge, 2.0), 0.0, 0.0], dtype=torch.float64), ref,
                           bounds)
    floor = UpdateBounds(floor=-2.0)
    rules.check_bounds("w", torch.tensor([-2.0, 0.0, 5.0], dtype=torch.float64), ref, floor)
    with pytest.raises(UpdateRejected, match="below the floor"):
        rules.check_bounds("w", torch.tensor([math.nextafter(-2.0, -3.0), 0.0, 0.0], dtype=torch.float64), ref,
                           floor)


def test_a_sample_count_equal_to_what_the_client_holds_is_accepted_one_more_is_not():
    assert rules.check_sample_count(37, known=37) == 37
    assert rules.check_sample_count(1, known=37) == 1
    with pytest.raises(UpdateRejected, match="more than the 37"):
        rules.check_sample_count(38, known=37)


def test_threshold_floor_and_sgd_reach_values():
    cfg = small_config(th_coeff=0.002, grad_bound=50.0, momentum=0.5, weight_decay=0.0, lr=0.1, lr_decay=1.0,
                       batch_size=10, local_epochs=2, drop_last=False)
    assert rules.threshold_floor(cfg) == pytest.approx(-math.log(50.0 / 0.002), rel=1e-15)
    # 2 epochs x ceil(25 / 10) = 6 steps at lr 0.1, |g| <= 50, momentum 0.5: 6 * 0.1 * 50 / 0.5
    assert rules.local_steps(cfg, 25) == 6
    reach = rules.sgd_reach(cfg, 0, 25, torch.zeros(2), 50.0)
    assert torch.allclose(reach, torch.full((2,), 60.0))
    assert rules.threshold_floor(cfg.replace(th_coeff=0.0)) == -math.inf


def test_schedules_at_their_midpoints_and_ends():
    cfg = small_config(th_coeff=0.004, penalty_schedule="sigmoid", penalty_scheduler=10.0, rounds=10)
    assert training.penalty_coefficient(cfg, 5) == pytest.approx(0.002, rel=1e-12)  # sigmoid(0) = 1/2
    assert training.penalty_coefficient(cfg.replace(penalty_schedule="constant"), 3) == 0.004
    fed = small_config(lr=0.1, lr_final=0.001, rounds=10)
    assert training.learning_rate(fed, 0) == pytest.approx(0.1, rel=1e-12)
    assert training.learning_rate(fed, 10) == pytest.approx(0.001, rel=1e-12)
    assert training.learning_rate(fed, 5) == pytest.approx(0.01, rel=1e-12)
    assert training.learning_rate(small_config(lr=0.1, lr_decay=0.5), 3) == pytest.approx(0.0125, rel=1e-12)


def test_the_round_columns_follow_their_formulas():
    """flops_round, flops_total, bytes_down, nnz_down, bytes_total, from what the clients
    reported and what was sent, round by round."""
    cfg = small_config(num_clients=6, clients_per_round=3, rounds=3)
    reported: dict[int, list[float]] = {}

    def client(model, state, message, data, config, t, cid, macs, **kw):
        new_state, report = spafl_method.client_round(model, state, message, data, config, t, cid, macs, **kw)
        reported.setdefault(t, []).append(report.flops)
        return new_state, report

    sim = Simulator(cfg, dataset=synthetic(n_train=300, n_test=60), client_fn=client)
    total = 0.0
    bytes_total = 0
    for t in range(cfg.rounds):
        _, down = sim.engine.downlink()
        message = spafl_method.broadcast(sim.server, cfg.th_update)
        row = sim.run_round()
        total += sum(reported[t])
        assert row["flops_round"] == pytest.approx(sum(reported[t]) / cfg.num_clients, rel=1e-12)
        assert row["flops_total"] == pytest.approx(total / cfg.num_clients, rel=1e-12)
        assert row["bytes_down"] == len(down) * cfg.clients_per_round
        assert row["nnz_down"] == sum(int(torch.count_nonzero(v)) for v in message.values()) * cfg.clients_per_round
        bytes_total += row["bytes_down"] + row["bytes_up"]
        assert row["bytes_total"] == bytes_total
        assert row["lr"] == training.learning_rate(cfg, t)
        assert row["lambda"] == training.penalty_coefficient(cfg, t)


def test_a_round_number_counts_from_one_and_the_cohort_is_the_keyed_sample():
    from spafl.federated.keys import sample_clients

    cfg = small_config(num_clients=6, clients_per_round=3, rounds=2)
    sim = Simulator(cfg, dataset=synthetic(n_train=300, n_test=60))
    rows = sim.run()
    assert [r["round"] for r in rows] == [1, 2]
    assert [r["sampled"] for r in rows] == [" ".join(map(str, sample_clients(cfg.seed, t, 6, 3))) for t in range(2)]


def test_robust_aggregators_drop_exactly_floor_trim_times_n_and_take_the_middle():
    updates = [{"w": torch.tensor([v])} for v in (1.0, 2.0, 3.0, 10.0, 100.0)]
    trimmed = lambda f: float(rules.aggregate_tensors(updates, ["w"], "trimmed-mean", f)["w"])  # noqa: E731
    assert trimmed(0.3) == pytest.approx(5.0)  # floor(1.5) = 1 value dropped at each end: (2 + 3 + 10) / 3
    assert trimmed(0.4) == pytest.approx(3.0)  # floor(2.0) = 2
    assert trimmed(0.19) == pytest.approx(23.2)  # floor(0.95) = 0: the mean
    assert float(rules.aggregate_tensors(updates, ["w"], "median")["w"]) == 3.0
    assert float(rules.aggregate_tensors(updates[:4], ["w"], "median")["w"]) == 2.5  # the two middle values
    weighted = rules.aggregate_tensors(updates[:2], ["w"], "mean", weights=[3, 1])["w"]
    assert float(weighted) == pytest.approx(1.25)
