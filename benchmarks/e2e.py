"""End-to-end timings: a training step of the federated models, and a federated round.

    python benchmarks/e2e.py --data-root ../shared/data --csv e2e.csv      # both tables
    python benchmarks/e2e.py --tables step --models lenet5 --densities 1.0 0.1

step: one training step (forward, SpaFL's loss with the threshold penalty, backward, SGD with
momentum) of LeNet-5 (batch 64), Conv4 (batch 16), ResNet-18 (batch 64) and the ViT (batch 16).
Providers: dense (the same model with plain nn.Linear / nn.Conv2d layers, spafl.densify, same
weights, no penalty), masked (our layers on the reference backend: weight * mask, then the dense
call, as the authors' code) and spafl (our layers on the default backend, backend="auto": the
Triton kernels on CUDA, the CPU backend otherwise; the backend column says which ran). Every
threshold layer is set to each of --densities, and each model named by a --profiles entry is also
set to that profile's per-layer densities (late-spafl: LeNet-5 as a Fashion-MNIST run leaves it
late in training, conv1 0.6, conv2 0.3, fc3 0.05, fc4 1.0). The learning rate is 0, so the
masks stay at the set densities while every step does the full arithmetic. The three providers
are interleaved (benchmarks/_common.py).

round: the wall time of one round of each --presets entry in the simulator, at each of
--round-densities (a profile name, or one density for every layer), with the layers on the
reference backend (masked) and on the default backend (spafl). The densities are put in place by
building the initial model with each layer's thresholds from spafl.threshold_for_density (every
client and the server start from them), and kept there by a learning rate of 1e-12 (the
simulator needs a positive one): one step moves a weight or threshold by about 1e-12 of its
gradient, far below float32 resolution at these magnitudes, so no unit crosses its threshold
and every round does a real round's work at the set densities (the density column is the one
the round measured). After a warm-up round of each, the two simulators alternate rounds
(masked, spafl, spafl, masked, ...), --round-reps rounds each; round t of both samples the same
clients. Each round is printed as it ends; the two rows (median over the rounds, with spread)
when the preset's rounds are done. The preset's dataset is read from --data-root when present;
otherwise (CIFAR is not on this project's machines) synthetic images of its shape are used
(data column).

Columns: the machine and versions, threads; table, case, shape, data, dtype; profile (uniform
or the profile's name), layer_densities (what was set, per layer), density (mean over layers:
set for step rows, measured for round rows); provider, backend, op; reps, inner (calls per
sample); ms, ms_p20, ms_p80; speedup_vs_dense and speedup_vs_masked (baseline ms / this ms,
NaN where the baseline was not run) each with the _p20/_p80 interval of the paired
per-repetition ratios and a _noisy flag (that interval reaches beyond +-tolerance of the ratio,
or fewer than 3 repetitions: do not read the ratio; printed as '?'); noisy (either ratio is
noisy); the command.
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from _common import (
    Ratio,
    Timing,
    add_run_args,
    check_run_args,
    fmt_ms,
    fmt_ratio,
    interleaved,
    parser_for,
    ratio,
    ratio_columns,
    report,
    row_ratio,
    start,
    timestamp,
)

from spafl import densify, named_threshold_layers, threshold_for_density, threshold_penalty
from spafl.federated import Simulator, build_config
from spafl.federated.data import ImageDataset
from spafl.federated.datafiles import load_dataset
from spafl.federated.models import build_model

MODELS = {"lenet5": ((1, 28, 28), 64), "conv4": ((3, 32, 32), 16), "resnet18": ((3, 32, 32), 64),
          "vit": ((3, 32, 32), 16)}
# Per-layer densities of a model at a stage of training: {profile: {model: {layer: density}}}.
PROFILES = {"late-spafl": {"lenet5": {"conv1": 0.6, "conv2": 0.3, "fc3": 0.05, "fc4": 1.0}}}
ROUND_LR = 1e-12
COLUMNS = ("timestamp", "device", "torch", "triton", "python", "spafl", "threads", "table", "case", "shape", "data",
           "dtype", "profile", "layer_densities", "density", "provider", "backend", "op", "reps", "inner", "ms",
           "ms_p20", "ms_p80", "speedup_vs_dense", "speedup_vs_dense_p20", "speedup_vs_dense_p80",
           "speedup_vs_dense_noisy", "speedup_vs_masked", "speedup_vs_masked_p20", "speedup_vs_masked_p80",
           "speedup_vs_masked_noisy", "noisy", "command")


def set_density(model: torch.nn.Module, density: float | dict[str, float]) -> None:
    """Set every threshold layer of ``model`` to ``density`` (one for all, or ``{layer name:
    density}`` naming every threshold layer) with :func:`spafl.threshold_for_density`."""
    layers = dict(named_threshold_layers(model))
    if isinstance(density, dict):
        if set(density) != set(layers):
            raise ValueError(f"the densities name {sorted(density)}, the model's threshold layers are "
                             f"{sorted(layers)}")
    else:
        density = dict.fromkeys(layers, density)
    with torch.no_grad():
        for name, layer in layers.items():
            layer.threshold.copy_(threshold_for_density(layer.weight, density[name]))


def _describe(density: float | dict[str, float]) -> tuple[str, float]:
    """``(layer_densities text, mean over layers)`` of a density spec."""
    if isinstance(density, dict):
        return " ".join(f"{k}={v:g}" for k, v in density.items()), sum(density.values()) / len(density)
    return f"all={density:g}", density


def _backend(model: torch.nn.Module) -> str:
    from spafl._checks import resolve_backend

    _, layer = next(iter(named_threshold_layers(model)))
    return resolve_backend(layer.backend, layer.weight)


def _rows(timings: dict[str, Timing], tolerance: float, meta: dict, backends: dict) -> list[dict]:
    out = []
    for provider, t in timings.items():
        vs_dense = ratio(timings["dense"], t, tolerance) if "dense" in timings else Ratio.missing()
        vs_masked = ratio(timings["masked"], t, tolerance) if "masked" in timings else Ratio.missing()
        out.append({**meta, "provider": provider, "backend": backends[provider], "reps": len(t.samples),
                    "inner": t.inner, "ms": t.median, "ms_p20": t.p20, "ms_p80": t.p80,
                    **ratio_columns("speedup_vs_dense", vs_dense), **ratio_columns("speedup_vs_masked", vs_masked),
                    "noisy": vs_dense.noisy or vs_masked.noisy})
    return out


# --- step -----------------------------------------------------------------------------------


def step_specs(name: str, densities, profiles) -> list[tuple[str, float | dict]]:
    """``[(profile, density spec)]`` of a model: the uniform densities, then its profiles."""
    return [("uniform", d) for d in densities] + [(p, PROFILES[p][name]) for p in profiles if name in PROFILES[p]]


STEP_PROVIDERS = ("dense", "masked", "spafl")


def step_rows(name: str, specs, device, reps: int, min_sample_ms: float, tolerance: float,
              providers=STEP_PROVIDERS) -> Iterator[dict]:
    """Rows of the step table for model ``name``, a comparison at a time, of the ``providers``
    named (the others are built, for the shared weights, but not timed)."""
    shape, batch = MODELS[name]
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(batch, *shape, generator=g).to(device) for _ in range(4)]
    ys = [torch.randint(0, 10, (batch,), generator=g).to(device) for _ in range(4)]
    for profile, density in specs:
        models = {}
        for provider, backend in (("masked", "reference"), ("spafl", "auto")):
            torch.manual_seed(0)
            model = build_model(name, 10, backend=backend, collapse_density=None).to(device)
            set_density(model, density)
            models[provider] = model
        backends = {"dense": "torch", "masked": "reference", "spafl": _backend(models["spafl"])}
        models = {"dense": densify(copy.deepcopy(models["masked"])), **models}  # plain layers, same weights
        models = {p: m for p, m in models.items() if p in providers}
        steps = {}
        for provider, model in models.items():
            opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
            i = [0]

            def step(model=model, opt=opt, penalty=provider != "dense", i=i):
                i[0] = (i[0] + 1) % len(xs)
                loss = F.cross_entropy(model(xs[i[0]]), ys[i[0]])
                if penalty:
                    loss = loss + 0.002 * threshold_penalty(model)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            model.train()
            steps[provider] = step
        timings = interleaved(steps, device, reps, min_sample_ms)
        text, mean = _describe(density)
        meta = {"table": "step", "case": name, "shape": f"batch={batch} input={shape}", "data": "random",
                "dtype": "float32", "profile": profile, "layer_densities": text, "density": mean, "op": "train-step"}
        yield from _rows(timings, tolerance, meta, backends)


# --- round ----------------------------------------------------------------------------------


def _synthetic(shape, n_train: int, n_test: int, classes: int = 10) -> ImageDataset:
    g = torch.Generator().manual_seed(0)
    protos = torch.randint(0, 256, (classes, *shape), generator=g).float()

    def draw(n):
        y = torch.randint(0, classes, (n,), generator=g)
        x = (protos[y] + 40 * torch.randn((n, *shape), generator=g)).clamp(0, 255).to(torch.uint8)
        return x, y

    return ImageDataset("synthetic", *draw(n_train), *draw(n_test), classes, (0.5,) * shape[0], (0.25,) * shape[0])


SYNTHETIC = {"fmnist": ((1, 28, 28), 10), "cifar10": ((3, 32, 32), 10), "cifar100": ((3, 32, 32), 100)}


def round_dataset(preset: str, data_root: str | None, synthetic_size: int) -> tuple[ImageDataset, str]:
    """The preset's dataset (read from ``data_root``; the digits set ships with spafl) and its
    name, or synthetic images of its shape when it cannot be read."""
    name = build_config(preset, None, {}).dataset
    try:
        return load_dataset(name, data_root), name
    except (FileNotFoundError, ValueError):
        shape, classes = SYNTHETIC[name]
        data = _synthetic(shape, synthetic_size, synthetic_size // 5, classes)
        return data, f"synthetic {synthetic_size} train images"


def round_spec(text: str, model: str) -> float | dict[str, float] | None:
    """A --round-densities entry for ``model``: a density, a profile's densities, or None (the
    profile does not cover the model)."""
    if text in PROFILES:
        return PROFILES[text].get(model)
    return float(text)


def round_rows(preset: str, dataset: ImageDataset, data: str, profile: str, density, device, reps: int,
               tolerance: float, log=print) -> Iterator[dict]:
    """The two rows (masked, spafl) of one preset at one density spec, after ``reps``
    alternating rounds of each; each round is reported through ``log`` as it ends."""
    sims, measured = {}, {}
    for provider, backend in (("masked", "reference"), ("spafl", "auto")):
        config = build_config(preset, None, dict(rounds=reps + 1, backend=backend, device=str(device),
                                                 checkpoint_every=0, lr=ROUND_LR))

        def model_fn(config=config):
            model = build_model(config.model, dataset.num_classes, backend=config.backend,
                                backward_mode=config.backward_mode, sample_fraction=config.sample_fraction,
                                collapse_density=config.collapse_density)
            set_density(model, density)
            return model

        sims[provider] = Simulator(config, dataset=dataset, model_fn=model_fn)
        sims[provider].run_round()  # warm-up (compilation, caches)
    names = list(sims)
    samples = {p: [] for p in names}
    for r in range(reps):
        for j in range(len(names)):
            provider = names[(r + j) % len(names)]
            row = sims[provider].run_round()
            samples[provider].append(row["wall_s"] * 1e3)
            measured[provider] = row["density"]
            log(f"#   {preset} {profile} round {row['round']}: {provider} {row['wall_s']:.2f} s, density "
                f"{row['density']:.3f}")
    config = sims["masked"].config
    text, target = _describe(density)
    for provider, value in measured.items():
        if abs(value - target) > 0.01:
            log(f"# warning: {preset} {provider} measured density {value:.3f}, set {target:.3f}")
    backends = {"masked": "reference", "spafl": _backend(sims["spafl"].model)}
    timings = {p: Timing(tuple(samples[p])) for p in names}
    meta = {"table": "round", "case": preset, "shape": f"{config.num_clients} clients, {config.clients_per_round} "
            "per round", "data": data, "dtype": "float32", "profile": profile, "layer_densities": text,
            "op": "fl-round"}
    for row in _rows(timings, tolerance, meta, backends):
        yield {**row, "density": measured[row["provider"]]}


# --- command line ---------------------------------------------------------------------------


TABLE_HEADER = (f"{'table':<6}{'case':<15}{'profile':<11}{'density':>8} {'provider':<9}{'backend':<10}"
                f"{'ms (p20-p80)':<26}{'vs dense (p20-p80)':<24}vs masked (p20-p80)")


def show_row(r: dict) -> None:
    vs_dense, vs_masked = row_ratio(r, "speedup_vs_dense"), row_ratio(r, "speedup_vs_masked")
    print(f"{r['table']:<6}{r['case']:<15}{r['profile']:<11}{r['density']:>8.3f} {r['provider']:<9}{r['backend']:<10}"
          f"{fmt_ms(r['ms'], r['ms_p20'], r['ms_p80']):<25} {fmt_ratio(vs_dense):<23} {fmt_ratio(vs_masked)}",
          flush=True)


def build_parser(cuda: bool):
    p = parser_for(__doc__)
    p.add_argument("--tables", nargs="+", choices=["step", "round"], default=["step", "round"],
                   help="step: a training step per model; round: a federated round per preset")
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS), help="models of the step table")
    p.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.5, 0.2, 0.1], metavar="D",
                   help="uniform densities of the step table (every threshold layer), in [0, 1]")
    p.add_argument("--profiles", nargs="*", choices=sorted(PROFILES), default=sorted(PROFILES),
                   help="per-layer density profiles of the step table, for the models they cover")
    p.add_argument("--providers", nargs="+", choices=STEP_PROVIDERS, default=list(STEP_PROVIDERS),
                   help="providers of the step table (leaving out masked, the slowest, shortens a run; a ratio "
                        "to a provider left out is NaN)")
    p.add_argument("--presets", nargs="+", default=["fmnist-lenet5"], help="simulator presets of the round table")
    p.add_argument("--round-densities", nargs="+", default=["late-spafl"], metavar="SPEC",
                   help=f"densities of the round table: a profile ({', '.join(sorted(PROFILES))}; skipped for a "
                        "preset whose model it does not cover) or one density for every layer")
    p.add_argument("--round-reps", type=int, default=5 if cuda else 3,
                   help="measured rounds per provider in the round table, after a warm-up round")
    p.add_argument("--data-root", default=None, help="folder holding FashionMNIST/raw (torchvision's layout)")
    p.add_argument("--synthetic-size", type=int, default=50000, help="training images of a synthetic dataset")
    add_run_args(p, default_reps=30 if cuda else 10, default_min_sample_ms=1.0 if cuda else 2.0)
    return p


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    p = build_parser(cuda)
    args = p.parse_args(argv)
    check_run_args(p, args)
    bad = [d for d in args.densities if not (math.isfinite(d) and 0.0 <= d <= 1.0)]
    if bad:
        p.error(f"densities must be in [0, 1], got {bad}")
    for spec in args.round_densities:
        if spec not in PROFILES:
            try:
                value = float(spec)
            except ValueError:
                p.error(f"--round-densities takes profiles ({', '.join(sorted(PROFILES))}) or densities, got {spec!r}")
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                p.error(f"densities must be in [0, 1], got {[value]}")
    if args.round_reps < 1:
        p.error(f"--round-reps must be at least 1, got {args.round_reps}")
    if args.synthetic_size < 10:
        p.error(f"--synthetic-size must be at least 10, got {args.synthetic_size}")
    for preset in args.presets if "round" in args.tables else []:
        try:
            build_config(preset, None, {})
        except ValueError as e:
            p.error(str(e))
    device = torch.device("cuda" if cuda else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    sink, base = start(p, args, device, __file__, argv, COLUMNS, TABLE_HEADER)

    def rows() -> Iterator[dict]:
        if "step" in args.tables:
            for name in args.models:
                specs = step_specs(name, args.densities, args.profiles)
                for row in step_rows(name, specs, device, args.reps, args.min_sample_ms, args.tolerance,
                                     args.providers):
                    yield {"timestamp": timestamp(), **base, **row}
        if "round" in args.tables:
            for preset in args.presets:
                dataset, data = round_dataset(preset, args.data_root, args.synthetic_size)
                model = build_config(preset, None, {}).model
                for text in args.round_densities:
                    density = round_spec(text, model)
                    if density is None:
                        print(f"# {preset}: profile {text} does not cover {model}; skipped", flush=True)
                        continue
                    profile = text if text in PROFILES else "uniform"
                    for row in round_rows(preset, dataset, data, profile, density, device, args.round_reps,
                                          args.tolerance, log=lambda s: print(s, flush=True)):
                        yield {"timestamp": timestamp(), **base, **row}

    return report(rows(), sink, show_row)


if __name__ == "__main__":
    sys.exit(main())
