"""The steady-state training step of one layer case (forward after the optimizer's step,
backward, step), counted once by the cost model and priced on H100 and H200: the rows of
`model.py layers --step-optimizers`, without that command's other providers and ops."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/
import model as M  # noqa: E402
import model_steps as S  # noqa: E402

case_name, density, out = sys.argv[1], float(sys.argv[2]), Path(sys.argv[3])
providers = sys.argv[4:]  # "dense" or "<mode>+<optimizer>", e.g. skip+spafl-sgd-compact, skip+torch-sgd
case = next(c for c in M.LAYER_CASES if c.name == case_name)
dtype = M.bench_kernels.DTYPES["bfloat16"]
res = {}
for p in providers:
    mode, opt = (None, "torch-sgd") if p == "dense" else p.split("+")
    name = "dense" if mode is None else (f"spafl-{mode}+{opt}" if opt.startswith("spafl-") else f"spafl-{mode}")
    res.update(S._step_ops(name, S.layer_step_launches(case, dtype, density, mode, opt)))
out.mkdir(parents=True, exist_ok=True)
for d, spec in M.DEVICES.items():
    rows, launches = [], []
    for (provider, op), lst in res.items():
        base = {"device": d, "case": case.name, "density": density, "provider": provider, "op": op}
        rows.append({**base, **M.summarise(lst, spec)})
        launches += M.launch_rows(lst, spec, base)
    M.write_csv(out / f"{case.name}-bfloat16-{d}-steps.csv", rows, list(rows[0]))
    M.write_csv(out / f"{case.name}-bfloat16-{d}-steps-launches.csv", launches, M.LAUNCH_COLUMNS)
    print(M.markdown(rows, ("density", "provider", "op", "launches", "bytes", "model_us")), flush=True)
