"""Where the Triton path's host time goes: the pieces of one ``ThresholdLinear(256, 256)`` bf16
forward (skip mode, ``check_finite=False``, 128 rows, the layer of ``host_time.py``) timed apart
(the kept call's prepared launches, and the launchers of the general call),
with its kernels' launches stubbed (``host_time.stubbed_launches``), beside what any layer of
this design pays (a module call, an autograd Function that allocates and saves as this one does,
three allocations) and ``nn.Linear(64, 10)``'s forward at batch 8, the yardstick of
``host_time.py``. One thread, every piece interleaved with the others; medians with p20-p80.

Writes ``<out>/<label>.md`` (never overwriting). Sets ``TRITON_INTERPRET=1`` for itself.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _pieces():
    import host_time as ht
    import torch

    import spafl
    from spafl._functions import _C_APPLY, ThresholdLinearFunction, _Triton
    from spafl.kernels import threshold_linear_fwd
    from spafl.kernels import threshold_mask as tm

    class _Bare(torch.autograd.Function):
        # What the layer's Function does besides computing: allocate y and z, save five tensors;
        # its backward allocates the four gradients autograd then accumulates.
        @staticmethod
        def forward(ctx, x, w, tau, b, mask, perm, count):
            ctx.save_for_backward(x, w, mask, perm, count)
            ctx.z = torch.empty(x.shape[0], w.shape[0])
            return torch.empty(x.shape[0], w.shape[0], dtype=x.dtype)

        @staticmethod
        def backward(ctx, grad):
            x, w, *_ = ctx.saved_tensors
            return (torch.empty_like(x), torch.empty_like(w), torch.empty(w.shape[0]), torch.empty_like(w[:, 0]),
                    None, None, None)

    class _Identity(torch.nn.Module):
        def forward(self, x):
            return x

    torch.manual_seed(0)
    layer = spafl.ThresholdLinear(256, 256, backend="triton", backward_mode="skip", check_finite=False,
                                  dtype=torch.bfloat16)
    x = torch.randn(128, 256, dtype=torch.bfloat16, requires_grad=True)
    weight, tau, bias, counter, previous = layer._call_tensors()
    options = layer.options
    row_mask = tm.guarded_row_mask(weight, tau.detach(), options.collapse_density, False, previous, counter)
    bare = super(torch.autograd.Function, _Bare).apply
    identity = _Identity()
    dense, xd = torch.nn.Linear(64, 10), torch.randn(8, 64)
    dy = torch.randn(128, 256, dtype=torch.bfloat16)
    params = [x, *layer.parameters()]
    layer(x)
    layer(x)  # (the kept Triton call and its prepared launches)
    call = layer.__dict__["_device_call"]
    prepared = next(v for v in call.prepared.values() if v)
    bare_tensors = [t.detach().requires_grad_(t.is_floating_point()) for t in (x, weight, tau, bias)]

    def layer_fwd_bwd():
        for p in params:
            p.grad = None
        layer(x).backward(dy)

    def bare_fwd_bwd():
        for p in bare_tensors:
            p.grad = None
        bare(*bare_tensors, *row_mask[:3]).backward(dy)

    def allocations():
        torch.empty(256, dtype=torch.bool)
        torch.empty(256, dtype=torch.int32)
        torch.empty(1, dtype=torch.int32)

    return ht, {
        "layer forward": lambda: layer(x),
        "layer forward + backward": layer_fwd_bwd,
        "prepared row mask (the kept call's)": prepared.row_mask,
        "autograd Function on the prepared launches": lambda: _C_APPLY[ThresholdLinearFunction](
            x, weight, tau, bias, row_mask, prepared, options),
        "prepared forward with z": lambda: prepared.linear_forward(x, weight, bias, row_mask, options, keep_z=True),
        "row mask with the guard (launcher)": lambda: tm.guarded_row_mask(weight, tau.detach(),
                                                                          options.collapse_density, False, previous,
                                                                          counter),
        "autograd Function (its forward and launch)": lambda: _C_APPLY[ThresholdLinearFunction](
            x, weight, tau, bias, row_mask, "triton", options),
        "_Triton.linear_forward": lambda: _Triton.linear_forward(x, weight, bias, row_mask, options, keep_z=True),
        "forward launcher (threshold_linear_fwd)": lambda: threshold_linear_fwd(x, weight, bias, row_mask),
        "floor: a module call": lambda: identity(x),
        "floor: a Function allocating two, saving five": lambda: bare(x, weight, tau, bias, *row_mask[:3]),
        "floor: three allocations": allocations,
        "floor: that Function, forward + backward with four gradients": bare_fwd_bwd,
        "nn.Linear(64, 10) forward": lambda: dense(xd),
    }


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(HERE))
    from host_time import interpreted

    interpreted(__file__, argv)
    import platform

    import torch
    from _common import command_line, environment, parser_for, timestamp

    p = parser_for(__doc__)
    p.add_argument("--label", required=True, help="names the output file: <out>/<label>.md")
    p.add_argument("--out", default=str(HERE / "results" / "host-time"), help="output folder")
    p.add_argument("--reps", type=int, default=15, help="interleaved repetitions (samples per piece)")
    p.add_argument("--min-sample-ms", type=float, default=20.0, help="length of one sample")
    args = p.parse_args(argv)
    path = Path(args.out) / f"{args.label}.md"
    if path.exists():
        p.error(f"{path} exists; choose another --label")
    torch.set_num_threads(1)
    ht, pieces = _pieces()
    with ht.stubbed_launches():
        t = ht.interleaved_us(pieces, reps=args.reps, min_sample_ms=args.min_sample_ms)
    env = environment(torch.device("cpu"))
    unit = ht.quantiles(t["nn.Linear(64, 10) forward"])[0]
    lines = [f"# Host time pieces: {args.label}", "",
             f"`{command_line(__file__, argv)}`, {timestamp()}; {env['device']} ({platform.platform()}), torch "
             f"{env['torch']}, triton {env['triton']}, Python {env['python']}; one thread, {args.reps} interleaved "
             "repetitions, thread clock, launches stubbed (each piece includes its stubbed launches, about 1 us "
             f"each); load average {' '.join(f'{v:.1f}' for v in os.getloadavg())} (shared machine: read the "
             "last column).", "",
             "| piece | median us (p20-p80) | in nn.Linear forwards |", "|---|---|---|"]
    for name, samples in t.items():
        q = ht.quantiles(samples)
        lines.append(f"| {name} | {q[0]:.1f} ({q[1]:.1f}-{q[2]:.1f}) | {q[0] / unit:.2f} |")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path.open("x").write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
