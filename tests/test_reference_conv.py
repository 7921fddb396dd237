"""The Conv2d reference against the spec's formulas, written out independently of it."""

import pytest
import torch
import torch.nn.functional as F

from spafl import reference, threshold_for_density
from spafl._conv import conv_geometry

# The tests use PyTorch's own padding="same" as the independent check of ours.
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same'")

# (kernel, stride, padding, dilation, groups)
GEOMETRIES = [
    (3, 1, 1, 1, 1),
    (3, 2, 1, 1, 1),
    ((3, 5), (2, 1), (0, 2), (2, 1), 1),
    (2, 1, "same", 1, 1),  # odd total padding: the extra row / column goes after
    (3, 1, "valid", 1, 2),
    (1, 1, 0, 1, 1),
]


def _problem(geometry, b=2, c=4, h=7, w=6, f=6, density=0.5, seed=0):
    kernel, stride, padding, dilation, groups = geometry
    geo = conv_geometry(kernel, stride, padding, dilation, groups)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, h, w, generator=g, dtype=torch.float64)
    wt = torch.randn(f, c // groups, *geo.kernel, generator=g, dtype=torch.float64)
    bias = torch.randn(f, generator=g, dtype=torch.float64)
    tau = threshold_for_density(wt, density)
    y = F.conv2d(x, wt, None, geo.stride, geo.padding, geo.dilation, geo.groups)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    return geo, x, wt, bias, tau, dy


def _grad_w_hat(geo, x, w_hat, dy):
    # dL/dW_hat from im2col written out: G[f] = sum over pixels of dy[b, f, p] * Xcol[b, :, p].
    assert geo.groups == 1
    (t, le), (bo, ri) = geo.pad_begin, geo.pad_end
    xp = F.pad(x, (le, ri, t, bo))
    cols = F.unfold(xp, geo.kernel, dilation=geo.dilation, stride=geo.stride)  # [B, C*kh*kw, L]
    g = torch.einsum("bfl,bkl->fk", dy.flatten(2), cols)
    return g.reshape(w_hat.shape)


@pytest.mark.parametrize("geometry", [g for g in GEOMETRIES if g[4] == 1], ids=str)
def test_backward_matches_the_spec_formulas_written_out(geometry):
    geo, x, w, b, tau, dy = _problem(geometry)
    mask = reference.row_mask(w, tau).mask
    m = mask.double()
    dx, dw, dtau, db = reference.threshold_conv2d_backward(dy, x, w, m, mask, geo, has_bias=True)
    g = _grad_w_hat(geo, x, w * m[:, None, None, None], dy)
    r = (g * w).flatten(1).sum(1)
    fan_in = w[0].numel()
    torch.testing.assert_close(dtau, -r)
    torch.testing.assert_close(dw, m[:, None, None, None] * g + torch.sign(w) * (r / fan_in)[:, None, None, None])
    torch.testing.assert_close(db, dy.sum((0, 2, 3)))
    assert (~mask).any() and (r[~mask].abs() > 0).all()
    # dx: the forward is linear in x, so dx = J^T dy is checked through the adjoint identity.
    v = torch.randn_like(x)
    y_v = reference.threshold_conv2d_forward(v, w, mask, None, geo)
    torch.testing.assert_close((dx * v).sum(), (dy * y_v).sum())


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_backward_equals_autograd_of_the_straight_through_surrogate(geometry):
    geo, x, w, b, tau, dy = _problem(geometry)
    mask = reference.row_mask(w, tau).mask
    dx, dw, dtau, db = reference.threshold_conv2d_backward(dy, x, w, mask.double(), mask, geo, has_bias=True)
    xs, ws, taus, bs = (t.clone().requires_grad_() for t in (x, w, tau, b))
    gap = ws.abs().flatten(1).mean(1) - taus
    mult = (gap > 0).double() + gap - gap.detach()
    y = F.conv2d(xs, ws * mult[:, None, None, None], bs, geo.stride, geo.padding, geo.dilation, geo.groups)
    torch.testing.assert_close(y, reference.threshold_conv2d_forward(x, w, mask, b, geo))
    y.backward(dy)
    for got, want, name in ((dx, xs.grad, "dx"), (dw, ws.grad, "dW"), (dtau, taus.grad, "dtau"), (db, bs.grad, "db")):
        torch.testing.assert_close(got, want, msg=name)


def test_skip_and_sample_modes():
    geo, x, w, b, tau, dy = _problem(GEOMETRIES[1], b=4, density=0.4)
    mask = reference.row_mask(w, tau).mask
    m = mask.double()

    def run(mode, fraction=0.125):
        return reference.threshold_conv2d_backward(dy, x, w, m, mask, geo, has_bias=True, mode=mode,
                                                   sample_fraction=fraction)

    exact, skip = run("exact"), run("skip")
    assert (skip[2][~mask] == 0).all() and (skip[1][~mask] == 0).all()
    torch.testing.assert_close(skip[1][mask], exact[1][mask])
    torch.testing.assert_close(skip[0], exact[0])
    for a, e in zip(run("sample", 1.0), exact, strict=True):
        torch.testing.assert_close(a, e)
    # fraction 0.25 of the 4*4*3 = 48 output pixels: every 4th flattened (b, oh, ow) pixel, x4.
    part = run("sample", 0.25)
    keep = torch.zeros(48, dtype=torch.double)
    keep[::4] = 1
    g_s = _grad_w_hat(geo, x, w, dy * keep.view(4, 1, 4, 3))
    r_est = (g_s * w).flatten(1).sum(1) * 4
    torch.testing.assert_close(part[2][~mask], -r_est[~mask])
    torch.testing.assert_close(part[2][mask], exact[2][mask])


def test_no_dx_when_not_needed_and_half_inputs_compute_in_fp32():
    geo, x, w, b, tau, dy = _problem(GEOMETRIES[0])
    mask = reference.row_mask(w, tau).mask
    out = reference.threshold_conv2d_backward(dy, x, w, mask.double(), mask, geo, has_bias=False, need_dx=False)
    assert out[0] is None and out[3] is None
    y = reference.threshold_conv2d_forward(x.half(), w.half(), mask, None, geo)
    assert y.dtype == torch.float16


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"stride": 0}, "stride must be >= 1"),
        ({"padding": -1}, "padding must be >= 0"),
        ({"padding": "full"}, "padding must be an int"),
        ({"padding": "same", "stride": 2}, "not supported for strided"),
        ({"dilation": (1, 2, 3)}, "dilation must be an int or a pair"),
        ({"groups": 0}, "groups must be a positive integer"),
        ({"stride": 1.5}, "stride must be an int"),
    ],
)
def test_geometry_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        conv_geometry(3, **kwargs)


def test_same_padding_matches_pytorch_for_even_kernels():
    geo = conv_geometry((4, 2), 1, "same", (1, 3))
    assert geo.pad_begin == (1, 1) and geo.pad_end == (2, 2)
    assert geo.output_size(9, 8) == (9, 8)
    assert conv_geometry(3, 2, 1).output_size(7, 8) == (4, 4)
