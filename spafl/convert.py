"""Model-wide helpers: swap dense layers for threshold layers, and read a model's sparsity.
Which layers may skip zero inputs is decided in :mod:`spafl.zero_inputs`."""

from __future__ import annotations

import gc
import math
import warnings
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
    exclude: Callable[[str, nn.Module], bool] | tuple[str, ...] | str = (),
    skip_zero_inputs: bool = True,
    **layer_kwargs,
) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` and ``nn.Conv2d`` of ``model`` by a threshold layer
    that computes the same function (thresholds at 0), and return ``model``.

    * Only modules of exactly these types are converted (see ``CONVERTERS``). Subclasses (e.g.
      ``nn.MultiheadAttention``'s ``out_proj``, which its owner reads without calling it;
      parametrized layers), other convolutions (``Conv1d``, ``Conv3d``, transposed) and
      ``nn.Bilinear`` stay dense, with a warning that names them (none for excluded modules).
    * The threshold layers take the dense layers' weight and bias Parameter objects themselves
      (:meth:`ThresholdLinear.from_dense` with ``copy=False``): an optimizer built before this
      call keeps updating them, and weights tied between modules stay tied. The new thresholds
      are in no such optimizer: when one exists, a warning says so (build the optimizer after
      ``sparsify``, or add them with ``optimizer.add_param_group({"params": [m.threshold for m
      in spafl.threshold_layers(model)]})``).
    * A module used at several places (a shared layer) is converted once and the same threshold
      layer is put at every place. Its hooks (forward, pre-forward, backward, state-dict) move
      to the threshold layer, and the handles that registered them still remove them.
    * A layer whose weight is computed by a hook rather than held as a Parameter (the old
      ``torch.nn.utils.weight_norm``, ``torch.nn.utils.prune``) is refused with an error: exclude
      it or remove the reparametrisation first.
    * Nothing changes when an error is raised.

    Args:
        exclude: qualified module names to keep dense, each with everything inside it (e.g.
            ``("fc",)``, or one name as a string), or a predicate ``(name, module) -> bool``
            returning True for the modules to keep dense (asked for each name of a shared module;
            the answers must agree).
        skip_zero_inputs: set each threshold layer's ``skip_zero_inputs`` flag by
            :func:`mark_zero_input_layers` (on where the model provably feeds it a ReLU chain;
            a model that ``torch.fx`` cannot trace gets no flags, with a warning). False: no flags.
        **layer_kwargs: the threshold layers' options (``backend``, ``backward_mode``,
            ``sample_fraction``, ``collapse_density``, ``collapse_timing``, ``collapse_in_eval``,
            ``check_finite``), validated before anything changes.
    """
    if not isinstance(skip_zero_inputs, bool):
        raise TypeError(f"skip_zero_inputs must be a bool, got {skip_zero_inputs!r}")
    _check_module("sparsify", model)
    _check_layer_kwargs(layer_kwargs)
    skip = _exclusion(model, exclude)
    if type(model) in CONVERTERS and not skip("", model):
        raise TypeError(
            "sparsify converts the layers inside a model; call ThresholdLinear.from_dense or "
            "ThresholdConv2d.from_dense on a single layer"
        )
    targets, left_dense = [], []
    for module, names in _places(model):
        excluded = [skip(name, module) for name in names]
        if all(excluded):
            continue
        if any(excluded):
            raise ValueError(
                f"sparsify: the module at {names} is one module used at {len(names)} places, excluded at "
                f"{[n for n, e in zip(names, excluded, strict=True) if e]} only; exclude it at all of them or none"
            )
        if type(module) in CONVERTERS:
            _check_convertible(names[0], module)
            targets.append((module, names))
        elif isinstance(module, _DENSE_LOOKALIKES):
            left_dense.append(f"{names[0]} ({type(module).__name__})")
    # Every threshold layer is built before the first swap: an error leaves the model unchanged.
    new = [CONVERTERS[type(module)].from_dense(module, copy=False, **layer_kwargs) for module, _ in targets]
    _swap(model, targets, new)
    if left_dense:
        warnings.warn(
            f"sparsify left these layers dense: {', '.join(left_dense)}. It converts modules of exactly the types "
            "nn.Linear and nn.Conv2d: a subclass may be used without its forward (nn.MultiheadAttention reads "
            "out_proj.weight directly), parametrized layers compute their weight, and other convolutions are not "
            "supported. Pass exclude= to keep them dense without this warning",
            stacklevel=2,
        )
    stale = _optimizers_holding([p for module in new for p in (module.weight, module.bias) if p is not None])
    if stale:
        warnings.warn(
            f"sparsify: {', '.join(stale)} built before this call updates the converted layers' weights but not "
            "their new thresholds; add them: optimizer.add_param_group({'params': [m.threshold for m in "
            "spafl.threshold_layers(model)]}) (or build the optimizer after sparsify)",
            stacklevel=2,
        )
    if skip_zero_inputs:
        from .zero_inputs import mark_zero_input_layers  # it reads the threshold layers through this module

        mark_zero_input_layers(model)
    return model


def densify(model: nn.Module) -> nn.Module:
    """The inverse of :func:`sparsify`: replace, in place, every threshold layer of ``model`` by
    the plain ``nn.Linear`` / ``nn.Conv2d`` computing the same function (pruned units' weights
    zeroed, thresholds dropped), and return ``model``. Use it to export a trained model, or to
    build the dense counterpart of a SpaFL architecture; :func:`dense_state_dict` gives the
    plain model's state dict without changing ``model``.

    A threshold layer used at several places becomes one dense layer used at all of them, with
    its hooks. The dense weights are new Parameters (each with its own pruned rows zeroed): an
    optimizer holding the threshold layers' ones does not train them, and weights that threshold
    layers shared become separate copies (with a warning)."""
    _check_module("densify", model)
    if isinstance(model, THRESHOLD_LAYER_TYPES):
        raise TypeError("densify converts the layers inside a model; call .to_dense() on a single layer")
    targets = [(m, names) for m, names in _places(model) if isinstance(m, THRESHOLD_LAYER_TYPES)]
    tied = ", ".join(str(group) for group in _shared_weights(targets))
    new = [module.to_dense() for module, _ in targets]
    _swap(model, targets, new)
    if tied:
        warnings.warn(f"densify: threshold layers {tied} shared one weight; each dense layer has its own copy now "
                      "(with its own pruned rows zeroed)", stacklevel=2)
    return model


def dense_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the plain model that :func:`densify` would make of ``model``, without
    changing ``model``: what loads into the model as it was before :func:`sparsify` (each threshold
    layer's weight with its pruned units zeroed, its thresholds and guard buffers left out).
    ``model.state_dict()`` of a sparsified model does not load there (its extra keys are
    ``threshold``, ``collapse_resets`` and ``previous_density`` of each threshold layer)."""
    _check_module("dense_state_dict", model)
    state = model.state_dict()
    places = _places(model, with_root=True)
    for layer, names in places:
        if not isinstance(layer, THRESHOLD_LAYER_TYPES):
            continue
        dense = layer.to_dense().state_dict()
        for name in names:
            prefix = f"{name}." if name else ""
            for key in ("threshold", "collapse_resets", "previous_density"):
                state.pop(prefix + key, None)
            state.update({prefix + key: value for key, value in dense.items()})
    return state


# Modules that look like layers sparsify could convert but does not (it warns about them).
_DENSE_LOOKALIKES = (nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd)

# nn.Module's hook tables: sparsify / densify move these very dicts to the replacing module, so that
# the hooks keep running and the handles the user holds (which refer to the dicts) still remove them.
_HOOK_TABLES = (
    "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
    "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)


def _check_layer_kwargs(layer_kwargs: dict) -> None:
    """Fail on options the threshold layers reject before the model changes."""
    taken = sorted(set(layer_kwargs) & {"device", "dtype", "bias", "copy"})
    if taken:
        raise TypeError(f"sparsify takes {taken} from each dense layer; they are not layer options here")
    ThresholdLinear(1, 1, device="meta", **layer_kwargs)


def _exclusion(model: nn.Module, exclude) -> Callable[[str, nn.Module], bool]:
    if callable(exclude):
        return exclude
    names = {exclude} if isinstance(exclude, str) else exclude
    if not isinstance(names, (tuple, list, set, frozenset)) or not all(isinstance(n, str) for n in names):
        raise TypeError(
            f"exclude must be module names (strings) or a predicate (name, module) -> bool, got {exclude!r}"
        )
    names = set(names)
    unknown = names - {name for name, _ in model.named_modules(remove_duplicate=False)}
    if unknown:
        raise ValueError(f"sparsify: exclude names modules that do not exist: {sorted(unknown)}")

    def skip(name: str, _module: nn.Module) -> bool:
        return any(name == n or name.startswith(n + ".") for n in names if n) or "" in names

    return skip


def _places(model: nn.Module, with_root: bool = False) -> list[tuple[nn.Module, list[str]]]:
    """Every submodule of ``model`` (and ``model`` itself, named ``""``, with ``with_root``) with
    all the qualified names it is reachable under, in module order."""
    places: dict[int, tuple[nn.Module, list[str]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if name or with_root:
            places.setdefault(id(module), (module, []))[1].append(name)
    return list(places.values())


def _check_convertible(name: str, module: nn.Module) -> None:
    for attr in ("weight", "bias"):
        value = getattr(module, attr)
        if value is not None and not isinstance(value, nn.Parameter):
            raise ValueError(
                f"sparsify: the {attr} of {name!r} is not a Parameter but computed from others by a hook (the old "
                "torch.nn.utils.weight_norm, torch.nn.utils.prune, ...); remove that first, or exclude the module"
            )


def _optimizers_holding(params: list[torch.Tensor]) -> list[str]:
    """The optimizers alive in this process that hold any of ``params`` (named by type). One pass
    over the objects the garbage collector tracks (about 0.2 s per million objects): the price of
    a warning that fires only when an optimizer really misses the new thresholds. Types are
    compared with ``type()``: ``isinstance`` would read ``__class__`` of lazy proxy objects."""
    ids = {id(p) for p in params}
    types = _subclasses(torch.optim.Optimizer)
    found = []
    for obj in gc.get_objects():
        if type(obj) in types and any(id(p) in ids for group in obj.param_groups for p in group["params"]):
            found.append(f"an optimizer ({type(obj).__name__})")
    return found


def _subclasses(cls: type) -> set[type]:
    out = {cls}
    for sub in cls.__subclasses__():
        out |= _subclasses(sub)
    return out


def _shared_weights(targets: list[tuple[nn.Module, list[str]]]) -> list[list[str]]:
    """The names of the layers of ``targets`` that share a weight Parameter, grouped."""
    by_weight: dict[int, list[str]] = {}
    for module, names in targets:
        by_weight.setdefault(id(module.weight), []).append(names[0])
    return [group for group in by_weight.values() if len(group) > 1]


def _swap(model: nn.Module, targets: list[tuple[nn.Module, list[str]]], new: list[nn.Module]) -> None:
    """Put ``new[i]`` at every place of ``targets[i]``'s module, with that module's hooks."""
    for (old, names), module in zip(targets, new, strict=True):
        for table in _HOOK_TABLES:
            hooks = getattr(old, table)
            hooks.update(getattr(module, table))
            setattr(module, table, hooks)
        module._is_full_backward_hook = old._is_full_backward_hook
        for name in names:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module)


def named_threshold_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, layer)`` for every threshold layer in ``model``, in module order, each layer once
    (under its first name, as ``named_modules`` does)."""
    _check_module("named_threshold_layers", model)
    return ((name, m) for name, m in model.named_modules() if isinstance(m, THRESHOLD_LAYER_TYPES))


def threshold_layers(model: nn.Module) -> Iterator[nn.Module]:
    """Every threshold layer in ``model``, in module order, each once (like ``modules()``; see
    :func:`named_threshold_layers` for the names)."""
    _check_module("threshold_layers", model)
    return (m for m in model.modules() if isinstance(m, THRESHOLD_LAYER_TYPES))


def _check_module(op: str, model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{op} expects an nn.Module, got {type(model).__name__}")


def threshold_penalty(model: nn.Module) -> torch.Tensor:
    """SpaFL's sparsity regulariser ``sum_layers sum_i exp(-tau_i)`` (multiply by lambda_t).

    On the kernel path (thresholds on a GPU, or any layer set to ``backend="triton"``) the
    thresholds of all layers are concatenated and the regulariser is one expression: four
    launches in the forward and two in the backward whatever the number of layers, where a term
    per layer costs three launches per layer in the forward (and a stack and a sum) and two per
    layer in the backward. Elsewhere (the plain-PyTorch path on the CPU, and layers whose
    thresholds differ in device or dtype) each layer's terms are summed first, then the layers'
    sums: the order that the CPU's recorded histories pin bit for bit. The two differ only in
    the order of the fp32 additions. Either is an ordinary autograd graph (differentiable to
    any order)."""
    layers = list(threshold_layers(model))
    if not layers:
        raise ValueError("model has no threshold layers")
    taus = [layer.threshold for layer in layers]
    first = taus[0]
    if (len(taus) > 1 and all(t.device == first.device and t.dtype == first.dtype for t in taus)
            and (first.device.type != "cpu" or any(layer.options.backend == "triton" for layer in layers))):
        return torch.exp(-torch.cat([t if t.dim() == 1 else t.reshape(-1) for t in taus])).sum()
    return torch.stack([torch.exp(-t).sum() for t in taus]).sum()


def add_threshold_penalty_grad(model: nn.Module | list, coefficient: float) -> None:
    """Add the gradient of ``coefficient * threshold_penalty(model)`` to the thresholds'
    ``.grad``: call it after ``loss.backward()`` instead of adding the penalty to the loss.

    The penalty's gradient is ``-coefficient * exp(-tau)``, elementwise, and the training step
    needs nothing else of it (its value is a regulariser, not a reported loss). In the autograd
    graph it costs, on a GPU, six launches in the forward, three in the backward, and one more
    per layer where autograd adds it to the layer's own threshold gradient; here it is four
    multi-tensor launches (``neg``, ``exp``, ``mul``, ``sub``) for the whole model, and no
    autograd node. The arithmetic is autograd's, operation for operation (``exp(-tau)`` times
    the coefficient, subtracted), so a threshold whose layer gives it one gradient ends with the
    same bits either way.

    ``model``: a module (its threshold layers) or a list of threshold tensors. Thresholds that
    do not require a gradient are left alone (autograd gives them none); one with no ``.grad``
    yet gets the penalty's gradient alone. A coefficient of 0 adds nothing. Call it once per
    ``backward()`` of the loss the penalty would have joined, before gradient clipping (which
    must see it). For a penalty inside a larger graph (second order, other terms on the
    thresholds) use :func:`threshold_penalty`. Non-finite thresholds are not refused here (no
    host synchronisation on a GPU): their gradient is what autograd would give (NaN for NaN,
    0 for +inf); the layers' forward refuses them where ``check_finite`` is on (the CPU's
    default)."""
    if isinstance(coefficient, bool) or not isinstance(coefficient, (int, float)):
        raise TypeError(f"coefficient must be a real number, got {type(coefficient).__name__}")
    if not math.isfinite(coefficient):
        raise ValueError(f"coefficient must be finite, got {coefficient}")
    if isinstance(model, nn.Module):
        taus = [layer.threshold for layer in threshold_layers(model)]
        if not taus:
            raise ValueError("model has no threshold layers")
    else:
        taus = list(model)
        bad = [i for i, t in enumerate(taus) if not isinstance(t, torch.Tensor) or not t.is_floating_point()]
        if bad:
            raise TypeError(f"thresholds must be floating-point tensors; entry {bad[0]} is not")
    if coefficient == 0:
        return
    _penalty_grad_into(taus, float(coefficient))


@torch.no_grad()
def _penalty_grad_into(taus: list[torch.Tensor], coefficient: float) -> None:
    """``tau.grad -= coefficient * exp(-tau)`` for every threshold that requires a gradient
    (``tau.grad = -(coefficient * exp(-tau))`` where it has none): one multi-tensor launch per
    operation (``torch._foreach_*`` groups the tensors by device and dtype itself). A threshold
    listed twice (shared by two layers) gets the term twice, as the penalty's sum gives it, the
    second time on its own (a multi-tensor launch must not write one tensor twice)."""
    seen, unique, repeats = set(), [], []
    for t in taus:
        if t.requires_grad:
            (repeats if id(t) in seen else unique).append(t)
            seen.add(id(t))
    if any(t.grad is not None and t.grad.layout != torch.strided for t in unique):
        # (autograd itself refuses a .grad of another shape, dtype or device)
        raise ValueError("a threshold's .grad is sparse; the penalty's gradient is added to dense gradients only")
    for group in ([unique] if unique else []) + [[t] for t in repeats]:
        terms = torch._foreach_neg(group)
        torch._foreach_exp_(terms)
        torch._foreach_mul_(terms, coefficient)
        had = [t.grad is not None for t in group]
        if any(had):
            pairs = [(t.grad, p) for t, p, h in zip(group, terms, had, strict=True) if h]
            torch._foreach_sub_([g for g, _ in pairs], [p for _, p in pairs])
        for t, p, h in zip(group, terms, had, strict=True):
            if not h:
                t.grad = p.neg_()


def model_density(model: nn.Module) -> dict:
    """Density of a model's threshold layers (synchronises with the device).

    Returns ``{"mean": unweighted mean of layer densities (as the reference code reports it),
    "weighted": active weights / prunable weights, "layers": {name: density}}``.
    """
    layers = {}
    active = total = 0
    for name, layer in named_threshold_layers(model):
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
