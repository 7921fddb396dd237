"""The federated methods: SpaFL and the baselines it is compared with, one module each (the
method's client and server logic together).

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
and accounting. Personalised methods (``spafl``, ``local``) are evaluated on each client's own
model; the global ones (``fedavg``, ``sparsyfed``, ``topk``) with the global model on every
client's local test split, and also on the whole test set.

A new method: a module here with a :class:`Method` subclass (override what differs from the
FedAvg-style base), and a line in :func:`make_method` and ``config.METHODS``.
"""

from __future__ import annotations

from ..config import FedConfig
from .base import TRAIN_SIZES, GlobalState, Method, exchanged, weighted_mean
from .fedavg import FedAvg
from .local import LocalOnly
from .spafl import ServerState, SpaFL
from .sparsyfed import SparsyFed


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


__all__ = ["TRAIN_SIZES", "FedAvg", "GlobalState", "LocalOnly", "Method", "ServerState", "SpaFL", "SparsyFed",
           "exchanged", "make_method", "weighted_mean"]
