"""The steady forward + backward (and the whole step) of one Linear case at one density, bf16:
the records of ``benchmarks/model.py layers --step-optimizers`` (``model_steps.layer_step_launches``),
dense with torch.optim.SGD and ``spafl-<mode>`` with ``spafl.optim.SGD(compact_grads=True)``,
without the cold fwd / bwd ops (a third of the interpreter time). Run from the repository root:

    OMP_NUM_THREADS=1 python benchmarks/results/model-fused/steady_model.py linear-4096x4096-b128 1 skip OUT.csv

No GPU ran anything: every figure is modelled.
"""

import csv
import os
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, "benchmarks")

import model as M  # noqa: E402
import model_steps as S  # noqa: E402
import torch  # noqa: E402

name, density, mode, out = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4]
case = next(c for c in M.LAYER_CASES if c.name == name)
t0 = time.perf_counter()
res = {("dense", k): v for k, v in S.layer_step_launches(case, torch.bfloat16, density, None, "torch-sgd").items()}
res.update({(f"spafl-{mode}+spafl-sgd-compact", k): v
            for k, v in S.layer_step_launches(case, torch.bfloat16, density, mode, "spafl-sgd-compact").items()})
print(f"# {name} d={density} {mode}: {time.perf_counter() - t0:.0f} s of interpreter", flush=True)
rows = []
for dev in ("h100", "h200"):
    spec = M.DEVICES[dev]
    tot = {}
    for (prov, ph), lst in res.items():
        for i, la in enumerate(lst):
            c = M.price(la, spec)
            rows.append(dict(device=dev, provider=prov, phase=ph, index=i, name=la.name, precision=la.precision,
                             programs=la.programs, mac_programs=la.mac_programs, macs=la.macs,
                             max_program_macs=la.max_program_macs, read_bytes=la.read_bytes,
                             write_bytes=la.write_bytes, compute_us=c.compute_s * 1e6, memory_us=c.memory_s * 1e6,
                             model_us=c.seconds * 1e6))
    for prov in dict.fromkeys(p for p, _ in res):
        fb = M.total_seconds(res[(prov, "fwd")] + res[(prov, "bwd")], spec) * 1e6
        st = fb + M.total_seconds(res[(prov, "step")], spec) * 1e6
        tot[prov] = (fb, st)
    d = tot["dense"]
    for prov, (fb, st) in tot.items():
        print(f"{dev} {prov}: steady fwd+bwd {fb:.1f} us ({d[0] / fb:.3f}x dense), step {st:.1f} us ({d[1] / st:.3f}x)")
with open(out, "w", newline="") as f:
    w = csv.DictWriter(f, list(rows[0]))
    w.writeheader()
    w.writerows(rows)
