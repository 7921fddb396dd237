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

Compact gradients (``compact_grads=True``, off by default): the backward leaves the threshold
weights' gradient as rows and ``weight.grad`` None. On the CPU (compact backend: active rows, and
pruned rows owed a straight-through term) the step applies ``torch.optim``'s update to every row
from them (a broadcast zero gradient for the weight, the rows as a parameter of their own),
bit-identical for fp32 / fp64 weights (16-bit weights take full gradients). On the Triton path
(Linear, Conv2d) the backward writes the active rows of ``dW`` and ``r``, and the fused kernel forms the
pruned rows' ``sign(W) r / K`` as it reads ``W`` (and the active rows' too where the Linear backward's
GEMM leaves it out: skip and exact mode, which then read no ``W`` for ``dW``). Gradient accumulation falls back to full
gradients by itself; code that reads gradients before the step (clipping) calls
:meth:`FusedStep.full_grads` first; gradients are cleared with the optimizer's ``zero_grad``.
See docs/optim.md.
"""

from __future__ import annotations

import torch

from . import reference
from ._checks import route
from ._functions import _GRAD_SINKS, MaskedGrad, grad_sink
from ._guard import weight_rows
from ._layer_base import weight_owner
from ._rowmask import RowMask

__all__ = ["SGD", "Adam", "AdamW", "FusedStep"]


class FusedStep:
    """What ``SGD``, ``Adam`` and ``AdamW`` add to their ``torch.optim`` base (see the module
    docstring). ``fused_launches`` counts the weights updated by the fused kernel (for tests and
    benchmarks)."""

    _kind = "sgd"
    fused_launches = 0

    def __init__(self, params, *args, compact_grads: bool = False, **kwargs):
        if not isinstance(compact_grads, bool):
            raise TypeError(f"compact_grads must be a bool, got {compact_grads!r}")
        # (set first: torch.optim's constructor registers the groups through add_param_group)
        self.__dict__["_compact_grads"] = compact_grads
        super().__init__(params, *args, **kwargs)

    @property
    def compact_grads(self) -> bool:
        """Whether the compact backward hands this optimizer's threshold weights their gradient as
        rows (see :mod:`spafl.optim`, "Compact gradients")."""
        return self.__dict__.get("_compact_grads", False)

    def add_param_group(self, param_group) -> None:
        super().add_param_group(param_group)
        if self.compact_grads:
            for p in self.param_groups[-1]["params"]:
                grad_sink(p)

    def _sinks(self):
        for group in self.param_groups:
            for p in group["params"]:
                sink = _GRAD_SINKS.get(p)
                if sink is not None:
                    yield group, p, sink

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for _, _, sink in self._sinks():
            sink.grad = None

    def full_grads(self) -> None:
        """Write every pending compact gradient into its weight's ``.grad`` (for code that reads
        gradients before the step: ``clip_grad_norm_``, hooks, logging). The step then takes the
        full gradients."""
        for _, _, sink in self._sinks():
            sink.materialize()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.__dict__["_masked"] = {}
        rows = self._rows_to_step() if _GRAD_SINKS else []
        try:
            return self._step(loss, rows)
        finally:
            self._masked.clear()
            for group, p, sub, _ in rows:
                group["params"].pop()
                self.state.pop(sub, None)
                p.grad = None

    def _rows_to_step(self) -> list:
        """The pending compact gradients, set up for ``torch.optim``'s step: the weight gets a
        broadcast zero gradient (no memory: the update every row gets), and its gradient's rows
        join its group as a parameter of their own, with their rows of the state (see the module
        docstring)."""
        rows = []
        for group, p, sink in list(self._sinks()):
            grad = sink.take()
            if grad is None:
                continue
            if p.grad is not None:  # (set by hand after the backward: add to it)
                p.grad += grad.dense()
                continue
            if isinstance(grad, MaskedGrad):
                layer = weight_owner(p)
                if layer is not None and self._fusable(group, p, layer, grad.dw):
                    self._masked[id(p)] = grad  # the fused kernel takes the rows
                else:
                    p.grad = grad.dense()
                continue
            if self._zero_gradient_moves(group):
                p.grad = torch.zeros((), dtype=p.dtype, device=p.device).expand(p.shape)
            sub = p.detach().index_select(0, grad.rows)
            sub.grad = grad.values.to(p.dtype)
            state = self.state.get(p)
            if state:
                self.state[sub] = {k: _rows_of(v, p, grad.rows) for k, v in state.items()}
            group["params"].append(sub)
            rows.append((group, p, sub, grad.rows))
        return rows

    def _zero_gradient_moves(self, group) -> bool:
        """False where a zero gradient leaves a parameter and its state bit for bit as they are
        (then the rows alone are stepped)."""
        return True

    def _step(self, loss, rows):
        compact = {id(p) for _, p, _, _ in rows}
        masked = self._masked
        fused, plain = [], []
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) in masked:
                    fused.append((group, p, weight_owner(p)))
                    continue
                if p.grad is None and id(p) not in compact:
                    continue
                layer = weight_owner(p)
                if layer is None:
                    continue
                (fused if p.grad is not None and self._fusable(group, p, layer, p.grad)
                 else plain).append((group, p, layer))
        held = [(p, p.grad) for _, p, _ in fused]
        for p, _ in held:
            p.grad = None  # torch.optim skips them; the fused kernel updates them below
        try:
            super().step()
        finally:
            for p, grad in held:
                p.grad = grad
        for group, p, layer in fused:
            grad = masked.get(id(p))
            if grad is None:
                row_mask = self._fused_update(group, p, layer, p.grad, None)
            else:
                row_mask = self._fused_update(group, p, layer, grad.dw, (grad.mask, grad.r, grad.lacks_term))
            layer.keep_next_mask("triton", row_mask)
            self.fused_launches += 1
        for _, p, sub, index in rows:
            p.index_copy_(0, index, sub)
            state, sub_state = self.state.get(p), self.state.get(sub)
            if sub_state:
                if not state:  # (the zero gradient made none: SGD without momentum)
                    state = self.state[p]
                for key, value in sub_state.items():
                    if key in state and _rows_of(state[key], p, None) is not None:
                        state[key].index_copy_(0, index, value)
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

    def _fusable(self, group, p, layer, grad) -> bool:
        options = layer.options
        if not layer.training or route(options.backend, p, None, getattr(layer, "groups", 1)).mask != "triton":
            return False
        if grad.is_sparse or grad.dtype != p.dtype or not _same_rows(p, grad):
            return False
        if group.get("maximize") or group.get("differentiable") or group.get("fused") or group.get("capturable"):
            return False
        if getattr(self, "grad_scale", None) is not None or getattr(self, "found_inf", None) is not None:
            return False
        return self._group_fusable(group, p)

    def _group_fusable(self, group, p) -> bool:
        return True

    def _fused_update(self, group, p, layer, grad, grad_rows):
        raise NotImplementedError


def _rows_of(value, p, index):
    """``value[index]`` for a state tensor shaped like ``p`` (a copy of any other tensor, the same
    object otherwise); with ``index`` None, whether ``value`` is such a tensor (None if not)."""
    if not isinstance(value, torch.Tensor):
        return value if index is not None else None
    if value.shape == p.shape and value.dim() > 0:
        return value if index is None else value.index_select(0, index)
    return value.clone() if index is not None else None


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


def _same_rows(p: torch.Tensor, t: torch.Tensor) -> bool:
    """Whether ``t`` (a gradient or a state buffer) has ``p``'s rows in ``p``'s memory order:
    then the fused kernel steps them as ``[N, K]`` views (contiguous, or channels-last
    convolution weights, whose rows are ``(r, s, c)``)."""
    return (weight_rows(p) is not None and t.shape == p.shape
            and (t.stride() == p.stride() or (t.is_contiguous() and p.is_contiguous())))


def _in_rows_of(state: dict, key: str, p: torch.Tensor) -> torch.Tensor:
    """``state[key]`` in ``p``'s memory layout (converted once, e.g. after a state dict that
    came from another layout)."""
    value = state[key]
    if not _same_rows(p, value):
        value = state[key] = torch.empty_like(p).copy_(value)
    return value


class SGD(FusedStep, torch.optim.SGD):
    """``torch.optim.SGD`` that also builds the threshold layers' next row masks (see
    :mod:`spafl.optim`)."""

    def _zero_gradient_moves(self, group) -> bool:
        # p - lr * 0 is p for every p (-0.0 included); with maximize the gradient is -0.0, and
        # -0.0 + 0.0 would turn into 0.0
        return group["momentum"] != 0 or group["weight_decay"] != 0 or group.get("maximize", False)

    def _fused_update(self, group, p, layer, grad, grad_rows):
        state = self.state[p]
        momentum = group["momentum"]
        buf = state.get("momentum_buffer") if momentum != 0 else None
        first = momentum != 0 and buf is None
        if first:
            buf = torch.empty_like(p)  # (p's layout: the kernel steps the rows in memory order)
        elif buf is not None:
            buf = _in_rows_of(state, "momentum_buffer", p)
        row_mask = _kernels().fused_step(
            weight_rows(p), weight_rows(grad), layer.threshold.detach(), kind="sgd", lr=float(group["lr"]),
            weight_decay=group["weight_decay"], state1=None if buf is None else weight_rows(buf), momentum=momentum,
            dampening=group["dampening"], nesterov=group["nesterov"], first=first, grad_rows=grad_rows,
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

    def _fused_update(self, group, p, layer, grad, grad_rows):
        state = self.state[p]
        if len(state) == 0:
            # torch.optim's initial state (step on the host, as it keeps it without capturable)
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        for name in ("exp_avg", "exp_avg_sq"):
            _in_rows_of(state, name, p)
        state["step"] += 1
        step = float(state["step"])
        beta1, beta2 = group["betas"]
        kind = "adamw" if self._decoupled(group) else "adam"
        return _kernels().fused_step(
            weight_rows(p), weight_rows(grad), layer.threshold.detach(), kind=kind, lr=float(group["lr"]),
            weight_decay=group["weight_decay"], state1=weight_rows(state["exp_avg"]),
            state2=weight_rows(state["exp_avg_sq"]),
            betas=(float(beta1), float(beta2)), eps=group["eps"], step=step, grad_rows=grad_rows,
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
