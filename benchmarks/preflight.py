"""Preflight of benchmarks/run_gpu.sh: is this machine able to run the GPU set at all?

    python benchmarks/preflight.py            # on the GPU machine (about 20 s, most of it compiles)
    python benchmarks/preflight.py --cpu      # the same checks in Triton's interpreter (CI smoke run)

Checks, in order, each printed as one ``ok`` line: the Python interpreter; PyTorch, and (unless
``--cpu``) a CUDA device of compute capability 8.0 or newer; Triton and its version (3.6 and 3.9
are the versions the kernels are checked under); ``spafl`` and ``spafl.kernels`` importable
from this checkout (not from another installed copy); then one small case of every kernel
family (the fused row mask, Linear forward and backward, Conv2d forward and backward) against
the reference implementation. The first failing check prints ONE line, ``preflight failed:
...``, and the exit status is 1, so that the calling script stops before spending its slot.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

TREE = Path(__file__).resolve().parent.parent
TESTED_TRITON = ("3.6", "3.9")


class Failed(Exception):
    pass


_checking = True  # off while the kernels only compile (their outputs are garbage then)


def _check(condition: bool, message: str) -> None:
    if _checking and not condition:
        raise Failed(message)


def _close(name: str, got, want, tol: float) -> None:
    import torch

    _check(got.shape == want.shape, f"{name}: shape {tuple(got.shape)}, reference {tuple(want.shape)}")
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    _check(bool(torch.isfinite(got).all()), f"{name}: non-finite values")
    scale = max(float(want.abs().max()) if want.numel() else 0.0, 1.0)
    err = float((got - want).abs().max()) if want.numel() else 0.0
    _check(err <= tol * scale, f"{name}: max error {err:.3g} > {tol * scale:.3g} against the reference")


def kernel_cases(device: str) -> list[tuple[str, object]]:
    """One small case per kernel family, checked against ``spafl.reference``: bf16 on the GPU
    (the benchmarks' dtype: 16-bit tensor-core dots), fp32 in the interpreter."""
    import torch

    from spafl import reference, threshold_for_density
    from spafl._conv import conv_geometry
    from spafl.kernels import (
        threshold_conv2d_bwd,
        threshold_conv2d_fwd,
        threshold_linear_bwd,
        threshold_linear_fwd,
        threshold_row_mask,
    )

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tol = 3e-2 if dtype == torch.bfloat16 else 2e-5
    g = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    def row_mask():
        w = rand(96, 48)
        tau = threshold_for_density(w, 0.5)
        rm, ref = threshold_row_mask(w, tau), reference.row_mask(w, tau)
        _check(torch.equal(rm.mask.cpu(), ref.mask.cpu()) and torch.equal(rm.perm.cpu(), ref.perm.cpu())
               and torch.equal(rm.count.cpu(), ref.count.cpu()), "row mask: mask / perm / count differ")

    def linear():
        x, w, b, dy = rand(64, 80), rand(96, 80, scale=0.1), rand(96), rand(64, 96)
        tau = threshold_for_density(w, 0.5)
        rm, ref = threshold_row_mask(w, tau), reference.row_mask(w, tau)
        _close("linear y", threshold_linear_fwd(x, w, b, rm), reference.threshold_linear_forward(x, w, ref.mask, b),
               tol)
        got = threshold_linear_bwd(dy, x, w, rm, mode="exact", threshold_dtype=tau.dtype)
        want = reference.threshold_linear_backward(dy, x, w, ref.mask.to(dtype), ref.mask, has_bias=False,
                                                   mode="exact")
        for name, a, e in zip(("dx", "dW", "dtau"), got, want[:3], strict=True):
            _close(f"linear {name}", a, e, tol)

    def conv():
        geo = conv_geometry(3, 1, 1)
        x, w, dy = rand(2, 16, 8, 8), rand(32, 16, 3, 3, scale=0.1), rand(2, 32, 8, 8)
        if device == "cuda":
            x = x.to(memory_format=torch.channels_last)
        tau = threshold_for_density(w, 0.5)
        rm, ref = threshold_row_mask(w.reshape(32, -1), tau), reference.row_mask(w, tau)
        _close("conv y", threshold_conv2d_fwd(x, w, None, rm, geo),
               reference.threshold_conv2d_forward(x, w, ref.mask, None, geo), tol)
        got = threshold_conv2d_bwd(dy, x, w, rm, geo, mode="exact", threshold_dtype=tau.dtype)
        want = reference.threshold_conv2d_backward(dy, x, w, ref.mask.to(dtype), ref.mask, geo, has_bias=False,
                                                   mode="exact")
        for name, a, e in zip(("dx", "dW", "dtau"), got, want[:3], strict=True):
            _close(f"conv {name}", a, e, tol)

    return [("row mask", row_mask), ("linear fwd+bwd", linear), ("conv2d fwd+bwd", conv)]


def _compile_in_parallel(cases) -> None:
    """Compile the cases' kernels on every core first (benchmarks/warmup.py's compile-only
    launches), so that the checks then run compiled kernels; on any trouble the checks compile
    them one by one instead."""
    global _checking
    t = time.perf_counter()
    _checking = False
    try:
        from warmup import compile_only

        with compile_only(os.cpu_count() or 1):
            for _, case in cases:
                case()
    except Exception as exc:
        print(f"note parallel compile skipped ({type(exc).__name__}: {exc}); compiling one by one", flush=True)
    else:
        print(f"ok   kernels compiled ({time.perf_counter() - t:.1f} s)", flush=True)
    finally:
        _checking = True


def run(cpu: bool) -> None:
    t0 = time.perf_counter()
    print(f"ok   python {sys.version.split()[0]} at {sys.executable}", flush=True)
    try:
        import torch
    except ImportError as exc:
        raise Failed(f"PyTorch does not import in {sys.executable}: {exc}") from None
    if cpu:
        _check(os.environ.get("TRITON_INTERPRET") == "1", "--cpu needs TRITON_INTERPRET=1 in the environment")
        device = "cpu"
        print(f"ok   torch {torch.__version__} (CPU run: the kernels run in Triton's interpreter)", flush=True)
    else:
        _check(torch.version.cuda is not None, f"torch {torch.__version__} is a CPU-only build")
        _check(torch.cuda.is_available(), f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device")
        cap = torch.cuda.get_device_capability(0)
        _check(cap >= (8, 0),
               f"{torch.cuda.get_device_name(0)} is sm_{cap[0]}{cap[1]}: the kernels need sm_80 or newer")
        device = "cuda"
        print(f"ok   torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)} "
              f"(sm_{cap[0]}{cap[1]})", flush=True)
    try:
        import triton
    except ImportError as exc:
        raise Failed(f"Triton does not import: {exc}") from None
    version = ".".join(triton.__version__.split(".")[:2])
    note = "" if version in TESTED_TRITON else f" (not a checked version: {' and '.join(TESTED_TRITON)} are)"
    print(f"ok   triton {triton.__version__}{note}", flush=True)
    try:
        import spafl
        import spafl.kernels
    except Exception as exc:
        raise Failed(f"spafl does not import: {type(exc).__name__}: {exc}") from None
    staged = os.environ.get("SPAFL_STAGED")  # run_gpu.sh's copy of this checkout
    roots = [TREE] + ([Path(staged).resolve()] if staged else [])
    for module in (spafl, spafl.kernels):
        where = Path(module.__file__).resolve()
        _check(any(root in where.parents for root in roots),
               f"{module.__name__} imports from {where.parent}, not from this checkout ({TREE})")
    print(f"ok   spafl {spafl.__version__} from {Path(spafl.__file__).parent}", flush=True)
    cases = kernel_cases(device)
    if device == "cuda":
        _compile_in_parallel(cases)
    for name, case in cases:
        t = time.perf_counter()
        try:
            case()
        except Failed:
            raise
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise Failed(f"{name} kernel: {type(exc).__name__}: {first}") from None
        if device == "cuda":
            torch.cuda.synchronize()
        print(f"ok   {name} kernels match the reference ({time.perf_counter() - t:.1f} s)", flush=True)
    print(f"preflight passed in {time.perf_counter() - t0:.1f} s", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="no CUDA device: run the kernels in Triton's interpreter")
    args = p.parse_args(argv)
    try:
        run(args.cpu)
    except Failed as exc:
        print(f"preflight failed: {exc}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
