"""The federated methods the simulator runs: SpaFL and the baselines users compare it with.

=============  ===========================================================================
``spafl``      clients keep their weights; only thresholds travel; uniform mean of thresholds
``fedavg``     dense model; the whole model (weights, batch-norm parameters and statistics)
               travels both ways; average weighted by the clients' sample counts
``local``      each client trains its own dense model on its own data; nothing is sent
``sparsyfed``  SparsyFed: Powerpropagation latent weights, activation pruning, one global
               Top-K of the trained latent weights at ``sparsity``, sample-weighted FedAvg
               of the latent weights; messages in a sparse encoding
``topk``       SparsyFed's ablation: the same with ``beta = 1`` and no activation pruning
=============  ===========================================================================

All share the data, the split, the model architecture (the dense methods use the SpaFL model
with plain layers: :func:`spafl.densify`), client sampling, local training settings, evaluation
and accounting. A method is a set of functions over plain tensors, so that another engine can
drive them as the simulator does: ``prepare_model``, ``init_server``, ``broadcast``,
``client_round``, ``validate_update``, ``aggregate`` and ``load`` (the model a client is
evaluated with).

Personalised methods (``spafl``, ``local``) are evaluated on each client's own model; the
global ones (``fedavg``, ``sparsyfed``, ``topk``) with the global model on every client's local
test split, and also on the whole test set.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..convert import densify, named_threshold_layers
from . import protocol
from .config import FedConfig
from .data import ClientData
from .powerprop import POWERPROP_TYPES, begin_round, global_topk_, powerprop_layers, to_powerprop, topk_keep
from .protocol import ClientReport, FederatedWarning, Tensors, UpdateRejected, derived_seed

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
    return protocol.aggregate_tensors(updates, list(updates[0]), "mean", weights=weights)


class AggregateWarning(FederatedWarning):
    """The server set aside part of a round's input (an update with an impossible sample count)
    or refused its aggregate (kept the global state); the run goes on."""


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
    sparse_wire = False  # messages are sent in the sparse encoding (protocol.encode(sparse=True))

    def __init__(self, config: FedConfig):
        self.config = config
        # The most training samples a client can hold (caps reported sample counts and the
        # local steps the update bounds allow); a server that knows its data sets it.
        self.sample_bound: int | None = TRAIN_SIZES.get(config.dataset)
        # Names of the exchanged tensors that SGD trains (the rest are buffers, such as batch
        # norm's running statistics); set by init_server from the model.
        self.trained: frozenset[str] | None = None
        self.refused: str | None = None  # why the last aggregate was refused (None: accepted)

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
        return GlobalState(exchanged(model.state_dict()) if self.communicates else {})

    def broadcast(self, server) -> Tensors:
        return dict(server.params)

    def expected_update(self, server) -> Tensors:
        """The tensors an uplink must hold (names, shapes, dtypes), at their global values."""
        return server.params if self.communicates else {}

    def check_payload(self, update: object, server) -> None:
        """Raise :class:`UpdateRejected` unless ``update`` is this round's uplink in form (a
        mapping of the expected names to dense tensors of the expected shapes and dtypes);
        cheap, and safe on any object: the round loop runs it before encoding an update."""
        protocol.check_payload(update, self.expected_update(server))

    def check_sample_count(self, num_samples: object, known: int | None = None) -> int:
        """A client's reported sample count, validated (:func:`protocol.check_sample_count`)
        against ``known`` (what the server knows the client holds) or the method's
        ``sample_bound``."""
        return protocol.check_sample_count(num_samples, known if known is not None else self.sample_bound)

    def update_bounds(self, server, num_samples: int | None = None) -> dict[str, protocol.UpdateBounds] | None:
        """The values a legitimate client's update can hold (None: ``update_bounds`` off): each
        weight SGD trains within :func:`protocol.sgd_reach` of its global value, under the
        gradient bound :func:`protocol.gradient_bound`; a buffer (batch norm's running
        statistics) anything finite, a running variance non-negative. ``num_samples`` (the
        client's count; default the ``sample_bound``) sets the local steps."""
        if not self.config.update_bounds:
            return None
        n = num_samples if num_samples is not None else self.sample_bound
        g = protocol.gradient_bound(self.config)
        zero_ok = self.sparse_wire  # a post-training Top-K may zero any weight
        lr = protocol.learning_rate(self.config, server.round)
        out = {}
        for name, value in self.expected_update(server).items():
            if name.endswith("running_var"):
                out[name] = protocol.UpdateBounds(floor=0.0, rule="a variance is not negative")
            elif (self.trained is None or name in self.trained) and n is not None:
                steps = protocol.local_steps(self.config, n)
                rule = (f"{steps} SGD steps at lr {lr:.3g}, momentum {self.config.momentum}, |gradient| <= {g:g}"
                        f"{' (clip)' if self.config.clip is not None else ''}")
                out[name] = protocol.UpdateBounds(protocol.sgd_reach(self.config, server.round, n, value, g),
                                                  zero_ok=zero_ok, rule=rule)
        return out

    def validate_update(self, update: Mapping[str, torch.Tensor], server, num_samples: int | None = None) -> None:
        """Raise :class:`UpdateRejected` unless ``update`` is an uplink a legitimate client could
        have sent this round (:func:`protocol.validate_update` with :meth:`update_bounds`)."""
        protocol.validate_update(update, self.expected_update(server), self.update_bounds(server, num_samples))

    def _combine(self, server, updates: list[Tensors], weights: list[float]):
        """The aggregate of validated updates (the method's own mean, or the configured robust
        aggregator)."""
        cfg = self.config
        names = list(self.expected_update(server))
        robust = cfg.aggregator != "mean"
        params = protocol.aggregate_tensors(updates, names, cfg.aggregator, cfg.trim_fraction,
                                            None if robust else weights)
        return GlobalState(params, server.round + 1)

    def _unchanged(self, server):
        return GlobalState(dict(server.params), server.round + 1)

    def aggregate(self, server, updates: list[Tensors], weights: list[float]):
        """The next global state from the round's accepted ``updates`` and their clients'
        sample counts ``weights``. An update whose count is not a positive integer (above the
        ``sample_bound``) is set aside; the aggregate is checked (:func:`protocol.check_aggregate`)
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
            protocol.check_aggregate(self.expected_update(server), self.expected_update(new),
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
        return clients * protocol.payload_bits(message, self.sparse_wire) + sum(
            protocol.payload_bits(u, self.sparse_wire) for u in uploads)

    def round_metrics(self, before, after, reports: list[ClientReport]) -> dict:
        return {}

    # client
    def load(self, model: nn.Module, server, client_state: Mapping[str, torch.Tensor] | None) -> None:
        """Load the model a client is evaluated with."""
        if self.personalised:
            protocol.load_client_state(model, client_state)
        else:
            _load_exchanged(model, server.params)

    def receive(self, model: nn.Module, state, message: Mapping[str, torch.Tensor]) -> None:
        if self.personalised:
            protocol.load_client_state(model, state)
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
        generators = protocol.train_generators(config, round_index, client_id, data.train_x.device, train_seeds)
        kept = protocol.momentum_entries(state) if config.optimizer_lifetime == "per-run" else None
        optimizer = protocol.sgd(model, config, round_index, kept)
        loss = protocol.local_train(model, data, config, round_index, generators, penalty=False, optimizer=optimizer)
        layers = dict(self.prunable(model))
        density = {k: (layers[k].weight != 0) for k in macs}
        flops = protocol.training_flops(config, data.num_train, density, macs, 0, 0)
        stats = self.after_training(model, before)
        if self.personalised:
            new_state = protocol.client_state(model, optimizer, config)
        else:  # the client of a global method keeps its optimiser's momentum at most
            per_run = config.optimizer_lifetime == "per-run"
            new_state = (protocol.optimizer_momentum(model, optimizer) or None) if per_run else None
        update = exchanged(model.state_dict()) if self.communicates else {}
        return new_state, ClientReport(update, data.num_train, float(loss), flops, stats)


class SpaFL(Method):
    name = "spafl"

    def prepare_model(self, model: nn.Module) -> nn.Module:
        if not any(True for _ in named_threshold_layers(model)):
            raise ValueError("the model has no threshold layers (build it from spafl layers or call spafl.sparsify)")
        return model

    def prunable(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return list(named_threshold_layers(model))

    def init_server(self, model: nn.Module) -> protocol.ServerState:
        state = protocol.init_server(model)
        self.trained = frozenset(state.thresholds)
        return state

    def broadcast(self, server) -> Tensors:
        return protocol.broadcast(server, self.config.th_update)

    def expected_update(self, server) -> Tensors:
        return server.thresholds

    def update_bounds(self, server, num_samples=None):
        """SpaFL's rule (:func:`protocol.threshold_bounds`)."""
        n = num_samples if num_samples is not None else self.sample_bound
        if not self.config.update_bounds or n is None:
            return None
        return protocol.threshold_bounds(self.config, server, n)

    def _combine(self, server, updates, weights):
        # SpaFL's mean is uniform over clients (the sample counts do not enter it)
        return protocol.aggregate(server, updates, self.config.aggregator, self.config.trim_fraction)

    def _unchanged(self, server):
        return protocol.keep(server)

    def paper_bits(self, message, uploads, clients) -> int:
        """The paper's ``2 * K * T * 32`` (thresholds only: the threshold change that the
        downlink also carries is not counted there)."""
        return protocol.comm_bits_paper(sum(v.numel() for k, v in message.items() if k.startswith("tau/")), clients)

    def client_round(self, *args, **kwargs):
        return protocol.client_round(*args, **kwargs)


class FedAvg(Method):
    name = "fedavg"
    personalised = False


class LocalOnly(Method):
    name = "local"
    communicates = False


class SparsyFed(Method):
    """SparsyFed (``beta``/``spectral_exponent``, activation pruning) or, with ``plain_topk``,
    its Top-K ablation (beta 1, no activation pruning)."""

    name = "sparsyfed"
    personalised = False
    sparse_wire = True

    def __init__(self, config: FedConfig, plain_topk: bool = False):
        super().__init__(config)
        self.plain_topk = plain_topk
        if plain_topk:
            self.name = "topk"
        self.beta = 1.0 if plain_topk else config.beta
        self.spectral = config.spectral_exponent and not plain_topk
        self.activation_pruning = not plain_topk

    def prepare_model(self, model: nn.Module) -> nn.Module:
        generator = torch.Generator().manual_seed(derived_seed(self.config.seed, "init", 1))
        model = to_powerprop(densify(model), beta=self.beta, activation_pruning=self.activation_pruning,
                             generator=generator)
        if not any(True for _ in powerprop_layers(model)):
            raise ValueError("the model has no nn.Linear or nn.Conv2d layer to prune")
        self._weights = self.weight_names(model)
        self._keep = topk_keep(sum(model.get_parameter(k).numel() for k in self._weights), self.config.sparsity)
        return model

    def prunable(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return [(n, m) for n, m in model.named_modules() if isinstance(m, POWERPROP_TYPES)]

    def weight_names(self, model: nn.Module) -> list[str]:
        return [f"{n}.weight" for n, _ in self.prunable(model)]

    def validate_update(self, update, server, num_samples=None) -> None:
        super().validate_update(update, server, num_samples)
        nnz = sum(int(torch.count_nonzero(update[k])) for k in self._weights)
        if nnz > self._keep:
            raise UpdateRejected(f"{nnz} non-zero weights, above the Top-K target of {self._keep}")

    def _spectral_seed(self) -> int | None:
        return derived_seed(self.config.seed, "init", 2) if self.spectral else None

    def load(self, model, server, client_state) -> None:
        super().load(model, server, client_state)
        begin_round(model, self._spectral_seed())

    def before_training(self, model: nn.Module, round_index: int) -> dict:
        sparsity = begin_round(model, self._spectral_seed())
        zeros = {n: layer.weight == 0 for n, layer in self.prunable(model)}
        return {"zeros": zeros, "received_sparsity": sparsity}

    def after_training(self, model: nn.Module, before: dict) -> dict:
        layers = self.prunable(model)
        regrown = torch.stack([(before["zeros"][n] & (layer.weight != 0)).sum() for n, layer in layers]).sum()
        zeros = torch.stack([z.sum() for z in before["zeros"].values()]).sum()
        kept = global_topk_([layer.weight for _, layer in layers], self.config.sparsity)
        regrown, zeros = int(regrown), int(zeros)
        return {"regrown": regrown, "received_zeros": zeros, "regrowth": regrown / zeros if zeros else 0.0,
                "kept": kept, "betas": {n: layer.beta for n, layer in layers}}

    def round_metrics(self, before, after, reports) -> dict:
        old = torch.cat([before.params[k].reshape(-1) != 0 for k in self._weights])
        new = torch.cat([after.params[k].reshape(-1) != 0 for k in self._weights])
        union = int((old | new).sum())
        regrowth = [r.stats["regrowth"] for r in reports if "regrowth" in r.stats]
        return {
            "global_sparsity": 1.0 - float(new.float().mean()),
            "mask_iou": int((old & new).sum()) / union if union else 1.0,
            "regrowth": sum(regrowth) / len(regrowth) if regrowth else float("nan"),
            "regrown": sum(r.stats.get("regrown", 0) for r in reports),
        }


def make_method(config: FedConfig) -> Method:
    """The :class:`Method` named by ``config.method``."""
    if config.method == "spafl":
        return SpaFL(config)
    if config.method == "fedavg":
        return FedAvg(config)
    if config.method == "local":
        return LocalOnly(config)
    if config.method in ("sparsyfed", "topk"):
        return SparsyFed(config, plain_topk=config.method == "topk")
    raise ValueError(f"unknown method {config.method!r}")
