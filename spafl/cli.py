"""spafl's command line: federated runs (train, compare), presets, plots and a demo (also ``python -m spafl``).

Every command that trains picks its threads itself (:class:`spafl._threads.ThreadPolicy`): one
torch intra-op thread unless ``--threads`` or ``OMP_NUM_THREADS`` says otherwise, and for the
federated runs one client worker per core (``--workers``); the run's header shows the choice.

``train`` runs federated SpaFL (see ``spafl.federated``): a preset, then a config file, then
flags; checkpoints every ``--checkpoint-every`` rounds and continues a run with ``--resume``.

``demo`` trains a small threshold MLP on the embedded 8x8 digits (no download) with SpaFL's
objective, cross-entropy plus ``th_coeff * sum exp(-tau)``, SGD with momentum 0.9 over the
weights AND the thresholds, and prints accuracy and density as neurons get pruned.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch import nn

from . import model_density, sparsify, threshold_penalty
from .datasets import load_digits


def _demo(args: argparse.Namespace, policy) -> int:
    from ._checks import interpreter_enabled, triton_available

    device = torch.device(args.device)
    if args.backend == "triton":  # refused here in a line, not by the first layer in a traceback
        if not triton_available():
            print("spafl demo: --backend triton needs the triton package (pip install 'spafl[triton]')",
                  file=sys.stderr)
            return 2
        if device.type != "cuda" and not interpreter_enabled():
            print(f"spafl demo: --backend triton needs a CUDA device (got {device}); use --backend auto or compact "
                  "on CPU, or set TRITON_INTERPRET=1 to run the kernels in Triton's interpreter (slow, for testing)",
                  file=sys.stderr)
            return 2
    torch.manual_seed(args.seed)
    images, labels = load_digits()
    g = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(labels), generator=g)
    n_test = len(labels) // 5
    test_idx, train_idx = order[:n_test], order[n_test:]
    x = images.reshape(len(labels), -1).to(device)
    y = labels.to(device)
    x = (x - x[train_idx].mean(0)) / (x[train_idx].std(0) + 1e-3)

    model = nn.Sequential(nn.Linear(64, args.hidden), nn.ReLU(), nn.Linear(args.hidden, args.hidden), nn.ReLU(),
                          nn.Linear(args.hidden, 10))
    sparsify(model, backend=args.backend, backward_mode=args.backward_mode)
    model.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    print(f"spafl demo: digits 8x8, {len(train_idx)} train / {n_test} test, MLP 64-{args.hidden}-{args.hidden}-10 "
          f"with threshold layers, device {device}, backend {args.backend}, backward {args.backward_mode}")
    print(f"threads: {policy.describe(workers=False)}")
    print(f"{'epoch':>5} {'loss':>8} {'test acc':>9} {'density':>8} {'weighted':>9}  layers")
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        model.train()
        perm = train_idx[torch.randperm(len(train_idx), generator=g)]
        total = 0.0
        for i in range(0, len(perm), args.batch_size):
            idx = perm[i : i + args.batch_size].to(device)
            loss = loss_fn(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            (loss + args.th_coeff * threshold_penalty(model)).backward()
            opt.step()
            total += loss.detach() * len(idx)
        if epoch % args.log_every == 0 or epoch == args.epochs:
            model.eval()
            with torch.no_grad():
                acc = (model(x[test_idx.to(device)]).argmax(1) == y[test_idx.to(device)]).float().mean().item()
            d = model_density(model)
            layers = " ".join(f"{v:.2f}" for v in d["layers"].values())
            print(f"{epoch:>5} {float(total) / len(train_idx):>8.4f} {acc * 100:>8.2f}% {d['mean']:>8.3f} "
                  f"{d['weighted']:>9.3f}  [{layers}]")
    print(f"done in {time.perf_counter() - start:.1f} s: test accuracy {acc * 100:.2f}%, "
          f"{d['mean'] * 100:.1f}% of neurons active (mean over layers), "
          f"{d['weighted'] * 100:.1f}% of weights in active rows")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .federated.cli import add_federated_commands
    from .federated.flags import add_thread_flags

    parser = argparse.ArgumentParser(prog="spafl", description="SpaFL's command line: federated runs (train, compare), "
                                     "presets, plots and a demo; also python -m spafl.")
    parser.add_argument("--version", action="version", version=f"spafl {__version__} (torch {torch.__version__})")
    sub = parser.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")
    demo = sub.add_parser("demo", help="train a threshold MLP on the embedded digits data set")
    demo.add_argument("--epochs", type=int, default=40)
    demo.add_argument("--hidden", type=int, default=256)
    demo.add_argument("--lr", type=float, default=0.02)
    demo.add_argument("--th-coeff", type=float, default=0.002, help="weight of the threshold penalty")
    demo.add_argument("--batch-size", type=int, default=64)
    demo.add_argument("--backend", choices=["auto", "compact", "reference", "triton"], default="auto")
    demo.add_argument("--backward-mode", choices=["exact", "skip", "sample"], default="exact")
    demo.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--log-every", type=int, default=5)
    add_thread_flags(demo, workers=False)
    demo.set_defaults(func=_demo)
    add_federated_commands(sub)
    flower = sub.add_parser("flower", help="run the Flower app on a local SuperLink that is stopped afterwards",
                            description="spafl's Flower commands (need the flower extra).")
    flower_sub = flower.add_subparsers(dest="flower_command", required=True, metavar="COMMAND")
    flower_run = flower_sub.add_parser(
        "run", help="flwr run on Flower's local simulation SuperLink, started here and stopped when the run ends",
        description="Start Flower's local simulation SuperLink (as flwr run would), run `flwr run ARGS --stream`, "
                    "then stop the SuperLink. A SuperLink already running there is used and left running. Exits 1 "
                    "when the SuperLink records the run as failed. Example: spafl flower run . --federation-config "
                    "\"num-supernodes=20\" --run-config \"rounds=10\"")
    flower_run.add_argument("flwr_args", nargs=argparse.REMAINDER, metavar="ARGS",
                            help="flwr run's arguments: the app folder (.), then its options")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:2] == ["flower", "run"] and not {"-h", "--help"} & set(argv[2:3]):
        # flwr run's own options pass through untouched (argparse would take them for spafl's)
        try:
            from .flower.run import flower_run
        except ImportError as e:
            print(f"spafl flower run: {e}", file=sys.stderr)
            return 2
        return flower_run(argv[2:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "demo":
        return args.func(args, parser)
    for name in ("epochs", "hidden", "batch_size", "log_every"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.lr <= 0 or args.th_coeff < 0:
        parser.error("--lr must be positive and --th-coeff non-negative")
    from .federated.flags import thread_policy

    policy = thread_policy(args, parser)
    try:
        with policy.applied():
            return args.func(args, policy)
    except KeyboardInterrupt:  # nothing to resume: the demo keeps no state
        print("spafl demo: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
