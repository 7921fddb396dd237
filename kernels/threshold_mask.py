"""Fused row-score / threshold / compaction kernel.

For a weight viewed as ``[N, K]`` (Linear ``[out, in]``, Conv2d ``[out, in/groups*kh*kw]``) and
thresholds ``tau [N]``, one launch produces, entirely on the device:

* ``score[i] = mean_j |W[i, j]|`` (fp32 accumulation) and ``mask[i] = score[i] > tau[i]``;
* ``perm [N]`` (int32): the active rows in ascending order, followed by the pruned rows in
  ascending order, and ``count [1]`` (int32), the number of active rows.

``perm[:count]`` is the sorted compact list the GEMM kernels gather through; keeping the pruned
rows after it lets one upper-bound grid cover every output column without knowing ``count``
on the host. No atomics decide the order, so the result is identical from run to run.

The programs of the launch each score a block of rows (the only pass over ``W``). The last
program to finish (a ticket counter, incremented once per program) then builds ``perm`` and
``count`` from all the masks, and runs the collapse guard, the first place where the whole
layer's density is known. That program also resets the ticket to 0, so the counter (one per
device and stream, kept between calls) is ready for the next launch without a memset.
"""

from __future__ import annotations

import threading
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .._rowmask import RowMask
from ._config import cached_plan, cdiv, gpu_tiles, launch_settings, next_power_of_2


@triton.jit
def _compact_rows(
    score_ptr, mask_ptr, perm_ptr, count_ptr, collapsed_ptr, N, collapse_density,
    HAS_GUARD: tl.constexpr, BLOCK: tl.constexpr, previous_ptr=None, GUARD_PREVIOUS: tl.constexpr = False,
    tau_ptr=None, resets_ptr=None, GUARD_WRITES: tl.constexpr = False,
):
    # One program: a deterministic prefix sum over the mask without inter-program sync. The
    # loads bypass L1 (".cg"): the masks were written by other programs of the same launch.
    total = tl.sum(tl.zeros([BLOCK], dtype=tl.int32), axis=0)
    for n0 in range(0, N, BLOCK):
        offs = n0 + tl.arange(0, BLOCK)
        m = tl.load(mask_ptr + offs, mask=offs < N, other=0, cache_modifier=".cg")
        total += tl.sum(m.to(tl.int32), axis=0)

    collapsed = total < 0  # False, as a tensor (for the loop below when HAS_GUARD is off)
    if HAS_GUARD:
        # Collapse guard: the caller resets tau to 0 when this fires; the mask it implies,
        # score > 0, is rebuilt here from the stored scores instead of re-reading W.
        if GUARD_PREVIOUS:
            # collapse_timing="previous": the density stored by the last guarded forward
            collapsed = tl.load(previous_ptr).to(tl.float32) <= collapse_density
        else:
            collapsed = total.to(tl.float32) <= collapse_density * N
        tl.store(collapsed_ptr, collapsed.to(tl.int8))
        if collapsed:
            total = tl.sum(tl.zeros([BLOCK], dtype=tl.int32), axis=0)
            for n0 in range(0, N, BLOCK):
                offs = n0 + tl.arange(0, BLOCK)
                s = tl.load(score_ptr + offs, mask=offs < N, other=0.0, cache_modifier=".cg")
                m = (s > 0.0).to(tl.int8)
                tl.store(mask_ptr + offs, m, mask=offs < N)
                total += tl.sum(m.to(tl.int32), axis=0)

    active_before = tl.sum(tl.zeros([BLOCK], dtype=tl.int32), axis=0)
    for n0 in range(0, N, BLOCK):
        offs = n0 + tl.arange(0, BLOCK)
        valid = offs < N
        m = tl.load(mask_ptr + offs, mask=valid, other=0, cache_modifier=".cg").to(tl.int32)
        if HAS_GUARD:
            s = tl.load(score_ptr + offs, mask=valid, other=0.0, cache_modifier=".cg")
            # Recomputed rather than read back: the reset mask was just stored by other
            # threads of this program (that read-after-write would need a barrier).
            m = tl.where(collapsed, (s > 0.0).to(tl.int32), m)
        active_incl = tl.cumsum(m, axis=0)
        # Rows before `offs` in the whole layer that are pruned: n0 - active_before, plus
        # those earlier in this block.
        pruned_incl = (offs + 1) - (active_before + active_incl)
        pos = tl.where(m == 1, active_before + active_incl - 1, total + pruned_incl - 1)
        tl.store(perm_ptr + pos, offs.to(tl.int32), mask=valid)
        active_before += tl.sum(m, axis=0)
    tl.store(count_ptr, total)
    if GUARD_WRITES:
        # The layer's side of the guard, which the host issued as three operations after the
        # launch: tau to 0 and the reset counter + 1 where it fired, and this mask's density
        # stored for collapse_timing="previous" (fp32 count / N, correctly rounded, as
        # torch.div computes it). Every thread has read tau and the stored density by now; the
        # barrier makes sure before they are overwritten.
        tl.debug_barrier()
        _guard_stores(collapsed, total, N, tau_ptr, resets_ptr, previous_ptr, BLOCK)


@triton.jit
def _guard_stores(collapsed, total, N, tau_ptr, resets_ptr, previous_ptr, BLOCK: tl.constexpr):
    # The guard's writes, given its decision and the mask's active-row count: tau to 0 and the
    # reset counter + 1 where it fired; the density count / N stored either way (fp32,
    # correctly rounded, as torch.div computes it).
    if collapsed:
        for n0 in range(0, N, BLOCK):
            offs = n0 + tl.arange(0, BLOCK)
            tl.store(tau_ptr + offs, tl.zeros([BLOCK], dtype=tl.float32), mask=offs < N)
        tl.store(resets_ptr, tl.load(resets_ptr) + 1)
    tl.store(previous_ptr, tl.div_rn(total.to(tl.float32), (total * 0 + N).to(tl.float32)))


@triton.jit(noinline=True)
def _guard_stores_apart(flag_ptr, total, N, tau_ptr, resets_ptr, previous_ptr, BLOCK: tl.constexpr):
    # The guard's writes from the convolution forward's program 0 (GUARD_WRITES), as a call of
    # its own: inlined at the end of the kernel, the fp32 IEEE variant spilled (offline sm_90
    # compile, Triton 3.9). The Linear forward inlines _guard_stores (no spills either way).
    _guard_stores(tl.load(flag_ptr) != 0, total, N, tau_ptr, resets_ptr, previous_ptr, BLOCK)


@triton.jit
def _guard_writes_kernel(collapsed_ptr, count_ptr, tau_ptr, resets_ptr, previous_ptr, N, BLOCK: tl.constexpr):
    # One program: the guard's writes for a mask built earlier (a fused optimizer step's), whose
    # decision (``collapsed``) and active-row count it reads.
    collapsed = tl.load(collapsed_ptr) != 0
    _guard_stores(collapsed, tl.load(count_ptr), N, tau_ptr, resets_ptr, previous_ptr, BLOCK)


@triton.jit
def _row_mask_kernel(
    w_ptr,  # [N, K] weight rows, any strides
    tau_ptr,  # [N] thresholds, any float dtype
    score_ptr,  # [N] fp32 out: mean |w| of each row
    mask_ptr,  # [N] int8 out (a bool tensor viewed as int8): score > tau
    perm_ptr,  # [N] int32 out: active rows ascending, then pruned rows ascending
    count_ptr,  # [1] int32 out: number of active rows
    collapsed_ptr,  # [1] int8 out: 1 when the collapse guard fired (only with HAS_GUARD)
    ticket_ptr,  # [1] int32: 0 on entry, reset to 0 by the last program
    previous_ptr,  # [1] fp32: the stored density (read with GUARD_PREVIOUS, written with GUARD_WRITES)
    resets_ptr,  # [1] int64: the guard's reset counter (GUARD_WRITES)
    N,
    K,
    stride_wn,
    stride_wk,
    collapse_density,  # guard fires when active rows <= collapse_density * N
    HAS_GUARD: tl.constexpr,
    WIDE: tl.constexpr,  # int64 offsets into W
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    COMPACT_BLOCK: tl.constexpr,
    GUARD_PREVIOUS: tl.constexpr = False,  # collapse_timing="previous": the guard tests previous_ptr
    GUARD_WRITES: tl.constexpr = False,  # the last program resets tau, counts, stores the density
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    offs_k = tl.arange(0, BLOCK_K)
    if WIDE:
        w_ptrs = w_ptr + rows.to(tl.int64)[:, None] * stride_wn + offs_k.to(tl.int64)[None, :] * stride_wk
    else:
        w_ptrs = w_ptr + rows[:, None] * stride_wn + offs_k[None, :] * stride_wk
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if WIDE:
            k_off = tl.cast(k0, tl.int64) * stride_wk  # (a Python int in the interpreter)
        else:
            k_off = k0 * stride_wk
        w = tl.load(w_ptrs + k_off, mask=row_ok[:, None] & (offs_k[None, :] < K - k0), other=0.0)
        acc += tl.abs(w.to(tl.float32))
    _score_and_compact(acc, K, rows, row_ok, tau_ptr, score_ptr, mask_ptr, perm_ptr, count_ptr, collapsed_ptr,
                       ticket_ptr, N, collapse_density, HAS_GUARD, COMPACT_BLOCK, previous_ptr, GUARD_PREVIOUS,
                       resets_ptr, GUARD_WRITES)


@triton.jit
def _score_and_compact(
    acc, K, rows, row_ok, tau_ptr, score_ptr, mask_ptr, perm_ptr, count_ptr, collapsed_ptr, ticket_ptr, N,
    collapse_density, HAS_GUARD: tl.constexpr, COMPACT_BLOCK: tl.constexpr, previous_ptr=None,
    GUARD_PREVIOUS: tl.constexpr = False, resets_ptr=None, GUARD_WRITES: tl.constexpr = False,
):
    """A program's rows scored (``acc``: their |w| summed over column tiles) and masked, then the
    last program to finish compacts every row: the end of the row-mask kernel and of the fused
    optimizer step alike."""
    score = tl.sum(acc, axis=1) / K
    tau = tl.load(tau_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(score_ptr + rows, score, mask=row_ok)
    # Strict comparison, as the spec's `s - tau > 0`.
    tl.store(mask_ptr + rows, (score > tau).to(tl.int8), mask=row_ok)

    # Every thread's stores above happen before this program's ticket (release); the program
    # that draws the last ticket sees all of them (acquire) and compacts.
    tl.debug_barrier()
    ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel")
    if ticket == tl.num_programs(0) - 1:
        _compact_rows(score_ptr, mask_ptr, perm_ptr, count_ptr, collapsed_ptr, N, collapse_density, HAS_GUARD,
                      COMPACT_BLOCK, previous_ptr, GUARD_PREVIOUS, tau_ptr, resets_ptr, GUARD_WRITES)
        tl.atomic_xchg(ticket_ptr, 0, sem="relaxed")


_SCORE_BLOCK_N = 32
_SCORE_BLOCK_K = 128
_COMPACT_BLOCK = 1024
_INT32_MAX = 2**31 - 1
_tickets: dict[tuple, torch.Tensor] = {}


def ticket_counter(device: torch.device) -> torch.Tensor:
    """The zeroed int32 counter of the fused launches on ``device``'s current stream (one per
    stream, so that launches on different streams never share one)."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device.type, device.index, stream)
    counter = _tickets.get(key)
    if counter is None:
        counter = _tickets[key] = torch.zeros(1, device=device, dtype=torch.int32)
    return counter


def fits_int32(*tensors: torch.Tensor, margin: int = 1024) -> bool:
    """Whether every element offset a kernel can form for these tensors (a tile of up to
    ``margin`` rows or columns past an edge included) fits in int32."""
    for t in tensors:
        if sum((size + margin) * abs(stride) for size, stride in zip(t.shape, t.stride(), strict=True)) > _INT32_MAX:
            return False
    return True


def threshold_row_mask(
    weight2d: torch.Tensor,
    threshold: torch.Tensor,
    *,
    collapse_density: float | None = None,
) -> RowMask:
    """Compute the row mask of ``weight2d [N, K]`` against ``threshold [N]`` on the device.

    With ``collapse_density`` set, a layer whose density is ``<= collapse_density`` gets the mask
    of ``tau = 0`` instead, and ``RowMask.collapsed`` says so; the caller owns the thresholds and
    resets them (this launch never writes its inputs; :func:`guarded_row_mask` does). One launch,
    no host synchronisation.
    """
    threshold = _check_row_mask_inputs(weight2d, threshold)
    device, n_rows = weight2d.device, weight2d.shape[0]
    score = torch.empty(n_rows, device=device, dtype=torch.float32)
    has_guard = collapse_density is not None
    collapsed = torch.empty(1, device=device, dtype=torch.int8) if has_guard else None
    return _launch(weight2d, threshold, score, collapsed, collapse_density, None, None, False, False)


def guarded_row_mask(
    weight2d: torch.Tensor,
    threshold: torch.Tensor,
    collapse_density: float,
    previous: bool,
    previous_density: torch.Tensor | None,
    counter: torch.Tensor | None,
) -> RowMask:
    """A layer's row mask with its collapse guard applied in the same launch: where the guard
    fires (``previous``: on ``previous_density``, the density stored by the last guarded
    forward, as ``collapse_timing="previous"``; else on this mask's density), ``threshold`` is
    reset to 0 and ``counter`` incremented, and the mask is that of ``tau = 0``; either way
    ``previous_density`` then holds this mask's density. What the host would otherwise issue as
    separate operations after :func:`threshold_row_mask`, with the same results (the version
    counters of the three tensors are bumped, as an in-place operation would).

    ``threshold`` must have unit stride (it is written where it is), ``previous_density`` be None
    (``previous`` off) or an fp32 one-element tensor and ``counter`` None or an int64 one-element
    tensor, all on the weight's device (:func:`writes_guard` tells). The returned mask has no ``score`` and no
    ``collapsed``: they are the launch's scratch."""
    threshold = _check_row_mask_inputs(weight2d, threshold)
    device, n_rows = weight2d.device, weight2d.shape[0]
    score = scratch("row_mask.score", (n_rows,), torch.float32, device)
    collapsed = scratch("row_mask.collapsed", (1,), torch.int8, device)
    previous_density, counter, written = _guard_targets(threshold, previous_density, counter, device)
    row_mask = _launch(weight2d, threshold, score, collapsed, collapse_density, previous_density, counter, previous,
                       True)
    # (the launch wrote them: autograd's in-place checks must see it, as they saw the host's writes)
    torch._C._increment_version(written)
    return RowMask(row_mask.mask, row_mask.perm, row_mask.count, None, None)


def guard_writes(threshold: torch.Tensor, collapsed: torch.Tensor, count: torch.Tensor,
                 previous_density: torch.Tensor | None, counter: torch.Tensor | None) -> None:
    """The collapse guard's writes for a row mask built earlier with its decision (a fused
    optimizer step's, :func:`kernels.threshold_optim.fused_step`), in one launch: where
    ``collapsed`` (a one-element bool or int8 flag) is set, ``threshold`` to 0 and ``counter``
    + 1; ``previous_density`` (when given) then holds ``count / N`` (``count``: the mask's int32
    active-row count). The same results as the host's ``masked_fill_``, ``add_`` and ``div``,
    with the version counters of the written tensors bumped as they would be. The tensors must
    be what :func:`writes_guard` accepts."""
    flag, previous_density, counter, written = _guard_operands(threshold, collapsed, count, previous_density, counter)
    _guard_writes_kernel[(1,)](flag, count, threshold, counter, previous_density, threshold.shape[0],
                               BLOCK=_guard_block(threshold.shape[0]), num_warps=1)
    # (the launch wrote them: autograd's in-place checks must see it, as they saw the host's writes)
    torch._C._increment_version(written)


class GuardWrites(NamedTuple):
    """The collapse guard's writes for a row mask built earlier with its decision (a fused
    optimizer step's), left to the launch that reads the mask next: the forward GEMM's first
    program makes them (``GUARD_WRITES`` of the Linear and convolution forward kernels) instead
    of a launch of their own. :func:`pending_guard_writes` makes one; a launcher that cannot
    take it runs :func:`flush_guard_writes`."""

    flag: torch.Tensor  # [1] int8: the guard fired
    count: torch.Tensor  # [1] int32: the mask's active rows
    tau: torch.Tensor  # [N] thresholds, unit stride: 0 where it fired
    resets: torch.Tensor  # [1] int64: the reset counter, + 1 where it fired
    previous: torch.Tensor  # [1] fp32: count / N stored
    block: int  # the stores' block (GUARD_BLOCK)

    def kernel_args(self) -> tuple:
        """The forward kernels' four guard arguments (after their sizes and strides)."""
        return self.flag, self.tau, self.resets, self.previous


def pending_guard_writes(threshold: torch.Tensor, collapsed: torch.Tensor, count: torch.Tensor,
                         previous_density: torch.Tensor | None, counter: torch.Tensor | None) -> GuardWrites:
    """:func:`guard_writes`'s checks and targets, without its launch: the writes a later launch
    makes (:class:`GuardWrites`). The version counters of the caller's tensors it writes are
    bumped now, as :func:`guard_writes` bumps them after its launch (autograd's in-place checks
    see the write at the same point of the program; on the device it comes before any later
    launch that could read them)."""
    flag, previous_density, counter, written = _guard_operands(threshold, collapsed, count, previous_density, counter)
    torch._C._increment_version(written)
    n_rows = threshold.shape[0]
    return GuardWrites(flag, count, threshold, counter, previous_density, _guard_block(n_rows))


def flush_guard_writes(guard: GuardWrites) -> None:
    """Make ``guard``'s writes in a launch of their own (a launcher that cannot fold them into
    its kernel: a launch that may run more than once while it is tuned, or no launch at all)."""
    _guard_writes_kernel[(1,)](guard.flag, guard.count, guard.tau, guard.resets, guard.previous, guard.tau.shape[0],
                               BLOCK=guard.block, num_warps=1)


def _guard_block(n_rows: int) -> int:
    return min(_COMPACT_BLOCK, next_power_of_2(n_rows)) if gpu_tiles() else 64


def _guard_operands(threshold, collapsed, count, previous_density, counter):
    if threshold.dim() != 1 or not threshold.is_floating_point():
        raise ValueError(f"the guard writes one-dimensional floating-point thresholds, got {threshold.dtype} "
                         f"{tuple(threshold.shape)}")
    if not writes_guard(threshold, previous_density, counter):
        raise ValueError(_GUARD_TENSORS)
    device = threshold.device
    if collapsed.numel() != 1 or collapsed.device != device or collapsed.dtype not in (torch.bool, torch.int8):
        raise ValueError(f"collapsed must be one bool or int8 element on {device}, got {collapsed.dtype} "
                         f"{tuple(collapsed.shape)} on {collapsed.device}")
    if count.numel() != 1 or count.device != device or count.dtype != torch.int32:
        raise ValueError(f"count must be one int32 element on {device}, got {count.dtype} {tuple(count.shape)} "
                         f"on {count.device}")
    previous_density, counter, written = _guard_targets(threshold, previous_density, counter, device)
    flag = collapsed.view(torch.int8) if collapsed.dtype == torch.bool else collapsed
    return flag, previous_density, counter, written


_GUARD_TENSORS = ("the guard's writes need a unit-stride threshold, an fp32 one-element previous density and an "
                  "int64 one-element counter on the threshold's device")


def _guard_targets(threshold: torch.Tensor, previous_density: torch.Tensor | None, counter: torch.Tensor | None,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """The stored density and the reset counter a guard's launch writes (scratch for those the
    caller does not keep) and the caller's tensors among what it writes (their versions bumped
    after the launch)."""
    written = [threshold]
    if previous_density is None:
        previous_density = scratch("row_mask.density", (1,), torch.float32, device)
    else:
        written.append(previous_density)
    if counter is None:
        counter = scratch("row_mask.resets", (1,), torch.int64, device)
    else:
        written.append(counter)
    return previous_density, counter, written


def writes_guard(threshold: torch.Tensor, previous_density: torch.Tensor | None, counter: torch.Tensor | None) -> bool:
    """Whether :func:`guarded_row_mask` takes these tensors (else the caller writes the guard's
    results itself)."""
    device = threshold.device
    return (threshold.stride(0) == 1
            and (previous_density is None or (previous_density.dtype == torch.float32
                                              and previous_density.numel() == 1 and previous_density.device == device))
            and (counter is None or (counter.dtype == torch.int64 and counter.numel() == 1
                                     and counter.device == device)))


def _check_row_mask_inputs(weight2d: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    if weight2d.dim() != 2:
        raise ValueError(f"threshold_row_mask expects a 2-D weight view, got shape {tuple(weight2d.shape)}")
    n_rows, fan_in = weight2d.shape
    if threshold.shape != (n_rows,):
        raise ValueError(f"threshold must have shape ({n_rows},), got {tuple(threshold.shape)}")
    if threshold.device != weight2d.device:
        raise ValueError(f"threshold is on {threshold.device} but weight is on {weight2d.device}")
    if n_rows == 0 or fan_in == 0:
        raise ValueError(f"weight must have at least one row and one column, got {tuple(weight2d.shape)}")
    return threshold if threshold.stride(0) == 1 else threshold.contiguous()


def _planned_row_mask(weight2d, has_guard: bool, previous: bool, writes: bool) -> tuple[tuple, dict]:
    key = ("row_mask", weight2d.shape, weight2d.stride(), has_guard, previous, writes, launch_settings())
    return cached_plan(key, lambda: _row_mask_plan(weight2d, has_guard, previous, writes))


def _launch(weight2d, threshold, score, collapsed, collapse_density, previous_density, resets, previous: bool,
            writes: bool) -> RowMask:
    n_rows, fan_in = weight2d.shape
    device = weight2d.device
    mask = torch.empty(n_rows, device=device, dtype=torch.bool)
    perm = torch.empty(n_rows, device=device, dtype=torch.int32)
    count = torch.empty(1, device=device, dtype=torch.int32)
    has_guard = collapse_density is not None
    grid, kwargs = _planned_row_mask(weight2d, has_guard, previous, writes)
    _row_mask_kernel[grid](
        weight2d,
        threshold,
        score,
        mask.view(torch.int8),
        perm,
        count,
        collapsed if has_guard else count,
        ticket_counter(device),
        previous_density if previous_density is not None else score,
        resets if resets is not None else count,
        n_rows,
        fan_in,
        weight2d.stride(0),
        weight2d.stride(1),
        float(collapse_density) if has_guard else 0.0,
        **kwargs,
    )
    return RowMask(mask, perm, count, score, collapsed.view(torch.bool) if has_guard else None)


class PreparedRowMask:
    """The row mask of one weight against one threshold tensor, with the guard's settings, as
    :func:`guarded_row_mask` (``collapse_density`` set) or :func:`threshold_row_mask` (None)
    compute it, prepared once: the checks, the plan and every argument but the outputs. For a
    caller that repeats the call with the same tensors (objects and layouts), the same
    :func:`launch_settings`, on the same thread and stream; the caller checks that (the layers'
    kept Triton call, ``spafl.functional.linear_device_kept``). Each call returns fresh
    ``mask`` / ``perm`` / ``count`` and no ``score`` / ``collapsed`` (scratch here, also without
    the guard); the guard's writes and version bumps are :func:`guarded_row_mask`'s."""

    __slots__ = ("_run", "_head", "_tail", "_kwargs", "_n", "_device", "_written", "_guard")

    def __init__(self, weight2d, threshold, collapse_density: float | None, previous: bool = False,
                 previous_density: torch.Tensor | None = None, counter: torch.Tensor | None = None):
        _check_row_mask_inputs(weight2d, threshold)
        if threshold.stride(0) != 1:  # (the launcher copies such thresholds at every call)
            raise ValueError("a prepared row mask needs thresholds of unit stride")
        device, (n_rows, fan_in) = weight2d.device, weight2d.shape
        guard = collapse_density is not None
        if guard and not writes_guard(threshold, previous_density, counter):
            raise ValueError(_GUARD_TENSORS)
        score = held_scratch("row_mask.score", (n_rows,), torch.float32, device)
        if score.buffer is None:  # (over 256 K rows: scores of a call's own, as the launcher has them)
            raise ValueError("a prepared row mask keeps its scores: at most 256 K rows")
        score = score.buffer
        grid, self._kwargs = _planned_row_mask(weight2d, guard, previous and guard, guard)
        self._run = _row_mask_kernel[grid]
        self._head = (weight2d, threshold, score)
        self._written = [threshold]
        if guard:
            collapsed = scratch("row_mask.collapsed", (1,), torch.int8, device)
            previous_density, counter, self._written = _guard_targets(threshold, previous_density, counter, device)
            self._tail = (collapsed, ticket_counter(device), previous_density, counter, n_rows, fan_in,
                          weight2d.stride(0), weight2d.stride(1), float(collapse_density))
        else:
            self._tail = (ticket_counter(device), score, n_rows, fan_in, weight2d.stride(0), weight2d.stride(1), 0.0)
        self._n, self._device, self._guard = n_rows, device, guard

    def __call__(self) -> RowMask:
        n_rows, device = self._n, self._device
        mask = torch.empty(n_rows, device=device, dtype=torch.bool)
        perm = torch.empty(n_rows, device=device, dtype=torch.int32)
        count = torch.empty(1, device=device, dtype=torch.int32)
        if self._guard:
            self._run(*self._head, mask.view(torch.int8), perm, count, *self._tail, **self._kwargs)
            # (the launch wrote them: autograd's in-place checks must see it)
            torch._C._increment_version(self._written)
        else:
            # (without the guard the launch takes the count for its unused flag and resets: as _launch)
            tickets, score, *rest = self._tail
            self._run(*self._head, mask.view(torch.int8), perm, count, count, tickets, score, count, *rest,
                      **self._kwargs)
        return RowMask(mask, perm, count, None, None)


# Scratch buffers kept between launcher calls: (role, shape, dtype, device, thread, stream) ->
# tensor. Only buffers that no caller ever sees live here, up to _SCRATCH_BYTES each.
_scratch: dict[tuple, torch.Tensor] = {}
_SCRATCH_BYTES = 1 << 20
_SCRATCH_ENTRIES = 256


def stream_key(device: torch.device, cuda: bool | None = None) -> tuple[int, int] | int:
    """This thread and ``device``'s current stream (the thread alone off CUDA): what the scratch
    buffers and the tickets are kept per, and so what a prepared launch (which holds them) is
    valid for. ``cuda``: ``device.type == "cuda"`` where the caller knows it."""
    if cuda is None:
        cuda = device.type == "cuda"
    if not cuda:
        return threading.get_ident()
    return threading.get_ident(), torch.cuda.current_stream(device).cuda_stream


def scratch(role: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised buffer that the launches of one launcher call write and read and nothing
    keeps afterwards (a split workspace, a compacted gradient, a guard's scores): the same one
    for every call of this thread on this device and stream with the same ``role``, shape and
    dtype, instead of an allocation per call. Launches on one stream run in order, so the next
    call's writes come after this call's reads; a buffer is never shared between threads (which
    could interleave their launches on one stream) or streams. ``role`` names the buffer's use
    inside its launcher: two buffers of one call need different roles. Larger buffers than
    ``_SCRATCH_BYTES`` are allocated per call (a held buffer would cost memory for little)."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (role, shape, dtype, device, threading.get_ident(), stream)
    found = _scratch.get(key)
    if found is None:
        found = torch.empty(shape, device=device, dtype=dtype)
        if found.numel() * found.element_size() > _SCRATCH_BYTES:
            return found
        if len(_scratch) >= _SCRATCH_ENTRIES:  # (shapes that keep changing should not grow it forever)
            _scratch.clear()
        _scratch[key] = found
    return found


class Scratch(NamedTuple):
    """A scratch buffer as a prepared launch holds it: the kept buffer itself where
    :func:`scratch` keeps one, else (``buffer`` None) the shape to allocate at every call, as the
    launcher does -- a prepared launch outlives its call, and must not hold more."""

    buffer: torch.Tensor | None
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    def get(self) -> torch.Tensor:
        buffer = self.buffer
        return buffer if buffer is not None else torch.empty(self.shape, device=self.device, dtype=self.dtype)


def held_scratch(role: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Scratch:
    """:func:`scratch` for a prepared launch (see :class:`Scratch`)."""
    size = dtype.itemsize
    for n in shape:
        size *= n
    return Scratch(scratch(role, shape, dtype, device) if size <= _SCRATCH_BYTES else None, shape, dtype, device)


def _row_mask_plan(weight2d: torch.Tensor, has_guard: bool, previous: bool = False,
                   writes: bool = False) -> tuple[tuple, dict]:
    """The grid and the launch settings of :func:`threshold_row_mask` for this weight's layout."""
    n_rows, fan_in = weight2d.shape
    block_k = min(_SCORE_BLOCK_K, next_power_of_2(fan_in))
    compact_block = min(_COMPACT_BLOCK, next_power_of_2(n_rows)) if gpu_tiles() else 64
    return (cdiv(n_rows, _SCORE_BLOCK_N),), dict(
        HAS_GUARD=has_guard,
        WIDE=not fits_int32(weight2d),
        BLOCK_N=_SCORE_BLOCK_N,
        BLOCK_K=block_k,
        COMPACT_BLOCK=max(compact_block, 16),
        GUARD_PREVIOUS=previous,
        GUARD_WRITES=writes,
        num_warps=4,
    )
