"""Model-wide helpers: swap dense layers for threshold layers, and read a model's sparsity."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from .layers import ThresholdConv2d, ThresholdLinear
from .reference import row_scores

# Dense type -> threshold layer type. `sparsify` converts modules whose type is EXACTLY a key:
# subclasses may read the weight directly instead of calling forward (nn.MultiheadAttention's
# `out_proj` is such a subclass), and converting them would silently leave them dense.
CONVERTERS: dict[type[nn.Module], type[nn.Module]] = {nn.Linear: ThresholdLinear, nn.Conv2d: ThresholdConv2d}

THRESHOLD_LAYER_TYPES: tuple[type[nn.Module], ...] = (ThresholdLinear, ThresholdConv2d)


def sparsify(
    model: nn.Module,
    *,
    exclude: Callable[[str, nn.Module], bool] | tuple[str, ...] = (),
    **layer_kwargs,
) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` and ``nn.Conv2d`` of ``model`` by a threshold layer
    with the same weights (thresholds at 0, so the model computes the same function), and return
    ``model``. Only modules of exactly these types are converted (see ``CONVERTERS``).

    Args:
        exclude: qualified module names to keep dense (e.g. ``("fc",)``), or a predicate
            ``(name, module) -> bool`` returning True for modules to keep dense.
        **layer_kwargs: passed to the threshold layers (``backend``, ``backward_mode``,
            ``sample_fraction``, ``collapse_density``, ``check_finite``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"sparsify expects an nn.Module, got {type(model).__name__}")
    if callable(exclude):
        skip = exclude
    else:
        names = set(exclude)
        unknown = names - {name for name, _ in model.named_modules()}
        if unknown:
            raise ValueError(f"sparsify: exclude names modules that do not exist: {sorted(unknown)}")

        def skip(name, _module):
            return name in names

    # Collect first, then swap: replacing while iterating named_modules would revisit.
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) in CONVERTERS and name and not skip(name, module)
    ]
    if type(model) in CONVERTERS and not skip("", model):
        raise TypeError(
            "sparsify converts the layers inside a model; call ThresholdLinear.from_dense or "
            "ThresholdConv2d.from_dense on a single layer"
        )
    _replace(model, targets, lambda module: CONVERTERS[type(module)].from_dense(module, **layer_kwargs))
    return model


def densify(model: nn.Module) -> nn.Module:
    """The inverse of :func:`sparsify`: replace, in place, every threshold layer of ``model`` by
    the plain ``nn.Linear`` / ``nn.Conv2d`` computing the same function (pruned units' weights
    zeroed, thresholds dropped), and return ``model``. Use it to export a trained model, or to
    build the dense counterpart of a SpaFL architecture."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"densify expects an nn.Module, got {type(model).__name__}")
    if isinstance(model, THRESHOLD_LAYER_TYPES):
        raise TypeError("densify converts the layers inside a model; call .to_dense() on a single layer")
    _replace(model, list(threshold_layers(model)), lambda module: module.to_dense())
    return model


def _replace(model: nn.Module, targets: list[tuple[str, nn.Module]], make: Callable[[nn.Module], nn.Module]) -> None:
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(module))


def threshold_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, layer)`` for every threshold layer in ``model``, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, THRESHOLD_LAYER_TYPES):
            yield name, module


def threshold_penalty(model: nn.Module) -> torch.Tensor:
    """SpaFL's sparsity regulariser ``sum_layers sum_i exp(-tau_i)`` (multiply by lambda_t)."""
    terms = [torch.exp(-layer.threshold).sum() for _, layer in threshold_layers(model)]
    if not terms:
        raise ValueError("model has no threshold layers")
    return torch.stack(terms).sum()


def model_density(model: nn.Module) -> dict:
    """Density of a model's threshold layers (synchronises with the device).

    Returns ``{"mean": unweighted mean of layer densities (as the reference code reports it),
    "weighted": active weights / prunable weights, "layers": {name: density}}``.
    """
    layers = {}
    active = total = 0
    for name, layer in threshold_layers(model):
        mask = layer.mask
        per_unit = layer.weight[0].numel()
        layers[name] = float(mask.float().mean())
        active += int(mask.sum()) * per_unit
        total += mask.numel() * per_unit
    if not layers:
        raise ValueError("model has no threshold layers")
    return {"mean": sum(layers.values()) / len(layers), "weighted": active / total, "layers": layers}


def threshold_for_density(weight: torch.Tensor, density: float) -> torch.Tensor:
    """Thresholds ``[out]`` (one shared value) that leave exactly ``round(density * out)`` units
    active: the value sits halfway between two consecutive row scores, so float rounding in any
    implementation of the score cannot flip a unit. Used by tests and benchmarks."""
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    scores = row_scores(weight).sort(descending=True).values
    n = scores.numel()
    k = round(density * n)
    if k == 0:
        value = scores[0] * 2 + 1
    elif k == n:
        value = scores[-1] / 2
    else:
        value = (scores[k - 1] + scores[k]) / 2
    return torch.full((n,), float(value), device=weight.device, dtype=weight.dtype)
