"""Accounting: the papers' counts of a round's work (training FLOPs, a layer's multiply-adds)
and communication (bits of the payloads, SpaFL's ``2 K T 32`` per round, Gbit totals)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..convert import named_threshold_layers
from .config import FedConfig
from .training import num_batches
from .wire import sparse_layout

# Communication totals are in decimal gigabits (the papers': 0.1856 Gbit for LeNet-5 over
# 500 rounds of 10 clients), not gibibits.
BITS_PER_GBIT = 1e9


def gbit(bits: float) -> float:
    """``bits`` in decimal Gbit (:data:`BITS_PER_GBIT`)."""
    return bits / BITS_PER_GBIT


def payload_bits(tensors: Mapping[str, torch.Tensor], sparse: bool = False) -> int:
    """Bits of the tensors' data in :func:`encode`'s layout, without the header: what the
    papers count (32 bits per float32 value sent, plus the bitmap or indices of a sparse one)."""
    total = 0
    for t in tensors.values():
        itemsize = t.element_size()
        if sparse:
            total += sparse_layout(t.numel(), int(torch.count_nonzero(t)), itemsize)[1]
        else:
            total += t.numel() * itemsize
    return 8 * total


def comm_bits_paper(num_thresholds: int, clients_per_round: int) -> int:
    """The paper's communication per round: ``2 * K * T * 32`` bits (T float32 thresholds
    down to and up from each of the K sampled clients)."""
    return 2 * clients_per_round * num_thresholds * 32


def layer_macs(model: nn.Module, image_shape: tuple[int, ...], device: torch.device,
               layers: list[tuple[str, nn.Module]] | None = None) -> dict[str, int]:
    """Multiply-adds of each threshold layer (or of ``layers``) for ONE sample at full density:
    ``out * in/groups * kh * kw * H_out * W_out`` for a conv and ``out * in`` per row for a
    linear layer (rows per sample: 1 for the paper's CNNs, the token count for the ViT)."""
    macs: dict[str, int] = {}
    hooks = []
    for name, layer in (named_threshold_layers(model) if layers is None else layers):
        def hook(module, _inputs, output, name=name):
            per_out = module.weight[0].numel()  # in/groups * kh * kw, or in
            macs[name] = int(output[0].numel()) * per_out  # output[0]: one sample
        hooks.append(layer.register_forward_hook(hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, *image_shape), device=device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return macs


def densities(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{layer: bool mask [out]}`` of the current weights and thresholds (on the device)."""
    return {name: layer.mask for name, layer in named_threshold_layers(model)}


def training_flops(config: FedConfig, num_train: int, masks: Mapping[str, torch.Tensor], macs: Mapping[str, int],
                   num_thresholds: int, num_weights: int) -> float:
    """The paper's count for one client's round (a multiply-add is one FLOP): forward =
    ``local_epochs * |D_k| * sum_l density_l * MACs_l``, backward = 2 * forward, plus
    ``T * batches_per_epoch + n_weights`` for the thresholds (the reference's count; pass 0 for
    a method without thresholds). ``masks[l]``: SpaFL's unit mask, or for an unstructured
    method a tensor whose mean is the layer's fraction of non-zero weights; the densities are
    those at the end of local training."""
    dense = sum(float(torch.as_tensor(masks[k]).float().mean()) * macs[k] for k in macs)
    forward = config.local_epochs * num_train * dense
    return 3.0 * forward + num_thresholds * num_batches(num_train, config.batch_size, config.drop_last) + num_weights


