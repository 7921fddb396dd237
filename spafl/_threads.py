"""How many threads a run uses: parallel client workers x torch's intra-op threads.

The models here are small: a LeNet-5 step on a batch of 64 gains nothing from intra-op
threads, and on a busy machine PyTorch's default (one intra-op thread per core) makes every
process fight for every core. Measured on a shared 2-core machine, the default ran 3x to 100x
slower than one thread per process (``spafl demo`` 118 s against 1.2 s). The command line
therefore picks one intra-op thread per worker and as many workers as cores (at most one per
sampled client) unless told otherwise; library calls leave torch's settings alone unless a
:class:`ThreadPolicy` is applied, and the layers warn once (:func:`warn_once_about_threads`)
when a training loop of one's own runs them on torch's default threads.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
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
        """Set torch's intra-op thread count for the block, then restore it. A policy applied is
        a choice made: the layers' warning about unchosen threads stays silent from then on."""
        global _warned
        _warned = True
        before = torch.get_num_threads()
        torch.set_num_threads(self.intra_op)
        try:
            yield self
        finally:
            torch.set_num_threads(before)


class ThreadsWarning(UserWarning):
    """Threshold layers train on a CPU with several intra-op threads that nobody chose."""


_warned = False


def warn_once_about_threads(device: torch.device) -> None:
    """Warn, once per process, when a threshold layer trains on a CPU with more than one
    intra-op thread and ``OMP_NUM_THREADS`` is unset: torch's default (one thread per core)
    made training loops with these small layers 15-25x slower on a 2-core machine (7-12 s an
    epoch against 0.45 s on one thread). Set ``OMP_NUM_THREADS`` (to any value) or filter
    :class:`ThreadsWarning` to keep more threads without the warning."""
    global _warned
    if _warned or device.type != "cpu":
        return
    _warned = True
    threads = torch.get_num_threads()
    if threads <= 1 or os.environ.get("OMP_NUM_THREADS", "").strip():
        return
    warnings.warn(ThreadsWarning(
        f"spafl: threshold layers are training on {threads} intra-op threads (torch's default, one per core); "
        "these small layers run many times faster on one: call torch.set_num_threads(1) before training, or run "
        "with OMP_NUM_THREADS=1 (see docs/getting-started.md, Threads)"), stacklevel=_caller_level())


def _caller_level() -> int:
    """The ``stacklevel`` of the first frame outside spafl and torch: the user's line that ran
    the model (through any number of nn.Module calls)."""
    inside = (os.path.dirname(__file__), os.path.dirname(torch.__file__))
    frame, level = sys._getframe(2), 2  # 1: warn_once_about_threads; 2: its caller
    while frame is not None and frame.f_code.co_filename.startswith(inside):
        frame, level = frame.f_back, level + 1
    return level
