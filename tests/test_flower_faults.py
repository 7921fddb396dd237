"""The Flower strategy when nodes misbehave: a node that cannot serve the run, runs other
settings, claims a partition another node serves, or disappears, is excluded or dropped with a
warning and the run goes on; a run in which nothing is aggregated for several rounds stops
with a clear error. The Flower grid here is an in-process stand-in that delivers each message
to a real spafl ClientApp (what a SuperNode does), so these tests need no processes."""

import logging
import time

import numpy as np
import pytest
import torch
from test_federated import small_config, synthetic

flwr = pytest.importorskip("flwr", reason='Flower is not installed (pip install -e ".[flower]")')

from flwr.app import Context, Error, Message, RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from spafl.federated import Simulator, keys  # noqa: E402
from spafl.flower.client import client_app  # noqa: E402
from spafl.flower.server import MethodStrategy  # noqa: E402
from spafl.flower.wire import ARRAYS, METRICS, config_from_run_config, pack  # noqa: E402


class FakeGrid:
    """Flower's ``Grid`` as the strategy uses it: ``get_node_ids`` lists the connected nodes and
    ``send_and_receive`` returns each connected node's reply (an exception in the ClientApp
    becomes an error reply, as a SuperNode sends it). ``on_send(round, node)`` may disconnect
    nodes between rounds."""

    def __init__(self, nodes: dict[int, tuple], on_send=None, on_list=None):
        self.nodes = dict(nodes)  # node id -> (ClientApp, node_config)
        self.on_send, self.on_list = on_send, on_list
        self.sent: list[tuple[str, int]] = []
        self.listed = 0
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1

    def get_node_ids(self):
        self.listed += 1
        if self.on_list is not None:
            self.on_list(self)
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            self.sent.append((msg.metadata.message_type, node))
            if self.on_send is not None:
                self.on_send(self, msg)
            if node not in self.nodes:
                continue  # a node that died: no reply (the strategy times out or Flower reports it)
            app, node_config = self.nodes[node]
            context = Context(run_id=1, node_id=node, node_config=node_config, state=RecordDict(), run_config={})
            try:
                replies.append(app(msg, context))
            except Exception as e:  # what a SuperNode replies when its ClientApp raises
                replies.append(Message(Error(code=0, reason=f"{type(e).__name__}: {e}"), reply_to=msg))
        return replies


def _nodes(app, partitions, num=4, first_id=100, **extra):
    return {first_id + i: (app, {"partition-id": p, "num-partitions": num, **extra}) for i, p in enumerate(partitions)}


@pytest.fixture
def setup(tmp_path):
    config = small_config(num_clients=4, clients_per_round=2, rounds=3, local_epochs=1)
    data = synthetic(noise=0.3, n_train=240, n_test=80)
    return config, data, client_app(config, tmp_path / "state", data)


def _run(config, data, grid, caplog, **kwargs):
    strategy = MethodStrategy(config, dataset=data, node_wait=kwargs.pop("node_wait", 1.0),
                              rejoin_wait=kwargs.pop("rejoin_wait", 1.0), **kwargs)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        strategy.start(grid)
    return strategy


def test_fake_grid_run_matches_the_simulator(setup, caplog):
    config, data, app = setup
    strategy = _run(config, data, FakeGrid(_nodes(app, range(4))), caplog)
    threads = torch.get_num_threads()
    sim = Simulator(config, dataset=data)
    sim.run()
    torch.set_num_threads(threads)
    keys = [k for k in sim.history[0] if k not in ("wall_s", "train_s", "eval_s")]
    assert [{k: r[k] for k in keys} for r in strategy.history] == [{k: r[k] for k in keys} for r in sim.history]


def test_a_node_that_cannot_serve_the_run_is_excluded_not_fatal(setup, tmp_path, caplog):
    """Before: one node whose query failed ended the run (finished:failed)."""
    config, data, app = setup
    other = client_app(config.replace(lr=0.5), tmp_path / "other", data)  # other settings
    nodes = {**_nodes(app, range(4)),
             200: (app, {"partition-id": 9, "num-partitions": 4}),  # no such partition: its query fails
             201: (other, {"partition-id": 2, "num-partitions": 4}),
             202: (app, {"num-partitions": 4})}  # no partition at all
    strategy = _run(config, data, FakeGrid(nodes), caplog)
    assert len(strategy.history) == 3 and all(r["participants"] == 2 for r in strategy.history)
    assert set(strategy.excluded) == {200, 201, 202}
    assert strategy.nodes == {p: 100 + p for p in range(4)}
    text = caplog.text
    assert "node 200 excluded from sampling: cannot serve this run: ValueError: this SuperNode serves partition 9" \
        in text
    assert "node 201 excluded from sampling: runs settings" in text
    assert "node 202 excluded from sampling" in text and "no partition" in text


def test_a_second_node_claiming_a_served_partition_is_excluded_until_it_is_free(setup, caplog):
    """Before: a second SuperNode with partition-id=0 was accepted and partition 0 alternated."""
    config, data, app = setup
    nodes = {**_nodes(app, range(4)), 300: (app, {"partition-id": 0, "num-partitions": 4})}
    trained = []

    def on_send(grid, msg):
        if msg.metadata.message_type == "train":
            trained.append(msg.metadata.dst_node_id)
        # after round 1 the first holder of partition 0 leaves; the duplicate may take over
        if msg.metadata.message_type == "train" and len(trained) == 2 * 1 + 1 and 100 in grid.nodes:
            del grid.nodes[100]

    strategy = _run(config.replace(rounds=3), data, FakeGrid(nodes, on_send), caplog)
    assert "node 300 excluded from sampling: claims partition 0, which node 100 serves" in caplog.text
    assert 300 not in trained[:2]
    assert strategy.nodes[0] == 300 and 300 not in strategy.excluded  # it serves partition 0 now
    assert "the SuperNode of partition 0 (node 100) is gone" in caplog.text


def test_a_lost_node_costs_no_wait_unless_sampled(setup, caplog):
    """Before: a killed SuperNode stalled the next round for the whole node wait (300 s)."""
    config, data, app = setup
    config = config.replace(rounds=5)
    later = [keys.sample_clients(config.seed, t, 4, 2) for t in range(1, 5)]
    lost = next(p for p in range(4) if any(p in s for s in later) and not all(p in s for s in later))

    def on_list(grid):  # the node of partition `lost` dies after the first round
        if grid.listed == 2:
            grid.nodes.pop(100 + lost)

    start = time.monotonic()
    strategy = _run(config, data, FakeGrid(_nodes(app, range(4)), on_list=on_list), caplog, node_wait=120.0,
                    rejoin_wait=2.0)
    assert time.monotonic() - start < 60  # far below node_wait: no round waited for it
    waits = caplog.text.count(f"no SuperNode serves partition(s) [{lost}] after 2 s")
    assert waits == sum(lost in s for s in later) >= 1  # a wait only in the rounds that sample it
    for row, cohort in zip(strategy.history[1:], later, strict=True):
        assert row["dropped"] == (lost in cohort)
        assert row["participants"] == 2 - (lost in cohort)


def test_a_run_that_aggregates_nothing_stops_with_a_clear_error(setup, caplog):
    config, data, app = setup

    def on_send(grid, msg):  # every node dies after the first query
        if msg.metadata.message_type == "train":
            grid.nodes.clear()

    strategy = MethodStrategy(config.replace(rounds=6, max_failed_rounds=2), dataset=data, node_wait=1.0,
                              rejoin_wait=0.0)
    with pytest.raises(RuntimeError, match=r"2 rounds in a row aggregated nothing .*max_failed_rounds = 2"):
        strategy.start(FakeGrid(_nodes(app, range(4)), on_send))
    assert len(strategy.history) == 2 and all(r["participants"] == 0 for r in strategy.history)


def test_a_reply_for_another_partition_or_an_impossible_count_is_refused(setup, caplog):
    config, data, app = setup

    class Liar(FakeGrid):
        def send_and_receive(self, messages, *, timeout=None):
            replies = super().send_and_receive(messages, timeout=timeout)
            for r in replies:
                if r.metadata.message_type == "train" and not r.has_error():
                    m = r.content.metric_records[METRICS]
                    if m["partition-id"] == first[0]:
                        m["num-examples"] = -1000000
                    elif m["partition-id"] == first[1]:
                        m["partition-id"] = 3 - first[1] if 3 - first[1] not in first else 0
            return replies

    first = keys.sample_clients(config.seed, 0, 4, 2)
    strategy = _run(config.replace(rounds=1), data, Liar(_nodes(app, range(4))), caplog)
    errors = strategy.history[0]["errors"]
    assert strategy.history[0]["participants"] == 0
    assert any(f"client {first[0]} update rejected: sample count must be positive" in e for e in errors)
    assert any(f"client {first[1]} failed: malformed reply: it answers for partition" in e for e in errors)


def test_node_config_state_dir_is_an_app_option():
    """The README's deployment line sets state-dir per node; it used to fail as an unknown key."""
    config, options = config_from_run_config({"preset": "fmnist-lenet5", "num-clients": 2, "clients-per-round": 2},
                                             {"partition-id": 0, "num-partitions": 2, "data-root": "/data",
                                              "state-dir": "/var/spafl"})
    assert options["state-dir"] == "/var/spafl" and config.data_root == "/data"
    _, options = config_from_run_config({"rejoin-wait": 5})
    assert options["rejoin-wait"] == 5
    with pytest.raises(ValueError, match="rejoin-wait"):
        config_from_run_config({"rejoin-wait": -1})


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_crafted_server_checkpoint_runs_no_code(setup, tmp_path, caplog):
    config, data, app = setup
    out = tmp_path / "out"
    strategy = _run(config.replace(rounds=1), data, FakeGrid(_nodes(app, range(4))), caplog, out_dir=out)
    resumed = MethodStrategy(config, dataset=data, out_dir=out)  # an honest checkpoint loads
    assert resumed.round == 1 and resumed.history == strategy.history
    marker = tmp_path / "pwned"
    torch.save({"version": 1, "engine": "flower", "payload": _Payload(marker)}, out / "checkpoint.pt")
    with pytest.raises(ValueError, match="checkpoint.pt is not a checkpoint this spafl can read: it names code to run"):
        MethodStrategy(config, dataset=data, out_dir=out)
    assert not marker.exists()


def test_the_server_falls_back_to_its_previous_checkpoint_and_checks_the_run(setup, tmp_path, caplog):
    """The Flower server's files go through the run folder: a truncated newest checkpoint
    falls back to the previous one (logged); another run's checkpoint is refused by its run id."""
    import shutil

    config, data, app = setup
    out = tmp_path / "out"
    strategy = _run(config.replace(rounds=2), data, FakeGrid(_nodes(app, range(4))), caplog, out_dir=out)
    assert (out / "checkpoint.prev.pt").is_file()
    good = (out / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(good[: len(good) // 2])
    with caplog.at_level(logging.WARNING, logger="flwr"):
        resumed = MethodStrategy(config, dataset=data, out_dir=out)
    assert resumed.round == 1 and resumed.run_id == strategy.run_id
    assert resumed.history == strategy.history[:1]
    assert "resuming from the previous checkpoint" in caplog.text and "checkpoint.pt" in caplog.text
    other = tmp_path / "other"
    _run(config.replace(rounds=1), data, FakeGrid(_nodes(client_app(config, tmp_path / "s2", data), range(4))),
         caplog, out_dir=other)
    shutil.copy(other / "checkpoint.pt", out / "checkpoint.pt")  # the same settings, another run
    with pytest.raises(ValueError, match="run id"):
        MethodStrategy(config, dataset=data, out_dir=out)


def test_a_damaged_client_state_file_falls_back_to_the_previous_one(setup, tmp_path, caplog):
    from spafl.flower.client import ClientStore

    config, _, _ = setup
    store = ClientStore(tmp_path / "partition-00001.pt", config)
    state = {"w": torch.ones(3)}
    store.save(0, None, state)
    store.save(2, state, {"w": torch.full((3,), 2.0)})
    assert store.load()["round"] == 2
    (tmp_path / "partition-00001.pt").write_bytes(b"\x00" * 10)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        saved = store.load()
    assert saved["round"] == 0 and torch.equal(saved["state"]["w"], torch.ones(3))
    assert "partition-00001.pt is not a client state file this spafl can read" in caplog.text
    (tmp_path / "partition-00001.prev.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="partition-00001.prev.pt is not a client state file"):
        store.load()


def test_malformed_uplinks_are_rejected_and_the_run_goes_on(setup, caplog):
    """An uplink that is not spafl's payload, or whose header declares a 4 TiB tensor in 60
    bytes, used to crash the strategy (in the wire log, or allocating it)."""
    import json

    from flwr.app import Array, ArrayRecord

    from spafl.flower.wire import ARRAYS, pack

    config, data, app = setup
    first = keys.sample_clients(config.seed, 0, 4, 2)
    # every threshold layer of the model, fc3 declared as 2**40 values in a few bytes
    from spafl.convert import named_threshold_layers
    from spafl.federated.models import build_model

    layers = named_threshold_layers(build_model(config.model, 10))
    header = {name: ["f32", [layer.threshold.numel()]] for name, layer in layers}
    header["fc3"] = ["f32", [1 << 40], "index", 0, "u64"]
    head = json.dumps(header).encode()
    bomb = pack(len(head).to_bytes(4, "little") + head)
    garbage = ArrayRecord({"x": Array(np.zeros(3, dtype=np.float32))})

    class Hostile(FakeGrid):
        def send_and_receive(self, messages, *, timeout=None):
            replies = super().send_and_receive(messages, timeout=timeout)
            for r in replies:
                if r.metadata.message_type == "train" and not r.has_error():
                    p = r.content.metric_records[METRICS]["partition-id"]
                    if p in first:
                        r.content[ARRAYS] = bomb if p == first[0] else garbage
            return replies

    strategy = _run(config.replace(rounds=2), data, Hostile(_nodes(app, range(4))), caplog)
    row = strategy.history[0]
    assert row["participants"] == 0 and row["rejected"] == 2
    # decoded against the round's layout: refused from its header, before anything is allocated
    assert any("fc3: payload declares f32 [1099511627776], expected f32" in e for e in row["errors"])
    assert any("unreadable uplink" in e for e in row["errors"])
    assert len(strategy.history) == 2


def test_reports_that_would_break_the_history_are_refused(setup, caplog):
    """Numbers the server would write into the history: an infinite FLOP count, an accuracy of
    1e9, an evaluation without one of the layers (used to raise KeyError in the metrics)."""
    config, data, app = setup
    first = keys.sample_clients(config.seed, 0, 4, 2)

    class Liar(FakeGrid):
        def send_and_receive(self, messages, *, timeout=None):
            replies = super().send_and_receive(messages, timeout=timeout)
            for r in replies:
                if r.metadata.message_type == "train" and not r.has_error():
                    m = r.content.metric_records[METRICS]
                    if m["partition-id"] == first[0]:
                        m["flops"] = float("inf")
                    else:
                        m["eval.acc"] = 1e9
                        del m["eval.layer.fc3"]
            return replies

    strategy = _run(config.replace(rounds=1), data, Liar(_nodes(app, range(4))), caplog)
    errors = strategy.history[0]["errors"]
    assert strategy.history[0]["dropped"] == 2 and strategy.history[0]["participants"] == 0
    assert any(f"client {first[0]} failed: malformed reply: flops = inf is outside" in e for e in errors)
    assert any(f"client {first[1]} failed: malformed reply: " in e and "expected ['conv1', 'conv2', 'fc3', 'fc4']"
               in e for e in errors)
    assert all(0 <= e["acc"] <= 100 for e in strategy.eval_cache)


def test_a_client_that_never_replies_does_not_hang_the_federation(setup, caplog):
    """Flower's own default (no round timeout) let one silent ClientApp hang the run: the
    strategy waits a finite time by default, and names the node that did not reply."""
    config, data, app = setup
    silent = 101
    timeouts = []

    class Silent(FakeGrid):
        def send_and_receive(self, messages, *, timeout=None):
            if messages and messages[0].metadata.message_type == "train":
                timeouts.append(timeout)
            kept = [m for m in messages if not (m.metadata.dst_node_id == silent
                                                and m.metadata.message_type != "query")]
            return super().send_and_receive(kept, timeout=timeout)

    strategy = _run(config, data, Silent(_nodes(app, range(4))), caplog)
    assert timeouts and all(t == 600.0 for t in timeouts)  # the documented default, finite
    assert len(strategy.history) == config.rounds
    sampled = [p for t in range(config.rounds) for p in keys.sample_clients(config.seed, t, 4, 2)]
    assert 1 in sampled  # partition 1 (node 101) is sampled at least once in this run
    warned = [r.getMessage() for r in caplog.records if "did not reply" in r.getMessage()]
    assert warned and all("node 101" in w and "within 600 s" in w for w in warned)
    assert "node 101 (partition 1) did not reply to the train message within 600 s" in warned[0]


def test_a_node_that_timed_out_is_excluded_from_later_rounds(setup, caplog):
    """Before: a node that let a round time out was sampled again, and every later round that
    sampled it waited the whole round timeout for it. Now it is excluded for the rest of the
    run; a SuperNode restarted for its partition (a new node id) takes the partition over."""
    config, data, app = setup
    config = config.replace(rounds=6)
    cohorts = [keys.sample_clients(config.seed, t, 4, 2) for t in range(config.rounds)]
    first = next(t for t, c in enumerate(cohorts) if 1 in c)
    again = [t for t, c in enumerate(cohorts) if 1 in c and t > first]
    assert again, "partition 1 must be sampled twice for this test: pick another seed"
    sent = []

    class Stalls(FakeGrid):
        def send_and_receive(self, messages, *, timeout=None):
            sent.extend((m.metadata.message_type, m.metadata.dst_node_id) for m in messages)
            kept = [m for m in messages if not (m.metadata.dst_node_id == 101
                                                and m.metadata.message_type == "train")]
            return super().send_and_receive(kept, timeout=timeout)

    restart_at = again[-1]  # a new SuperNode for partition 1 joins before the last round that samples it

    def on_list(grid):
        if len(strategy.history) == restart_at and 501 not in grid.nodes:
            grid.nodes[501] = (app, {"partition-id": 1, "num-partitions": 4})

    strategy = MethodStrategy(config, dataset=data, node_wait=1.0, rejoin_wait=1.0)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        strategy.start(Stalls(_nodes(app, range(4)), on_list=on_list))
    assert len(strategy.history) == config.rounds
    assert sent.count(("train", 101)) == 1  # the round it stalled, never again
    assert 101 in strategy.excluded and "did not reply to the train message of round" in strategy.excluded[101][0]
    assert f"node 101 excluded from sampling: did not reply to the train message of round {first + 1} " \
        "within 600 s" in caplog.text
    assert strategy.history[first]["dropped"] >= 1
    for t in again:
        if t < restart_at:  # no node serves partition 1: dropped without asking node 101
            assert strategy.history[t]["participants"] == 1
    assert strategy.nodes[1] == 501 and ("train", 501) in sent
    assert strategy.history[restart_at]["participants"] == 2


@pytest.mark.parametrize("failure", ["unreadable", "ValueError", "TimeoutError"])
def test_a_round_whose_cohort_is_rejected_rolls_the_global_state_back(setup, caplog, failure):
    """The rollback is the round engine's, so Flower's server has it too: in round 2 every
    train reply carries an unreadable uplink (both sampled clients trained and were rejected)
    or every ClientApp raises a ValueError in training (a failure on the values it was given,
    as SpaFL's layers on non-finite thresholds), so the server restores the initial global
    state and round 3 trains from it; ClientApps that raise a TimeoutError are no evidence
    against the global state: the round only fails."""
    config, data, app = setup
    state = {"round": 0}

    def client(msg, context):
        if failure != "unreadable" and msg.metadata.message_type == "train" and state["round"] == 1:
            raise {"ValueError": ValueError, "TimeoutError": TimeoutError}[failure]("round 2 fails")
        return app(msg, context)

    class Unreadable(FakeGrid):
        def send_and_receive(self, messages, *, timeout=None):
            replies = super().send_and_receive(messages, timeout=timeout)
            for r in replies:
                if (failure == "unreadable" and r.metadata.message_type == "train" and not r.has_error()
                        and state["round"] == 1):
                    r.content.array_records[ARRAYS] = pack(b"not an uplink")
            return replies

    grid = Unreadable(_nodes(client, range(4)))
    strategy = MethodStrategy(config, dataset=data, node_wait=1.0, rejoin_wait=1.0)
    original = strategy.aggregate_evaluate

    def counted(*args, **kwargs):
        out = original(*args, **kwargs)
        state["round"] += 1
        return out

    strategy.aggregate_evaluate = counted
    with caplog.at_level(logging.WARNING, logger="flwr"):
        strategy.start(grid)
    history = strategy.history
    rolls = failure != "TimeoutError"
    assert [r.get("rolled_back_to") for r in history] == [None, 0 if rolls else None, None]
    assert [r["participants"] for r in history] == [2, 0, 2] and history[1]["round_failed"] == 1
    assert (history[1]["rejected"], history[1]["dropped"]) == ((2, 0) if failure == "unreadable" else (0, 2))
    assert any("the initial global state is restored" in e for e in history[1]["errors"]) == rolls
    # round 3 trained from the restored state (its round count 2), else from the state after round 1
    assert [s.round for s in strategy.engine.rollback.states] == ([2] if rolls else [0, 2])
