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
from .compact import _divisor

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


def weight_rows(weight: torch.Tensor) -> torch.Tensor | None:
    """``weight [N, ...]`` as ``[N, K]`` rows in its memory order, without a copy: a view of a
    contiguous weight, or of a channels-last convolution weight with its columns in ``(r, s, c)``
    order. None for any other layout. The Triton row mask and the fused optimizer step
    (:mod:`spafl.optim`) both score rows in this order, so their fp32 sums agree bit for bit."""
    if weight.is_contiguous():
        return weight.view(weight.shape[0], -1)
    if weight.dim() == 4 and weight.permute(0, 2, 3, 1).is_contiguous():
        return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)
    return None


def _row_mask(weight, threshold, mask_backend: str, collapse_density: float | None, with_perm: bool = True) -> RowMask:
    if mask_backend == "triton":  # (a launch records no graph: no detach needed)
        w2d = weight_rows(weight)
        if w2d is None:
            w2d = weight.reshape(weight.shape[0], -1)
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
    cache: HostMaskCache | None = None,
    defer_writes: bool = False,
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

    ``cache``: a layer's :class:`HostMaskCache`; on the host path the mask of its last forward
    is reused while that forward's inputs are unchanged (see there).

    ``defer_writes``: the caller's forward runs on the Triton kernels, whose launch can make the
    guard's writes for a ``precomputed`` mask (``RowMask.guard``) instead of a launch of their
    own here.
    """
    density = options.collapse_density
    on_host = mask_backend != "triton" and not with_perm and weight.device.type == "cpu"
    if on_host:
        if cache is not None:
            found = cache.get(weight, threshold, mask_backend, options, previous_density)
            if found is not None:
                return found
        return _host_row_mask(weight, threshold, mask_backend == "compact", density, options.collapse_timing,
                              counter, previous_density, check_finite,
                              None if precomputed is None else precomputed[1].score,
                              None if cache is None else (cache, mask_backend, options))
    # (with a guard, the kept mask must carry its decision: the fused step makes it for either timing)
    reuse = (precomputed is not None and precomputed[0] == mask_backend
             and (not with_perm or precomputed[1].perm is not None)
             and (density is None or precomputed[1].collapsed is not None))
    if check_finite:  # a pass over the weight of its own: only where the check was asked for
        check_finite_values(threshold, precomputed[1].score if reuse else reference.row_scores(weight))
    if reuse:
        row_mask = precomputed[1]
        if density is not None:
            masks = _kernels().threshold_mask if mask_backend == "triton" else None
            if masks is not None and masks.writes_guard(threshold, previous_density, counter):
                if defer_writes:  # (in the forward's launch: no launch of their own)
                    return row_mask._replace(guard=masks.pending_guard_writes(
                        threshold.detach(), row_mask.collapsed, row_mask.count, previous_density, counter))
                # (the reset, the count and the stored density in one launch)
                masks.guard_writes(threshold.detach(), row_mask.collapsed, row_mask.count, previous_density, counter)
            else:
                _reset(threshold, row_mask.collapsed, counter)
                _store_density(previous_density, row_mask)
        return row_mask
    if density is None:
        return _row_mask(weight, threshold, mask_backend, None, with_perm)
    previous = options.collapse_timing == "previous"
    if mask_backend == "triton":
        masks = _kernels().threshold_mask
        if masks.writes_guard(threshold, previous_density, counter):
            # (the reset, the count and the stored density in the launch itself: no host operations)
            w2d = weight_rows(weight)
            return masks.guarded_row_mask(w2d if w2d is not None else weight.reshape(weight.shape[0], -1),
                                          threshold.detach(), density, previous, previous_density, counter)
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
        # (n as a cached CPU scalar tensor: the same quotient as the Python number, see compact._divisor)
        torch.div(row_mask.count, _divisor(n, torch.float32), out=previous_density.view(1))
    else:
        previous_density.copy_(row_mask.count.reshape(()) / n)  # (fp32, as the host)


def _host_row_mask(weight, threshold, want_units: bool, density, timing, counter, previous_density, check_finite,
                   score=None, keep=None):
    """:func:`_guarded_row_mask` for CPU tensors on the plain-PyTorch backends, deciding on the
    host (a synchronisation is free there) with as few operations as a small layer allows: the
    comparisons are the device path's, in its dtypes (``s > tau`` as ``s - tau > 0``, the same
    for IEEE floats, whose difference is 0 only when they are equal; one finite sum of it tells
    that both are finite). ``RowMask.perm``, ``count``, ``score`` and ``collapsed`` stay None
    (nothing downstream reads them); ``units`` holds the active rows for the compacting backend
    (``want_units``). ``score``: the row scores of ``weight`` when already known (a fused
    optimizer step computed them). ``keep``: ``(HostMaskCache, mask backend, options)`` that
    receives the result when the guard did not fire."""
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
    fired = False
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
    row_mask = RowMask(mask, None, None, None, None, units if want_units else None)
    if keep is not None and not fired:
        # (after the guard's writes: the versions kept are those the next forward will see)
        keep[0].put(weight, threshold, keep[1], keep[2], previous_density, row_mask)
    return row_mask


class HostMaskCache:
    """The row mask of a layer's last forward on the host path (CPU tensors, plain-PyTorch
    backends), for its next forward: a forward that finds the same weight and threshold tensors,
    unchanged, and the same options takes the mask as it is instead of scoring the weight, testing
    finiteness and running the guard again (on a small layer those operations cost more than its
    product). Only a forward whose guard did not fire is kept, so a hit changes nothing a forward
    would have changed: its guard would not fire (``"current"``: the same density;
    ``"previous"``: tested again, from ``previous_density``), and the density it would store is
    the one stored already.

    "Unchanged" is what PyTorch can tell: the same tensor objects with the same storage, data
    pointer, shape, strides, dtype and version counter (and the same version of
    ``previous_density``). In-place writes bump the version counter (an optimizer step,
    ``copy_``, ``load_state_dict``, ``torch.nn.init``, writes through ``.detach()`` or under
    ``no_grad``), and ``param.data = t`` changes the storage (the cache holds the storage it saw,
    so no later tensor can take its address). Writes that bypass the version counter are not
    seen: in-place operations on ``param.data`` (``param.data.copy_(t)``, ``param.data.mul_(2)``),
    on a NumPy array sharing the memory, or through DLPack; after such a write call the layer's
    :meth:`forget_next_mask`, or write in place under ``torch.no_grad()`` instead.
    """

    __slots__ = ("_entry",)

    def __init__(self) -> None:
        self._entry = None

    def clear(self) -> None:
        self._entry = None

    def put(self, weight, threshold, mask_backend: str, options: ThresholdOptions, previous_density,
            row_mask: RowMask) -> None:
        try:
            stamp = (_stamp(weight), _stamp(threshold), _version_of(options, previous_density))
            # (the aliases hold the storages: no later tensor can get their addresses)
            held = (weight.detach(), threshold.detach())
        except RuntimeError:  # inference tensors have no version counter: nothing is kept
            self._entry = None
            return
        self._entry = (weight, threshold, previous_density, mask_backend, options, stamp, held, row_mask)

    def get(self, weight, threshold, mask_backend: str, options: ThresholdOptions, previous_density):
        """The kept :class:`RowMask` if a forward with these arguments would compute it, else None."""
        entry = self._entry
        if (entry is None or entry[0] is not weight or entry[1] is not threshold or entry[2] is not previous_density
                or entry[3] != mask_backend or entry[4] is not options):
            return None
        if entry[5] != (_stamp(weight), _stamp(threshold), _version_of(options, previous_density)):
            return None
        if (options.collapse_density is not None and options.collapse_timing == "previous"
                and bool(previous_density <= options.collapse_density)):
            return None  # the guard fires now: the full path resets
        return entry[7]


def _stamp(t: torch.Tensor) -> tuple:
    return t._version, t.data_ptr(), t.shape, t.stride(), t.dtype


def _version_of(options: ThresholdOptions, previous_density) -> int | None:
    # (the host path writes previous_density only where a guard runs)
    if previous_density is None or options.collapse_density is None:
        return None
    return previous_density._version


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
