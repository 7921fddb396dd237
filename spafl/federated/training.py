"""What every method's client does: local SGD (the schedules, the optimiser and the momentum a
client keeps between rounds), the client's state, its report, and evaluation."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..convert import add_threshold_penalty_grad, named_threshold_layers, threshold_layers
from ..optim import SGD
from .config import FedConfig
from .data import ClientData, crop_flip

Tensors = dict[str, torch.Tensor]


@dataclass
class ClientReport:
    """What a client's round produced besides its new state: the uplink ``update`` (SpaFL: its
    thresholds) and local statistics (not sent in SpaFL; used for logging and accounting)."""

    update: Tensors
    num_samples: int
    train_loss: float
    flops: float
    stats: dict = field(default_factory=dict)

    @property
    def thresholds(self) -> Tensors:
        """SpaFL's name for the uplink."""
        return self.update

    @thresholds.setter
    def thresholds(self, value: Tensors) -> None:
        self.update = value


def penalty_coefficient(config: FedConfig, round_index: int) -> float:
    """``lambda_t``: ``th_coeff * sigmoid(10 t / penalty_scheduler - 5)`` or the constant."""
    if config.penalty_schedule == "constant":
        return config.th_coeff
    z = 10.0 * round_index / config.penalty_scheduler - 5.0
    return config.th_coeff / (1.0 + math.exp(-z)) if z > -700 else 0.0


def learning_rate(config: FedConfig, round_index: int) -> float:
    """``lr * lr_decay**t``, or with ``lr_final`` set, SparsyFed's exponential schedule from
    ``lr`` at round 0 to ``lr_final`` at round ``rounds``: ``lr * (lr_final / lr)**(t / rounds)``."""
    if config.lr_final is not None:
        return config.lr * math.exp(round_index / config.rounds * math.log(config.lr_final / config.lr))
    return config.lr * config.lr_decay**round_index


def num_batches(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last else -(-n // batch_size)


# Keys of the momentum buffers in a client's state (``optimizer_lifetime="per-run"``), beside the
# model's own state-dict entries: ``momentum/<parameter name>``.
MOMENTUM_PREFIX = "momentum/"


def model_entries(state: Mapping[str, torch.Tensor]) -> Tensors:
    """The model's entries of a client's state (without the optimiser's momentum buffers)."""
    return {k: v for k, v in state.items() if not k.startswith(MOMENTUM_PREFIX)}


def momentum_entries(state: Mapping[str, torch.Tensor] | None) -> Tensors:
    """``{parameter name: momentum buffer}`` kept in a client's state (empty: none kept)."""
    return {k[len(MOMENTUM_PREFIX):]: v for k, v in (state or {}).items() if k.startswith(MOMENTUM_PREFIX)}


def load_client_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load a client's state into ``model`` (every model entry; the momentum buffers stay out)."""
    model.load_state_dict(model_entries(state))


def sgd(model: nn.Module, config: FedConfig, round_index: int,
        momentum: Mapping[str, torch.Tensor] | None = None) -> torch.optim.SGD:
    """The round's SGD optimiser at :func:`learning_rate`, with ``momentum`` (``{parameter
    name: buffer}`` saved after the client's previous round, see :func:`client_state`) loaded
    into it: an optimiser kept for the client's whole life, whose learning rate follows the
    schedule, steps exactly as this one does. It is :class:`spafl.optim.SGD`: ``torch.optim``'s
    arithmetic, and the threshold layers' next row masks built in the step (one pass over each
    weight per step on CUDA; on the CPU the same scores, computed in the step instead of the forward)."""
    opt = SGD(model.parameters(), lr=learning_rate(config, round_index), momentum=config.momentum,
              weight_decay=config.weight_decay)
    if momentum:
        params = dict(model.named_parameters())
        unknown = sorted(set(momentum) - set(params))
        if unknown:
            raise ValueError(f"momentum buffers for parameters the model does not have: {unknown[:5]}")
        for name, buffer in momentum.items():
            p = params[name]
            if buffer.shape != p.shape:
                raise ValueError(f"momentum buffer of {name}: shape {tuple(buffer.shape)}, parameter {tuple(p.shape)}")
            opt.state[p]["momentum_buffer"] = buffer.detach().to(device=p.device, dtype=p.dtype).clone()
    return opt


def optimizer_momentum(model: nn.Module, optimizer: torch.optim.Optimizer) -> Tensors:
    """The optimiser's momentum buffers as ``momentum/<parameter name>`` entries (copies;
    parameters without a buffer yet, or SGD without momentum, have none)."""
    out = {}
    for name, p in model.named_parameters():
        buffer = optimizer.state.get(p, {}).get("momentum_buffer")
        if buffer is not None:
            out[MOMENTUM_PREFIX + name] = buffer.detach().clone()
    return out


def client_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, config: FedConfig) -> Tensors:
    """What a client keeps after its round: detached copies of the model's state and, with
    ``optimizer_lifetime="per-run"``, the optimiser's momentum buffers (:func:`optimizer_momentum`;
    plain tensors, so the state loads with ``torch.load(weights_only=True)``)."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if optimizer is not None and config.optimizer_lifetime == "per-run":
        state.update(optimizer_momentum(model, optimizer))
    return state


def local_train(model: nn.Module, data: ClientData, config: FedConfig, round_index: int,
                generator: torch.Generator | list[torch.Generator], penalty: bool = True,
                optimizer: torch.optim.Optimizer | None = None) -> torch.Tensor:
    """Local training: SpaFL's objective (cross-entropy plus the threshold penalty), or plain
    cross-entropy with ``penalty=False``, with ``optimizer`` (default: a fresh :func:`sgd`).
    ``generator``: one for every epoch, or a list of one per epoch (:func:`train_generators`).
    Returns the mean training loss (a device tensor: no host sync inside the loop)."""
    opt = optimizer if optimizer is not None else sgd(model, config, round_index)
    generators = list(generator) if isinstance(generator, (list, tuple)) else [generator] * config.local_epochs
    if len(generators) != config.local_epochs:
        raise ValueError(f"{len(generators)} generators for {config.local_epochs} local epochs")
    lam = penalty_coefficient(config, round_index) if penalty else 0.0
    # The penalty enters as its gradient, added after each backward (four multi-tensor launches
    # for the model, where the term in the loss costs about ten plus one per layer); the
    # thresholds end with the same bits (spafl.add_threshold_penalty_grad).
    taus = [layer.threshold for layer in threshold_layers(model)] if lam else []
    if lam and not taus:
        raise ValueError("model has no threshold layers")
    n, b = data.num_train, config.batch_size
    steps = num_batches(n, b, config.drop_last)
    device = data.train_x.device
    total = torch.zeros((), device=device)
    seen = 0
    model.train()
    for generator in generators:
        order = torch.randperm(n, device=device, generator=generator)
        for s in range(steps):
            idx = order[s * b : (s + 1) * b]
            x, y = data.train_x[idx], data.train_y[idx]
            if data.augment:
                x = crop_flip(x, data.fill, generator)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if lam:
                add_threshold_penalty_grad(taus, lam)
            if config.clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), config.clip)
            opt.step()
            total += loss.detach() * len(idx)
            seen += len(idx)
    return total / max(seen, 1)


def layer_densities(layers: list[tuple[str, nn.Module]]) -> tuple[dict[str, torch.Tensor], torch.Tensor, int]:
    """``({layer: density}, active weights, prunable weights)`` on the device. A threshold
    layer's density is its fraction of active units (each carries ``weight[0].numel()``
    weights); any other layer's is its fraction of non-zero weights."""
    per_layer, active, total = {}, [], 0
    for name, layer in layers:
        if hasattr(layer, "threshold"):
            m = layer.mask
            per_layer[name] = m.float().mean()
            active.append(m.sum() * layer.weight[0].numel())
        else:
            nz = layer.weight != 0
            per_layer[name] = nz.float().mean()
            active.append(nz.sum())
        total += layer.weight.numel()
    return per_layer, torch.stack(active).sum() if active else torch.zeros(()), total


@torch.no_grad()
def evaluate(model: nn.Module, state: Mapping[str, torch.Tensor] | None, data: ClientData, batch_size: int,
             mask_layer: str | None = None, layers: list[tuple[str, nn.Module]] | None = None) -> dict:
    """A model on ``data``'s test split: accuracy (%), mean loss, the number of test samples,
    its densities (unweighted layer mean, weighted, per layer; over the threshold layers, or
    over ``layers``) and, if ``mask_layer`` names a threshold layer, its unit mask (bool
    ``[out]`` on the host). ``state`` is loaded first unless None (already loaded)."""
    if state is not None:
        load_client_state(model, state)
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=data.test_x.device)
    loss = torch.zeros((), device=data.test_x.device)
    for i in range(0, data.num_test, batch_size):
        logits = model(data.test_x[i : i + batch_size])
        y = data.test_y[i : i + batch_size]
        correct += (logits.argmax(1) == y).sum()
        loss += F.cross_entropy(logits.float(), y, reduction="sum")
    layers = list(named_threshold_layers(model)) if layers is None else layers
    per_layer_t, active, total = layer_densities(layers)
    mask = None
    if mask_layer is not None:
        layer = dict(layers).get(mask_layer)
        mask = layer.mask if layer is not None and hasattr(layer, "threshold") else None
    n = data.num_test
    values = torch.stack([correct.float(), loss, *per_layer_t.values(), active.to(loss.device).float()])
    values = values.cpu().tolist()  # the one host sync of an evaluation
    per_layer = dict(zip(per_layer_t, values[2:-1], strict=True))
    return {
        "acc": 100.0 * values[0] / n if n else float("nan"),
        "loss": values[1] / n if n else float("nan"),
        "num_test": n,
        "density": sum(per_layer.values()) / len(per_layer) if per_layer else float("nan"),
        "density_weighted": values[-1] / total if total else float("nan"),
        "layers": per_layer,
        "mask": None if mask is None else mask.cpu(),
    }


