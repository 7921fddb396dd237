"""A federated SpaFL run from Python: the default preset (`digits-cnn`, the embedded digits),
a few rounds, with the thread policy `spafl train` uses.

    python examples/federated_run.py [--rounds 15] [--out runs/example]

Clients keep their own weights; only the per-unit thresholds travel. With --out the run writes
its folder (history, masks, checkpoints) as `spafl train` does; without it nothing is written.
"""

import argparse

from spafl.federated import Simulator, ThreadPolicy, build_config


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--clients", type=int, default=None, help="number of clients (default: the preset's 20)")
    p.add_argument("--out", default=None, help="a run folder to write (default: none)")
    args = p.parse_args(argv)
    overrides = {"rounds": args.rounds}
    if args.clients is not None:
        overrides.update(num_clients=args.clients, clients_per_round=min(5, args.clients))
    config = build_config("digits-cnn", overrides=overrides)
    policy = ThreadPolicy.choose(clients_per_round=config.clients_per_round, device=config.device)
    print(f"{config.num_clients} clients, {config.clients_per_round} a round, {config.rounds} rounds; "
          f"threads: {policy.describe()}")
    with policy.applied(), Simulator(config, workers=policy.workers, out_dir=args.out) as sim:
        history = sim.run()
    for row in history:
        print(f"round {row['round']}: accuracy {row['acc_mean']:.2f}% (mean over clients), "
              f"density {row['density']:.3f}, {row['bytes_up'] + row['bytes_down']} bytes exchanged")
    return history


if __name__ == "__main__":
    main()
