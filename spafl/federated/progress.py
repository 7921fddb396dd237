"""Progress and time left, on stderr: a run's progress line (:class:`ProgressLine`, ``spafl
train``) and a comparison's overall count of rounds (:class:`OverallEta`, ``spafl compare``)."""

from __future__ import annotations

import sys
import time


class ProgressLine:
    """A run's one-line progress bar on stderr (a line per ~5% when stderr is not a terminal)."""

    def __init__(self, total: int, done: int):
        self.total, self.start_done = total, done
        self.start = time.perf_counter()
        self.tty = sys.stderr.isatty()
        self.step = max(1, total // 20)

    def update(self, row: dict) -> None:
        done = row["round"]  # the round's number, counting from 1: the rounds done
        elapsed = time.perf_counter() - self.start
        rate = elapsed / max(done - self.start_done, 1)
        filled = int(30 * done / self.total)
        line = (f"[{'#' * filled}{'.' * (30 - filled)}] round {done}/{self.total}  acc {row['acc_mean']:.2f}%  "
                f"density {row['density']:.3f}  {rate:.2f} s/round  eta {rate * (self.total - done):.0f} s")
        if self.tty:
            sys.stderr.write("\r" + line)
            sys.stderr.flush()
        elif done % self.step == 0 or done == self.total:
            sys.stderr.write(line + "\n")

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


class OverallEta:
    """The comparison's overall progress: rounds done of ``total``, and the time left at the
    mean round time measured so far in this invocation (runs differ in cost per round, the
    dense methods' more, so it firms up as the comparison goes)."""

    def __init__(self, total: int):
        self.total, self.done, self.run, self.start = total, 0, 0, time.perf_counter()

    def skip(self, rounds: int) -> None:
        self.done += rounds

    def ran(self, rounds: int) -> None:
        self.done += rounds
        self.run += rounds

    def describe(self) -> str:
        elapsed = time.perf_counter() - self.start
        left = self.total - self.done
        text = f"{self.done} of {self.total} rounds done overall, {elapsed:.0f} s elapsed"
        if left and self.run:
            text += f", about {elapsed / self.run * left:.0f} s left"
        return text
