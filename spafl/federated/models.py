"""The paper's models, built from threshold layers (no bias on prunable layers, as in the reference).

==============  =======================================================================
``lenet5``      FMNIST: conv 1->20 5x5, conv 20->50 5x5 (max-pool 2 after each), fc 800->500, fc 500->10
``conv4``       CIFAR-10: four 5x5 convs 3->64->64->128->128 (BN+ReLU, max-pool after conv2 and conv4),
                fc 512->128->128->10 with BatchNorm1d
``vit``         CIFAR-10: patch 4, dim 128, depth 6, 8 heads of 64, MLP 256; the qkv, output and MLP
                linears are threshold layers, the patch embedding and head are dense
``resnet18``    CIFAR-100: pre-activation ResNet-18, widths 32-64-128-256, threshold convs (shortcuts
                included), dense classifier
``digits-cnn``  the quick start's model for 8x8 digits: conv 1->16, conv 16->32 (3x3, pad 1, pool 2), fc 128->64->10
==============  =======================================================================

Any other model works through :func:`spafl.sparsify`.

Every constructor takes ``skip_zero_inputs`` (default True): the threshold layers whose input is
a ReLU's output through max pooling / shape operations only get input-side skipping, found by
:func:`spafl.mark_zero_input_layers` (LeNet-5 and digits-cnn: conv2, fc3, fc4; conv4: every
layer but the first; resnet18: every block's convolutions; vit: none, its linears read
LayerNorm, GELU and attention outputs). See :mod:`spafl.layers` for the rule.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import chain
from ..layers import ThresholdConv2d, ThresholdLinear
from ..zero_inputs import mark_zero_input_layers


def _input_skipping(model: nn.Module, enabled: bool) -> None:
    if not isinstance(enabled, bool):
        raise TypeError(f"skip_zero_inputs must be a bool, got {enabled!r}")
    if enabled:
        mark_zero_input_layers(model)


def _lenet_chain(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The forward of LeNet-5 and digits-cnn (conv, ReLU, pool, conv, ReLU, pool, flatten, fc,
    ReLU, fc) as a compact chain (:mod:`spafl.chain`): the same results, with only the active
    units' activations between the layers. ReLU runs after the pooling, on a quarter of the
    values: ``max(relu(a)) = relu(max(a))`` exactly, and the gradients agree too (both reach the
    window's maximum when it is positive, and nothing otherwise)."""
    h = chain.relu(chain.max_pool2d(chain.layer(model.conv1, x), 2))
    h = chain.relu(chain.max_pool2d(chain.layer(model.conv2, h), 2))
    h = chain.relu(chain.layer(model.fc3, chain.flatten(h)))
    return chain.layer(model.fc4, h, compact_output=False)


class LeNet5(nn.Module):
    def __init__(self, num_classes: int = 10, skip_zero_inputs: bool = True, **layer_kwargs):
        super().__init__()
        self.conv1 = ThresholdConv2d(1, 20, 5, bias=False, **layer_kwargs)
        self.conv2 = ThresholdConv2d(20, 50, 5, bias=False, **layer_kwargs)
        self.fc3 = ThresholdLinear(4 * 4 * 50, 500, bias=False, **layer_kwargs)
        self.fc4 = ThresholdLinear(500, num_classes, bias=False, **layer_kwargs)
        _input_skipping(self, skip_zero_inputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if chain.applies(x, self.conv1, self.conv2, self.fc3, self.fc4):
            return _lenet_chain(self, x)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc3(x.flatten(1)))
        return self.fc4(x)


class Conv4(nn.Module):
    def __init__(self, num_classes: int = 10, skip_zero_inputs: bool = True, **layer_kwargs):
        super().__init__()
        widths = [3, 64, 64, 128, 128]
        self.convs = nn.ModuleList(
            ThresholdConv2d(widths[i], widths[i + 1], 5, bias=False, **layer_kwargs) for i in range(4)
        )
        self.bns = nn.ModuleList(nn.BatchNorm2d(w) for w in widths[1:])
        self.dense1 = ThresholdLinear(512, 128, bias=False, **layer_kwargs)
        self.bn5 = nn.BatchNorm1d(128)
        self.dense2 = ThresholdLinear(128, 128, bias=False, **layer_kwargs)
        self.bn6 = nn.BatchNorm1d(128)
        self.dense3 = ThresholdLinear(128, num_classes, bias=False, **layer_kwargs)
        _input_skipping(self, skip_zero_inputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns, strict=True)):
            x = F.relu(bn(conv(x)))
            if i % 2 == 1:
                x = F.max_pool2d(x, 2)
        x = F.relu(self.bn5(self.dense1(x.flatten(1))))
        x = F.relu(self.bn6(self.dense2(x)))
        return self.dense3(x)


class _PreActBlock(nn.Module):
    """The reference's basic block: BN-ReLU before each conv, a 1x1 threshold-conv shortcut
    (on the activated input) when the width or stride changes."""

    def __init__(self, cin: int, cout: int, stride: int, **layer_kwargs):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = ThresholdConv2d(cin, cout, 3, stride=stride, padding=1, bias=False, **layer_kwargs)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = ThresholdConv2d(cout, cout, 3, padding=1, bias=False, **layer_kwargs)
        self.shortcut = None
        if cin != cout or stride != 1:
            self.shortcut = ThresholdConv2d(cin, cout, 1, stride=stride, bias=False, **layer_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(a))))
        return out + (x if self.shortcut is None else self.shortcut(a))


class ResNet18(nn.Module):
    def __init__(self, num_classes: int = 100, widths: tuple[int, ...] = (32, 64, 128, 256),
                 skip_zero_inputs: bool = True, **layer_kwargs):
        super().__init__()
        self.conv1 = ThresholdConv2d(3, widths[0], 3, padding=1, bias=False, **layer_kwargs)
        self.bn1 = nn.BatchNorm2d(widths[0])
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            for j in range(2):
                blocks.append(_PreActBlock(cin, w, 2 if (i > 0 and j == 0) else 1, **layer_kwargs))
                cin = w
        self.blocks = nn.Sequential(*blocks)
        self.linear = nn.Linear(widths[-1], num_classes)
        _input_skipping(self, skip_zero_inputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.relu(self.bn1(self.conv1(x))))
        return self.linear(F.adaptive_avg_pool2d(x, 1).flatten(1))


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, **layer_kwargs):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.norm = nn.LayerNorm(dim)
        self.to_qkv = ThresholdLinear(dim, 3 * heads * dim_head, bias=False, **layer_kwargs)
        self.to_out = ThresholdLinear(heads * dim_head, dim, bias=False, **layer_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.to_qkv(self.norm(x)).view(b, n, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class _FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, **layer_kwargs):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = ThresholdLinear(dim, hidden, bias=False, **layer_kwargs)
        self.fc2 = ThresholdLinear(hidden, dim, bias=False, **layer_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class ViT(nn.Module):
    def __init__(self, num_classes: int = 10, image_size: int = 32, patch: int = 4, dim: int = 128, depth: int = 6,
                 heads: int = 8, dim_head: int = 64, mlp_dim: int = 256, channels: int = 3,
                 skip_zero_inputs: bool = True, **layer_kwargs):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image size {image_size} is not a multiple of the patch size {patch}")
        self.patch = patch
        self.embed = nn.Linear(channels * patch * patch, dim)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, (image_size // patch) ** 2 + 1, dim))
        layers = []
        for _ in range(depth):
            layers += [_Attention(dim, heads, dim_head, **layer_kwargs), _FeedForward(dim, mlp_dim, **layer_kwargs)]
        self.layers = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))
        _input_skipping(self, skip_zero_inputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.patch
        # [B, C, H, W] -> [B, patches, p*p*C] in (row, col, channel) order within a patch.
        x = x.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)
        x = torch.cat([self.cls.expand(b, -1, -1), self.embed(x)], dim=1) + self.pos
        return self.head(self.layers(x)[:, 0])


class DigitsCNN(nn.Module):
    def __init__(self, num_classes: int = 10, skip_zero_inputs: bool = True, **layer_kwargs):
        super().__init__()
        self.conv1 = ThresholdConv2d(1, 16, 3, padding=1, bias=False, **layer_kwargs)
        self.conv2 = ThresholdConv2d(16, 32, 3, padding=1, bias=False, **layer_kwargs)
        self.fc3 = ThresholdLinear(32 * 2 * 2, 64, bias=False, **layer_kwargs)
        self.fc4 = ThresholdLinear(64, num_classes, bias=False, **layer_kwargs)
        _input_skipping(self, skip_zero_inputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if chain.applies(x, self.conv1, self.conv2, self.fc3, self.fc4):
            return _lenet_chain(self, x)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc4(F.relu(self.fc3(x.flatten(1))))


MODEL_BUILDERS = {"digits-cnn": DigitsCNN, "lenet5": LeNet5, "conv4": Conv4, "vit": ViT, "resnet18": ResNet18}


def build_model(name: str, num_classes: int, **layer_kwargs) -> nn.Module:
    """A fresh model by name; ``layer_kwargs`` go to every threshold layer (``backend``,
    ``backward_mode``, ``sample_fraction``, ``collapse_density``, ``collapse_timing``,
    ``collapse_in_eval``), except ``skip_zero_inputs``, which the model's constructor takes
    (True: input-side skipping where the rule of :mod:`spafl.layers` holds; False: none)."""
    if name not in MODEL_BUILDERS:
        raise ValueError(f"unknown model {name!r}; models: {sorted(MODEL_BUILDERS)}")
    return MODEL_BUILDERS[name](num_classes=num_classes, **layer_kwargs)
