"""Markdown tables from benchmark CSVs: the speedup over dense of each provider per case, op
and density (kernels.py), the training-step and round times (e2e.py), and the targets of
kernels.md against the measured ratios.

    python benchmarks/summary.py --kernels kernels.csv --e2e e2e.csv > summary.md

A ratio marked '?' was flagged noisy when measured (its interval of paired per-repetition
ratios reaches beyond the run's tolerance): do not read it. The backend of our providers is
given beside their name where the CSV records it.
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


def _cell(r: dict, key: str = "speedup_vs_dense") -> str:
    """``2.10x``, ``2.10x?`` when that ratio was flagged noisy, ``-`` when missing."""
    value = float(r[key])
    if value != value:
        return "-"
    return f"{value:.2f}x" + ("?" if str(r.get(f"{key}_noisy", r.get("noisy", ""))).lower() == "true" else "")


def _provider_name(cells: dict, provider: str) -> str:
    backends = {r.get("backend", "") for (_, p), r in cells.items() if p == provider} - {"", "torch"}
    return f"{provider} ({', '.join(sorted(backends))})" if backends else provider


def kernel_tables(rows: list[dict], providers=("masked", "gather", "smaller", "spafl-exact", "spafl-skip")) -> str:
    out = []
    groups = defaultdict(dict)
    for r in rows:
        groups[(r["case"], r["shape"], r["dtype"], r["op"])][(float(r["density"]), r["provider"])] = r
    for (case, shape, dtype, op), cells in groups.items():
        densities = sorted({d for d, _ in cells}, reverse=True)
        threads = {r.get("threads") for r in cells.values()} - {None, ""}
        where = f", {', '.join(sorted(threads))} thread(s)" if threads else ""
        out.append(f"**{case}** ({shape}), {dtype}, {op}{where}: speedup over dense (dense ms in the first row)\n")
        out.append("| provider | " + " | ".join(f"{d:g}" for d in densities) + " |")
        out.append("|---" * (len(densities) + 1) + "|")
        out.append("| dense (ms) | " + " | ".join(f"{float(cells[(d, 'dense')]['ms']):.3g}" if (d, "dense") in cells
                                                  else "-" for d in densities) + " |")
        for p in providers:
            if not any(k[1] == p for k in cells):
                continue
            vals = [_cell(cells[(d, p)]) if (d, p) in cells else "-" for d in densities]
            out.append(f"| {_provider_name(cells, p)} | " + " | ".join(vals) + " |")
        out.append("")
    return "\n".join(out)


def target_table(rows: list[dict]) -> str:
    """The targets this CSV measured, against what they want; a one-line note instead when it
    measured none of them (a CPU run, or another dtype): a table of "not measured" says nothing."""
    out = ["| target | density | wanted | measured | case |", "|---|---|---|---|---|"]
    for layer, op, provider, prefix, wanted in TARGETS:
        for density, minimum in wanted.items():
            hits = [r for r in rows if r["layer"] == layer and r["op"] == op and r["provider"] == provider
                    and r["case"].startswith(prefix) and float(r["density"]) == density and r["dtype"] == "bfloat16"]
            if hits:
                cases = ", ".join(sorted({r["case"] for r in hits}))
                out.append(f"| {layer} {op} ({provider}) | {density:g} | >= {minimum}x | "
                           f"{', '.join(_cell(r) for r in hits)} | {cases} |")
    if len(out) > 2:
        return "\n".join(out)
    devices = ", ".join(sorted({r.get("device", "?") for r in rows})) or "no rows"
    dtypes = ", ".join(sorted({r["dtype"] for r in rows}))
    return (f"None of these targets is in this CSV ({devices}; {dtypes}): they are measured by "
            "`--suite all` (or large, resnet18) in bfloat16 on a GPU. The tables below are what it measured.")


def e2e_tables(rows: list[dict]) -> str:
    out = []
    steps = [r for r in rows if r["table"] == "step"]
    if steps:
        out += ["| model | densities | dense (ms) | masked (ms) | spafl (ms) | spafl backend | spafl vs dense | "
                "spafl vs masked |", "|---|---|---|---|---|---|---|---|"]
        cells = defaultdict(dict)
        for r in steps:
            cells[(r["case"], r.get("layer_densities") or f"all={float(r['density']):g}")][r["provider"]] = r
        for (case, densities), c in cells.items():
            ms = lambda p, c=c: f"{float(c[p]['ms']):.3g}" if p in c else "-"  # noqa: E731
            ours = c.get("spafl")
            out.append(f"| {case} | {densities} | {ms('dense')} | {ms('masked')} | {ms('spafl')} | "
                       f"{ours.get('backend', '') if ours else '-'} | "
                       f"{_cell(ours, 'speedup_vs_dense') if ours else '-'} | "
                       f"{_cell(ours, 'speedup_vs_masked') if ours else '-'} |")
        out.append("")
    for r in (r for r in rows if r["table"] == "round"):
        spread = (f" (p20-p80 {float(r['ms_p20']) / 1e3:.2f}-{float(r['ms_p80']) / 1e3:.2f} s)"
                  if "ms_p20" in r and float(r["ms_p20"]) == float(r["ms_p20"]) else "")
        backend = f" [{r['backend']}]" if r.get("backend") else ""
        densities = f", set {r['layer_densities']}" if r.get("layer_densities") else ""
        out.append(f"- {r['case']} ({r['shape']}, {r['data']}), {r['provider']}{backend}: "
                   f"{float(r['ms']) / 1e3:.2f} s a round{spread}, density {float(r['density']):.3f}{densities}, "
                   f"{_cell(r, 'speedup_vs_masked')} vs masked")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernels", type=Path, help="a CSV written by benchmarks/kernels.py")
    p.add_argument("--e2e", type=Path, help="a CSV written by benchmarks/e2e.py")
    args = p.parse_args(argv)
    kernels, e2e = read(args.kernels), read(args.e2e)
    if kernels:
        print("## Targets (kernels.md: H100/H200, bf16, large shapes)\n")
        print(target_table(kernels) + "\n")
        print("## Kernels\n")
        print(kernel_tables(kernels))
    if not kernels and not e2e:
        p.error("give --kernels and/or --e2e, CSVs written by benchmarks/kernels.py and e2e.py")
    if e2e:
        print("## End to end\n")
        print(e2e_tables(e2e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
