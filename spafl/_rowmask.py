"""Types and rules shared by the reference path and the Triton kernels."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


class RowMask(NamedTuple):
    """Device-side description of which rows (output units) of a layer are active.

    mask:      bool  [N]  ``score > tau`` (after the collapse guard, if one ran)
    perm:      int32 [N]  active rows ascending, then pruned rows ascending (None when the
                          reference path was asked not to build it)
    count:     int32 [1]  number of active rows (``perm[:count]`` is the compact list)
    score:     fp32  [N]  mean |w| of each row (fp64 for fp64 weights on the reference path)
    collapsed: bool  [1]  whether the collapse guard fired (None when no guard was asked for)
    units:     int64 [A]  the active rows ascending, where the host built the mask for the
                          compacting backend (:mod:`spafl.compact` then needs no second
                          ``nonzero``); None otherwise, and when every row is active
    guard:     the collapse guard's writes (thresholds reset, counter, stored density) still to
               be made for a mask a fused optimizer step built, which the Triton forward's
               launch makes (``kernels.threshold_mask.GuardWrites``); None: none pending
    """

    mask: torch.Tensor
    perm: torch.Tensor
    count: torch.Tensor
    score: torch.Tensor
    collapsed: torch.Tensor | None = None
    units: torch.Tensor | None = None
    guard: object | None = None


def sample_rows(m_rows: int, sample_fraction: float) -> tuple[int, int]:
    """``(count, step)``: the ``sample`` backward mode estimates ``r`` of pruned rows from the
    batch rows ``0, step, ..., (count - 1) * step``, scaled by ``m_rows / count``."""
    count = max(1, min(m_rows, math.ceil(sample_fraction * m_rows)))
    return count, max(1, m_rows // count)
