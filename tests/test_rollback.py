"""The server's rollback (:class:`spafl.federated.engine.RollbackRing`): a round in which more
than half of the sampled cohort trained and had its update rejected shows that no cohort can
train from the global state; the server then restores the last state a cohort trained from
successfully. Silent or failed clients never cause one, nor does one client of a cohort."""

import hashlib
import json
import warnings

import pytest
import torch
from test_federated import small_config, strip_timing, synthetic

from spafl.cli import build_parser
from spafl.federated import FederatedWarning, Simulator, keys
from spafl.federated.engine import FederationStalled, RollbackRing
from spafl.federated.flags import config_overrides


def config(**changes):
    """FedAvg (a global model: what a rollback restores is what every client trains from), six
    clients, three a round."""
    return small_config(method="fedavg", num_clients=6, clients_per_round=3, **changes)


def fingerprint(message) -> str:
    h = hashlib.sha1()
    for name in sorted(message):
        h.update(name.encode())
        h.update(message[name].detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def scripted(sim, behaviour, seen: dict | None = None):
    """Make ``sim``'s clients follow ``behaviour(t, cid, message)``: None (honest), "diverge"
    (trains, then sends non-finite values: what a client whose training diverged on the global
    state sends), "raise" (its training fails on the values it was given), "silent" (never
    replies: a lost node) or "lost" (its device fails). ``seen[t]``: each round's downlink."""
    honest = sim.client_fn

    def client(model, state, message, data, cfg, t, cid, macs, **kwargs):
        if seen is not None:
            seen.setdefault(t, {k: v.clone() for k, v in message.items()})
        what = behaviour(t, cid, message)
        if what == "silent":
            raise TimeoutError("no reply in time")
        if what == "lost":
            raise RuntimeError("device lost")
        if what == "raise":  # as SpaFL's layers on non-finite thresholds
            raise ValueError("threshold has non-finite values (NaN or inf) at units [0]")
        new_state, report = honest(model, state, message, data, cfg, t, cid, macs, **kwargs)
        if what == "diverge":
            report.update = {k: torch.full_like(v, float("nan")) for k, v in report.update.items()}
        return new_state, report

    sim.client_fn = client
    return sim


def run(sim, rounds=None):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = sim.run(rounds)
    return history, [str(w.message) for w in caught if issubclass(w.category, FederatedWarning)]


def rolled(history):
    return [row.get("rolled_back_to") for row in history]


@pytest.fixture(scope="module")
def data():
    return synthetic(n_train=300, n_test=100)


def test_a_poisoned_global_state_is_rolled_back_and_the_run_goes_on(data, tmp_path):
    """Every client that trains from the global state after round 2 sends non-finite values (a
    global state no client can train from): round 3 aggregates nothing, the state after round 1
    (what round 2's cohort trained from) is restored, and the run goes on from it."""
    poisoned, seen = set(), {}

    def behaviour(t, cid, message):
        if t == 2:
            poisoned.add(fingerprint(message))
        return "diverge" if fingerprint(message) in poisoned else None

    sim = scripted(Simulator(config(rounds=5), dataset=data, out_dir=tmp_path), behaviour, seen)
    history, messages = run(sim)
    assert [r["participants"] for r in history] == [3, 3, 0, 3, 3]
    assert [r["round_failed"] for r in history] == [0, 0, 1, 0, 0]
    assert rolled(history) == [None, None, 1, None, None]
    assert "rolled_back_to" not in history[0]  # the column only where a state was restored
    for name, value in seen[1].items():  # round 4 trains from what round 2 trained from
        assert torch.equal(seen[3][name], value)
    assert fingerprint(seen[3]) not in poisoned
    assert any(m.startswith("round 3: rollback: 3 of 3 sampled clients could not train from the global state (3 "
                            "update(s) rejected, 0 training(s) failed on its values); the global state after round 1 "
                            "is restored") for m in messages)
    assert any("rollback" in e for e in history[2]["errors"])
    saved = json.loads((tmp_path / "history.json").read_text())["history"]
    assert rolled(saved) == [None, None, 1, None, None]
    header, *rows = (tmp_path / "history.csv").read_text().splitlines()
    column = header.split(",").index("rolled_back_to")
    assert [row.split(",")[column] for row in rows] == ["", "", "1", "", ""]


@pytest.mark.parametrize(("script", "rolls", "participants"), [
    (("silent", "silent", "silent"), False, 0),  # a lost cohort: the global state is not at fault
    (("diverge", "silent", "silent"), False, 0),  # one reply of three: not a majority
    (("diverge", None, None), False, 2),  # one client of the cohort cannot cause a rollback
    (("diverge", "diverge", "silent"), True, 0),  # two of three replied, both rejected
    (("diverge", "diverge", None), True, 1),  # the minority's accepted update is not aggregated
    (("raise", "raise", "raise"), True, 0),  # training failed on the global state's values
    (("raise", "diverge", None), True, 1),
    (("raise", "lost", "silent"), False, 0),  # a lost device or node is not the global state's doing
    (("lost", "lost", "lost"), False, 0),
])
def test_only_a_cohort_that_replied_and_was_rejected_rolls_back(data, script, rolls, participants):
    cfg = config(rounds=4)
    cohort = keys.sample_clients(cfg.seed, 2, cfg.num_clients, cfg.clients_per_round)
    seen = {}
    sim = scripted(Simulator(cfg, dataset=data),
                   lambda t, cid, message: script[cohort.index(cid)] if t == 2 else None, seen)
    history, messages = run(sim)
    row = history[2]
    assert row["participants"] == participants
    assert rolled(history) == [None, None, 1 if rolls else None, None]
    assert row["round_failed"] == int(rolls or participants == 0)
    assert row["aggregate_refused"] == int(rolls and participants > 0)
    assert history[3]["round_failed"] == 0
    expected = seen[1] if rolls else seen[2] if participants == 0 else None
    if expected is not None:  # what round 4 trained from: the restored state, or the one kept
        assert all(torch.equal(seen[3][k], v) for k, v in expected.items())
    else:  # the round aggregated the two accepted updates
        assert fingerprint(seen[3]) != fingerprint(seen[2])
    assert any("rollback" in m for m in messages) == rolls


def test_each_failed_round_restores_one_level_further_back_until_the_ring_is_empty(data):
    """Every client diverges from round 3 on, whatever the state: round 3 restores the state
    after round 1, round 4 the initial one, round 5 finds the ring empty and the run stops after
    max_failed_rounds (3) failed rounds in a row, as without the rollback."""
    def always(t, cid, message):
        return "diverge" if t >= 2 else None

    sim = scripted(Simulator(config(rounds=8, max_failed_rounds=3), dataset=data), always)
    with pytest.raises(FederationStalled, match=r"3 rounds in a row aggregated nothing \(rounds 3 to 5"):
        run(sim)
    assert rolled(sim.history) == [None, None, 1, 0, None]
    assert any("rollback: 3 of 3 sampled clients" in e and "the initial global state is restored" in e
               for e in sim.history[3]["errors"])
    assert any("no earlier global state is left to restore (rollback_depth = 3)" in e
               for e in sim.history[4]["errors"])

    shallow = scripted(Simulator(config(rounds=8, max_failed_rounds=3, rollback_depth=1), dataset=data), always)
    with pytest.raises(FederationStalled):
        run(shallow)
    assert rolled(shallow.history) == [None, None, 1, None, None]

    off = scripted(Simulator(config(rounds=8, max_failed_rounds=3, rollback_depth=0), dataset=data), always)
    with pytest.raises(FederationStalled):
        run(off)
    assert rolled(off.history) == [None] * 5
    assert not any("rollback" in e for row in off.history for e in row["errors"])


def test_spafl_restores_the_thresholds_with_no_change_carried(data):
    """SpaFL's global state is its thresholds and their last change (``delta``, which the
    clients apply to their weights): a restored state carries no change."""
    seen = {}
    sim = scripted(Simulator(small_config(num_clients=6, clients_per_round=3, rounds=4), dataset=data),
                   lambda t, cid, message: "diverge" if t == 2 else None, seen)
    history, _ = run(sim)
    assert rolled(history) == [None, None, 1, None]
    thresholds = [k for k in seen[1] if k.startswith("tau/")]
    assert thresholds and all(torch.equal(seen[3][k], seen[1][k]) for k in thresholds)
    assert any(seen[1][k].any() for k in seen[1] if k.startswith("delta/"))  # round 2's change was sent
    assert all(not seen[3][k].any() for k in seen[3] if k.startswith("delta/"))  # the restore carries none


def test_with_the_rollback_off_a_minority_is_aggregated_as_before(data):
    cfg = config(rounds=3, rollback_depth=0)
    cohort = keys.sample_clients(cfg.seed, 2, cfg.num_clients, cfg.clients_per_round)
    script = ("diverge", "diverge", None)
    sim = scripted(Simulator(cfg, dataset=data), lambda t, cid, m: script[cohort.index(cid)] if t == 2 else None)
    history, _ = run(sim)
    assert (history[2]["participants"], history[2]["round_failed"], history[2]["aggregate_refused"]) == (1, 0, 0)
    assert len(sim.engine.rollback) == 0


def test_rollback_depth_is_validated_and_has_a_flag():
    for bad in (-1, True, 1.5, "3", None):
        with pytest.raises(ValueError, match="rollback_depth must be a non-negative integer"):
            small_config(rollback_depth=bad)
    assert small_config().rollback_depth == small_config().max_failed_rounds == 3
    args = build_parser().parse_args(["train", "--rollback-depth", "5"])
    assert config_overrides(args)["rollback_depth"] == 5


def test_the_ring_keeps_the_last_states_and_pops_the_newest():
    ring = RollbackRing(2)
    assert ring.pop() is None
    for state in "abc":
        ring.trained_from(state)
    assert ring.states == ["b", "c"]
    assert ring.pop() == "c" and ring.pop() == "b" and ring.pop() is None
    off = RollbackRing(0)
    off.trained_from("a")
    assert len(off) == 0


def _fail_rounds_3_and_4(t, cid, message):
    return "diverge" if t in (2, 3) else None


def test_checkpoint_and_exact_resume_across_a_rollback(data, tmp_path):
    """Rounds 3 and 4 fail on any state: round 3 restores the state after round 1, round 4
    (after the resume, from the ring in the checkpoint) the initial one."""
    cfg = config(rounds=6)
    full = scripted(Simulator(cfg, dataset=data), _fail_rounds_3_and_4)
    expected, _ = run(full)
    assert rolled(expected) == [None, None, 1, 0, None, None]

    part = scripted(Simulator(cfg, dataset=data, out_dir=tmp_path), _fail_rounds_3_and_4)
    run(part, rounds=3)
    assert [s.round for s in part.engine.rollback.states] == [0]
    stored = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert isinstance(stored["rollback"], list) and [d["round"] for d in stored["rollback"]] == [0]
    resumed = scripted(Simulator.resume(tmp_path, dataset=data), _fail_rounds_3_and_4)
    assert resumed.round == 3 and [s.round for s in resumed.engine.rollback.states] == [0]
    history, _ = run(resumed)
    assert strip_timing(history) == strip_timing(expected)
    for a, b in zip(resumed.engine.rollback.states, full.engine.rollback.states, strict=True):
        assert a.round == b.round and all(torch.equal(a.params[k], b.params[k]) for k in a.params)
    assert all(torch.equal(resumed.server.params[k], v) for k, v in full.server.params.items())


def test_an_older_checkpoint_loads_with_an_empty_ring_and_a_malformed_ring_is_refused(data):
    cfg = config(rounds=2)
    sim = Simulator(cfg, dataset=data)
    run(sim)
    ckpt = sim.state_dict()
    assert [d["round"] for d in ckpt["rollback"]] == [0, 1]

    older = {k: v for k, v in ckpt.items() if k != "rollback"}
    again = Simulator(cfg.replace(rounds=3), dataset=data)
    again.load_state_dict(older)
    assert len(again.engine.rollback) == 0
    run(again)
    assert len(again.history) == 3

    shallow = Simulator(cfg.replace(rollback_depth=1), dataset=data)  # a lowered depth keeps the newest
    shallow.load_state_dict(ckpt)
    assert [s.round for s in shallow.engine.rollback.states] == [1]

    state = ckpt["rollback"][0]
    name = next(iter(state["params"]))
    wrong_shape = {**state, "params": {**state["params"], name: torch.zeros(3)}}
    for ring, match in [("junk", "the rollback ring in the checkpoint must be a list"),
                        ([42], "the rollback ring's state 0 in the checkpoint is not a global state's mapping"),
                        ([{"round": 0}], "the rollback ring's state 0 in the checkpoint is malformed"),
                        ([wrong_shape], "does not hold this run's global state"),
                        ([{**state, "round": 7}], "must not decrease and not pass"),
                        ([ckpt["rollback"][1], state], "state 1 .* must not decrease")]:
        target = Simulator(cfg, dataset=data)
        with pytest.raises(ValueError, match=match):
            target.load_state_dict({**ckpt, "rollback": ring})


def test_which_client_errors_count_against_the_global_state():
    from spafl.federated.engine import failed_on_values

    assert failed_on_values(ValueError("threshold has non-finite values")) and failed_on_values(FloatingPointError())
    assert not failed_on_values(RuntimeError("CUDA out of memory")) and not failed_on_values(TimeoutError())
    assert failed_on_values("ValueError: threshold has non-finite values (NaN or inf) at units [0]")
    assert failed_on_values("<class 'ValueError'>:<'threshold has non-finite values'>")  # a Flower SuperNode's
    assert failed_on_values("<class 'ZeroDivisionError'>:<'division by zero'>")
    assert not failed_on_values("<class 'ConnectionError'>:<'reset'>")
    for reason in ("no reply in time", "no SuperNode serves this partition", "malformed reply: ValueError: x",
                   "RuntimeError: device lost", "", None):
        assert not failed_on_values(reason), reason
