"""The Linear kernels' launches counted from their grids and loop bounds, without the interpreter.

The companion of benchmarks/conv_count.py for ``spafl.kernels.threshold_linear`` and the row
mask (``spafl.kernels.threshold_mask``): the cost model (benchmarks/model.py) otherwise executes
every program of these launches in Triton's interpreter, about ten minutes per density for a
4096 x 4096 layer. Per launch, from the launch's own arguments (tensors, strides, the constexpr
tiles and the grid the launcher chose, the split table it uploaded), this module forms

* ``programs``, ``mac_programs``, ``macs`` and ``max_program_macs``: the ``tl.dot`` shapes every
  program issues, following the kernel's loops (the persistent launches' work units are dealt
  to the programs as the kernels' ``range(pid, units, num_programs)`` deals them);
* the unique 32-byte sectors read and written: the union over the grid of every unmasked lane's
  address, built in NumPy by buffer (a contiguous run of elements is sampled once per sector);

and then writes the launch's outputs with plain torch (fp32 arithmetic, rounded once to the
output's dtype), so that the launches after it see the values they depend on. The split
reductions' fp32 workspace is left as it is (only the launch reads it back).

Kernels counted: the forward (``_threshold_linear_fwd_kernel``), the pass over dY
(``_compact_grad_bias_kernel``), dX, the dW GEMM when ``r`` is known (``R_KNOWN``: the skip and
exact modes' training path), the two in one launch (``_threshold_linear_bwd_kernel``), the finish
pass and the row mask. :func:`count` returns None for
any other launch (the sample mode's dW, the compactions, the fused optimizer step), which the
recorder then runs in the interpreter. tests/test_cost_model.py compares every field of every
launch with the interpreter's count: a change in a kernel's loops or masks fails there.
"""

from __future__ import annotations

import numpy as np
import torch
from conv_count import SECTOR, _class_width, _unique_bytes, cdiv, count_with, guard_stores


def _addr(t: torch.Tensor, offsets) -> np.ndarray:
    """Sectors of the elements at ``offsets`` (elements, from the pointer the kernel receives)."""
    off = np.asarray(offsets, dtype=np.int64).ravel()
    return (t.data_ptr() + off * t.element_size()) // SECTOR


def _run(t: torch.Tensor, lo: int, hi: int, stride: int) -> np.ndarray:
    """Indices ``lo <= j < hi`` along a dimension of ``stride``, thinned when the run is
    contiguous: one element per sector's worth and the last, which touch the same sectors."""
    if hi <= lo:
        return np.zeros(0, dtype=np.int64)
    if stride != 1:
        return np.arange(lo, hi, dtype=np.int64)
    step = max(1, SECTOR // t.element_size())
    return np.unique(np.append(np.arange(lo, hi, step, dtype=np.int64), hi - 1))


def _tile(t: torch.Tensor, rows: np.ndarray, row_stride: int, lo: int, hi: int, col_stride: int,
          base: int = 0) -> np.ndarray:
    """Sectors of ``t[rows, lo:hi]`` through the given strides (``base`` elements further on)."""
    rows = np.asarray(rows, dtype=np.int64).ravel()
    cols = _run(t, lo, hi, col_stride)
    if not rows.size or not cols.size:
        return np.zeros(0, dtype=np.int64)
    return _addr(t, base + rows[:, None] * row_stride + cols[None, :] * col_stride)


def _cols(t: torch.Tensor, row_lo: int, row_hi: int, row_stride: int, cols: np.ndarray, col_stride: int) -> np.ndarray:
    """Sectors of ``t[row_lo:row_hi, cols]`` (rows a run, columns a gather)."""
    return _tile(t, np.asarray(cols), col_stride, row_lo, row_hi, row_stride)


def _view(t: torch.Tensor, size: tuple, strides: tuple) -> torch.Tensor:
    return t.as_strided(size, strides, t.storage_offset())


def _grouped_tile(tile: int, num_m: int, num_n: int, group_m: int) -> tuple[int, int]:
    """The kernels' ``_grouped_tile``: tiles visited in groups of ``group_m`` rows."""
    group_size = group_m * num_n
    first_m = (tile // group_size) * group_m
    rows_in_group = min(num_m - first_m, group_m)
    return first_m + (tile % group_size) % rows_in_group, (tile % group_size) // rows_in_group


def _split_count(a: dict, index: int, tiles: int, programs: int, blocks: int) -> tuple[int, int]:
    """``(n_split, chunk)`` of a persistent launch (``_split_count`` and the kernels' no-empty-split
    rule) for ``blocks`` reduction blocks."""
    n_split = max(min(int(a["split_ptr"][index]), programs // max(tiles, 1)), 1)
    chunk = max(cdiv(blocks, n_split), 1)
    return max(cdiv(blocks, chunk), 1), chunk


class _Work:
    """Per-program multiply-adds of one launch."""

    def __init__(self, programs: int):
        self.per = np.zeros(programs, dtype=np.int64)

    def add(self, program: int, macs: int) -> None:
        self.per[program] += macs

    @classmethod
    def dealt(cls, units: np.ndarray, programs: int) -> _Work:
        """Work units dealt to persistent programs as ``range(pid, units, programs)`` deals them."""
        work = cls(programs)
        np.add.at(work.per, np.arange(units.size) % programs, units)
        return work

    def fields(self) -> dict:
        busy = self.per[self.per > 0]
        return {"programs": int(self.per.size), "mac_programs": int(busy.size), "macs": int(busy.sum()),
                "max_program_macs": int(busy.max()) if busy.size else 0}


def _programs(grid: tuple) -> int:
    return grid[0] * grid[1] * grid[2]


def _split_traffic(a: dict, tiles: dict, n_split: int, bm: int, reads: list, writes: list) -> None:
    """The workspace and tickets of split tiles (``_split_fixup``): every split of a tile stores
    its ``[bm, width]`` partial into its slot and the last reads them all; one ticket per tile,
    taken and reset atomically (read and written)."""
    if n_split <= 1:
        return
    slot = a["BLOCK_M"] * (a["BLOCK_N"] if "BLOCK_N" in a else a["BLOCK_K"])
    for tile, width in tiles.items():
        base = (tile * n_split + np.arange(n_split, dtype=np.int64)) * slot
        ws = _addr(a["ws_ptr"], (base[:, None] + np.arange(bm * width, dtype=np.int64)[None, :]))
        reads.append(ws)
        writes.append(ws)
        ticket = _addr(a["lock_ptr"], [tile])
        reads.append(ticket)
        writes.append(ticket)


def _result(work: _Work, reads: list, writes: list) -> dict:
    return {**work.fields(), "read_bytes": _unique_bytes(reads), "write_bytes": _unique_bytes(writes)}


# ----------------------------------------------------------------------------- forward


def _fwd(a: dict, grid: tuple) -> dict:
    M, N, K = a["M"], a["N"], a["K"]
    bm, bn, bk = a["BLOCK_M"], a["BLOCK_N"], a["BLOCK_K"]
    tails = (a["TAIL1"], a["TAIL2"], a["TAIL3"])
    programs = _programs(grid)
    if grid[1] * grid[2] != 1:
        raise ValueError("unexpected forward grid")
    count = int(a["count_ptr"][0])
    hi = N if a["Z_ALL"] else count
    tiles_m, n_active = cdiv(M, bm), cdiv(hi, bn)
    tiles = tiles_m * n_active
    n_split, chunk = _split_count(a, n_active, tiles, programs, cdiv(K, bk))
    perm = a["perm_ptr"][:N].long()
    perm_np = perm.numpy().astype(np.int64)
    work = _Work(programs)
    reads = [_addr(a["count_ptr"], [0]), _addr(a["split_ptr"], [n_active])]
    writes = []
    widths: dict[int, int] = {}
    blocks: dict[int, int] = {}  # pid_p -> the tile class it computes
    for u in range(tiles * n_split):
        tile, split = divmod(u, n_split)
        _, pid_p = _grouped_tile(tile, tiles_m, n_active, a["GROUP_M"])
        width = _class_width(hi - pid_p * bn, bn, tails, False)
        k_lo = split * chunk * bk
        steps = len(range(k_lo, min(k_lo + chunk * bk, K), bk))
        work.add(u % programs, steps * bm * bk * width)
        widths[tile], blocks[pid_p] = width, width
    out_pos = []  # positions whose output column the tiles and the fill write
    if tiles:
        reads.append(_tile(a["x_ptr"], np.arange(M), a["stride_xm"], 0, K, a["stride_xk"]))
        w_rows = np.arange(hi) if a["COMPACT_W"] else perm_np[:hi]
        reads.append(_tile(a["w_ptr"], w_rows, a["stride_wn"], 0, K, a["stride_wk"]))
        for pid_p, width in blocks.items():
            out_pos.append(np.arange(pid_p * bn, min(pid_p * bn + width, N), dtype=np.int64))
        if a["STORE_Z"]:
            writes.append(_tile(a["z_ptr"], np.arange(M), a["stride_zm"], 0, hi, 1))
    _split_traffic(a, widths, n_split, bm, reads, writes)
    # The pruned outputs past the straddling block's tile class (none with Z_ALL).
    first = count // bn
    n_fill = 0 if a["Z_ALL"] else cdiv(N, bn) - first
    for j in range(n_fill if tiles_m else 0):
        p0 = (first + j) * bn
        rem = count - p0
        lo = p0 + (_class_width(rem, bn, tails, False) if rem > 0 else 0)
        out_pos.append(np.arange(lo, min(p0 + bn, N), dtype=np.int64))
    pos = np.concatenate(out_pos) if out_pos else np.zeros(0, dtype=np.int64)
    reads.append(_addr(a["perm_ptr"], pos))
    if a["HAS_BIAS"]:
        reads.append(_addr(a["b_ptr"], perm_np[pos]))
    writes.append(_cols(a["y_ptr"], 0, M, a["stride_ym"], perm_np[pos], a["stride_yn"]))
    _fwd_values(a, perm, count, hi)
    guard_stores(a, N, count, reads, writes)
    return _result(work, reads, writes)


def _fwd_values(a: dict, perm: torch.Tensor, count: int, hi: int) -> None:
    M, N, K = a["M"], a["N"], a["K"]
    x = _view(a["x_ptr"], (M, K), (a["stride_xm"], a["stride_xk"])).float()
    rows = torch.arange(hi) if a["COMPACT_W"] else perm[:hi]
    w = _view(a["w_ptr"], (int(rows.max()) + 1 if hi else 0, K), (a["stride_wn"], a["stride_wk"]))[rows].float()
    z = x @ w.T  # [M, hi], by position
    if a["STORE_Z"]:
        _view(a["z_ptr"], (M, hi), (a["stride_zm"], 1)).copy_(z)
    val = torch.zeros((M, N), dtype=torch.float32)
    val[:, perm[:count]] = z[:, :count]
    if a["HAS_BIAS"]:
        val += a["b_ptr"][:N].float()[None, :]
    _view(a["y_ptr"], (M, N), (a["stride_ym"], a["stride_yn"])).copy_(val)


# ----------------------------------------------------------------------------- the pass over dY


def _dy_pass(a: dict, grid: tuple) -> dict:
    M, N, bp = a["M"], a["N"], a["BLOCK_P"]
    if grid[0] != cdiv(N, bp) or grid[1] * grid[2] != 1:
        raise ValueError("unexpected grid of the pass over dY")
    count = int(a["count_ptr"][0])
    hi = N if a["Z_ALL"] else count
    perm = a["perm_ptr"][:N].long()
    perm_np = perm.numpy().astype(np.int64)
    reads = [_addr(a["count_ptr"], [0]), _addr(a["perm_ptr"], np.arange(N))]
    writes = [_addr(a["r_ptr"], perm_np), _addr(a["dtau_ptr"], perm_np)]
    # Blocks that start below hi read dY and Z of their computed positions and store dyc's.
    computed = np.arange(min(hi, N)) if hi else np.zeros(0, dtype=np.int64)
    reads.append(_cols(a["dy_ptr"], 0, M, a["stride_dym"], perm_np[computed], a["stride_dyn"]))
    reads.append(_tile(a["z_ptr"], np.arange(M), a["stride_zm"], 0, hi, 1))
    writes.append(_tile(a["dyc_ptr"], np.arange(M), a["stride_cm"], 0, count, 1))
    if a["HAS_BIAS"]:
        reads.append(_tile(a["dy_ptr"], np.arange(M), a["stride_dym"], 0, N, a["stride_dyn"]))
        writes.append(_addr(a["db_ptr"], np.arange(N)))
    # Values.
    dy = _view(a["dy_ptr"], (M, N), (a["stride_dym"], a["stride_dyn"]))
    if count:
        _view(a["dyc_ptr"], (M, count), (a["stride_cm"], 1)).copy_(dy[:, perm[:count]])
    r = torch.zeros(N, dtype=torch.float32)
    if hi:
        z = _view(a["z_ptr"], (M, hi), (a["stride_zm"], 1))
        r[perm[:hi]] = (dy[:, perm[:hi]].float() * z).sum(0)
    a["r_ptr"][:N].copy_(r)
    a["dtau_ptr"][:N].copy_(-r)
    if a["HAS_BIAS"]:
        a["db_ptr"][:N].copy_(dy.float().sum(0))
    return _result(_Work(_programs(grid)), reads, writes)


# ----------------------------------------------------------------------------- dX


def _dx(a: dict, grid: tuple) -> dict:
    if grid[1] * grid[2] != 1:
        raise ValueError("unexpected dX grid")
    units, reads, writes = _dx_parts(a, _programs(grid))
    return _result(_Work.dealt(units, _programs(grid)), reads, writes)


def _dx_parts(a: dict, programs: int) -> tuple[np.ndarray, list, list]:
    """dX's work units' multiply-adds in order (the split capped for ``programs``), reads, writes."""
    M, N, K = a["M"], a["N"], a["K"]
    bm, bk, bp, tp = a["BLOCK_M"], a["BLOCK_K"], a["BLOCK_P"], a["TAIL_P"]
    count = int(a["count_ptr"][0])
    tiles_m, tiles_k = cdiv(M, bm), cdiv(K, bk)
    tiles = tiles_m * tiles_k
    p_blocks = cdiv(count, bp)
    n_split, chunk = _split_count(a, p_blocks, tiles, programs, p_blocks)
    units = np.zeros(tiles * n_split, dtype=np.int64)
    for u in range(tiles * n_split):
        split = u % n_split
        p_lo = split * chunk * bp
        p_hi = min(p_lo + chunk * bp, count)
        full = p_hi - (p_hi - p_lo) % bp
        units[u] = len(range(p_lo, full, bp)) * bm * bp * bk + len(range(full, p_hi, tp)) * bm * tp * bk
    perm = a["perm_ptr"][:N].long()
    perm_np = perm.numpy().astype(np.int64)
    reads = [_addr(a["count_ptr"], [0]), _addr(a["split_ptr"], [p_blocks])]
    writes = [_tile(a["dx_ptr"], np.arange(M), a["stride_dxm"], 0, K, a["stride_dxk"])]
    if count:
        if not a["COMPACT_W"]:
            reads.append(_addr(a["perm_ptr"], np.arange(count)))
        reads.append(_tile(a["dyc_ptr"], np.arange(M), a["stride_cm"], 0, count, 1))
        w_rows = np.arange(count) if a["COMPACT_W"] else perm_np[:count]
        reads.append(_tile(a["w_ptr"], w_rows, a["stride_wn"], 0, K, a["stride_wk"]))
    _split_traffic(a, dict.fromkeys(range(tiles), bk), n_split, bm, reads, writes)
    # Values.
    dx = _view(a["dx_ptr"], (M, K), (a["stride_dxm"], a["stride_dxk"]))
    if count:
        dyc = _view(a["dyc_ptr"], (M, count), (a["stride_cm"], 1)).float()
        rows = torch.arange(count) if a["COMPACT_W"] else perm[:count]
        w = _view(a["w_ptr"], (int(rows.max()) + 1, K), (a["stride_wn"], a["stride_wk"]))[rows].float()
        dx.copy_(dyc @ w)
    else:
        dx.zero_()
    return units, reads, writes


# ----------------------------------------------------------------------------- dW


def _dw(a: dict, grid: tuple) -> dict | None:
    if not a["R_KNOWN"]:
        return None  # the sample mode's and the unfused path's GEMM: interpreted
    if grid[0] != cdiv(a["K"], a["BLOCK_K"]) or grid[2] != 1:
        raise ValueError("unexpected dW grid")
    units, reads, writes = _dw_parts(a, grid[1])
    return _result(_Work.dealt(units, units.size), reads, writes)


def _dw_parts(a: dict, n_blocks: int) -> tuple[np.ndarray, list, list]:
    """The dW GEMM with ``r`` known over (K tiles, ``n_blocks`` position blocks), K tiles
    fastest: each tile's multiply-adds in that order, reads, writes."""
    M, N, K = a["M"], a["N"], a["K"]
    bk, bp, bm = a["BLOCK_K"], a["BLOCK_P"], a["BLOCK_M"]
    tails = (a["TAIL1"], a["TAIL2"], a["TAIL3"])
    num_kb = cdiv(K, bk)
    count = int(a["count_ptr"][0])
    perm = a["perm_ptr"][:N].long()
    perm_np = perm.numpy().astype(np.int64)
    work = np.zeros(num_kb * n_blocks, dtype=np.int64)
    n_active = cdiv(count, bp)
    steps = cdiv(M, bm)
    reads = [_addr(a["count_ptr"], [0])]
    writes = []
    dyc_end = 0
    for t in range(min(n_active, n_blocks)):
        width = _class_width(count - t * bp, bp, tails, False)
        for pid_k in range(num_kb):
            work[t * num_kb + pid_k] = steps * bk * bm * width
        dyc_end = max(dyc_end, t * bp + width)
    active = np.arange(min(count, n_blocks * bp), dtype=np.int64)
    if active.size:
        reads.append(_addr(a["perm_ptr"], active))
        reads.append(_tile(a["x_ptr"], np.arange(M), a["stride_xm"], 0, K, a["stride_xk"]))
        # dyc is loaded without a mask along the positions: whole tile classes (its rows are padded)
        reads.append(_tile(a["dyc_ptr"], np.arange(M), a["stride_cm"], 0, dyc_end, 1))
        if a["SIGN_TERM"]:  # else G alone: the fused optimizer step adds the term (no W, no r read)
            reads.append(_tile(a["w_ptr"], perm_np[active], a["stride_wn"], 0, K, a["stride_wk"]))
            reads.append(_addr(a["rpart_ptr"], perm_np[active]))
        writes.append(_tile(a["g_ptr"], perm_np[active], a["stride_gn"], 0, K, a["stride_gk"]))
    pruned = np.zeros(0, dtype=np.int64)
    if a["WRITE_PRUNED"]:
        pruned = np.arange(count, min(N, n_blocks * bp), dtype=np.int64)
        if pruned.size:
            reads.append(_addr(a["perm_ptr"], pruned))
            if a["MODE"] != 1:
                reads.append(_tile(a["w_ptr"], perm_np[pruned], a["stride_wn"], 0, K, a["stride_wk"]))
                reads.append(_addr(a["rpart_ptr"], perm_np[pruned]))
            writes.append(_tile(a["g_ptr"], perm_np[pruned], a["stride_gn"], 0, K, a["stride_gk"]))
    # Values: G of the active rows plus the straight-through term (without SIGN_TERM, G alone),
    # rounded once; the pruned rows' term alone (0 + the term, as the kernel forms it; 0 in skip
    # mode).
    w = _view(a["w_ptr"], (N, K), (a["stride_wn"], a["stride_wk"])).float()
    r = a["rpart_ptr"][:N].float()
    dw = _view(a["g_ptr"], (N, K), (a["stride_gn"], a["stride_gk"]))
    term = torch.sign(w) * (r / K)[:, None]
    if active.size:
        x = _view(a["x_ptr"], (M, K), (a["stride_xm"], a["stride_xk"])).float()
        dyc = _view(a["dyc_ptr"], (M, active.size), (a["stride_cm"], 1)).float()
        rows = perm[:active.size]
        g = dyc.T @ x
        dw[rows] = (g + term[rows] if a["SIGN_TERM"] else g).to(dw.dtype)
    if pruned.size:
        rows = perm[pruned]
        val = torch.zeros((pruned.size, K), dtype=torch.float32)
        if a["MODE"] != 1:
            val = val + term[rows]
        dw[rows] = val.to(dw.dtype)
    return work, reads, writes


def _grouped(a: dict, grid: tuple) -> dict:
    """``_threshold_linear_bwd_kernel``: dX's work units, then dW's tiles, dealt to one set of
    persistent programs (the sectors both read counted once)."""
    if grid[1] * grid[2] != 1:
        raise ValueError("unexpected grouped backward grid")
    count = int(a["count_ptr"][0])
    n_blocks = cdiv(a["N"] if a["WRITE_PRUNED"] else count, a["BLOCK_P"])
    common = {k: a[k] for k in ("M", "N", "K", "count_ptr", "perm_ptr", "dyc_ptr", "stride_cm", "UPCAST")}
    dx = {**common, "w_ptr": a["wdx_ptr"], "stride_wn": a["stride_wdxn"], "stride_wk": a["stride_wdxk"],
          **{k: a[k] for k in ("split_ptr", "ws_ptr", "lock_ptr", "dx_ptr", "stride_dxm", "stride_dxk", "COMPACT_W",
                               "TAIL_P", "GROUP_M")},
          "BLOCK_M": a["DX_BLOCK_M"], "BLOCK_K": a["DX_BLOCK_K"], "BLOCK_P": a["DX_BLOCK_P"]}
    dw = {**common, "g_ptr": a["dw_ptr"], "rpart_ptr": a["r_ptr"], "stride_gn": a["stride_dwn"],
          "stride_gk": a["stride_dwk"],
          **{k: a[k] for k in ("x_ptr", "w_ptr", "stride_xm", "stride_xk", "stride_wn", "stride_wk", "MODE",
                               "BLOCK_K", "BLOCK_P", "BLOCK_M", "TAIL1", "TAIL2", "TAIL3", "WRITE_PRUNED",
                               "SIGN_TERM")}}
    dx_units, dx_reads, dx_writes = _dx_parts(dx, a["dx_programs"])
    dw_units, dw_reads, dw_writes = _dw_parts(dw, n_blocks)
    work = _Work.dealt(np.concatenate([dx_units, dw_units]), _programs(grid))
    return _result(work, dx_reads + dw_reads, dx_writes + dw_writes)


# ----------------------------------------------------------------------------- finish


def _finish(a: dict, grid: tuple) -> dict:
    N, K, bp = a["N"], a["K"], a["BLOCK_P"]
    num_kb, n_split = a["NUM_KB"], a["SPLIT"]
    if grid[0] != cdiv(N, bp) or grid[1] * grid[2] != 1:
        raise ValueError("unexpected finish grid")
    count = int(a["count_ptr"][0])
    perm = a["perm_ptr"][:N].long()
    perm_np = perm.numpy().astype(np.int64)
    act = perm_np[:min(count, N)]
    need_r = act if a["MODE"] == 1 else perm_np
    out_rows = act if a["ROWS_ONLY"] else perm_np
    need_w = act if a["ROWS_ONLY"] else need_r
    reads = [_addr(a["count_ptr"], [0]), _addr(a["perm_ptr"], np.arange(N)),
             _addr(a["rpart_ptr"], (np.arange(num_kb, dtype=np.int64)[:, None] * N + need_r[None, :])),
             _tile(a["w_ptr"], need_w, a["stride_wn"], 0, K, a["stride_wk"])]
    for sl in range(n_split):
        reads.append(_tile(a["g_ptr"], act, a["stride_gn"], 0, K, a["stride_gk"], base=sl * a["stride_gs"]))
    writes = [_addr(a["dtau_ptr"], perm_np),
              _tile(a["dw_ptr"], out_rows, a["stride_dwn"], 0, K, a["stride_dwk"])]
    if a["ROWS_ONLY"]:
        writes.append(_addr(a["r_ptr"], perm_np))
    # Values.
    rpart = a["rpart_ptr"].view(-1)[:num_kb * N].view(num_kb, N)
    r = torch.zeros(N, dtype=torch.float32)
    idx = torch.from_numpy(need_r)
    if idx.numel():
        r[idx] = rpart[:, idx].sum(0)
    a["dtau_ptr"][:N].copy_(-r)
    if a["ROWS_ONLY"]:
        a["r_ptr"][:N].copy_(r)
    g = torch.zeros((N, K), dtype=torch.float32)
    if act.size:
        rows = torch.from_numpy(act)
        for sl in range(n_split):
            g[rows] += _view(a["g_ptr"], (n_split, N, K), (a["stride_gs"], a["stride_gn"], a["stride_gk"]))[sl][rows] \
                .float()
    w = _view(a["w_ptr"], (N, K), (a["stride_wn"], a["stride_wk"])).float()
    coef = torch.zeros(N, dtype=torch.float32)
    nr = torch.from_numpy(need_w)
    coef[nr] = r[nr] / K
    dw = _view(a["dw_ptr"], (N, K), (a["stride_dwn"], a["stride_dwk"]))
    rows = torch.from_numpy(out_rows)
    dw[rows] = (g[rows] + torch.sign(w[rows]) * coef[rows][:, None]).to(dw.dtype)
    return _result(_Work(_programs(grid)), reads, writes)


# ----------------------------------------------------------------------------- row mask


def _row_mask(a: dict, grid: tuple) -> dict:
    N, K, bn, bk = a["N"], a["K"], a["BLOCK_N"], a["BLOCK_K"]
    if grid[0] != cdiv(N, bn) or grid[1] * grid[2] != 1:
        raise ValueError("unexpected row-mask grid")
    w = _view(a["w_ptr"], (N, K), (a["stride_wn"], a["stride_wk"]))
    # Scores as the kernel sums them: |w| over column tiles of BLOCK_K (fp32), then across the tile.
    acc = np.zeros((N, bk), dtype=np.float32)
    wf = w.float().numpy()
    for k0 in range(0, K, bk):
        part = np.abs(wf[:, k0:k0 + bk])
        acc[:, :part.shape[1]] += part
    score = torch.from_numpy((np.sum(acc, axis=1) / np.float32(K)).astype(np.float32))
    tau = a["tau_ptr"][:N].float()
    mask = score > tau
    guard = a["HAS_GUARD"]
    collapsed = False
    if guard:
        collapsed = bool(np.float32(int(mask.sum())) <= np.float32(a["collapse_density"]) * np.float32(N))
        if collapsed:
            mask = score > 0
    order = torch.cat([torch.nonzero(mask).view(-1), torch.nonzero(~mask).view(-1)]).to(torch.int32)
    rows = np.arange(N, dtype=np.int64)
    reads = [_tile(a["w_ptr"], rows, a["stride_wn"], 0, K, a["stride_wk"]), _addr(a["tau_ptr"], rows),
             _addr(a["mask_ptr"], rows), _addr(a["ticket_ptr"], [0])]
    writes = [_addr(a["score_ptr"], rows), _addr(a["mask_ptr"], rows), _addr(a["perm_ptr"], rows),
              _addr(a["count_ptr"], [0]), _addr(a["ticket_ptr"], [0])]
    if guard:
        reads.append(_addr(a["score_ptr"], rows))
        writes.append(_addr(a["collapsed_ptr"], [0]))
    a["score_ptr"][:N].copy_(score)
    a["mask_ptr"][:N].copy_(mask.to(torch.int8))
    a["perm_ptr"][:N].copy_(order)
    a["count_ptr"][0] = int(mask.sum())
    if guard:
        a["collapsed_ptr"][0] = int(collapsed)
    return _result(_Work(_programs(grid)), reads, writes)


# ----------------------------------------------------------------------------- dispatch

COUNTERS = {"_threshold_linear_fwd_kernel": _fwd, "_compact_grad_bias_kernel": _dy_pass,
            "_threshold_linear_bwd_dx_kernel": _dx, "_threshold_linear_bwd_dw_kernel": _dw,
            "_threshold_linear_bwd_kernel": _grouped,
            "_threshold_bwd_finish_kernel": _finish, "_row_mask_kernel": _row_mask}


def count(executor, args: tuple, kwargs: dict) -> dict | None:
    """The counts of one launch (``programs``, ``mac_programs``, ``macs``, ``max_program_macs``,
    ``read_bytes``, ``write_bytes``), its outputs written; None for a launch this module does not
    count (the caller interprets it)."""
    return count_with(COUNTERS, executor, args, kwargs)
