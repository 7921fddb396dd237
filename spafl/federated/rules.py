"""The server's rules, in one place for every method and transport: what it accepts from a
client and how it combines what it accepted.

A client is trusted with nothing: its update must be the tensors the server expects (names,
shapes, dtype, finite values: :func:`check_payload`, :func:`validate_update`), each value
within what a legitimate client's round can produce (:class:`UpdateBounds`; a method states
its bounds in ``Method.update_bounds``, from :func:`sgd_reach` and :func:`gradient_bound`), its
sample count a positive integer no larger than the server knows the client to hold
(:func:`check_sample_count`); the accepted updates are combined by the configured aggregator
(:func:`aggregate_tensors`: mean, median or trimmed mean) and the aggregate is checked again
before it becomes the global state (:func:`check_aggregate`). The limits against the cohort
(:func:`clip_to_cohort` each round, :class:`CohortMemory` across rounds per client and
:class:`AggregateMemory` for the whole federation) live in :mod:`.cohort`
and are exported here. A new defence (a tighter bound,
clipping relative to the cohort, another aggregator) belongs here and in ``Method.update_bounds``
/ ``Method.aggregate``; the round (:mod:`.engine`) applies them to every transport alike.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from .cohort import (  # noqa: F401  (the rules' one public face)
    ENERGY_SLACK_ROUNDS,
    AggregateLimits,
    AggregateMemory,
    Clipped,
    CohortMemory,
    clip_to_cohort,
)
from .config import FedConfig
from .training import learning_rate, num_batches
from .wire import _DTYPES

Tensors = dict[str, torch.Tensor]


class UpdateRejected(ValueError):
    """A client's update failed the server's checks; the global state was not touched."""


class FederatedWarning(UserWarning):
    """A client was dropped from a round or its update was rejected, or the server set aside
    part of a round's input or refused its aggregate (the run goes on)."""


class AggregateWarning(FederatedWarning):
    """The server set aside part of a round's input (an update with an impossible sample count)
    or refused its aggregate (kept the global state); the run goes on."""


# The bound on one gradient coordinate assumed for a run without gradient clipping. Measured
# on this project's CPU runs (largest |gradient| coordinate any SGD step saw): digits-cnn 60
# rounds 5.6 on thresholds and 3.6 on weights (FedAvg 2.3, SparsyFed 5.2, Top-K 3.7 over 20
# rounds); fmnist-lenet5, raw 0..255 pixels, 2 rounds: 44 on thresholds, 49 on weights. With
# clipping (every CIFAR preset) the clip norm is the bound and nothing is assumed.
DEFAULT_GRAD_BOUND = 1000.0


def gradient_bound(config: FedConfig) -> float:
    """``G``, the largest |gradient| coordinate a legitimate client's SGD step applies: the
    clip norm when gradient clipping is on (it bounds the whole gradient's norm), else
    ``config.grad_bound`` (default :data:`DEFAULT_GRAD_BOUND`)."""
    if config.clip is not None:
        return float(config.clip)
    return float(config.grad_bound if config.grad_bound is not None else DEFAULT_GRAD_BOUND)


def local_steps(config: FedConfig, num_samples: int) -> int:
    """SGD steps of one client's round: ``local_epochs * batches``."""
    return config.local_epochs * num_batches(num_samples, config.batch_size, config.drop_last)


def sgd_reach(config: FedConfig, round_index: int, num_samples: int, start: torch.Tensor,
              grad_bound: float) -> torch.Tensor:
    """Per coordinate, the furthest a round of local SGD can move a parameter from ``start``
    (same shape), when no gradient coordinate exceeds ``grad_bound``.

    SGD with momentum ``mu`` (PyTorch's: ``v <- mu v + g + wd p``, ``p <- p - lr v``) keeps
    ``|v| <= (G + wd |p|) / (1 - mu)`` (a geometric series; momentum carried over from earlier
    rounds obeys it too), so ``S`` steps at ``lr`` move a coordinate at most
    ``D = S lr (G + wd |start|) / (1 - mu - S lr wd)`` (the ``wd`` terms bound ``|p|`` by
    ``|start| + D``). Infinite when ``S lr wd >= 1 - mu`` (weight decay that strong bounds
    nothing)."""
    steps = local_steps(config, num_samples)
    lr = learning_rate(config, round_index)
    mu, wd = config.momentum, config.weight_decay
    denominator = 1.0 - mu - steps * lr * wd
    if denominator <= 0:
        return torch.full_like(start, math.inf)
    return steps * lr * (grad_bound + wd * start.abs()) / denominator


def threshold_floor(config: FedConfig) -> float:
    """The lowest threshold the server accepts: ``-ln(G / th_coeff)``, where the penalty's own
    gradient ``lambda_t exp(-tau)`` reaches the gradient bound ``G`` (``lambda_t <= th_coeff``
    in both schedules). Above it the thresholds' gradient is at most ``2 G`` (task loss and
    penalty); below it the penalty, not the task, moves the threshold, and a little lower its
    ``exp(-tau)`` overflows float32 and every client that receives it fails. ``-inf`` without
    a penalty (``th_coeff = 0``)."""
    if config.th_coeff <= 0:
        return -math.inf
    return -math.log(gradient_bound(config) / config.th_coeff)


@dataclass(frozen=True)
class UpdateBounds:
    """What a legitimate client can return for one tensor, relative to the global value ``g``
    it was sent: every value ``u`` within ``max_change`` of ``g`` (a tensor of ``g``'s shape
    or a number), or equal to 0 when ``zero_ok`` (a post-training prune: Top-K), or within
    ``max_change`` of 0 when ``reset_ok`` (SpaFL's collapse guard resets thresholds to 0, then
    training goes on); and ``u >= floor``. ``rule`` says where the bound comes from (it is
    quoted when an update is rejected)."""

    max_change: torch.Tensor | float = math.inf
    floor: float = -math.inf
    zero_ok: bool = False
    reset_ok: bool = False
    rule: str = ""


def _rejection(name: str, bad: torch.Tensor, what: str, value: torch.Tensor, rule: str) -> UpdateRejected:
    first = tuple(int(i) for i in torch.nonzero(bad)[0]) if bad.dim() else ()
    return UpdateRejected(f"{name}: {int(bad.sum())} value(s) {what}; first at {list(first)}: "
                          f"{float(value[first] if bad.dim() else value):.4g}" + (f" (rule: {rule})" if rule else ""))


def check_bounds(name: str, value: torch.Tensor, reference: torch.Tensor, bounds: UpdateBounds) -> None:
    """Raise :class:`UpdateRejected` unless every value of ``value`` obeys ``bounds`` relative
    to the global ``reference`` (same shape)."""
    if bounds.floor > -math.inf:
        low = value < bounds.floor
        if bool(low.any()):
            raise _rejection(name, low, f"below the floor {bounds.floor:.4g}", value, bounds.rule)
    limit = torch.as_tensor(bounds.max_change, dtype=torch.float64)
    # A relative slack of 1e-5 for float32 rounding in the client's arithmetic.
    slack = 1e-5 * (limit + reference.double().abs())
    change = (value.double() - reference.double()).abs()
    ok = change <= limit + slack
    if bounds.zero_ok:
        ok |= value == 0
    if bounds.reset_ok:
        ok |= value.double().abs() <= limit + slack
    if not bool(ok.all()):
        far = ~ok
        worst = float(change[far].max())
        raise _rejection(name, far, f"further from the global value than a legitimate round can move them "
                         f"(largest change {worst:.4g}, bound {float(limit.max() if limit.dim() else limit):.4g})",
                         value, bounds.rule)


def check_payload(tensors: object, expected: Mapping[str, torch.Tensor] | None = None,
                  max_numel: int | None = None) -> None:
    """Raise :class:`UpdateRejected` unless ``tensors`` is a message :func:`encode` can
    serialise: a mapping of string names to dense (strided) tensors with data (not ``meta``)
    of an encodable dtype; with ``expected``, exactly its names, shapes and dtypes; without
    it, at most ``max_numel`` values in all when given. Nothing is copied or serialised, so
    the check is cheap for any input (a huge tensor is refused by its shape); the server's
    round loop runs it on each client's report inside its per-client error handling, before
    :func:`encode`."""
    if not isinstance(tensors, Mapping):
        raise UpdateRejected(f"an update must be a mapping of tensors, got {type(tensors).__name__}")
    names = list(tensors)
    odd = [n for n in names if not isinstance(n, str)]
    if odd:
        raise UpdateRejected(f"tensor names must be strings, got {odd[:3]!r}")
    if expected is not None:
        missing, extra = sorted(set(expected) - set(names)), sorted(set(names) - set(expected))
        if missing or extra:
            raise UpdateRejected(f"update names differ: missing {missing[:10]}, unexpected {extra[:10]}")
    total = 0
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise UpdateRejected(f"{name}: expected a tensor, got {type(t).__name__}")
        if t.layout != torch.strided:
            raise UpdateRejected(f"{name}: a {t.layout} tensor; updates are dense (strided) tensors")
        if t.is_meta:
            raise UpdateRejected(f"{name}: a meta tensor (a shape without data)")
        if expected is not None:
            ref = expected[name]
            if t.shape != ref.shape:
                raise UpdateRejected(f"{name}: shape {tuple(t.shape)}, expected {tuple(ref.shape)}")
            if t.dtype != ref.dtype:
                raise UpdateRejected(f"{name}: dtype {t.dtype}, expected {ref.dtype}")
        elif t.dtype not in _DTYPES:
            raise UpdateRejected(f"{name}: dtype {t.dtype} cannot be sent (sendable: {', '.join(map(str, _DTYPES))})")
        total += t.numel()
    if max_numel is not None and total > max_numel:
        raise UpdateRejected(f"{total} values, more than the {max_numel} allowed")


def validate_update(update: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor],
                    bounds: Mapping[str, UpdateBounds] | None = None) -> None:
    """Raise :class:`UpdateRejected` unless ``update`` holds exactly the expected tensors: same
    names, shapes and dtype (float32), all finite, and, with ``bounds`` (per name, relative to
    the values of ``expected``, the global state the client was sent), every value within
    what a legitimate client can produce (:func:`check_bounds`)."""
    check_payload(update, expected)
    for name, ref in expected.items():
        t = update[name]
        if not bool(torch.isfinite(t).all()):
            raise UpdateRejected(f"{name}: {int((~torch.isfinite(t)).sum())} non-finite value(s)")
        if bounds is not None and name in bounds:
            check_bounds(name, t, ref, bounds[name])


def check_sample_count(num_samples: object, known: int | None = None) -> int:
    """A client's reported training-sample count, validated: a positive integer (a bool, a
    float, NaN are refused), and no more than ``known`` (what the server knows the client or
    the whole training set holds) when given. Raises :class:`UpdateRejected`."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)):
        raise UpdateRejected(f"sample count must be an integer, got {type(num_samples).__name__} {num_samples!r}")
    n = int(num_samples)
    if n < 1:
        raise UpdateRejected(f"sample count must be positive, got {n}")
    if known is not None and n > known:
        raise UpdateRejected(f"sample count {n} is more than the {known} training samples the server knows of")
    return n


def aggregate_tensors(updates: list[Mapping[str, torch.Tensor]], names: Iterable[str], aggregator: str = "mean",
                      trim_fraction: float = 0.2, weights: list[float] | None = None) -> Tensors:
    """Per name, the coordinate-wise aggregate of the updates' tensors (float32):

    - ``"mean"``: the mean, weighted by ``weights`` (positive, finite) when given, else uniform;
    - ``"median"``: the median (the mean of the two middle values for an even count), as
      Flower's FedMedian;
    - ``"trimmed-mean"``: the mean after dropping the ``floor(trim_fraction * n)`` smallest
      and largest values, as Flower's FedTrimmedAvg.

    The median and the trimmed mean ignore ``weights``: a client cannot buy influence with its
    reported sample count, and no fraction of values below one half (the median) or below
    ``trim_fraction`` (the trimmed mean) can move them outside the range of the others."""
    if not updates:
        raise ValueError("nothing to aggregate")
    if aggregator not in ("mean", "median", "trimmed-mean"):
        raise ValueError(f"unknown aggregator {aggregator!r}; aggregators: mean, median, trimmed-mean")
    n = len(updates)
    out = {}
    if aggregator == "mean" and weights is not None:
        if len(weights) != n:
            raise ValueError(f"{n} updates but {len(weights)} weights")
        w = torch.tensor(weights, dtype=torch.float64)
        if not bool(torch.isfinite(w).all()) or bool((w <= 0).any()):
            raise ValueError(f"weights must be positive and finite, got {weights}")
        w = (w / w.sum()).float()
    for name in names:
        if aggregator == "mean" and weights is not None:
            out[name] = sum(wi * u[name].float() for wi, u in zip(w, updates, strict=True))
            continue
        stacked = torch.stack([u[name].float() for u in updates])
        if aggregator == "mean":
            out[name] = stacked.mean(0)
            continue
        ordered = stacked.sort(0).values
        if aggregator == "median":
            mid = n // 2
            out[name] = ordered[mid] if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2
        else:
            k = int(trim_fraction * n)
            out[name] = ordered[k : n - k].mean(0)
    return out


def check_aggregate(before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor],
                    bounds: Mapping[str, UpdateBounds] | None = None) -> None:
    """Raise :class:`UpdateRejected` unless the aggregate ``after`` could become the global
    state: the names, shapes and dtypes of ``before``, finite, and within ``bounds`` of
    ``before`` (an aggregate of updates that each passed :func:`validate_update` always is; this
    catches a caller that aggregated unchecked updates, and arithmetic that overflowed)."""
    try:
        validate_update(after, before, bounds)
    except UpdateRejected as e:
        raise UpdateRejected(f"aggregate refused: {e}") from e
