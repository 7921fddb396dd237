"""The server's records across rounds (rules.CohortMemory: per client; its AggregateMemory: the
whole federation) are server state: a Flower server stopped after a round and started again on
its out-dir continues from its checkpoint with the same records, so the clip lines and the
history are those of the uninterrupted run. The grid is the in-process stand-in of
tests/test_flower_faults.py (real ClientApps, no processes)."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from test_federated import small_config, strip_timing, synthetic

pytest.importorskip("flwr", reason='Flower is not installed (pip install -e ".[flower]")')

from test_flower_faults import FakeGrid, _nodes  # noqa: E402

from spafl.federated import FederatedWarning  # noqa: E402
from spafl.flower.client import client_app  # noqa: E402
from spafl.flower.server import MethodStrategy  # noqa: E402


def _records_equal(a, b) -> None:
    assert a.rounds == b.rounds and a.against == b.against and a.against
    assert a.sums.keys() == b.sums.keys()
    assert all(torch.equal(a.sums[c][n], b.sums[c][n]) for c in a.sums for n in a.sums[c])
    fa, fb = a.aggregate, b.aggregate
    assert fa.rounds == fb.rounds and fa.shift == fb.shift and fa.against == fb.against
    assert fa.sums.keys() == fb.sums.keys() and all(torch.equal(fa.sums[n], fb.sums[n]) for n in fa.sums)


def _run(config, data, state, out):
    app = client_app(config, state, data)
    strategy = MethodStrategy(config, dataset=data, out_dir=out, node_wait=1.0, rejoin_wait=1.0)
    logging.getLogger("flwr").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FederatedWarning)
        strategy.start(FakeGrid(_nodes(app, range(config.num_clients), num=config.num_clients)))
    return strategy


def test_the_records_resume_through_the_flower_servers_checkpoint(tmp_path):
    """FedAvg on Flower, 4 clients all sampled, 3 rounds, the records' limits set below the
    honest values so that both fire (per-client and federation-wide clip lines in the history):
    stopped after round 2 and resumed, the run ends with the uninterrupted run's history, clip
    lines included, and both records equal to the uninterrupted run's, read back from the
    server's checkpoint."""
    config = small_config(method="fedavg", num_clients=4, clients_per_round=4, rounds=3, cohort_drift=0.5,
                          cohort_drift_shift=0.05, cohort_drift_against=0.05, aggregate_drift=0.05)
    data = synthetic(noise=0.3, n_train=240, n_test=80)
    full = _run(config, data, tmp_path / "full-state", tmp_path / "full")
    part = _run(config.replace(rounds=2), data, tmp_path / "state", tmp_path / "out")
    assert part.engine.memory.aggregate.rounds == 2 and len(part.history) == 2
    resumed = _run(config, data, tmp_path / "state", tmp_path / "out")
    late = full.history[2]["errors"]  # round 3: what only a resumed record reproduces
    assert any("pushed the same way" in e for e in late), late
    assert any("pushed the same way round after round: its deviations from the cohort's centre would shift the "
               "whole tensor" in e for row in full.history for e in row["errors"])
    assert any(e.startswith("aggregate pulled") for e in late), late
    assert any("would pull against the cohort's direction" in e for row in full.history for e in row["errors"])
    assert strip_timing(resumed.history) == strip_timing(full.history)
    _records_equal(resumed.engine.memory, full.engine.memory)
    assert resumed.engine.memory.aggregate.rounds == 3
    # the checkpoint holds the records: a server started on the folder reads them back
    again = MethodStrategy(config, dataset=data, out_dir=tmp_path / "out")
    _records_equal(again.engine.memory, full.engine.memory)
