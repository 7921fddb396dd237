"""Optimizers that also build the next forward's row masks: ``SGD``, ``Adam``, ``AdamW``.

Drop-in subclasses of ``torch.optim.SGD`` / ``Adam`` / ``AdamW`` (same constructor, param groups,
``state_dict`` / ``load_state_dict``, ``zero_grad``, hooks; the same state keys, so a state dict
moves between them and ``torch.optim``). Every parameter is updated as ``torch.optim`` updates
it. In addition, after the step, every threshold layer (:class:`spafl.ThresholdLinear`,
:class:`spafl.ThresholdConv2d`) whose weight this optimizer stepped gets the row mask of its
updated weight and thresholds, which its next forward uses instead of scoring the weight again:

* Triton path (CUDA, or the interpreter): the weight's update and its row scores, mask, active
  list and collapse guard are one kernel (:mod:`spafl.kernels.threshold_optim`), one pass over
  ``W`` per training step instead of one for the update and one in the forward.
* CPU (plain PyTorch): ``torch.optim``'s own update, then the row scores; the forward then skips
  its scoring pass. The arithmetic is ``torch.optim``'s: results are bit-identical.

The mask is used only while it is current: the layer records the weight's and the thresholds'
version counters (and storage) with it, so an in-place edit (``copy_``, ``load_state_dict``,
the collapse guard's reset, another optimizer stepping the thresholds) makes the forward score the
weight itself, as it does with plain ``torch.optim``. Edits through ``.data`` bypass the version
counter and are not seen: call :meth:`FusedStep.forget_masks` (or ``layer.forget_next_mask()``)
after those. A layer driven by plain ``torch.optim`` never holds a mask and runs as before.

The thresholds are updated before the weights' masks are built, when they are in the same
optimizer; a threshold stepped elsewhere later invalidates the mask (its version moves).
"""

from __future__ import annotations

import torch

from . import reference
from ._checks import route
from ._rowmask import RowMask
from .layers import weight_owner

__all__ = ["SGD", "Adam", "AdamW", "FusedStep"]


class FusedStep:
    """What ``SGD``, ``Adam`` and ``AdamW`` add to their ``torch.optim`` base (see the module
    docstring). ``fused_launches`` counts the weights updated by the fused kernel (for tests and
    benchmarks)."""

    _kind = "sgd"
    fused_launches = 0

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        fused, plain = [], []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                layer = weight_owner(p)
                if layer is None:
                    continue
                (fused if self._fusable(group, p, layer) else plain).append((group, p, layer))
        held = [(p, p.grad) for _, p, _ in fused]
        for p, _ in held:
            p.grad = None  # torch.optim skips them; the fused kernel updates them below
        try:
            super().step()
        finally:
            for p, grad in held:
                p.grad = grad
        for group, p, layer in fused:
            row_mask = self._fused_update(group, p, layer)
            layer.keep_next_mask("triton", row_mask)
            self.fused_launches += 1
        for _, _, layer in plain:
            _prepare_plain(layer)
        return loss

    def forget_masks(self) -> None:
        """Drop the masks this optimizer's layers hold (after an edit the version counters do not
        see, e.g. through ``.data``)."""
        for group in self.param_groups:
            for p in group["params"]:
                layer = weight_owner(p)
                if layer is not None:
                    layer.forget_next_mask()

    # --- the fused path

    def _fusable(self, group, p, layer) -> bool:
        options = layer.options
        if not layer.training or route(options.backend, p, None, getattr(layer, "groups", 1)).mask != "triton":
            return False
        grad = p.grad
        if grad.is_sparse or grad.dtype != p.dtype or not p.is_contiguous() or not grad.is_contiguous():
            return False
        if group.get("maximize") or group.get("differentiable") or group.get("fused") or group.get("capturable"):
            return False
        if getattr(self, "grad_scale", None) is not None or getattr(self, "found_inf", None) is not None:
            return False
        return self._group_fusable(group, p)

    def _group_fusable(self, group, p) -> bool:
        return True

    def _fused_update(self, group, p, layer):
        raise NotImplementedError


def _kernels():
    from .kernels import threshold_optim

    return threshold_optim


def _prepare_plain(layer) -> None:
    """The next forward's row mask, computed as that forward would (after ``torch.optim``'s
    update): scores alone where the forward decides on the host, the routed mask elsewhere."""
    from .functional import _row_mask

    options = layer.options
    weight, threshold = layer.weight, layer.threshold
    where = route(options.backend, weight, None, getattr(layer, "groups", 1))
    if where.mask != "triton" and not where.with_perm and weight.device.type == "cpu":
        score = reference.row_scores(weight)
        layer.keep_next_mask(where.mask, RowMask(None, None, None, score))
        return
    density = options.collapse_density
    if density is not None and options.collapse_timing != "current":
        return  # the guard decides before the mask there: the forward builds it
    layer.keep_next_mask(where.mask, _row_mask(weight, threshold, where.mask, density, where.with_perm))


def _guard(layer) -> dict:
    """The fused kernel's guard arguments for the layer's training forward."""
    options = layer.options
    previous = options.collapse_density is not None and options.collapse_timing == "previous"
    return {"collapse_density": options.collapse_density,
            "previous_density": layer.previous_density if previous else None}


def _as2d(t: torch.Tensor) -> torch.Tensor:
    return t.view(t.shape[0], -1)


class SGD(FusedStep, torch.optim.SGD):
    """``torch.optim.SGD`` that also builds the threshold layers' next row masks (see
    :mod:`spafl.optim`)."""

    def _fused_update(self, group, p, layer):
        state = self.state[p]
        momentum = group["momentum"]
        buf = state.get("momentum_buffer") if momentum != 0 else None
        first = momentum != 0 and buf is None
        if first:
            buf = torch.empty_like(p, memory_format=torch.contiguous_format)
        elif buf is not None and not buf.is_contiguous():
            buf = state["momentum_buffer"] = buf.contiguous()
        row_mask = _kernels().fused_step(
            _as2d(p), _as2d(p.grad), layer.threshold.detach(), kind="sgd", lr=float(group["lr"]),
            weight_decay=group["weight_decay"], state1=None if buf is None else _as2d(buf), momentum=momentum,
            dampening=group["dampening"], nesterov=group["nesterov"], first=first,
            **_guard(layer),
        )
        if first:
            state["momentum_buffer"] = buf
        return row_mask


class _AdamFused(FusedStep):
    def _group_fusable(self, group, p) -> bool:
        return not group.get("amsgrad")

    def _decoupled(self, group) -> bool:
        # (torch's AdamW is Adam with decoupled_weight_decay=True in its groups; older ones have no flag)
        return group.get("decoupled_weight_decay", self._kind == "adamw")

    def _fused_update(self, group, p, layer):
        state = self.state[p]
        if len(state) == 0:
            # torch.optim's initial state (step on the host, as it keeps it without capturable)
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        for name in ("exp_avg", "exp_avg_sq"):
            if not state[name].is_contiguous():
                state[name] = state[name].contiguous()
        state["step"] += 1
        step = float(state["step"])
        beta1, beta2 = group["betas"]
        kind = "adamw" if self._decoupled(group) else "adam"
        return _kernels().fused_step(
            _as2d(p), _as2d(p.grad), layer.threshold.detach(), kind=kind, lr=float(group["lr"]),
            weight_decay=group["weight_decay"], state1=_as2d(state["exp_avg"]), state2=_as2d(state["exp_avg_sq"]),
            betas=(float(beta1), float(beta2)), eps=group["eps"], step=step,
            **_guard(layer),
        )


class Adam(_AdamFused, torch.optim.Adam):
    """``torch.optim.Adam`` that also builds the threshold layers' next row masks (see
    :mod:`spafl.optim`)."""

    _kind = "adam"


class AdamW(_AdamFused, torch.optim.AdamW):
    """``torch.optim.AdamW`` that also builds the threshold layers' next row masks (see
    :mod:`spafl.optim`)."""

    _kind = "adamw"
