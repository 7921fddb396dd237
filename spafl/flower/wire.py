"""What the Flower apps share: the run configuration, the message layout and its byte count.

A message's content is a ``RecordDict`` with up to three records:

``arrays``   an ``ArrayRecord`` with one ``Array`` named ``payload``: the simulator's encoded
             message (:func:`spafl.federated.wire.encode`) as raw bytes (dtype ``uint8``,
             ``stype`` :data:`STYPE`), so its size is exactly the simulator's ``bytes_down`` /
             ``bytes_up`` share. Absent when the method sends nothing (local-only).
``config``   (server to client) the round index and a digest of the run's settings.
``metrics``  (client to server) the training report and the client's evaluation: scalars only.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from flwr.app import Array, ArrayRecord, Message
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from ..federated.config import RESUMABLE_CHANGES, FedConfig, build_config
from ..federated.training import ClientReport

STYPE = "spafl.protocol"
ARRAYS, CONFIG, METRICS = "arrays", "config", "metrics"

# Run-config keys that are not FedConfig fields.
APP_OPTIONS = {
    "preset": "",  # a preset name; "" for the built-in default (digits-cnn)
    "state-dir": "flower-state",  # where each client persists its model (one file per partition)
    "out-dir": "runs/flower",  # the server's history and checkpoint ("" for none)
    "server-eval": True,  # global methods: evaluate the global model on the whole test set at the server
    # Seconds to wait for a round's replies; a node that does not reply in time is dropped from
    # the round (named in a warning). Finite by default: one ClientApp that never replies must not
    # hang the federation; 600 s is far above a CPU round of the presets. 0: no limit.
    "round-timeout": 600.0,
    "node-wait": 300.0,  # seconds to wait at the start for every partition's SuperNode to connect
    "rejoin-wait": 30.0,  # seconds a later round waits for a sampled partition's lost SuperNode
}
# Settings a SuperNode may set for itself (``--node-config``): where its data and state live.
NODE_OPTIONS = ("data-root", "device", "state-dir")
_FIELDS = {f.name: f for f in fields(FedConfig)}


def _key(name: str) -> str:
    return name.replace("-", "_")


def config_from_run_config(run_config: Mapping[str, Any],
                           node_config: Mapping[str, Any] | None = None) -> tuple[FedConfig, dict[str, Any]]:
    """``(FedConfig, app options)`` from Flower's run config: ``preset`` (a spafl preset, "" for
    the default one) layered with every other key naming a FedConfig field (dashes or
    underscores; "" leaves the preset's value), then the SuperNode's own ``data-root``,
    ``device`` and ``state-dir`` from ``node_config``. Unknown keys are an error."""
    values = dict(run_config)
    options = dict(APP_OPTIONS)
    for name in APP_OPTIONS:
        if name in values:
            options[name] = values.pop(name)
    for name in NODE_OPTIONS:
        if node_config and name in node_config and node_config[name] != "":
            if name in options:  # an app option (state-dir), not a FedConfig field
                options[name] = node_config[name]
            else:
                values[name] = node_config[name]
    overrides, unknown = {}, []
    for name, value in values.items():
        key = _key(name)
        if key not in _FIELDS:
            unknown.append(name)
        elif value != "":
            overrides[key] = value
    if unknown:
        valid = sorted([*APP_OPTIONS, *(f.replace("_", "-") for f in _FIELDS)])
        raise ValueError(f"unknown run-config key(s) {sorted(unknown)}; valid keys: {valid}")
    preset = options["preset"] or "digits-cnn"
    for name in ("round-timeout", "node-wait", "rejoin-wait"):
        value = options[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a non-negative number of seconds, got {value!r}")
    if not isinstance(options["server-eval"], bool):
        raise ValueError(f"server-eval must be true or false, got {options['server-eval']!r}")
    return build_config(preset, None, overrides), options


def config_digest(config: FedConfig) -> str:
    """A short hash of the settings that determine the computation (not where data and state
    live, nor the device): server and clients must agree on it."""
    d = {k: v for k, v in sorted(config.to_dict().items()) if k not in RESUMABLE_CHANGES}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# --- payload ------------------------------------------------------------------------------


def pack(payload: bytes) -> ArrayRecord:
    """The encoded message as an ``ArrayRecord`` holding exactly ``payload``."""
    return ArrayRecord({"payload": Array(dtype="uint8", shape=(len(payload),), stype=STYPE, data=bytes(payload))})


def unpack(record: ArrayRecord) -> bytes:
    """The encoded message out of :func:`pack`'s record; ``ValueError`` if it is not one."""
    if not isinstance(record, ArrayRecord) or list(record.keys()) != ["payload"]:
        keys = list(record.keys()) if isinstance(record, ArrayRecord) else type(record).__name__
        raise ValueError(f"expected an ArrayRecord with one array 'payload', got {keys}")
    array = record["payload"]
    if array.stype != STYPE or array.dtype != "uint8" or list(array.shape) != [len(array.data)]:
        raise ValueError(f"payload array: stype {array.stype!r}, dtype {array.dtype!r}, shape {list(array.shape)} "
                         f"with {len(array.data)} bytes; expected a {STYPE!r} uint8 byte string")
    return bytes(array.data)


def payload_size(message: Message) -> int:
    """Bytes of the encoded payload a message carries (0 without one)."""
    content = message.content
    return len(unpack(content.array_records[ARRAYS])) if ARRAYS in content.array_records else 0


def message_size(message: Message) -> int:
    """Bytes of the message as Flower serialises it for transport: every object of its tree
    (message, record dict, records, arrays and their chunks), headers and metadata included."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


# --- metrics ------------------------------------------------------------------------------


def _scalar(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def report_metrics(report: ClientReport, partition: int) -> dict[str, int | float]:
    """A training report (without its update, which travels as the payload) as scalars."""
    out: dict[str, int | float] = {"partition-id": partition, "num-examples": int(report.num_samples),
                                   "train-loss": float(report.train_loss), "flops": float(report.flops)}
    out.update({f"stat.{k}": v for k, v in report.stats.items() if _scalar(v)})
    return out


def _number(metrics: Mapping[str, Any], key: str, integer: bool = False, low: float = -math.inf,
            high: float = math.inf, nan_ok: bool = False) -> int | float:
    """``metrics[key]`` checked: an int (``integer``) or a number, within ``[low, high]``
    (NaN only with ``nan_ok``); ``ValueError`` (``KeyError`` when absent) otherwise."""
    value = metrics[key]
    if isinstance(value, bool) or not isinstance(value, (int,) if integer else (int, float)):
        raise ValueError(f"{key} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if value != value:
        if nan_ok:
            return float(value)
        raise ValueError(f"{key} is NaN")
    if not low <= value <= high:
        raise ValueError(f"{key} = {value!r} is outside [{low}, {high}]")
    return value


def metrics_report(metrics: Mapping[str, Any], update: dict) -> ClientReport:
    """The training report in a reply's metrics, its numbers checked (the sample count is an
    integer; the server checks its range); ``ValueError`` or ``KeyError`` otherwise."""
    stats = {k[len("stat."):]: v for k, v in metrics.items() if k.startswith("stat.")}
    return ClientReport(update, _number(metrics, "num-examples", integer=True),
                        float(_number(metrics, "train-loss", nan_ok=True)),
                        float(_number(metrics, "flops", low=0.0, high=1e30)), stats)


def evaluation_metrics(result: Mapping[str, Any]) -> dict[str, int | float]:
    """An evaluation (:func:`spafl.federated.training.evaluate`, plus ``collapse_resets``) as
    scalars; the unit mask stays on the client."""
    out: dict[str, int | float] = {"eval.acc": float(result["acc"]), "eval.loss": float(result["loss"]),
                                   "eval.num-test": int(result["num_test"]), "eval.density": float(result["density"]),
                                   "eval.density-weighted": float(result["density_weighted"]),
                                   "eval.collapse-resets": int(result.get("collapse_resets", 0))}
    out.update({f"eval.layer.{k}": float(v) for k, v in result["layers"].items()})
    return out


def metrics_evaluation(metrics: Mapping[str, Any], layers: list[str] | None = None) -> dict[str, Any] | None:
    """The evaluation in a reply's metrics, or None if it carries none. Its numbers are checked
    (accuracy in [0, 100], densities in [0, 1], counts non-negative integers) and, with
    ``layers``, its per-layer densities must name exactly those layers; ``ValueError`` or
    ``KeyError`` otherwise, so that a client cannot break the history with its report."""
    if "eval.acc" not in metrics:
        return None
    found = {k[len("eval.layer."):]: float(_number(metrics, k, low=0.0, high=1.0))
             for k in metrics if k.startswith("eval.layer.")}
    if layers is not None and sorted(found) != sorted(layers):
        raise ValueError(f"the evaluation has layers {sorted(found)[:10]}, expected {sorted(layers)[:10]}")
    return {"acc": float(_number(metrics, "eval.acc", low=0.0, high=100.0, nan_ok=True)),
            "loss": float(_number(metrics, "eval.loss", low=0.0, nan_ok=True)),
            "num_test": int(_number(metrics, "eval.num-test", integer=True, low=0)),
            "density": float(_number(metrics, "eval.density", low=0.0, high=1.0, nan_ok=True)),
            "density_weighted": float(_number(metrics, "eval.density-weighted", low=0.0, high=1.0, nan_ok=True)),
            "layers": found, "collapse_resets": int(_number(metrics, "eval.collapse-resets", integer=True, low=0)),
            "mask": None}
