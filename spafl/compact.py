"""Compacting backend of the threshold layers (``backend="compact"``, what ``"auto"`` picks on CPU).

Plain PyTorch that really skips pruned units, with results equal to :mod:`spafl.reference` up to
the rounding of the compute dtype (fp32 for fp32 / fp16 / bf16 inputs, fp64 for fp64):

* forward: the active units' index list (``nonzero``), the dense op (``F.linear`` /
  ``F.conv2d``) on the gathered rows of the weight, its result scattered into the output;
  pruned units output 0 (plus their bias). With every unit active and nothing to drop, the
  dense op runs on the weight itself: no gather, no scatter.
* backward: ``dX`` and ``G = dL/dW_hat`` through the active rows only, then the
  straight-through terms of ``spafl-algorithm.md`` section 1. A pruned unit ``i`` needs
  ``r_i = sum_b dY_bi Z_bi`` (``Z`` = the pre-activation it would have) in ``exact`` mode and
  the same sum over the reference's sampled batch rows / output pixels, scaled as the reference
  does, in ``sample`` mode. ``r_i`` is 0 whenever unit ``i``'s output gradient is 0 (a pruned
  unit without bias followed by ReLU: ReLU's gradient at 0 is 0), so ``Z`` is computed only for
  pruned units whose output gradient is not identically zero: a cheap reduction over ``dY``
  decides. ``skip`` mode gives pruned units nothing.
* input skipping (``skip_zero_inputs=True``): input features (Linear) / channels (Conv2d)
  that are exactly zero for the whole batch are dropped from every product; their weight
  gradient is the sign term alone (``G`` is 0 there) and their input gradient is returned as 0.
  When this leaves every gradient upstream unchanged is stated in :mod:`spafl.layers`.
* grouped convolutions: the groups that hold active filters are gathered and each is padded to
  the largest number of active filters in one group, so a grouped convolution costs
  ``groups_used * widest / filters`` of the dense one (exactly the active share for depthwise
  convolutions and for groups with equal numbers of active filters). Input skipping is not
  applied to grouped convolutions.

The index lists come from host synchronisations (``nonzero``, ``int``): free on the CPU, and the
reason the Triton kernels, not this module, are the CUDA path. This module holds what both
layer kinds share and the Linear forward and backward; :mod:`spafl.compact_conv` holds the
Conv2d ones. Every dense product goes through :func:`_linear`, :func:`_mm` (here),
:func:`spafl.compact_conv._conv2d` or :func:`spafl.compact_conv._conv2d_backward`, so that the
tests can see the shapes that were really multiplied.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._rowmask import sample_rows
from .reference import ROW_BLOCK, SMALL_TEMPORARY, _compute_dtype, row_blocks, scratch

# ----------------------------------------------------------------------------- dense products


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, w, b)


def _mm(a: torch.Tensor, b: torch.Tensor, into: torch.Tensor | None = None, out: torch.Tensor | None = None):
    """``a @ b`` (written into ``out`` if given), or ``into + a @ b`` written into ``into`` (the
    GEMM adds it as it stores)."""
    if into is not None:
        return into.addmm_(a, b)
    return torch.mm(a, b) if out is None else torch.mm(a, b, out=out)


# ----------------------------------------------------------------------------- index lists


def active_units(mask: torch.Tensor, units: torch.Tensor | None = None) -> torch.Tensor | None:
    """Ascending int64 indices of the active units of ``mask [N]``; None when all are active.
    ``units``: those indices where the caller has them already (``RowMask.units``); otherwise a
    ``nonzero``, which synchronises with the device."""
    if units is None:
        units = mask.nonzero().squeeze(1)
    return None if units.shape[0] == mask.shape[0] else units


def _nonzero_slices(t: torch.Tensor, dim: int) -> torch.Tensor:
    """bool ``[t.shape[dim]]``: whether slice ``j`` along ``dim`` holds a value that is not 0
    (NaN counts as not 0: it propagates through amax / amin). Two reductions without a temporary:
    several times faster on the CPU than ``t.ne(0).any(dims)``."""
    other = tuple(d for d in range(t.dim()) if d != dim)
    if not other:
        return t.ne(0)
    if t.numel() == 0:
        return torch.zeros(t.shape[dim], dtype=torch.bool, device=t.device)
    return t.amax(dim=other).ne(0) | t.amin(dim=other).ne(0)


def _nonzero_along(t: torch.Tensor, dim: int) -> torch.Tensor | None:
    """Indices ``j`` along ``dim`` where some entry of ``t`` is not 0; None when that is every ``j``."""
    if t.numel() == 0:
        return t.new_zeros(0, dtype=torch.long)
    index = _nonzero_slices(t, dim).nonzero().squeeze(1)
    return None if index.numel() == t.shape[dim] else index


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    # A no-op .to() still costs a dispatcher round trip: measurable on small layers.
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _take(t: torch.Tensor, rows: torch.Tensor | None, cols: torch.Tensor | None) -> torch.Tensor:
    if rows is not None:
        t = t.index_select(0, rows)
    if cols is not None:
        t = t.index_select(1, cols)
    return t


def _one_block(n_rows: int, row_len: int, device: torch.device) -> bool:
    """Whether a row-wise pass over ``[n_rows, row_len]`` takes a single row block (or is not on
    the CPU): then it runs without the block loop, whose Python costs more than the pass on
    the small weights of the paper's models."""
    return device.type != "cpu" or n_rows * row_len <= ROW_BLOCK


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sum_j a_ij b_ij`` of two ``[n, ...]`` tensors of one layout: ``[n]`` (row blocks: see
    ``row_blocks``)."""
    n = a.shape[0]
    k = a.numel() // n if n else 0
    if a.device.type != "cpu" or n * k <= SMALL_TEMPORARY:
        return (a * b).sum(dim=tuple(range(1, a.dim())))
    a2, b2 = a.flatten(1), b.flatten(1)
    if _one_block(n, k, a.device):
        return torch.mul(a2, b2, out=scratch(n, k, a2.dtype)).sum(dim=1)
    out = a2.new_empty(n)
    for rows in row_blocks(n, k, a.device):
        a_rows = a2[rows]
        buf = torch.mul(a_rows, b2[rows], out=scratch(a_rows.shape[0], a_rows.shape[1], a_rows.dtype))
        torch.sum(buf, dim=1, out=out[rows])
    return out


def _straight_through_(g: torch.Tensor, w: torch.Tensor, fan_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dW, r)`` for rows that are all active: ``r_i = sum_j G_ij W_ij`` and
    ``dW = G + sign(W) * r / fan_in`` written into ``G`` (made contiguous first), in one pass of
    row blocks so that ``G`` and ``W`` are read once."""
    g = g.contiguous()
    g2, w2 = g.flatten(1), w.flatten(1)
    n, k = g2.shape
    if g.device.type != "cpu":
        r = (g2 * w2).sum(dim=1)
        g2.addcmul_(torch.sign(w2), (r / fan_in)[:, None])
        return g, r
    blocks = [slice(0, n)] if _one_block(n, k, g.device) else row_blocks(n, k, g.device)
    r = g2.new_empty(n)
    for rows in blocks:
        g_rows, w_rows = g2[rows], w2[rows]
        buf = torch.mul(g_rows, w_rows, out=scratch(g_rows.shape[0], g_rows.shape[1], g_rows.dtype))
        r_rows = torch.sum(buf, dim=1, out=r[rows])
        g_rows.addcmul_(torch.sign(w_rows, out=buf), (r_rows / fan_in)[:, None])
    return g, r


def _divisor(value: int, dtype: torch.dtype) -> torch.Tensor:
    """``value`` as a 0-dim CPU tensor of ``dtype``, made once. Dividing by it is dividing by the
    Python number (to the kernels both are CPU scalars, converted to ``dtype``; CUDA tensors too
    take them as such), without wrapping the number in a new tensor at every call: measured
    3 us against 7.7 for ``torch.div`` of a ``[10]`` tensor on a loaded machine."""
    key = (value, dtype)
    found = _DIVISORS.get(key)
    if found is None:
        if len(_DIVISORS) > 1024:  # (a sweep over layer shapes should not grow it forever)
            _DIVISORS.clear()
        found = _DIVISORS[key] = torch.tensor(value, dtype=dtype)
    return found


_DIVISORS: dict[tuple, torch.Tensor] = {}


def _scatter_units(active, units, bias, shape, dim, memory_format=torch.contiguous_format) -> torch.Tensor:
    """The output of ``shape``: ``active + bias`` (the active units' pre-activations) at ``units``
    along ``dim``, ``bias`` (0 without bias) at the other units. A fill and an ``index_copy_`` /
    ``index_add_``: measured faster on the CPU than writing each element once with
    ``index_fill_``, which is slow off dimension 0."""
    out = torch.empty(shape, dtype=active.dtype, device=active.device, memory_format=memory_format)
    if bias is None:
        return out.zero_().index_copy_(dim, units, active)
    view = [1] * len(shape)
    view[dim] = -1
    return out.copy_(bias.view(view).expand(shape)).index_add_(dim, units, active)


def _zeros_except(values, index, shape, dim, memory_format=torch.contiguous_format) -> torch.Tensor:
    """A tensor of ``shape`` holding ``values`` at ``index`` along ``dim`` and 0 elsewhere."""
    return _scatter_units(values, index, None, shape, dim, memory_format)


class CompactGrad(NamedTuple):
    """A weight's gradient given by rows: ``values [R, ...]`` at the distinct rows ``rows [R]``
    (int64), every other row 0. What the compact backward hands a fused optimizer instead of a
    full ``dW`` (see :mod:`spafl.optim`)."""

    rows: torch.Tensor
    values: torch.Tensor
    shape: torch.Size

    def dense(self) -> torch.Tensor:
        """The full gradient (what the backward writes without the optimizer's opt-in)."""
        return _zeros_except(self.values, self.rows, self.shape, 0)


def _rows_gradient(dw_a, units, pruned, w, r_p, fan_in) -> CompactGrad:
    """The active rows' ``dW`` and the pruned rows' straight-through term, as rows."""
    if pruned is None:
        return CompactGrad(units, dw_a, w.shape)
    sign_p = _sign_term(w.index_select(0, pruned), r_p, fan_in)
    return CompactGrad(torch.cat((units, pruned)), torch.cat((dw_a, sign_p)), w.shape)


def _sign_term(w_rows: torch.Tensor, r: torch.Tensor, fan_in: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """``sign(W_ij) * r_i / fan_in`` for ``w_rows [n, ...]``, ``r [n]`` (into ``out`` or a new
    tensor); on the CPU in row blocks, each block scaled while still in cache: one pass over
    memory instead of two."""
    n = w_rows.shape[0]
    scale = torch.div(r, _divisor(fan_in, r.dtype)).view((n,) + (1,) * (w_rows.dim() - 1))
    row_len = w_rows.numel() // n if n else 0
    if out is None and w_rows.is_contiguous() and _one_block(n, row_len, w_rows.device):
        return torch.sign(w_rows).mul_(scale)  # (contiguous like its input: one allocation less to ask for)
    if out is None:
        out = torch.empty_like(w_rows, memory_format=torch.contiguous_format)
    if _one_block(n, row_len, out.device):
        return torch.sign(w_rows, out=out).mul_(scale)
    for rows in row_blocks(n, row_len, out.device):
        torch.sign(w_rows[rows], out=out[rows]).mul_(scale[rows])
    return out


# ----------------------------------------------------------------------------- Linear


class _LinearState(NamedTuple):
    """What :func:`linear_forward` hands to :func:`linear_backward`."""

    units: torch.Tensor | None  # active units (None: all)
    cols: torch.Tensor | None  # input features multiplied (None: all); with a compact input, those x holds
    x_in: torch.Tensor | None  # x with only those features (None: x itself)
    w_in: torch.Tensor | None  # the weight's rows `units` and columns `cols` (None: the weight itself)
    z: torch.Tensor | None  # the active units' pre-activations [M, A] when M < K (else None)
    compact_input: bool
    compact_output: bool
    # every unit active, every input kept, z kept, one row block, nothing cast: the backward is
    # _dense_small_backward on the forward's own tensors
    small: bool = False


# The compute dtypes (reference._compute_dtype): inputs of these dtypes are used as they come.
_COMPUTE_DTYPES = (torch.float32, torch.float64)


def linear_state(
    xc: torch.Tensor,
    w: torch.Tensor,
    mask: torch.Tensor,
    skip_zero_inputs: bool = False,
    *,
    x_index: torch.Tensor | None = None,
    compact_output: bool = False,
    units: torch.Tensor | None = None,
) -> _LinearState:
    """What :func:`linear_forward` decides before its product, for ``xc`` and ``w`` already in
    the compute dtype: the active units, the input features multiplied and the gathered
    operands (``z`` None). The compiled operators (:mod:`spafl._ops`) rebuild the backward's
    state with it: without ``z`` the backward takes ``r`` from ``G``, with equal results.
    ``units``: the active units where the caller has them (see :func:`active_units`)."""
    units, cols, x_in, w_in = _linear_operands(xc, w, mask, skip_zero_inputs, x_index, units)
    # The gathered operands go to the backward with the index lists: no second gather there.
    return _LinearState(units, cols, None if x_in is xc else x_in, None if w_in is w else w_in, None,
                        x_index is not None, compact_output)


def _linear_operands(xc, w, mask, skip_zero_inputs, x_index, units):
    """``(units, cols, x_in, w_in)`` of :func:`linear_state`: the operands gathered for the product."""
    units = active_units(mask, units)
    if x_index is not None:
        cols, x_in = x_index, xc
    else:
        cols = _nonzero_along(xc, 1) if skip_zero_inputs else None
        x_in = xc if cols is None else xc.index_select(1, cols)
    return units, cols, x_in, _take(w, units, cols)


def linear_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mask: torch.Tensor,
    skip_zero_inputs: bool = False,
    *,
    x_index: torch.Tensor | None = None,
    compact_output: bool = False,
    units: torch.Tensor | None = None,
) -> tuple[torch.Tensor, _LinearState]:
    """``x [M, K]``, ``weight [N, K]``, ``mask [N]`` -> ``(y [M, N] in x's dtype, state)``;
    ``state`` goes to :func:`linear_backward`: the active units and the kept input features
    (None meaning all), and the active units' pre-activations ``Z [M, A]`` when ``M < K``: the
    backward then takes ``r_i = sum_b dY_bi Z_bi`` from them, which reads ``M * A`` values
    instead of the ``A * K`` of ``sum_j G_ij W_ij``.

    Compact chains (:mod:`spafl.chain`): with ``x_index`` (int64, ascending), ``x [M, len(x_index)]``
    holds only those input features of the layer, the others being 0; with ``compact_output``
    (no bias), ``y [M, A]`` holds only the active units' outputs, in ascending unit order (all
    ``N`` when every unit is active), and the backward takes the gradient of that ``y``."""
    dtype = x.dtype
    if (units is not None and not skip_zero_inputs and x_index is None and not compact_output
            and units.shape[0] == mask.shape[0] and x.shape[0] < x.shape[1] and dtype in _COMPUTE_DTYPES
            and weight.dtype == dtype and (bias is None or bias.dtype == dtype)
            and (not weight.is_cpu or weight.numel() <= ROW_BLOCK)):
        # Every unit active (the caller's list holds them all), every input kept, z kept, one row
        # block, nothing cast: what the general path below does there (the product, the bias add,
        # the state of the dense small backward), without its branches and calls, which cost more
        # than the operations on a small layer.
        z = _linear(x, weight)
        return (z + bias if bias is not None else z.clone()), _LinearState(None, None, None, None, z, False, False,
                                                                           True)
    if compact_output and bias is not None:
        raise ValueError("compact_output needs a layer without bias: pruned units must output 0")
    compute = _compute_dtype(dtype)
    uncast = dtype == compute and weight.dtype == compute and (bias is None or bias.dtype == compute)
    if uncast:
        xc, w, b = x, weight, bias
    else:
        xc, w, b = _cast(x, compute), _cast(weight, compute), _cast(bias, compute)
    units, cols, x_in, w_in = _linear_operands(xc, w, mask, skip_zero_inputs, x_index, units)
    keep_z = x_in.shape[0] < x_in.shape[1]
    z = None
    if units is None and not keep_z:  # density 1: the dense op itself
        y = _linear(x_in, w_in, b)
    else:
        z = _linear(x_in, w_in)
        if units is not None and not compact_output:
            y = _scatter_units(z, units, b, (x.shape[0], w.shape[0]), 1)
        elif b is not None:
            y = z + b
        else:
            y = z.clone() if keep_z else z  # a kept z stays private to the backward
        if not keep_z:
            z = None
    small = uncast and z is not None and units is None and cols is None and _one_block(w.shape[0], w.shape[1], w.device)
    state = _LinearState(units, cols, None if x_in is xc else x_in, None if w_in is w else w_in, z,
                         x_index is not None, compact_output, small)
    return (y if y.dtype == dtype else y.to(dtype)), state


def linear_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    state: _LinearState,
    *,
    has_bias: bool,
    need_dx: bool = True,
    mode: str = "exact",
    sample_fraction: float = 0.125,
    rows_only: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | CompactGrad, torch.Tensor, torch.Tensor | None]:
    """``(dx [M, K] | None, dW [N, K], dtau [N], db [N] | None)`` in the compute dtype, equal to
    :func:`spafl.reference.threshold_linear_backward` (``dx`` is 0 at dropped input features).
    With a compact input ``dx`` is that of the compact ``x``; with a compact output
    ``grad_out`` is ``[M, A]`` and pruned units get no gradient (the chain's rule: theirs is 0).
    ``rows_only``: ``dW`` as a :class:`CompactGrad` when some unit is pruned (the rows that are
    not 0: the active ones and, outside skip mode, the pruned ones owed a straight-through term),
    so that no weight-sized tensor is filled and scattered into."""
    units, cols, z = state.units, state.cols, state.z
    compute = _compute_dtype(x.dtype)
    dy, xc, w = _cast(grad_out, compute), _cast(x, compute), _cast(weight, compute)
    n_out, fan_in = w.shape
    if units is None and cols is None and z is not None and _one_block(n_out, fan_in, w.device):
        return _dense_small_backward(dy, xc, w, z, has_bias, need_dx)
    # The weight-sized output is allocated first: it then takes the heap block that the previous
    # step's dW freed. Allocated later, behind this step's temporaries, it grew the heap into
    # fresh pages that glibc trimmed again after the step (measured ~45 page faults a step for
    # an 800 -> 500 Linear, a third of its time on a loaded machine).
    rows_only = rows_only and units is not None and not state.compact_output
    dw = None if rows_only else torch.empty(w.shape, dtype=compute, device=w.device)
    db = dy.sum(dim=0) if has_bias else None
    x_in = xc if state.x_in is None else state.x_in
    w_in = w if state.w_in is None else state.w_in
    dy_a = dy if units is None or state.compact_output else dy.index_select(1, units)
    w_a = w_in if cols is None else _take(w, units, None)  # whole rows: the sign term covers every input
    dx = None
    if need_dx:
        dx_in = _mm(dy_a, w_in)
        dx = dx_in if cols is None or state.compact_input else _zeros_except(dx_in, cols, xc.shape, 1)
    dw_a = dw if units is None else None  # where the active rows' dW goes
    if z is not None:
        r_a = (dy_a * z).sum(dim=0)
        dw_a = _sign_term(w_a, r_a, fan_in, out=dw_a)
        if cols is None:
            _mm(dy_a.t(), x_in, into=dw_a)  # dW = sign term + G, G never stored on its own
        else:
            dw_a.index_add_(1, cols, _mm(dy_a.t(), x_in))  # G is 0 at dropped features
    elif units is None and cols is None:
        _, r_a = _straight_through_(_mm(dy_a.t(), x_in, out=dw), w, fan_in)
    else:
        g = _mm(dy_a.t(), x_in)
        r_a = _row_dot(g, w_in)  # exact with dropped features: G is 0 there
        dw_a = _sign_term(w_a, r_a, fan_in, out=dw_a)
        if cols is None:
            dw_a.add_(g)
        else:
            dw_a.index_add_(1, cols, g)
    if units is None:
        return dx, dw, r_a.neg_(), db
    dtau = _zeros_except(r_a.neg_(), units, (n_out,), 0)
    if rows_only:
        pruned, r_p = _pruned_r_linear(dy, x_in, w, mask, cols, mode, sample_fraction)
        if pruned is not None:
            dtau.index_copy_(0, pruned, -r_p)
        return dx, _rows_gradient(dw_a, units, pruned, w, r_p, fan_in), dtau, db
    dw.zero_().index_copy_(0, units, dw_a)
    if state.compact_output:
        return dx, dw, dtau, db
    pruned, r_p = _pruned_r_linear(dy, x_in, w, mask, cols, mode, sample_fraction)
    if pruned is not None:
        dtau.index_copy_(0, pruned, -r_p)
        dw.index_copy_(0, pruned, _sign_term(w.index_select(0, pruned), r_p, fan_in))
    return dx, dw, dtau, db


def _dense_small_backward(dy, x, w, z, has_bias: bool, need_dx: bool):
    """:func:`linear_backward` where every unit is active, every input kept, ``z`` kept and the
    weight one row block: the general path's operations in its order (the same results, bit
    for bit), without its branches and lookups, which cost as much as the operations on the
    small layers that take it (``ThresholdLinear(64, 10)`` at batch 8: ten operations)."""
    dw = torch.sign(w)  # (allocated first, as the general path's dW; sign(W) * r / fan_in then + G)
    db = dy.sum(dim=0) if has_bias else None
    dx = _mm(dy, w) if need_dx else None
    r = (dy * z).sum(dim=0)
    dw.mul_(torch.div(r, _divisor(w.shape[1], r.dtype)).view(-1, 1))
    _mm(dy.t(), x, into=dw)
    return dx, dw, r.neg_(), db


def _live_pruned(dy: torch.Tensor, mask: torch.Tensor):
    """``(pruned units whose output gradient in dy [rows, N, ...] is not all 0, those columns
    of dy)`` or ``(None, None)``: ``r_i`` of every other pruned unit is exactly 0. The test reads
    all of ``dy`` once: cheaper than gathering the pruned units' columns first (a copy of most
    of ``dy`` at low density)."""
    pruned = (_nonzero_slices(dy, 1) & ~mask).nonzero().squeeze(1)
    if not pruned.numel():
        return None, None
    return pruned, _select_channels(dy, pruned)


def _pruned_r_linear(dy, x_in, w, mask, cols, mode: str, sample_fraction: float):
    """``(pruned units with a nonzero r, their r)`` for the backward ``mode``, or ``(None, None)``."""
    if mode == "skip":
        return None, None
    scale = 1.0
    if mode == "sample":
        m_rows = dy.shape[0]
        count, step = sample_rows(m_rows, sample_fraction)
        dy, x_in = dy[: count * step : step], x_in[: count * step : step]  # rows 0, step, ...
        scale = m_rows / count
    pruned, dy_p = _live_pruned(dy, mask)
    if pruned is None:
        return None, None
    z = _linear(x_in, _take(w, pruned, cols))  # what the pruned units would output
    r = (dy_p * z).sum(dim=0)
    return pruned, r.mul_(scale) if scale != 1.0 else r


# ----------------------------------------------------------------------------- channel layouts (shared with Conv2d)


def _channels_last(t: torch.Tensor) -> bool:
    """Whether ``t``'s strides are channels-last by PyTorch's rule (``Tensor.suggest_memory_format``,
    which picks a convolution's layout): sizes-1 dimensions are not skipped, so a one-channel
    tensor with strides ``(H * W, 1, W, 1)`` is channels-last and one with ``(H * W, H * W, W, 1)``
    is not, although both are contiguous in both formats."""
    if t.dim() != 4:
        return False
    if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return True  # the common case, decided in C++
    if t.stride(1) == 0:
        return False
    least = 0
    for d in (1, 3, 2, 0):
        size, stride = t.shape[d], t.stride(d)
        if size == 0 or stride < least or (d == 0 and least == t.stride(1)):
            return False
        least = stride * size if size > 1 else stride
    return True


def _select_channels(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``t.index_select(1, index)`` for ``t [B, C, ...]``, in ``t``'s layout. A channels-last
    tensor is gathered through its ``[B * H * W, C]`` view: ``index_select`` along dim 1 of a
    channels-last tensor first copies the whole tensor to NCHW (measured 7x slower for
    ``[64, 50, 8, 8]``, 5 channels kept) and returns NCHW, which the next convolution then
    reorders back."""
    if t.dim() != 4 or t.is_contiguous() or not t.is_contiguous(memory_format=torch.channels_last):
        return t.index_select(1, index)  # (a tensor contiguous in both layouts gathers as fast either way)
    batch, chans, height, width = t.shape
    picked = t.permute(0, 2, 3, 1).reshape(-1, chans).index_select(1, index)
    return picked.view(batch, height, width, index.numel()).permute(0, 3, 1, 2)


