"""The federated simulator: protocol functions, accounting, split, readers, end-to-end runs,
exact resume, and the server's defences against bad updates and failing clients."""

import gzip
import json
import pickle
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from spafl import ThresholdConv2d, ThresholdLinear
from spafl.federated import (
    FedConfig,
    FederatedWarning,
    Simulator,
    accounting,
    build_config,
    keys,
    load_config_file,
    rules,
    training,
    wire,
)
from spafl.federated.config import PRESETS
from spafl.federated.data import ImageDataset, crop_flip, dirichlet_split, split_for_run
from spafl.federated.datafiles import load_dataset, read_cifar10, read_cifar100, read_fashion_mnist
from spafl.federated.history import TIMING_FIELDS
from spafl.federated.methods import spafl as spafl_method
from spafl.federated.models import build_model

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def synthetic(shape=(1, 8, 8), n_train=600, n_test=200, classes=10, seed=0, noise=0.6) -> ImageDataset:
    """Separable classes: a random prototype per class plus noise, as float images in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.rand((classes, *shape), generator=g)

    def draw(n):
        y = torch.randint(0, classes, (n,), generator=g)
        x = (protos[y] + noise * torch.randn((n, *shape), generator=g)).clamp(0, 1)
        return x, y

    return ImageDataset("synthetic", *draw(n_train), *draw(n_test), classes, (0.5,) * shape[0], (0.3,) * shape[0])


def small_config(**changes) -> FedConfig:
    base = dict(dataset="digits", model="digits-cnn", num_clients=8, clients_per_round=3, rounds=3, alpha=1.0,
                local_epochs=1, batch_size=16, lr=0.05, th_coeff=0.002, device="cpu", checkpoint_every=0)
    base.update(changes)
    return FedConfig(**base).validate()


def strip_timing(history):
    return [{k: v for k, v in row.items() if k not in TIMING_FIELDS} for row in history]


# --- accounting -----------------------------------------------------------------------


def test_lenet5_thresholds_and_paper_communication():
    model = build_model("lenet5", 10)
    tau = spafl_method.model_thresholds(model)
    assert {k: v.numel() for k, v in tau.items()} == {"conv1": 20, "conv2": 50, "fc3": 500, "fc4": 10}
    t = sum(v.numel() for v in tau.values())
    assert t == 580
    # spafl-algorithm.md section 5: 500 rounds, K = 10 -> 0.1856 Gbit.
    assert 500 * accounting.comm_bits_paper(t, 10) == 185_600_000


def test_lenet5_macs_per_sample():
    macs = accounting.layer_macs(build_model("lenet5", 10), (1, 28, 28), torch.device("cpu"))
    assert macs == {"conv1": 20 * 1 * 25 * 24 * 24, "conv2": 50 * 20 * 25 * 8 * 8, "fc3": 800 * 500, "fc4": 500 * 10}


def test_training_flops_formula():
    cfg = small_config(local_epochs=3, batch_size=10, drop_last=False)
    masks = {"a": torch.tensor([True, False, True, True]), "b": torch.tensor([True, False])}
    macs = {"a": 1000, "b": 50}
    flops = accounting.training_flops(cfg, num_train=25, masks=masks, macs=macs, num_thresholds=6, num_weights=400)
    forward = 3 * 25 * (0.75 * 1000 + 0.5 * 50)
    assert flops == pytest.approx(3 * forward + 6 * 3 + 400)  # ceil(25 / 10) = 3 batches
    assert accounting.training_flops(cfg.replace(drop_last=True), 25, masks, macs, 6, 400) == pytest.approx(
        3 * forward + 6 * 2 + 400)


def test_simulator_accounting_lenet5_round():
    data = synthetic((1, 28, 28), n_train=120, n_test=40)
    cfg = small_config(dataset="fmnist", model="lenet5", num_clients=10, clients_per_round=10, rounds=1,
                       batch_size=64, normalize="standard")
    sim = Simulator(cfg, dataset=data)
    row = sim.run()[0]
    assert sim.num_thresholds == 580
    assert row["comm_bits_paper"] == 2 * 10 * 580 * 32
    payload_up = len(wire.encode(spafl_method.model_thresholds(sim.model)))
    assert row["bytes_up"] == 10 * payload_up
    assert 580 * 4 < payload_up < 580 * 4 + 256  # the thresholds and a small header, nothing else
    # Downlink: thresholds and the global change (th_update on): twice the floats.
    assert 2 * 580 * 4 < row["bytes_down"] / 10 < 2 * 580 * 4 + 512
    expected = sum(
        accounting.training_flops(cfg, c.num_train, accounting.densities(_load(sim, i)), sim.macs, 580, sim.num_weights)
        for i, c in enumerate(sim.clients)
    ) / 10
    assert row["flops_total"] == pytest.approx(expected)


@pytest.mark.parametrize("method", ["spafl", "fedavg"])
def test_memory_format_channels_last_and_auto(method):
    # "channels_last": the convolutions' weights (and so every activation after them) channels-last,
    # kept so across rounds (clients' states loaded into the model, aggregates, the wire); the
    # same run as "contiguous" to fp32 rounding of the convolutions. "auto" on the CPU: contiguous.
    from spafl.federated.build import channels_last

    runs = {}
    for fmt in ("channels_last", "contiguous", "auto"):
        sim = Simulator(small_config(method=method, rounds=2, memory_format=fmt))
        runs[fmt] = strip_timing(sim.run())
        convs = [p for p in sim.model.parameters() if p.dim() == 4]
        assert convs
        layout = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
        assert all(p.is_contiguous(memory_format=layout) for p in convs), fmt
        # (a 1-channel filter bank is both; the 16-channel one tells)
        assert any(not p.is_contiguous() for p in convs) == (fmt == "channels_last"), fmt
    assert runs["auto"] == runs["contiguous"]
    for a, b in zip(runs["channels_last"], runs["contiguous"], strict=True):
        assert a["round"] == b["round"] and a["participants"] == b["participants"] and not a["round_failed"]
        assert a["acc_mean"] == pytest.approx(b["acc_mean"], abs=0.05)
    model = build_model("digits-cnn", 10)
    assert channels_last("auto", torch.device("cuda"), model) and not channels_last("auto", torch.device("cpu"), model)
    assert not channels_last("channels_last", torch.device("cpu"), torch.nn.Linear(3, 2))  # no 4-D weight
    with pytest.raises(ValueError, match="memory_format must be one of"):
        small_config(memory_format="nhwc")


def _load(sim, i):
    sim.model.load_state_dict(sim.client_states[i])
    return sim.model


# --- split and data -------------------------------------------------------------------


def test_dirichlet_split_partitions_train_and_test_with_shared_proportions():
    rng = np.random.default_rng(3)
    train_y = rng.integers(0, 5, 2000)
    test_y = rng.integers(0, 5, 1000)
    train, test = dirichlet_split(train_y, test_y, 7, 0.3, 5, np.random.default_rng(11))
    for parts, labels in ((train, train_y), (test, test_y)):
        allidx = np.concatenate(parts)
        assert len(allidx) == len(labels) and len(np.unique(allidx)) == len(labels)
    for c in range(5):
        n_tr, n_te = (train_y == c).sum(), (test_y == c).sum()
        share_tr = np.array([(train_y[p] == c).sum() / n_tr for p in train])
        share_te = np.array([(test_y[p] == c).sum() / n_te for p in test])
        # Both cut at floor(cumsum(p) * n): shares agree up to the rounding of one sample each.
        assert np.abs(share_tr - share_te).max() <= 1 / n_tr + 1 / n_te + 1e-12
    again = dirichlet_split(train_y, test_y, 7, 0.3, 5, np.random.default_rng(11))
    assert all((a == b).all() for a, b in zip(train, again[0], strict=True))


def test_split_min_samples_and_impossible_split():
    data = synthetic(n_train=300)
    train, _ = split_for_run(data, 10, 0.5, 8, seed=1)
    assert min(len(t) for t in train) >= 8
    with pytest.raises(ValueError, match="cannot give 10 clients"):
        split_for_run(data, 10, 0.5, 31, seed=1)
    with pytest.raises(ValueError, match="no Dirichlet"):
        split_for_run(data, 10, 0.01, 29, seed=1, max_draws=3)


def _write_idx(path: Path, array: np.ndarray, magic: int, compress: bool) -> None:
    raw = struct.pack(">i", magic) + struct.pack(f">{array.ndim}i", *array.shape) + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_reader(tmp_path, compress):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    tr_x, te_x = rng.integers(0, 256, (13, 28, 28)), rng.integers(0, 256, (5, 28, 28))
    tr_y, te_y = rng.integers(0, 10, 13), rng.integers(0, 10, 5)
    _write_idx(raw / "train-images-idx3-ubyte", tr_x, 2051, compress)
    _write_idx(raw / "train-labels-idx1-ubyte", tr_y, 2049, compress)
    _write_idx(raw / "t10k-images-idx3-ubyte", te_x, 2051, compress)
    _write_idx(raw / "t10k-labels-idx1-ubyte", te_y, 2049, compress)
    ds = read_fashion_mnist(tmp_path)
    assert ds.train_x.shape == (13, 1, 28, 28) and ds.train_x.dtype == torch.uint8
    assert (ds.train_x[:, 0].numpy() == tr_x).all() and (ds.test_y.numpy() == te_y).all()
    assert read_fashion_mnist(raw).train_y.tolist() == tr_y.tolist()  # the raw folder itself works too
    _write_idx(raw / "t10k-labels-idx1-ubyte", te_y[:4], 2049, compress)
    with pytest.raises(ValueError, match="5 images but 4 labels"):
        read_fashion_mnist(tmp_path)
    _write_idx(raw / "t10k-labels-idx1-ubyte", te_y, 2051, compress)
    with pytest.raises(ValueError, match="magic 2051, expected 2049"):
        read_fashion_mnist(tmp_path)


def _cifar_batch(rng, n, key):
    return {b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8), key: rng.integers(0, 10, n).tolist()}


def test_cifar_readers(tmp_path):
    rng = np.random.default_rng(1)
    c10 = tmp_path / "cifar-10-batches-py"
    c10.mkdir()
    batches = [_cifar_batch(rng, 4, b"labels") for _ in range(6)]
    for i, b in enumerate(batches[:5]):
        (c10 / f"data_batch_{i + 1}").write_bytes(pickle.dumps(b))
    (c10 / "test_batch").write_bytes(pickle.dumps(batches[5]))
    ds = read_cifar10(tmp_path)
    assert ds.train_x.shape == (20, 3, 32, 32) and ds.test_x.shape == (4, 3, 32, 32)
    # Rows are channel-major (1024 red, 1024 green, 1024 blue), as in the published files.
    assert (ds.train_x[0, 1].flatten().numpy() == batches[0][b"data"][0, 1024:2048]).all()
    assert ds.train_y.tolist() == sum((b[b"labels"] for b in batches[:5]), [])

    c100 = tmp_path / "cifar-100-python"
    c100.mkdir()
    for split, n in (("train", 6), ("test", 3)):
        (c100 / split).write_bytes(pickle.dumps(_cifar_batch(rng, n, b"fine_labels")))
    ds = read_cifar100(tmp_path)
    assert ds.num_classes == 100 and ds.train_x.shape == (6, 3, 32, 32)
    (c100 / "test").write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"fine_labels": [0, 1]}))
    with pytest.raises(ValueError, match=r"\[n, 3072\]"):
        read_cifar100(tmp_path)
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        read_cifar10(tmp_path / "nowhere")


def test_dataset_errors():
    with pytest.raises(ValueError, match="needs data_root"):
        load_dataset("fmnist", None)
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("mnist", "x")


@pytest.mark.skipif(not (SHARED_DATA / "FashionMNIST" / "raw").is_dir(), reason="Fashion-MNIST not in ../shared/data")
def test_real_fashion_mnist():
    ds = load_dataset("fmnist", SHARED_DATA)
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.test_x.shape == (10000, 1, 28, 28)
    assert torch.bincount(ds.train_y).tolist() == [6000] * 10
    assert torch.bincount(ds.test_y).tolist() == [1000] * 10
    assert abs(float(ds.train_x.float().mean()) / 255 - ds.mean[0]) < 1e-3


def test_crop_flip_matches_explicit_windows():
    x = torch.randn(6, 3, 5, 7)
    fill = torch.tensor([-1.0, -2.0, -3.0])
    out = crop_flip(x, fill, torch.Generator().manual_seed(4), pad=2)
    g = torch.Generator().manual_seed(4)
    offsets = torch.randint(0, 5, (2, 6), generator=g)
    flips = torch.rand(6, generator=g) < 0.5
    padded = fill.view(1, 3, 1, 1).expand(6, 3, 9, 11).clone()
    padded[:, :, 2:7, 2:9] = x
    for b in range(6):
        oy, ox = offsets[:, b].tolist()
        window = padded[b, :, oy : oy + 5, ox : ox + 7]
        expected = window.flip(-1) if flips[b] else window
        assert torch.equal(out[b], expected)
    assert flips.any() and (~flips).any()


# --- protocol -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64])
def test_wire_format_round_trip(dtype):
    msg = {"a": torch.randn(5, 3).to(dtype), "b/c": torch.arange(4).to(dtype), "s": torch.tensor(2).to(dtype)}
    payload = wire.encode(msg)
    back = wire.decode(payload)
    assert list(back) == list(msg)
    for k in msg:
        assert back[k].dtype == dtype and torch.equal(back[k], msg[k])
    with pytest.raises(ValueError, match="truncated"):
        wire.decode(payload[:-1])
    with pytest.raises(ValueError, match="trailing"):
        wire.decode(payload + b"\0")
    with pytest.raises(ValueError, match="header"):
        wire.decode(b"\x05\0\0\0{{{{{")


def test_validate_update():
    expected = {"l1": torch.zeros(4), "l2": torch.zeros(2)}
    rules.validate_update({"l1": torch.ones(4), "l2": torch.ones(2)}, expected)
    bad = [
        ({"l1": torch.ones(4)}, "missing"),
        ({"l1": torch.ones(4), "l2": torch.ones(2), "x": torch.ones(1)}, "unexpected"),
        ({"l1": torch.ones(5), "l2": torch.ones(2)}, "shape"),
        ({"l1": torch.ones(4, dtype=torch.float64), "l2": torch.ones(2)}, "dtype"),
        ({"l1": torch.tensor([0.0, float("nan"), 1.0, float("inf")]), "l2": torch.ones(2)}, "2 non-finite"),
        ({"l1": [0.0] * 4, "l2": torch.ones(2)}, "expected a tensor"),
        ([1, 2], "mapping"),
    ]
    for update, match in bad:
        with pytest.raises(rules.UpdateRejected, match=match):
            rules.validate_update(update, expected)


def test_aggregate_mean_and_delta():
    state = spafl_method.ServerState({"l": torch.tensor([0.0, 1.0])}, {"l": torch.zeros(2)}, round=4)
    ups = [{"l": torch.tensor([1.0, 1.0])}, {"l": torch.tensor([3.0, 0.0])}]
    new = spafl_method.aggregate(state, ups)
    assert torch.equal(new.thresholds["l"], torch.tensor([2.0, 0.5]))
    assert torch.equal(new.delta["l"], torch.tensor([2.0, -0.5]))
    assert new.round == 5
    same = spafl_method.aggregate(new, [])
    assert torch.equal(same.thresholds["l"], new.thresholds["l"]) and not same.delta["l"].any()


def test_threshold_guided_update_by_hand():
    model = torch.nn.Sequential(ThresholdConv2d(2, 3, (2, 3), bias=False), torch.nn.Flatten(),
                                ThresholdLinear(4, 2, bias=False))
    conv, lin = model[0], model[2]
    w_conv, w_lin = conv.weight.detach().clone(), lin.weight.detach().clone()
    delta = {"0": torch.tensor([0.6, -1.2, 0.0]), "2": torch.tensor([0.8, 0.4])}
    spafl_method.threshold_guided_update(model, delta)
    for w0, layer, c, d in ((w_conv, conv, 6, delta["0"]), (w_lin, lin, 4, delta["2"])):
        for i in range(w0.shape[0]):
            s = 1.0 if w0[i].sum() > 0 else -1.0
            assert torch.allclose(layer.weight[i], w0[i] - d[i] * s / c)


def test_penalty_schedules():
    cfg = small_config(th_coeff=0.01, penalty_schedule="sigmoid", penalty_scheduler=4.0)
    assert training.penalty_coefficient(cfg, 0) == pytest.approx(0.01 / (1 + np.exp(5)))
    assert training.penalty_coefficient(cfg, 2) == pytest.approx(0.005)
    assert training.penalty_coefficient(cfg.replace(penalty_schedule="constant"), 0) == 0.01


def test_sampling_is_uniform_keyed_and_without_replacement():
    picks = [keys.sample_clients(7, t, 20, 5) for t in range(2000)]
    assert all(len(set(p)) == 5 for p in picks)
    counts = np.bincount(np.concatenate(picks), minlength=20)
    assert counts.min() > 400 and counts.max() < 600  # expected 500 each
    assert keys.sample_clients(7, 3, 20, 5) == picks[3]
    assert keys.sample_clients(8, 3, 20, 5) != picks[3] or keys.sample_clients(8, 4, 20, 5) != picks[4]


# --- models ---------------------------------------------------------------------------


@pytest.mark.parametrize("name,shape,classes,thresholds", [
    ("digits-cnn", (1, 8, 8), 10, 16 + 32 + 64 + 10),
    ("lenet5", (1, 28, 28), 10, 580),
    ("conv4", (3, 32, 32), 10, 64 + 64 + 128 + 128 + 128 + 128 + 10),
    ("vit", (3, 32, 32), 10, 6 * (3 * 512 + 128 + 256 + 128)),
    ("resnet18", (3, 32, 32), 100, 32 + 4 * 32 + 5 * 64 + 5 * 128 + 5 * 256),  # stem, 4 convs + 1 shortcut per stage
])
def test_models(name, shape, classes, thresholds):
    torch.manual_seed(0)
    model = build_model(name, classes)
    out = model(torch.randn(2, *shape))
    assert out.shape == (2, classes)
    assert sum(v.numel() for v in spafl_method.model_thresholds(model).values()) == thresholds
    out.sum().backward()
    assert all(layer.threshold.grad is not None for _, layer in spafl_layers(model))


# --- end to end -----------------------------------------------------------------------


def test_end_to_end_learns_and_exchanges_only_thresholds():
    data = synthetic(noise=0.3)
    cfg = small_config(rounds=6, clients_per_round=4, local_epochs=2)
    seen = []

    def spy(model, state, message, *args):
        seen.append(sorted(message))
        return spafl_method.client_round(model, state, message, *args)

    sim = Simulator(cfg, dataset=data, client_fn=spy)
    initial = sim.client_states[0]
    history = sim.run()
    assert len(history) == 6
    # Chance is 10%; clients train in 3 of 6 rounds on average, ~75 samples each.
    assert history[-1]["acc_mean"] > max(40.0, history[0]["acc_mean"] + 20)
    assert {k.split("/")[0] for k in seen[0]} == {"tau", "delta"}
    assert all(r["participants"] == 4 and r["dropped"] == r["rejected"] == 0 for r in history)
    trained = {int(c) for r in history for c in r["sampled"].split()}
    untouched = set(range(8)) - trained
    for c in untouched:
        assert sim.client_states[c] is initial
    a, b = sorted(trained)[:2]
    assert not torch.equal(sim.client_states[a]["conv1.weight"], sim.client_states[b]["conv1.weight"])
    row = history[-1]
    for key in ("acc_weighted", "acc_std", "acc_min", "acc_p10", "loss", "density", "density_weighted",
                "comm_gbit_paper_total", "bytes_total", "flops_total", "wall_s"):
        assert np.isfinite(row[key]), key
    assert row["acc_min"] <= row["acc_p10"] <= row["acc_mean"]
    assert set(row["layers"]) == {"conv1", "conv2", "fc3", "fc4"}


def test_same_seed_same_run_and_exact_resume(tmp_path):
    data = synthetic(n_train=300, n_test=100)
    cfg = small_config(rounds=4)
    full = Simulator(cfg, dataset=data, out_dir=tmp_path / "full")
    full_history = strip_timing(full.run())
    again = Simulator(cfg, dataset=data)
    assert strip_timing(again.run()) == full_history
    other = Simulator(cfg.replace(seed=1), dataset=data)
    assert strip_timing(other.run()) != full_history

    part = Simulator(cfg.replace(checkpoint_every=2), dataset=data, out_dir=tmp_path / "part")
    part.run(rounds=2)
    assert (tmp_path / "part" / "checkpoint.pt").is_file()
    del part
    resumed = Simulator.resume(tmp_path / "part", dataset=data)
    assert resumed.round == 2
    assert strip_timing(resumed.run()) == full_history
    for a, b in zip(resumed.client_states, full.client_states, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    saved = json.loads((tmp_path / "part" / "history.json").read_text())
    assert strip_timing(saved["history"]) == full_history
    csv_lines = (tmp_path / "part" / "history.csv").read_text().splitlines()
    assert len(csv_lines) == 5 and "density:conv1" in csv_lines[0]
    with pytest.raises(ValueError, match="lr: checkpoint"):
        Simulator.resume(tmp_path / "part", cfg.replace(lr=0.1), dataset=data)


def test_bad_update_is_rejected_without_touching_global_state():
    data = synthetic(n_train=300, n_test=100)
    cfg = small_config(rounds=1, clients_per_round=4)
    reports = {}
    victim = keys.sample_clients(cfg.seed, 0, cfg.num_clients, cfg.clients_per_round)[1]

    def malicious(model, state, message, data_, config, round_index, cid, macs):
        new_state, report = spafl_method.client_round(model, state, message, data_, config, round_index, cid, macs)
        reports[cid] = report.thresholds
        if cid == victim:
            report.thresholds = {k: torch.full_like(v, float("nan")) for k, v in report.thresholds.items()}
        return new_state, report

    sim = Simulator(cfg, dataset=data, client_fn=malicious)
    with pytest.warns(FederatedWarning, match=f"client {victim} update rejected.*non-finite"):
        row = sim.run()[0]
    assert row["rejected"] == 1 and row["participants"] == 3
    good = [t for c, t in reports.items() if c != victim]
    for name, tau in sim.server.thresholds.items():
        assert torch.equal(tau, torch.stack([g[name] for g in good]).mean(0))
        assert torch.isfinite(sim.server.delta[name]).all()


def test_wrong_shape_update_and_all_rejected_keeps_thresholds():
    data = synthetic(n_train=300, n_test=100)
    cfg = small_config(rounds=1)

    def broken(model, state, message, *args):
        new_state, report = spafl_method.client_round(model, state, message, *args)
        report.thresholds = {k: v[:-1] for k, v in report.thresholds.items()}
        return new_state, report

    sim = Simulator(cfg, dataset=data, client_fn=broken)
    before = {k: v.clone() for k, v in sim.server.thresholds.items()}
    with pytest.warns(FederatedWarning, match="shape"):
        row = sim.run()[0]
    assert row["rejected"] == 3 and row["participants"] == 0
    assert all(torch.equal(before[k], sim.server.thresholds[k]) for k in before)


def test_failing_client_is_dropped_and_the_run_goes_on():
    data = synthetic(n_train=300, n_test=100)
    cfg = small_config(rounds=2)
    victim = keys.sample_clients(cfg.seed, 0, cfg.num_clients, cfg.clients_per_round)[0]

    def flaky(model, state, message, data_, config, round_index, cid, macs):
        if cid == victim and round_index == 0:
            raise RuntimeError("out of memory on the device")
        return spafl_method.client_round(model, state, message, data_, config, round_index, cid, macs)

    sim = Simulator(cfg, dataset=data, client_fn=flaky)
    before = sim.client_states[victim]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = sim.run()
    assert any("out of memory" in str(w.message) for w in caught)
    assert history[0]["dropped"] == 1 and history[0]["participants"] == 2
    assert len(history) == 2
    if victim not in map(int, history[1]["sampled"].split()):
        assert sim.client_states[victim] is before


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    data = synthetic(n_train=200, n_test=50)
    sim = Simulator(small_config(rounds=1), dataset=data, out_dir=tmp_path)
    sim.run()
    good = (tmp_path / "checkpoint.pt").read_bytes()

    def crash(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        sim.save_checkpoint()
    assert (tmp_path / "checkpoint.pt").read_bytes() == good
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".checkpoint")]


# --- configuration and command line -----------------------------------------------------


def test_config_validation_lists_every_problem():
    with pytest.raises(ValueError) as e:
        FedConfig(num_clients=4, clients_per_round=5, lr=0.0, alpha=float("nan"), model="vgg", clip=-1).validate()
    text = str(e.value)
    for fragment in ("clients_per_round (5) cannot exceed", "lr must be", "alpha must be", "model must be",
                     "clip must be"):
        assert fragment in text
    with pytest.raises(ValueError, match="takes .* inputs but dataset"):
        FedConfig(dataset="digits", model="lenet5").validate()
    for clip in (0.5, float("nan"), float("-inf"), "20", True):
        with pytest.raises(ValueError, match="cohort_clip must be None"):
            FedConfig(cohort_clip=clip).validate()
    assert FedConfig(cohort_clip=None).validate().cohort_clip is None  # the method's default
    assert FedConfig(cohort_clip=float("inf")).validate().cohort_clip == float("inf")  # off


def test_a_checkpoint_with_the_earlier_norm_limit_resumes_where_it_means_the_same():
    """A checkpoint written when every method's norm limit was 20 by default (``cohort_clip``
    20.0 in its settings) resumes where the method's own default is still 20 (SpaFL, Top-K,
    local-only) and is refused, with both values named, for FedAvg and SparsyFed (whose
    defaults are now 8); an explicit 20 resumes it."""
    from spafl.federated.config import config_mismatch

    for method in ("spafl", "sparsyfed", "topk", "local", "fedavg"):
        now = FedConfig(method=method).validate()
        saved = {**now.to_dict(), "cohort_clip": 20.0}
        problems = config_mismatch(saved, now)
        if method in ("fedavg", "sparsyfed"):
            assert problems == ["cohort_clip: checkpoint 20.0 vs now None (the method's default, 8.0)"]
            assert config_mismatch(saved, now.replace(cohort_clip=20.0)) == []
        else:
            assert problems == [], (method, problems)
        assert config_mismatch(now.to_dict(), now) == []
    fedavg = FedConfig(method="fedavg").validate()
    assert config_mismatch({**fedavg.to_dict(), "cohort_clip": 8.0}, fedavg) == []
    assert config_mismatch({**fedavg.to_dict(), "cohort_clip": 5.0}, fedavg) == [
        "cohort_clip: checkpoint 5.0 vs now None (the method's default, 8.0)"]
    assert config_mismatch(fedavg.to_dict(), fedavg.replace(cohort_clip=float("inf"))) == [
        "cohort_clip: checkpoint None vs now inf"]
    with pytest.raises(ValueError, match="unknown setting"):
        build_config("digits-cnn", overrides={"learning_rate": 0.1})
    with pytest.raises(ValueError, match="unknown preset"):
        build_config("mnist-mlp")


def test_presets_match_the_reference_table():
    p = PRESETS["fmnist-lenet5"]
    assert (p["num_clients"], p["clients_per_round"], p["alpha"], p["rounds"], p["lr"], p["th_coeff"],
            p["local_epochs"], p["batch_size"], p["penalty_scheduler"]) == (100, 10, 0.2, 500, 0.001, 0.002, 5, 64, 1.0)
    p = PRESETS["cifar100-resnet18"]
    assert (p["rounds"], p["lr"], p["lr_decay"], p["th_coeff"], p["local_epochs"], p["batch_size"], p["clip"]) == (
        1500, 0.01, 0.993, 0.0007, 7, 64, 15.0)
    for name in PRESETS:
        build_config(name)  # every preset validates


def test_config_file_layering(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"preset": "fmnist-lenet5", "rounds": 7, "alpha": 0.5}))
    cfg = build_config(None, load_config_file(path), {"alpha": 0.9})
    assert (cfg.model, cfg.rounds, cfg.alpha, cfg.lr) == ("lenet5", 7, 0.9, 0.001)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="table of settings"):
        load_config_file(path)


def test_cli_train_resume_and_refusal(tmp_path, capsys):
    from spafl.cli import main

    out = tmp_path / "run"
    args = ["train", "--rounds", "2", "--num-clients", "6", "--clients-per-round", "2", "--local-epochs", "1",
            "--out", str(out), "--no-progress", "--no-plot", "--checkpoint-every", "1", "--device", "cpu"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "rounds 2: accuracy" in text and "Gbit" in text
    assert main(["train", "--out", str(out), "--resume", "--rounds", "3", "--no-progress", "--no-plot"]) == 0
    history = json.loads((out / "history.json").read_text())["history"]
    assert [r["round"] for r in history] == [1, 2, 3]  # rounds count from 1
    assert main(args) == 0  # the same command again: the finished run is reported, not trained or replaced
    assert "already holds this run, finished (3 rounds, more than the 2 asked for)" in capsys.readouterr().out
    assert len(json.loads((out / "history.json").read_text())["history"]) == 3
    assert main([*args, "--alpha", "0.9"]) == 2  # other settings: refused, the folder kept
    assert "holds a run with other settings" in capsys.readouterr().err
    assert main(["train", "--out", str(out), "--resume", "--lr", "0.5", "--no-progress", "--no-plot"]) == 2
    assert "different configuration" in capsys.readouterr().err
    assert main(["train", "--lr", "-1", "--no-progress"]) == 2
    assert "lr must be a positive" in capsys.readouterr().err


def test_plots(tmp_path):
    pytest.importorskip("matplotlib")
    from spafl.federated.plots import plot_run

    sim = Simulator(small_config(rounds=2), dataset=synthetic(n_train=200, n_test=50), out_dir=tmp_path)
    sim.run()
    paths = plot_run(tmp_path)
    assert {p.name for p in paths} == {"accuracy.png", "density.png", "masks.png", "clients.png", "thresholds.png"}
    assert all(p.stat().st_size > 1000 for p in paths)
    masks = np.load(tmp_path / "masks.npz")["masks"]
    assert masks.shape == (2, 8, 16) and set(np.unique(masks)) <= {0, 1}


def test_client_round_takes_global_thresholds_and_applies_the_update_before_training(monkeypatch):
    data = synthetic(n_train=200, n_test=50)
    sim = Simulator(small_config(rounds=1), dataset=data)
    state = sim.client_states[0]
    tau = {k: torch.rand_like(v) * 0.01 for k, v in sim.server.thresholds.items()}
    delta = {k: torch.randn_like(v) * 0.01 for k, v in tau.items()}
    message = {**{f"tau/{k}": v for k, v in tau.items()}, **{f"delta/{k}": v for k, v in delta.items()}}
    seen = {}

    def record(model, *args, **kwargs):
        seen["tau"] = {name: layer.threshold.detach().clone() for name, layer in spafl_layers(model)}
        seen["w"] = {name: layer.weight.detach().clone() for name, layer in spafl_layers(model)}
        return torch.zeros(())

    monkeypatch.setattr(spafl_method, "local_train", record)
    new_state, report = spafl_method.client_round(sim.model, state, message, sim.clients[0], sim.config, 3, 0, sim.macs)
    expected_model = build_model("digits-cnn", 10)
    expected_model.load_state_dict(state)
    spafl_method.threshold_guided_update(expected_model, delta)
    for name, layer in spafl_layers(expected_model):
        assert torch.equal(seen["tau"][name], tau[name])
        assert torch.equal(seen["w"][name], layer.weight.detach())
        assert torch.equal(report.thresholds[name], tau[name])
    assert all(torch.equal(state[k], sim.client_states[0][k]) for k in state)  # the input state is untouched
    assert not torch.equal(new_state["conv1.weight"], state["conv1.weight"])
    spafl_method.client_round(sim.model, state, message, sim.clients[0], sim.config.replace(th_update=False), 3, 0,
                          sim.macs)
    assert torch.equal(seen["w"]["conv1"], state["conv1.weight"])


def spafl_layers(model):
    from spafl import named_threshold_layers

    return named_threshold_layers(model)


def test_any_model_through_sparsify_and_models_without_threshold_layers():
    from torch import nn

    import spafl

    def my_model():
        return spafl.sparsify(nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 36, 10)))

    sim = Simulator(small_config(rounds=1), dataset=synthetic(n_train=200, n_test=50), model_fn=my_model)
    assert sim.layer_names == ["0", "3"] and sim.num_thresholds == 16
    row = sim.run()[0]
    assert row["participants"] == 3 and set(row["layers"]) == {"0", "3"}
    with pytest.raises(ValueError, match="no threshold layers"):
        Simulator(small_config(), dataset=synthetic(n_train=200, n_test=50),
                  model_fn=lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 10)))
    with pytest.raises(ValueError, match="mask_layer 'fc9'"):
        Simulator(small_config(mask_layer="fc9"), dataset=synthetic(n_train=200, n_test=50))


def test_unusable_datasets_are_rejected_before_training():
    cfg = small_config()
    with pytest.raises(ValueError, match=r"takes \(1, 8, 8\) images but the dataset has \(1, 28, 28\)"):
        Simulator(cfg, dataset=synthetic((1, 28, 28), n_train=200, n_test=50))
    bad = synthetic(n_train=200, n_test=50)
    bad.train_x[3, 0, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="train images hold non-finite values"):
        Simulator(cfg, dataset=bad)
    bad = synthetic(n_train=200, n_test=50)
    bad.test_y[0] = 10
    with pytest.raises(ValueError, match=r"test labels must be int64 in \[0, 10\)"):
        Simulator(cfg, dataset=bad)
    bad = synthetic(n_train=200, n_test=50)
    bad.train_y = bad.train_y[:-1]
    with pytest.raises(ValueError, match="labels \\[n\\]"):
        Simulator(cfg, dataset=bad)
