"""The interface every federated method implements, and the parts the methods share.

A method is a set of functions over plain tensors, driven by the round (:mod:`..engine`) the
same way whatever the transport: ``prepare_model``, ``init_server``, ``broadcast``,
``client_round`` (the client's side), ``expected_update`` / ``update_bounds`` /
``validate_update`` (what the server accepts, with :mod:`..rules`), ``aggregate``, and
``load`` (the model a client is evaluated with). The base class is a FedAvg-style method over
the model's floating-point state; each method's module overrides what differs.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
from torch import nn

from ...convert import densify
from .. import accounting, keys, rules, training
from ..config import _DATASET_SHAPES, FedConfig
from ..data import ClientData
from ..rules import AggregateWarning, UpdateRejected
from ..training import ClientReport

Tensors = dict[str, torch.Tensor]

_WEIGHT_LAYERS = (nn.Linear, nn.Conv2d)


@dataclass
class GlobalState:
    """A global model's exchanged tensors (float32, on the host) and the round count."""

    params: Tensors
    round: int = 0

    def state_dict(self) -> dict:
        return {"params": self.params, "round": self.round}

    @classmethod
    def from_state_dict(cls, d: Mapping) -> GlobalState:
        return cls(dict(d["params"]), int(d["round"]))


def exchanged(state: Mapping[str, torch.Tensor]) -> Tensors:
    """The floating-point entries of a state dict (weights, biases, batch-norm parameters and
    running statistics) as float32 host copies; integer counters stay local."""
    return {k: v.detach().float().cpu().clone() for k, v in state.items() if v.is_floating_point()}


def weighted_mean(updates: list[Mapping[str, torch.Tensor]], weights: list[float]) -> Tensors:
    """``sum_k n_k x_k / sum_k n_k`` for every tensor name."""
    return rules.aggregate_tensors(updates, list(updates[0]), "mean", weights=weights)


# Training-set sizes of the named datasets: the most samples any client of a run can hold,
# so the most a reported sample count may say when the server knows nothing finer.
TRAIN_SIZES = {"digits": 1438, "fmnist": 60000, "cifar10": 50000, "cifar100": 50000}


def _load_exchanged(model: nn.Module, message: Mapping[str, torch.Tensor]) -> None:
    state = model.state_dict()
    unknown = sorted(set(message) - set(state))
    if unknown:
        raise KeyError(f"the message holds tensors the model does not have: {unknown[:5]}")
    with torch.no_grad():
        for k, v in message.items():
            state[k].copy_(v)


class Method:
    """The interface, with the parts the methods share (see the module docstring)."""

    name = ""
    personalised = True  # each client keeps, and is evaluated with, its own model
    communicates = True
    sparse_wire = False  # messages are sent in the sparse encoding (wire.encode(sparse=True))
    # The default norm limit (config.cohort_clip None): each accepted update's deviation from
    # the global state within this many of the round's median deviation norms
    # (rules.clip_to_cohort). FedAvg's: honest clients' norms stay below about 3 median
    # deviations in almost every round, with rare single outliers (16.1 in one round of a
    # 20-round run, seed 1: one client's local training thrown off, the global accuracy down 5.6
    # points that round); the limit clips those, leaves the accuracy of the honest runs measured
    # as it was but one, by one test image (ten seeds of 20 rounds, two of 60), and bounds one
    # participant flipping its own update every round (docs/security.md, "The same runs on a second machine").
    cohort_clip: float = 8.0
    # The default limit on pulling against the cohort (config.cohort_against None), in cohort
    # median deviations. An adversary's pull against the cohort is what costs a global model
    # accuracy; honest clients of these methods pulled back at most 0.96 median deviations in
    # the measured runs (docs/security.md).
    cohort_against: float = 1.0
    # The default limit on shifting a whole tensor one way (config.cohort_shift None), in
    # cohort median deviations from the cohort's median shift: honest FedAvg clients went to
    # 2.9 (docs/security.md).
    cohort_shift: float = 4.0
    # The default limit across rounds (config.cohort_drift None): a client's deviations from the
    # cohort's centre, summed over the rounds it took part in, within this many median
    # deviations times sqrt(rounds) (rules.CohortMemory): honest FedAvg clients reached 8.45
    # in the measured runs (60 rounds; 4.22 in 20: a non-IID client keeps leaning one way, so
    # the value grows with the rounds a client takes part in; docs/security.md).
    cohort_drift: float = 10.0
    # The default limit on that sum's component along the all-ones direction, a whole tensor
    # one way (config.cohort_drift_shift None; rules.CohortMemory): honest FedAvg clients
    # reached 1.63 median deviations times sqrt(rounds) (60 rounds; 0.70 in the CI-sized runs;
    # docs/security.md), far below the norm's 8.45, where a client raising a whole tensor has
    # the two equal.
    cohort_drift_shift: float = 1.8
    # The default limit on the same deviations' components against each round's centre
    # direction, summed (config.cohort_drift_against None; rules.CohortMemory): off (inf) for
    # FedAvg. Its honest clients reached 1.83 median deviations times sqrt(rounds) (conv2, 60
    # rounds), the adaptive attacks 2.7 to 5.2, but with the limit at 2.0 one client a round
    # flipping its own update cost more on each of six seeds (mean 31.6 points against 20.4;
    # docs/security.md).
    cohort_drift_against: float = math.inf
    # The default limits on the federation's drift (config.aggregate_drift, aggregate_shift,
    # aggregate_against None): the accepted mean's deviations from the cohort's trimmed mean,
    # summed over the rounds, within these many median deviations times sqrt(rounds), in norm,
    # along all-ones and against the cohort (rules.AggregateMemory). Honest FedAvg runs reached
    # 0.93, 0.31 and 0.09 (docs/security.md).
    aggregate_drift: float = 1.2
    aggregate_shift: float = 0.5
    aggregate_against: float = 0.3
    # The default limit on the root mean square over the rounds (plus
    # rules.ENERGY_SLACK_ROUNDS) of the same deviations' norms, whatever their directions
    # (config.aggregate_energy None; rules.AggregateMemory). Honest FedAvg runs reached 0.417
    # (digits-cnn, 20 rounds of 10 and 60 of 5, seeds 0 to 2; the golden and CI-sized runs;
    # docs/security.md).
    aggregate_energy: float = 0.46
    # The aggregate's mean weighs the updates by their sample counts (SpaFL's is uniform)
    weighted_mean = True

    def __init__(self, config: FedConfig):
        self.config = config
        # The most training samples a client can hold (caps reported sample counts and the
        # local steps the update bounds allow); a server that knows its data sets it.
        self.sample_bound: int | None = TRAIN_SIZES.get(config.dataset)
        # Names of the exchanged tensors that SGD trains (the rest are buffers, such as batch
        # norm's running statistics); set by init_server from the model.
        self.trained: frozenset[str] | None = None
        self.refused: str | None = None  # why the last aggregate was refused (None: accepted)
        # (multiply-adds of one sample at full density, parameter count): set by note_costs
        self._costs: tuple[int, int] | None = None

    # model
    def prepare_model(self, model: nn.Module) -> nn.Module:
        """The method's model from the (seeded, freshly built) SpaFL architecture."""
        return densify(model)

    def prunable(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """Layers whose density is reported and whose multiply-adds are counted."""
        return [(n, m) for n, m in model.named_modules() if isinstance(m, _WEIGHT_LAYERS)]

    # server
    def init_server(self, model: nn.Module) -> GlobalState:
        self.trained = frozenset(name for name, _ in model.named_parameters())
        self.note_costs(model)
        return GlobalState(exchanged(model.state_dict()) if self.communicates else {})

    def note_costs(self, model: nn.Module) -> None:
        """Record what the most expensive legitimate client round costs on ``model`` (the
        multiply-adds of one sample at full density, the parameter count), for
        :meth:`flops_bound`. Left unset when the model does not take the dataset's named image
        shape (a custom model or dataset): reported FLOPs are then only checked to be finite."""
        self._costs = None
        shape = _DATASET_SHAPES.get(self.config.dataset)
        if shape is None:
            return
        try:
            device = next(model.parameters()).device
            macs = accounting.layer_macs(model, shape, device, layers=self.prunable(model))
        except (RuntimeError, StopIteration, ValueError):
            return
        self._costs = (sum(macs.values()), sum(p.numel() for p in model.parameters()))

    def flops_bound(self, num_samples: int | None) -> float | None:
        """The most FLOPs a legitimate client holding ``num_samples`` training samples (None:
        the ``sample_bound``) can report for a round: every layer at full density, every
        parameter counted as a threshold and a weight (:func:`accounting.training_flops`'s
        terms, each at its largest). None when unknown."""
        n = num_samples if num_samples is not None else self.sample_bound
        if self._costs is None or n is None:
            return None
        macs, params = self._costs
        cfg = self.config
        return (3.0 * cfg.local_epochs * n * macs + params * training.num_batches(n, cfg.batch_size, cfg.drop_last)
                + params)

    def broadcast(self, server) -> Tensors:
        return dict(server.params)

    def expected_update(self, server) -> Tensors:
        """The tensors an uplink must hold (names, shapes, dtypes), at their global values."""
        return server.params if self.communicates else {}

    def check_payload(self, update: object, server) -> None:
        """Raise :class:`UpdateRejected` unless ``update`` is this round's uplink in form (a
        mapping of the expected names to dense tensors of the expected shapes and dtypes);
        cheap, and safe on any object: the round loop runs it before encoding an update."""
        rules.check_payload(update, self.expected_update(server))

    def check_sample_count(self, num_samples: object, known: int | None = None) -> int:
        """A client's reported sample count, validated (:func:`rules.check_sample_count`)
        against ``known`` (what the server knows the client holds) or the method's
        ``sample_bound``."""
        return rules.check_sample_count(num_samples, known if known is not None else self.sample_bound)

    def update_bounds(self, server, num_samples: int | None = None) -> dict[str, rules.UpdateBounds] | None:
        """The values a legitimate client's update can hold (None: ``update_bounds`` off): each
        weight SGD trains within :func:`rules.sgd_reach` of its global value, under the
        gradient bound :func:`rules.gradient_bound`; a buffer (batch norm's running
        statistics) anything finite, a running variance non-negative. ``num_samples`` (the
        client's count; default the ``sample_bound``) sets the local steps."""
        if not self.config.update_bounds:
            return None
        n = num_samples if num_samples is not None else self.sample_bound
        g = rules.gradient_bound(self.config)
        zero_ok = self.sparse_wire  # a post-training Top-K may zero any weight
        lr = training.learning_rate(self.config, server.round)
        out = {}
        for name, value in self.expected_update(server).items():
            if name.endswith("running_var"):
                out[name] = rules.UpdateBounds(floor=0.0, rule="a variance is not negative")
            elif (self.trained is None or name in self.trained) and n is not None:
                steps = rules.local_steps(self.config, n)
                rule = (f"{steps} SGD steps at lr {lr:.3g}, momentum {self.config.momentum}, |gradient| <= {g:g}"
                        f"{' (clip)' if self.config.clip is not None else ''}")
                out[name] = rules.UpdateBounds(rules.sgd_reach(self.config, server.round, n, value, g),
                                                  zero_ok=zero_ok, rule=rule)
        return out

    def validate_update(self, update: Mapping[str, torch.Tensor], server, num_samples: int | None = None) -> None:
        """Raise :class:`UpdateRejected` unless ``update`` is an uplink a legitimate client could
        have sent this round (:func:`rules.validate_update` with :meth:`update_bounds`)."""
        rules.validate_update(update, self.expected_update(server), self.update_bounds(server, num_samples))

    def clip_updates(self, server, updates: list[Tensors], ids: list[int] | None = None,
                     memory: rules.CohortMemory | None = None, commit: bool = True,
                     weights: list[float] | None = None) -> tuple[list[Tensors], list[rules.Clipped]]:
        """The round's accepted updates with each tensor's deviation from the global state
        clipped to ``cohort_clip`` times the cohort's median (:func:`rules.clip_to_cohort`),
        then, with the clients' ``ids`` and the server's ``memory``, each client's push across
        rounds kept within :meth:`drift_limit` and, along the all-ones direction,
        :meth:`drift_shift_limit` (:meth:`rules.CohortMemory.clip`; ``commit``
        False: the memory is left as it was), then the federation's drift across rounds, whatever
        the ids, within :meth:`aggregate_limit` (:meth:`rules.AggregateMemory.clip`, with the
        updates' sample counts ``weights``: the mean's weights), and what was clipped. The
        round applies it before :meth:`aggregate`."""
        reference = self.expected_update(server)
        sparse = self.pruned_by_clients()
        updates, events = rules.clip_to_cohort(reference, updates, self.norm_limit(), self.against_limit(),
                                               self.shift_limit(), sparse, self.kept_limit(), self.kept_sent_limit())
        if memory is not None and ids is not None:
            updates, more = memory.clip(reference, updates, ids, self.drift_limit(), commit,
                                        shift=self.drift_shift_limit(), against=self.drift_against_limit(),
                                        sparse=sparse)
            events = events + more
        if memory is not None and self.config.aggregator == "mean":
            mean_weights = weights if self.weighted_mean and weights is not None else None
            updates, more = memory.aggregate.clip(reference, updates, mean_weights, self.aggregate_limit(), commit,
                                                  sparse)
            events = events + more
        return updates, events

    def pruned_by_clients(self) -> frozenset[str]:
        """The exchanged tensors a client prunes before sending (its exact zeros are its
        pruning): a clip never revives what it pruned (:func:`rules.clip_to_cohort`). None
        here; Top-K's weights."""
        return frozenset()

    def kept_limit(self) -> float | None:
        """The limit on the deviation of the values a client kept in :meth:`pruned_by_clients`,
        in the cohort's median of those (:func:`rules.clip_to_cohort`'s ``kept``): None here
        (off); Top-K's norm limit."""
        return None

    def kept_sent_limit(self) -> float | None:
        """The same deviation's limit in the cohort's median norm of the tensors as sent
        (:func:`rules.clip_to_cohort`'s ``kept_sent``): None here (off); Top-K's while its
        :meth:`kept_limit` is on."""
        return None

    def aggregate_limit(self) -> rules.AggregateLimits:
        """The limits on the accepted mean's deviations from the cohort's centre summed over the
        rounds, in median deviations times sqrt(rounds) (:class:`rules.AggregateMemory`): each
        the configured ``aggregate_drift`` / ``aggregate_shift`` / ``aggregate_against`` /
        ``aggregate_energy``, else
        the method's attribute of that name; None when off (inf)."""
        def limit(name):
            value = getattr(self.config, name)
            value = value if value is not None else getattr(self, name)
            return None if value == math.inf else value

        return rules.AggregateLimits(limit("aggregate_drift"), limit("aggregate_shift"), limit("aggregate_against"),
                                     limit("aggregate_energy"))

    def drift_limit(self) -> float | None:
        """The limit on a client's deviations from the cohort's centre summed over its rounds,
        in median deviations times sqrt(rounds) (:class:`rules.CohortMemory`): the configured
        ``cohort_drift``, else the method's :attr:`cohort_drift`; None when off (inf)."""
        value = self.config.cohort_drift if self.config.cohort_drift is not None else self.cohort_drift
        return None if value == float("inf") else value

    def drift_shift_limit(self) -> float | None:
        """The limit on the component along the all-ones direction (a whole tensor one way) of
        a client's deviations from the cohort's centre summed over its rounds, in median
        deviations times sqrt(rounds) (:class:`rules.CohortMemory`): the configured
        ``cohort_drift_shift``, else the method's :attr:`cohort_drift_shift`; None when off (inf)."""
        value = (self.config.cohort_drift_shift if self.config.cohort_drift_shift is not None
                 else self.cohort_drift_shift)
        return None if value == math.inf else value

    def drift_against_limit(self) -> float | None:
        """The limit on a client's deviations from the cohort's centre, each projected against
        that round's centre direction, summed over its rounds, in median deviations times
        sqrt(rounds) (:class:`rules.CohortMemory`): the configured ``cohort_drift_against``,
        else the method's :attr:`cohort_drift_against`; None when off (inf)."""
        value = (self.config.cohort_drift_against if self.config.cohort_drift_against is not None
                 else self.cohort_drift_against)
        return None if value == math.inf else value

    def shift_limit(self) -> float | None:
        """The limit on a client's shift of a whole tensor away from the cohort's median shift,
        in cohort median deviations (:func:`rules.clip_to_cohort`): the configured
        ``cohort_shift``, else the method's :attr:`cohort_shift`; None when off (inf)."""
        value = self.config.cohort_shift if self.config.cohort_shift is not None else self.cohort_shift
        return None if value == float("inf") else value

    def norm_limit(self) -> float | None:
        """The limit on a client's deviation from the global state, in the round's median
        deviation norms (:func:`rules.clip_to_cohort`): the configured ``cohort_clip``, else the
        method's :attr:`cohort_clip`; None when off (inf)."""
        value = self.config.cohort_clip if self.config.cohort_clip is not None else self.cohort_clip
        return None if value == math.inf else value

    def against_limit(self) -> float | None:
        """The limit on the component of a client's deviation against the cohort's median
        direction, in cohort median deviations (:func:`rules.clip_to_cohort`): the configured
        ``cohort_against``, else the method's :attr:`cohort_against`; None when off (inf)."""
        value = self.config.cohort_against if self.config.cohort_against is not None else self.cohort_against
        return None if value == float("inf") else value

    def _combine(self, server, updates: list[Tensors], weights: list[float]):
        """The aggregate of validated updates (the method's own mean, or the configured robust
        aggregator)."""
        cfg = self.config
        names = list(self.expected_update(server))
        robust = cfg.aggregator != "mean"
        params = rules.aggregate_tensors(updates, names, cfg.aggregator, cfg.trim_fraction,
                                            None if robust else weights)
        return GlobalState(params, server.round + 1)

    def _unchanged(self, server):
        return GlobalState(dict(server.params), server.round + 1)

    def restore(self, saved, server):
        """The earlier global state ``saved`` (kept by the engine's rollback ring,
        :class:`..engine.RollbackRing`) as the state after ``server``'s round: ``saved``'s
        tensors with ``server``'s round count, and no change carried over (as a round that
        aggregated nothing: SpaFL's ``delta`` zero)."""
        return self._unchanged(replace(saved, round=server.round - 1))

    def aggregate(self, server, updates: list[Tensors], weights: list[float]):
        """The next global state from the round's accepted ``updates`` and their clients'
        sample counts ``weights``. An update whose count is not a positive integer (above the
        ``sample_bound``) is set aside; the aggregate is checked (:func:`rules.check_aggregate`)
        and, if it fails, refused: the global state is kept and :attr:`refused` says why (both
        with an :class:`AggregateWarning`)."""
        self.refused = None
        if not self.communicates:
            return self._unchanged(server)
        kept_updates, kept_weights = [], []
        for i, (update, weight) in enumerate(zip(updates, weights, strict=True)):
            try:
                kept_weights.append(self.check_sample_count(weight))
            except UpdateRejected as e:
                warnings.warn(f"round {server.round + 1}: update {i} set aside: {e}", AggregateWarning, stacklevel=2)
                continue
            kept_updates.append(update)
        if not kept_updates:
            return self._unchanged(server)
        new = self._combine(server, kept_updates, kept_weights)
        try:
            rules.check_aggregate(self.expected_update(server), self.expected_update(new),
                                     self.update_bounds(server, max(kept_weights)))
        except UpdateRejected as e:
            self.refused = str(e)
            warnings.warn(f"round {server.round + 1}: {e}; the global state is kept", AggregateWarning, stacklevel=2)
            return self._unchanged(server)
        return new

    def paper_bits(self, message: Tensors, uploads: list[Tensors], clients: int) -> int:
        """Bits of one round by the papers' accounting: the payload of the downlink to each of
        the ``clients`` sampled plus each uplink received (32 bits a float32 value, plus the
        positions of a sparse one)."""
        if not self.communicates:
            return 0
        return clients * accounting.payload_bits(message, self.sparse_wire) + sum(
            accounting.payload_bits(u, self.sparse_wire) for u in uploads)

    def round_metrics(self, before, after, reports: list[ClientReport]) -> dict:
        return {}

    # client
    def load(self, model: nn.Module, server, client_state: Mapping[str, torch.Tensor] | None) -> None:
        """Load the model a client is evaluated with."""
        if self.personalised:
            training.load_client_state(model, client_state)
        else:
            _load_exchanged(model, server.params)

    def receive(self, model: nn.Module, state, message: Mapping[str, torch.Tensor]) -> None:
        if self.personalised:
            training.load_client_state(model, state)
        else:
            _load_exchanged(model, message)

    def before_training(self, model: nn.Module, round_index: int) -> dict:
        return {}

    def after_training(self, model: nn.Module, before: dict) -> dict:
        return {}

    def client_round(self, model: nn.Module, state: Mapping[str, torch.Tensor] | None,
                     message: Mapping[str, torch.Tensor], data: ClientData, config: FedConfig, round_index: int,
                     client_id: int, macs: Mapping[str, int], *,
                     train_seeds: list[int] | None = None) -> tuple[Tensors | None, ClientReport]:
        """Receive, train with plain cross-entropy, post-process; return ``(the client's new
        state, report)``. A global method's client keeps no model: its state is None, or with
        ``optimizer_lifetime="per-run"`` its optimiser's momentum buffers alone."""
        self.receive(model, state, message)
        before = self.before_training(model, round_index)
        generators = keys.train_generators(config, round_index, client_id, data.train_x.device, train_seeds)
        kept = training.momentum_entries(state) if config.optimizer_lifetime == "per-run" else None
        optimizer = training.sgd(model, config, round_index, kept)
        loss = training.local_train(model, data, config, round_index, generators, penalty=False, optimizer=optimizer)
        layers = dict(self.prunable(model))
        density = {k: (layers[k].weight != 0) for k in macs}
        flops = accounting.training_flops(config, data.num_train, density, macs, 0, 0)
        stats = self.after_training(model, before)
        if self.personalised:
            new_state = training.client_state(model, optimizer, config)
        else:  # the client of a global method keeps its optimiser's momentum at most
            per_run = config.optimizer_lifetime == "per-run"
            new_state = (training.optimizer_momentum(model, optimizer) or None) if per_run else None
        update = exchanged(model.state_dict()) if self.communicates else {}
        return new_state, ClientReport(update, data.num_train, float(loss), flops, stats)


