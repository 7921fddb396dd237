"""``transforms.ToTensor``: an image ``[H, W]`` or ``[H, W, C]`` (uint8 array or tensor) to a
float32 tensor ``[C, H, W]`` in [0, 1], as torchvision's does for uint8 input."""

from __future__ import annotations

import numpy as np
import torch


class ToTensor:
    def __call__(self, pic) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(pic))
        if x.dim() == 2:
            x = x.unsqueeze(-1)
        if x.dim() != 3:
            raise ValueError(f"ToTensor expects an image [H, W] or [H, W, C], got shape {tuple(x.shape)}")
        x = x.permute(2, 0, 1).contiguous()
        if x.dtype == torch.uint8:
            return x.to(torch.float32).div_(255)
        return x.to(torch.float32)

    def __repr__(self) -> str:
        return "ToTensor()"


__all__ = ["ToTensor"]
