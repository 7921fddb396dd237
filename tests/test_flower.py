"""spafl on Flower: the apps run the simulator's functions, so the same seed gives the same
history; only the method's message crosses the wire; clients persist their models.

The simulations run on Flower's Ray engine with one CPU thread per ClientApp; the reference
simulator runs here with one thread too (CPU kernels reduce in an order that depends on the
thread count, which changes the last bits of a loss and, over many rounds, the run)."""

import os
from pathlib import Path

import pytest
import torch

from spafl.federated import FedConfig, Simulator, accounting
from spafl.federated.keys import sample_clients
from spafl.federated.methods import spafl as spafl_method
from spafl.federated.wire import encode
from tests.test_federated import small_config, strip_timing, synthetic

flwr = pytest.importorskip("flwr", reason='Flower is not installed (pip install -e ".[flower]")')

from spafl.flower import QUIET_ENV, config_from_run_config, simulate  # noqa: E402
from spafl.flower.client import ClientStore  # noqa: E402
from spafl.flower.wire import config_digest, pack, unpack  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def flower_config(**changes) -> FedConfig:
    base = dict(num_clients=4, clients_per_round=2, rounds=3, local_epochs=1)
    base.update(changes)
    return small_config(**base)


def reference(config: FedConfig, dataset) -> Simulator:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sim = Simulator(config, dataset=dataset)
        sim.run()
    finally:
        torch.set_num_threads(threads)
    return sim


def common(flower_history, sim_history):
    """The Flower rows restricted to the simulator's columns (the timings left out)."""
    keys = set(sim_history[0])
    return [{k: v for k, v in row.items() if k in keys} for row in strip_timing(flower_history)]


@pytest.fixture(scope="module")
def spafl_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("flower-spafl")
    config, data = flower_config(), synthetic(noise=0.3)
    strategy = simulate(config, state_dir=root / "state", out_dir=root / "out", dataset=data)
    return config, data, root, strategy, reference(config, data)


def test_quiet_switches_are_set():
    for key, value in QUIET_ENV.items():
        assert os.environ.get(key) == value


def test_spafl_on_flower_matches_the_simulator(spafl_run):
    config, _, root, strategy, sim = spafl_run
    assert len(strategy.history) == config.rounds
    assert common(strategy.history, sim.history) == strip_timing(sim.history)
    assert (root / "out" / "history.csv").is_file() and (root / "out" / "checkpoint.pt").is_file()


def test_only_thresholds_cross_the_wire(spafl_run):
    config, _, _, strategy, sim = spafl_run
    layers = {name: layer.threshold.numel() for name, layer in sim.prunable}
    t = sum(layers.values())
    uplink = len(encode(spafl_method.model_thresholds(sim.model)))
    downlink = len(encode(spafl_method.broadcast(sim.server, config.th_update)))
    assert uplink < 150 + 4 * t and downlink < 300 + 8 * t  # a header, then 4 bytes a value
    train = [e for e in strategy.wire_log if e["kind"] == "train"]
    assert len(train) == 2 * config.rounds * config.clients_per_round
    for e in train:
        if e["direction"] == "up":
            assert e["tensors"] == layers  # one threshold per unit of every layer, nothing else
            assert e["payload_bytes"] == uplink
            assert set(e["records"]) == {"arrays", "metrics"} and e["records"]["arrays"] == ["payload"]
        else:
            assert e["tensors"] == {**{f"tau/{k}": v for k, v in layers.items()},
                                    **{f"delta/{k}": v for k, v in layers.items()}}
            assert e["payload_bytes"] == downlink
            assert set(e["records"]) == {"arrays", "config"}
        # the metrics and Flower's framing add under 2 kB a message
        assert e["payload_bytes"] < e["message_bytes"] < e["payload_bytes"] + 2048
    weights = sum(layer.weight.numel() for _, layer in sim.prunable)
    assert uplink < 0.02 * 4 * weights
    for row, ref in zip(strategy.history, sim.history, strict=True):
        k = config.clients_per_round
        assert row["wire_payload_up"] == ref["bytes_up"] == k * uplink
        assert row["wire_payload_down"] == ref["bytes_down"] == k * downlink
        assert row["comm_bits_paper"] == accounting.comm_bits_paper(t, k) == 2 * k * t * 32
        assert row["wire_eval"] == 0  # personalised clients report their evaluation with the uplink


def test_personalised_weights_persist_across_rounds(spafl_run):
    config, _, root, _, sim = spafl_run
    trained = [sample_clients(config.seed, t, config.num_clients, config.clients_per_round)
               for t in range(config.rounds)]
    twice = [c for c in range(config.num_clients) if sum(c in s for s in trained) >= 2]
    assert twice, "the test needs a client that trains in two rounds"
    for c in range(config.num_clients):
        path = root / "state" / f"partition-{c:05d}.pt"
        rounds = [t for t, s in enumerate(trained) if c in s]
        if not rounds:
            assert not path.exists()
            continue
        saved = torch.load(path, weights_only=True)
        assert saved["round"] == rounds[-1]
        # A client that restarted from the initial model each round would differ here.
        for k, v in sim.client_states[c].items():
            assert torch.equal(saved["state"][k], v.cpu()), (c, k)


@pytest.mark.parametrize("method", ["fedavg", "sparsyfed", "topk", "local"])
def test_baselines_through_the_same_adapter(tmp_path, method):
    config, data = flower_config(method=method, rounds=2), synthetic(noise=0.3)
    strategy = simulate(config, state_dir=tmp_path / "state", dataset=data)
    sim = reference(config, data)
    assert common(strategy.history, sim.history) == strip_timing(sim.history)
    k = config.clients_per_round
    final = len(encode(sim.method.broadcast(sim.server), sparse=sim.method.sparse_wire)) if method != "local" else 0
    for t, (row, ref) in enumerate(zip(strategy.history, sim.history, strict=True)):
        assert row["wire_payload_up"] == ref["bytes_up"] and row["wire_payload_down"] == ref["bytes_down"]
        if method == "local":
            assert row["wire_payload_up"] == row["wire_payload_down"] == row["wire_eval"] == 0
            continue
        # after aggregation the global model goes to every node for evaluation: the next downlink
        model = sim.history[t + 1]["bytes_down"] // k if t + 1 < len(sim.history) else final
        evals = [e for e in strategy.wire_log if e["kind"] == "evaluate" and e["round"] == t]
        assert [e["payload_bytes"] for e in evals if e["direction"] == "down"] == [model] * config.num_clients
        assert row["wire_eval"] == sum(e["message_bytes"] for e in evals)
    assert (tmp_path / "state").exists() == (method == "local")


def test_per_run_optimizer_on_flower_matches_the_simulator_and_persists(tmp_path):
    config, data = flower_config(optimizer_lifetime="per-run"), synthetic(noise=0.3)
    strategy = simulate(config, state_dir=tmp_path / "state", dataset=data)
    sim = reference(config, data)
    assert common(strategy.history, sim.history) == strip_timing(sim.history)
    assert strip_timing(sim.history) != strip_timing(reference(config.replace(optimizer_lifetime="per-round"),
                                                               data).history)
    stored = 0
    for c, state in enumerate(sim.client_states):
        path = tmp_path / "state" / f"partition-{c:05d}.pt"
        if not path.exists():
            continue
        saved = torch.load(path, weights_only=True)["state"]
        assert any(k.startswith("momentum/") for k in saved)
        assert saved.keys() == state.keys() and all(torch.equal(saved[k], state[k].cpu()) for k in saved)
        stored += 1
    assert stored


def test_a_global_method_client_keeps_its_momentum_per_run(tmp_path):
    from spafl.flower.client import PartitionClient

    config, data = flower_config(method="fedavg", optimizer_lifetime="per-run"), synthetic(noise=0.3)
    client = PartitionClient(config, 1, tmp_path, data)
    message = dict(client.method.init_server(client.model).params)
    client.train(message, 0)
    first = client.store.load()
    assert first["before"] is None and set(first["state"]) == {f"momentum/{n}" for n, _ in
                                                               client.model.named_parameters()}
    client.train(message, 1)
    second = client.store.load()
    assert all(torch.equal(second["before"][k], first["state"][k]) for k in first["state"])
    assert not torch.equal(second["state"]["momentum/fc4.weight"], first["state"]["momentum/fc4.weight"])
    stateless = PartitionClient(config.replace(optimizer_lifetime="per-round"), 2, tmp_path / "none", data)
    stateless.train(message, 0)
    assert not (tmp_path / "none").exists()


def test_flower_refuses_what_it_cannot_run_as_the_simulator(tmp_path):
    from spafl.flower import MethodStrategy
    from spafl.flower.client import PartitionClient

    config = flower_config(rng="global")
    with pytest.raises(ValueError, match="rng='global'.*use rng='keyed'"):
        MethodStrategy(config)
    with pytest.raises(ValueError, match="rng='global'"):
        PartitionClient(config, 0, tmp_path, synthetic(noise=0.3))
    with pytest.raises(ValueError, match="collapse_in_eval=True.*simulator"):
        MethodStrategy(flower_config(collapse_in_eval=True))


def test_resumed_flower_run_continues_exactly(tmp_path, spafl_run):
    config, data, _, strategy, _ = spafl_run
    first = simulate(config.replace(rounds=2), state_dir=tmp_path / "state", out_dir=tmp_path / "out", dataset=data)
    assert len(first.history) == 2
    resumed = simulate(config, state_dir=tmp_path / "state", out_dir=tmp_path / "out", dataset=data)
    # (a message's size varies by a byte or two with its ids and timestamps)
    def exact(history):
        return [{k: v for k, v in row.items() if not k.startswith("wire_message")} for row in strip_timing(history)]

    assert exact(resumed.history) == exact(strategy.history)


# --- pieces ---------------------------------------------------------------------------------


def test_client_store_replays_a_round_from_the_state_before_it(tmp_path):
    config = flower_config()
    store = ClientStore(tmp_path / "p.pt", config)
    initial, a, b = ({"w": torch.full((2,), float(i))} for i in range(3))
    assert store.state_for(0, initial) is initial
    store.save(1, a, b)  # trained round 1 from a, ending at b
    assert torch.equal(store.state_for(2, initial)["w"], b["w"])
    assert torch.equal(store.state_for(1, initial)["w"], a["w"])  # the server restarted and replays round 1
    with pytest.raises(ValueError, match="older than this client"):
        store.state_for(0, initial)
    with pytest.raises(ValueError, match="other settings"):
        ClientStore(tmp_path / "p.pt", config.replace(lr=0.5)).state_for(2, initial)
    # where data and state live, and the device, may change between restarts
    assert ClientStore(tmp_path / "p.pt", config.replace(device="cpu", data_root="/x")).load()["round"] == 1


def test_strategy_refuses_flower_arguments_it_would_ignore():
    from flwr.app import ArrayRecord

    from spafl.flower import MethodStrategy

    strategy = MethodStrategy(flower_config())
    with pytest.raises(ValueError, match="initial_arrays"):
        strategy.start(grid=None, initial_arrays=ArrayRecord())
    with pytest.raises(ValueError, match="asked to configure round 3"):
        strategy.configure_train(3, None, None, grid=None)


def test_client_refuses_a_node_that_cannot_serve_the_run(tmp_path):
    from types import SimpleNamespace

    from spafl.flower.client import PartitionClient, _check_digest, _client

    config, data = flower_config(), synthetic(noise=0.3)

    def context(**node):
        return SimpleNamespace(node_config=node, run_config={})

    with pytest.raises(ValueError, match="no partition.*--node-config"):
        _client(context(), config, tmp_path, data)
    with pytest.raises(ValueError, match="partition 1 of 10, but the run has 4 clients"):
        _client(context(**{"partition-id": 1, "num-partitions": 10}), config, tmp_path, data)
    with pytest.raises(ValueError, match="partition 4 of 4"):
        _client(context(**{"partition-id": 4, "num-partitions": 4}), config, tmp_path, data)
    client = PartitionClient(config, 1, tmp_path, data)

    def message(records):
        return SimpleNamespace(content=SimpleNamespace(config_records=records))

    with pytest.raises(ValueError, match="no run-settings digest"):
        _check_digest(client, message({}))
    with pytest.raises(ValueError, match="same run config"):
        _check_digest(client, message({"config": {"digest": config_digest(config.replace(lr=0.5)), "round": 0}}))
    assert _check_digest(client, message({"config": {"digest": client.digest, "round": 0}}))["round"] == 0


def test_strategy_refuses_an_impossible_config():
    from spafl.flower import MethodStrategy

    with pytest.raises(ValueError, match="clients_per_round"):
        MethodStrategy(FedConfig(**{**flower_config().to_dict(), "clients_per_round": 9}))  # validated there


def test_config_from_run_config():
    config, options = config_from_run_config({"preset": "", "rounds": 4, "clients-per-round": 3, "lr": "",
                                              "out-dir": "x"})
    assert (config.dataset, config.rounds, config.clients_per_round, config.lr) == ("digits", 4, 3, 0.05)
    assert options["out-dir"] == "x" and options["state-dir"] == "flower-state"
    config, _ = config_from_run_config({"preset": "fmnist-lenet5", "method": "fedavg", "data_root": "/a"},
                                       {"partition-id": 3, "num-partitions": 100, "data-root": "/b"})
    assert (config.model, config.method, config.num_clients, config.data_root) == ("lenet5", "fedavg", 100, "/b")
    with pytest.raises(ValueError, match="unknown run-config key.*'num-round'"):
        config_from_run_config({"num-round": 3})
    with pytest.raises(ValueError, match="clients_per_round"):
        config_from_run_config({"clients-per-round": 50})
    with pytest.raises(ValueError, match="round-timeout"):
        config_from_run_config({"round-timeout": -1})
    with pytest.raises(ValueError, match="unknown preset"):
        config_from_run_config({"preset": "mnist"})
    # the node-local settings do not change the digest the server and clients compare
    a, _ = config_from_run_config({}, {"data-root": "/one", "device": "cpu"})
    b, _ = config_from_run_config({}, {"data-root": "/two"})
    assert config_digest(a) == config_digest(b) != config_digest(a.replace(seed=1))


def test_payload_record_round_trip_and_refusals():
    payload = encode({"fc": torch.arange(5, dtype=torch.float32)})
    record = pack(payload)
    assert unpack(record) == payload
    from flwr.app import Array, ArrayRecord

    with pytest.raises(ValueError, match="one array 'payload'"):
        unpack(ArrayRecord({"payload": Array(dtype="uint8", shape=(1,), stype="spafl.protocol", data=b"x"),
                            "extra": Array(dtype="uint8", shape=(1,), stype="spafl.protocol", data=b"y")}))
    import numpy as np

    with pytest.raises(ValueError, match="stype"):
        unpack(ArrayRecord({"payload": Array(np.zeros(3, dtype=np.uint8))}))


def test_flower_app_config_is_valid():
    from flwr.cli.config_utils import load_and_validate

    import spafl

    config, warnings = load_and_validate(ROOT / "pyproject.toml", check_module=True)  # raises if invalid
    assert not warnings, warnings
    assert config["project"]["version"] == spafl.__version__
    components = config["tool"]["flwr"]["app"]["components"]
    assert components == {"serverapp": "flower_app:server", "clientapp": "flower_app:client"}
    run_config = config["tool"]["flwr"]["app"]["config"]
    built, _ = config_from_run_config(run_config)
    assert built.method == "spafl"


def test_loopback_deployment(tmp_path):
    """One SuperLink and two SuperNodes as separate processes on 127.0.0.1, and `flwr run`."""
    import subprocess

    from flower_processes import flower_bin, free_port

    # Flower's commands run with this interpreter (they start each other by name); free ports
    env = {**os.environ, "PATH": f"{flower_bin(tmp_path / 'bin')}{os.pathsep}{os.environ.get('PATH', '')}",
           "SUPERLINK_PORT": str(free_port()), "SUPERNODE_PORTS": f"{free_port()} {free_port()}"}
    out = tmp_path / "loopback"
    done = subprocess.run(["bash", str(ROOT / "scripts" / "flower_loopback.sh"), str(out), "2"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    import csv

    rows = list(csv.DictReader((out / "history.csv").open()))
    assert len(rows) == 2
    # each client's state file and the one before it (kept by the run folder's atomic write)
    assert sorted(p.name for p in (out / "state").iterdir()) == sorted(
        f"partition-0000{p}{suffix}.pt" for p in (0, 1) for suffix in ("", ".prev"))
    for p in range(2):
        assert torch.load(out / "state" / f"partition-{p:05d}.pt", weights_only=True)["round"] == 1
    # both clients train every round; their uplinks hold the thresholds only
    from spafl.federated.models import build_model

    uplink = len(encode(spafl_method.model_thresholds(build_model("digits-cnn", 10))))
    for row in rows:
        assert int(row["wire_payload_up"]) == int(row["bytes_up"]) == 2 * uplink
        assert row["sampled"] == "0 1" and int(row["participants"]) == 2
