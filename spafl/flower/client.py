"""The ``ClientApp``: one partition's client, running the simulator's client functions.

A SuperNode serves the partition named by its node config (``partition-id``,
``num-partitions``; Flower's simulation engine sets both). The partition is the simulator's
seeded Dirichlet split of the dataset, so partition ``p`` holds exactly the data of the
simulator's client ``p``. The client's model (weights, batch-norm state) is kept in
``<state-dir>/partition-<p>.pt`` between rounds, written and read by the run folder module
(atomically, the previous file kept, ``torch.load(weights_only=True)``): Flower's in-memory
context does not survive a restart, the file does.

Messages (see :mod:`.wire`):

``query``     the partition id, the digest of the client's settings and, for a personalised
              method, its evaluation (the server's first view of every client)
``train``     the round's downlink in, :meth:`Method.client_round` (for SpaFL
              :func:`spafl.federated.methods.spafl.client_round`), the uplink out; a personalised
              client also reports the evaluation of its new model
``evaluate``  the global model in (global methods), its evaluation on the local test split out
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ..federated import runfolder
from ..federated.accounting import layer_macs
from ..federated.build import check_dataset, initial_model, resolve_device
from ..federated.config import FedConfig, config_mismatch
from ..federated.data import ImageDataset, client_data, split_for_run
from ..federated.datafiles import load_dataset
from ..federated.methods import GlobalState, make_method
from ..federated.training import evaluate
from ..federated.wire import decode, encode
from .wire import (
    ARRAYS,
    CONFIG,
    METRICS,
    config_digest,
    config_from_run_config,
    evaluation_metrics,
    pack,
    report_metrics,
    unpack,
)

log = logging.getLogger("flwr").getChild("spafl")


def check_flower_settings(config: FedConfig) -> None:
    """Refuse the settings the Flower apps cannot run as the simulator does."""
    if config.rng != "keyed":
        raise ValueError(f"rng={config.rng!r} draws every client's batch order from one stream of the "
                         "simulator's process; Flower clients run apart: use rng='keyed'")
    if config.collapse_in_eval:
        raise ValueError("collapse_in_eval=True needs every client evaluated every round with the reset kept in "
                         "its state; the Flower apps evaluate a personalised client only when it trains: run it "
                         "in the simulator")


class ClientStore:
    """One partition's state on disk: the state after the last round it trained, the state
    before that round (so that a round the server replays after a restart starts from the same
    state), the round index and the run's settings. A state is the client's model and, with
    ``optimizer_lifetime="per-run"``, its optimiser's momentum (``momentum/<parameter>``
    entries; a global method's client keeps only those); plain tensors, read with
    ``torch.load(weights_only=True)``."""

    def __init__(self, path: Path, config: FedConfig):
        self.path, self.config = Path(path), config

    def load(self) -> dict | None:
        """The saved record (None: this client has not trained yet); the previous file when the
        newest is unreadable (:func:`runfolder.read_client_state`, logged);
        :class:`runfolder.RunFolderError` naming the file when neither can be read."""
        saved, notes = runfolder.read_client_state(self.path)
        for note in notes:
            log.warning(note)
        if saved is None:
            return None
        problems = config_mismatch(saved["config"], self.config)
        if problems:
            raise ValueError(f"{self.path} was written by a run with other settings ({'; '.join(problems)}); "
                             "give this run its own state-dir")
        return saved

    def state_for(self, round_index: int, initial: dict) -> dict:
        """The state the client trains round ``round_index`` from."""
        saved = self.load()
        if saved is None:
            return initial
        if saved["round"] < round_index:
            return saved["state"]
        if saved["round"] == round_index:  # the server restarted and replays this round
            return saved["before"]
        raise ValueError(f"{self.path} holds the state after round {saved['round']} but the server is at round "
                         f"{round_index}: its checkpoint is older than this client; resume the server from its "
                         "latest checkpoint or start the run with an empty state-dir")

    def latest(self, initial: dict) -> dict:
        saved = self.load()
        return initial if saved is None else saved["state"]

    def save(self, round_index: int, before: dict | None, after: dict | None) -> None:
        cpu = lambda s: None if s is None else {k: v.detach().cpu() for k, v in s.items()}  # noqa: E731
        record = {"config": self.config.to_dict(), "round": round_index, "state": cpu(after), "before": cpu(before)}
        runfolder.save_checkpoint(self.path, record)  # atomic; the previous file kept beside it


_DATA: dict[tuple, list] = {}  # the split data of a run, per process (a process may serve many partitions)


def _run_data(config: FedConfig, device: torch.device, dataset: ImageDataset | None = None) -> tuple:
    key = (config.dataset, config.data_root, config.num_clients, config.alpha, config.min_train_samples, config.seed,
           config.normalize, config.augment, str(device), None if dataset is None else id(dataset))
    if key not in _DATA:
        if dataset is None:
            dataset = load_dataset(config.dataset, config.data_root, config.download)
        check_dataset(dataset, config, custom_model=False)
        train_idx, test_idx = split_for_run(dataset, config.num_clients, config.alpha, config.min_train_samples,
                                            config.seed)
        _DATA.clear()
        _DATA[key] = (dataset.num_classes, dataset.image_shape,
                      client_data(dataset, train_idx, test_idx, config.normalize, config.augment, device))
    return _DATA[key]


class PartitionClient:
    """Client ``partition`` of the run ``config``: its data (from ``dataset``, default: the
    dataset ``config`` names), a working model and its store."""

    def __init__(self, config: FedConfig, partition: int, state_dir: str | Path, dataset: ImageDataset | None = None):
        self.config = config.validate()
        check_flower_settings(self.config)
        self.partition = partition
        self.device = resolve_device(config.device)
        self.method = make_method(config)
        num_classes, image_shape, clients = _run_data(config, self.device, dataset)
        self.data = clients[partition]
        self.model = initial_model(config, self.method, num_classes, self.device)
        self.initial = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.prunable = self.method.prunable(self.model)
        self.macs = layer_macs(self.model, image_shape, self.device, layers=self.prunable)
        names = [n for n, _ in self.prunable]
        self.mask_layer = (config.mask_layer or names[0]) if self.method.name == "spafl" and names else None
        self.store = ClientStore(Path(state_dir) / f"partition-{partition:05d}.pt", config)
        self.digest = config_digest(config)

    def _evaluate(self, state: dict | None) -> dict:
        result = evaluate(self.model, None, self.data, self.config.eval_batch_size, None, self.prunable)
        result["collapse_resets"] = sum(int(v) for k, v in (state or {}).items() if k.endswith("collapse_resets"))
        return result

    def evaluate_own(self) -> dict:
        """A personalised client's evaluation of its current model."""
        state = self.store.latest(self.initial)
        self.method.load(self.model, None, state)
        return self._evaluate(state)

    def evaluate_global(self, params: dict) -> dict:
        self.method.load(self.model, GlobalState(params), None)
        return self._evaluate(None)

    def train(self, message: dict, round_index: int) -> tuple[bytes | None, dict]:
        """One round: ``(encoded uplink or None, metrics)``."""
        method = self.method
        # A personalised client keeps its model; with a per-run optimiser, any client keeps its momentum.
        keeps_state = method.personalised or self.config.optimizer_lifetime == "per-run"
        initial = self.initial if method.personalised else None
        state = self.store.state_for(round_index, initial) if keeps_state else None
        new_state, report = method.client_round(self.model, state, message, self.data, self.config, round_index,
                                                self.partition, self.macs)
        metrics = report_metrics(report, self.partition)
        if keeps_state:
            self.store.save(round_index, state, new_state)
        if method.personalised:
            method.load(self.model, None, new_state)
            metrics.update(evaluation_metrics(self._evaluate(new_state)))
        up = encode(report.update, sparse=method.sparse_wire) if method.communicates else None
        return up, metrics


_CLIENTS: dict[tuple, PartitionClient] = {}


def _partition(context: Context) -> tuple[int, int]:
    node = context.node_config
    if "partition-id" not in node or "num-partitions" not in node:
        raise ValueError("this SuperNode has no partition: start it with "
                         "--node-config 'partition-id=P num-partitions=N'")
    return int(node["partition-id"]), int(node["num-partitions"])


def _client(context: Context, config: FedConfig | None, state_dir: str | Path | None,
            dataset: ImageDataset | None) -> PartitionClient:
    if config is None:
        config, options = config_from_run_config(context.run_config, context.node_config)
        state_dir = options["state-dir"]
    partition, count = _partition(context)
    if count != config.num_clients or not 0 <= partition < count:
        raise ValueError(f"this SuperNode serves partition {partition} of {count}, but the run has "
                         f"{config.num_clients} clients (num-clients)")
    state_dir = Path(state_dir if state_dir is not None else "flower-state").resolve()
    key = (config_digest(config), config.data_root, config.device, partition, str(state_dir), id(dataset))
    if key not in _CLIENTS:
        _CLIENTS[key] = PartitionClient(config, partition, state_dir, dataset)
    return _CLIENTS[key]


def _check_digest(client: PartitionClient, msg: Message) -> ConfigRecord:
    config = msg.content.config_records.get(CONFIG)
    if config is None or "digest" not in config:
        raise ValueError("the message carries no run-settings digest (not sent by spafl's ServerApp?)")
    if config["digest"] != client.digest:
        raise ValueError(f"the server runs settings {config['digest']} but this client {client.digest}: "
                         "server and clients must use the same run config")
    return config


def _received(client: PartitionClient, msg: Message) -> dict:
    arrays = msg.content.array_records.get(ARRAYS)
    return decode(unpack(arrays)) if arrays is not None else {}


def client_app(config: FedConfig | None = None, state_dir: str | Path | None = None,
               dataset: ImageDataset | None = None) -> ClientApp:
    """A ``ClientApp`` for the run ``config`` persisting into ``state_dir``, on ``dataset``
    (default: the one ``config`` names); with ``config`` None (what ``flwr run`` loads), the
    settings come from Flower's run config and node config."""
    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        client = _client(context, config, state_dir, dataset)
        metrics = {"partition-id": client.partition}
        if client.method.personalised:
            metrics.update(evaluation_metrics(client.evaluate_own()))
        content = RecordDict({METRICS: MetricRecord(metrics), CONFIG: ConfigRecord({"digest": client.digest})})
        return Message(content, reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        client = _client(context, config, state_dir, dataset)
        settings = _check_digest(client, msg)
        up, metrics = client.train(_received(client, msg), int(settings["round"]))
        content = RecordDict({METRICS: MetricRecord(metrics)})
        if up is not None:
            content[ARRAYS] = pack(up)
        return Message(content, reply_to=msg)

    @app.evaluate()
    def evaluate_(msg: Message, context: Context) -> Message:
        client = _client(context, config, state_dir, dataset)
        _check_digest(client, msg)
        if client.method.personalised:
            result = client.evaluate_own()
        else:
            result = client.evaluate_global(_received(client, msg))
        metrics = {"partition-id": client.partition, **evaluation_metrics(result)}
        return Message(RecordDict({METRICS: MetricRecord(metrics)}), reply_to=msg)

    return app


app = client_app()
