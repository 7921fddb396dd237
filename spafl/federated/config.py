"""Run configuration of the federated simulator, and the presets of the paper's table.

A run is fully described by one :class:`FedConfig`; presets are partial configs layered as
``preset < config file < command-line flags``. ``validate`` turns an impossible configuration
into one ``ValueError`` that lists every problem, before any data is read.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

BACKENDS = ("auto", "compact", "reference", "triton")
METHODS = ("spafl", "fedavg", "local", "sparsyfed", "topk")
DATASETS = ("digits", "fmnist", "cifar10", "cifar100")
MODELS = ("digits-cnn", "lenet5", "conv4", "vit", "resnet18")
PENALTY_SCHEDULES = ("sigmoid", "constant")
OPTIMIZER_LIFETIMES = ("per-round", "per-run")
COLLAPSE_TIMINGS = ("current", "previous")
RNG_MODES = ("keyed", "global")
NORMALIZATIONS = ("standard", "raw")
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")
AGGREGATORS = ("mean", "median", "trimmed-mean")
# The server's limits against the cohort: None takes the method's default, inf turns one off.
COHORT_LIMITS = ("cohort_clip", "cohort_against", "cohort_shift", "cohort_drift", "cohort_drift_shift",
                 "cohort_drift_against", "aggregate_drift", "aggregate_shift", "aggregate_against", "aggregate_energy")
_DATASET_SHAPES = {"digits": (1, 8, 8), "fmnist": (1, 28, 28), "cifar10": (3, 32, 32), "cifar100": (3, 32, 32)}
_MODEL_INPUTS = {"digits-cnn": (1, 8, 8), "lenet5": (1, 28, 28), "conv4": (3, 32, 32), "vit": (3, 32, 32),
                 "resnet18": (3, 32, 32)}


@dataclass
class FedConfig:
    """Everything that determines a run (same config and seed: same history).

    Algorithm (``docs``: spafl-algorithm.md sections 2-3): ``num_clients`` N, ``clients_per_round``
    K sampled uniformly without replacement, ``rounds``; local SGD with ``momentum`` over weights
    and thresholds at ``lr * lr_decay**round``, ``local_epochs`` passes of ``batch_size``,
    gradient-norm clipping at ``clip`` (None: off); objective ``CE + lambda_t * sum exp(-tau)``
    with ``lambda_t = th_coeff * sigmoid(10 t / penalty_scheduler - 5)`` (``penalty_schedule
    = "sigmoid"``) or ``th_coeff`` (``"constant"``); the threshold-guided weight update
    ``th_update``; the collapse guard at ``collapse_density``.

    Data: ``dataset`` read from ``data_root`` (torchvision's on-disk layout; ``download`` uses
    torchvision when installed), Dirichlet(``alpha``) split of train and test sets; pixels
    ``normalize``d to zero mean / unit variance per channel (``"standard"``) or left as 0..255
    floats (``"raw"``, what the reference code feeds its FMNIST LeNet-5); CIFAR crop-and-flip
    ``augment``ation; ``drop_last`` partial batches; re-draw the split until every client has
    ``min_train_samples``.

    Method (``spafl.federated.methods``): ``method`` is ``spafl``, ``fedavg`` (dense, sample-
    weighted average of the whole model), ``local`` (no communication), ``sparsyfed``
    (Powerpropagation with exponent ``beta``, or per layer from the spectral norm with
    ``spectral_exponent``; activation pruning; one global Top-K at ``sparsity`` after local
    training) or ``topk`` (SparsyFed's ablation: beta 1, no activation pruning). The training
    settings above are shared by all methods (the threshold ones only apply to SpaFL); with
    ``lr_final`` set, the learning rate decays exponentially from ``lr`` to ``lr_final`` over
    ``rounds`` (SparsyFed's schedule) instead of ``lr * lr_decay**t``.

    How the reference code runs: ``optimizer_lifetime`` ``"per-round"`` (a fresh SGD optimiser
    every round, as the CIFAR scripts) or ``"per-run"`` (one per client for its whole life, as
    the FMNIST script: the momentum buffers carry over between the client's rounds, kept in its
    state; the learning rate still follows the schedule); the collapse guard's
    ``collapse_timing`` (``"current"``: the density of this forward's mask; ``"previous"``: the
    density of the layer's previous forward, as the reference layers) and ``collapse_in_eval``
    (the guard also runs in evaluation, and a reset there persists in the client's state);
    ``rng``: ``"keyed"`` (every draw keyed by ``(seed, round, client)``) or ``"global"`` (the
    reference code's sequential draws, :class:`spafl.federated.keys.SequentialStreams`).
    """

    method: str = "spafl"
    sparsity: float = 0.9
    beta: float = 1.25
    spectral_exponent: bool = False
    # data
    dataset: str = "digits"
    data_root: str | None = None
    download: bool = False
    normalize: str = "standard"
    augment: bool = False
    alpha: float = 0.5
    min_train_samples: int = 1
    # model
    model: str = "digits-cnn"
    backend: str = "auto"
    backward_mode: str = "exact"
    sample_fraction: float = 0.25
    collapse_density: float | None = 0.01
    # federation
    num_clients: int = 20
    clients_per_round: int = 5
    rounds: int = 60
    th_update: bool = True
    # local training
    local_epochs: int = 2
    batch_size: int = 16
    drop_last: bool = False
    lr: float = 0.05
    lr_decay: float = 1.0
    lr_final: float | None = None
    momentum: float = 0.9
    weight_decay: float = 0.0
    clip: float | None = None
    th_coeff: float = 0.002
    penalty_schedule: str = "sigmoid"
    penalty_scheduler: float = 1.0
    # how the reference code runs
    optimizer_lifetime: str = "per-round"
    collapse_timing: str = "current"
    collapse_in_eval: bool = False
    rng: str = "keyed"
    # run
    seed: int = 0
    device: str = "auto"
    # ``memory_format`` of a model with convolutions: "auto" (channels-last on CUDA, where the
    # Triton convolutions read and write channels-last tensors in place and an NCHW activation
    # would be converted at every call; contiguous elsewhere), "channels_last" or "contiguous"
    # (build.initial_model)
    memory_format: str = "auto"
    eval_batch_size: int = 1024
    checkpoint_every: int = 10
    mask_layer: str | None = None
    # server-side defences against hostile or broken clients (rules.validate_update,
    # rules.aggregate_tensors, methods.Method.aggregate): ``aggregator`` "mean" (the method's
    # own: uniform for SpaFL, sample-weighted for the others), or the coordinate-wise "median"
    # or "trimmed-mean" (dropping floor(trim_fraction * updates) values at each end), both
    # unweighted; ``update_bounds`` rejects updates no legitimate client's local SGD can reach,
    # with every gradient coordinate bounded by ``clip`` when clipping is on, else by
    # ``grad_bound`` (None: rules.DEFAULT_GRAD_BOUND); a run stops with an error after
    # ``max_failed_rounds`` rounds in a row that aggregate nothing (0: never); ``rollback_depth``:
    # how many of the last global states that cohorts trained from successfully the server
    # keeps, to restore one (one level further back each time) after a round that showed no
    # cohort can train from the global state (more than half the sampled cohort trained and
    # had its update rejected, or failed in training on its values; such a round aggregates
    # nothing: engine.RollbackRing; 0: off);
    # ``cohort_clip``: each accepted update's deviation from the global state is clipped, per
    # tensor, to this many times the round's median deviation norm (rules.clip_to_cohort; None:
    # the method's default, ``Method.cohort_clip``; inf: off);
    # ``cohort_against``: the component of that deviation against the cohort's median direction
    # is cut to this many times the same median (None: the method's default,
    # ``Method.cohort_against``; inf: off); ``cohort_shift``: a client's shift of a whole tensor
    # (every value one way) is kept within this many times that median of the cohort's median
    # shift (None: ``Method.cohort_shift``; inf: off); ``cohort_drift``: a client's deviations
    # from the cohort's centre, summed over the rounds it took part in, are kept within this
    # many median deviations times sqrt(rounds) (rules.CohortMemory; None:
    # ``Method.cohort_drift``; inf: off), and that sum's component along the all-ones direction
    # (a whole tensor one way) within ``cohort_drift_shift`` times the same (None:
    # ``Method.cohort_drift_shift``; inf: off), and its rounds' components against each
    # round's centre direction, summed, within ``cohort_drift_against`` times the same (None:
    # ``Method.cohort_drift_against``; inf: off); ``aggregate_drift`` / ``aggregate_shift`` /
    # ``aggregate_against``: the accepted mean's deviations from the cohort's coordinate-wise
    # trimmed mean, summed over the rounds whoever sent them, are kept within this many median
    # deviations times sqrt(rounds) in norm / along the all-ones direction / against the
    # cohort's direction (rules.AggregateMemory; None: the method's; inf: off; the mean
    # aggregator only); ``aggregate_energy``: the root mean square of the same deviations' norms
    # over the rounds (plus rules.ENERGY_SLACK_ROUNDS), whatever their directions, within this
    # many median deviations (None: the method's; inf: off).
    aggregator: str = "mean"
    trim_fraction: float = 0.2
    update_bounds: bool = True
    grad_bound: float | None = None
    max_failed_rounds: int = 3
    rollback_depth: int = 3
    cohort_clip: float | None = None
    cohort_against: float | None = None
    cohort_shift: float | None = None
    cohort_drift: float | None = None
    cohort_drift_shift: float | None = None
    cohort_drift_against: float | None = None
    aggregate_drift: float | None = None
    aggregate_shift: float | None = None
    aggregate_against: float | None = None
    aggregate_energy: float | None = None

    def replace(self, **changes: Any) -> FedConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> FedConfig:
        """Raise ``ValueError`` naming every impossible setting; return ``self``."""
        errors = []

        def need(ok: bool, message: str) -> None:
            if not ok:
                errors.append(message)

        need(self.method in METHODS, f"method must be one of {METHODS}, got {self.method!r}")
        need(self.memory_format in MEMORY_FORMATS,
             f"memory_format must be one of {MEMORY_FORMATS}, got {self.memory_format!r}")
        need(_is_real(self.sparsity) and 0 <= self.sparsity < 1, f"sparsity must be in [0, 1), got {self.sparsity!r}")
        need(_is_real(self.beta) and self.beta >= 1, f"beta must be a finite number >= 1, got {self.beta!r}")
        need(self.lr_final is None or (_is_real(self.lr_final) and self.lr_final > 0),
             f"lr_final must be None or a positive number, got {self.lr_final!r}")
        need(not (self.spectral_exponent and self.method != "sparsyfed"),
             f"spectral_exponent is a SparsyFed setting; method is {self.method!r}")
        need(self.dataset in DATASETS, f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        need(self.model in MODELS, f"model must be one of {MODELS}, got {self.model!r}")
        if self.dataset in DATASETS and self.model in MODELS:
            need(_DATASET_SHAPES[self.dataset] == _MODEL_INPUTS[self.model],
                 f"model {self.model!r} takes {_MODEL_INPUTS[self.model]} inputs but dataset {self.dataset!r} "
                 f"has {_DATASET_SHAPES[self.dataset]} images")
        need(self.normalize in NORMALIZATIONS, f"normalize must be one of {NORMALIZATIONS}, got {self.normalize!r}")
        need(self.penalty_schedule in PENALTY_SCHEDULES,
             f"penalty_schedule must be one of {PENALTY_SCHEDULES}, got {self.penalty_schedule!r}")
        need(self.optimizer_lifetime in OPTIMIZER_LIFETIMES,
             f"optimizer_lifetime must be one of {OPTIMIZER_LIFETIMES}, got {self.optimizer_lifetime!r}")
        need(self.collapse_timing in COLLAPSE_TIMINGS,
             f"collapse_timing must be one of {COLLAPSE_TIMINGS}, got {self.collapse_timing!r}")
        need(isinstance(self.collapse_in_eval, bool),
             f"collapse_in_eval must be True or False, got {self.collapse_in_eval!r}")
        need(self.rng in RNG_MODES, f"rng must be one of {RNG_MODES}, got {self.rng!r}")
        for name in ("num_clients", "clients_per_round", "rounds", "local_epochs", "batch_size", "eval_batch_size",
                     "min_train_samples"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                 f"{name} must be a positive integer, got {value!r}")
        need(isinstance(self.checkpoint_every, int) and self.checkpoint_every >= 0,
             f"checkpoint_every must be a non-negative integer (0: only at the end), got {self.checkpoint_every!r}")
        if isinstance(self.num_clients, int) and isinstance(self.clients_per_round, int):
            need(self.clients_per_round <= self.num_clients,
                 f"clients_per_round ({self.clients_per_round}) cannot exceed num_clients ({self.num_clients})")
        for name in ("alpha", "lr", "lr_decay", "penalty_scheduler"):
            value = getattr(self, name)
            need(_is_real(value) and value > 0, f"{name} must be a positive finite number, got {value!r}")
        for name in ("momentum", "weight_decay", "th_coeff"):
            value = getattr(self, name)
            need(_is_real(value) and value >= 0, f"{name} must be a non-negative finite number, got {value!r}")
        need(_is_real(self.momentum) and self.momentum < 1, f"momentum must be below 1, got {self.momentum!r}")
        need(self.clip is None or (_is_real(self.clip) and self.clip > 0),
             f"clip must be None or a positive number, got {self.clip!r}")
        need(self.collapse_density is None or (_is_real(self.collapse_density) and 0 <= self.collapse_density < 1),
             f"collapse_density must be None or in [0, 1), got {self.collapse_density!r}")
        need(self.backend in BACKENDS, f"backend must be one of {BACKENDS}, got {self.backend!r}")
        need(self.backward_mode in ("exact", "skip", "sample"),
             f"backward_mode must be exact, skip or sample, got {self.backward_mode!r}")
        need(_is_real(self.sample_fraction) and 0 < self.sample_fraction <= 1,
             f"sample_fraction must be in (0, 1], got {self.sample_fraction!r}")
        # one 32-bit word: the keyed streams' keys are collision-free only then (keys.py)
        need(isinstance(self.seed, int) and not isinstance(self.seed, bool) and 0 <= self.seed < 2**32,
             f"seed must be an integer in [0, 2**32), got {self.seed!r}")
        need(isinstance(self.device, str) and _DEVICE.fullmatch(self.device) is not None,
             f"device must be auto, cpu, cuda or cuda:<index>, got {self.device!r}")
        need(self.aggregator in AGGREGATORS, f"aggregator must be one of {AGGREGATORS}, got {self.aggregator!r}")
        need(_is_real(self.trim_fraction) and 0 <= self.trim_fraction < 0.5,
             f"trim_fraction must be in [0, 0.5), got {self.trim_fraction!r}")
        if (self.aggregator == "trimmed-mean" and _is_real(self.trim_fraction)
                and isinstance(self.clients_per_round, int)):
            need(int(self.trim_fraction * self.clients_per_round) >= 1,
                 f"trimmed-mean with trim_fraction {self.trim_fraction} trims nothing from {self.clients_per_round} "
                 f"updates (floor({self.trim_fraction} * {self.clients_per_round}) = 0): raise trim_fraction to at "
                 f"least 1/clients_per_round or use aggregator 'median'")
        need(isinstance(self.update_bounds, bool), f"update_bounds must be true or false, got {self.update_bounds!r}")
        need(self.grad_bound is None or (_is_real(self.grad_bound) and self.grad_bound > 0),
             f"grad_bound must be None or a positive finite number, got {self.grad_bound!r}")
        need(self.cohort_clip is None or self.cohort_clip == math.inf
             or (_is_real(self.cohort_clip) and self.cohort_clip >= 1),
             f"cohort_clip must be None (the method's default), inf (off) or a number >= 1, got "
             f"{self.cohort_clip!r}")
        for name in COHORT_LIMITS[1:]:  # (cohort_clip above: at least 1)
            value = getattr(self, name)
            need(value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0),
                 f"{name} must be None (the method's default), a positive number or inf (off), got {value!r}")
        need(isinstance(self.max_failed_rounds, int) and not isinstance(self.max_failed_rounds, bool)
             and self.max_failed_rounds >= 0,
             f"max_failed_rounds must be a non-negative integer (0: never stop), got {self.max_failed_rounds!r}")
        need(isinstance(self.rollback_depth, int) and not isinstance(self.rollback_depth, bool)
             and self.rollback_depth >= 0,
             f"rollback_depth must be a non-negative integer (0: no rollback), got {self.rollback_depth!r}")
        if len(errors) == 1:
            raise ValueError(f"invalid configuration: {errors[0]}")
        if errors:
            raise ValueError("invalid configuration:\n  - " + "\n  - ".join(errors))
        return self


# What ``device`` may name: torch's own spellings of the host and of a CUDA device.
_DEVICE = re.compile(r"auto|cpu(:0)?|cuda(:\d+)?")


def _is_real(value: Any) -> bool:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return number and value == value and abs(value) != float("inf")


# The authors' scripts (spafl-algorithm.md section 6). CIFAR uses a constant penalty and
# gradient clipping; FMNIST the sigmoid schedule, no clipping and raw 0..255 pixels. The FMNIST
# client builds its SGD optimiser once (momentum carries over between its rounds), the CIFAR
# clients one per round. The digits preset keeps a fresh optimiser per round.
PRESETS: dict[str, dict[str, Any]] = {
    "digits-cnn": dict(
        dataset="digits", model="digits-cnn", num_clients=20, clients_per_round=5, alpha=0.5, rounds=60,
        lr=0.05, th_coeff=0.002, local_epochs=2, batch_size=16, penalty_schedule="sigmoid", penalty_scheduler=1.0,
        mask_layer="fc3",
    ),
    "fmnist-lenet5": dict(
        dataset="fmnist", model="lenet5", num_clients=100, clients_per_round=10, alpha=0.2, rounds=500,
        lr=0.001, th_coeff=0.002, local_epochs=5, batch_size=64, penalty_schedule="sigmoid", penalty_scheduler=1.0,
        normalize="raw", augment=False, drop_last=False, optimizer_lifetime="per-run", collapse_timing="previous",
    ),
    "cifar10-conv4": dict(
        dataset="cifar10", model="conv4", num_clients=100, clients_per_round=10, alpha=0.1, rounds=500,
        lr=0.01, th_coeff=0.00015, local_epochs=5, batch_size=16, clip=3.0, penalty_schedule="constant",
        normalize="standard", augment=True, drop_last=True, min_train_samples=16, optimizer_lifetime="per-round",
        collapse_timing="previous",
    ),
    "cifar10-vit": dict(
        dataset="cifar10", model="vit", num_clients=100, clients_per_round=10, alpha=0.1, rounds=500,
        lr=0.01, th_coeff=0.0001, local_epochs=1, batch_size=16, clip=3.0, penalty_schedule="constant",
        normalize="standard", augment=True, drop_last=True, min_train_samples=16, optimizer_lifetime="per-round",
        collapse_timing="previous",
    ),
    "cifar100-resnet18": dict(
        dataset="cifar100", model="resnet18", num_clients=100, clients_per_round=10, alpha=0.1, rounds=1500,
        lr=0.01, lr_decay=0.993, th_coeff=0.0007, local_epochs=7, batch_size=64, clip=15.0,
        penalty_schedule="constant", normalize="standard", augment=True, drop_last=True, min_train_samples=64,
        optimizer_lifetime="per-round", collapse_timing="previous",
    ),
}
DEFAULT_PRESET = "digits-cnn"

_DATASET_CLASSES = {"digits": 10, "fmnist": 10, "cifar10": 10, "cifar100": 100}


def dataset_classes(dataset: str) -> int:
    """The number of classes of a named dataset (known without reading it)."""
    if dataset not in _DATASET_CLASSES:
        raise ValueError(f"unknown dataset {dataset!r}; datasets: {DATASETS}")
    return _DATASET_CLASSES[dataset]


def model_input_shape(model: str) -> tuple[int, int, int]:
    """``(C, H, W)`` of the images a named model takes."""
    return _MODEL_INPUTS[model]


_FIELD_NAMES = frozenset(f.name for f in fields(FedConfig))


def check_keys(values: dict[str, Any], source: str) -> None:
    unknown = sorted(set(values) - _FIELD_NAMES)
    if unknown:
        raise ValueError(f"{source}: unknown setting(s) {unknown}; valid settings: {sorted(_FIELD_NAMES)}")


def preset(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}")
    return dict(PRESETS[name])


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Settings from a JSON or TOML file (a flat table of FedConfig fields; TOML needs Python
    3.11+). A ``preset`` key names the preset the file's settings are layered on."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".toml":
        try:
            import tomllib
        except ImportError as e:  # Python 3.10
            raise RuntimeError("TOML config files need Python 3.11+; use JSON") from e
        values = tomllib.loads(text)
    elif path.suffix == ".json":
        values = json.loads(text)
    else:
        raise ValueError(f"config file {path} must end in .json or .toml")
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a table of settings")
    return values


def build_config(preset_name: str | None = None, file_values: dict[str, Any] | None = None,
                 overrides: dict[str, Any] | None = None) -> FedConfig:
    """``FedConfig`` from a preset, then a config file's values, then explicit overrides."""
    file_values = dict(file_values or {})
    preset_name = file_values.pop("preset", None) if preset_name is None else preset_name
    file_values.pop("preset", None)
    values: dict[str, Any] = {}
    if preset_name is not None:
        values.update(preset(preset_name))
    check_keys(file_values, "config file")
    values.update(file_values)
    overrides = overrides or {}
    check_keys(overrides, "overrides")
    values.update(overrides)
    return FedConfig(**values).validate()


# Fields that may differ between a checkpoint and the run that resumes it.
RESUMABLE_CHANGES = frozenset({"rounds", "checkpoint_every", "data_root", "download", "device", "memory_format",
                               "eval_batch_size", "max_failed_rounds", "rollback_depth"})


def config_mismatch(saved: dict[str, Any], current: FedConfig) -> list[str]:
    now = current.to_dict()
    saved = {**FedConfig().to_dict(), **saved}  # settings added since the checkpoint: their defaults
    problems = []
    for k in sorted(now):
        if k in RESUMABLE_CHANGES or saved.get(k) == now[k]:
            continue
        if k == "cohort_clip":
            # None takes the method's norm limit (a checkpoint written before FedAvg had its own
            # holds the earlier default, 20, of every method): what each side resolves to
            from .methods import make_method

            own = make_method(current.replace(cohort_clip=None)).norm_limit()
            if (own if saved[k] is None else saved[k]) == (own if now[k] is None else now[k]):
                continue
            if now[k] is None:
                problems.append(f"{k}: checkpoint {saved[k]!r} vs now None (the method's default, {own!r})")
                continue
        problems.append(f"{k}: checkpoint {saved.get(k)!r} vs now {now[k]!r}")
    return problems


__all__ = ["DEFAULT_PRESET", "FedConfig", "METHODS", "PRESETS", "build_config", "load_config_file", "preset"]
