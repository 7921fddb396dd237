"""The server's limits relative to the cohort: what one accepted update may do compared with the
other clients of its round (:func:`clip_to_cohort`: its deviation's norm, its pull against the
cohort's median direction, its shift of a whole tensor) and, per client id, across rounds
(:class:`CohortMemory`: a push in the same direction round after round). Each limit is a
multiple of the round's median deviation, set above what honest clients were measured to do,
so that honest runs are never clipped (docs/security.md). Exported by :mod:`.rules`, the one
place of the server's rules.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Clipped:
    """One update's tensor that :func:`clip_to_cohort` scaled back: the update's index in the
    list, the tensor's name, what was measured (``norm``: the deviation's Euclidean norm;
    ``kind="against"``: its component against the cohort's median direction), the limit it
    was brought to, and the cohort's lower median deviation norm the limit is a multiple of."""

    index: int | None  # None: kind "aggregate" (the whole cohort, no one client)
    name: str
    norm: float
    limit: float
    median: float
    kind: str = "norm"
    scale: float = 1.0  # kind "drift": the fraction of the deviation from the cohort's centre kept
    # kinds "aggregate", "drift": the sum that passed its limit (norm, shift, against, energy);
    # kind "norm": "kept" for the norm of the values a client kept (a tensor sent pruned), in the
    # cohort's median of those; "kept-sent", the same in the cohort's median norm as sent
    which: str = ""

    def describe(self, client: object, factor: float | None) -> str:
        """The history's line for this event (``client``: the client's id; unused for
        ``kind="aggregate"``, which concerns the round's whole cohort)."""
        if self.kind == "aggregate" and self.which == "energy":
            return (f"aggregate pulled toward the cohort's centre: {self.name}: the accepted mean's deviations from "
                    f"the cohort's coordinate-wise trimmed mean, root of their squared norms summed over the rounds, "
                    f"would reach {self.norm:.4g} median deviations, more than its limit x sqrt(rounds + "
                    f"{ENERGY_SLACK_ROUNDS}) = {self.limit:.4g}; every update's deviation from the centre scaled by "
                    f"{self.scale:.4g}")
        if self.kind == "aggregate":
            what = {"shift": "shift of the whole tensor", "against": "component against the cohort's direction"}.get(
                self.which, "Euclidean norm")
            return (f"aggregate pulled toward the cohort's centre: {self.name}: the accepted mean's deviations from "
                    f"the cohort's coordinate-wise trimmed mean, summed over the rounds, would reach {self.norm:.4g} "
                    f"median deviations ({what}), more than its limit x sqrt(rounds) = {self.limit:.4g}; every "
                    f"update's deviation from the centre scaled by {self.scale:.4g}")
        if self.kind == "drift":
            what = {"shift": "shift the whole tensor by", "against": "pull against the cohort's direction by"}.get(
                self.which, "sum to")
            return (f"client {client} update clipped: {self.name} pushed the same way round after round: its "
                    f"deviations from the cohort's centre would {what} {self.norm:.4g} median deviations, more "
                    f"than {factor:g} x sqrt(rounds) = {self.limit:.4g}; its deviation from the centre scaled by "
                    f"{self.scale:.4g}")
        if self.kind == "shift":
            return (f"client {client} update clipped: {self.name} shifted as a whole {self.norm:+.4g} from the "
                    f"cohort's median shift, more than {factor:g} x the cohort's median deviation {self.median:.4g}; "
                    f"cut to {math.copysign(self.limit, self.norm):+.4g}")
        if self.kind == "against":
            return (f"client {client} update clipped: {self.name} moved {self.norm:.4g} against the cohort's median "
                    f"direction, more than {factor:g} x the cohort's median deviation {self.median:.4g}; "
                    f"that component cut to {self.limit:.4g}")
        if self.which == "kept-sent":
            return (f"client {client} update clipped: {self.name}'s values it kept moved {self.norm:.4g} from "
                    f"their global values (Euclidean norm), more than {self.limit / self.median:.3g} x the cohort's "
                    f"median norm of the tensor as sent {self.median:.4g}; scaled to {self.limit:.4g}")
        if self.which == "kept":
            return (f"client {client} update clipped: {self.name}'s values it kept moved {self.norm:.4g} from "
                    f"their global values (Euclidean norm), more than {factor:g} x the cohort's median "
                    f"{self.median:.4g}; scaled to {self.limit:.4g}")
        return (f"client {client} update clipped: {self.name} moved {self.norm:.4g} from the global value "
                f"(Euclidean norm), more than {factor:g} x the cohort's median {self.median:.4g}; "
                f"scaled to {self.limit:.4g}")


def lower_median(values: Iterable[float]) -> float:
    """The ``ceil(n/2)``-th smallest of ``n`` values (the lower median): fewer than half of them,
    however large, cannot raise it; every limit against the cohort is a multiple of one."""
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


def clip_to_cohort(reference: Mapping[str, torch.Tensor], updates: list[Mapping[str, torch.Tensor]],
                   factor: float | None, against: float | None = None, shift: float | None = None,
                   sparse: Collection[str] = (), kept: float | None = None, kept_sent: float | None = None
                   ) -> tuple[list[Mapping[str, torch.Tensor]], list[Clipped]]:
    """Each update's deviation from the global state ``reference``, per tensor, brought within
    two limits, both multiples of the cohort's median deviation norm ``m`` for that tensor (the
    lower median: the ``ceil(n/2)``-th smallest, so that fewer than half the updates, however
    large, cannot raise it):

    1. its Euclidean norm at most ``factor * m``: a longer deviation ``d`` becomes
       ``d * factor * m / |d|`` (same direction);
    2. its component against the cohort's direction at most ``against * m``: with ``c`` the
       coordinate-wise median of the (norm-clipped) deviations (no minority moves it outside
       the others' range) and ``a = -<d, c> / |c|``, a deviation with ``a > against * m``
       loses the excess along ``c``: ``d + (a - against * m) c / |c|`` (which only shortens it).
    3. its shift of the whole tensor (the component along the all-ones direction: every
       value up, or every value down) within ``shift * m`` of the cohort's median shift.

    The norm limit bounds what one client adds to a mean in any direction; the second bounds,
    much more tightly, how far it can pull the mean back against where the cohort is going,
    which an adversary would otherwise do every round; the third, how far it can move a whole
    tensor one way (SpaFL: raise every threshold of a layer, pruning its units). Honest clients far from the others
    move mostly across the cohort's direction, not against it (the measurements are in
    docs/security.md), so both limits leave them alone. Returns ``(updates, clipped)``: the
    list itself, untouched, when nothing is clipped (the aggregate is then computed exactly as
    without the rule), else a new list in which only the clipped updates are new mappings.
    ``factor`` / ``against`` None: that limit is off.

    ``sparse``: the names of the tensors a client sends pruned (a Top-K after training: its
    exact zeros are its pruning, bounded by the global values themselves). A clipped update
    keeps its zeros (:func:`on_support`). With ``kept``, a norm limit holds for those tensors
    on the deviation of the values each client kept too (``(u - g)`` where ``u != 0``): at most
    ``kept`` times the median of the cohort's kept deviations (a longer one scaled to it, the
    pruned values left as they were). The pruning makes most of an honest deviation's norm, and
    its median alone lets one client move the values it keeps many times further than any
    honest client does. With ``kept_sent`` too, that norm is also at most ``kept_sent`` times the
    cohort's median norm of the tensors as sent (``|u|``, zeros included: the scale of what one
    update adds to the mean), which does not have the heavy tail of the kept deviations' own
    median; the smaller of the two limits holds. It needs a cohort of 3 updates or more (with
    one, the median would be the update's own norm)."""
    if (factor is None and against is None and shift is None) or not updates:
        return updates, []
    n = len(updates)
    events: list[Clipped] = []
    scaled: dict[int, dict[str, torch.Tensor]] = {}
    for name, ref in reference.items():
        g = ref.double()
        devs = [u[name].double() - g for u in updates]
        sent = list(devs)  # (the deviations as sent: the norm limit below replaces clipped ones)
        norms = [float(torch.linalg.vector_norm(d)) for d in devs]
        median = lower_median(norms)
        changed: set[int] = set()
        if factor is not None:
            limit = factor * median
            for i, norm in enumerate(norms):
                if norm > limit:
                    # limit 0 (the median client left the tensor as it was): only the global
                    # value stays within it
                    devs[i] = devs[i] * (limit / norm if math.isfinite(norm) else 0.0)
                    changed.add(i)
                    events.append(Clipped(i, name, norm, limit, median))
        if kept is not None and name in sparse:
            supports = [u[name] != 0 for u in updates]
            kept_devs = [torch.where(m, d, 0.0) for m, d in zip(supports, devs, strict=True)]
            # (the cohort's median of the kept deviations as sent: a clip above shortens only
            # updates longer than the median, and the median is taken before it)
            kept_median = lower_median(float(torch.linalg.vector_norm(torch.where(m, d, 0.0)))
                                       for m, d in zip(supports, sent, strict=True))
            limit, unit, which = kept * kept_median, kept_median, "kept"
            if kept_sent is not None and n >= 3:  # (fewer: no cohort to measure the scale by)
                sent_median = lower_median(float(torch.linalg.vector_norm(u[name].double())) for u in updates)
                if 0 < sent_median and kept_sent * sent_median < limit:
                    limit, unit, which = kept_sent * sent_median, sent_median, "kept-sent"
            for i, k in enumerate(kept_devs):
                norm = float(torch.linalg.vector_norm(k))
                if norm > limit:
                    devs[i] = devs[i] - k * (1.0 - (limit / norm if math.isfinite(norm) else 0.0))
                    changed.add(i)
                    events.append(Clipped(i, name, norm, limit, unit, which=which))
        if against is not None and n > 1 and median > 0:
            centre = torch.stack(devs).median(0).values
            length = float(torch.linalg.vector_norm(centre))
            if length > 0:
                unit = centre / length
                limit = against * median
                for i, d in enumerate(devs):
                    back = -float((d * unit).sum())
                    if back > limit:
                        devs[i] = d + (back - limit) * unit
                        changed.add(i)
                        events.append(Clipped(i, name, back, limit, median, "against"))
        if shift is not None and n > 1 and median > 0:
            unit = torch.full_like(g, 1.0 / math.sqrt(g.numel()))
            moves = [float((d * unit).sum()) for d in devs]
            centre = lower_median(moves)
            limit = shift * median
            for i, move in enumerate(moves):
                if abs(move - centre) > limit:
                    target = centre + math.copysign(limit, move - centre)
                    devs[i] = devs[i] + (target - move) * unit
                    changed.add(i)
                    events.append(Clipped(i, name, move - centre, limit, median, "shift"))
        for i in changed:
            value = on_support(g + devs[i], updates[i][name], name in sparse)
            scaled.setdefault(i, dict(updates[i]))[name] = value
    if not events:
        return updates, []
    return [scaled.get(i, u) for i, u in enumerate(updates)], events


def on_support(value: torch.Tensor, sent: torch.Tensor, sparse: bool) -> torch.Tensor:
    """A clipped tensor ``value`` in the dtype of the ``sent`` one; ``sparse`` (a tensor the
    client sends pruned): 0 wherever ``sent`` is, so that a clip never revives what a client
    pruned (a dense clipped update would make the aggregate dense: a Top-K method's global
    model would lose its sparsity to one clipped client)."""
    value = value.to(sent.dtype)
    return torch.where(sent != 0, value, torch.zeros((), dtype=sent.dtype)) if sparse else value


class CohortMemory:
    """The server's record, across rounds, of where each client pushes: per client id and
    exchanged tensor, the sum ``S`` of its accepted deviations from the cohort's centre (the
    coordinate-wise median deviation of the round), each in units of that round's median
    deviation norm ``m`` (as :func:`clip_to_cohort`), and the rounds ``k`` it was counted in.

    An honest outlier's deviation from the cohort changes direction from round to round, so its
    sum grows like ``sqrt(k)`` times one round's deviation; a participant that pushes the same
    way every round (up to the per-round limits) grows it like ``k``. :meth:`clip` keeps
    ``|S| <= limit * sqrt(k)`` by scaling the new round's deviation from the centre by the
    largest ``alpha`` in [0, 1] that does (the update moves toward the centre, so it stays
    inside every box bound the centre and the update obey), and adds what it kept to ``S``.
    Over its rounds such a participant then moves the mean by at most ``limit * sqrt(k)``
    median deviations (times its weight), where the per-round limits alone allow ``k`` times
    their size.

    It is server state: :meth:`state_dict` goes into the run's checkpoint, and a resumed run
    continues with the same sums. Memory: one float32 copy of the exchanged tensors per client
    seen."""

    def __init__(self):
        self.sums: dict[int, dict[str, torch.Tensor]] = {}
        self.rounds: dict[int, int] = {}
        # per client and tensor, the sum of its deviations' components against each round's
        # centre direction (the centre turns from round to round, so this is not a component of
        # ``sums``)
        self.against: dict[int, dict[str, float]] = {}
        self.aggregate = AggregateMemory()  # the federation's record, whatever the ids

    def clip(self, reference: Mapping[str, torch.Tensor], updates: list[Mapping[str, torch.Tensor]],
             ids: list[int], limit: float | None, commit: bool = True, shift: float | None = None,
             against: float | None = None, sparse: Collection[str] = ()
             ) -> tuple[list[Mapping[str, torch.Tensor]], list[Clipped]]:
        """``updates`` (of the clients ``ids``, already clipped per round) with the deviation
        from the centre of each client whose sum would pass ``limit * sqrt(k)`` (or whose
        sum's component along the all-ones direction, a whole tensor one way, would pass
        ``shift * sqrt(k)``, or whose components against each round's centre direction, summed,
        would pass ``against * sqrt(k)``) scaled back, and the events (``kind="drift"``:
        ``norm`` the value the sum would have reached, ``which`` "norm", "shift" or "against",
        ``limit`` the bound, ``scale`` the factor kept). The list itself, untouched, when
        nothing is clipped. ``commit`` False: the state is not changed (what an update would
        meet). Rounds of fewer than 3 updates or a zero median deviation are not counted:
        there is no cohort to measure against. ``sparse``: tensors whose zeros a clipped update
        keeps (:func:`on_support`; the sums count the deviation as scaled)."""
        n = len(updates)
        if (limit is None and shift is None and against is None) or n < 3:
            return updates, []
        if len(ids) != n or len(set(ids)) != n:
            raise ValueError(f"{n} updates need {n} distinct client ids, got {ids!r}")
        events: list[Clipped] = []
        scaled: dict[int, dict[str, torch.Tensor]] = {}
        added: dict[int, dict[str, torch.Tensor]] = {}
        added_against: dict[int, dict[str, float]] = {}
        for name, ref in reference.items():
            g = ref.double()
            devs = [u[name].double() - g for u in updates]
            median = lower_median(float(torch.linalg.vector_norm(d)) for d in devs)
            if not (median > 0 and math.isfinite(median)):
                continue
            centre = torch.stack(devs).median(0).values
            length = float(torch.linalg.vector_norm(centre))
            for i, cid in enumerate(ids):
                k = self.rounds.get(cid, 0) + 1
                old = self.sums.get(cid, {}).get(name)
                s = old.double() if old is not None else torch.zeros_like(g)
                r = (devs[i] - centre) / median
                alpha, worst = 1.0, None
                total = float(torch.linalg.vector_norm(s + r))
                if limit is not None and total > limit * math.sqrt(k):
                    # the largest alpha with |s + alpha r| <= bound (|s| <= bound: the last
                    # round's bound was smaller)
                    bound = limit * math.sqrt(k)
                    alpha, worst = _largest_kept(s, r, bound), ("norm", total, bound)
                if shift is not None:
                    root = math.sqrt(g.numel())
                    s_shift, r_shift = float(s.sum()) / root, float(r.sum()) / root
                    if abs(s_shift + r_shift) > shift * math.sqrt(k):
                        a = _largest_kept_along(s_shift, r_shift, shift * math.sqrt(k))
                        if worst is None or a < alpha:
                            alpha, worst = a, ("shift", abs(s_shift + r_shift), shift * math.sqrt(k))
                # only pulling against the cohort is limited: going its way is training
                s_against = self.against.get(cid, {}).get(name, 0.0)
                r_against = -float((r * centre).sum()) / length if length > 0 else 0.0
                if against is not None and s_against + r_against > against * math.sqrt(k):
                    a = _largest_kept_along(s_against, r_against, against * math.sqrt(k), both=False)
                    if worst is None or a < alpha:
                        alpha, worst = a, ("against", s_against + r_against, against * math.sqrt(k))
                if worst is not None:
                    value = on_support(g + centre + alpha * (devs[i] - centre), updates[i][name], name in sparse)
                    scaled.setdefault(i, dict(updates[i]))[name] = value
                    which, reached, at = worst
                    events.append(Clipped(i, name, reached, at, median, "drift", alpha, which))
                added.setdefault(i, {})[name] = (s + alpha * r).float()
                added_against.setdefault(i, {})[name] = s_against + alpha * r_against
        if commit:
            for i, cid in enumerate(ids):
                if i in added:
                    self.sums.setdefault(cid, {}).update(added[i])
                    self.against.setdefault(cid, {}).update(added_against[i])
                    self.rounds[cid] = self.rounds.get(cid, 0) + 1
        if not events:
            return updates, []
        return [scaled.get(i, u) for i, u in enumerate(updates)], events

    def state_dict(self) -> dict:
        """Tensors and plain containers only (a checkpoint loads with ``weights_only=True``)."""
        return {"sums": {int(c): dict(t) for c, t in self.sums.items()},
                "rounds": {int(c): int(k) for c, k in self.rounds.items()},
                "against": {int(c): {str(k): float(v) for k, v in a.items()} for c, a in self.against.items()},
                "aggregate": self.aggregate.state_dict()}

    def load_state_dict(self, state: Mapping | None) -> None:
        """``state`` from :meth:`state_dict`; None (a checkpoint written before the record
        existed): empty."""
        state = state or {"sums": {}, "rounds": {}}
        sums, rounds = state.get("sums"), state.get("rounds")
        if not isinstance(sums, Mapping) or not isinstance(rounds, Mapping):
            raise ValueError("the cohort memory in the checkpoint must hold 'sums' and 'rounds' mappings")
        for cid, tensors in sums.items():
            if not isinstance(tensors, Mapping) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
                raise ValueError(f"the cohort memory of client {cid} in the checkpoint is not a mapping of tensors")
        # a checkpoint written before the sums against the cohort were kept: none yet
        against = state.get("against", {})
        if not isinstance(against, Mapping) or not all(
                isinstance(a, Mapping) and all(isinstance(v, float) and math.isfinite(v) for v in a.values())
                for a in against.values()):
            raise ValueError("the cohort memory in the checkpoint must hold an 'against' mapping of numbers per client")
        self.sums = {int(c): {str(k): v.float().clone() for k, v in t.items()} for c, t in sums.items()}
        self.rounds = {int(c): int(k) for c, k in rounds.items()}
        self.against = {int(c): {str(k): float(v) for k, v in a.items()} for c, a in against.items()}
        self.aggregate = AggregateMemory()
        self.aggregate.load_state_dict(state.get("aggregate"))


def _largest_kept(s: torch.Tensor, r: torch.Tensor, bound: float) -> float:
    """The largest ``alpha`` in [0, 1] with ``|s + alpha r| <= bound`` (0 when even ``|s|``
    passes it)."""
    rr, sr, ss = float((r * r).sum()), float((s * r).sum()), float((s * s).sum())
    if rr == 0:
        return 1.0
    return max(0.0, min(1.0, (-sr + math.sqrt(max(sr * sr - rr * (ss - bound * bound), 0.0))) / rr))


def _largest_kept_along(s: float, r: float, bound: float, both: bool = True) -> float:
    """The largest ``alpha`` in [0, 1] with ``s + alpha r <= bound`` (and, ``both``,
    ``>= -bound``)."""
    if r > 0 and s + r > bound:
        return max(0.0, min(1.0, (bound - s) / r))
    if both and r < 0 and s + r < -bound:
        return max(0.0, min(1.0, (-bound - s) / r))
    return 1.0


@dataclass(frozen=True)
class AggregateLimits:
    """The limits of :class:`AggregateMemory`, each in round median deviations times
    sqrt(rounds): ``norm`` on the sum's Euclidean norm (any direction), ``shift`` on its
    component along the all-ones direction (every value of a tensor one way), ``against`` on
    its component against the direction of each round's centre (undoing training);
    ``energy`` on the root of the rounds' squared norms summed, times
    ``sqrt(rounds + ENERGY_SLACK_ROUNDS)`` (the rounds' root mean square: a new direction every
    round, which the three sums cannot tell from honest noise). None: that limit off."""

    norm: float | None = None
    shift: float | None = None
    against: float | None = None
    energy: float | None = None

    def off(self) -> bool:
        return self.norm is None and self.shift is None and self.against is None and self.energy is None


# The energy limit's allowance for the first rounds: an honest cohort's mean strays furthest from
# its trimmed mean while the model is new (one honest round of a golden run reaches 1.87 median
# deviations, where later rounds settle near 0.3), so the budget is that of this many rounds
# more. Of 4, 8, 16, 24, 32 and 48, 24 and 32 leave one participant the least over 20 rounds
# with SpaFL's limit above every honest run measured (32 a little less; docs/security.md).
ENERGY_SLACK_ROUNDS = 24


# The limits are set from cohorts of 10; a smaller cohort's trimmed mean is nearer its median and
# the honest distance from the mean to it larger (about 2.8x at 3 updates).
_CALIBRATED_COHORT = 10


@functools.lru_cache(maxsize=64)
def _trimmed_mean_noise(n: int) -> float:
    # The spread of (mean - trimmed mean) over n i.i.d. standard normals, by a fixed-seed draw:
    # the same number on every run and every machine with this torch.
    draws = torch.randn(20000, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    trim = max(1, int(0.2 * n))
    return float((draws.mean(1) - draws.sort(1).values[:, trim:n - trim].mean(1)).std())


def _small_cohort_scale(n: int) -> float:
    """1 from 10 updates up (where the defaults were measured), else what brings a smaller
    cohort's honest noise down to that of 10: a small cohort is never clipped more, and the
    limits' meaning does not change with its size."""
    if n >= _CALIBRATED_COHORT:
        return 1.0
    return min(1.0, _trimmed_mean_noise(_CALIBRATED_COHORT) / _trimmed_mean_noise(n))


class AggregateMemory:
    """The server's record, across rounds, of where the accepted mean goes relative to the
    cohort's robust centre, whoever sent what. Each round and exchanged tensor, with ``mean``
    the aggregator's weighted mean of the accepted deviations from the global state, ``c``
    their coordinate-wise trimmed mean (``max(1, floor(0.2 n))`` dropped at each end: one
    participant at either end moves it by at most one rank) and ``m``
    the round's lower median deviation norm, ``r = (mean - c) / m`` (for fewer than 10 updates
    scaled down to the honest noise of 10: :func:`_small_cohort_scale`) is added to three sums:
    the vector ``S`` itself, its component along the all-ones direction (``shift``) and its
    component against the cohort's direction ``-c / |c|`` (``against``); ``k`` counts the
    rounds.

    In an honest round the mean and the median differ by sampling noise whose direction changes
    from round to round, so each sum grows like ``sqrt(k)``, and the two components, one
    direction of many, stay much smaller than the norm. One adversarial participant a round
    moves the mean by its weight times its deviation but ``c`` by at most one rank, and
    pushes the same way whatever client id it uses, so the sum along its direction grows like
    ``k``. :meth:`clip` keeps every sum within its limit times ``sqrt(k)``
    (:class:`AggregateLimits`) by moving every update's deviation toward the centre by the same
    factor (the mean moves toward ``c`` by the excess; ``c`` does not move), and adds
    what it kept.

    The three sums cannot see a participant that pushes in a new direction every round (noise
    the size of the limit each round, which sums like honest noise): a fourth sum, ``E``, adds
    each round's ``|r|^2``, and ``sqrt(E)`` is kept within ``energy * sqrt(k + ENERGY_SLACK_ROUNDS)``,
    a bound on the rounds' root mean square ``|r|`` whatever their directions. An honest
    cohort's ``|r|`` is largest in the first rounds and settles to a fraction of it, so that
    bound, set above the honest values, is well below what the other sums let one participant
    add every round. Unlike :class:`CohortMemory` it needs no client ids, so a participant that
    returns under a new id every round meets the same record. It is server state (in
    :class:`CohortMemory`'s :meth:`~CohortMemory.state_dict`)."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.shift: dict[str, float] = {}
        self.against: dict[str, float] = {}
        self.energy: dict[str, float] = {}
        self.rounds = 0

    def clip(self, reference: Mapping[str, torch.Tensor], updates: list[Mapping[str, torch.Tensor]],
             weights: list[float] | None, limits: AggregateLimits | None, commit: bool = True,
             sparse: Collection[str] = ()) -> tuple[list[Mapping[str, torch.Tensor]], list[Clipped]]:
        """``updates`` with every deviation from the cohort's centre scaled toward it in each
        tensor one of whose sums would pass its limit times ``sqrt(k)``, and the events
        (``kind="aggregate"``, ``index`` None). ``weights``: the mean's weights (None:
        uniform). The list itself, untouched, when nothing is clipped; ``commit`` False: the
        record is not changed. Rounds of fewer than 3 updates are not counted (no cohort to
        measure against); a tensor whose median deviation is 0 adds nothing. ``sparse``: tensors
        whose zeros every update keeps (:func:`on_support`; the sums count the mean as scaled)."""
        n = len(updates)
        if limits is None or limits.off() or n < 3:
            return updates, []
        if weights is None:
            w = torch.full((n,), 1.0 / n, dtype=torch.float64)
        else:
            w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
            if len(w) != n or not bool(torch.isfinite(w).all()) or bool((w <= 0).any()):
                raise ValueError(f"{n} updates need {n} positive finite weights, got {weights!r}")
            w = w / w.sum()
        k = self.rounds + 1
        root = math.sqrt(k)
        events: list[Clipped] = []
        scaled: dict[int, dict[str, torch.Tensor]] = {}
        added: dict[str, tuple[torch.Tensor, float, float, float]] = {}
        for name, ref in reference.items():
            g = ref.double()
            devs = torch.stack([u[name].double() - g for u in updates])
            median = lower_median(float(torch.linalg.vector_norm(d)) for d in devs)
            old = self.sums.get(name)
            s = old.double() if old is not None else torch.zeros_like(g)
            s_shift, s_against = self.shift.get(name, 0.0), self.against.get(name, 0.0)
            s_energy = self.energy.get(name, 0.0)
            if not (median > 0 and math.isfinite(median)):
                added[name] = (s.float(), s_shift, s_against, s_energy)
                continue
            # the trimmed mean: a participant at either end moves it no more than one rank, as
            # the median, while the honest noise of the mean's distance to it is a fraction of
            # its distance to the median (the limits can be that much tighter)
            trim = max(1, int(0.2 * n))
            centre = devs.sort(0).values[trim:n - trim].mean(0)
            r = (torch.tensordot(w, devs, dims=1) - centre) / median * _small_cohort_scale(n)
            r_shift = float(r.sum()) / math.sqrt(r.numel())
            length = float(torch.linalg.vector_norm(centre))
            r_against = -float((r * centre).sum()) / length if length > 0 else 0.0
            r_energy = float((r * r).sum())
            alpha, worst = 1.0, None
            for kind, limit, value, scale in (
                    ("norm", limits.norm, float(torch.linalg.vector_norm(s + r)), root),
                    ("shift", limits.shift, abs(s_shift + r_shift), root),
                    ("against", limits.against, s_against + r_against, root),
                    ("energy", limits.energy, math.sqrt(s_energy + r_energy), math.sqrt(k + ENERGY_SLACK_ROUNDS))):
                if limit is None or value <= limit * scale:
                    continue
                bound = limit * scale
                if kind == "norm":
                    a = _largest_kept(s, r, bound)
                elif kind == "shift":
                    a = _largest_kept_along(s_shift, r_shift, bound)
                elif kind == "energy":  # s_energy + a^2 r_energy <= bound^2
                    a = math.sqrt(max(0.0, bound * bound - s_energy) / r_energy) if r_energy > 0 else 1.0
                else:  # only pulling against the cohort is limited: going its way is training
                    a = _largest_kept_along(s_against, r_against, bound, both=False)
                if worst is None or a < alpha:
                    alpha, worst = min(alpha, a), (kind, value, bound)
            if worst is not None:
                for i, u in enumerate(updates):
                    value = on_support(g + centre + alpha * (devs[i] - centre), u[name], name in sparse)
                    scaled.setdefault(i, dict(u))[name] = value
                kind, value, bound = worst
                events.append(Clipped(None, name, value, bound, median, "aggregate", alpha, kind))
            added[name] = ((s + alpha * r).float(), s_shift + alpha * r_shift, s_against + alpha * r_against,
                           s_energy + alpha * alpha * r_energy)
        if commit:
            for name, (s, s_shift, s_against, s_energy) in added.items():
                self.sums[name], self.shift[name], self.against[name] = s, s_shift, s_against
                self.energy[name] = s_energy
            self.rounds = k
        if not events:
            return updates, []
        return [scaled.get(i, u) for i, u in enumerate(updates)], events

    def state_dict(self) -> dict:
        return {"sums": dict(self.sums), "shift": dict(self.shift), "against": dict(self.against),
                "energy": dict(self.energy), "rounds": int(self.rounds)}

    def load_state_dict(self, state: Mapping | None) -> None:
        """``state`` from :meth:`state_dict`; None (a checkpoint written before the record
        existed): empty; no ``energy`` (written before that sum was kept): that sum empty."""
        state = state or {"sums": {}, "shift": {}, "against": {}, "rounds": 0}
        sums, rounds = state.get("sums"), state.get("rounds")
        shift, against, energy = state.get("shift"), state.get("against"), state.get("energy", {})
        if not isinstance(sums, Mapping) or not all(isinstance(t, torch.Tensor) for t in sums.values()):
            raise ValueError("the aggregate's record in the checkpoint must hold a 'sums' mapping of tensors")
        for what, values in (("shift", shift), ("against", against), ("energy", energy)):
            if not isinstance(values, Mapping) or not all(
                    isinstance(v, float) and math.isfinite(v) for v in values.values()):
                raise ValueError(f"the aggregate's record in the checkpoint must hold a '{what}' mapping of numbers")
        if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 0:
            raise ValueError(f"the aggregate's record in the checkpoint must count its rounds, got {rounds!r}")
        self.sums = {str(k): v.float().clone() for k, v in sums.items()}
        self.shift = {str(k): float(v) for k, v in shift.items()}
        self.against = {str(k): float(v) for k, v in against.items()}
        if any(v < 0 for v in energy.values()):
            raise ValueError("the aggregate's record in the checkpoint must hold non-negative 'energy' sums")
        self.energy = {str(k): float(v) for k, v in energy.items()}
        self.rounds = rounds
