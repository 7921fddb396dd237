"""Compile every kernel the GPU set will launch, once each, in parallel, before anything is timed.

    python benchmarks/warmup.py [--jobs N] [--smoke]

One process walks what benchmarks/run_gpu.sh runs later (the kernel benchmark cases, every
distinct threshold layer of the end-to-end models, the large Linear case with every autotune
candidate and with the compacted weight) with each Triton launch turned into a compile-only
``warmup`` launch (``JITFunction.run(..., warmup=True)``: Triton's own specialisation and cache
key, so the later runs find these compiles in Triton's on-disk cache), inside Triton's
``AsyncCompileMode``: each distinct specialisation is compiled once, on ``--jobs`` threads
(the compiler passes and ptxas run outside the GIL). No kernel runs, so the tensors the
launchers produce hold garbage; nothing on this path reads them on the host.

``--smoke`` (CPU, ``TRITON_INTERPRET=1``): the interpreter compiles nothing; the walk runs the
benchmarks' smoke cases once, which checks this script's own code paths.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Iterator

import torch

import spafl
from kernels import SUITES, Bench, runner
from spafl.kernels import _config

DENSITIES = (1.0, 0.5, 0.1)


@contextlib.contextmanager
def compile_only(jobs: int) -> Iterator[dict]:
    """Within this block every Triton launch only compiles (once per specialisation, on ``jobs``
    threads); the dict counts the launches seen."""
    from concurrent.futures import ThreadPoolExecutor

    import triton
    from triton.runtime.jit import JITFunction

    seen = {"launches": 0}
    run = JITFunction.run

    def warm(self, *args, grid, warmup, **kwargs):
        seen["launches"] += 1
        return run(self, *args, grid=grid, warmup=True, **kwargs)

    JITFunction.run = warm
    try:
        with ThreadPoolExecutor(jobs) as pool, triton.AsyncCompileMode(pool):
            yield seen
    finally:
        JITFunction.run = run


def bench_cases(suites: list[str], names: list[str] | None, dtype: torch.dtype, device: torch.device,
                densities=DENSITIES, providers=("spafl-exact", "spafl-skip"), ops=("fwd", "fwd+bwd")) -> int:
    """Run each provider of each case once per density and op; returns the cases walked."""
    done = 0
    for suite in suites:
        for case in SUITES[suite]:
            if names is not None and case.name not in names:
                continue
            bench = Bench(case, dtype, device, sets=1)
            for density in densities:
                table = bench.providers(density)
                for name in providers:
                    for op in ops:
                        runner(bench, *table[name][:3], op)()
            done += 1
    return done


def e2e_models(models: list[str], device: torch.device) -> int:
    """One training step of each end-to-end model on the default backend at density 0.5, as
    benchmarks/e2e.py runs them (fp32, TF32 allowed)."""
    import torch.nn.functional as F
    from e2e import MODELS, set_density

    from spafl.federated.models import build_model

    for name in models:
        shape, batch = MODELS[name]
        model = build_model(name, 10, backend="auto", collapse_density=None).to(device)
        set_density(model, 0.5)
        x = torch.randn(batch, *shape, device=device)
        y = torch.randint(0, 10, (batch,), device=device)
        model.train()
        F.cross_entropy(model(x), y).backward()
    return len(models)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=min(os.cpu_count() or 1, 16), help="compile threads")
    p.add_argument("--smoke", action="store_true", help="CPU, interpreter: the smoke cases only")
    p.add_argument("--large-case", default="large-8192x4096x4096",
                   help="the Linear case run_gpu.sh also times with autotuning and with the compacted weight")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs must be at least 1, got {args.jobs}")
    t0 = time.perf_counter()
    if args.smoke:
        n = bench_cases(["smoke"], None, torch.float32, torch.device("cpu"), densities=(0.5,))
        print(f"warm-up (smoke, interpreter): {n} cases walked in {time.perf_counter() - t0:.1f} s", flush=True)
        return 0
    if not torch.cuda.is_available():
        p.error("no CUDA device (use --smoke on a CPU)")
    # As benchmarks/kernels.py and e2e.py set them: they choose the fp32 dots' precision.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    device = torch.device("cuda")
    steps = [
        ("benchmark cases", lambda: bench_cases(["large", "federated", "resnet18"], None, torch.bfloat16, device)),
        ("end-to-end models", lambda: e2e_models(["lenet5", "conv4", "resnet18", "vit"], device)),
    ]
    with _config.fixed_configs(), compile_only(args.jobs) as seen:
        for label, step in steps:
            t = time.perf_counter()
            n = step()
            print(f"walked {n} {label}: {seen['launches']} launches so far ({time.perf_counter() - t:.1f} s)",
                  flush=True)
        with _config.every_candidate():
            bench_cases(["large"], [args.large_case], torch.bfloat16, device, providers=("spafl-skip",))
        os.environ["SPAFL_COMPACT_WEIGHT"] = "always"
        bench_cases(["large"], [args.large_case], torch.bfloat16, device, providers=("spafl-skip",))
        print(f"walked the autotune candidates and the compacted weight: {seen['launches']} launches; "
              f"waiting for the compiles ({args.jobs} threads)", flush=True)
    torch.cuda.synchronize()
    print(f"warm-up done in {time.perf_counter() - t0:.1f} s (spafl {spafl.__version__})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
