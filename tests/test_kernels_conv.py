"""Triton Conv2d kernels against the reference: forward and every gradient, every option.

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set in conftest): small
shapes, odd sizes everywhere so that tile edges, mixed active / pruned tiles and padding
borders are all exercised.
"""

import pytest
import torch

from conftest import assert_close
from spafl import reference, threshold_for_density
from spafl._conv import conv_geometry
from spafl.kernels import threshold_conv2d_bwd, threshold_conv2d_fwd, threshold_row_mask

pytestmark = pytest.mark.interpreter

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MODES = ["exact", "skip", "sample"]

# (batch, channels, height, width, filters, kernel, stride, padding, dilation)
GEOMETRIES = {
    "1x1": (2, 6, 5, 7, 37, 1, 1, 0, 1),
    "1x1-stride2": (2, 5, 7, 6, 19, 1, 2, 0, 1),
    "3x3-pad1": (2, 5, 7, 7, 37, 3, 1, 1, 1),
    "3x3-stride2": (3, 5, 9, 8, 21, 3, 2, 1, 1),
    "3x3-valid-dil2": (2, 3, 9, 9, 17, 3, 1, "valid", 2),
    "5x5-same": (2, 4, 6, 7, 23, 5, 1, "same", 1),
    "5x5-stride3-pad2": (2, 3, 11, 10, 13, 5, 3, 2, 1),
    "7x7-stride2-pad3": (2, 3, 11, 9, 19, 7, 2, 3, 1),
    "2x2-same": (2, 5, 6, 5, 11, 2, 1, "same", 1),  # asymmetric padding
    "3x5-mixed": (2, 5, 8, 9, 37, (3, 5), (2, 3), (1, 2), (1, 2)),
    "40-channels": (1, 40, 5, 4, 9, 3, 1, 1, 1),  # more channels than one channel block
}


def _inputs(geometry, dtype, density, device, seed=0, bias=True, channels_last=False):
    b, c, h, w, f, kernel, stride, padding, dilation = geometry
    geo = conv_geometry(kernel, stride, padding, dilation)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, h, w, generator=g).to(device=device, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    wt = (torch.randn(f, c, *geo.kernel, generator=g) / (c * geo.kernel[0] * geo.kernel[1]) ** 0.5)
    wt = wt.to(device=device, dtype=dtype)
    bias_t = torch.randn(f, generator=g).to(device=device, dtype=dtype) if bias else None
    ho, wo = geo.output_size(h, w)
    dy = torch.randn(b, f, ho, wo, generator=g).to(device=device, dtype=dtype)
    tau = threshold_for_density(wt, density)
    return geo, x, wt, bias_t, dy, tau


def _check_all(geo, x, w, b, dy, tau, mode, dtype, sample_fraction=0.3, split=None, **options):
    rm = threshold_row_mask(w.reshape(w.shape[0], -1), tau)
    ref = reference.row_mask(w, tau)
    assert torch.equal(rm.mask.cpu(), ref.mask.cpu()) and torch.equal(rm.perm.cpu(), ref.perm.cpu())

    y = threshold_conv2d_fwd(x, w, b, rm, geo, **options)
    assert y.dtype == x.dtype
    assert_close(y, reference.threshold_conv2d_forward(x, w, ref.mask, b, geo), dtype, "y")

    # The bias gradient comes from the launch that compacts dY (db_out), where there is a bias.
    db = None if b is None else torch.full_like(b, float("nan"))
    dx, dw, dtau = threshold_conv2d_bwd(dy, x, w, rm, geo, mode=mode, sample_fraction=sample_fraction,
                                        threshold_dtype=tau.dtype, split=split, db_out=db, **options)
    rdx, rdw, rdtau, rdb = reference.threshold_conv2d_backward(
        dy, x, w, ref.mask.to(w.dtype), ref.mask, geo, has_bias=b is not None, mode=mode,
        sample_fraction=sample_fraction
    )
    assert dx.dtype == dw.dtype == dtype and dtau.dtype == tau.dtype
    assert dx.shape == x.shape and dw.shape == w.shape
    assert_close(dx, rdx, dtype, "dx")
    assert_close(dw, rdw, dtype, "dW")
    assert_close(dtau, rdtau, dtype, "dtau")
    if b is not None:
        assert_close(db, rdb.to(dtype), dtype, "db")
    return rm, y, dx, dw, dtau


@pytest.mark.parametrize("name", list(GEOMETRIES))
@pytest.mark.parametrize("density", [0.0, 0.4, 1.0])
def test_every_geometry_matches_reference_fp32(name, density, device):
    _check_all(*_inputs(GEOMETRIES[name], torch.float32, density, device), "exact", torch.float32)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("density", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("split", [None, 3])
def test_backward_modes_and_pixel_splits(mode, density, split, device):
    _check_all(*_inputs(GEOMETRIES["3x3-stride2"], torch.float32, density, device), mode, torch.float32,
               split=split)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("density", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("mode", MODES)
def test_half_precision(dtype, density, mode, device):
    _check_all(*_inputs(GEOMETRIES["3x3-pad1"], dtype, density, device), mode, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["3x3-pad1", "7x7-stride2-pad3"])
def test_channels_last_in_and_out(dtype, name, device):
    rm, y, dx, _, _ = _check_all(*_inputs(GEOMETRIES[name], dtype, 0.4, device, channels_last=True), "exact", dtype)
    # Like F.conv2d: a channels-last input gives channels-last outputs and input gradients.
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    assert dx.is_contiguous(memory_format=torch.channels_last)


def test_strided_views_and_channels_last_weights(device):
    geo, x, w, b, dy, tau = _inputs(GEOMETRIES["3x3-stride2"], torch.float32, 0.4, device)
    x = torch.cat([x, x], dim=3)[..., ::2]  # every other column: no unit stride anywhere
    w = w.to(memory_format=torch.channels_last)
    dy = dy.transpose(2, 3).contiguous().transpose(2, 3)
    assert not (x.is_contiguous() or w.is_contiguous() or dy.is_contiguous())
    _check_all(geo, x, w, b, dy, tau, "exact", torch.float32)
    _, y, dx, _, _ = _check_all(geo, x, w, b, dy, tau, "skip", torch.float32)
    # A channels-last weight makes the output channels-last, as with F.conv2d.
    assert y.is_contiguous(memory_format=torch.channels_last) and dx.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("weight_layout", ["nchw", "channels_last"])
def test_a_one_channel_stem_follows_its_weights_layout(weight_layout, device):
    # One input channel: a weight made channels-last is also "contiguous" by PyTorch's test (the
    # channel dimension has size 1); its channel stride (1, not kh*kw) says which it was made, and
    # the output (and dX, dW) take that layout, so that a channels-last model's activations stay
    # channels-last after its stem. The input's own layout is ambiguous too (NCHW here).
    geo, x, w, b, dy, tau = _inputs(GEOMETRIES["3x3-pad1"], torch.float32, 0.4, device)
    x, w = x[:, :1].contiguous(), w[:, :1].contiguous()
    tau = threshold_for_density(w, 0.4)
    if weight_layout == "channels_last":
        w = w.to(memory_format=torch.channels_last)
        assert w.is_contiguous() and w.stride(1) == 1
    _, y, dx, dw, _ = _check_all(geo, x, w, b, dy, tau, "exact", torch.float32)
    cl = weight_layout == "channels_last"
    assert (y.stride(1) == 1) == cl and y.is_contiguous(memory_format=torch.channels_last if cl
                                                        else torch.contiguous_format)
    assert y.is_contiguous() != cl
    assert dw.stride(1) == (1 if cl else 9)


@pytest.mark.parametrize("compact_weight", [False, True])
@pytest.mark.parametrize("weight_layout", ["nchw", "channels_last"])
def test_both_weight_paths_and_layouts(compact_weight, weight_layout, device):
    # The active filters gathered inside the tile loads, or compacted first; from an NCHW or a
    # channels-last weight (NCHW with the gather reads channels kh*kw apart).
    geo, x, w, b, dy, tau = _inputs(GEOMETRIES["3x3-stride2"], torch.float32, 0.4, device)
    if weight_layout == "channels_last":
        w = w.to(memory_format=torch.channels_last)
    for mode in MODES:
        _, _, _, dw, _ = _check_all(geo, x, w, b, dy, tau, mode, torch.float32, compact_weight=compact_weight,
                                    density_hint=0.4)
        # dW in the weight's layout.
        assert dw.is_contiguous(memory_format=torch.channels_last if weight_layout == "channels_last"
                                else torch.contiguous_format)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pruned_channels_are_exactly_the_bias(dtype, device):
    geo, x, w, b, _, tau = _inputs(GEOMETRIES["3x3-pad1"], dtype, 0.3, device)
    rm = threshold_row_mask(w.reshape(w.shape[0], -1), tau)
    pruned = ~rm.mask
    y = threshold_conv2d_fwd(x, w, b, rm, geo)
    assert torch.equal(y[:, pruned], b[pruned][None, :, None, None].expand(2, -1, 7, 7))
    y0 = threshold_conv2d_fwd(x, w, None, rm, geo)
    assert (y0[:, pruned] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_every_output_element_is_written(dtype, device, poisoned_allocations):
    geo, x, w, b, dy, tau = _inputs(GEOMETRIES["5x5-stride3-pad2"], dtype, 0.3, device)
    rm = threshold_row_mask(w.reshape(w.shape[0], -1), tau)
    assert torch.isfinite(threshold_conv2d_fwd(x, w, None, rm, geo)).all()
    for mode in MODES:
        for split in (1, 2):
            for t in threshold_conv2d_bwd(dy, x, w, rm, geo, mode=mode, split=split):
                assert torch.isfinite(t).all()


def test_filter_tiles_and_their_tail_classes():
    # On the GPU tiles, a filter block covers the layer up to 128 filters, and the block that
    # straddles the active count runs the narrowest power-of-two class that covers its active
    # filters, down to MIN_UNITS (the harness in test_work_count.py measures the work).
    from spafl.kernels import _config
    from spafl.kernels.threshold_conv2d import conv_tiles

    for cfg in (_config._GPU_GEMM_16BIT, _config._GPU_GEMM_FP32):
        assert [conv_tiles(cfg, f, 64).fwd_filters for f in (6, 20, 50, 64, 128, 512)] == [8, 32, 64, 64, 128, 128]
        stem = conv_tiles(cfg, 64, 3)
        assert stem.fwd_channels == 16 and stem.dw_channels == 16
    for block in (8, 16, 32, 64, 128, 256):
        for active in range(0, 3 * block + 1):
            full, rem = divmod(active, block)
            width = _config.covered_units(active, block) - full * block
            if rem == 0:
                assert width == 0
            else:
                assert width >= rem and width in (block, *_config.tail_widths(block).values())
                narrowest = _config.tail_widths(block)["TAIL3"]
                assert width == max(narrowest, 1 << (rem - 1).bit_length()), (block, active)


@pytest.mark.parametrize("mode", MODES)
def test_deterministic_across_runs(mode, device):
    geo, x, w, b, dy, tau = _inputs(GEOMETRIES["3x3-pad1"], torch.float32, 0.4, device)
    rm = threshold_row_mask(w.reshape(w.shape[0], -1), tau)
    runs = [(threshold_conv2d_fwd(x, w, b, rm, geo), *threshold_conv2d_bwd(dy, x, w, rm, geo, mode=mode, split=2))
            for _ in range(2)]
    for a, b_ in zip(*runs, strict=True):
        assert torch.equal(a, b_)


def test_no_dx_and_empty_batch(device):
    geo, x, w, b, dy, tau = _inputs(GEOMETRIES["3x3-pad1"], torch.float32, 0.4, device)
    rm = threshold_row_mask(w.reshape(w.shape[0], -1), tau)
    dx, dw, _ = threshold_conv2d_bwd(dy, x, w, rm, geo, need_dx=False)
    assert dx is None and dw.shape == w.shape
    x0, dy0 = x[:0], dy[:0]
    assert threshold_conv2d_fwd(x0, w, b, rm, geo).shape == (0, 37, 7, 7)
    dx, dw, dtau = threshold_conv2d_bwd(dy0, x0, w, rm, geo)
    assert dx.shape == x0.shape and (dw == 0).all() and (dtau == 0).all()


def test_launchers_reject_bad_operands(device):
    geo, x, w, b, dy, tau = _inputs(GEOMETRIES["3x3-pad1"], torch.float32, 0.4, device)
    rm = threshold_row_mask(w.reshape(w.shape[0], -1), tau)
    with pytest.raises(ValueError, match="channels"):
        threshold_conv2d_fwd(x[:, :4], w, b, rm, geo)
    with pytest.raises(ValueError, match="groups=1"):
        threshold_conv2d_fwd(x, w, b, rm, conv_geometry(3, 1, 1, 1, groups=5))
    with pytest.raises(ValueError, match="kernel"):
        threshold_conv2d_fwd(x, w, b, rm, conv_geometry(5, 1, 2))
    with pytest.raises(ValueError, match="too small"):
        threshold_conv2d_fwd(x[..., :1, :1], w, b, rm, conv_geometry(3))
    with pytest.raises(TypeError, match="float16"):
        threshold_conv2d_fwd(x.half(), w, b, rm, geo)
    with pytest.raises(ValueError, match="grad_y"):
        threshold_conv2d_bwd(dy[..., :3], x, w, rm, geo)
    with pytest.raises(ValueError, match="backward mode"):
        threshold_conv2d_bwd(dy, x, w, rm, geo, mode="fast")
    for split in (0, 65536):
        with pytest.raises(ValueError, match="split"):
            threshold_conv2d_bwd(dy, x, w, rm, geo, split=split)
    with pytest.raises(ValueError, match="no compact index list"):
        threshold_conv2d_fwd(x, w, b, reference.row_mask(w, tau, with_perm=False), geo)
    with pytest.raises(ValueError, match="density_hint"):
        threshold_conv2d_fwd(x, w, b, rm, geo, density_hint=2.0)
    with pytest.raises(ValueError, match="density_hint"):
        threshold_conv2d_bwd(dy, x, w, rm, geo, density_hint=-1.0)
    for db in (torch.empty(36, device=device), torch.empty(37, 2, device=device)[:, 0],
               torch.empty(37, device=device, dtype=torch.int32)):
        with pytest.raises(ValueError, match="db_out"):
            threshold_conv2d_bwd(dy, x, w, rm, geo, db_out=db)


@pytest.mark.parametrize("dy_layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("density", [0.0, 0.4, 1.0])
def test_bias_gradient_from_the_dy_compaction(dy_layout, density, device):
    # The bias gradient is summed by the launch that compacts dY, over every filter (pruned ones
    # included), read along the filters (channels-last dY) or along the pixels (NCHW); fp32 sums
    # rounded once, deterministic (per pixel block, then the blocks in order).
    geo, x, w, b, dy, tau = _inputs(GEOMETRIES["3x3-stride2"], torch.bfloat16, density, device)
    if dy_layout == "channels_last":
        dy = dy.contiguous(memory_format=torch.channels_last)
    rm = threshold_row_mask(w.reshape(w.shape[0], -1), tau)
    dbs = []
    for mode in MODES:
        db = torch.full_like(b, float("nan"))
        threshold_conv2d_bwd(dy, x, w, rm, geo, mode=mode, db_out=db)
        dbs.append(db)
    want = dy.float().sum(dim=(0, 2, 3)).to(torch.bfloat16)
    assert_close(dbs[0], want, torch.bfloat16, "db")
    assert all(torch.equal(d, dbs[0]) for d in dbs)
    # An empty batch: a zero bias gradient.
    db = torch.full_like(b, float("nan"))
    threshold_conv2d_bwd(dy[:0], x[:0], w, rm, geo, db_out=db)
    assert (db == 0).all()


def test_dw_split_fills_the_waves_and_weighs_the_workspace():
    from spafl.kernels._config import bytes_per_mac
    from spafl.kernels.threshold_conv2d import DwShape, _dw_split

    mac_bytes = bytes_per_mac(torch.bfloat16, "conv")

    def resnet(block_c, **kw):
        # ResNet-18's 256-filter 3x3 convolution at 16x16, batch 32, bf16, on 132 SMs: 2 filter
        # blocks of 128, 9 kernel positions x 256 / block_c channel tiles, 64-pixel steps.
        return DwShape(**{**dict(blocks=2, num_kb=9 * 256 // block_c, pixels=8192, block_m=64, block_c=block_c,
                                 block_p=128, fan_in=2304, base_bytes=(1 << 22) + 8192 * 512, mac_bytes=mac_bytes,
                                 programs=132), **kw})

    # 64-channel tiles: 3 splits put one active block on 108 programs (one wave), and write 3
    # fp32 slices of G; 7 would fill the wave as well but write 7.
    assert _dw_split(resnet(64)) == 3
    # 128-channel tiles: 7 splits (126 programs, one wave; 252 at density 1, two).
    assert _dw_split(resnet(128)) == 7
    # Never fewer than 1024 pixels a split (1 below that), never past the grid's axis limit.
    assert _dw_split(resnet(64, pixels=100)) == 1
    assert _dw_split(resnet(64, pixels=2048)) <= 2
    assert 1 <= _dw_split(resnet(64, pixels=1 << 30, base_bytes=1 << 40)) <= 65535


def test_forward_pixel_tile_halves_when_one_filter_block_leaves_sms_idle():
    from spafl.kernels import _config
    from spafl.kernels.threshold_conv2d import conv_tiles

    cfg = _config._GPU_GEMM_16BIT
    assert conv_tiles(cfg, 256, 256, pixels=8192, programs=132).fwd_pixels == cfg.block_m // 2
    assert conv_tiles(cfg, 256, 256, pixels=32768, programs=132).fwd_pixels == cfg.block_m
    assert conv_tiles(cfg, 256, 256).fwd_pixels == cfg.block_m


@pytest.mark.parametrize("mode", ["skip", "exact"])
def test_gpu_tiles_against_the_reference(mode, device):
    # The GPU's tiles in the interpreter: the forward's halved pixel tile (64, as for any layer
    # whose 128-pixel tiles leave SMs idle), 64-channel dW tiles over 64 channels, a pixel split
    # of the dW reduction, the bias gradient from the dY compaction; channels-last as the
    # ResNet benchmarks feed them.
    from spafl.kernels import _config

    geometry = (2, 64, 8, 8, 37, 3, 1, 1, 1)
    geo, x, w, b, dy, tau = _inputs(geometry, torch.bfloat16, 0.4, device, channels_last=True)
    w = w.contiguous(memory_format=torch.channels_last)
    dy = dy.contiguous(memory_format=torch.channels_last)
    with _config.production_tiles():
        for split in (None, 2):
            _check_all(geo, x, w, b, dy, tau, mode, torch.bfloat16, split=split)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("density", [1.0, 0.99])
def test_every_filter_active_reads_channels_last_dy_in_place(density, mode, device, poisoned_allocations):
    # 128 filters and a channels-last dY: dY's [P, F] view has the compacted buffer's layout, so
    # at count == F (density 1) the compaction copies nothing and the GEMMs read dY itself; with
    # one filter pruned (0.99: 127 of 128) they read the copy. Fresh buffers hold NaN here: a
    # GEMM that read the uncopied buffer would show it. Splits of the dW reduction are summed
    # by the dW launch itself, whose tickets are left at 0.
    from spafl.kernels.threshold_conv2d import _dy_in_place
    from spafl.kernels.threshold_linear import split_tickets

    geometry = (1, 5, 6, 5, 128, 3, 1, 1, 1)
    geo, x, w, b, dy, tau = _inputs(geometry, torch.bfloat16, density, device, channels_last=True)
    dy = dy.contiguous(memory_format=torch.channels_last)
    assert _dy_in_place(dy)
    assert not _dy_in_place(dy.contiguous()) and not _dy_in_place(dy[:, :127])
    for bias in (b, None):
        for split in (1, 3):
            rm = _check_all(geo, x, w, bias, dy, tau, mode, torch.bfloat16, split=split)[0]
            assert int(rm.count) == round(density * 128)
            assert (split_tickets(x.device, 1) == 0).all()
