"""Hostile input at the server and in the data files: the checks that keep one bad client or
one bad file from stopping a run or running code, each with the reproduction it answers."""

import gzip
import json
import math
import os
import pickle
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from test_federated import small_config, synthetic

from spafl.federated import FedConfig, FederatedWarning, Simulator, accounting, keys, rules, wire
from spafl.federated.data import client_data, split_for_run
from spafl.federated.datafiles import read_cifar10, read_fashion_mnist
from spafl.federated.methods import make_method, weighted_mean
from spafl.federated.methods import spafl as spafl_method
from spafl.federated.models import build_model
from spafl.federated.rules import AggregateWarning, UpdateBounds, UpdateRejected

# --- data files -----------------------------------------------------------------------------


def _idx_bytes(array: np.ndarray, magic: int) -> bytes:
    return struct.pack(">i", magic) + struct.pack(f">{array.ndim}i", *array.shape) + array.astype(np.uint8).tobytes()


def _fmnist(root: Path, compress: bool = True) -> Path:
    """A tiny Fashion-MNIST in torchvision's layout; returns its raw folder."""
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    files = {"train-images-idx3-ubyte": (rng.integers(0, 256, (7, 28, 28)), 2051),
             "train-labels-idx1-ubyte": (rng.integers(0, 10, 7), 2049),
             "t10k-images-idx3-ubyte": (rng.integers(0, 256, (3, 28, 28)), 2051),
             "t10k-labels-idx1-ubyte": (rng.integers(0, 10, 3), 2049)}
    for name, (array, magic) in files.items():
        data = _idx_bytes(array, magic)
        if compress:
            (raw / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (raw / name).write_bytes(data)
    return raw


def test_corrupt_idx_files_name_the_file_and_the_problem(tmp_path):
    raw = _fmnist(tmp_path)
    read_fashion_mnist(tmp_path)  # the intact set reads
    target = raw / "train-images-idx3-ubyte.gz"
    good = target.read_bytes()
    payload = gzip.decompress(good)
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x10  # inside the deflate stream: the CRC (or the stream) no longer checks out
    cases = [
        (good[: len(good) // 2], r"not a readable gzip file \(EOFError"),  # truncated download
        (bytes(flipped), "not a readable gzip file"),
        (b"plain bytes, not gzip", r"not a readable gzip file \(BadGzipFile"),
        (gzip.compress(payload[:10]), r"IDX header truncated: 10 bytes, the header alone needs 16"),
        (gzip.compress(payload[:3]), "too short for an IDX header"),
        (gzip.compress(struct.pack(">i", 2049) + payload[4:]), "IDX magic 2049, expected 2051"),
        (gzip.compress(payload[:-5]), r"header says \(7, 28, 28\) \(5488 bytes\) but the file holds 5483"),
        (gzip.compress(payload + b"x"), r"header says \(7, 28, 28\) \(5488 bytes\) but the file holds more after it"),
        (gzip.compress(payload[:4] + struct.pack(">i", -7) + payload[8:]), "negative dimension"),
    ]
    for data, match in cases:
        target.write_bytes(data)
        with pytest.raises(ValueError, match=match) as info:
            read_fashion_mnist(tmp_path)
        assert str(target) in str(info.value), info.value


def test_corrupt_plain_idx_file(tmp_path):
    raw = _fmnist(tmp_path, compress=False)
    target = raw / "t10k-labels-idx1-ubyte"
    target.write_bytes(target.read_bytes()[:6])
    with pytest.raises(ValueError, match=f"{target}: IDX header truncated"):
        read_fashion_mnist(tmp_path)


class _Payload:
    """Pickles to a call of os.system: what a crafted dataset file would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _cifar10(root: Path) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (2, 3072)).astype(np.uint8), b"labels": [1, 2]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    return folder


def test_crafted_cifar_pickle_runs_no_code(tmp_path):
    folder = _cifar10(tmp_path)
    assert read_cifar10(tmp_path).train_x.shape == (10, 3, 32, 32)
    marker = tmp_path / "pwned"
    target = folder / "data_batch_3"
    target.write_bytes(pickle.dumps({b"data": _Payload(marker), b"labels": [0]}))
    with pytest.raises(ValueError, match=f"{target}: not a readable CIFAR batch.*refusing (posix|os|nt).system"):
        read_cifar10(tmp_path)
    assert not marker.exists()
    for data, match in [(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}), "2 images need 2"),
                        (pickle.dumps({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}), "uint8 rows"),
                        (pickle.dumps([1, 2]), "must be a dict"),
                        (pickle.dumps({b"data": 1})[:-3], "not a readable CIFAR batch")]:
        target.write_bytes(data)
        with pytest.raises(ValueError, match=match) as info:
            read_cifar10(tmp_path)
        assert str(target) in str(info.value)


# --- what the server accepts: the update bounds ------------------------------------------------


def test_threshold_bound_rule_by_hand():
    cfg = small_config(local_epochs=2, batch_size=16, lr=0.05, momentum=0.9, th_coeff=0.002, clip=None,
                       grad_bound=40.0)
    state = spafl_method.ServerState({"l": torch.tensor([0.5, -0.25])}, {"l": torch.zeros(2)}, round=3)
    bounds = spafl_method.threshold_bounds(cfg, state, num_samples=70)["l"]
    steps = 2 * math.ceil(70 / 16)  # 10 SGD steps
    d = steps * 0.05 * (2 * 40.0) / (1 - 0.9)  # task-loss gradient and penalty gradient, each <= G
    torch.testing.assert_close(torch.as_tensor(bounds.max_change), torch.full((2,), d))
    assert bounds.floor == pytest.approx(-math.log(40.0 / 0.002))
    assert bounds.reset_ok and "10 SGD steps" in bounds.rule
    # with clipping the clip norm bounds the whole gradient, penalty included
    clipped = spafl_method.threshold_bounds(cfg.replace(clip=3.0), state, 70)["l"]
    torch.testing.assert_close(torch.as_tensor(clipped.max_change), torch.full((2,), steps * 0.05 * 3.0 / 0.1))
    assert clipped.floor == pytest.approx(-math.log(3.0 / 0.002))
    # weight decay: |v| <= (G + wd (|start| + D)) / (1 - mu), solved for D
    wd = rules.sgd_reach(cfg.replace(weight_decay=0.01), 3, 70, torch.tensor([0.0, 2.0]), 40.0)
    s_lr = steps * 0.05
    torch.testing.assert_close(wd, torch.tensor([s_lr * 40 / (0.1 - s_lr * 0.01),
                                                 s_lr * (40 + 0.01 * 2) / (0.1 - s_lr * 0.01)]))
    assert torch.isinf(rules.sgd_reach(cfg.replace(weight_decay=1.0), 3, 70, torch.zeros(1), 40.0)).all()
    # no penalty: no floor; the default bound without clipping
    assert rules.threshold_floor(cfg.replace(th_coeff=0.0)) == -math.inf
    assert rules.gradient_bound(cfg.replace(grad_bound=None)) == rules.DEFAULT_GRAD_BOUND


def test_check_bounds_allowances():
    ref = torch.tensor([1.0, 1.0, 1.0])
    rules.check_bounds("w", torch.tensor([1.5, 0.5, 1.0]), ref, UpdateBounds(0.5))
    message = r"w: 1 value\(s\) further .*bound 0.5\); first at \[2\]: 1.6 \(rule: why\)"
    with pytest.raises(UpdateRejected, match=message):
        rules.check_bounds("w", torch.tensor([1.5, 0.5, 1.6]), ref, UpdateBounds(0.5, rule="why"))
    rules.check_bounds("w", torch.tensor([0.0, 1.2, 1.0]), ref, UpdateBounds(0.5, zero_ok=True))  # pruned
    with pytest.raises(UpdateRejected, match="further"):
        rules.check_bounds("w", torch.tensor([0.0, 1.2, 1.0]), ref, UpdateBounds(0.5))
    rules.check_bounds("t", torch.tensor([-0.3, 1.2, 1.0]), ref, UpdateBounds(0.5, reset_ok=True))  # reset to 0
    with pytest.raises(UpdateRejected, match="below the floor -2"):
        rules.check_bounds("t", torch.tensor([-3.0, 1.0, 1.0]), ref, UpdateBounds(10.0, floor=-2.0))
    per_unit = UpdateBounds(torch.tensor([0.1, 1.0, 0.0]))
    rules.check_bounds("w", torch.tensor([1.1, 2.0, 1.0]), ref, per_unit)
    with pytest.raises(UpdateRejected, match=r"first at \[2\]"):
        rules.check_bounds("w", torch.tensor([1.1, 2.0, 1.01]), ref, per_unit)


def _spafl_round(cfg, data, round_index=0):
    """The server state of a fresh SpaFL run and the honest updates of the clients of ``round_index``."""
    method = make_method(cfg)
    torch.manual_seed(0)
    model = method.prepare_model(build_model(cfg.model, 10))
    server = method.init_server(model)
    train, test = split_for_run(data, cfg.num_clients, cfg.alpha, 1, cfg.seed)
    clients = client_data(data, train, test, cfg.normalize, False, torch.device("cpu"))
    macs = accounting.layer_macs(model, (1, 8, 8), torch.device("cpu"))
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    message = wire.decode(wire.encode(method.broadcast(server)))
    ups = []
    for cid in keys.sample_clients(cfg.seed, round_index, cfg.num_clients, cfg.clients_per_round):
        _, report = method.client_round(model, initial, message, clients[cid], cfg, round_index, cid, macs)
        ups.append(report)
    return method, server, ups


def test_absurd_threshold_updates_are_rejected_and_honest_ones_pass():
    cfg = small_config(num_clients=6, clients_per_round=3)
    method, server, reports = _spafl_round(cfg, synthetic(n_train=300, n_test=60))
    for r in reports:
        method.validate_update(r.update, server, r.num_samples)  # honest: accepted
        method.validate_update(r.update, server)  # and with the dataset's bound on the count
    honest = reports[0].update
    layer = next(iter(honest))
    attacks = {
        "-1e30 everywhere": ({k: torch.full_like(v, -1e30) for k, v in honest.items()}, "below the floor"),
        "3.4e38 everywhere": ({k: torch.full_like(v, 3.4e38) for k, v in honest.items()}, "further from the global"),
        "1e30 in one unit": ({**honest, layer: honest[layer].clone().index_fill_(0, torch.tensor([3]), 1e30)},
                             r"1 value\(s\) further .*first at \[3\]: 1e\+30"),
    }
    for update, match in attacks.values():
        with pytest.raises(UpdateRejected, match=match):
            method.validate_update(update, server, reports[0].num_samples)
    # off: only form and finiteness are checked
    loose = make_method(cfg.replace(update_bounds=False))
    loose.init_server(build_model(cfg.model, 10))
    loose.validate_update(attacks["3.4e38 everywhere"][0], server)


def test_aggregators_by_hand():
    ups = [{"a": torch.tensor([1.0, 10.0])}, {"a": torch.tensor([2.0, -4.0])}, {"a": torch.tensor([9.0, 0.0])},
           {"a": torch.tensor([4.0, 1.0])}]
    agg = rules.aggregate_tensors
    torch.testing.assert_close(agg(ups, ["a"])["a"], torch.tensor([4.0, 1.75]))
    torch.testing.assert_close(agg(ups, ["a"], weights=[1, 1, 0.5, 0.5])["a"],
                               torch.tensor([(1 + 2 + 4.5 + 2) / 3, (10 - 4 + 0 + 0.5) / 3]))
    torch.testing.assert_close(agg(ups, ["a"], "median")["a"], torch.tensor([3.0, 0.5]))  # even: mean of the middle two
    torch.testing.assert_close(agg(ups[:3], ["a"], "median")["a"], torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(agg(ups, ["a"], "trimmed-mean", 0.25)["a"], torch.tensor([3.0, 0.5]))
    torch.testing.assert_close(agg(ups, ["a"], "trimmed-mean", 0.2)["a"], torch.tensor([4.0, 1.75]))  # floor(0.8) = 0
    five = ups + [{"a": torch.tensor([1e6, -1e6])}]
    torch.testing.assert_close(agg(five, ["a"], "trimmed-mean", 0.2)["a"], torch.tensor([5.0, -1.0]))
    # the robust ones ignore the weights: a client cannot buy influence with its sample count
    assert torch.equal(agg(five, ["a"], "median", weights=[1, 1, 1, 1, 1e9])["a"], agg(five, ["a"], "median")["a"])
    for bad in ([1, 1, 1, -1], [1, 1, 1, float("nan")], [1, 1, 1]):
        with pytest.raises(ValueError, match="weights"):
            agg(ups, ["a"], weights=bad)
    with pytest.raises(ValueError, match="unknown aggregator"):
        agg(ups, ["a"], "krum")
    with pytest.raises(ValueError, match="nothing to aggregate"):
        agg([], ["a"])


def test_median_keeps_a_bounded_poison_within_the_honest_range():
    cfg = small_config(num_clients=6, clients_per_round=3)
    method, server, reports = _spafl_round(cfg, synthetic(n_train=300, n_test=60))
    honest = [r.update for r in reports[:2]]
    bounds = method.update_bounds(server, reports[2].num_samples)
    # a poison inside the bounds (accepted): every threshold raised by half the allowed change
    poison = {k: server.thresholds[k] + 0.5 * torch.as_tensor(b.max_change) for k, b in bounds.items()}
    method.validate_update(poison, server, reports[2].num_samples)
    mean = spafl_method.aggregate(server, honest + [poison])
    median = spafl_method.aggregate(server, honest + [poison], "median")
    for k in poison:
        low = torch.minimum(honest[0][k], honest[1][k])
        high = torch.maximum(honest[0][k], honest[1][k])
        assert ((median.thresholds[k] >= low) & (median.thresholds[k] <= high)).all()
        assert (mean.thresholds[k] > high + 1).all()  # the mean follows the poison


def test_aggregate_of_unchecked_updates_is_refused_and_the_state_kept():
    cfg = small_config(num_clients=6, clients_per_round=3)
    method, server, reports = _spafl_round(cfg, synthetic(n_train=300, n_test=60))
    # two clients at 3.4e38: the float32 sum overflows to inf
    huge = {k: torch.full_like(v, 3.4e38) for k, v in server.thresholds.items()}
    with pytest.warns(AggregateWarning, match="aggregate refused: .* non-finite"):
        new = method.aggregate(server, [huge, huge, reports[0].update], [10, 10, 10])
    assert new.round == server.round + 1 and "non-finite" in method.refused
    for k, v in server.thresholds.items():
        assert torch.equal(new.thresholds[k], v) and not new.delta[k].any()
    new = method.aggregate(server, [r.update for r in reports], [r.num_samples for r in reports])
    assert method.refused is None and not torch.equal(new.thresholds["fc3"], server.thresholds["fc3"])
    with pytest.raises(UpdateRejected, match="aggregate refused: fc3: 1 value"):
        rules.check_aggregate(server.thresholds, {**server.thresholds, "fc3": server.thresholds["fc3"].clone()
                                                     .index_fill_(0, torch.tensor([0]), -1e6)},
                                 method.update_bounds(server, 100))


def test_sample_counts_are_validated():
    check = rules.check_sample_count
    assert check(5) == 5 and check(np.int64(7), known=7) == 7
    for bad, match in [(-1e6, "integer, got float"), (-1000000, "positive"), (0, "positive"), (True, "integer"),
                       (float("nan"), "integer"), ("12", "integer"), (10**9, "more than the 5000")]:
        with pytest.raises(UpdateRejected, match=match):
            check(bad, known=5000)
    method = make_method(small_config(method="fedavg"))
    assert method.sample_bound == 1438  # the digits training split
    with pytest.raises(UpdateRejected, match="more than the 1438"):
        method.check_sample_count(1439)


@pytest.mark.parametrize("lie", ["negative", "above its own"])
def test_fedavg_rejects_an_update_with_an_impossible_sample_count(lie):
    """The reproduction: one client reports -1e6 samples; FedAvg used to weight by it. The
    round loop now checks the count against what the server knows the client holds, before the
    update is encoded; the aggregate's own check sets such an update aside too."""
    cfg = small_config(method="fedavg", num_clients=6, clients_per_round=3, rounds=1)
    victim = keys.sample_clients(cfg.seed, 0, cfg.num_clients, cfg.clients_per_round)[1]
    uploads = {}

    def liar(*args):
        new_state, report = make_method(cfg).client_round(*args)
        cid = args[6]
        uploads[cid] = (report.update, report.num_samples)
        if cid == victim:
            report.num_samples = -1e6 if lie == "negative" else report.num_samples + 1
        return new_state, report

    sim = Simulator(cfg, client_fn=liar)
    match = ("sample count must be an integer, got float" if lie == "negative"
             else "sample count .* is more than the .* training samples")
    with pytest.warns(FederatedWarning, match=f"round 1: client {victim} update rejected: {match}"):
        row = sim.run_round()
    assert (row["rejected"], row["participants"], row["round_failed"]) == (1, 2, 0)
    honest = [uploads[c] for c in uploads if c != victim]
    expected = weighted_mean([u for u, _ in honest], [n for _, n in honest])
    for name, value in sim.server.params.items():
        torch.testing.assert_close(value, expected[name])
    # the server knows each client's count: the bound is the largest client's, not the dataset's
    assert sim.method.sample_bound == max(c.num_train for c in sim.clients) < 1438
    # aggregate itself (another engine's call) sets the update aside
    method, server = sim.method, sim.server
    with pytest.warns(AggregateWarning, match=r"round 2: update 1 set aside: sample count must be an integer"):
        new = method.aggregate(server, [u for u, _ in uploads.values()], [10, -1e6, 10][:len(uploads)])
    assert method.refused is None and new.round == server.round + 1


# --- the reproductions, through the simulator -------------------------------------------------


def _attack_run(attack, rounds=5, **changes):
    """digits-cnn on the built-in digits, 6 clients, 3 a round; ``attack(update, cid, round)``
    returns the update a client sends (the honest one to pass)."""
    cfg = small_config(num_clients=6, clients_per_round=3, rounds=rounds, **changes)

    def client(model, state, message, data, config, t, cid, macs):
        new_state, report = spafl_method.client_round(model, state, message, data, config, t, cid, macs)
        report.update = attack(report.update, cid, t)
        return new_state, report

    sim = Simulator(cfg, client_fn=client)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = sim.run()
    return sim, history, [str(w.message) for w in caught if issubclass(w.category, FederatedWarning)]


def test_one_client_at_minus_1e30_no_longer_stops_the_federation():
    """Before: participants [3, 3, 3, 0, 0, ...], every later client failing on non-finite thresholds."""
    attacker = keys.sample_clients(0, 2, 6, 3)[0]

    def attack(update, cid, t):
        return {k: torch.full_like(v, -1e30) for k, v in update.items()} if (cid, t) == (attacker, 2) else update

    sim, history, messages = _attack_run(attack)
    assert [r["participants"] for r in history] == [3, 3, 2, 3, 3]
    assert [r["rejected"] for r in history] == [0, 0, 1, 0, 0] and all(r["dropped"] == 0 for r in history)
    assert any(f"client {attacker} update rejected" in m and "below the floor" in m for m in messages)
    assert all(torch.isfinite(v).all() and (v > -20).all() for v in sim.server.thresholds.values())
    assert history[-1]["acc_mean"] > history[1]["acc_mean"]


def test_two_clients_at_3_4e38_and_one_unit_at_1e30_are_rejected():
    two = keys.sample_clients(0, 1, 6, 3)[:2]
    one = keys.sample_clients(0, 3, 6, 3)[2]

    def attack(update, cid, t):
        if t == 1 and cid in two:
            return {k: torch.full_like(v, 3.4e38) for k, v in update.items()}
        if t == 3 and cid == one:
            return {**update, "fc3": update["fc3"].clone().index_fill_(0, torch.tensor([5]), 1e30)}
        return update

    sim, history, messages = _attack_run(attack)
    assert [r["rejected"] for r in history] == [0, 2, 0, 1, 0]
    assert [r["participants"] for r in history] == [3, 1, 3, 2, 3]
    assert sum("further from the global value" in m for m in messages) == 3
    for v in sim.server.thresholds.values():
        assert torch.isfinite(v).all() and (v.abs() < 10).all()
    # unit 5 of fc3 is not pruned for good: no client's threshold there is near 1e30
    assert float(sim.server.thresholds["fc3"][5]) < 10


@pytest.mark.parametrize("aggregator", ["median", "trimmed-mean"])
def test_robust_aggregators_run_end_to_end(aggregator):
    sim, history, messages = _attack_run(lambda u, c, t: u, rounds=2, aggregator=aggregator,
                                         trim_fraction=0.34)
    assert [r["participants"] for r in history] == [3, 3] and not messages
    assert history[-1]["acc_mean"] > history[0]["acc_mean"] - 5


def test_robustness_settings_are_validated():
    base = small_config().to_dict()
    for changes, match in [({"aggregator": "krum"}, "aggregator must be one of"),
                           ({"trim_fraction": 0.5}, r"trim_fraction must be in \[0, 0.5\)"),
                           ({"aggregator": "trimmed-mean", "trim_fraction": 0.2}, "trims nothing from 3 updates"),
                           ({"grad_bound": -1.0}, "grad_bound must be None or a positive"),
                           ({"grad_bound": float("inf")}, "grad_bound"),
                           ({"update_bounds": "yes"}, "update_bounds must be true or false"),
                           ({"max_failed_rounds": -1}, "max_failed_rounds must be a non-negative integer")]:
        with pytest.raises(ValueError, match=match):
            FedConfig(**{**base, **changes}).validate()
    FedConfig(**{**base, "aggregator": "trimmed-mean", "trim_fraction": 0.34}).validate()


# --- updates of another type (the round loop checks them before encoding) ----------------------


def test_updates_of_another_type_are_rejected_before_encoding():
    expected = {"l1": torch.zeros(4), "l2": torch.zeros(2)}
    good = {"l1": torch.ones(4), "l2": torch.ones(2)}
    rules.check_payload(good, expected)
    bad = [
        ({"l1": torch.ones(4, dtype=torch.float64), "l2": torch.ones(2)}, "l1: dtype torch.float64, expected"),
        ([torch.ones(4), torch.ones(2)], "mapping of tensors, got list"),
        (None, "mapping of tensors, got NoneType"),
        ({"l1": torch.ones(4, device="meta"), "l2": torch.ones(2)}, "l1: a meta tensor"),
        ({"l1": None, "l2": torch.ones(2)}, "l1: expected a tensor, got NoneType"),
        ({"l1": [0.0] * 4, "l2": torch.ones(2)}, "l1: expected a tensor, got list"),
        ({"l1": torch.ones(4).to_sparse(), "l2": torch.ones(2)}, "l1: a torch.sparse_coo tensor"),
        ({"l1": torch.ones(0), "l2": torch.ones(2)}, r"l1: shape \(0,\), expected \(4,\)"),
        ({"l1": torch.zeros(1).expand(1 << 40), "l2": torch.ones(2)}, r"l1: shape \(1099511627776,\)"),
        ({"l1": torch.ones(4), "l2": torch.ones(2), 3: torch.ones(1)}, "names must be strings"),
        ({"l1": torch.ones(4)}, r"missing \['l2'\]"),
    ]
    for update, match in bad:
        with pytest.raises(UpdateRejected, match=match):
            rules.check_payload(update, expected)
    # without an expected layout: any encodable message, up to a size
    rules.check_payload({"x": torch.ones(3, dtype=torch.int64)})
    with pytest.raises(UpdateRejected, match="dtype torch.float64 cannot be sent"):
        rules.check_payload({"x": torch.ones(3, dtype=torch.float64)})
    with pytest.raises(UpdateRejected, match="1099511627776 values, more than the 1000000"):
        rules.check_payload({"x": torch.zeros(1).expand(1 << 40)}, max_numel=10**6)
    # the method's check knows the round's layout
    method = make_method(small_config())
    server = method.init_server(build_model("digits-cnn", 10))
    method.check_payload(dict(server.thresholds), server)
    with pytest.raises(UpdateRejected, match="fc3: dtype torch.float64"):
        method.check_payload({**server.thresholds, "fc3": server.thresholds["fc3"].double()}, server)


@pytest.mark.parametrize("method", ["spafl", "fedavg"])
def test_updates_of_another_type_are_rejected_by_the_round_loop(method):
    """The reproduction: a float64 tensor, a list, a meta tensor or None as a client's update
    aborted the whole simulation (TypeError from encode, outside the per-client handling). Now
    that client is rejected, the others are aggregated and the run goes on."""
    cfg = small_config(method=method, num_clients=6, clients_per_round=3, rounds=2)
    cohort = keys.sample_clients(cfg.seed, 0, cfg.num_clients, cfg.clients_per_round)
    forged = {
        cohort[0]: lambda u: {k: v.double() for k, v in u.items()},
        cohort[1]: lambda u: list(u.values()),
        cohort[2]: lambda u: {k: torch.empty_like(v, device="meta") for k, v in u.items()},
    }
    sent = {}

    def client(model, state, message, data, config, t, cid, macs):
        new_state, report = make_method(config).client_round(model, state, message, data, config, t, cid, macs)
        sent[(t, cid)] = report.update
        if t == 0:
            report.update = forged[cid](report.update)
        elif cid == keys.sample_clients(cfg.seed, 1, cfg.num_clients, cfg.clients_per_round)[0]:
            report.update = None
        return new_state, report

    sim = Simulator(cfg, client_fn=client)
    before = {k: v.clone() for k, v in sim.method.expected_update(sim.server).items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = sim.run_round()
        for name, value in sim.method.expected_update(sim.server).items():  # untouched by round 1
            assert torch.equal(value, before[name])
        second = sim.run_round()
    messages = [str(w.message) for w in caught if issubclass(w.category, FederatedWarning)]
    assert (first["rejected"], first["participants"], first["round_failed"]) == (3, 0, 1)
    assert (second["rejected"], second["participants"], second["round_failed"]) == (1, 2, 0)
    for cid, match in zip(cohort, ["dtype torch.float64, expected torch.float32", "mapping of tensors, got list",
                                   "a meta tensor"], strict=True):
        assert any(f"round 1: client {cid} update rejected: " in m and match in m for m in messages), messages
    assert any("round 1 aggregated nothing: 3 sampled, 0 dropped, 3 rejected" in m for m in messages)
    assert any("round 2: client" in m and "mapping of tensors, got NoneType" in m for m in messages)
    # round 2 aggregated the two honest updates only
    honest = keys.sample_clients(cfg.seed, 1, 6, 3)[1:]
    weights = None if method == "spafl" else [sim.clients[c].num_train for c in honest]
    expected = rules.aggregate_tensors([sent[(1, c)] for c in honest], list(before), "mean", weights=weights)
    for name, value in sim.method.expected_update(sim.server).items():
        torch.testing.assert_close(value, expected[name])


def test_a_round_that_aggregates_nothing_is_reported_and_a_stall_stops_the_run(tmp_path):
    """Every client dropped in every round used to run to the end and exit 0: now each such
    round is warned about and marked (``round_failed``), and ``max_failed_rounds`` in a row stop
    the run with :class:`FederationStalled` after saving what was run."""
    from spafl.federated.engine import FederationStalled

    def failing(model, state, message, data, config, t, cid, macs):
        if t >= 1:
            raise RuntimeError("device lost")
        return spafl_method.client_round(model, state, message, data, config, t, cid, macs)

    cfg = small_config(num_clients=6, clients_per_round=3, rounds=8, max_failed_rounds=3)
    sim = Simulator(cfg, client_fn=failing, out_dir=tmp_path)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(
            FederationStalled, match=r"3 rounds in a row aggregated nothing \(rounds 2 to 4, max_failed_rounds = 3\); "
                                     r"round 2: client \d failed: RuntimeError: device lost"):
        warnings.simplefilter("always")
        sim.run()
    assert [r["round_failed"] for r in sim.history] == [0, 1, 1, 1]
    assert sum("aggregated nothing" in str(w.message) for w in caught) == 3
    saved = json.loads((tmp_path / "history.json").read_text())["history"]
    assert [r["round_failed"] for r in saved] == [0, 1, 1, 1]  # what ran is saved (checkpoint_every 0)
    # the count comes back from the history: a resumed run stops after the next failed round
    resumed = Simulator.resume(tmp_path, client_fn=failing)
    with warnings.catch_warnings(), pytest.raises(FederationStalled, match="4 rounds in a row"):
        warnings.simplefilter("ignore")
        resumed.run()
    # max_failed_rounds 0: never stop
    sim = Simulator(cfg.replace(rounds=4, max_failed_rounds=0), client_fn=failing)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert [r["round_failed"] for r in sim.run()] == [0, 1, 1, 1]


def test_an_overflowing_aggregate_is_refused_and_reported():
    """Without the update bounds two clients at 3.4e38 pass the checks and their mean
    overflows: the aggregate is refused, the global state kept, the round marked."""
    two = keys.sample_clients(0, 0, 6, 3)[:2]

    def attack(update, cid, t):
        return {k: torch.full_like(v, 3.4e38) for k, v in update.items()} if t == 0 and cid in two else update

    sim, history, messages = _attack_run(attack, rounds=2, update_bounds=False)
    assert (history[0]["participants"], history[0]["aggregate_refused"], history[0]["round_failed"]) == (3, 1, 1)
    assert (history[1]["aggregate_refused"], history[1]["round_failed"]) == (0, 0)
    assert any(m.startswith("round 1: aggregate refused:") and "non-finite" in m for m in messages), messages
    assert any("round 1 aggregated nothing" in m and "aggregate refused" in m for m in messages)
    assert all(torch.isfinite(v).all() for v in sim.server.thresholds.values())


def test_a_malformed_report_drops_its_client():
    def client(model, state, message, data, config, t, cid, macs):
        new_state, report = spafl_method.client_round(model, state, message, data, config, t, cid, macs)
        if cid == keys.sample_clients(0, 0, 6, 3)[0]:
            report.flops = "many"
        return new_state, report

    sim = Simulator(small_config(num_clients=6, clients_per_round=3, rounds=1), client_fn=client)
    with pytest.warns(FederatedWarning, match="failed: ValueError: malformed report: flops must be a number"):
        row = sim.run()[0]
    assert (row["dropped"], row["participants"]) == (1, 2) and np.isfinite(row["flops_total"])


def test_encode_names_the_tensor_it_cannot_encode():
    for tensors, match in [({"w": torch.ones(2, dtype=torch.float64)}, "w: cannot encode dtype torch.float64"),
                           ({"w": [1.0]}, "w: cannot encode a list, only tensors"),
                           ({"w": None}, "w: cannot encode a NoneType"),
                           ({"w": torch.ones(2, device="meta")}, "w: cannot encode a meta tensor"),
                           ({"w": torch.ones(2).to_sparse()}, "w: cannot encode a torch.sparse_coo tensor"),
                           ({7: torch.ones(2)}, "named 7: names are strings"),
                           ([torch.ones(2)], "takes a mapping of tensors, got list")]:
        with pytest.raises(TypeError, match=match):
            wire.encode(tensors)


def test_malformed_headers_are_refused_by_decode():
    def payload(header: dict, body: bytes = b"") -> bytes:
        head = json.dumps(header).encode()
        return len(head).to_bytes(4, "little") + head + body

    for header, match in [({"w": ["f32", [-1]]}, "non-negative integers"), ({"w": ["f32", [2.5]]}, "non-negative"),
                          ({"w": ["f32", [True]]}, "non-negative"), ({"w": "f32"}, "malformed header entry"),
                          ({"w": ["f32"]}, "malformed"), ({"w": ["f64", [1]]}, "unknown dtype"),
                          ({"w": ["f32", [4], "index", 1.5, "u16"]}, "unknown layout"),
                          ({"w": ["f32", [4], "index"]}, "unknown layout")]:
        with pytest.raises(ValueError, match=match):
            wire.decode(payload(header, b"\0" * 64))


def test_a_tiny_payload_cannot_make_the_server_allocate_a_huge_tensor():
    """A sparse entry declares its size: 60 bytes used to ask for a 4 TiB allocation
    (MemoryError, outside the round loop's error handling)."""
    def payload(header: dict) -> bytes:
        head = json.dumps(header).encode()
        return len(head).to_bytes(4, "little") + head

    huge = payload({"w": ["f32", [1 << 40], "index", 0, "u64"]})
    with pytest.raises(ValueError, match=r"declares 1099511627776 values, more than the 268435456 allowed"):
        wire.decode(huge)
    with pytest.raises(ValueError, match=r"w: payload declares f32 \[1099511627776\], expected f32 \[4\]"):
        wire.decode(huge, expected={"w": torch.zeros(4)})
    with pytest.raises(ValueError, match="names differ"):
        wire.decode(huge, expected={"v": torch.zeros(4)})
    with pytest.raises(ValueError, match="more than the 10 allowed"):
        wire.decode(wire.encode({"w": torch.zeros(11)}), max_numel=10)
    small = wire.encode({"w": torch.tensor([0.0, 2.0, 0.0, 0.0])}, sparse=True)
    assert torch.equal(wire.decode(small, expected={"w": torch.zeros(4)})["w"], torch.tensor([0.0, 2, 0, 0]))
    with pytest.raises(ValueError, match=r"payload declares f32 \[4\], expected f32 \[2, 2\]"):
        wire.decode(small, expected={"w": torch.zeros(2, 2)})
