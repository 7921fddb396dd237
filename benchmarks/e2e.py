"""End-to-end timings: a training step of the federated models, and a federated round.

    python benchmarks/e2e.py --csv e2e.csv                       # both tables
    python benchmarks/e2e.py --tables step --models lenet5 --densities 1.0 0.1

``step``: one training step (forward, SpaFL's loss with the threshold penalty, backward, SGD
with momentum) of LeNet-5 (batch 64), Conv4 (batch 16), ResNet-18 (batch 64) and the ViT
(batch 16), with every threshold layer set to ``density``, against the same model with plain
``nn.Linear`` / ``nn.Conv2d`` layers (``spafl.densify``, same weights). Providers: ``dense``
(the plain model), ``masked`` (our layers on the reference path: weight * mask, then the dense
call, as the authors' code) and ``spafl`` (our layers on the default backend: the Triton
kernels on CUDA; on CPU that is the reference path too). The learning rate is 0 so that the
masks stay at the set density while every step does the full arithmetic.

``round``: the wall time of one round of the ``fmnist-lenet5`` and ``cifar10-conv4`` presets in
the simulator, with the layers on the reference path (``masked``) and on the default backend
(``spafl``), after one warm-up round. Fashion-MNIST is read from ``--data-root`` when present;
otherwise, and for CIFAR-10 (not on this project's machines), synthetic images of the right
shape are used (``data`` column).
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys

import torch
import torch.nn.functional as F
from _common import append_csv, environment, time_ms, timestamp

from spafl import densify, threshold_for_density, threshold_layers, threshold_penalty
from spafl.federated import Simulator, build_config
from spafl.federated.data import ImageDataset, load_dataset
from spafl.federated.models import build_model

MODELS = {"lenet5": ((1, 28, 28), 64), "conv4": ((3, 32, 32), 16), "resnet18": ((3, 32, 32), 64),
          "vit": ((3, 32, 32), 16)}
COLUMNS = ("timestamp", "device", "torch", "triton", "python", "spafl", "table", "case", "shape", "data", "dtype",
           "density", "provider", "op", "ms", "ms_p20", "ms_p80", "speedup_vs_dense", "speedup_vs_masked", "command")


def set_density(model: torch.nn.Module, density: float) -> None:
    with torch.no_grad():
        for _, layer in threshold_layers(model):
            layer.threshold.copy_(threshold_for_density(layer.weight, density))


def step_rows(name: str, densities, device, reps: int, env: dict, command: str) -> list[dict]:
    shape, batch = MODELS[name]
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(batch, *shape, generator=g).to(device) for _ in range(4)]
    ys = [torch.randint(0, 10, (batch,), generator=g).to(device) for _ in range(4)]
    rows = []
    for density in densities:
        models = {}
        for provider, backend in (("masked", "reference"), ("spafl", "auto")):
            torch.manual_seed(0)
            model = build_model(name, 10, backend=backend, collapse_density=None).to(device)
            set_density(model, density)
            models[provider] = model
        models = {"dense": densify(copy.deepcopy(models["masked"])), **models}  # plain layers, same weights
        for provider, model in models.items():
            opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
            penalty = provider != "dense"
            i = [0]

            def step(model=model, opt=opt, penalty=penalty, i=i):
                i[0] = (i[0] + 1) % len(xs)
                loss = F.cross_entropy(model(xs[i[0]]), ys[i[0]])
                if penalty:
                    loss = loss + 0.002 * threshold_penalty(model)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            model.train()
            ms, lo, hi = time_ms(step, device, reps)
            rows.append({"table": "step", "case": name, "shape": f"batch={batch} input={shape}", "data": "random",
                         "dtype": "float32", "density": density, "provider": provider, "op": "train-step",
                         "ms": ms, "ms_p20": lo, "ms_p80": hi})
    return _finish(rows, env, command)


def _synthetic(shape, n_train: int, n_test: int, classes: int = 10) -> ImageDataset:
    g = torch.Generator().manual_seed(0)
    protos = torch.randint(0, 256, (classes, *shape), generator=g).float()

    def draw(n):
        y = torch.randint(0, classes, (n,), generator=g)
        x = (protos[y] + 40 * torch.randn((n, *shape), generator=g)).clamp(0, 255).to(torch.uint8)
        return x, y

    return ImageDataset("synthetic", *draw(n_train), *draw(n_test), classes, (0.5,) * shape[0], (0.25,) * shape[0])


def round_rows(preset: str, data_root: str | None, device, env: dict, command: str, synthetic_size: int) -> list:
    dataset, data = None, preset.split("-")[0]
    if preset.startswith("fmnist") and data_root:
        try:
            dataset = load_dataset("fmnist", data_root)
        except (FileNotFoundError, ValueError):
            dataset = None
    if dataset is None:
        shape = (1, 28, 28) if preset.startswith("fmnist") else (3, 32, 32)
        dataset = _synthetic(shape, synthetic_size, synthetic_size // 5)
        data = f"synthetic {synthetic_size} train images"
    rows = []
    for provider, backend in (("masked", "reference"), ("spafl", "auto")):
        config = build_config(preset, None, dict(rounds=2, backend=backend, device=str(device), checkpoint_every=0))
        sim = Simulator(config, dataset=dataset)
        sim.run_round()  # warm-up (kernel compilation, caches)
        row = sim.run_round()
        rows.append({"table": "round", "case": preset, "shape": f"{config.num_clients} clients, "
                     f"{config.clients_per_round} per round", "data": data, "dtype": "float32",
                     "density": row["density"], "provider": provider, "op": "fl-round", "ms": row["wall_s"] * 1e3,
                     "ms_p20": float("nan"), "ms_p80": float("nan")})
    return _finish(rows, env, command)


def _finish(rows: list[dict], env: dict, command: str) -> list[dict]:
    def base(r, provider):
        return next((x["ms"] for x in rows if x["provider"] == provider and x["case"] == r["case"]
                     and (x["density"] == r["density"] or r["table"] == "round")), float("nan"))

    for r in rows:
        r.update({"timestamp": timestamp(), **{k: env.get(k) for k in ("device", "torch", "triton", "python", "spafl")},
                  "command": command})
        r["speedup_vs_dense"] = base(r, "dense") / r["ms"]
        r["speedup_vs_masked"] = base(r, "masked") / r["ms"]
    return [{k: r[k] for k in COLUMNS} for r in rows]


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tables", nargs="+", choices=["step", "round"], default=["step", "round"])
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.5, 0.2, 0.1])
    p.add_argument("--presets", nargs="+", default=["fmnist-lenet5", "cifar10-conv4"])
    p.add_argument("--data-root", default=None)
    p.add_argument("--synthetic-size", type=int, default=50000, help="training images of a synthetic dataset")
    p.add_argument("--reps", type=int, default=20 if cuda else 5)
    p.add_argument("--csv", default=None)
    args = p.parse_args(argv)
    bad = [d for d in args.densities if not 0.0 <= d <= 1.0]
    if bad:
        p.error(f"densities must be in [0, 1], got {bad}")
    if args.reps < 1:
        p.error(f"--reps must be at least 1, got {args.reps}")
    device = torch.device("cuda" if cuda else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    env = environment(device)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    print(f"# {env['device']}; torch {env['torch']}, triton {env['triton']}; {command}")
    rows = []
    if "step" in args.tables:
        for name in args.models:
            rows += step_rows(name, args.densities, device, args.reps, env, command)
    if "round" in args.tables:
        for preset in args.presets:
            rows += round_rows(preset, args.data_root, device, env, command, args.synthetic_size)
    print(f"{'table':<6}{'case':<15}{'density':>8} {'provider':<8}{'ms':>11}{'vs dense':>9}{'vs masked':>10}")
    for r in rows:
        print(f"{r['table']:<6}{r['case']:<15}{r['density']:>8.3f} {r['provider']:<8}{r['ms']:>11.2f}"
              f"{r['speedup_vs_dense']:>8.2f}x{r['speedup_vs_masked']:>9.2f}x")
    if args.csv:
        append_csv(args.csv, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
