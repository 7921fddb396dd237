"""Full-size adversary check: 20 rounds of the ``digits-cnn`` preset with 10 clients a round,
each method's default settings, one adversarial client in every round (the first of its cohort; every attack
of tests/test_adversary.py, the adaptive ones ``just-under*`` sending the largest update the
server's rule leaves alone), and the accuracy it costs against the honest run with the same
seed; also how often the cohort clip fired on the honest run.

    OMP_NUM_THREADS=1 python benchmarks/adversary.py [--methods spafl,fedavg,sparsyfed]
        [--attacks max-shift,...] [--rounds 20] [--cohort-clip X] [--bad 0]
        [--cohort-against X] [--cohort-shift X] [--cohort-drift X] [--cohort-drift-against X] [--aggregate-drift X]
        [--aggregate-shift X] [--aggregate-against X] [--aggregate-energy X]
        [--seeds 0,1,2]

``--record`` runs the honest run alone, with the limits against the cohort across rounds (the
federation's and each client's) and each round's limits against the cohort and on a whole
tensor's shift out of reach (the norm limit ``cohort_clip`` stays), and prints, per round
(``round norm``, ``round against``, ``round shift``: what ``cohort_clip``, ``Method.cohort_against``
and ``Method.cohort_shift`` limit, in the round's median deviations), the largest value each
of the federation's sums reached (what the defaults of ``Method.aggregate_drift``,
``aggregate_shift``, ``aggregate_against`` and ``aggregate_energy`` were set above) and
the largest component of one update along the record's direction, from the cohort's median
along it (``along``: in the cohort's spread along it; ``along/m``: in median deviations), what
a limit of each round along the record's direction would have to allow; and, per client id
(``rules.CohortMemory``, its limits out of reach too), the largest ``|S| / sqrt(k)`` (``client
norm``: ``Method.cohort_drift``) and its component along the all-ones direction (``client
shift``: ``Method.cohort_drift_shift``; ``client against``: its sum of pulls against each
round's centre, ``Method.cohort_drift_against``; ``k`` here the rounds the client took part in);
then the same honest run with the limits in force (the method's defaults unless set) and its
clip events (none: the defaults leave that run alone):

    OMP_NUM_THREADS=1 python benchmarks/adversary.py --record [--preset digits-cnn]
        [--clients-per-round 10] [--rounds 20] [--set rng=global --set local_epochs=1 ...]

``--energy`` runs the honest run alone with the federation's limits out of reach and every other
limit as configured, and prints the largest root mean square of the record's round terms (what
``Method.aggregate_energy`` was set above; ``ENERGY_SLACK_ROUNDS`` added to the rounds):

    OMP_NUM_THREADS=1 python benchmarks/adversary.py --energy --methods spafl,fedavg,sparsyfed,topk
        [--rounds 60 --clients-per-round 0] [--seeds ...]

``--attacks null`` is the control: the adversarial client sends its own update with its
deviation 1.001 times as long, so its "loss" is the run's sensitivity to any change of a round
(the noise floor the attacks are read against).

Each attacked run prints its failed rounds and the rollbacks of the global state (``rollbacks``:
each round after which an earlier state was restored, and the round whose state it was;
``--set rollback_depth=0`` turns them off), its clip events by kind (norm, against, shift, drift: one client's;
aggregate: the whole cohort pulled toward its centre), so that the limit an attack rides is
visible, and the largest per-client sum against the cohort any client reached (``client
against``, as ``--record`` prints it: what ``Method.cohort_drift_against`` would have to stop).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import re
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import test_adversary  # noqa: E402
from test_adversary import ATTACKS, accuracy, attacked_run  # noqa: E402

from spafl.federated import build_config, rules  # noqa: E402
from spafl.federated.engine import FederationStalled  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="spafl,fedavg,sparsyfed")
    p.add_argument("--attacks", default=",".join(ATTACKS))
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--bad", default="first",
                   help="comma-separated adversarial client ids, or 'first': the first client of every cohort")
    p.add_argument("--cohort-clip", default="default", help="a number, 'inf' (off), or 'default' (the method's)")
    p.add_argument("--cohort-against", default="default", help="a number, 'inf' (off), or 'default' (the method's)")
    p.add_argument("--cohort-shift", default="default", help="a number, 'inf' (off), or 'default' (the method's)")
    p.add_argument("--cohort-drift", default="default", help="a number, 'inf' (off), or 'default' (the method's)")
    p.add_argument("--cohort-drift-against", default="default",
                   help="a number, 'inf' (off), or 'default' (the method's)")
    for name in ("drift", "shift", "against", "energy"):
        p.add_argument(f"--aggregate-{name}", default="default",
                       help="a number, 'inf' (off), or 'default' (the method's)")
    p.add_argument("--aggregator", default="mean")
    p.add_argument("--seeds", default="",
                   help="comma-separated seeds: each run (honest and attacked) once per seed, then each attack's "
                        "loss as mean, min and max over them (default: the preset's seed)")
    p.add_argument("--energy", action="store_true",
                   help="the honest run alone, the federation's limits out of reach and every other limit at its "
                        "default: the largest root mean square of the record's round terms (aggregate_energy)")
    p.add_argument("--record", action="store_true",
                   help="the honest run alone: the largest sums of the federation's record (rules.AggregateMemory)")
    p.add_argument("--preset", default="digits-cnn")
    p.add_argument("--clients-per-round", type=int, default=10, help="0: the preset's")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="another setting (an int, a float or a string), e.g. rng=global")
    args = p.parse_args()
    torch.set_num_threads(1)
    bad = "first" if args.bad == "first" else [int(c) for c in args.bad.split(",")]
    for method in args.methods.split(","):
        overrides = {"rounds": args.rounds, "device": "cpu", "method": method,
                     "aggregator": args.aggregator, "checkpoint_every": 0}
        if args.clients_per_round:
            overrides["clients_per_round"] = args.clients_per_round
        for item in args.set:
            name, value = item.split("=", 1)
            overrides[name] = _number(value)
        if args.record:
            record(build_config(args.preset, None, overrides))
            continue
        if args.energy:
            for seed in [int(x) for x in args.seeds.split(",")] if args.seeds else [None]:
                energy(build_config(args.preset, None, overrides if seed is None else {**overrides, "seed": seed}))
            continue
        if args.cohort_clip != "default":
            overrides["cohort_clip"] = math.inf if args.cohort_clip in ("none", "inf") else float(args.cohort_clip)
        for name in ("cohort_against", "cohort_shift", "cohort_drift", "cohort_drift_against", "aggregate_drift",
                     "aggregate_shift", "aggregate_against", "aggregate_energy"):
            if getattr(args, name) != "default":
                overrides[name] = float(getattr(args, name))
        seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [None]
        losses: dict[str, list[float]] = {}
        for seed in seeds:
            if seed is not None:
                overrides["seed"] = seed
            config = build_config(args.preset, None, overrides)
            for attack, loss in attack_runs(config, method, args.attacks.split(","), bad, args.rounds).items():
                losses.setdefault(attack, []).append(loss)
        if len(seeds) > 1:
            for attack, values in losses.items():
                print(f"{method} {attack} bad={bad} seeds {args.seeds}: loss mean {sum(values) / len(values):+.2f} "
                      f"points (min {min(values):+.2f}, max {max(values):+.2f}; "
                      + ", ".join(f"{v:+.2f}" for v in values) + ")", flush=True)


def attack_runs(config, method: str, attacks: list[str], bad, rounds: int) -> dict[str, float]:
    """The honest run of ``config`` and each attack's; prints each and returns the points each
    attack cost (NaN where the run stopped)."""
    start = time.perf_counter()
    history, messages = attacked_run(config)
    clipped = sum(" update clipped: " in m or "aggregate pulled" in m for m in messages)
    base = accuracy(history)
    print(f"{method} seed {config.seed} honest: acc {base:.2f}, clip events {clipped} over {rounds} rounds "
          f"({time.perf_counter() - start:.0f} s)", flush=True)
    out = {}
    for attack in attacks:
        test_adversary.RIDDEN.clear()
        peaks: dict = {}
        try:
            with client_peaks(peaks):
                history, messages = attacked_run(config, attack, bad)
        except FederationStalled as e:  # every client's training diverged: the run stopped
            print(f"{method} {attack} bad={bad}: the run stopped: {e}", flush=True)
            out[attack] = math.nan
            continue
        acc = accuracy(history)
        out[attack] = base - acc
        clipped = sum(" update clipped: " in m for m in messages)
        rejected = sum(" update rejected: " in m for m in messages)
        kinds = Counter(_kind(m) for m in messages if " update clipped: " in m or "aggregate pulled" in m)
        ridden = f", limits ridden {dict(sorted(test_adversary.RIDDEN.items()))}" if test_adversary.RIDDEN else ""
        against = peaks.get("client against")
        reached = f", client against {against[0]:.3f} ({against[1]}, k {against[2]})" if against else ""
        restored = [(row["round"], row["rolled_back_to"]) for row in history if row.get("rolled_back_to") is not None]
        rolled = (f", rollbacks {len(restored)} (" + ", ".join(f"round {r} to {k}" for r, k in restored) + ")"
                  if restored else "")
        failed = sum(row["round_failed"] for row in history)
        print(f"{method} seed {config.seed} {attack} bad={bad}: acc {acc:.2f} (loss {base - acc:+.2f} points), "
              f"clip events {clipped}, rejections {rejected}, by kind {dict(sorted(kinds.items()))}{ridden}"
              f"{reached}, failed rounds {failed}{rolled}", flush=True)
    return out


def _number(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def record(config) -> None:
    """The honest run of ``config`` with every limit against the cohort out of reach (the norm
    limit ``cohort_clip`` stays); prints the largest value over every round and tensor of each
    round's limited quantities (:func:`_round_peaks`), of the federation's sums (norm, shift,
    against: ``|S| / sqrt(k)``, ``S / sqrt(k)`` against the cohort), of an update's component
    along the record's direction and of each client's sums (:func:`client_peaks`), where and
    when; then runs ``config`` as given (the limits in force) and prints its clip events."""
    defaults = config
    config = config.replace(aggregate_drift=1e30, aggregate_shift=1e30, aggregate_against=1e30, aggregate_energy=1e30,
                            cohort_drift=1e30, cohort_drift_shift=1e30, cohort_drift_against=1e30,
                            cohort_against=1e30, cohort_shift=1e30)
    peaks: dict = {}
    clip = rules.AggregateMemory.clip
    def watched(self, reference, updates, weights, limits, commit=True, sparse=()):
        n = len(updates)
        if commit and n >= 3:  # each update's component along the record's direction, in spreads
            for name, ref in reference.items():
                s = self.sums.get(name)
                devs = torch.stack([u[name].double() - ref.double() for u in updates])
                if s is None or float(s.norm()) == 0 or float(devs.norm()) == 0:
                    continue
                trim = max(1, int(0.2 * n))
                centre = devs.sort(0).values[trim:n - trim].mean(0)
                p = (devs - centre).reshape(n, -1) @ (s.double() / s.double().norm()).reshape(-1)
                q = float(p.sort().values[(n - 1) // 2])
                spread = float((p - q).abs().sort().values[(n - 1) // 2])
                m = sorted(float(d.norm()) for d in devs)[(n - 1) // 2]
                for kind, unit in (("along", spread), ("along/m", m)):
                    if unit > 0 and float(p.max() - q) / unit > peaks.get(kind, (-math.inf,))[0]:
                        peaks[kind] = (float(p.max() - q) / unit, name, self.rounds + 1)
        out = clip(self, reference, updates, weights, limits, commit, sparse)
        if commit and self.rounds:
            root = math.sqrt(self.rounds)
            slack = math.sqrt(self.rounds + rules.ENERGY_SLACK_ROUNDS)
            for name, s in self.sums.items():
                for kind, value in (("norm", float(s.norm()) / root), ("shift", abs(self.shift[name]) / root),
                                    ("against", self.against[name] / root),
                                    ("energy", math.sqrt(self.energy[name]) / slack)):
                    if value > peaks.get(kind, (-math.inf,))[0]:
                        peaks[kind] = (value, name, self.rounds)
        return out

    rules.AggregateMemory.clip = watched
    per_round = rules.clip_to_cohort
    rounds_seen = [0]

    def round_watched(reference, updates, factor, against=None, shift=None, sparse=(), kept=None, kept_sent=None):
        rounds_seen[0] += 1
        _round_peaks(peaks, reference, updates, rounds_seen[0], sparse)
        return per_round(reference, updates, factor, against, shift, sparse, kept, kept_sent)

    rules.clip_to_cohort = round_watched
    try:
        start = time.perf_counter()
        with client_peaks(peaks):
            history, messages = attacked_run(config)
    finally:
        rules.AggregateMemory.clip = clip
        rules.clip_to_cohort = per_round
    clipped = sum(" update clipped: " in m or "aggregate pulled" in m for m in messages)
    print(f"{config.method} honest record ({config.rounds} rounds, {config.clients_per_round} a round, "
          f"seed {config.seed}): "
          + "; ".join(f"{kind} {v:.3f} ({name}, round {k})" for kind, (v, name, k) in peaks.items())
          + f"; clip events {clipped}; acc {accuracy(history):.2f} ({time.perf_counter() - start:.0f} s)", flush=True)
    # the same honest run with the configured limits (the method's defaults unless set)
    history, messages = attacked_run(defaults)
    kinds = Counter(_kind(m) for m in messages if " update clipped: " in m or "aggregate pulled" in m)
    print(f"{config.method} honest run with the limits in force: clip events {sum(kinds.values())} "
          f"{dict(sorted(kinds.items()))}; acc {accuracy(history):.2f}", flush=True)


def energy(config) -> None:
    """The honest run of ``config`` with the federation's limits out of reach (every other
    limit as configured: the updates the record sees are those of the run with the defaults);
    prints the largest ``sqrt(E / (k + ENERGY_SLACK_ROUNDS))`` over every tensor and round
    (what ``Method.aggregate_energy`` was set above), the largest single round's ``|r|`` and
    the largest root mean square of ``|r|`` after round 5, each with its tensor and round."""
    config = config.replace(aggregate_drift=1e30, aggregate_shift=1e30, aggregate_against=1e30, aggregate_energy=1e30)
    terms: list[dict[str, float]] = []
    clip = rules.AggregateMemory.clip

    def watched(self, reference, updates, weights, limits, commit=True, sparse=()):
        before = dict(self.energy)
        out = clip(self, reference, updates, weights, limits, commit, sparse)
        if commit and len(updates) >= 3:
            terms.append({name: self.energy[name] - before.get(name, 0.0) for name in reference})
        return out

    rules.AggregateMemory.clip = watched
    try:
        start = time.perf_counter()
        history, messages = attacked_run(config)
    finally:
        rules.AggregateMemory.clip = clip
    peak, single, late = (0.0, "", 0), (0.0, "", 0), (0.0, "")
    for name in terms[0] if terms else ():
        total = 0.0
        for k, row in enumerate(terms, 1):
            total += row[name]
            peak = max(peak, (math.sqrt(total / (k + rules.ENERGY_SLACK_ROUNDS)), name, k))
            single = max(single, (math.sqrt(row[name]), name, k))
        if len(terms) > 5:
            late = max(late, (math.sqrt(sum(row[name] for row in terms[5:]) / (len(terms) - 5)), name))
    clipped = sum(" update clipped: " in m or "aggregate pulled" in m for m in messages)
    print(f"{config.method} honest energy ({config.rounds} rounds, {config.clients_per_round} a round, seed "
          f"{config.seed}): {peak[0]:.3f} ({peak[1]}, round {peak[2]}); largest round {single[0]:.2f} ({single[1]}, "
          f"round {single[2]}); root mean square after round 5 {late[0]:.2f} ({late[1] or '-'}); other clip events "
          f"{clipped}; acc {accuracy(history):.2f} ({time.perf_counter() - start:.0f} s)", flush=True)


def _round_peaks(peaks: dict, reference, updates, round_index: int, sparse=()) -> None:
    """Into ``peaks``, per kind (``round norm``, ``round against``, ``round shift``), the
    largest value ``(v, tensor, round)`` over the round's updates and tensors of what
    :func:`rules.clip_to_cohort` limits (``cohort_clip``, ``cohort_against``, ``cohort_shift``),
    in the round's lower median deviation norms, computed as it computes them before clipping;
    for the ``sparse`` tensors also ``round kept norm``, the norm of the values each client kept
    in their own median, and ``round kept/sent``, the same norm in the median norm of the
    tensors as sent."""
    n = len(updates)
    if n < 2:
        return
    for name, ref in reference.items():
        devs = torch.stack([u[name].double() - ref.double() for u in updates]).reshape(n, -1)
        norms = devs.norm(dim=1)
        m = float(norms.sort().values[(n - 1) // 2])
        if m <= 0:
            continue
        values = {"round norm": float(norms.max()) / m}
        if name in sparse:
            kept = torch.stack([(u[name] != 0).reshape(-1) for u in updates])
            kept_norms = torch.where(kept, devs, 0.0).norm(dim=1)
            m_kept = float(kept_norms.sort().values[(n - 1) // 2])
            if m_kept > 0:
                values["round kept norm"] = float(kept_norms.max()) / m_kept
            # the same norms in the cohort's median norm of the tensors as sent (g + d, zeros
            # included): the scale of what one update adds to the mean
            sent = torch.stack([u[name].double().reshape(-1) for u in updates]).norm(dim=1)
            m_sent = float(sent.sort().values[(n - 1) // 2])
            if m_sent > 0:
                values["round kept/sent"] = float(kept_norms.max()) / m_sent
        centre = devs.median(0).values
        if float(centre.norm()) > 0:
            values["round against"] = float((-(devs @ (centre / centre.norm()))).max()) / m
        moves = devs.sum(1) / math.sqrt(devs.shape[1])
        values["round shift"] = float((moves - moves.sort().values[(n - 1) // 2]).abs().max()) / m
        for kind, value in values.items():
            if value > peaks.get(kind, (-math.inf,))[0]:
                peaks[kind] = (value, name, round_index)


@contextlib.contextmanager
def client_peaks(peaks: dict):
    """While it is open, ``peaks`` gets, per kind (``client norm``, ``client shift``, ``client
    against``), the largest value ``(v / sqrt(k), tensor, k)`` any client's sums in
    ``rules.CohortMemory`` reach after a round (``|S|``, its component along all-ones, its sum of
    pulls against each round's centre; ``k`` the rounds the client took part in)."""
    client_clip = rules.CohortMemory.clip

    def client_watched(self, reference, updates, ids, limit, commit=True, shift=None, against=None, sparse=()):
        out = client_clip(self, reference, updates, ids, limit, commit, shift, against, sparse)
        if commit:
            for cid in ids:
                root = math.sqrt(self.rounds.get(cid, 1))
                for name, s in self.sums.get(cid, {}).items():
                    for kind, value in (("client norm", float(s.norm())),
                                        ("client shift", abs(float(s.sum())) / math.sqrt(s.numel())),
                                        ("client against", self.against.get(cid, {}).get(name, 0.0))):
                        if value / root > peaks.get(kind, (-math.inf,))[0]:
                            peaks[kind] = (value / root, name, self.rounds.get(cid, 1))
        return out

    rules.CohortMemory.clip = client_watched
    try:
        yield peaks
    finally:
        rules.CohortMemory.clip = client_clip


def _kind(message: str) -> str:
    """The limit a clip line names (cohort.Clipped.describe)."""
    if "aggregate pulled" in message:
        return "aggregate"
    for kind, pattern in (("drift", "pushed the same way"), ("shift", "shifted as a whole"),
                          ("against", "against the cohort's median"), ("norm", r"\(Euclidean norm\)")):
        if re.search(pattern, message):
            return kind
    return "other"


if __name__ == "__main__":
    main()
