"""SparsyFed's layers: Powerpropagation weights and activation pruning of what backward saves.

Each :class:`PowerpropLinear` / :class:`PowerpropConv2d` holds a latent ``weight`` ``v`` and
computes with ``w = sign(v) * |v|**beta`` (Powerpropagation). With ``beta > 1`` the gradient of
``w`` with respect to ``v`` is zero at ``v = 0``, so a weight pruned to exactly zero stays zero
during local training. The forward pass is exact; in training, the input saved for the
backward pass keeps only its ``ceil((1 - s) * numel)`` largest magnitudes, ``s`` being the
layer's weight sparsity at the start of the round: the weight gradient uses the pruned input,
the input gradient is exact. For a conv the magnitude cut is computed on the first batch of the
round and reused; for a linear layer it is recomputed every batch. Evaluation never prunes.

``beta`` is either fixed (the paper's 1.25) or, in the hyperparameter-free variant, set per layer
at the start of each round to ``1 + mean(|V| / sigma_1(|V|))`` with ``sigma_1`` the top singular
value of ``|V|`` reshaped to ``[out, -1]`` (one power iteration from a seeded start).

The pruned input is kept as a dense tensor with zeros: the arithmetic is SparsyFed's, the memory
saving of storing it sparsely is not reproduced.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.grad import conv2d_input, conv2d_weight


def powerprop_weight(v: torch.Tensor, beta: float) -> torch.Tensor:
    """``sign(v) * |v|**beta`` (``v`` itself when ``beta == 1``)."""
    return v if beta == 1.0 else torch.sign(v) * v.abs().pow(beta)


def _magnitude_cut(x: torch.Tensor, keep: float) -> torch.Tensor | None:
    """The magnitude above which the ``ceil(keep * numel)`` largest ``|x|`` lie (a device scalar;
    ties at the cut are all kept), or None when everything is kept."""
    n = x.numel()
    k = math.ceil(keep * n)
    if k >= n:
        return None
    return torch.kthvalue(x.detach().abs().reshape(-1).float(), n - k + 1).values


def _prune(x: torch.Tensor, cut: torch.Tensor | None) -> torch.Tensor:
    return x if cut is None else torch.where(x.abs() >= cut, x, torch.zeros((), dtype=x.dtype, device=x.device))


class _PrunedInputLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, bias, cut):
        ctx.save_for_backward(_prune(x, cut), w)
        ctx.has_bias = bias is not None
        return F.linear(x, w, bias)

    @staticmethod
    def backward(ctx, grad):
        x_pruned, w = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ w
        g2 = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_w = g2.t() @ x_pruned.reshape(-1, x_pruned.shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2.sum(0)
        return grad_x, grad_w, grad_b, None


class _PrunedInputConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, bias, cut, stride, padding, dilation, groups):
        ctx.save_for_backward(_prune(x, cut), w)
        ctx.conf = (stride, padding, dilation, groups)
        ctx.input_shape = x.shape
        ctx.has_bias = bias is not None
        return F.conv2d(x, w, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        x_pruned, w = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = conv2d_input(ctx.input_shape, w, grad, *ctx.conf)
        if ctx.needs_input_grad[1]:
            grad_w = conv2d_weight(x_pruned, w.shape, grad, *ctx.conf)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None, None, None, None


class _PowerpropMixin:
    """Shared state: ``beta`` (the exponent in use), ``activation_pruning``, and the per-round
    ``keep`` fraction of inputs saved for backward (1: nothing pruned)."""

    def _init_powerprop(self, beta: float, activation_pruning: bool) -> None:
        if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta >= 1):
            raise ValueError(f"beta must be a finite number >= 1, got {beta!r}")
        self.beta = float(beta)
        self.activation_pruning = bool(activation_pruning)
        self.keep = 1.0
        self._cut: torch.Tensor | None = None

    @property
    def effective_weight(self) -> torch.Tensor:
        """``w = sign(v) * |v|**beta``, the weight the layer computes with."""
        return powerprop_weight(self.weight, self.beta)

    def reset_powerprop(self, generator: torch.Generator | None = None) -> None:
        """SparsyFed's initialisation: ``u`` from a normal with std ``sqrt(1/fan_in)/0.8796``
        truncated at 2 std, then ``v = sign(u) * |u|**(1/beta)`` so that ``w`` starts as ``u``."""
        std = math.sqrt(1.0 / self.weight[0].numel()) / 0.87962566103423978
        with torch.no_grad():
            u = torch.empty(self.weight.shape, dtype=torch.float32)
            nn.init.trunc_normal_(u, std=std, a=-2 * std, b=2 * std, generator=generator)
            v = torch.sign(u) * u.abs().pow(1.0 / self.beta)
            self.weight.copy_(v.to(self.weight.dtype))

    def begin_round(self, keep: float) -> None:
        self.keep = float(keep)
        self._cut = None

    def _pruning(self) -> bool:
        return self.training and self.activation_pruning and self.keep < 1.0 and torch.is_grad_enabled()


class PowerpropLinear(_PowerpropMixin, nn.Linear):
    """``nn.Linear`` with a Powerpropagation latent weight and SparsyFed's activation pruning."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, beta: float = 1.25,
                 activation_pruning: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._init_powerprop(beta, activation_pruning)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.effective_weight
        if not self._pruning():
            return F.linear(x, w, self.bias)
        return _PrunedInputLinear.apply(x, w, self.bias, _magnitude_cut(x, self.keep))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", beta={self.beta:.4g}, activation_pruning={self.activation_pruning}"


class PowerpropConv2d(_PowerpropMixin, nn.Conv2d):
    """``nn.Conv2d`` (zero padding) with a Powerpropagation latent weight and SparsyFed's
    activation pruning (the magnitude cut of the first pruned batch is reused for the round)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, *, beta: float = 1.25, activation_pruning: bool = True,
                 device=None, dtype=None):
        if isinstance(padding, str):
            raise ValueError("PowerpropConv2d takes explicit integer padding, not a padding string")
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         device=device, dtype=dtype)
        self._init_powerprop(beta, activation_pruning)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.effective_weight
        if not self._pruning():
            return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)
        if self._cut is None:
            self._cut = _magnitude_cut(x, self.keep)
        return _PrunedInputConv2d.apply(x, w, self.bias, self._cut, self.stride, self.padding, self.dilation,
                                        self.groups)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", beta={self.beta:.4g}, activation_pruning={self.activation_pruning}"


POWERPROP_TYPES = (PowerpropLinear, PowerpropConv2d)


def powerprop_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if isinstance(module, POWERPROP_TYPES):
            yield name, module


def to_powerprop(model: nn.Module, beta: float = 1.25, activation_pruning: bool = True, reinit: bool = True,
                 generator: torch.Generator | None = None) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` and ``nn.Conv2d`` (exactly these types, as
    :func:`spafl.sparsify` does) by its Powerpropagation version, and return ``model``.
    ``reinit``: SparsyFed's initialisation; otherwise ``v = sign(w) |w|**(1/beta)`` keeps the
    function. Biases stay dense."""
    targets = [(n, m) for n, m in model.named_modules() if n and type(m) in (nn.Linear, nn.Conv2d)]
    for name, m in targets:
        factory = dict(device=m.weight.device, dtype=m.weight.dtype)
        if type(m) is nn.Linear:
            new = PowerpropLinear(m.in_features, m.out_features, m.bias is not None, beta=beta,
                                  activation_pruning=activation_pruning, **factory)
        else:
            if m.padding_mode != "zeros" or isinstance(m.padding, str):
                raise ValueError(f"{name}: only explicit zero padding is supported, got padding={m.padding!r}, "
                                 f"padding_mode={m.padding_mode!r}")
            new = PowerpropConv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                                  m.groups, m.bias is not None, beta=beta, activation_pruning=activation_pruning,
                                  **factory)
        with torch.no_grad():
            if reinit:
                new.reset_powerprop(generator)
            else:
                new.weight.copy_(torch.sign(m.weight) * m.weight.abs().pow(1.0 / new.beta))
            if m.bias is not None:
                new.bias.copy_(m.bias)
        new.train(m.training)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return model


@torch.no_grad()
def spectral_exponent(v: torch.Tensor, generator: torch.Generator) -> float:
    """``1 + mean(|V| / sigma_1(|V|))`` with ``sigma_1`` from one power iteration on ``|V|``
    reshaped to ``[out, -1]``, started from seeded normal vectors."""
    m = v.detach().abs().reshape(v.shape[0], -1).float()
    u0 = torch.randn(m.shape[0], 1, generator=generator).to(m.device)
    v1 = F.normalize(m.t() @ u0, dim=0)
    u1 = F.normalize(m @ v1, dim=0)
    sigma = (u1.t() @ m @ v1).clamp_min(1e-12)
    return 1.0 + float((m / sigma).mean())


@torch.no_grad()
def begin_round(model: nn.Module, spectral_seed: int | None = None) -> dict[str, float]:
    """Prepare a received model for a round: in the spectral variant (``spectral_seed`` given)
    set each layer's ``beta`` from its latent weight; set each layer's activation ``keep``
    fraction to ``1 - s_l`` (``s_l``: fraction of exact zeros in ``w``). One host sync. Returns
    ``{layer: s_l}``."""
    layers = list(powerprop_layers(model))
    if spectral_seed is not None:
        for i, (_, layer) in enumerate(layers):
            g = torch.Generator().manual_seed(int(np.random.SeedSequence([spectral_seed, i]).generate_state(1)[0]))
            layer.beta = spectral_exponent(layer.weight, g)
    if not layers:
        return {}
    zeros = torch.stack([(layer.weight == 0).float().mean() for _, layer in layers]).cpu().tolist()
    for (_, layer), s in zip(layers, zeros, strict=True):
        layer.begin_round(1.0 - s)
    return {name: s for (name, _), s in zip(layers, zeros, strict=True)}


@torch.no_grad()
def global_topk_(weights: list[torch.Tensor], sparsity: float) -> int:
    """Zero, in place, all but the ``round((1 - sparsity) * total)`` largest-magnitude entries
    across ``weights`` (one global ranking; per-tensor sparsity is whatever results). Returns
    the number kept."""
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    sizes = [w.numel() for w in weights]
    total = sum(sizes)
    keep = topk_keep(total, sparsity)
    if keep >= total:
        return total
    flat = torch.cat([w.detach().abs().reshape(-1).float() for w in weights])
    mask = torch.zeros(total, dtype=torch.bool, device=flat.device)
    mask[torch.topk(flat, keep, sorted=False).indices] = True
    for w, m in zip(weights, mask.split(sizes), strict=True):
        w.mul_(m.view(w.shape).to(w.dtype))
    return keep


def topk_keep(total: int, sparsity: float) -> int:
    """How many weights :func:`global_topk_` keeps out of ``total``."""
    return min(total, max(1, round((1 - sparsity) * total)))
