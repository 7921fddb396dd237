"""The in-process transport's workers: working models (one per worker) and the threads that run
client jobs on them, CPU only. Every job gets a model of its own and the results come back in
the order of the jobs, so a run's history does not depend on the worker count."""

from __future__ import annotations

import copy
import queue
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn


class Workers:
    """``count`` working models: ``model`` (slot 0) and copies of it made on first parallel use,
    each as ``(model, prunable(model))``."""

    def __init__(self, model: nn.Module, prunable: Callable[[nn.Module], list], count: int):
        self.count = count
        self._prunable = prunable
        self.slots: list[tuple[nn.Module, list]] = [(model, prunable(model))]
        self._free: queue.SimpleQueue | None = None
        self._pool: ThreadPoolExecutor | None = None

    def map(self, fn: Callable, items: Sequence) -> list:
        """``[fn(slot, item) for item in items]``, spread over the workers (each call gets a
        working model of its own, ``slot = (model, prunable layers)``); results in the order
        of ``items``."""
        if self.count == 1 or len(items) <= 1:
            return [fn(self.slots[0], item) for item in items]
        if self._pool is None:
            model = self.slots[0][0]
            for _ in range(self.count - 1):
                copy_ = copy.deepcopy(model)
                self.slots.append((copy_, self._prunable(copy_)))
            self._free = queue.SimpleQueue()
            for slot in self.slots:
                self._free.put(slot)
            self._pool = ThreadPoolExecutor(self.count, thread_name_prefix="spafl-client")
            weakref.finalize(self, self._pool.shutdown, wait=False)
        free = self._free

        def task(item):
            slot = free.get()
            try:
                return fn(slot, item)
            finally:
                free.put(slot)

        return list(self._pool.map(task, items))

    def close(self) -> None:
        """Stop the threads and drop the copies (a later parallel call makes them again)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool, self._free = None, None
            del self.slots[1:]


def check_workers(workers: int, device: torch.device) -> int:
    """``workers`` if the run can use that many: a positive integer, and 1 on CUDA (the clients
    of one device run one after another: concurrent clients would queue on the same stream and
    the threads would only add host synchronisation)."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    if workers > 1 and device.type != "cpu":
        raise ValueError(f"workers={workers}: clients run in parallel threads on the CPU only; on {device.type} "
                         "they run one after another (use workers=1)")
    return workers
