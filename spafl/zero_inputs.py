"""Input-side skipping, decided per layer: which threshold layers of a model may drop the input
entries that are 0 over the batch without changing any gradient upstream.

The rule (:mod:`spafl.layers`' module docstring): a threshold layer may drop them when its input
is a ReLU's output reached only through the operations below, which keep every value >= 0 and
route the gradient of an entry that is 0 only to ReLU outputs that are 0 (or nowhere). Anything
else refuses: other activations, normalisation, average pooling, arithmetic (a residual add),
concatenation, indexing. The model is read with ``torch.fx``.
"""

from __future__ import annotations

import warnings

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .convert import THRESHOLD_LAYER_TYPES, named_threshold_layers

_RELU_FUNCTIONS = {F.relu, F.relu_, torch.relu, torch.relu_}
_RELU_MODULES = (nn.ReLU,)
_RELU_METHODS = {"relu", "relu_"}
# Pooling by maximum: a maximum of values >= 0 is 0 only when all of them are; its gradient goes
# to the position of the maximum, one of those zeros.
_MAX_POOL_FUNCTIONS = {
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
}
_MAX_POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
                     nn.AdaptiveMaxPool3d)
# Element-wise moves (each output entry is one input entry) and dropout (an entry times 0 or a
# factor >= 1: never a nonzero turned into 0 without cutting its gradient).
_MOVE_FUNCTIONS = {torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze,
                   F.dropout, F.dropout1d, F.dropout2d, F.dropout3d}
_MOVE_MODULES = (nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_MOVE_METHODS = {"flatten", "view", "reshape", "permute", "transpose", "squeeze", "unsqueeze", "contiguous"}


class _LeafTracer(torch.fx.Tracer):
    """Traces a model keeping the threshold layers as single calls."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, THRESHOLD_LAYER_TYPES) or super().is_leaf_module(m, qualname)


def _without_indices(node: torch.fx.Node, position: int) -> bool:
    flag = node.kwargs.get("return_indices", node.args[position] if len(node.args) > position else False)
    return flag is False


def _step(node: torch.fx.Node, modules: dict[str, nn.Module]) -> str:
    """``"relu"``, ``"pass"`` (an operation the rule lets through) or ``"stop"``."""
    if node.op == "call_function":
        if node.target in _RELU_FUNCTIONS:
            return "relu"
        if node.target in (F.max_pool1d, F.max_pool2d, F.max_pool3d):
            return "pass" if _without_indices(node, 6) else "stop"
        if node.target in (F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d):
            return "pass" if _without_indices(node, 2) else "stop"
        return "pass" if node.target in _MOVE_FUNCTIONS else "stop"
    if node.op == "call_method":
        if node.target in _RELU_METHODS:
            return "relu"
        return "pass" if node.target in _MOVE_METHODS else "stop"
    if node.op == "call_module":
        module = modules[node.target]
        if type(module) in _RELU_MODULES:
            return "relu"
        if type(module) in _MAX_POOL_MODULES:
            return "stop" if module.return_indices else "pass"
        return "pass" if type(module) in _MOVE_MODULES else "stop"
    return "stop"


def _in_place(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` may write into its first argument."""
    if node.kwargs.get("inplace") is True:
        return True
    if node.op == "call_method":
        return node.target.endswith("_")
    if node.op == "call_function":
        return getattr(node.target, "__name__", "").endswith("_")
    if node.op == "call_module":
        return getattr(modules[node.target], "inplace", False) is True
    return False


def _written_elsewhere(node: torch.fx.Node, chain: set, modules: dict[str, nn.Module]) -> bool:
    """Whether a user of ``node`` outside ``chain`` may modify it in place, directly or through a
    view of it."""
    for user in node.users:
        if user in chain:
            continue
        if _in_place(user, modules):
            return True
        if _step(user, modules) == "pass" and _written_elsewhere(user, chain, modules):
            return True
    return False


def _fed_by_relu(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether the tensor ``node`` is a ReLU's output reached only through pass-through operations
    that nothing else modifies in place."""
    chain = []
    while True:
        kind = _step(node, modules)
        if kind == "stop" or not node.args or not isinstance(node.args[0], torch.fx.Node):
            return False
        chain.append(node)
        if kind == "relu":
            break
        node = node.args[0]
    # A user outside the chain that writes in place into the ReLU's output or a view of it could
    # make a dropped entry come from a nonzero (the ReLU itself may work in place).
    members = set(chain)
    return not any(_written_elsewhere(n, members, modules) for n in chain)


def find_zero_input_layers(model: nn.Module) -> list[str]:
    """Names of the threshold layers of ``model`` whose input, at every call, is a ReLU's output
    reached only through max pooling, dropout, identity and shape operations: the layers for
    which ``skip_zero_inputs=True`` leaves every gradient upstream unchanged (the rule is in
    :mod:`spafl.layers`). Traces ``model`` with ``torch.fx`` (raises what tracing raises)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"find_zero_input_layers expects an nn.Module, got {type(model).__name__}")
    graph = _LeafTracer().trace(model)
    modules = dict(model.named_modules())
    verdicts: dict[str, bool] = {}
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], THRESHOLD_LAYER_TYPES):
            source = node.args[0] if node.args else node.kwargs.get("x", node.kwargs.get("input"))
            ok = isinstance(source, torch.fx.Node) and _fed_by_relu(source, modules)
            verdicts[node.target] = verdicts.get(node.target, True) and ok
    return [name for name, _ in named_threshold_layers(model) if verdicts.get(name, False)]


def mark_zero_input_layers(model: nn.Module, *, warn: bool = True) -> list[str]:
    """Set ``skip_zero_inputs`` on every threshold layer of ``model``: True for the layers
    :func:`find_zero_input_layers` returns, False for the others. Returns the names set True.

    A model that ``torch.fx`` cannot trace (data-dependent control flow, for instance) gets every
    flag False and, with ``warn``, a warning saying why; set the flags by hand where the rule in
    :mod:`spafl.layers` holds. So does a container without a ``forward`` (``nn.ModuleDict``),
    silently: there is no computation to read.
    """
    layers = list(named_threshold_layers(model))
    if type(model).forward is nn.Module.forward:
        for _, layer in layers:
            layer.skip_zero_inputs = False
        return []
    try:
        names = set(find_zero_input_layers(model))
    except Exception as exc:  # tracing runs the model's Python code symbolically: anything can raise
        names = set()
        if warn:
            warnings.warn(
                f"input-side skipping is off: torch.fx could not trace {type(model).__name__} "
                f"({type(exc).__name__}: {exc}); set skip_zero_inputs=True by hand on layers whose input is a "
                "ReLU's output through max pooling / shape operations only (see spafl.layers)",
                stacklevel=2,
            )
    for name, layer in layers:
        layer.skip_zero_inputs = name in names
    return sorted(names, key=[n for n, _ in layers].index)
