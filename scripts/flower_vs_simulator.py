"""One configuration run twice with the same seed: on Flower's simulation engine (one virtual
SuperNode per client, one CPU thread per ClientApp) and in the in-process simulator (one CPU
thread); writes both histories, the per-round comparison and the bytes measured on the Flower
messages.

    python scripts/flower_vs_simulator.py --preset fmnist-lenet5 --data-root ../shared/data --rounds 3 \\
        --out results/flower-fmnist
"""

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from spafl._env import environment
from spafl.federated import Simulator, build_config
from spafl.federated.history import TIMING_FIELDS
from spafl.flower import simulate

COLUMNS = ("round", "acc_mean", "density", "bytes_down", "bytes_up", "comm_bits_paper", "wire_payload_down",
           "wire_payload_up", "wire_message_down", "wire_message_up", "wire_eval")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="digits-cnn")
    parser.add_argument("--method", default="spafl")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    config = build_config(args.preset, None, dict(rounds=args.rounds, data_root=args.data_root, device="cpu",
                                                  method=args.method))
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    strategy = simulate(config, state_dir=args.out / "flower-state", out_dir=args.out / "flower")
    flower_s = time.perf_counter() - start
    torch.set_num_threads(1)
    start = time.perf_counter()
    sim = Simulator(config, out_dir=args.out / "simulator")
    sim.run()
    simulator_s = time.perf_counter() - start
    differing = sorted({k for a, b in zip(sim.history, strategy.history, strict=True) for k in a
                        if k not in TIMING_FIELDS and a[k] != b[k]})
    uplinks = [e for e in strategy.wire_log if e["kind"] == "train" and e["direction"] == "up"]
    report = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "environment": environment(torch.device("cpu")),
        "config": config.to_dict(),
        "identical_to_simulator": not differing,
        "differing_columns": differing,
        "flower_s": flower_s,
        "simulator_s": simulator_s,
        "uplink_tensors": sorted({json.dumps(e["tensors"], sort_keys=True) for e in uplinks}),
        "uplink_records": sorted({json.dumps(e["records"], sort_keys=True) for e in uplinks}),
        "rows": [{k: row.get(k) for k in COLUMNS} for row in strategy.history],
    }
    (args.out / "comparison.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: report[k] for k in ("identical_to_simulator", "differing_columns", "flower_s",
                                             "simulator_s")}))
    for row in report["rows"]:
        print(row)
    return 0 if not differing else 1


if __name__ == "__main__":
    sys.exit(main())
