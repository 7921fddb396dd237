"""The row mask of a threshold layer's forward and the collapse guard: one guard for every path
(the eager layers and functional API, the ``spafl::row_mask`` operator that ``torch.compile``
traces, the compact chains), deciding on the host for CPU tensors on the plain-PyTorch
backends and on the device elsewhere."""

from __future__ import annotations

import math
import struct

import torch

from . import reference
from ._checks import check_finite_values
from ._options import ThresholdOptions
from ._rowmask import RowMask

_KERNELS = None


def _kernels():
    # Imported on first use so that the reference path works where Triton is not installed.
    global _KERNELS
    if _KERNELS is None:
        from . import kernels

        _KERNELS = kernels
    return _KERNELS


def _check_finite(options: ThresholdOptions, threshold: torch.Tensor) -> bool:
    """``options.check_finite`` resolved: None means on for CPU tensors (the check is free there)
    and off elsewhere (on CUDA it synchronises with the host)."""
    check = options.check_finite
    return threshold.device.type == "cpu" if check is None else check


def _row_mask(weight, threshold, mask_backend: str, collapse_density: float | None, with_perm: bool = True) -> RowMask:
    if mask_backend == "triton":  # (a launch records no graph: no detach needed)
        w2d = weight if weight.dim() == 2 else weight.reshape(weight.shape[0], -1)
        return _kernels().threshold_row_mask(w2d, threshold, collapse_density=collapse_density)
    w2d = weight.detach()
    if w2d.dim() != 2:
        w2d = w2d.reshape(w2d.shape[0], -1)
    with torch.no_grad():
        return reference.row_mask(w2d, threshold, collapse_density=collapse_density, with_perm=with_perm)


def _guarded_row_mask(
    weight: torch.Tensor,
    threshold: torch.Tensor,
    mask_backend: str,
    with_perm: bool,
    options: ThresholdOptions,
    counter: torch.Tensor | None,
    previous_density: torch.Tensor | None,
    check_finite: bool = False,
    precomputed: tuple[str, RowMask] | None = None,
) -> RowMask:
    """The forward's row mask, after the collapse guard of ``options`` (if any) has run: the one
    guard of every path (eager, the ``spafl::row_mask`` operator, the chains).

    ``"current"``: the guard tests this mask's density, and the mask of ``tau = 0`` is used
    when it fires. ``"previous"``: it tests ``previous_density`` (the density of the last
    guarded forward, as the SpaFL authors' layers test ``self.ratio``), resets before the mask
    is built, and the mask comes from the reset thresholds. Either way ``previous_density``
    (when given) then holds this forward's density. When it fires, ``threshold`` is reset to 0
    in place and ``counter`` incremented. Device-side, without a host synchronisation, except
    for CPU tensors on the plain-PyTorch backends, where the host decides (same results, and a
    forward where the guard does not fire pays no no-op writes). ``check_finite``: reject NaN /
    inf thresholds and weights first (nothing is modified then).

    ``precomputed``: ``(mask backend, RowMask)`` that a fused optimizer step (:mod:`spafl.optim`)
    built from these very weights and thresholds with this guard density; the caller has checked
    that they are unchanged since. On the host path only its scores are read; elsewhere it is the
    mask (the guard's "current" test included) when it comes from this mask backend.
    """
    density = options.collapse_density
    on_host = mask_backend != "triton" and not with_perm and weight.device.type == "cpu"
    if on_host:
        return _host_row_mask(weight, threshold, mask_backend == "compact", density, options.collapse_timing,
                              counter, previous_density, check_finite,
                              None if precomputed is None else precomputed[1].score)
    # (with a guard, the kept mask must carry its decision: the fused step makes it for either timing)
    reuse = (precomputed is not None and precomputed[0] == mask_backend
             and (not with_perm or precomputed[1].perm is not None)
             and (density is None or precomputed[1].collapsed is not None))
    if check_finite:  # a pass over the weight of its own: only where the check was asked for
        check_finite_values(threshold, precomputed[1].score if reuse else reference.row_scores(weight))
    if reuse:
        row_mask = precomputed[1]
        if density is not None:
            _reset(threshold, row_mask.collapsed, counter)
            _store_density(previous_density, row_mask)
        return row_mask
    if density is None:
        return _row_mask(weight, threshold, mask_backend, None, with_perm)
    previous = options.collapse_timing == "previous"
    # (no autograd context needed: the masks are built from detached tensors, and _reset writes
    # the thresholds through a detached alias)
    if previous:
        collapsed = (previous_density <= density).reshape(1)
        _reset(threshold, collapsed, counter)
        row_mask = _row_mask(weight, threshold, mask_backend, None, with_perm)._replace(collapsed=collapsed)
    else:
        row_mask = _row_mask(weight, threshold, mask_backend, density, with_perm)
        _reset(threshold, row_mask.collapsed, counter)
    _store_density(previous_density, row_mask)
    return row_mask


def _store_density(previous_density: torch.Tensor | None, row_mask: RowMask) -> None:
    """This forward's density into ``previous_density`` (when kept), on the device."""
    if previous_density is None:
        return
    n = row_mask.mask.shape[0]
    if previous_density.dtype == torch.float32:  # the fp32 quotient written in place: one operation
        torch.div(row_mask.count, n, out=previous_density.view(1))
    else:
        previous_density.copy_(row_mask.count.reshape(()) / n)  # (fp32, as the host)


def _host_row_mask(weight, threshold, want_units: bool, density, timing, counter, previous_density, check_finite,
                   score=None):
    """:func:`_guarded_row_mask` for CPU tensors on the plain-PyTorch backends, deciding on the
    host (a synchronisation is free there) with as few operations as a small layer allows: the
    comparisons are the device path's, in its dtypes (``s > tau`` as ``s - tau > 0``, the same
    for IEEE floats, whose difference is 0 only when they are equal; one finite sum of it tells
    that both are finite). ``RowMask.perm``, ``count``, ``score`` and ``collapsed`` stay None
    (nothing downstream reads them); ``units`` holds the active rows for the compacting backend
    (``want_units``). ``score``: the row scores of ``weight`` when already known (a fused
    optimizer step computed them)."""
    if score is None:
        score = reference.row_scores(weight)
    tau = threshold.detach()
    if tau.dtype != score.dtype:
        tau = tau.to(score.dtype)
    if check_finite:
        diff = score - tau
        if not math.isfinite(diff.sum().item()):
            check_finite_values(threshold.detach(), score)  # names the culprits (or finds an overflowed sum)
        mask = diff > 0
    else:
        mask = score > tau
    units = None
    if want_units or density is not None:
        units = mask.nonzero().view(-1)
    if density is not None:
        n = mask.shape[0]
        if timing == "previous":
            fired = bool(previous_density <= density)
        else:
            fired = units.shape[0] <= _float32(density * n)  # the device path compares in fp32
        if fired:
            with torch.no_grad():
                threshold.zero_()
            if counter is not None:
                counter.add_(1)
            mask = score > 0
            units = mask.nonzero().view(-1)
        if previous_density is not None:
            previous_density.fill_(units.shape[0] / n)  # = the device path's fp32 count / n, rounded once
    return RowMask(mask, None, None, None, None, units if want_units else None)


def _reset(threshold: torch.Tensor, collapsed: torch.Tensor, counter: torch.Tensor | None) -> None:
    """The guard's reset on the device: ``threshold`` to 0 and ``counter`` + 1 where
    ``collapsed`` (no host synchronisation)."""
    # (through a detached alias: a torch.jit trace replays the write without the caller's no_grad)
    threshold.detach().masked_fill_(collapsed, 0.0)
    if counter is not None:
        counter.add_(collapsed.reshape(()))


def _float32(value: float) -> float:
    found = _FLOAT32.get(value)
    if found is None:
        if len(_FLOAT32) > 1024:  # (a caller sweeping densities should not grow it forever)
            _FLOAT32.clear()
        found = _FLOAT32[value] = struct.unpack("f", struct.pack("f", value))[0]
    return found


_FLOAT32: dict[float, float] = {}
