"""Data sets that ship with the package (no download)."""

from __future__ import annotations

from importlib import resources

import numpy as np
import torch


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The embedded 8x8 handwritten digits: ``(images float32 [1797, 8, 8] in [0, 1],
    labels int64 [1797])``. See ``spafl/data/README.md`` for its origin and licence."""
    with resources.files("spafl").joinpath("data/digits.npz").open("rb") as f:
        data = np.load(f)
        images, labels = data["images"], data["labels"]
    return torch.from_numpy(images.astype(np.float32) / 16.0), torch.from_numpy(labels.astype(np.int64))
