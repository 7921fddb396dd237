"""The machine, library versions and code version, recorded beside every result (run folders'
``history.json`` and benchmarks): what a result can be traced back to.

A run's history is bit-identical only on the same CPU model (or GPU), thread count and library
versions (CPU kernels reduce in an order that depends on the instruction set and the threads);
these fields say which ones produced it.
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from pathlib import Path

import torch


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=1)
def code_version() -> dict:
    """``{"git_commit", "git_dirty"}`` when spafl runs from a git checkout (``git_dirty``: tracked
    files differ from the commit), else ``{"git_commit": "", "git_dirty": None}`` (an installed
    package: its version says what it is)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return {"git_commit": "", "git_dirty": None}
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()

        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": "", "git_dirty": None}
    return {"git_commit": commit, "git_dirty": dirty}


def environment(device: torch.device) -> dict:
    """``{"device", "cpu", "threads", "torch", "numpy", "python", "triton", "spafl", "git_commit",
    "git_dirty"}`` for results written on ``device`` (``threads``: torch's intra-op threads now)."""
    import numpy as np

    from . import __version__

    cpu = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "spafl": __version__,
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = ""
    env.update(code_version())
    return env
