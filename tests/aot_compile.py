"""Compile the kernels exactly as the launchers launch them, ahead of time for sm_90, without a GPU.

Run as a script (``test_kernels_compile.py`` runs it in a subprocess, because
``TRITON_INTERPRET=1`` replaces the kernels with interpreted functions at import time).

Each case calls the public launchers on CPU tensors of a realistic shape with Triton's launch
replaced by a recorder (``JITFunction.run``), under the fixed GPU configurations. Every recorded
launch is then specialised the way Triton's launcher specialises it (an integer equal to 1
becomes a constant, integers and pointers divisible by 16 carry ``tt.divisibility = 16``:
``native_specialize_impl``, Triton's own rule) and compiled for ``cuda:90`` with the ptxas that
Triton ships. Aligned cases (sizes that are multiples of 16: the benchmarks' shapes) get the
vectorised, ``cp.async``-pipelined code; ragged cases (odd sizes) show what the GPU runs when no
divisibility is known.

For each compile the report gives shared memory, registers and stack frame (``cuobjdump
-res-usage``), local-memory instructions (LDL/STL: spill traffic), ``wgmma`` and ``cp.async``
counts (PTX), and for the innermost loop that holds matrix instructions (SASS): its instruction
count, how many are matrix instructions (HGMMA, HMMA, or FFMA for IEEE fp32), local-memory
accesses and ``LDGSTS`` (cp.async). ``--check`` fails on any spill (a local-memory load or store)
in the GEMM kernels (``MAIN_KERNELS``).

Usage: python tests/aot_compile.py [--arch 90] [-k SUBSTRING] [--check] [--json FILE] [--markdown]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is its default

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import BaseBackend, GPUTarget  # noqa: E402
from triton.runtime.jit import JITFunction, native_specialize_impl  # noqa: E402

from spafl import kernels  # noqa: E402
from spafl._conv import conv_geometry  # noqa: E402
from spafl.kernels import _config  # noqa: E402

# Kernels whose main loop is a GEMM: the compile test fails on any spill in them.
MAIN_KERNELS = ("_threshold_linear_fwd_kernel", "_threshold_linear_bwd_dx_kernel", "_threshold_linear_bwd_dw_kernel",
                "_threshold_conv2d_fwd_kernel", "_threshold_conv2d_bwd_dx_kernel", "_threshold_conv2d_bwd_dw_kernel")

# Kernels that must compile without local-memory spills (--check).
SPILL_CHECKED = (*MAIN_KERNELS, "_threshold_linear_bwd_kernel", "_fused_step_kernel", "_conv_compact_dy_kernel")


@dataclass
class Launch:
    kernel: JITFunction
    args: tuple
    kwargs: dict


@contextlib.contextmanager
def recording():
    """Within this block, kernel launches are recorded instead of run."""
    launches: list[Launch] = []
    run = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, kwargs))

    JITFunction.run = record
    try:
        with _config.fixed_configs():
            yield launches
    finally:
        JITFunction.run = run


def specialise(launch: Launch) -> tuple[dict, dict, dict, dict]:
    """``(signature, constexprs, attrs, options)`` of a recorded launch, specialised by Triton's
    own rule (``native_specialize_impl``: integers equal to 1 become constants; integers and
    data pointers divisible by 16 carry ``tt.divisibility = 16``)."""
    fn = launch.kernel
    kwargs = dict(launch.kwargs)
    options = {"num_warps": kwargs.pop("num_warps", 4), "num_stages": kwargs.pop("num_stages", 3)}
    values = dict(zip(fn.arg_names, launch.args, strict=False))
    values.update(kwargs)
    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(fn.params):
        value = values[param.name] if param.name in values else param.default  # (a defaulted constexpr)
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
            continue
        ty, key = native_specialize_impl(BaseBackend, value, False, not param.do_not_specialize,
                                         not param.do_not_specialize_on_alignment)
        if ty == "constexpr":
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
            continue
        signature[param.name] = ty
        if isinstance(key, str) and key:
            attrs[(index,)] = BaseBackend.parse_attr(key)
    return signature, constexprs, attrs, options


# ----------------------------------------------------------------------------- cases


def _row_mask(w: torch.Tensor):
    from spafl import threshold_for_density

    return kernels.threshold_row_mask(w.reshape(w.shape[0], -1), threshold_for_density(w.float(), 0.5).to(w.dtype))


def _pending_guard(rm, n: int, dtype: torch.dtype):
    """``rm`` with a fused step's collapse-guard writes pending (the forward's program 0 makes them)."""
    from spafl.kernels.threshold_mask import pending_guard_writes

    return rm._replace(guard=pending_guard_writes(torch.zeros(n, dtype=dtype), torch.ones(1, dtype=torch.bool),
                                                  rm.count, torch.ones(()), torch.zeros((), dtype=torch.long)))


def linear_case(dtype: torch.dtype, m: int, n: int, k: int, modes=("exact", "skip", "sample"), bias=True):
    def run():
        x, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
        dy = torch.randn(m, n, dtype=dtype)
        rm = _row_mask(w)
        kernels.threshold_linear_fwd(x, w, torch.randn(n, dtype=dtype) if bias else None, rm)
        # (with the collapse guard's writes for a mask a fused optimizer step built)
        kernels.threshold_linear_fwd(x, w, torch.randn(n, dtype=dtype) if bias else None, _pending_guard(rm, n, dtype))
        for i, mode in enumerate(modes):
            kernels.threshold_linear_bwd(dy, x, w, rm, mode=mode, need_dx=i == 0)
        # the finish that writes the active rows only (a fused optimizer takes compact gradients)
        kernels.threshold_linear_bwd(dy, x, w, rm, mode=modes[0], need_dx=False, r_out=torch.empty(n))
        if "skip" in modes:
            # skip mode from the forward's products: the forward that keeps them, the pass over dY
            # (compaction, r, bias gradient) and the GEMM that writes dW itself
            z = torch.empty(m, n)
            kernels.threshold_linear_fwd(x, w, torch.randn(n, dtype=dtype) if bias else None, rm, z_out=z)
            kernels.threshold_linear_bwd(dy, x, w, rm, mode="skip", r_out=torch.empty(n), z=z,
                                         db_out=torch.empty(n, dtype=dtype) if bias else None)
            kernels.threshold_linear_bwd(dy, x, w, rm, mode="skip", need_dx=False, z=z)
            # (with dX: dX and dW in one launch, writing every row of dW; without dX, the rows only)
            kernels.threshold_linear_bwd(dy, x, w, rm, mode="skip", z=z)
            kernels.threshold_linear_bwd(dy, x, w, rm, mode="skip", need_dx=False, z=z, r_out=torch.empty(n))
        if "exact" in modes:
            # exact mode from every unit's products (the pruned units' r)
            z = torch.empty(m, n)
            kernels.threshold_linear_fwd(x, w, None, rm, z_out=z, z_all=True)
            kernels.threshold_linear_bwd(dy, x, w, rm, mode="exact", r_out=torch.empty(n), z=z)
            kernels.threshold_linear_bwd(dy, x, w, rm, mode="exact", need_dx=False, z=z,
                                         db_out=torch.empty(n, dtype=dtype))
    return run


def conv_case(dtype: torch.dtype, batch: int, cin: int, cout: int, size: int, kernel: int, stride: int, padding: int,
              *, channels_last: bool, modes=("exact", "skip", "sample")):
    def run():
        geo = conv_geometry(kernel, stride, padding)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        x = torch.randn(batch, cin, size, size, dtype=dtype).contiguous(memory_format=fmt)
        w = torch.randn(cout, cin, kernel, kernel, dtype=dtype).contiguous(memory_format=fmt)
        ho, wo = geo.output_size(size, size)
        dy = torch.randn(batch, cout, ho, wo, dtype=dtype).contiguous(memory_format=fmt)
        rm = _row_mask(w)
        kernels.threshold_conv2d_fwd(x, w, None, rm, geo)
        kernels.threshold_conv2d_fwd(x, w, None, _pending_guard(rm, cout, dtype), geo)
        for i, mode in enumerate(modes):
            # (the first with the bias gradient from the dY compaction)
            kernels.threshold_conv2d_bwd(dy, x, w, rm, geo, mode=mode, need_dx=i == 0,
                                         db_out=torch.empty(cout, dtype=dtype) if i == 0 else None)
    return run


def optim_case(dtype: torch.dtype, n: int, k: int):
    """The fused optimizer step (kernels/threshold_optim.py): every update kind, guard on and off."""
    def run():
        from spafl.kernels.threshold_optim import fused_step

        w, g, tau = torch.randn(n, k, dtype=dtype), torch.randn(n, k, dtype=dtype), torch.zeros(n)
        s1, s2 = torch.zeros_like(w), torch.zeros_like(w)
        fused_step(w, g, tau, kind="sgd", lr=0.1)
        fused_step(w, g, tau, kind="sgd", lr=0.1, weight_decay=1e-4, state1=s1, momentum=0.9, nesterov=True,
                   collapse_density=0.01)
        fused_step(w, g, tau, kind="sgd", lr=0.1, state1=s1, momentum=0.9, first=True)
        for kind in ("adam", "adamw"):
            fused_step(w, g, tau, kind=kind, lr=1e-3, weight_decay=1e-2, state1=s1, state2=s2, step=3,
                       collapse_density=0.01)
        # collapse_timing="previous": the guard reads the layer's stored density
        fused_step(w, g, tau, kind="sgd", lr=0.1, state1=s1, momentum=0.9, collapse_density=0.01,
                   previous_density=torch.ones(()))
        # compact gradients: only the active rows of g are read, pruned rows owe sign(w) r / K
        rows = (torch.rand(n) < 0.1, torch.randn(n))
        fused_step(w, g, tau, kind="sgd", lr=0.1, state1=s1, momentum=0.9, grad_rows=rows)
        fused_step(w, g, tau, kind="adam", lr=1e-3, state1=s1, state2=s2, step=3, grad_rows=rows)
        # the active rows lack their sign term too (the Linear GEMM from the forward's products)
        fused_step(w, g, tau, kind="sgd", lr=0.1, weight_decay=1e-4, state1=s1, momentum=0.9, nesterov=True,
                   grad_rows=(*rows, True))
        fused_step(w, g, tau, kind="adamw", lr=1e-3, weight_decay=1e-2, state1=s1, state2=s2, step=3,
                   grad_rows=(*rows, True))
    return run


def row_mask_case(dtype: torch.dtype, n: int, k: int):
    """The row-mask kernel with the collapse guard: decided only, and with the layer's writes
    (thresholds, counter, stored density) in the launch, for both timings; and the guard's writes
    alone, for a mask a fused optimizer step built."""
    def run():
        from spafl.kernels.threshold_mask import guard_writes, guarded_row_mask

        w = torch.randn(n, k, dtype=dtype)
        tau = torch.zeros(n, dtype=dtype)
        kernels.threshold_row_mask(w, tau, collapse_density=0.01)
        guarded_row_mask(w, tau, 0.01, False, torch.ones(()), torch.zeros((), dtype=torch.long))
        guarded_row_mask(w, tau, 0.01, True, torch.ones(()), torch.zeros((), dtype=torch.long))
        guard_writes(tau, torch.ones(1, dtype=torch.bool), torch.zeros(1, dtype=torch.int32), torch.ones(()),
                     torch.zeros((), dtype=torch.long))
    return run


@contextlib.contextmanager
def wide_offsets():
    """Within this block every launcher takes its int64-offset variant (``WIDE=True``), as for
    tensors past 2^31 elements, without allocating them: ``fits_int32`` answers ``False``."""
    import importlib

    from spafl.kernels import _config

    modules = [importlib.import_module(f"spafl.kernels.{name}")
               for name in ("threshold_linear", "threshold_conv2d", "threshold_mask", "threshold_optim")]
    saved = [m.fits_int32 for m in modules]
    for m in modules:
        m.fits_int32 = lambda *tensors, margin=1024: False
    # The launchers keep a plan per shape, made with the answer fits_int32 gave then: plans
    # made outside this block must not serve inside it, nor the other way round.
    _config._PLANS.clear()
    try:
        yield
    finally:
        for m, fn in zip(modules, saved, strict=True):
            m.fits_int32 = fn
        _config._PLANS.clear()


@contextlib.contextmanager
def tf32(enabled: bool):
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32

# (name, case, fp32 precision, variants). The aligned shapes are the benchmarks' (contiguous,
# multiples of 16; the ResNet convolutions channels-last, as benchmarks/kernels.py feeds them, and
# NCHW, as the federated models do); the ragged ones have odd sizes, so no divisibility is known.
# Variants: "wide" compiles the int64-offset kernels (tensors past 2^31 elements: the same shapes
# with ``fits_int32`` answering no), "tuned" every candidate configuration of the autotuner
# (``SPAFL_AUTOTUNE=1``) instead of the fixed one.
CASES = [
    ("optim-fp32", optim_case(FP32, 512, 1024), None, ()),
    ("optim-bf16-ragged", optim_case(BF16, 1531, 769), None, ()),
    ("optim-fp16", optim_case(FP16, 512, 1024), None, ()),
    ("optim-bf16-wide", optim_case(BF16, 512, 1024), None, ("wide",)),
    ("rowmask-bf16-ragged", row_mask_case(BF16, 1531, 769), None, ()),
    ("rowmask-fp32-wide", row_mask_case(FP32, 512, 1024), None, ("wide",)),
    ("linear-bf16", linear_case(BF16, 256, 512, 1024), None, ()),
    ("linear-bf16-ragged", linear_case(BF16, 1000, 1531, 769), None, ()),
    ("linear-fp16", linear_case(FP16, 256, 512, 1024, modes=("skip",)), None, ()),
    ("linear-fp32-tf32", linear_case(FP32, 256, 512, 1024, modes=("skip",)), True, ()),
    ("linear-fp32-ieee", linear_case(FP32, 256, 512, 1024, modes=("skip",)), False, ()),
    ("conv3x3-bf16-cl", conv_case(BF16, 8, 64, 128, 16, 3, 1, 1, channels_last=True), None, ()),
    ("conv3x3s2-bf16-nchw", conv_case(BF16, 8, 64, 128, 16, 3, 2, 1, channels_last=False, modes=("skip",)), None, ()),
    ("conv1x1s2-bf16-cl", conv_case(BF16, 8, 64, 128, 16, 1, 2, 0, channels_last=True, modes=("skip",)), None, ()),
    ("conv5x5-bf16-ragged", conv_case(BF16, 5, 37, 51, 19, 5, 1, 2, channels_last=False), None, ()),
    ("conv3x3-fp16-cl", conv_case(FP16, 8, 64, 128, 16, 3, 1, 1, channels_last=True, modes=("skip",)), None, ()),
    ("conv3x3-fp32-tf32", conv_case(FP32, 8, 64, 128, 16, 3, 1, 1, channels_last=True, modes=("skip",)), True, ()),
    ("conv3x3-fp32-ieee", conv_case(FP32, 8, 64, 128, 16, 3, 1, 1, channels_last=True, modes=("skip",)), False, ()),
    # int64 offsets: every kernel, aligned and ragged, 16-bit and fp32.
    ("linear-bf16-wide", linear_case(BF16, 256, 512, 1024), None, ("wide",)),
    ("linear-bf16-ragged-wide", linear_case(BF16, 1000, 1531, 769, modes=("skip",)), None, ("wide",)),
    ("linear-fp32-tf32-wide", linear_case(FP32, 256, 512, 1024, modes=("skip",)), True, ("wide",)),
    ("linear-fp32-ieee-wide", linear_case(FP32, 256, 512, 1024, modes=("skip",)), False, ("wide",)),
    ("conv3x3-bf16-cl-wide", conv_case(BF16, 8, 64, 128, 16, 3, 1, 1, channels_last=True), None, ("wide",)),
    ("conv5x5-bf16-ragged-wide", conv_case(BF16, 5, 37, 51, 19, 5, 1, 2, channels_last=False, modes=("skip",)),
     None, ("wide",)),
    ("conv3x3-fp32-tf32-wide", conv_case(FP32, 8, 64, 128, 16, 3, 1, 1, channels_last=True, modes=("skip",)), True,
     ("wide",)),
    ("conv3x3-fp32-ieee-wide", conv_case(FP32, 8, 64, 128, 16, 3, 1, 1, channels_last=True, modes=("skip",)), False,
     ("wide",)),
    # Every autotune candidate, over each fixed configuration it overrides (16-bit, TF32, IEEE
    # fp32; aligned and ragged). Shapes large enough that no candidate is dropped by the limits.
    ("linear-bf16-tuned", linear_case(BF16, 256, 512, 1024), None, ("tuned",)),
    ("linear-bf16-ragged-tuned", linear_case(BF16, 1000, 1531, 769, modes=("skip",)), None, ("tuned",)),
    ("linear-fp32-tf32-tuned", linear_case(FP32, 256, 512, 1024, modes=("skip",)), True, ("tuned",)),
    ("linear-fp32-ieee-tuned", linear_case(FP32, 256, 512, 1024, modes=("skip",)), False, ("tuned",)),
    ("conv3x3-bf16-cl-tuned", conv_case(BF16, 8, 64, 128, 16, 3, 1, 1, channels_last=True), None, ("tuned",)),
    ("conv5x5-bf16-ragged-tuned", conv_case(BF16, 5, 37, 51, 19, 5, 1, 2, channels_last=False, modes=("skip",)),
     None, ("tuned",)),
    ("conv3x3-fp32-tf32-tuned", conv_case(FP32, 8, 64, 128, 16, 3, 1, 1, channels_last=True, modes=("skip",)), True,
     ("tuned",)),
    ("conv3x3-fp32-ieee-tuned", conv_case(FP32, 8, 64, 128, 16, 3, 1, 1, channels_last=True, modes=("skip",)), False,
     ("tuned",)),
]


# ----------------------------------------------------------------------------- reports


@dataclass
class Report:
    name: str
    kernel: str
    shared: int
    warps: int
    registers: int
    stack: int  # bytes of stack frame per thread: spilled registers live there
    local_instructions: int  # LDL / STL anywhere in the kernel: spill traffic
    wgmma: int
    cp_async: int
    loop_instructions: int  # innermost loop holding matrix instructions (the widest, if several)
    loop_mma: int
    loop_local: int  # LDL / STL in that loop
    loop_ldgsts: int

    @property
    def spills(self) -> bool:
        # Spilled registers are stored and reloaded through local memory (STL / LDL). A stack
        # frame without them holds a call's return state, not a spill.
        return self.local_instructions > 0

    def line(self) -> str:
        return (f"ok   {self.name}: shared={self.shared} B, warps={self.warps}, regs={self.registers}, "
                f"stack={self.stack} B, local={self.local_instructions}, wgmma={self.wgmma}, cp.async={self.cp_async}, "
                f"loop={self.loop_instructions} instr (mma={self.loop_mma}, local={self.loop_local}, "
                f"ldgsts={self.loop_ldgsts})")


_MMA = re.compile(r"\b(HGMMA|HMMA|FFMA)\b")


def main_loop(sass: str) -> tuple[int, int, int, int]:
    """(instructions, matrix instructions, LDL/STL, LDGSTS) of the innermost loop that holds
    matrix instructions, choosing the one with the most multiply-adds per iteration (the widest
    tile class of a kernel that has several). A loop is the span between a label and a later branch
    back to it. (Triton's SASS listing: ``LABEL:`` lines and ``control<TAB>INSTRUCTION;`` lines.)"""
    instrs, labels = [], {}
    for line in sass.splitlines():
        label = re.match(r"^(\w+):\s*$", line)
        if label:
            labels[label.group(1)] = len(instrs)
            continue
        code = re.match(r"^[^\t]*\t(.*);", line)
        if code:
            instrs.append(code.group(1))
    loops = []
    for end, text in enumerate(instrs):
        target = re.search(r"\bBRA\s+(\w+)$", text)
        if target and labels.get(target.group(1), end + 1) <= end:
            body = instrs[labels[target.group(1)]:end + 1]
            mma = [i for i in body if _MMA.search(i)]
            if mma:
                # Multiply-adds per iteration: HGMMA names its shape (e.g. HGMMA.64x128x16).
                work = sum(math.prod(map(int, shape.groups())) if (shape := re.search(r"(\d+)x(\d+)x(\d+)", i))
                           else 1 for i in mma)
                loops.append((work, -len(body), len(body), len(mma),
                              sum(bool(re.search(r"\b(LDL|STL)\b", i)) for i in body),
                              sum("LDGSTS" in i for i in body)))
    if not loops:
        return 0, 0, 0, 0
    return max(loops)[2:]


def _resources(cubin: bytes) -> dict:
    """``{"REG": .., "STACK": .., "LOCAL": ..}`` of a cubin (``cuobjdump -res-usage``; works on
    cached compiles too, unlike the ptxas log)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        text = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "-res-usage", f.name], capture_output=True,
                              text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    return {key: int(value) for key, value in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", text)}


def compile_launch(name: str, launch: Launch, arch: int) -> Report:
    signature, constexprs, attrs, options = specialise(launch)
    src = triton.compiler.ASTSource(fn=launch.kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    ptx, sass = compiled.asm["ptx"], compiled.asm["sass"]
    res = _resources(compiled.asm["cubin"])
    loop = main_loop(sass)
    return Report(
        name=name, kernel=launch.kernel.__name__, shared=compiled.metadata.shared,
        warps=compiled.metadata.num_warps, registers=res.get("REG", 0), stack=res.get("STACK", 0),
        local_instructions=len(re.findall(r"\b(?:LDL|STL)\b", sass)), wgmma=ptx.count("wgmma.mma_async"),
        cp_async=ptx.count("cp.async.cg") + ptx.count("cp.async.ca"),
        loop_instructions=loop[0], loop_mma=loop[1], loop_local=loop[2], loop_ldgsts=loop[3],
    )


def _label(launch: Launch) -> str:
    short = launch.kernel.__name__.removeprefix("_threshold_").removeprefix("_").removesuffix("_kernel")
    flags = [f"{k}={v}" for k, v in launch.kwargs.items()
             if k in ("MODE", "R_KNOWN", "WRITE_PRUNED", "SIGN_TERM", "ROWS", "ROWS_TERM", "STORE_Z", "Z_ALL",
                      "COMPACT_W", "HAS_BIAS", "KH", "BLOCK_M", "BLOCK_N", "BLOCK_P", "BLOCK_C", "DOT_PRECISION",
                      "WIDE", "KIND", "FIRST", "HAS_MOMENTUM",
                      "NESTEROV", "HAS_GUARD", "GUARD_PREVIOUS", "GUARD_WRITES", "num_warps", "num_stages")]
    return f"{short}[{','.join(flags)}]"


def collect(filter_text: str = "") -> list[tuple[str, Launch]]:
    """Every distinct specialised launch of the cases, named ``case:kernel[flags]``."""
    out, seen = [], set()
    for case, run, precision, variants in CASES:
        with contextlib.ExitStack() as stack:
            launches = stack.enter_context(recording())
            if precision is not None:
                stack.enter_context(tf32(precision))
            if "wide" in variants:
                stack.enter_context(wide_offsets())
            if "tuned" in variants:
                stack.enter_context(_config.every_candidate())
            run()
        for launch in launches:
            name = f"{case}:{_label(launch)}"
            sig, consts, attrs, opts = specialise(launch)
            key = (launch.kernel.__name__, tuple(sorted(sig.items())), repr(sorted(consts.items())),
                   repr(sorted(attrs.items())), tuple(sorted(opts.items())))
            if key in seen or filter_text not in name:
                continue
            seen.add(key)
            out.append((name, launch))
    return out


# The launches to compile; module-level so that forked workers find them without pickling.
_COLLECTED: list[tuple[str, Launch]] = []


def _compile_one(job: tuple[int, int]) -> tuple[str, Report | str]:
    index, arch = job
    name, launch = _COLLECTED[index]
    try:
        return name, compile_launch(name, launch, arch)
    except Exception as exc:
        return name, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _compile_all(arch: int, jobs: int):
    """``(name, Report | error message)`` of every collected launch, in order. Compiles are
    single-threaded (MLIR passes, then ptxas), so ``jobs`` forked workers use that many cores;
    each keeps Triton's on-disk cache, so a rerun compiles nothing."""
    work = [(i, arch) for i in range(len(_COLLECTED))]
    if jobs == 1 or len(work) < 2:
        yield from map(_compile_one, work)
        return
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        yield from pool.imap(_compile_one, work)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("-k", default="", help="only compiles whose name contains this")
    parser.add_argument("--json", default=None, help="also write the reports to this file")
    parser.add_argument("--check", action="store_true", help="fail on spills in the GEMM kernels")
    parser.add_argument("--markdown", action="store_true", help="end with a table of the GEMM kernels")
    parser.add_argument("--jobs", type=int, default=min(os.cpu_count() or 1, 4),
                        help="compiles in parallel (one single-threaded process each; default: the cores, at most 4)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    failures, reports = 0, []
    _COLLECTED[:] = collect(args.k)
    for name, result in _compile_all(args.arch, args.jobs):
        if isinstance(result, str):  # report every failure, not just the first
            failures += 1
            print(f"FAIL {name}: {result}", flush=True)
            continue
        report = result
        reports.append(report)
        if args.check and report.kernel in SPILL_CHECKED and report.spills:
            failures += 1
            print(f"FAIL {name}: spills ({report.local_instructions} LDL/STL, stack {report.stack} B)", flush=True)
        else:
            print(report.line(), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in reports], f, indent=1)
    if args.markdown:
        print("\n| launch | regs | stack B | LDL/STL | wgmma | cp.async | loop instr | loop mma | loop LDGSTS |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in reports:
            if r.kernel in MAIN_KERNELS:
                print(f"| `{r.name}` | {r.registers} | {r.stack} | {r.local_instructions} | {r.wgmma} | "
                      f"{r.cp_async} | {r.loop_instructions} | {r.loop_mma} | {r.loop_ldgsts} |")
    print(f"{len(reports)} compiled, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
