"""The work-count harness: pruned units cost no tensor-core work and move no bytes.

Counts come from Triton's interpreter with the GPU tile sizes (tests/work_count.py). For each
layer below, at densities 1, 0.5, 0.25, 0.1 and 0, the forward, dX and the weight gradient in
every backward mode must issue exactly the tensor-core work the tiling predicts (at most the
active units rounded up to one tile; exact mode's pruned-row gradient is the documented dense
part), and the operands indexed by the pruned dimension must move bytes in exact proportion
to the active units. ``python tests/work_count.py`` runs every layer of the federated models
and the benchmark's ResNet-18 and prints the table recorded in benchmarks/NOTES.md.
"""

import pytest
import torch
import triton
import triton.language as tl
import work_count as wc

pytestmark = pytest.mark.interpreter

# One layer per distinct way the tiling can fall: fewer units than the narrowest tile (10), one
# partial block (20, 64), several blocks with a tail (500, 512), strided, 1x1 and 5x5 geometry.
CI_LAYERS = ["lenet5.fc4", "lenet5.fc3", "conv4.dense2", "lenet5.conv1", "resnet18.stage1.conv1",
             "resnet18.stage2.shortcut", "resnet18-bench.stage4.conv2"]
SIZE = wc.HarnessSize(rows=128, images=2)


def _layer(name):
    return next(layer for layer in wc.LAYERS if layer.name == name)


@triton.jit
def _probe_kernel(a_ptr, b_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    a = tl.load(a_ptr + offs[:, None] * BLOCK + offs[None, :], mask=(offs < n)[:, None], other=0.0)
    b = tl.load(b_ptr + offs[:, None] * BLOCK + offs[None, :])
    c = tl.dot(a, b)
    tl.store(out_ptr + offs[:, None] * BLOCK + offs[None, :], c, mask=(offs < n)[None, :] & (offs < 3)[:, None])


def test_counter_counts_what_a_kernel_issues():
    a, b = torch.randn(16, 16), torch.randn(16, 16)
    out = torch.zeros(16, 16)
    with wc.WorkCounter() as counter:
        _probe_kernel[(2,)](a, b, out, 5, BLOCK=16)
    work = counter.kernels["_probe_kernel"]
    assert (work.launches, work.programs) == (1, 2)
    assert work.macs == 2 * 16 * 16 * 16  # issued: the full tile, masked rows included
    assert work.arg_bytes("a_ptr") == 2 * 5 * 16 * 4  # moved: only unmasked lanes
    assert work.arg_bytes("b_ptr") == 2 * 16 * 16 * 4
    assert work.arg_bytes("out_ptr", stored=True) == work.store_bytes == 2 * 3 * 5 * 4
    torch.testing.assert_close(out[:3, :5], (a @ b)[:3, :5])
    assert not out[3:].any() and not out[:, 5:].any()


@pytest.mark.parametrize("name", CI_LAYERS)
def test_work_follows_the_density(name):
    result = wc.measure(_layer(name), size=SIZE)
    assert result.active == {d: round(d * result.layer.units) for d in wc.DENSITIES}
    violations = wc.check(result)
    assert not violations, "\n".join(violations) + "\n" + wc.table([result])
    # The ops that skip pruned units issue nothing at density 0.
    for op, mode in (("fwd", ""), ("dx", ""), ("dw", "skip"), ("dy", "exact")):
        assert result.work[(op, mode)][0.0].macs == result.work[(op, mode)][0.0].load_bytes == 0


def test_fractions_do_not_depend_on_the_shrunken_dimensions():
    layer = _layer("resnet18.stage2.conv1")
    small = wc.measure(layer, densities=(1.0, 0.25), modes=("exact", "skip"), size=SIZE)
    other = wc.measure(layer, densities=(1.0, 0.25), modes=("exact", "skip"),
                       size=wc.HarnessSize(images=3, channels=24, pixels=5))
    assert small.work[("fwd", "")][1.0].macs != other.work[("fwd", "")][1.0].macs
    for key in (("fwd", ""), ("dx", ""), ("dw", "skip"), ("dw", "exact")):
        assert small.fraction(*key, 0.25) == pytest.approx(other.fraction(*key, 0.25), abs=1e-12), key


def test_channels_last_layers_issue_the_same_work_without_a_weight_copy():
    layer = _layer("resnet18.stage1.conv1")
    nchw = wc.measure(layer, densities=(1.0, 0.1), modes=("skip",), size=SIZE)
    cl = wc.measure(layer, densities=(1.0, 0.1), modes=("skip",), size=SIZE, channels_last=True)
    assert ("w", "") in nchw.work and ("w", "") not in cl.work  # NCHW weights: active filters compacted
    for key in (("fwd", ""), ("dx", ""), ("dw", "skip")):
        assert nchw.fraction(*key, 0.1) == cl.fraction(*key, 0.1)
        assert nchw.work[key][1.0].macs == cl.work[key][1.0].macs
    assert not wc.check(cl, modes=("skip",))
