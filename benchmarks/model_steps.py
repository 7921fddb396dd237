"""Training steps in the cost model (benchmarks/model.py): forward, backward and optimizer step.

Two kinds of step, each counted in steady state (the optimizer has stepped once before the
record, so its state exists and the recorded forward is the one that follows an optimizer step,
which with a fused optimizer reuses the row mask the step built):

* :func:`step_launches`: one local training step of a federated model (LeNet-5, Conv4,
  ResNet-18) at its preset's batch size and backward mode, every threshold layer at one density,
  against the same network densified (``spafl.densify``) and stepped by ``torch.optim``.
* :func:`layer_step_launches`: one benchmark layer case alone (forward with ``x`` requiring its
  gradient, as inside a network; backward of a given output gradient; optimizer step), our layer
  against ``nn.Linear`` / ``nn.Conv2d`` with ``torch.optim``.

The optimizer is a factory ``factory(params, hyper) -> Optimizer`` (:data:`OPTIMIZERS`):
``torch-sgd`` / ``torch-adam`` are ``torch.optim`` on its multi-tensor (foreach) path, as it runs
on CUDA; ``spafl-sgd`` / ``spafl-adam`` are the fused optimizers of ``spafl.optim`` (their
Triton kernel runs in the interpreter like every other kernel). A step counted with a fused
optimizer is priced against the dense network with the ``torch.optim`` of the same rule
(:data:`DENSE_OPTIMIZER`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import model as M  # benchmarks/model.py
import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Hyper:
    """The optimizer's hyper-parameters (the values do not change what launches, except that a
    zero momentum or weight decay removes the launches that apply it)."""

    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0


OptimizerFactory = Callable[[list, Hyper], torch.optim.Optimizer]


def torch_sgd(params: list, h: Hyper) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=h.lr, momentum=h.momentum, weight_decay=h.weight_decay, foreach=True)


def torch_adam(params: list, h: Hyper) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=h.lr, weight_decay=h.weight_decay, foreach=True)


def _spafl_optimizer(name: str, compact_grads: bool = False) -> OptimizerFactory:
    def make(params: list, h: Hyper) -> torch.optim.Optimizer:
        try:
            from spafl import optim
        except ImportError as e:
            raise RuntimeError(f"spafl.optim is not in this tree: cannot build the fused optimizer {name}") from e
        extra = {"compact_grads": True} if compact_grads else {}
        if name == "SGD":
            return optim.SGD(params, lr=h.lr, momentum=h.momentum, weight_decay=h.weight_decay, foreach=True,
                             **extra)
        return getattr(optim, name)(params, lr=h.lr, weight_decay=h.weight_decay, foreach=True, **extra)

    make.__name__ = f"spafl_{name.lower()}{'_compact' if compact_grads else ''}"
    return make


OPTIMIZERS: dict[str, OptimizerFactory] = {"torch-sgd": torch_sgd, "torch-adam": torch_adam,
                                           "spafl-sgd": _spafl_optimizer("SGD"), "spafl-adam": _spafl_optimizer("Adam"),
                                           # the backward hands the step the active rows only
                                           "spafl-sgd-compact": _spafl_optimizer("SGD", compact_grads=True),
                                           "spafl-adam-compact": _spafl_optimizer("Adam", compact_grads=True)}
DENSE_OPTIMIZER = {"torch-sgd": "torch-sgd", "spafl-sgd": "torch-sgd", "torch-adam": "torch-adam",
                   "spafl-adam": "torch-adam", "spafl-sgd-compact": "torch-sgd", "spafl-adam-compact": "torch-adam"}
# A lone layer's step: SGD with momentum as the CIFAR presets (the values change no launch count).
LAYER_HYPER = Hyper(lr=0.01, momentum=0.9, weight_decay=0.0)
STEP_PHASES = ("fwd", "bwd", "step")


def optimizer_name(name_or_factory) -> str:
    """The :data:`OPTIMIZERS` name of a name or of one of its factories."""
    if isinstance(name_or_factory, str):
        return name_or_factory
    for name, factory in OPTIMIZERS.items():
        if factory is name_or_factory:
            return name
    raise ValueError(f"{name_or_factory!r} is not a factory of OPTIMIZERS: give its name")


def optimizer_factory(name_or_factory) -> OptimizerFactory:
    if callable(name_or_factory):
        return name_or_factory
    if name_or_factory not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)} or a factory, got {name_or_factory!r}")
    return OPTIMIZERS[name_or_factory]


def host_state(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The optimizer's state that lives on the host on CUDA: ``torch.optim``'s step counters
    (CPU tensors unless ``capturable`` or ``fused``); ops on them launch nothing on the device."""
    return [v for state in opt.state.values() for k, v in state.items()
            if k == "step" and isinstance(v, torch.Tensor) and not opt.defaults.get("capturable", False)
            and not opt.defaults.get("fused", False)]


def _record_step(rec: M.Recorder, forward: Callable[[], torch.Tensor], backward: Callable[[torch.Tensor], object],
                 update: Callable[[], object], opt: torch.optim.Optimizer) -> dict[str, list[M.Launch]]:
    """``{fwd, bwd, step}`` launches of one steady-state step (the optimizer state exists)."""
    rec.host_tensors(host_state(opt))
    out = {}
    with rec:
        out["fwd"], y = M.record(forward, "fwd", rec)
        out["bwd"], _ = M.record(lambda: backward(y), "bwd", rec)
        out["step"], _ = M.record(update, "step", rec)
    return out


def _warm(forward: Callable[[], torch.Tensor], backward: Callable[[torch.Tensor], object],
          opt: torch.optim.Optimizer) -> None:
    """One step outside the record, on a small batch: the optimizer's state (momentum buffers,
    Adam's moments, a fused optimizer's next mask) does not depend on the batch size, and the
    interpreter's time does."""
    from spafl.kernels import _config

    # Inside a recorder whose launches are dropped: the convolution GEMMs take the fast count
    # (benchmarks/conv_count.py) here too, instead of the interpreter.
    with _config.production_tiles(), M.Recorder():
        backward(forward())
        opt.step()
    opt.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------- federated models

STEP_PRESETS = {"lenet5": "fmnist-lenet5", "conv4": "cifar10-conv4", "resnet18": "cifar100-resnet18"}


def _clip_like_cuda(params: list[torch.Tensor], max_norm: float) -> None:
    """``nn.utils.clip_grad_norm_`` as it runs on CUDA tensors (the foreach path; on CPU
    tensors PyTorch loops over the parameters instead)."""
    grads = [p.grad for p in params if p.grad is not None]
    norms = torch._foreach_norm(grads, 2.0)
    total = torch.linalg.vector_norm(torch.stack(norms), 2.0)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    torch._foreach_mul_(grads, coef)


# How the spafl side's threshold penalty enters the step (see step_launches).
PENALTIES = ("grad", "loss")


def step_launches(model_name: str, density: float, dtype: torch.dtype = torch.float32, dense: bool = False,
                  batch: int | None = None, optimizer="torch-sgd",
                  memory_format: str = "auto", penalty: str = "grad") -> dict[str, list[M.Launch]]:
    """``{phase: [Launch]}`` of one local training step of a federated model at its preset's
    batch size, every threshold layer at ``density``: ``fwd`` (model and loss), ``bwd``,
    ``step`` (gradient clipping where the preset clips, the optimizer's step, ``zero_grad``).
    ``penalty`` (the spafl side's threshold penalty): "grad", its gradient added after the
    backward (``spafl.add_threshold_penalty_grad``, as the simulator trains; in ``bwd``), or
    "loss", the term added to the loss (``spafl.threshold_penalty``; in ``fwd`` and ``bwd``).
    ``optimizer``: a name of :data:`OPTIMIZERS` or a factory, with the preset's learning rate,
    momentum and weight decay. ``dense``: the same model with plain ``nn.Conv2d`` /
    ``nn.Linear`` layers (``spafl.densify``). ``memory_format``: the model's
    layout as the simulator sets it on a GPU (``FedConfig.memory_format``; "auto": channels-last
    for the convolutional models, as on CUDA), the input batch NCHW as the simulator's data."""
    import spafl
    from spafl.federated import training
    from spafl.federated.build import channels_last
    from spafl.federated.config import MEMORY_FORMATS, FedConfig, dataset_classes, model_input_shape, preset
    from spafl.federated.models import build_model

    if model_name not in STEP_PRESETS:
        raise ValueError(f"model must be one of {sorted(STEP_PRESETS)}, got {model_name!r}")
    if memory_format not in MEMORY_FORMATS:
        raise ValueError(f"memory_format must be one of {MEMORY_FORMATS}, got {memory_format!r}")
    if penalty not in PENALTIES:
        raise ValueError(f"penalty must be one of {PENALTIES}, got {penalty!r}")
    factory = optimizer_factory(optimizer)
    config = FedConfig(**preset(STEP_PRESETS[model_name]))
    M._warm_state()
    torch.manual_seed(0)
    model = build_model(model_name, dataset_classes(config.dataset), backend="triton",
                        backward_mode=config.backward_mode, collapse_density=config.collapse_density,
                        collapse_timing=config.collapse_timing, check_finite=False)
    for layer in spafl.threshold_layers(model):
        with torch.no_grad():
            layer.threshold.copy_(spafl.threshold_for_density(layer.weight.detach().float(), density))
    if dense:
        model = spafl.densify(copy.deepcopy(model))
    if channels_last(memory_format, torch.device("cuda"), model):  # (the modelled device's choice)
        model = model.to(memory_format=torch.channels_last)
    model = model.to(dtype)
    model.train()
    b = batch or config.batch_size
    classes = dataset_classes(config.dataset)
    x = torch.randn(b, *model_input_shape(model_name), dtype=dtype)
    y = torch.randint(0, classes, (b,))
    lam = training.penalty_coefficient(config, 0) or config.th_coeff
    params = list(model.parameters())
    opt = factory(params, Hyper(config.lr, config.momentum, config.weight_decay))

    in_loss = not dense and penalty == "loss"
    taus = [] if dense or in_loss else [layer.threshold for layer in spafl.threshold_layers(model)]

    def forward(x=x, y=y):
        loss = F.cross_entropy(model(x), y)
        return loss + lam * spafl.threshold_penalty(model) if in_loss else loss

    def backward(loss):
        loss.backward()
        if taus:
            spafl.add_threshold_penalty_grad(taus, lam)

    def update():
        if config.clip is not None:
            _clip_like_cuda(params, config.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    _warm(lambda: forward(x[:2], y[:2]), backward, opt)  # BatchNorm needs 2 samples
    return _record_step(M.Recorder(), forward, backward, update, opt)


# ----------------------------------------------------------------------------- one layer


def layer_module(case, dtype: torch.dtype, density: float, mode: str | None, seed: int = 0) -> nn.Module:
    """The layer of a benchmark case as a module: ``mode`` None is ``nn.Linear`` / ``nn.Conv2d``,
    else our layer on the Triton backend with that backward mode, as a CUDA run calls it (no
    finiteness check, no collapse guard); the weight of ``benchmarks/kernels.py`` (channels-last
    for a convolution), a zero bias, thresholds from :func:`model.unit_thresholds`."""
    from spafl import ThresholdConv2d, ThresholdLinear

    bench = M.bench_kernels.Bench(case, dtype, torch.device("cpu"), sets=1, seed=seed)
    kw = dict(bias=case.bias, dtype=dtype)
    ours = dict(backend="triton", backward_mode=mode, collapse_density=None, check_finite=False)
    if case.layer == "linear":
        layer = nn.Linear(case.k, case.n, **kw) if mode is None else ThresholdLinear(case.k, case.n, **kw, **ours)
    else:
        args = (case.cin, case.cout, case.kernel, case.stride, case.padding)
        layer = nn.Conv2d(*args, **kw) if mode is None else ThresholdConv2d(*args, **kw, **ours)
        layer.to(memory_format=torch.channels_last)  # keeps the Parameter objects (``.data`` is replaced)
    with torch.no_grad():
        layer.weight.copy_(bench.weight)
        if layer.bias is not None:
            layer.bias.zero_()
        if mode is not None:
            layer.threshold.copy_(M.unit_thresholds(case.rows, density, layer.threshold.dtype))
    return layer


def layer_step_launches(case, dtype: torch.dtype, density: float, mode: str | None,
                        optimizer="torch-sgd", hyper: Hyper = LAYER_HYPER) -> dict[str, list[M.Launch]]:
    """``{fwd, bwd, step}`` launches of one steady-state training step of a lone layer: the
    forward that follows an optimizer step (``x`` requires its gradient, as inside a network),
    the backward of the case's output gradient, the optimizer's step and ``zero_grad``."""
    M._warm_state()
    factory = optimizer_factory(optimizer)
    layer = layer_module(case, dtype, density, mode)
    bench = M.bench_kernels.Bench(case, dtype, torch.device("cpu"), sets=1)
    x, dy = bench.xs[0].detach().requires_grad_(), bench.dys[0]
    opt = factory(list(layer.parameters()), hyper)

    def update():
        opt.step()
        opt.zero_grad(set_to_none=True)

    _warm(lambda: layer(x[:1].detach().requires_grad_()), lambda y: y.backward(dy[:1]), opt)
    return _record_step(M.Recorder(), lambda: layer(x), lambda y: y.backward(dy), update, opt)


def layer_step_rows(case, dtype: torch.dtype, density: float, modes, optimizers) -> dict[tuple[str, str], list]:
    """``{(provider, op): [Launch]}`` of the layer steps: ``dense`` with ``torch.optim``, and per
    backward mode and optimizer ``spafl-<mode>`` (plain ``torch.optim``) or
    ``spafl-<mode>+<optimizer>`` (a fused one); ops ``opt`` (the optimizer's step),
    ``steady-fwd+bwd`` (the forward that follows it and the backward) and ``step`` (all three)."""
    rules = {DENSE_OPTIMIZER[optimizer_name(o)] for o in optimizers}
    if len(rules) != 1:
        raise ValueError(f"the optimizers {list(optimizers)} do not share one torch.optim rule for the dense side")
    out = _step_ops("dense", layer_step_launches(case, dtype, density, None, rules.pop()))
    for mode in modes:
        for name in optimizers:
            fused = optimizer_name(name).startswith("spafl-")
            provider = f"spafl-{mode}+{optimizer_name(name)}" if fused else f"spafl-{mode}"
            out.update(_step_ops(provider, layer_step_launches(case, dtype, density, mode, name)))
    return out


STEP_OPS = ("opt", "steady-fwd+bwd", "step")


def _step_ops(provider: str, phases: dict[str, list]) -> dict[tuple[str, str], list]:
    return {(provider, "opt"): phases["step"], (provider, "steady-fwd+bwd"): phases["fwd"] + phases["bwd"],
            (provider, "step"): phases["fwd"] + phases["bwd"] + phases["step"]}
