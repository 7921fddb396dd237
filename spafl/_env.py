"""The machine and library versions, recorded beside every result (runs and benchmarks)."""

from __future__ import annotations

import os
import platform

import torch


def environment(device: torch.device) -> dict:
    """``{"device", "torch", "python", "triton", "spafl"}`` for results written on ``device``."""
    from . import __version__

    cpu = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "spafl": __version__,
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = ""
    return env
