"""Model-wide conversion: sparsify / densify, the layer iterators and state dicts."""

import pytest
import torch
from torch import nn

import spafl
from spafl import ThresholdConv2d, ThresholdLinear


def _net():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Sequential(nn.Linear(4 * 4 * 4, 6)))


# ----------------------------------------------------------------------------- iterators


def test_threshold_layers_yields_layers_and_named_threshold_layers_pairs():
    model = spafl.sparsify(_net())
    layers = list(spafl.threshold_layers(model))
    named = list(spafl.named_threshold_layers(model))
    assert [type(m) for m in layers] == [ThresholdConv2d, ThresholdLinear]
    assert [n for n, _ in named] == ["0", "3.0"]
    assert all(a is b for a, (_, b) in zip(layers, named, strict=True))
    # like modules() / named_modules(): a layer used twice is listed once
    shared = ThresholdLinear(3, 3)
    assert list(spafl.named_threshold_layers(nn.Sequential(shared, nn.ReLU(), shared))) == [("0", shared)]
    for fn in (spafl.threshold_layers, spafl.named_threshold_layers):
        with pytest.raises(TypeError, match="expects an nn.Module, got list"):
            fn([shared])
