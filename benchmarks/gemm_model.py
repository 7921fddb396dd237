"""The cost model of the Linear GEMM launches alone (forward, dX, dW), counted whole.

``benchmarks/model.py`` prices a layer call launch by launch; for the 4096 x 4096 cases it
counts small probe sizes and extrapolates them, which is not exact for the persistent forward
and dX kernels (their split follows the shape). This script counts only the GEMM launches of
a Linear case, at its full size, in Triton's interpreter at the GPU's tiles, and prices them
with ``model.price``: the forward kernel from one forward call, dX and dW from one backward call
per mode. The other launches of a layer call are those of ``benchmarks/results/model``.

    python benchmarks/gemm_model.py --case linear-4096x4096-b512 --densities 0.1 --csv OUT/gemm.csv
    python benchmarks/gemm_model.py --csv OUT/gemm.csv --compare benchmarks/results/model   # before / after

No GPU ran anything: every figure is a model.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import model  # noqa: E402
import torch  # noqa: E402

GEMMS = ("_threshold_linear_fwd_kernel", "_threshold_linear_bwd_dx_kernel", "_threshold_linear_bwd_dw_kernel")
COLUMNS = ("case", "density", "active", "mode", "kernel", "programs", "mac_programs", "macs", "max_program_macs",
           "read_bytes", "write_bytes", "compute_us", "memory_us", "model_us")


def gemm_launches(case, dtype: torch.dtype, density: float, modes) -> tuple[int, dict]:
    """``(active units, {mode: [Launch of the GEMM kernels]})``; the forward under mode ``""``."""
    from spafl.kernels import threshold_linear_bwd, threshold_linear_fwd, threshold_row_mask

    model._warm_state()
    bench = model.bench_kernels.Bench(case, dtype, torch.device("cpu"), sets=1)
    x, dy, w, b = bench.xs[0].detach(), bench.dys[0], bench.weight.detach(), bench.bias
    tau = model.unit_thresholds(case.rows, density, w.dtype)
    rm = threshold_row_mask(w, tau)
    out = {"": model.record(lambda: threshold_linear_fwd(x, w, b, rm), "fwd")[0]}
    for mode in modes:
        out[mode] = model.record(lambda mode=mode: threshold_linear_bwd(dy, x, w, rm, mode=mode), "bwd")[0]
    return int(rm.count), {k: [la for la in v if la.name in GEMMS] for k, v in out.items()}


def compare(gemm_csv: Path, tables: Path, device: str) -> str:
    """Before / after per case, density and mode: the GEMM launches' modelled time (forward,
    dX, dW) against the dense GEMMs', and the whole forward+backward with the other launches
    taken from the per-launch CSVs of ``tables`` (the committed ``benchmarks/results/model``)."""
    new = list(csv.DictReader(gemm_csv.open()))
    out = []
    for case in dict.fromkeys(r["case"] for r in new):
        old = list(csv.DictReader((tables / f"{case}-bfloat16-{device}-launches.csv").open()))
        for density in dict.fromkeys(r["density"] for r in new if r["case"] == case):
            mine = [r for r in new if r["case"] == case and r["density"] == density]
            fwd = sum(float(r["model_us"]) for r in mine if r["mode"] == "-")
            rows = [r for r in old if float(r["density"]) == float(density) and r["op"] == "fwd+bwd"]
            dense = [r for r in rows if r["provider"] == "dense"]
            dense_gemm = sum(float(r["model_us"]) for r in dense if r["name"] in ("addmm", "mm"))
            dense_all = sum(float(r["model_us"]) for r in dense)
            for mode in dict.fromkeys(r["mode"] for r in mine if r["mode"] != "-"):
                after = fwd + sum(float(r["model_us"]) for r in mine if r["mode"] == mode)
                layer = [r for r in rows if r["provider"] == f"spafl-{mode}"]
                before = sum(float(r["model_us"]) for r in layer if r["name"] in GEMMS)
                whole = sum(float(r["model_us"]) for r in layer)
                out.append(dict(case=case, density=density, mode=mode, dense_gemm_us=dense_gemm, gemm_before_us=before,
                                gemm_after_us=after, gemm_vs_dense_before=dense_gemm / before,
                                gemm_vs_dense_after=dense_gemm / after, dense_layer_us=dense_all,
                                layer_before_us=whole, layer_after_us=whole - before + after,
                                layer_vs_dense_before=dense_all / whole,
                                layer_vs_dense_after=dense_all / (whole - before + after)))
    return model.markdown(out, list(out[0]) if out else [])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", help="a Linear case of benchmarks/model.py (required unless --compare)")
    parser.add_argument("--densities", default="1,0.1")
    parser.add_argument("--modes", nargs="+", default=["skip", "exact"])
    parser.add_argument("--device", default="h100", choices=sorted(model.DEVICES))
    parser.add_argument("--csv", type=Path, help="append the rows to this CSV")
    parser.add_argument("--compare", type=Path, metavar="TABLES",
                        help="only print the before / after table of --csv against these per-launch tables")
    args = parser.parse_args(argv)
    if args.compare:
        print(compare(args.csv, args.compare, args.device))
        return 0
    if not args.case:
        parser.error("--case is required")
    torch.set_num_threads(1)
    case = next(c for c in model.LAYER_CASES if c.name == args.case)
    spec = model.DEVICES[args.device]
    for density in (float(d) for d in args.densities.split(",")):
        t0 = time.perf_counter()
        active, out = gemm_launches(case, torch.bfloat16, density, args.modes)
        rows = []
        for mode, launches in out.items():
            for la in launches:
                cost = model.price(la, spec)
                rows.append(dict(case=case.name, density=density, active=active, mode=mode or "-", kernel=la.name,
                                 programs=la.programs, mac_programs=la.mac_programs, macs=la.macs,
                                 max_program_macs=la.max_program_macs, read_bytes=la.read_bytes,
                                 write_bytes=la.write_bytes, compute_us=round(cost.compute_s * 1e6, 3),
                                 memory_us=round(cost.memory_s * 1e6, 3), model_us=round(cost.seconds * 1e6, 3)))
        print(model.markdown(rows, COLUMNS))
        print(f"# {case.name} d={density}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        if args.csv:
            new = not args.csv.exists()
            with args.csv.open("a", newline="") as fh:
                writer = csv.DictWriter(fh, COLUMNS)
                if new:
                    writer.writeheader()
                writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
