"""Adversarial participants: one client (or a few colluding ones) that sends whatever the
server's checks accept, against each method (SpaFL's thresholds, FedAvg's weights and batch-norm
buffers, SparsyFed's latent weights) and each aggregator (the default mean with the cohort clip,
the median, the trimmed mean). Every attack is measured as the accuracy it costs against the
honest run with the same seed; docs/security.md states the tolerances these tests back.

The attacks know the rules: the update bounds (``Method.update_bounds``), the threshold floor,
the clip to the cohort (``rules.clip_to_cohort``) and the aggregator. The adaptive one
(``just-under``) sees every honest update of the round and sends the largest deviation the clip
lets through unscaled, in the direction that hurts most, so that nothing is reported.

CI-sized: the built-in digits, 10 clients all sampled every round, a few rounds of one local
epoch. The full-size check (20 rounds of the ``digits-cnn`` preset with 10 clients a round) is
``python benchmarks/adversary.py``.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from spafl.federated import FederatedWarning, Simulator, build_config, keys, rules

ATTACKS = ("max-shift", "sign-flip", "floor", "one-unit", "just-under")

# --- the attacks ------------------------------------------------------------------------------


def _bounds(method, server, n):
    return method.update_bounds(server, n) or {}


def _in_bounds(value, g, b):
    """``value`` pulled inside ``b`` (an UpdateBounds) around the global ``g``, with a margin."""
    if b is None:
        return value
    limit = torch.as_tensor(b.max_change, dtype=torch.float64) * 0.999
    value = torch.minimum(torch.maximum(value.double(), g.double() - limit), g.double() + limit)
    if b.floor > -math.inf:
        value = value.clamp(min=b.floor * 0.999 if b.floor < 0 else b.floor * 1.001)
    return value.float()


def _direction(name, g, honest, attack):
    """The direction an attack pushes tensor ``name``."""
    if attack in ("max-shift", "raise-all"):
        return torch.ones_like(g)
    if attack == "floor":
        return -torch.ones_like(g)
    if attack == "sign-flip":
        return -(honest - g)
    if attack == "one-unit":  # everything on one coordinate: one unit's threshold (or one weight)
        d = torch.zeros_like(g)
        d.view(-1)[0] = 1.0
        return d
    raise ValueError(attack)


def craft(attack, method, server, honest_update, n):
    """The update an adversarial client sends instead of ``honest_update`` (its own honest
    training), every value within the update bounds and above the floor."""
    bounds = _bounds(method, server, n)
    ref = method.expected_update(server)
    out = {}
    for name, g in ref.items():
        b = bounds.get(name)
        h = honest_update[name]
        if name.endswith("running_var"):
            out[name] = torch.full_like(g, 3e38)
        elif name.endswith("running_mean"):
            out[name] = torch.full_like(g, 1e30)
        elif attack == "floor" and b is not None and b.floor > -math.inf:
            out[name] = _in_bounds(torch.full_like(g, b.floor), g, b)
        else:
            far = 1e30 if b is None or not torch.isfinite(torch.as_tensor(b.max_change)).all() else 1.0
            step = torch.as_tensor(b.max_change if b is not None else 1e30, dtype=torch.float64)
            step = torch.where(torch.isfinite(step), step, torch.full_like(step, far))
            d = _direction(name, g, h, attack).double()
            if method.sparse_wire:  # within the Top-K: only where the client's own update is non-zero
                d = d * (h != 0)
            unit = d / d.abs().max().clamp(min=1e-30)
            out[name] = _in_bounds(g.double() + unit * step, g, b)
            if method.sparse_wire:  # what the Top-K zeroed stays zero
                out[name] = torch.where(h != 0, out[name], h)
    return out


class Adversary:
    """Client ids ``bad`` (``"first"``: the first client of every round's cohort) send
    ``attack``'s update every round; with ``attack="just-under"`` the server's clip sees, for
    each of them, the largest deviation it lets through unscaled (0.999 of the limit, pulled
    inside the update bounds) in the direction opposite to the honest clients' mean, per
    tensor."""

    def __init__(self, sim, bad, attack):
        self.sim, self.attack = sim, attack
        cfg = sim.config
        if bad == "first":
            self.bad = lambda t: {keys.sample_clients(cfg.seed, t, cfg.num_clients, cfg.clients_per_round)[0]}
        else:
            self.bad = lambda t: set(bad)
        self.sent = []  # this round's adversarial uploads (to find them among the accepted)
        honest_fn = sim.client_fn

        def client_fn(model, state, message, data, config, t, cid, macs, **kw):
            new_state, report = honest_fn(model, state, message, data, config, t, cid, macs, **kw)
            if cid in self.bad(t):
                if attack != "just-under":
                    report.update = craft(attack, sim.method, sim.engine.server, report.update, report.num_samples)
                self.sent.append(report.update)
            return new_state, report

        sim.client_fn = client_fn
        if attack == "just-under":
            clip = sim.method.clip_updates

            def adaptive(server, updates):
                updates = list(updates)
                bad = [i for i, u in enumerate(updates)
                       if any(all(torch.equal(u[k], s[k]) for k in u) for s in self.sent)]
                good = [u for i, u in enumerate(updates) if i not in bad]
                if not good:  # only the adversaries' updates were accepted: nothing to aim against
                    self.sent.clear()
                    return clip(server, updates)
                ref = sim.method.expected_update(server)
                n, factor = len(updates), sim.config.cohort_clip
                forged = {i: {} for i in bad}
                bounds = _bounds(sim.method, server, sim.method.sample_bound)
                for name, g in ref.items():
                    g64 = g.double()
                    norms = sorted(float((u[name].double() - g64).norm()) for u in good)
                    # the lower median once the adversaries sit at the top (the largest honest
                    # norm when they are half the cohort or more)
                    limit = (factor or 1e6) * norms[min((n - 1) // 2, len(norms) - 1)] if norms else 0.0
                    mean = torch.stack([u[name].double() - g64 for u in good]).mean(0)
                    d = -mean if float(mean.norm()) > 0 else torch.ones_like(g64)
                    for i in bad:
                        di = d * (updates[i][name] != 0) if sim.method.sparse_wire else d  # within its Top-K
                        di = di / di.norm() if float(di.norm()) > 0 else di
                        forged[i][name] = _in_bounds(g64 + di * 0.999 * limit, g, bounds.get(name))
                        if sim.method.sparse_wire:
                            forged[i][name] = torch.where(updates[i][name] != 0, forged[i][name], 0.0)
                for i in bad:
                    sim.method.validate_update(forged[i], server)  # it is an accepted update
                    updates[i] = forged[i]
                self.sent.clear()
                return clip(server, updates)

            sim.method.clip_updates = adaptive


LAST: dict = {}


def largest(state) -> float:
    return max(float(v.abs().max()) for v in state.values())


def attacked_run(config, attack=None, bad=(), *, model_fn=None, dataset=None):
    """``(history, FederatedWarning texts)`` of a run where the clients ``bad`` send ``attack``;
    :data:`LAST` holds its final global state."""
    sim = Simulator(config, model_fn=model_fn, dataset=dataset)
    if attack is not None:
        Adversary(sim, bad, attack)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            history = sim.run()
        LAST["state"] = sim.method.expected_update(sim.server)
    finally:
        sim.close()
    return history, [str(w.message) for w in caught if issubclass(w.category, FederatedWarning)]


def accuracy(history) -> float:
    """The final round's accuracy: the global model's on the whole test set where there is
    one, else the mean over the clients' own models (SpaFL)."""
    row = history[-1]
    value = row.get("acc_global")
    return float(value) if value is not None and not math.isnan(value) else float(row["acc_mean"])


# --- the CI-sized runs ------------------------------------------------------------------------


def small(method, **changes):
    """10 clients, all sampled every round, one local epoch: a few seconds a run."""
    base = dict(rounds=2, device="cpu", method=method, num_clients=10, clients_per_round=10, local_epochs=1,
                checkpoint_every=0, alpha=1.0)
    base.update(changes)
    return build_config("digits-cnn", None, base)


_HONEST: dict = {}


def honest(config, **kw) -> float:
    key = (repr(config), repr(kw))
    if key not in _HONEST:
        history, messages = attacked_run(config, **kw)
        assert not any(" update clipped: " in m or " rejected: " in m for m in messages), messages
        _HONEST[key] = accuracy(history)
    return _HONEST[key]


METHODS = ("spafl", "fedavg", "sparsyfed")


@pytest.mark.parametrize(("method", "attack"), [("spafl", "max-shift"), ("spafl", "floor"), ("fedavg", "max-shift"),
                                               ("fedavg", "sign-flip"), ("sparsyfed", "max-shift")])
def test_one_extreme_in_bounds_client_is_clipped_and_the_global_state_stays_bounded(method, attack):
    """The issue's attacks: one client of 10 sends a payload every check accepts (0.999 of the
    update bound, the threshold floor, a scaled sign flip). Without the cohort clip one such
    client throws the global state a thousand units off in one round; with the default clip
    the server scales it back to 20 median deviations and says so, every round. (What the
    scaled-back update still costs is measured, not bounded, here: see docs/security.md.)"""
    config = small(method)
    base = honest(config)
    history, messages = attacked_run(config, attack, bad=[0])
    clipped = [m for m in messages if "client 0 update clipped" in m]
    assert len({m.split(":")[0] for m in clipped}) == len(history), messages  # every round, client 0
    assert not any("update clipped" in m and "client 0" not in m for m in messages)
    defended = largest(LAST["state"])
    assert defended < 100, defended
    print(f"{method} {attack}: accuracy {accuracy(history):.2f}, honest {base:.2f}")
    if attack == "max-shift":  # the same client without the clip: the global state is thrown far off
        attacked_run(config.replace(cohort_clip=None), attack, bad=[0])
        assert largest(LAST["state"]) > 5 * defended, (largest(LAST["state"]), defended)


class DigitsBN(nn.Module):
    """A small CNN with batch norm for the 8x8 digits (FedAvg exchanges its running statistics)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                                 nn.Flatten(), nn.Linear(128, 10))

    def forward(self, x):
        return self.net(x)


def test_fedavg_batch_norm_buffers_at_1e30_and_3e38_are_clipped():
    """Failure 2 of the issue: ``running_mean = 1e30`` / ``running_var = 3e38`` from one client
    were accepted and the global model never recovered. Both are finite and a variance may be
    anything non-negative, so the update bounds accept them; the cohort clip scales them back
    (without it the global buffers are 1e29 and the accuracy that of a guess)."""
    config = small("fedavg")
    base = honest(config, model_fn=DigitsBN)
    history, messages = attacked_run(config, "max-shift", bad=[0], model_fn=DigitsBN)
    assert any("client 0 update clipped: net.1.running_mean" in m for m in messages)
    assert any("client 0 update clipped: net.1.running_var" in m for m in messages)
    assert largest(LAST["state"]) < 100, largest(LAST["state"])
    print(f"fedavg+bn: accuracy {accuracy(history):.2f}, honest {base:.2f}")
    undefended, _ = attacked_run(config.replace(cohort_clip=None), "max-shift", bad=[0], model_fn=DigitsBN)
    assert accuracy(undefended) < base - 20 and largest(LAST["state"]) > 1e29, (accuracy(undefended), base)


# The robust aggregators' documented tolerance: the coordinate-wise median holds up to 4
# colluders of 10, the trimmed mean (trim_fraction 0.2) up to 2.
TOLERANCE = {"median": 4, "trimmed-mean": 2}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("aggregator", ["median", "trimmed-mean"])
@pytest.mark.parametrize("attack", ["just-under"])
def test_robust_aggregators_hold_their_documented_colluders(method, aggregator, attack):
    """As many colluders as the aggregator's tolerance, every round, the adaptive attack (the
    largest deviation the clip lets through, against the honest clients' mean): the aggregate
    stays within the honest clients' range, coordinate by coordinate, so the global state stays
    where honest training keeps it (the accuracy it costs is printed; docs/security.md)."""
    config = small(method, aggregator=aggregator)
    base = honest(config)
    honest_largest = largest(LAST["state"])
    history, messages = attacked_run(config, attack, bad=range(TOLERANCE[aggregator]))
    assert not any("rejected" in m for m in messages), messages  # every forged update was accepted
    assert largest(LAST["state"]) <= 2 * honest_largest, (largest(LAST["state"]), honest_largest)
    print(f"{method} {aggregator} {TOLERANCE[aggregator]} colluders {attack}: accuracy {accuracy(history):.2f}, "
          f"honest {base:.2f}")
    if method != "sparsyfed":  # the same colluders against the mean: far outside the honest range
        attacked_run(config.replace(aggregator="mean"), "max-shift", bad=range(TOLERANCE[aggregator]))
        assert largest(LAST["state"]) > 2 * honest_largest


def test_the_adaptive_client_is_not_reported_and_the_mean_is_its_weakness():
    """The adaptive client stays just under the clip: the server reports nothing, and the mean
    moves by up to ``cohort_clip / 10`` median deviations a round; the median does not."""
    config = small("fedavg")
    history, messages = attacked_run(config, "just-under", bad=[0])
    assert not any("update clipped" in m for m in messages), messages
    robust, _ = attacked_run(config.replace(aggregator="median"), "just-under", bad=[0])
    assert accuracy(robust) > accuracy(history) + 5, (accuracy(robust), accuracy(history))


def test_clip_to_cohort_by_hand():
    g = {"a": torch.zeros(4), "b": torch.ones(2)}
    ups = [{"a": torch.full((4,), float(k)), "b": torch.ones(2)} for k in (1, 2, 3)]
    same, events = rules.clip_to_cohort(g, ups, 10.0)
    assert same is ups and events == []
    bad = {"a": torch.full((4,), 100.0), "b": torch.full((2,), 3e38)}
    out, events = rules.clip_to_cohort(g, [*ups, bad], 2.0)
    # lower median of the norms of "a": 2, 4, 6, 200 -> 4; limit 8
    assert [(e.index, e.name) for e in events] == [(3, "a"), (3, "b")]
    torch.testing.assert_close(out[3]["a"], torch.full((4,), 4.0))
    torch.testing.assert_close(out[3]["b"], torch.ones(2))  # the median client left b as it was
    assert all(out[i] is ups[i] for i in range(3))
    assert rules.clip_to_cohort(g, ups, None) == (ups, [])
