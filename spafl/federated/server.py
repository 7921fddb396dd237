"""What every engine of a run shares besides the method's functions: the server's side of a
round (:class:`RoundTally`, :func:`client_metrics`), the history files (:func:`write_history`),
the run's initial model, the whole test set, the device and dataset checks, and atomic writes.

The in-process loop (:class:`.simulator.Simulator`) and the Flower server
(:mod:`spafl.flower.server`) both build their history from these, so the same seed gives the
same columns in both.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .config import FedConfig
from .data import ImageDataset, client_data
from .methods import AggregateWarning, Method
from .models import build_model
from .protocol import (
    FederatedWarning,
    UpdateRejected,
    decode,
    derived_seed,
    learning_rate,
    penalty_coefficient,
    sample_clients,
)

CHECKPOINT_VERSION = 2
# History fields that measure the machine rather than the algorithm (excluded when comparing runs).
TIMING_FIELDS = ("wall_s", "train_s", "eval_s")
# history.json's layout: 2 numbers rounds from 1 (the first round is round 1), 1 (no field) from 0.
HISTORY_FORMAT = 2


def resolve_device(name: str) -> torch.device:
    """The device ``config.device`` names (``auto``: CUDA when available); ``ValueError``
    naming the value when torch does not know it or this machine does not have it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {name!r} is not a device (auto, cpu, cuda or cuda:<index>)") from e
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r}: the simulator runs on cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} requested but this machine has {torch.cuda.device_count()} CUDA "
                             "device(s)")
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
                        sample_fraction=config.sample_fraction, collapse_density=config.collapse_density,
                        collapse_timing=config.collapse_timing, collapse_in_eval=config.collapse_in_eval)
    model = model_fn() if model_fn is not None else build_model(config.model, num_classes, **layer_kwargs)
    return method.prepare_model(model.to(device))


def client_metrics(round_index: int, evaluations: list[dict], layer_names: list[str],
                   global_eval: dict | None = None) -> dict:
    """A round's accuracy, loss and density columns from every client's latest evaluation
    (:func:`protocol.evaluate` results, plus ``collapse_resets``) and, for a global method, the
    global model's on the whole test set. ``round`` is the round's number, counting from 1
    (``round_index`` 0, the index the protocol's schedules and keyed draws use, is round 1)."""
    scored = [c for c in evaluations if c["num_test"] > 0]
    acc = np.array([c["acc"] for c in scored])
    n_test = np.array([c["num_test"] for c in scored])
    loss = np.array([c["loss"] for c in scored])
    row = {
        "round": round_index + 1,
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
    or ``reject`` an uplink that could not be read at all; then :func:`aggregate_round`."""

    def __init__(self, method: Method, server, cohort: list[int] | None = None):
        self.method, self.server = method, server
        self.cohort = cohort  # the round's sampled clients in the order drawn (None: the keyed sample)
        self.accepted: list[dict[str, torch.Tensor]] = []
        self.weights: list[int] = []
        self.reports: list = []
        self.errors: list[str] = []
        self.trained_ids: list[int] = []
        self.train_losses: list[float] = []
        self.dropped = self.rejected = self.bytes_up = self.nnz_up = 0
        self.flops = 0.0
        self.refused: str | None = None  # why the round's aggregate was refused (None: it was not)

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

    def receive(self, cid: int, report, up: bytes, num_samples: int) -> None:
        """Decode client ``cid``'s uplink ``up`` against the round's layout and validate it
        (:meth:`Method.validate_update`, with the client's validated training-sample count
        ``num_samples``, which also weighs it in the aggregate); reject it if it fails."""
        self.bytes_up += len(up)
        try:
            update = decode(up, expected=self.method.expected_update(self.server))
            self.method.validate_update(update, self.server, num_samples)
        except (UpdateRejected, TypeError, ValueError) as e:
            self.reject(cid, str(e))
            return
        self.accepted.append(update)
        self.weights.append(num_samples)
        self.reports.append(report)
        self.nnz_up += sum(int(torch.count_nonzero(v)) for v in update.values())

    @property
    def failed(self) -> bool:
        """The round aggregated nothing: no update accepted, or the aggregate refused (for a
        method that does not communicate: no client trained)."""
        if self.method.communicates:
            return not self.accepted or self.refused is not None
        return not self.trained_ids

    def outcome(self, round_number: int) -> str:
        """One line on a failed round (its number counting from 1)."""
        sampled = len(self.cohort) if self.cohort is not None else self.method.config.clients_per_round
        return (f"round {round_number} aggregated nothing: {sampled} sampled, {self.dropped} dropped, "
                f"{self.rejected} rejected" + (f"; {self.refused}" if self.refused else ""))

    def warn(self, round_index: int) -> None:
        """Every error of the round (``round_index`` counts from 0; the text from 1, as the
        history) and, when the round aggregated nothing, a line saying so."""
        for text in self.errors:
            warnings.warn(f"round {round_index + 1}: {text}", FederatedWarning, stacklevel=3)
        if self.failed:
            warnings.warn(self.outcome(round_index + 1), FederatedWarning, stacklevel=3)

    def columns(self, config: FedConfig, t: int, message: dict[str, torch.Tensor], down_bytes: int, totals: dict,
                client_flops: np.ndarray, timings: dict, extra: dict) -> dict:
        """The round's history columns after the client metrics; adds the round to ``totals``."""
        method, sampled = self.method, config.clients_per_round
        bits = method.paper_bits(message, self.accepted, sampled)
        bytes_down = down_bytes * sampled
        totals["comm_bits_paper"] += bits
        totals["bytes"] += bytes_down + self.bytes_up
        totals["wall_s"] += timings.get("wall_s", 0.0)
        cohort = self.cohort if self.cohort is not None else sample_clients(config.seed, t, config.num_clients, sampled)
        return {
            "sampled": " ".join(map(str, cohort)),
            "participants": len(self.accepted),
            "dropped": self.dropped,
            "rejected": self.rejected,
            "aggregate_refused": int(self.refused is not None),
            "round_failed": int(self.failed),
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


def aggregate_round(method: Method, server, tally: RoundTally):
    """``method.aggregate`` of the round's accepted updates: the next global state. What the
    method sets aside or refuses (an :class:`AggregateWarning` each) goes into the tally's
    errors instead (warned with the others by :meth:`RoundTally.warn`, and in the history), a
    refusal also into ``tally.refused`` (the ``aggregate_refused`` column)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", AggregateWarning)
        new = method.aggregate(server, tally.accepted, tally.weights)
    for w in caught:
        if issubclass(w.category, AggregateWarning):  # "round N: ..." (RoundTally.warn adds the round)
            text = str(w.message)
            tally.errors.append(text.split(": ", 1)[1] if text.startswith("round ") and ": " in text else text)
        else:  # not ours: pass it on
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    tally.refused = method.refused
    return new


class FederationStalled(RuntimeError):
    """``max_failed_rounds`` rounds in a row aggregated nothing: the run stopped."""


class FailedRounds:
    """Counts the rounds in a row that aggregated nothing (:attr:`RoundTally.failed`) and
    stops the run (:class:`FederationStalled`) after ``limit`` of them (0: never). The count
    is taken from the history's ``round_failed`` column, so it survives a restart."""

    def __init__(self, limit: int, history: list[dict] | None = None):
        self.limit = limit
        self.streak: list[dict] = []
        for row in history or []:
            self.streak = [*self.streak, row] if row.get("round_failed") else []

    def update(self, row: dict, config: FedConfig) -> None:
        """Count the round whose history row is ``row``; raise :class:`FederationStalled` when
        the streak reaches the limit."""
        self.streak = [*self.streak, row] if row.get("round_failed") else []
        if not self.limit or len(self.streak) < self.limit:
            return
        first = next((e for r in self.streak for e in r.get("errors", ())), "no error reported")
        first_round, last_round = self.streak[0]["round"], self.streak[-1]["round"]
        hint = ""
        if "non-finite" in first or "nan" in first.lower().split():
            hint = (f"; non-finite values: local training diverged (lr {config.lr:g}, clip {config.clip}); "
                    "lower --lr or set --clip")
        raise FederationStalled(
            f"{len(self.streak)} rounds in a row aggregated nothing (rounds {first_round} to {last_round}, "
            f"max_failed_rounds = {self.limit}); round {first_round}: {first}{hint}")


def write_history(out: Path, meta: dict, history: list[dict], layer_names: list[str],
                  mask_history: list[np.ndarray] | None = None, mask_layer: str | None = None,
                  clients: ClientRecord | None = None) -> None:
    """``history.csv`` (one row per round; per-layer densities as ``density:<layer>`` columns,
    the global thresholds' statistics as ``tau:<layer>:<mean|std|min|max>``), ``history.json``
    (``meta`` plus the rows, the thresholds' statistics as ``tau: {layer: {stat: value}}``),
    ``masks.npz`` (when there are masks) and ``clients.npz`` (with ``clients``: every client's
    numbers every round, :class:`ClientRecord`), each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    body = {**meta, "history_format": HISTORY_FORMAT, "history": history}
    _atomic_write(out / "history.json", lambda f: f.write(json.dumps(body, indent=1).encode()))
    columns = [k for k in history[0] if k not in ("layers", "errors", "tau")] if history else []
    columns += [f"density:{name}" for name in layer_names]
    tau_layers = list(history[0].get("tau", {})) if history else []
    columns += [f"tau:{name}:{stat}" for name in tau_layers for stat in TAU_STATS]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in history:
        flat = {k: row[k] for k in columns if k in row}
        flat.update({f"density:{k}": v for k, v in row["layers"].items()})
        flat.update({f"tau:{k}:{stat}": v[stat] for k, v in row.get("tau", {}).items() for stat in TAU_STATS})
        writer.writerow(flat)
    _atomic_write(out / "history.csv", lambda f: f.write(buffer.getvalue().encode()))
    if mask_history:
        masks = np.stack(mask_history)
        rounds = np.array([r["round"] for r in history])
        _atomic_write(out / "masks.npz", lambda f: np.savez_compressed(f, masks=masks, rounds=rounds, layer=mask_layer))
    if clients is not None and len(clients):
        arrays = clients.arrays()
        _atomic_write(out / "clients.npz", lambda f: np.savez_compressed(f, **arrays))


TAU_STATS = ("mean", "std", "min", "max")


def threshold_stats(thresholds: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """``{layer: {"mean", "std", "min", "max"}}`` of each layer's thresholds (std over the
    layer's units, population form: 0 for a single unit)."""
    out = {}
    for name, tau in thresholds.items():
        t = tau.detach().double().reshape(-1)
        out[name] = {"mean": float(t.mean()), "std": float(t.std(unbiased=False)), "min": float(t.min()),
                     "max": float(t.max())}
    return out


def round_diagnostics(server, history: list[dict], row: dict, num_clients: int) -> dict:
    """What shows a stuck federation, for the round whose columns ``row`` holds (``history``:
    the rows before it): ``never_sampled``, the clients not in any cohort so far, and, for a
    method with global thresholds (``server.thresholds``), ``tau``, their statistics per layer
    after the round's aggregation (:func:`threshold_stats`)."""
    seen = {int(c) for r in (*history, row) for c in r["sampled"].split()}
    out: dict = {"never_sampled": num_clients - len(seen)}
    if hasattr(server, "thresholds"):
        out["tau"] = threshold_stats(server.thresholds)
    return out


class ClientRecord:
    """Every client's numbers every round, as arrays ``[rounds, num_clients]`` (``clients.npz``):
    ``acc`` and ``loss`` (its latest evaluation: test accuracy in %, mean test loss; NaN without
    test data), ``density`` (layer mean of its model's unit densities), ``collapse_resets`` (its
    guard's resets so far), ``sampled`` (in the round's cohort) and ``train_loss`` (its mean
    training loss that round; NaN when it did not finish a round), plus ``rounds`` (numbers from 1)."""

    FIELDS = {"acc": np.float32, "loss": np.float32, "density": np.float32, "collapse_resets": np.int32,
              "sampled": np.bool_, "train_loss": np.float32}

    def __init__(self, num_clients: int):
        self.num_clients = num_clients
        self.rounds: list[int] = []
        self.rows: dict[str, list[np.ndarray]] = {k: [] for k in self.FIELDS}

    def __len__(self) -> int:
        return len(self.rounds)

    def append(self, round_number: int, evaluations: list[dict], cohort: list[int],
               train_losses: dict[int, float]) -> None:
        """Record a round: every client's latest evaluation, the cohort, the trained clients' losses."""
        n = self.num_clients
        sampled = np.zeros(n, dtype=np.bool_)
        sampled[list(cohort)] = True
        train = np.full(n, np.nan, dtype=np.float32)
        for cid, loss in train_losses.items():
            train[cid] = loss
        nan = float("nan")
        values = {
            "acc": [e["acc"] if e["num_test"] else nan for e in evaluations],
            "loss": [e["loss"] if e["num_test"] else nan for e in evaluations],
            "density": [e["density"] for e in evaluations],
            "collapse_resets": [e["collapse_resets"] for e in evaluations],
            "sampled": sampled,
            "train_loss": train,
        }
        self.rounds.append(int(round_number))
        for k, dtype in self.FIELDS.items():
            self.rows[k].append(np.asarray(values[k], dtype=dtype))

    def arrays(self) -> dict[str, np.ndarray]:
        out = {k: (np.stack(v) if v else np.zeros((0, self.num_clients), dtype=self.FIELDS[k]))
               for k, v in self.rows.items()}
        out["rounds"] = np.asarray(self.rounds, dtype=np.int64)
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Plain tensors (``sampled`` as uint8), for a checkpoint read with ``weights_only=True``."""
        return {k: torch.from_numpy(v.astype(np.uint8) if v.dtype == np.bool_ else v)
                for k, v in self.arrays().items()}

    def load_state_dict(self, d: dict[str, torch.Tensor]) -> None:
        rounds = d["rounds"].numpy()
        self.rounds = [int(r) for r in rounds]
        self.rows = {}
        for k, dtype in self.FIELDS.items():
            array = d[k].numpy().astype(dtype)
            if array.shape != (len(rounds), self.num_clients):
                raise ValueError(f"clients record {k}: shape {array.shape}, expected {(len(rounds), self.num_clients)}")
            self.rows[k] = list(array)


def _atomic_write(path: Path, write: Callable, keep_previous: Path | None = None) -> None:
    """``write(file)`` into a temporary file beside ``path``, fsync it, rename it over ``path``
    and fsync the folder: a crash leaves either the old file or the new one, never a partial
    one. With ``keep_previous``, the file being replaced stays there under that name (a hard
    link made before the rename, or the old file renamed where links are not supported)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous is not None and path.is_file():
            keep_previous.unlink(missing_ok=True)
            try:
                os.link(path, keep_previous)  # path stays in place: there is a checkpoint at every moment
            except OSError:
                os.replace(path, keep_previous)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)  # make the rename durable


def _fsync_dir(folder: Path) -> None:
    """fsync a folder, so that a rename or removal in it survives a crash (where the
    platform allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
