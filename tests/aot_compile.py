"""Compile every Triton kernel configuration ahead of time for a CUDA target, without a GPU.

Run as a script (the pytest test ``test_kernels_compile.py`` runs it in a subprocess, because
``TRITON_INTERPRET=1`` replaces the kernels with interpreted functions at import time). It
builds the same specialisations the launchers use (dtype, constexpr flags, block sizes) and
asks Triton to lower them to a cubin for sm_90, so a kernel that only breaks in the compiler
(types of loop-carried values, layouts, unsupported ops) fails on a CPU machine too.

Usage: python tests/aot_compile.py [--arch 90]
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from spafl.kernels import _config  # noqa: E402
from spafl.kernels import threshold_conv2d as tconv  # noqa: E402
from spafl.kernels import threshold_linear as tlin  # noqa: E402
from spafl.kernels import threshold_mask as tmask  # noqa: E402

PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}


# Inner (contiguous) strides: Triton's launcher specialises an integer argument equal to 1 as a
# constant, so for contiguous tensors these become 1 at compile time.
# The convolutions' aligned case is the channels-last one (activations and weights).
INNER_STRIDES = {"stride_xk", "stride_wk", "stride_yn", "stride_dyn", "stride_dxk", "stride_dwk",
                 "sxc", "swc", "syf", "sdc"}
# Integer arguments that are not sizes or strides: never assumed divisible by 16.
# For the convolutions the aligned case is channels-last with channel counts that are multiples
# of 16 (every ResNet layer but the first): the strides between pixels are multiples of 16 then,
# the spatial sizes and the kernel geometry need not be.
NOT_ALIGNED = {"sample_count", "sample_step", "NUM_KB", "SPLIT", "PLANE", "WIDTH", "H", "W", "Ho", "Wo",
               "Hq", "Wq", "KH", "KW", "stride_h", "stride_w", "pad_h", "pad_w", "dil_h", "dil_w",
               "stride_dyh", "stride_dyw"}


def _compile(fn, signature: dict, constexprs: dict, arch: int, num_warps: int, num_stages: int = 3,
             aligned: bool = False):
    """Compile one specialisation. ``aligned=False`` is the generic one (any strides, any
    alignment); ``aligned=True`` is what the launcher produces for contiguous tensors with
    16-byte aligned data and sizes that are multiples of 16: inner strides become the constant
    1 and the other pointer / integer arguments carry ``tt.divisibility = 16``."""
    sig = dict(signature)
    constexprs = dict(constexprs)
    attrs = {}
    if aligned:
        for name, ty in signature.items():
            if name in INNER_STRIDES:
                constexprs[name] = 1
            elif ty.startswith("*") or (ty == "i32" and name not in NOT_ALIGNED):
                attrs[(fn.arg_names.index(name),)] = [["tt.divisibility", 16]]
    for name in constexprs:
        sig[name] = "constexpr"
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def cases():
    """Yield (name, thunk) pairs, one per kernel specialisation the launchers can produce."""
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        p = PTR[dtype]
        yield f"row_score_mask[{p}]", lambda p=p: (
            tmask._row_score_mask_kernel,
            {"w_ptr": p, "tau_ptr": p, "score_ptr": "*fp32", "mask_ptr": "*i8", "N": "i32", "K": "i32",
             "stride_wn": "i32", "stride_wk": "i32"},
            {"BLOCK_N": tmask._SCORE_BLOCK_N, "BLOCK_K": tmask._SCORE_BLOCK_K},
            4,
        )
    for guard in (False, True):
        yield f"compact_rows[guard={guard}]", lambda guard=guard: (
            tmask._compact_rows_kernel,
            {"score_ptr": "*fp32", "mask_ptr": "*i8", "perm_ptr": "*i32", "count_ptr": "*i32",
             "collapsed_ptr": "*i8", "N": "i32", "collapse_density": "fp32"},
            {"HAS_GUARD": guard, "BLOCK": tmask._COMPACT_BLOCK},
            4,
        )
    for dtype, has_bias in itertools.product((torch.float32, torch.float16, torch.bfloat16), (False, True)):
        p = PTR[dtype]
        cfg = _config._GPU_GEMM_FP32 if dtype == torch.float32 else _config._GPU_GEMM_16BIT
        prec = "tf32" if dtype == torch.float32 else "ieee"
        yield f"linear_fwd[{p},bias={has_bias}]", lambda p=p, cfg=cfg, has_bias=has_bias, prec=prec: (
            tlin._threshold_linear_fwd_kernel,
            {"x_ptr": p, "w_ptr": p, "b_ptr": p, "perm_ptr": "*i32", "count_ptr": "*i32", "y_ptr": p,
             "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_xk": "i32", "stride_wn": "i32",
             "stride_wk": "i32", "stride_ym": "i32", "stride_yn": "i32"},
            {"HAS_BIAS": has_bias, "UPCAST": False, "DOT_PRECISION": prec, "BLOCK_M": cfg.block_m,
             "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k, "GROUP_M": cfg.group_m},
            cfg.num_warps,
        )
    for dtype in (torch.float32, torch.bfloat16):
        p = PTR[dtype]
        cfg = _config._GPU_GEMM_FP32 if dtype == torch.float32 else _config._GPU_GEMM_16BIT
        prec = "tf32" if dtype == torch.float32 else "ieee"
        for all_rows in (False, True):
            yield f"gather_grad_columns[{p},all={all_rows}]", lambda p=p, cfg=cfg, all_rows=all_rows: (
                tlin._gather_grad_columns_kernel,
                {"dy_ptr": p, "perm_ptr": "*i32", "count_ptr": "*i32", "dyt_ptr": p, "M": "i32", "N": "i32",
                 "PLANE": "i32", "WIDTH": "i32", "stride_dyb": "i32", "stride_dyh": "i32", "stride_dyw": "i32",
                 "stride_dyn": "i32"},
                {"ALL_ROWS": all_rows, "BLOCK_P": cfg.block_n, "BLOCK_M": cfg.block_m},
                4,
            )
        yield f"linear_bwd_dx[{p}]", lambda p=p, cfg=cfg, prec=prec: (
            tlin._threshold_linear_bwd_dx_kernel,
            {"dyt_ptr": p, "w_ptr": p, "perm_ptr": "*i32", "count_ptr": "*i32", "dx_ptr": p, "M": "i32",
             "N": "i32", "K": "i32", "stride_wn": "i32", "stride_wk": "i32", "stride_dxm": "i32",
             "stride_dxk": "i32"},
            {"UPCAST": False, "DOT_PRECISION": prec, "BLOCK_M": cfg.block_m, "BLOCK_K": cfg.block_k * 2,
             "BLOCK_P": cfg.block_k, "GROUP_M": cfg.group_m},
            cfg.num_warps,
        )
        for mode in (0, 1, 2):
            yield f"linear_bwd_dw[{p},mode={mode}]", lambda p=p, cfg=cfg, prec=prec, mode=mode: (
                tlin._threshold_linear_bwd_dw_kernel,
                {"dyt_ptr": p, "x_ptr": p, "w_ptr": p, "perm_ptr": "*i32", "count_ptr": "*i32", "g_ptr": "*fp32",
                 "rpart_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32",
                 "stride_xk": "i32", "stride_wn": "i32", "stride_wk": "i32", "sample_count": "i32",
                 "sample_step": "i32"},
                {"MODE": mode, "UPCAST": False, "DOT_PRECISION": prec, "BLOCK_P": cfg.block_n,
                 "BLOCK_K": cfg.block_k * 2, "BLOCK_M": cfg.block_k},
                cfg.num_warps,
            )
            yield f"linear_bwd_finish[{p},mode={mode}]", lambda p=p, mode=mode, dtype=dtype: (
                tlin._threshold_linear_bwd_finish_kernel,
                {"rpart_ptr": "*fp32", "w_ptr": p, "perm_ptr": "*i32", "count_ptr": "*i32", "g_ptr": "*fp32",
                 "dw_ptr": p, "dtau_ptr": p, "N": "i32", "K": "i32", "NUM_KB": "i32", "SPLIT": "i32",
                 "stride_wn": "i32",
                 "stride_wk": "i32", "stride_dwn": "i32", "stride_dwk": "i32"},
                {"MODE": mode, "IN_PLACE": dtype == torch.float32, "BLOCK_P": 32, "BLOCK_K": 128},
                4,
            )


def _conv_geometry_sig() -> dict:
    names = ["C", "H", "W", "Ho", "Wo"]
    return {n: "i32" for n in names}


def _strides(prefix: str, dims: str) -> dict:
    return {f"{prefix}{d}": "i32" for d in dims}


_CONV_SHAPE = ("KH", "KW", "stride_h", "stride_w", "pad_h", "pad_w", "dil_h", "dil_w")


# Geometry arguments that Triton's launcher specialises to the constant 1 for a 1x1 / stride-1
# / undilated convolution (it does so for every integer argument equal to 1).
_UNIT_GEOMETRY = {"KH": 1, "KW": 1, "stride_h": 1, "stride_w": 1, "dil_h": 1, "dil_w": 1}


def conv_cases():
    shape = {n: "i32" for n in _CONV_SHAPE}
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    # (dtype, filter tile, unit geometry): every dtype at the 64-filter tile of a 128-filter
    # layer; bf16 also at 128 (layers of 256 filters and more), at 32 and with unit geometry.
    fwd = [(d, 64, False) for d in dtypes] + [(torch.bfloat16, 128, False), (torch.bfloat16, 32, False),
                                              (torch.bfloat16, 64, True)]
    for (dtype, tile, unit), has_bias in itertools.product(fwd, (False, True)):
        p = PTR[dtype]
        cfg = _config._GPU_GEMM_FP32 if dtype == torch.float32 else _config._GPU_GEMM_16BIT
        prec = "tf32" if dtype == torch.float32 else "ieee"
        geo = _UNIT_GEOMETRY if unit else {}
        yield f"conv_fwd[{p},n={tile},unit={unit},bias={has_bias}]", (
            lambda p=p, cfg=cfg, has_bias=has_bias, prec=prec, tile=tile, geo=geo: (
                tconv._threshold_conv2d_fwd_kernel,
                {"x_ptr": p, "w_ptr": p, "b_ptr": p, "perm_ptr": "*i32", "count_ptr": "*i32", "y_ptr": p,
                 "P": "i32", "F": "i32", **_conv_geometry_sig(), **shape, **_strides("sx", "bchw"),
                 **_strides("sw", "fchw"), **_strides("sy", "bfhw")},
                {"HAS_BIAS": has_bias, "UPCAST": False, "DOT_PRECISION": prec, "BLOCK_M": cfg.block_m,
                 "BLOCK_N": tile, "BLOCK_K": cfg.block_k, "GROUP_M": cfg.group_m, **geo},
                cfg.num_warps,
            )
        )
    for dtype, unit in [(d, False) for d in dtypes] + [(torch.bfloat16, True)]:
        p = PTR[dtype]
        cfg = _config._GPU_GEMM_FP32 if dtype == torch.float32 else _config._GPU_GEMM_16BIT
        prec = "tf32" if dtype == torch.float32 else "ieee"
        geo = _UNIT_GEOMETRY if unit else {}
        yield f"conv_bwd_dx[{p},unit={unit}]", lambda p=p, cfg=cfg, prec=prec, geo=geo: (
            tconv._threshold_conv2d_bwd_dx_kernel,
            {"dyt_ptr": p, "w_ptr": p, "perm_ptr": "*i32", "count_ptr": "*i32", "dx_ptr": p, "PQ": "i32",
             "P": "i32", **_conv_geometry_sig(), "Hq": "i32", "Wq": "i32", **shape, **_strides("sw", "fchw"),
             **_strides("sd", "bchw")},
            {"UPCAST": False, "DOT_PRECISION": prec, "BLOCK_M": cfg.block_m, "BLOCK_C": cfg.block_n,
             "BLOCK_P": cfg.block_k, "GROUP_M": cfg.group_m, **geo},
            cfg.num_warps,
        )
        tiles = (64, 128) if dtype == torch.bfloat16 and not unit else (64,)
        for mode, tile in itertools.product((0, 1, 2), tiles):
            yield f"conv_bwd_dw[{p},p={tile},unit={unit},mode={mode}]", (
                lambda p=p, cfg=cfg, prec=prec, mode=mode, tile=tile, geo=geo: (
                    tconv._threshold_conv2d_bwd_dw_kernel,
                    {"dyt_ptr": p, "x_ptr": p, "w_ptr": p, "perm_ptr": "*i32", "count_ptr": "*i32",
                     "g_ptr": "*fp32", "rpart_ptr": "*fp32", "P": "i32", "F": "i32", **_conv_geometry_sig(),
                     **shape, **_strides("sx", "bchw"), **_strides("sw", "fchw"), "sample_count": "i32",
                     "sample_step": "i32", "SPLIT": "i32"},
                    {"MODE": mode, "UPCAST": False, "DOT_PRECISION": prec, "BLOCK_P": tile,
                     "BLOCK_C": cfg.block_k, "BLOCK_M": cfg.block_k, **geo},
                    cfg.num_warps,
                )
            )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("-k", default="", help="only cases whose name contains this")
    args = parser.parse_args(argv)
    failures = 0
    for name, make in itertools.chain(cases(), conv_cases()):
        if args.k not in name:
            continue
        fn, sig, consts, warps = make()
        for aligned in (False, True):
            label = f"{name}{'[aligned]' if aligned else ''}"
            try:
                compiled = _compile(fn, sig, consts, args.arch, warps, aligned=aligned)
                meta, ptx = compiled.metadata, compiled.asm["ptx"]
                n_async = ptx.count("cp.async.cg") + ptx.count("cp.async.ca")
                print(f"ok   {label}: shared={meta.shared} B, warps={meta.num_warps}, "
                      f"wgmma={ptx.count('wgmma.mma_async')}, cp.async={n_async}")
            except Exception as exc:  # report every failure, not just the first
                failures += 1
                print(f"FAIL {label}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    print(f"{failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
