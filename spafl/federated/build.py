"""What every process of a run builds the same way before the first round: the device, the
dataset checks, the run's initial model (seeded, so every process builds the same one) and the
whole test set a global model is evaluated on."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from .config import FedConfig
from .data import ImageDataset, client_data
from .keys import derived_seed
from .methods import Method
from .models import build_model


def resolve_device(name: str) -> torch.device:
    """The device ``config.device`` names (``auto``: CUDA when available); ``ValueError``
    naming the value when torch does not know it or this machine does not have it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {name!r} is not a device (auto, cpu, cuda or cuda:<index>)") from e
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r}: the simulator runs on cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} requested but this machine has {torch.cuda.device_count()} CUDA "
                             "device(s)")
    return device


def check_dataset(dataset: ImageDataset, config: FedConfig, custom_model: bool) -> None:
    """Fail with a clear message on data the run cannot use (before any training)."""
    from .config import model_input_shape

    for split in ("train", "test"):
        x, y = getattr(dataset, f"{split}_x"), getattr(dataset, f"{split}_y")
        if x.dim() != 4 or y.dim() != 1 or x.shape[0] != y.shape[0]:
            raise ValueError(f"dataset {split} split: expected images [n, C, H, W] and labels [n], "
                             f"got {tuple(x.shape)} and {tuple(y.shape)}")
        if x.dtype != torch.uint8 and not x.is_floating_point():
            raise ValueError(f"dataset {split} images must be uint8 or floating point, got {x.dtype}")
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise ValueError(f"dataset {split} images hold non-finite values")
        if y.dtype != torch.int64 or (len(y) and (int(y.min()) < 0 or int(y.max()) >= dataset.num_classes)):
            raise ValueError(f"dataset {split} labels must be int64 in [0, {dataset.num_classes})")
    if not custom_model and tuple(dataset.image_shape) != model_input_shape(config.model):
        raise ValueError(f"model {config.model!r} takes {model_input_shape(config.model)} images but the dataset "
                         f"has {tuple(dataset.image_shape)}; pass model_fn= for another model")


def whole_test_set(dataset: ImageDataset, config: FedConfig, device: torch.device):
    """The dataset's whole test split as one client's data (no training samples): where a
    global model is evaluated besides every client's own test split."""
    everything = np.arange(len(dataset.test_y))
    return client_data(dataset, [everything[:0]], [everything], config.normalize, False, device)[0]


def initial_model(config: FedConfig, method: Method, num_classes: int, device: torch.device,
                  model_fn: Callable[[], nn.Module] | None = None) -> nn.Module:
    """The run's initial model, the same in every process that builds it: seeded from
    ``config.seed``, built from ``config.model`` (or ``model_fn``), converted by the method."""
    torch.manual_seed(derived_seed(config.seed, "init"))
    layer_kwargs = dict(backend=config.backend, backward_mode=config.backward_mode,
                        sample_fraction=config.sample_fraction, collapse_density=config.collapse_density,
                        collapse_timing=config.collapse_timing, collapse_in_eval=config.collapse_in_eval)
    model = model_fn() if model_fn is not None else build_model(config.model, num_classes, **layer_kwargs)
    model = method.prepare_model(model.to(device))
    if channels_last(config.memory_format, device, model):
        model = model.to(memory_format=torch.channels_last)  # (the 4-D parameters and buffers; the same objects)
    return model


def channels_last(memory_format: str, device: torch.device, model: nn.Module) -> bool:
    """Whether ``model`` runs channels-last: ``memory_format`` "channels_last", or "auto" on CUDA,
    for a model with 4-D weights (convolutions). Channels-last weights make the convolutions'
    outputs channels-last, so every later activation is too, and the Triton convolutions read
    them in place (an NCHW activation is converted at every forward and again in the backward)."""
    if memory_format == "contiguous" or (memory_format == "auto" and torch.device(device).type != "cuda"):
        return False
    return any(p.dim() == 4 for p in model.parameters())


