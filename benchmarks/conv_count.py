"""The convolution GEMM launches counted from their grid and loop bounds, without the interpreter.

The cost model (benchmarks/model.py) counts a Triton launch by executing every program in
Triton's interpreter, one after another; a ResNet-18 training step at batch 64 is tens of
thousands of convolution programs, hours on one core. The three GEMM kernels of
``spafl.kernels.threshold_conv2d`` (forward, dX, dW) are regular enough to count at once: this
module takes a launch's own arguments (the tensors, strides, constexpr tiles and grid the
launcher passed, so every tile and split the kernels' config functions chose is followed, not
copied), and forms per launch

* ``programs`` (the grid), ``mac_programs``, ``macs`` and ``max_program_macs`` from the loop
  bounds every program runs (the same ``tl.dot`` shapes the interpreter counts), and
* the unique 32-byte sectors read and written, from the address set of the whole grid built in
  NumPy: the union over programs of every unmasked lane's address, by buffer;

then writes the launch's outputs with plain torch (fp32 arithmetic, rounded once to the
output's dtype), so that later launches see the values they depend on (the pruned filters'
output channels hold the bias or 0, which input-side skipping reads; the dY compaction and the
finish pass read what these launches wrote). The workspace the dW kernel splits its pixel
reduction over gets the whole sum in its first slice and zeros in the others, the partial sums
of ``r`` the whole sum in the first (split, kernel position) row: the finish pass adds the same
totals, up to fp32 rounding.

:func:`count` returns None for any other kernel: the recorder then runs it in the interpreter.
tests/test_cost_model.py checks every field of every launch against the interpreter on small
cases (shapes, strides, padding, dilation, layouts, densities, backward modes); a change in the
kernels' loops shows up there as a failed equality.
"""

from __future__ import annotations

import inspect

import numpy as np
import torch
import torch.nn.functional as F

SECTOR = 32  # bytes, as in benchmarks/model.py


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _addr(t: torch.Tensor, offsets: np.ndarray) -> np.ndarray:
    """Sectors of the elements at ``offsets`` (elements, from the pointer the kernel receives)."""
    off = np.asarray(offsets, dtype=np.int64).ravel()
    return (t.data_ptr() + off * t.element_size()) // SECTOR


def guard_stores(a: dict, n: int, count: int, reads: list, writes: list) -> None:
    """The forward kernels' ``GUARD_WRITES`` (program 0: the collapse guard's writes for a mask
    a fused step built, ``kernels.threshold_mask._guard_stores``): made here, and their traffic
    added to ``reads`` / ``writes``."""
    if not a.get("GUARD_WRITES"):
        return
    flag, tau, resets, previous = (a[k].view(-1) for k in ("guard_flag_ptr", "guard_tau_ptr", "guard_resets_ptr",
                                                            "guard_previous_ptr"))  # (one-element: 0-dim too)
    reads.append(_addr(flag, [0]))
    if int(flag[0]) != 0:
        tau[:n] = 0
        resets[0] += 1
        reads.append(_addr(resets, [0]))
        writes += [_addr(tau, np.arange(n)), _addr(resets, [0])]
    previous[0] = torch.tensor(float(count), dtype=torch.float32) / torch.tensor(float(n), dtype=torch.float32)
    writes.append(_addr(previous, [0]))


def _unique_bytes(parts: list[np.ndarray]) -> int:
    """32 x the distinct sectors in ``parts``: parts whose sector ranges overlap are merged and
    counted on a bitmap of their span (a buffer's span, not the address space; no sort)."""
    spans = sorted(((int(p.min()), int(p.max()), i) for i, p in enumerate(parts) if p.size))
    groups: list[list] = []
    for lo, hi, i in spans:
        if groups and lo <= groups[-1][1]:
            groups[-1][1] = max(groups[-1][1], hi)
            groups[-1][2].append(i)
        else:
            groups.append([lo, hi, [i]])
    distinct = 0
    for lo, hi, members in groups:
        seen = np.zeros(hi - lo + 1, dtype=bool)
        for i in members:
            seen[parts[i] - lo] = True
        distinct += int(np.count_nonzero(seen))
    return SECTOR * distinct


def _class_width(rem: int, block: int, tails: tuple[int, int, int], zero_is_fill: bool) -> int:
    """The tile class the kernels run for a block with ``rem`` active units: ``block`` if
    ``rem > TAIL1``, else ``TAIL1`` if ``rem > TAIL2``, ... (``zero_is_fill``: ``rem <= 0`` runs no
    tile, as in the forward)."""
    t1, t2, t3 = tails
    if rem > t1:
        return block
    if rem > t2:
        return t1
    if rem > t3:
        return t2
    if zero_is_fill and rem <= 0:
        return 0
    return t3


def _pixels(q: np.ndarray, plane: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    b = q // plane
    hw = q - b * plane
    row = hw // width
    return b, row, hw - row * width


def _input_offsets(q: np.ndarray, a: dict, taps: list[tuple[int, int]], chans: int, strides: tuple) -> np.ndarray:
    """Element offsets of X read for output pixels ``q`` at kernel positions ``taps``, every
    channel: ``b sxb + ih sxh + iw sxw + c sxc`` for the taps inside the image."""
    sxb, sxc, sxh, sxw = strides
    b, oh, ow = _pixels(q, a["Ho"] * a["Wo"], a["Wo"])
    touched = np.zeros((int(b.max()) + 1 if b.size else 0, a["H"], a["W"]), dtype=bool)
    for r, s in taps:
        ih = oh * a["stride_h"] - a["pad_h"] + r * a["dil_h"]
        iw = ow * a["stride_w"] - a["pad_w"] + s * a["dil_w"]
        ok = (ih >= 0) & (ih < a["H"]) & (iw >= 0) & (iw < a["W"])
        touched[b[ok], ih[ok], iw[ok]] = True
    bb, hh, ww = np.nonzero(touched)
    pos = bb.astype(np.int64) * sxb + hh.astype(np.int64) * sxh + ww.astype(np.int64) * sxw
    return (pos[:, None] + np.arange(chans, dtype=np.int64)[None, :] * sxc).ravel()


def _weight_offsets(rows: np.ndarray, a: dict, taps, strides: tuple) -> np.ndarray:
    swf, swc, swh, sww = strides
    c = np.arange(a["C"], dtype=np.int64) * swc
    rs = np.array([r * swh + s * sww for r, s in taps], dtype=np.int64)
    return (rows.astype(np.int64)[:, None, None] * swf + c[None, :, None] + rs[None, None, :]).ravel()


# ----------------------------------------------------------------------------- reference values


def _padded_conv(x: torch.Tensor, w: torch.Tensor, a: dict) -> torch.Tensor:
    """``Y [B, n, Ho, Wo]`` of the convolution with the launch's begin padding; the end is
    padded as far as the output size needs (the geometry may pad unevenly)."""
    need_h = (a["Ho"] - 1) * a["stride_h"] + (a["KH"] - 1) * a["dil_h"] + 1
    need_w = (a["Wo"] - 1) * a["stride_w"] + (a["KW"] - 1) * a["dil_w"] + 1
    end_h = max(0, need_h - a["pad_h"] - a["H"])
    end_w = max(0, need_w - a["pad_w"] - a["W"])
    xp = F.pad(x, (a["pad_w"], end_w, a["pad_h"], end_h))
    y = F.conv2d(xp, w, stride=(a["stride_h"], a["stride_w"]), dilation=(a["dil_h"], a["dil_w"]))
    return y[:, :, :a["Ho"], :a["Wo"]]


def _view(t: torch.Tensor, size: tuple, strides: tuple) -> torch.Tensor:
    return t.as_strided(size, strides, t.storage_offset())


def _x(a: dict, batch: int) -> torch.Tensor:
    return _view(a["x_ptr"], (batch, a["C"], a["H"], a["W"]), (a["sxb"], a["sxc"], a["sxh"], a["sxw"])).float()


def _weight_rows(a: dict, rows: torch.Tensor) -> torch.Tensor:
    """``W[rows]`` as ``[n, C, KH, KW]`` fp32, through the launch's weight strides."""
    w = a["w_ptr"]
    n = int(rows.max()) + 1 if rows.numel() else 0
    full = _view(w, (n, a["C"], a["KH"], a["KW"]), (a["swf"], a["swc"], a["swh"], a["sww"]))
    return full[rows.long()].float()


def _weight_of_active(a: dict, perm: torch.Tensor, count: int) -> torch.Tensor:
    rows = torch.arange(count) if a["COMPACT_W"] else perm[:count]
    return _weight_rows(a, rows)


# ----------------------------------------------------------------------------- forward


def _fwd(a: dict, grid: tuple) -> dict:
    P, nF, C = a["P"], a["F"], a["C"]
    bm, bn, bk = a["BLOCK_M"], a["BLOCK_N"], a["BLOCK_K"]
    tails = (a["TAIL1"], a["TAIL2"], a["TAIL3"])
    perm = a["perm_ptr"][:nF].long()
    count = int(a["count_ptr"][0])
    n_m, n_p = cdiv(P, bm), cdiv(nF, bn)
    if grid[0] * grid[1] * grid[2] != n_m * n_p:
        raise ValueError("unexpected forward grid")
    iters = a["KH"] * a["KW"] * cdiv(C, bk)
    widths = [_class_width(count - t * bn, bn, tails, True) for t in range(n_p)]
    per = [iters * bm * bk * w for w in widths]
    run = [p for p in per if p]
    fields = {"programs": grid[0] * grid[1] * grid[2], "mac_programs": n_m * len(run), "macs": n_m * sum(run),
              "max_program_macs": max(run, default=0)}
    perm_np = perm.numpy().astype(np.int64)
    reads = [_addr(a["count_ptr"], np.zeros(1)), _addr(a["perm_ptr"], np.arange(nF))]
    if a["HAS_BIAS"]:
        reads.append(_addr(a["b_ptr"], perm_np))
    q = np.arange(P, dtype=np.int64)
    taps = [(r, s) for r in range(a["KH"]) for s in range(a["KW"])]
    if count > 0:
        reads.append(_addr(a["x_ptr"], _input_offsets(q, a, taps, C, (a["sxb"], a["sxc"], a["sxh"], a["sxw"]))))
        rows = np.arange(count) if a["COMPACT_W"] else perm_np[:count]
        reads.append(_addr(a["w_ptr"], _weight_offsets(rows, a, taps, (a["swf"], a["swc"], a["swh"], a["sww"]))))
    b, oh, ow = _pixels(q, a["Ho"] * a["Wo"], a["Wo"])
    out = b * a["syb"] + oh * a["syh"] + ow * a["syw"]
    writes = [_addr(a["y_ptr"], (out[:, None] + perm_np[None, :] * a["syf"]))]
    # Values: Y of the active filters; the bias (or 0) in the pruned channels.
    batch = P // (a["Ho"] * a["Wo"])
    y = _view(a["y_ptr"], (batch, nF, a["Ho"], a["Wo"]), (a["syb"], a["syf"], a["syh"], a["syw"]))
    val = torch.zeros((batch, nF, a["Ho"], a["Wo"]), dtype=torch.float32)
    if count:
        val[:, perm[:count]] = _padded_conv(_x(a, batch), _weight_of_active(a, perm, count), a)
    if a["HAS_BIAS"]:
        val += a["b_ptr"][:nF].float()[None, :, None, None]
    y.copy_(val)
    guard_stores(a, nF, count, reads, writes)
    return {**fields, "read_bytes": _unique_bytes(reads), "write_bytes": _unique_bytes(writes)}


# ----------------------------------------------------------------------------- dX


def _phase_taps(phase: int, pad: int, dil: int, stride: int, k: int) -> tuple[int, int]:
    lift = (k - 1) * dil * stride
    reach = [r for r in range(k) if (phase + pad - r * dil + lift) % stride == 0]
    return (reach[0] if reach else k), len(reach)


def _dx(a: dict, grid: tuple) -> dict:
    C, H, W, Ho, Wo = a["C"], a["H"], a["W"], a["Ho"], a["Wo"]
    sh, sw, KH, KW = a["stride_h"], a["stride_w"], a["KH"], a["KW"]
    bm, bc, bp, tp = a["BLOCK_M"], a["BLOCK_C"], a["BLOCK_P"], a["TAIL_P"]
    PQ, Hq, Wq = a["PQ"], a["Hq"], a["Wq"]
    n0 = cdiv(PQ, bm) * cdiv(C, bc)
    if tuple(grid[:2]) != (n0, sh * sw) or grid[2] != 1:
        raise ValueError("unexpected dX grid")
    count = int(a["count_ptr"][0])
    _dy_in_place(a, count)
    full = count - count % bp
    n_full, n_tail = full // bp, cdiv(count - full, tp)
    lift_h, lift_w = (KH - 1) * a["dil_h"], (KW - 1) * a["dil_w"]
    m = np.arange(PQ, dtype=np.int64)
    b, i, j = _pixels(m, Hq * Wq, Wq)
    perm = a["perm_ptr"][:max(count, 0)].long()
    macs, mac_programs, max_macs = 0, 0, 0
    taps_all: set[tuple[int, int]] = set()
    batch = PQ // (Hq * Wq)
    dyc_rows = np.zeros(batch * Ho * Wo, dtype=bool)
    dx_off = []
    for phase in range(sh * sw):
        ph, pw = divmod(phase, sw)
        r0, n_r = _phase_taps(ph, a["pad_h"], a["dil_h"], sh, KH)
        s0, n_s = _phase_taps(pw, a["pad_w"], a["dil_w"], sw, KW)
        n_taps = n_r * n_s
        per = n_taps * (n_full * bm * bp * bc + n_tail * bm * tp * bc)
        if per:
            macs += n0 * per
            mac_programs += n0
            max_macs = max(max_macs, per)
        ih, iw = ph + i * sh, pw + j * sw
        pix_ok = (ih < H) & (iw < W)
        dx_off.append(b[pix_ok] * a["sdb"] + ih[pix_ok] * a["sdh"] + iw[pix_ok] * a["sdw"])
        if not n_taps or not (n_full or n_tail):
            continue
        for tap in range(n_taps):
            kr, ks = divmod(tap, n_s)
            r, s = r0 + kr * a["step_r"], s0 + ks * a["step_s"]
            taps_all.add((r, s))
            dh = (ph + a["pad_h"] - r * a["dil_h"] + lift_h * sh) // sh - lift_h
            dw = (pw + a["pad_w"] - s * a["dil_w"] + lift_w * sw) // sw - lift_w
            ok = pix_ok & (i + dh >= 0) & (i + dh < Ho) & (j + dw >= 0) & (j + dw < Wo)
            dyc_rows[(b * Ho * Wo + i * Wo + j + dh * Wo + dw)[ok]] = True
    reads = [_addr(a["count_ptr"], np.zeros(1))]
    if taps_all:
        if not a["COMPACT_W"]:
            reads.append(_addr(a["perm_ptr"], np.arange(count)))
        q = np.nonzero(dyc_rows)[0].astype(np.int64)
        reads.append(_addr(a["dyc_ptr"], (q[:, None] * a["stride_cm"] + np.arange(count)[None, :])))
        rows = np.arange(count) if a["COMPACT_W"] else perm.numpy().astype(np.int64)
        reads.append(_addr(a["w_ptr"], _weight_offsets(rows, a, sorted(taps_all),
                                                        (a["swf"], a["swc"], a["swh"], a["sww"]))))
    pos = np.concatenate(dx_off)
    writes = [_addr(a["dx_ptr"], (pos[:, None] + np.arange(C, dtype=np.int64)[None, :] * a["sdc"]))]
    # Values: the transposed convolution of dY's active columns over the active filters.
    dx = _view(a["dx_ptr"], (batch, C, H, W), (a["sdb"], a["sdc"], a["sdh"], a["sdw"]))
    if count:
        pixels = batch * Ho * Wo
        dyc = _view(a["dyc_ptr"], (pixels, count), (a["stride_cm"], 1)).float()
        dya = dyc.reshape(batch, Ho, Wo, count).permute(0, 3, 1, 2)
        xs = torch.zeros((batch, C, H, W), requires_grad=True)
        with torch.enable_grad():
            y = _padded_conv(xs, _weight_of_active(a, perm, count), a)
            (g,) = torch.autograd.grad(y, xs, dya)
        dx.copy_(g)
    else:
        dx.zero_()
    return {"programs": grid[0] * grid[1] * grid[2], "mac_programs": mac_programs, "macs": macs,
            "max_program_macs": max_macs, "read_bytes": _unique_bytes(reads), "write_bytes": _unique_bytes(writes)}


# ----------------------------------------------------------------------------- dW


def _split_steps(end: int, split: int, n_split: int, block: int) -> tuple[int, int]:
    chunk = cdiv(cdiv(end, n_split), block) * block
    lo = min(split * chunk, end)
    return lo, min(lo + chunk, end)


def _dw(a: dict, grid: tuple) -> dict:
    P, nF, C, KH, KW = a["P"], a["F"], a["C"], a["KH"], a["KW"]
    bc, bp, bmk, mode = a["BLOCK_C"], a["BLOCK_P"], a["BLOCK_M"], a["MODE"]
    tails = (a["TAIL1"], a["TAIL2"], a["TAIL3"])
    n_split = a["SPLIT"]
    num_kb = KH * KW * cdiv(C, bc)
    n_blocks = grid[0]
    if tuple(grid[1:]) != (num_kb, n_split):
        raise ValueError("unexpected dW grid")
    count = int(a["count_ptr"][0])
    _dy_in_place(a, count)
    perm = a["perm_ptr"][:nF].long()
    perm_np = perm.numpy().astype(np.int64)
    # Per block: (p0, p_end, width, source, store_g, m_end, m_step, block_m) or None (no work).
    kinds = []
    n_active = cdiv(count, bp)
    for t in range(n_blocks):
        if mode == 0:
            p0 = t * bp
            kinds.append((p0, nF, bp, 0 if p0 + bp <= count else 2, True, P, 1, bmk))
        elif t < n_active:
            p0 = t * bp
            kinds.append((p0, count, _class_width(count - p0, bp, tails, False), 0, True, P, 1, bmk))
        elif mode == 2 and count + (t - n_active) * bp < nF:
            p0 = count + (t - n_active) * bp
            kinds.append((p0, nF, _class_width(nF - p0, bp, tails, False), 1, False, a["sample_count"],
                          a["sample_step"], a["SAMPLE_M"]))
        else:
            kinds.append(None)
    macs, mac_programs, max_macs = 0, 0, 0
    all_taps = [(r, s) for r in range(KH) for s in range(KW)]
    reads = [_addr(a["count_ptr"], np.zeros(1))]
    writes = []
    pix_sets: dict[tuple[int, int], None] = {}
    x_strides = (a["sxb"], a["sxc"], a["sxh"], a["sxw"])
    def t_index(p0: int) -> int:
        return p0 // bp  # the blocks that store G start at t * BLOCK_P

    for kind in kinds:
        if kind is None:
            continue
        p0, p_end, width, source, store_g, m_end, m_step, blk = kind
        for split in range(n_split):
            lo, hi = _split_steps(m_end, split, n_split, blk)
            steps = len(range(lo, hi, blk))
            if steps:
                per = steps * bc * blk * width
                macs += num_kb * per
                mac_programs += num_kb
                max_macs = max(max_macs, per)
        p = np.arange(p0, min(p0 + width, p_end), dtype=np.int64)
        reads.append(_addr(a["perm_ptr"], p))
        rows = perm_np[p]
        if m_end > 0:
            pix_sets[(m_end, m_step)] = None
            pix = np.arange(m_end, dtype=np.int64) * m_step
            if source in (0, 2):
                cols = np.arange(p0, p0 + width) if source == 0 else p[p < count]
                reads.append(_addr(a["dyc_ptr"], pix[:, None] * a["stride_cm"] + cols[None, :]))
            if source in (1, 2):
                b, oh, ow = _pixels(pix, a["Ho"] * a["Wo"], a["Wo"])
                dyrows = rows[p >= count]
                off = b * a["sdyb"] + oh * a["sdyh"] + ow * a["sdyw"]
                reads.append(_addr(a["dy_ptr"], off[:, None] + dyrows[None, :] * a["sdyf"]))
        reads.append(_addr(a["w_ptr"], _weight_offsets(rows, a, all_taps, (a["swf"], a["swc"], a["swh"], a["sww"]))))
        writes.append(_addr(a["rpart_ptr"], (np.arange(n_split * num_kb, dtype=np.int64) * nF)[:, None]
                            + rows[None, :]))
        if store_g:
            g_rows = rows[p < count]
            c = np.arange(C, dtype=np.int64) * a["stride_gc"]
            rs = np.arange(KH * KW, dtype=np.int64) * a["stride_grs"]
            sp = np.arange(n_split, dtype=np.int64) * a["stride_gs"]
            g_all = _addr(a["g_ptr"], (sp[:, None, None, None] + g_rows[None, :, None, None] * a["stride_gn"]
                                       + c[None, None, :, None] + rs[None, None, None, :]))
            writes.append(g_all)
            if n_split > 1 and p0 < count:
                # _conv_dw_sum_splits: every program of the tile takes a ticket; the last reads
                # the tile's slices (all of them) and stores their sum into the first (already
                # among the writes), then resets the ticket.
                tickets = _addr(a["ticket_ptr"], t_index(p0) * num_kb + np.arange(num_kb, dtype=np.int64))
                reads += [tickets, g_all]
                writes.append(tickets)
    for m_end, m_step in pix_sets:
        q = np.arange(m_end, dtype=np.int64) * m_step
        reads.append(_addr(a["x_ptr"], _input_offsets(q, a, all_taps, C, x_strides)))
    _dw_values(a, kinds, count, perm, num_kb)
    return {"programs": grid[0] * grid[1] * grid[2], "mac_programs": mac_programs, "macs": macs,
            "max_program_macs": max_macs, "read_bytes": _unique_bytes(reads), "write_bytes": _unique_bytes(writes)}


def _dy_in_place(a: dict, count: int) -> None:
    """The GEMMs' ``DY_DIRECT`` switch: with every filter active they read dY itself (laid out as
    the compacted buffer) in place of the buffer the compaction left unwritten."""
    if a.get("DY_DIRECT") and count == a["F"]:
        a["dyc_ptr"] = a["dy_ptr"]


def _dw_values(a: dict, kinds: list, count: int, perm: torch.Tensor, num_kb: int) -> None:
    """G of the active filters into the workspace (first slice; zeros in the others) and the sums
    ``r = sum G W`` of the filters the launch covers into the first row of the partials."""
    P, nF, C, KH, KW, n_split = a["P"], a["F"], a["C"], a["KH"], a["KW"], a["SPLIT"]
    batch = P // (a["Ho"] * a["Wo"])
    dy = _view(a["dy_ptr"], (batch, nF, a["Ho"], a["Wo"]), (a["sdyb"], a["sdyf"], a["sdyh"], a["sdyw"])).float()
    x = _x(a, batch)
    w = _view(a["w_ptr"], (nF, C, KH, KW), (a["swf"], a["swc"], a["swh"], a["sww"])).float()

    def grad_w(dy_part: torch.Tensor) -> torch.Tensor:
        wv = torch.zeros((nF, C, KH, KW), requires_grad=True)
        with torch.enable_grad():
            y = _padded_conv(x, wv, a)
            (g,) = torch.autograd.grad(y, wv, dy_part)
        return g

    covered = [(k[0], k[1], k[2], k[3]) for k in kinds if k is not None]
    g_full = grad_w(dy) if covered else None
    rpart = a["rpart_ptr"].view(-1)[:n_split * num_kb * nF].view(n_split * num_kb, nF)
    g_ws = _view(a["g_ptr"], (n_split, nF, C, KH * KW), (a["stride_gs"], a["stride_gn"], a["stride_gc"],
                                                         a["stride_grs"]))
    active = perm[:count]
    if count and any(k is not None and k[4] for k in kinds):
        g_ws[:, active] = 0
        g_ws[0, active] = g_full[active].reshape(count, C, KH * KW).to(g_ws.dtype)
    r = None
    for p0, p_end, width, source in covered:
        rows = perm[p0:min(p0 + width, p_end)]
        if source == 1:  # pruned filters over the strided sample of the pixels, scaled to all of them
            if r is None:
                mask = torch.zeros(P)
                mask[torch.arange(a["sample_count"]) * a["sample_step"]] = 1
                gs = grad_w(dy * mask.view(batch, 1, a["Ho"], a["Wo"]))
                r = (gs * w).sum((1, 2, 3)) * (P / a["sample_count"])
            vals = r[rows]
        else:
            vals = (g_full[rows] * w[rows]).sum((1, 2, 3))
        rpart[:, rows] = 0
        rpart[0, rows] = vals.to(rpart.dtype)


# ----------------------------------------------------------------------------- dispatch

COUNTERS = {"_threshold_conv2d_fwd_kernel": _fwd, "_threshold_conv2d_bwd_dx_kernel": _dx,
            "_threshold_conv2d_bwd_dw_kernel": _dw}


def count(executor, args: tuple, kwargs: dict) -> dict | None:
    """The counts of one launch (``programs``, ``mac_programs``, ``macs``, ``max_program_macs``,
    ``read_bytes``, ``write_bytes``), its outputs written; None for a kernel this module does
    not know (the caller interprets it)."""
    return count_with(COUNTERS, executor, args, kwargs)


def count_with(counters: dict, executor, args: tuple, kwargs: dict) -> dict | None:
    """One launch counted by the counter ``counters`` holds for its kernel (None if none, or if
    an operand lives on a device: only CPU launches are counted this way)."""
    counter = counters.get(executor.fn.__name__)
    if counter is None:
        return None
    spec = inspect.getfullargspec(executor.fn)
    kwargs = {k: v for k, v in kwargs.items() if k in spec.args or k in spec.kwonlyargs}
    a = inspect.getcallargs(executor.fn, *args, **kwargs)
    if any(isinstance(v, torch.Tensor) and v.device.type != "cpu" for v in a.values()):
        return None
    grid = executor.grid(a) if callable(executor.grid) else executor.grid
    grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
    with torch.no_grad():
        return counter(a, grid)
