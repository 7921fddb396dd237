"""How many threads a run uses: parallel client workers x torch's intra-op threads.

The models here are small: a LeNet-5 step on a batch of 64 gains nothing from intra-op
threads, and on a busy machine PyTorch's default (one intra-op thread per core) makes every
process fight for every core. Measured on a shared 2-core machine, the default ran 3x to 100x
slower than one thread per process (``spafl demo`` 118 s against 1.2 s). The command line
therefore picks one intra-op thread per worker and as many workers as cores (at most one per
sampled client) unless told otherwise; library calls leave torch's settings alone unless a
:class:`ThreadPolicy` is applied.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch


def cpu_cores() -> int:
    """The cores this process may run on (its affinity mask, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


@dataclass(frozen=True)
class ThreadPolicy:
    """``workers`` clients at once, each op on ``intra_op`` threads; ``inter_op``: torch's
    inter-op pool (shown, not changed); ``cores`` available; ``source``: where the intra-op
    count came from (``"--threads"``, ``"OMP_NUM_THREADS"``, ``"default"``)."""

    workers: int
    intra_op: int
    inter_op: int
    cores: int
    source: str = "default"

    @classmethod
    def choose(cls, *, workers: int | None = None, threads: int | None = None, clients_per_round: int = 1,
               device: str | torch.device = "cpu", environ: Mapping[str, str] | None = None) -> ThreadPolicy:
        """The policy for a run of ``clients_per_round`` clients a round on ``device``.

        Intra-op threads: ``threads`` if given, else ``OMP_NUM_THREADS`` when the environment
        sets it, else 1. Workers: ``workers`` if given, else 1 on CUDA (clients run one after
        another on the device), else as many as the cores hold at that thread count, at most
        ``clients_per_round``."""
        environ = os.environ if environ is None else environ
        cores = cpu_cores()
        if threads is not None:
            intra, source = _positive("threads", threads), "--threads"
        elif environ.get("OMP_NUM_THREADS", "").strip():
            text = environ["OMP_NUM_THREADS"].strip()
            try:
                intra = _positive("OMP_NUM_THREADS", int(text.split(",")[0]))
            except ValueError as e:
                raise ValueError(f"OMP_NUM_THREADS must be a positive integer, got {text!r}") from e
            source = "OMP_NUM_THREADS"
        else:
            intra, source = 1, "default"
        on_cuda = torch.device(device).type == "cuda" if str(device) != "auto" else torch.cuda.is_available()
        if workers is not None:
            workers = _positive("workers", workers)
        elif on_cuda:
            workers = 1
        else:
            workers = max(1, min(cores // intra, _positive("clients_per_round", clients_per_round)))
        return cls(workers, intra, torch.get_num_interop_threads(), cores, source)

    def describe(self, workers: bool = True) -> str:
        """One line for a run's header (``workers=False``: a run without clients)."""
        def count(n: int, word: str) -> str:
            return f"{n} {word}{'s' if n != 1 else ''}"

        head = f"{count(self.workers, 'worker')} x " if workers else ""
        return (f"{head}{count(self.intra_op, 'intra-op thread')} ({self.source}), {self.inter_op} inter-op, "
                f"{count(self.cores, 'core')}")

    @contextlib.contextmanager
    def applied(self) -> Iterator[ThreadPolicy]:
        """Set torch's intra-op thread count for the block, then restore it."""
        before = torch.get_num_threads()
        torch.set_num_threads(self.intra_op)
        try:
            yield self
        finally:
            torch.set_num_threads(before)
