"""Markdown tables from benchmark CSVs: the speedup over dense of each provider per case, op
and density (kernels.py), the training-step and round times (e2e.py), and the targets of
kernels.md against the measured ratios.

    python benchmarks/summary.py --kernels kernels.csv --e2e e2e.csv
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path

# kernels.md's targets: (layer, op, provider, case prefix, {density: minimum speedup vs dense}).
TARGETS = [
    ("linear", "fwd", "spafl-exact", "large-8192", {0.5: 1.8, 0.2: 4.0, 0.1: 7.0, 1.0: 0.95}),
    ("linear", "fwd+bwd", "spafl-skip", "large-8192", {0.5: 1.7, 0.2: 3.5, 0.1: 5.5, 1.0: 0.95}),
    ("conv2d", "fwd", "spafl-exact", "resnet18-", {0.5: 1.3, 0.2: 3.0, 0.1: 4.5, 1.0: 0.9}),
]


def read(path: Path | None) -> list[dict]:
    if path is None:
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def kernel_tables(rows: list[dict], providers=("masked", "gather", "smaller", "spafl-exact", "spafl-skip")) -> str:
    out = []
    groups = defaultdict(dict)
    for r in rows:
        groups[(r["case"], r["shape"], r["dtype"], r["op"])][(float(r["density"]), r["provider"])] = r
    for (case, shape, dtype, op), cells in groups.items():
        densities = sorted({d for d, _ in cells}, reverse=True)
        out.append(f"**{case}** ({shape}), {dtype}, {op}: speedup over dense (dense ms in the first row)\n")
        out.append("| provider | " + " | ".join(f"{d:g}" for d in densities) + " |")
        out.append("|---" * (len(densities) + 1) + "|")
        out.append("| dense (ms) | " + " | ".join(f"{float(cells[(d, 'dense')]['ms']):.3f}" for d in densities) + " |")
        for p in providers:
            vals = [f"{float(cells[(d, p)]['speedup_vs_dense']):.2f}x" if (d, p) in cells else "-" for d in densities]
            out.append(f"| {p} | " + " | ".join(vals) + " |")
        out.append("")
    return "\n".join(out)


def target_table(rows: list[dict]) -> str:
    out = ["| target | density | wanted | measured | case |", "|---|---|---|---|---|"]
    for layer, op, provider, prefix, wanted in TARGETS:
        for density, minimum in wanted.items():
            hits = [r for r in rows if r["layer"] == layer and r["op"] == op and r["provider"] == provider
                    and r["case"].startswith(prefix) and float(r["density"]) == density and r["dtype"] == "bfloat16"]
            measured = ", ".join(f"{float(r['speedup_vs_dense']):.2f}x" for r in hits) or "not measured"
            cases = ", ".join(sorted({r["case"] for r in hits})) or "-"
            out.append(f"| {layer} {op} ({provider}) | {density:g} | >= {minimum}x | {measured} | {cases} |")
    return "\n".join(out)


def e2e_tables(rows: list[dict]) -> str:
    out = []
    steps = [r for r in rows if r["table"] == "step"]
    if steps:
        out += ["| model | density | dense (ms) | masked (ms) | spafl (ms) | spafl vs dense | spafl vs masked |",
                "|---|---|---|---|---|---|---|"]
        cells = defaultdict(dict)
        for r in steps:
            cells[(r["case"], float(r["density"]))][r["provider"]] = r
        for (case, density), c in cells.items():
            out.append(f"| {case} | {density:g} | {float(c['dense']['ms']):.1f} | {float(c['masked']['ms']):.1f} | "
                       f"{float(c['spafl']['ms']):.1f} | {float(c['spafl']['speedup_vs_dense']):.2f}x | "
                       f"{float(c['spafl']['speedup_vs_masked']):.2f}x |")
        out.append("")
    for r in (r for r in rows if r["table"] == "round"):
        out.append(f"- {r['case']} ({r['shape']}, {r['data']}), {r['provider']}: {float(r['ms']) / 1e3:.2f} s a "
                   f"round, density {float(r['density']):.3f}, {float(r['speedup_vs_masked']):.2f}x vs masked")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kernels", type=Path)
    p.add_argument("--e2e", type=Path)
    args = p.parse_args(argv)
    kernels, e2e = read(args.kernels), read(args.e2e)
    if kernels:
        print("## Targets (kernels.md: H100/H200, bf16, large shapes)\n")
        print(target_table(kernels) + "\n")
        print("## Kernels\n")
        print(kernel_tables(kernels))
    if e2e:
        print("## End to end\n")
        print(e2e_tables(e2e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
