"""The in-process federated loop: N clients on one device, driving a method's functions
(:mod:`.methods`: SpaFL through :mod:`.protocol`, or a baseline).

Only the sampled clients change in a round, so only they are re-evaluated; the others' cached
results stand (evaluation is deterministic), and every round still reports all N clients.
Checkpoints hold the whole run (server state, every client's weights and batch-norm buffers,
cached evaluations, history) and are written atomically; since each round's randomness is keyed
by ``(seed, round, client)``, a resumed run continues with exactly the history an uninterrupted
run would have.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .._env import environment
from ..convert import named_threshold_layers
from .config import FedConfig, config_mismatch
from .data import ImageDataset, client_data, load_dataset, split_digest, split_for_run
from .methods import Method, make_method
from .models import build_model
from .protocol import (
    UpdateRejected,
    decode,
    derived_seed,
    encode,
    evaluate,
    layer_macs,
    learning_rate,
    penalty_coefficient,
    sample_clients,
)

CHECKPOINT_VERSION = 1
# History fields that measure the machine rather than the algorithm (excluded when comparing runs).
TIMING_FIELDS = ("wall_s", "train_s", "eval_s")


class FederatedWarning(UserWarning):
    """A client was dropped from a round or its update was rejected (the run goes on)."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


def check_dataset(dataset: ImageDataset, config: FedConfig, custom_model: bool) -> None:
    """Fail with a clear message on data the run cannot use (before any training)."""
    from .config import model_input_shape

    for split in ("train", "test"):
        x, y = getattr(dataset, f"{split}_x"), getattr(dataset, f"{split}_y")
        if x.dim() != 4 or y.dim() != 1 or x.shape[0] != y.shape[0]:
            raise ValueError(f"dataset {split} split: expected images [n, C, H, W] and labels [n], "
                             f"got {tuple(x.shape)} and {tuple(y.shape)}")
        if x.dtype != torch.uint8 and not x.is_floating_point():
            raise ValueError(f"dataset {split} images must be uint8 or floating point, got {x.dtype}")
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise ValueError(f"dataset {split} images hold non-finite values")
        if y.dtype != torch.int64 or (len(y) and (int(y.min()) < 0 or int(y.max()) >= dataset.num_classes)):
            raise ValueError(f"dataset {split} labels must be int64 in [0, {dataset.num_classes})")
    if not custom_model and tuple(dataset.image_shape) != model_input_shape(config.model):
        raise ValueError(f"model {config.model!r} takes {model_input_shape(config.model)} images but the dataset "
                         f"has {tuple(dataset.image_shape)}; pass model_fn= for another model")


def _percentile10(values: np.ndarray) -> float:
    return float(np.percentile(values, 10)) if len(values) else float("nan")


def whole_test_set(dataset: ImageDataset, config: FedConfig, device: torch.device):
    """The dataset's whole test split as one client's data (no training samples): where a
    global model is evaluated besides every client's own test split."""
    everything = np.arange(len(dataset.test_y))
    return client_data(dataset, [everything[:0]], [everything], config.normalize, False, device)[0]


def initial_model(config: FedConfig, method: Method, num_classes: int, device: torch.device,
                  model_fn: Callable[[], nn.Module] | None = None) -> nn.Module:
    """The run's initial model, the same in every process that builds it: seeded from
    ``config.seed``, built from ``config.model`` (or ``model_fn``), converted by the method."""
    torch.manual_seed(derived_seed(config.seed, "init"))
    layer_kwargs = dict(backend=config.backend, backward_mode=config.backward_mode,
                        sample_fraction=config.sample_fraction, collapse_density=config.collapse_density)
    model = model_fn() if model_fn is not None else build_model(config.model, num_classes, **layer_kwargs)
    return method.prepare_model(model.to(device))


def client_metrics(round_index: int, evaluations: list[dict], layer_names: list[str],
                   global_eval: dict | None = None) -> dict:
    """A round's accuracy, loss and density columns from every client's latest evaluation
    (:func:`protocol.evaluate` results, plus ``collapse_resets``) and, for a global method, the
    global model's on the whole test set."""
    scored = [c for c in evaluations if c["num_test"] > 0]
    acc = np.array([c["acc"] for c in scored])
    n_test = np.array([c["num_test"] for c in scored])
    loss = np.array([c["loss"] for c in scored])
    row = {
        "round": round_index,
        "acc_mean": float(acc.mean()) if len(acc) else float("nan"),
        "acc_weighted": float((acc * n_test).sum() / n_test.sum()) if len(acc) else float("nan"),
        "acc_std": float(acc.std()) if len(acc) else float("nan"),
        "acc_min": float(acc.min()) if len(acc) else float("nan"),
        "acc_p10": _percentile10(acc),
        "loss": float((loss * n_test).sum() / n_test.sum()) if len(acc) else float("nan"),
        "clients_without_test_data": len(evaluations) - len(scored),
        "density": float(np.mean([c["density"] for c in evaluations])),
        "density_weighted": float(np.mean([c["density_weighted"] for c in evaluations])),
        "collapse_resets": int(sum(c["collapse_resets"] for c in evaluations)),
        "layers": {name: float(np.mean([c["layers"][name] for c in evaluations])) for name in layer_names},
    }
    if global_eval is not None:  # the global model on the whole test set
        row["acc_global"] = global_eval["acc"]
        row["loss_global"] = global_eval["loss"]
    return row


class RoundTally:
    """One round's outcome, client by client, as the server sees it; the simulator and the
    Flower server (:mod:`spafl.flower`) both fill one and take the history columns from it.

    ``drop`` a client that failed, ``trained`` one that finished (its report), ``receive``
    its uplink bytes (decoded and validated here: a bad update is rejected, not aggregated),
    or ``reject`` an uplink that could not be read at all."""

    def __init__(self, method: Method, server):
        self.method, self.server = method, server
        self.accepted: list[dict[str, torch.Tensor]] = []
        self.weights: list[int] = []
        self.reports: list = []
        self.errors: list[str] = []
        self.trained_ids: list[int] = []
        self.train_losses: list[float] = []
        self.dropped = self.rejected = self.bytes_up = self.nnz_up = 0
        self.flops = 0.0

    def drop(self, cid: int, reason: str) -> None:
        self.dropped += 1
        self.errors.append(f"client {cid} failed: {reason}")

    def trained(self, cid: int, report) -> None:
        self.trained_ids.append(cid)
        self.flops += report.flops
        self.train_losses.append(report.train_loss)

    def reject(self, cid: int, reason: str) -> None:
        self.rejected += 1
        self.errors.append(f"client {cid} update rejected: {reason}")

    def receive(self, cid: int, report, up: bytes) -> None:
        self.bytes_up += len(up)
        try:
            update = decode(up)
            self.method.validate_update(update, self.server)
        except (UpdateRejected, TypeError, ValueError) as e:
            self.reject(cid, str(e))
            return
        self.accepted.append(update)
        self.weights.append(report.num_samples)
        self.reports.append(report)
        self.nnz_up += sum(int(torch.count_nonzero(v)) for v in update.values())

    def warn(self, round_index: int) -> None:
        for text in self.errors:
            warnings.warn(f"round {round_index}: {text}", FederatedWarning, stacklevel=3)

    def columns(self, config: FedConfig, t: int, message: dict[str, torch.Tensor], down_bytes: int, totals: dict,
                client_flops: np.ndarray, timings: dict, extra: dict) -> dict:
        """The round's history columns after the client metrics; adds the round to ``totals``."""
        method, sampled = self.method, config.clients_per_round
        bits = method.paper_bits(message, self.accepted, sampled)
        bytes_down = down_bytes * sampled
        totals["comm_bits_paper"] += bits
        totals["bytes"] += bytes_down + self.bytes_up
        totals["wall_s"] += timings.get("wall_s", 0.0)
        return {
            "sampled": " ".join(map(str, sample_clients(config.seed, t, config.num_clients, sampled))),
            "participants": len(self.accepted),
            "dropped": self.dropped,
            "rejected": self.rejected,
            "train_loss": float(np.mean(self.train_losses)) if self.train_losses else float("nan"),
            "lr": learning_rate(config, t),
            "lambda": penalty_coefficient(config, t) if method.name == "spafl" else 0.0,
            "comm_bits_paper": bits,
            "comm_gbit_paper_total": totals["comm_bits_paper"] / 1e9,
            "bytes_down": bytes_down,
            "bytes_up": self.bytes_up,
            "bytes_total": totals["bytes"],
            "nnz_down": sum(int(torch.count_nonzero(v)) for v in message.values()) * sampled,
            "nnz_up": self.nnz_up,
            "flops_round": self.flops / config.num_clients,
            "flops_total": float(client_flops.sum() / config.num_clients),
            **timings,
            **extra,
            "errors": self.errors,
        }


def write_history(out: Path, meta: dict, history: list[dict], layer_names: list[str],
                  mask_history: list[np.ndarray] | None = None, mask_layer: str | None = None) -> None:
    """``history.csv`` (one row per round, per-layer densities as ``density:<layer>``
    columns), ``history.json`` (``meta`` plus the rows), ``masks.npz`` (when there are masks),
    each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / "history.json", lambda f: f.write(json.dumps({**meta, "history": history}, indent=1).encode()))
    columns = [k for k in history[0] if k not in ("layers", "errors")] if history else []
    columns += [f"density:{name}" for name in layer_names]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in history:
        flat = {k: row[k] for k in columns if k in row}
        flat.update({f"density:{k}": v for k, v in row["layers"].items()})
        writer.writerow(flat)
    _atomic_write(out / "history.csv", lambda f: f.write(buffer.getvalue().encode()))
    if mask_history:
        masks = np.stack(mask_history)
        rounds = np.array([r["round"] for r in history])
        _atomic_write(out / "masks.npz", lambda f: np.savez_compressed(f, masks=masks, rounds=rounds, layer=mask_layer))


class Simulator:
    """``config.method`` (SpaFL by default) over ``config.num_clients`` in-process clients.

    Args:
        config: the run (validated here).
        dataset: an :class:`ImageDataset` to use instead of reading ``config.dataset``.
        model_fn: builds the (untrained) model instead of ``config.model``; for SpaFL it must
            contain threshold layers (see :func:`spafl.sparsify`); the other methods convert
            it (:func:`spafl.densify`, Powerpropagation). Called once, after seeding.
        out_dir: where the history, checkpoints and plots go (None: nowhere).
        client_fn: the client's round (default: the method's ``client_round``, for SpaFL
            :func:`protocol.client_round`); a different function can inject faults or run the
            client elsewhere.
        progress: draw a progress line on stderr.
    """

    def __init__(self, config: FedConfig, *, dataset: ImageDataset | None = None,
                 model_fn: Callable[[], nn.Module] | None = None, out_dir: str | Path | None = None,
                 client_fn: Callable | None = None, progress: bool = False, command: str | None = None):
        self.config = config.validate()
        self.method = make_method(self.config)
        self.device = resolve_device(config.device)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.client_fn = client_fn if client_fn is not None else self.method.client_round
        self.progress = progress
        self.command = command
        if dataset is None:
            dataset = load_dataset(config.dataset, config.data_root, config.download)
        check_dataset(dataset, config, custom_model=model_fn is not None)
        self.dataset_name = dataset.name
        self.image_shape = dataset.image_shape
        train_idx, test_idx = split_for_run(dataset, config.num_clients, config.alpha, config.min_train_samples,
                                            config.seed)
        self.split_digest = split_digest(train_idx, test_idx)
        self.clients = client_data(dataset, train_idx, test_idx, config.normalize, config.augment, self.device)
        # The whole test set, for the global model of the non-personalised methods.
        self.global_test = None if self.method.personalised else whole_test_set(dataset, config, self.device)

        self.model = initial_model(config, self.method, dataset.num_classes, self.device, model_fn)
        self.prunable = self.method.prunable(self.model)
        self.layer_names = [name for name, _ in self.prunable]
        if not self.layer_names:
            raise ValueError(f"the model has no layer that {self.method.name} prunes or counts")
        self.mask_layer = None
        if self.method.name == "spafl":
            self.mask_layer = config.mask_layer or self.layer_names[0]
            if self.mask_layer not in self.layer_names:
                raise ValueError(f"mask_layer {self.mask_layer!r} is not a threshold layer; layers: {self.layer_names}")
        self.macs = layer_macs(self.model, self.image_shape, self.device, layers=self.prunable)
        self.num_thresholds = sum(layer.threshold.numel() for _, layer in named_threshold_layers(self.model))
        self.num_weights = sum(layer.weight.numel() for _, layer in self.prunable)
        # Every client of a personalised method starts from the same initial model (one shared
        # dict: a client's round never mutates the state it is given, it returns a new one);
        # the clients of a global method hold nothing between rounds.
        initial = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.client_states: list[dict[str, torch.Tensor] | None] = (
            [initial] * config.num_clients if self.method.personalised else [None] * config.num_clients)
        self.server = self.method.init_server(self.model)
        self.client_flops = np.zeros(config.num_clients)
        self.eval_cache: list[dict | None] = [None] * config.num_clients
        self.global_eval: dict | None = None
        self.history: list[dict] = []
        self.mask_history: list[np.ndarray] = []
        self.totals = {"comm_bits_paper": 0.0, "bytes": 0, "wall_s": 0.0}
        self._refresh(range(config.num_clients))

    # --- one round --------------------------------------------------------------------

    @property
    def round(self) -> int:
        return self.server.round

    def _refresh(self, ids) -> float:
        """Evaluate clients ``ids`` (personalised methods) or the global model on every client
        and on the whole test set (global methods)."""
        start = time.perf_counter()
        method, batch = self.method, self.config.eval_batch_size
        if not method.personalised:
            ids = range(self.config.num_clients)
            method.load(self.model, self.server, None)
        for i in ids:
            state = self.client_states[i]
            if method.personalised:
                method.load(self.model, self.server, state)
            result = evaluate(self.model, None, self.clients[i], batch, self.mask_layer, self.prunable)
            result["collapse_resets"] = sum(int(v) for k, v in (state or {}).items() if k.endswith("collapse_resets"))
            self.eval_cache[i] = result
        if self.global_test is not None:
            self.global_eval = evaluate(self.model, None, self.global_test, batch, None, self.prunable)
        return time.perf_counter() - start

    def run_round(self) -> dict:
        """Run the next round and return its history row."""
        cfg, t, method = self.config, self.round, self.method
        start = time.perf_counter()
        sampled = sample_clients(cfg.seed, t, cfg.num_clients, cfg.clients_per_round)
        message = method.broadcast(self.server) if method.communicates else {}
        down = encode(message, sparse=method.sparse_wire) if method.communicates else b""
        tally = RoundTally(method, self.server)
        for cid in sampled:
            try:
                received = decode(down) if method.communicates else {}
                new_state, report = self.client_fn(self.model, self.client_states[cid], received,
                                                   self.clients[cid], cfg, t, cid, self.macs)
            except Exception as e:  # the client failed mid-round: drop it from this round
                tally.drop(cid, f"{type(e).__name__}: {e}")
                continue
            # The client's own state is its business; the server only sees the uplink.
            if method.personalised:
                self.client_states[cid] = new_state
            self.client_flops[cid] += report.flops
            tally.trained(cid, report)
            if method.communicates:
                tally.receive(cid, report, encode(report.update, sparse=method.sparse_wire))
        before = self.server
        self.server = method.aggregate(self.server, tally.accepted, tally.weights)
        extra = method.round_metrics(before, self.server, tally.reports)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        train_s = time.perf_counter() - start
        eval_s = self._refresh(tally.trained_ids)
        tally.warn(t)
        wall = time.perf_counter() - start
        row = self._metrics(t)
        row.update(tally.columns(cfg, t, message, len(down), self.totals, self.client_flops,
                                 {"train_s": train_s, "eval_s": eval_s, "wall_s": wall}, extra))
        self.history.append(row)
        if self.mask_layer is not None:
            self.mask_history.append(np.stack([c["mask"].numpy() for c in self.eval_cache]).astype(np.uint8))
        return row

    def _metrics(self, t: int) -> dict:
        return client_metrics(t, self.eval_cache, self.layer_names, self.global_eval)

    # --- the whole run ----------------------------------------------------------------

    def run(self, rounds: int | None = None) -> list[dict]:
        """Run until ``rounds`` (default ``config.rounds``) rounds are done, checkpointing every
        ``config.checkpoint_every`` rounds and at the end; write the history; return it."""
        target = self.config.rounds if rounds is None else rounds
        bar = _Progress(target, self.round) if self.progress else None
        while self.round < target:
            row = self.run_round()
            if bar is not None:
                bar.update(row)
            every = self.config.checkpoint_every
            if self.out_dir is not None and ((every and self.round % every == 0) or self.round == target):
                self.save_checkpoint()
                self.write_history()
        if bar is not None:
            bar.close()
        if self.out_dir is not None and not self.history:
            self.write_history()
        return self.history

    def summary(self) -> dict:
        if not self.history:
            return {"rounds": 0}
        best = max(self.history, key=lambda r: (r["acc_mean"], -r["round"]))
        last = self.history[-1]
        return {
            "method": self.method.name,
            "rounds": len(self.history),
            "final_acc": last["acc_mean"],
            "final_acc_global": last.get("acc_global", float("nan")),
            "final_acc_std": last["acc_std"],
            "final_density": last["density"],
            "final_density_weighted": last["density_weighted"],
            "best_acc": best["acc_mean"],
            "best_round": best["round"],
            "density_at_best": best["density"],
            "comm_gbit_paper": last["comm_gbit_paper_total"],
            "bytes_exchanged": last["bytes_total"],
            "flops_per_client": last["flops_total"],
            "final_global_sparsity": last.get("global_sparsity", float("nan")),
            "wall_s": self.totals["wall_s"],
            "mean_round_s": self.totals["wall_s"] / len(self.history),
            "num_thresholds": self.num_thresholds,
        }

    # --- files ------------------------------------------------------------------------

    def write_history(self) -> None:
        """``history.csv`` (one row per round, per-layer densities as ``density:<layer>``
        columns), ``history.json`` (rows, summary, config, environment), ``masks.npz``."""
        meta = {"config": self.config.to_dict(), "environment": environment(self.device), "command": self.command,
                "split_digest": self.split_digest, "num_thresholds": self.num_thresholds,
                "num_weights": self.num_weights, "layers": self.layer_names, "macs_per_sample": self.macs,
                "mask_layer": self.mask_layer, "summary": self.summary()}
        write_history(self.out_dir, meta, self.history, self.layer_names, self.mask_history, self.mask_layer)

    def state_dict(self) -> dict:
        return {
            "version": CHECKPOINT_VERSION,
            "config": self.config.to_dict(),
            "dataset": self.dataset_name,
            "split_digest": self.split_digest,
            "server": self.server.state_dict(),
            "global_eval": self.global_eval,
            "client_states": self.client_states,
            "client_flops": self.client_flops.copy(),
            "eval_cache": self.eval_cache,
            "history": self.history,
            "mask_history": self.mask_history,
            "totals": dict(self.totals),
        }

    def load_state_dict(self, ckpt: dict) -> None:
        if ckpt.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"checkpoint version {ckpt.get('version')!r}; this spafl reads {CHECKPOINT_VERSION}")
        problems = config_mismatch(ckpt["config"], self.config)
        if problems:
            raise ValueError("the checkpoint was written by a different configuration:\n  " + "\n  ".join(problems))
        if ckpt["split_digest"] != self.split_digest:
            raise ValueError("the data split differs from the checkpoint's (different dataset files?)")
        self.server = type(self.server).from_state_dict(ckpt["server"])
        self.global_eval = ckpt.get("global_eval")
        self.client_states = [None if s is None else {k: v.to(self.device) for k, v in s.items()}
                              for s in ckpt["client_states"]]
        self.client_flops = np.asarray(ckpt["client_flops"], dtype=np.float64).copy()
        self.eval_cache = ckpt["eval_cache"]
        self.history = ckpt["history"]
        self.mask_history = ckpt["mask_history"]
        self.totals = dict(ckpt["totals"])

    def save_checkpoint(self, path: str | Path | None = None) -> Path:
        """Write the whole run to ``path`` (default ``<out_dir>/checkpoint.pt``) atomically: a
        temporary file in the same folder, fsync'd, then renamed over the old checkpoint."""
        path = Path(path) if path is not None else self.out_dir / "checkpoint.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        state = self.state_dict()
        _atomic_write(path, lambda f: torch.save(state, f))
        return path

    @classmethod
    def resume(cls, path: str | Path, config: FedConfig | None = None, **kwargs) -> Simulator:
        """Rebuild a run from a checkpoint (``path``: the file or its folder). ``config`` may
        change only ``rounds``, ``checkpoint_every``, ``data_root``, ``download``, ``device``
        and ``eval_batch_size``; by default the checkpoint's own configuration is used."""
        path = Path(path)
        file = path / "checkpoint.pt" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no checkpoint at {file}")
        ckpt = torch.load(file, map_location="cpu", weights_only=False)
        if config is None:
            config = FedConfig(**ckpt["config"])
        kwargs.setdefault("out_dir", file.parent)
        sim = cls(config, **kwargs)
        sim.load_state_dict(ckpt)
        return sim


def _atomic_write(path: Path, write: Callable) -> None:
    """``write(file)`` into a temporary file beside ``path``, fsync it, rename it over ``path``:
    a crash leaves either the old file or the new one, never a partial one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class _Progress:
    """A one-line progress bar on stderr (a line per ~5% when stderr is not a terminal)."""

    def __init__(self, total: int, done: int):
        self.total, self.start_done = total, done
        self.start = time.perf_counter()
        self.tty = sys.stderr.isatty()
        self.step = max(1, total // 20)

    def update(self, row: dict) -> None:
        done = row["round"] + 1
        elapsed = time.perf_counter() - self.start
        rate = elapsed / max(done - self.start_done, 1)
        filled = int(30 * done / self.total)
        line = (f"[{'#' * filled}{'.' * (30 - filled)}] round {done}/{self.total}  acc {row['acc_mean']:.2f}%  "
                f"density {row['density']:.3f}  {rate:.2f} s/round  eta {rate * (self.total - done):.0f} s")
        if self.tty:
            sys.stderr.write("\r" + line)
            sys.stderr.flush()
        elif done % self.step == 0 or done == self.total:
            sys.stderr.write(line + "\n")

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")
