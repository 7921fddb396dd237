"""The ``ServerApp`` and :class:`MethodStrategy`: the simulator's server functions on Flower.

A round, as in :meth:`spafl.federated.Simulator.run_round`:

1. the cohort is ``sample_clients(seed, round, N, K)``: partition ids, each sent to the Flower
   node that serves it (learnt by a ``query`` to every node, again whenever a node is new; a
   node that cannot serve the run, or claims a partition another connected node serves, is
   excluded with a warning and the run goes on without it);
2. every sampled client gets the method's downlink (``Method.broadcast``, encoded as in the
   simulator) and replies with its uplink;
3. the uplinks are decoded, validated and aggregated by the method (SpaFL: the uniform mean of
   the thresholds; the change of the global thresholds is kept for the next downlink, where the
   clients' threshold-guided weight update reads it);
4. evaluation: a personalised method's clients report their evaluation with their uplink; a
   global method's model is sent to every node to be evaluated on its test split (and, with
   ``server-eval``, on the whole test set here).

The history has the simulator's columns (same seed, same values: the tests check it) and the
bytes measured on the Flower messages: ``wire_payload_down`` / ``wire_payload_up`` (the encoded
payloads, equal to the simulator's ``bytes_down`` / ``bytes_up``), ``wire_message_down`` /
``wire_message_up`` (whole messages as Flower serialises them, headers and metrics included)
and ``wire_eval`` (evaluation messages, which the papers' accounting leaves out). The server
checkpoints every round into ``out_dir`` through :mod:`spafl.federated.runfolder` (atomically,
the previous checkpoint kept, the run id checked against the folder's history) and continues
from there when restarted;
clients replay a round from the state they had before it (:class:`.client.ClientStore`).
"""

from __future__ import annotations

import logging
import time
import uuid
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from .._env import environment
from ..federated import runfolder
from ..federated.build import initial_model, resolve_device, whole_test_set
from ..federated.config import FedConfig, config_mismatch, dataset_classes
from ..federated.data import ImageDataset
from ..federated.datafiles import load_dataset
from ..federated.engine import ClientResult, EngineView, Round, RoundEngine, failed_on_values
from ..federated.keys import sample_clients
from ..federated.methods import make_method
from ..federated.rules import FederatedWarning, UpdateRejected
from ..federated.runfolder import CHECKPOINT_VERSION
from ..federated.training import evaluate
from .client import check_flower_settings
from .nodes import NodeExchange
from .wire import (
    ARRAYS,
    METRICS,
    config_digest,
    config_from_run_config,
    metrics_evaluation,
    metrics_report,
    pack,
    unpack,
)

# A child of Flower's logger: its messages show wherever Flower's do (flwr run --stream, log files).
log = logging.getLogger("flwr").getChild("spafl")


class MethodStrategy(EngineView, NodeExchange, Strategy):
    """A Flower strategy running one of spafl's methods (``config.method``) exactly as the
    simulator does. ``start(grid)`` runs the whole federation; the four ``configure_*`` /
    ``aggregate_*`` methods are Flower's strategy interface for a caller that drives the rounds
    itself (the strategy keeps the global state: the ``arrays`` Flower passes in are ignored).

    Args:
        config: the run; every client must run the same settings (checked by digest).
        out_dir: history, checkpoint (None: keep nothing). A checkpoint there of the same run
            is continued.
        server_eval: a global method's model is also evaluated on the whole test set here
            (needs the dataset on the server).
        round_timeout: seconds to wait for a round's replies (0: no limit); a client that does
            not reply in time is dropped from the round, named in a warning.
        node_wait: seconds to wait, at the start, for the SuperNodes of all ``num_clients``
            partitions (the run then starts with those that came, and warns).
        rejoin_wait: seconds a later round waits for the node of a sampled partition that has
            none (a SuperNode that died and is being restarted); 0: drop it at once. A lost node
            whose partition is not sampled costs no wait at all.
        dataset: the clients' dataset, when it is not the one ``config`` names (its number of
            classes and, with ``server_eval``, its test split are used here).
    """

    def __init__(self, config: FedConfig, *, out_dir: str | Path | None = None, server_eval: bool = True,
                 round_timeout: float = 600.0, node_wait: float = 300.0, rejoin_wait: float = 30.0,
                 command: str | None = None, dataset: ImageDataset | None = None):
        self.config = config.validate()
        check_flower_settings(self.config)
        self.method = make_method(self.config)
        if dataset is not None:
            self.method.sample_bound = len(dataset.train_y)
        self.device = resolve_device(config.device)
        self.out_dir = Path(out_dir) if out_dir else None
        self.round_timeout = round_timeout or None
        self.node_wait = node_wait
        self.rejoin_wait = rejoin_wait
        self.command = command
        self.digest = config_digest(self.config)
        classes = dataset.num_classes if dataset is not None else dataset_classes(config.dataset)
        self.model = initial_model(self.config, self.method, classes, self.device)
        self.prunable = self.method.prunable(self.model)
        self.layer_names = [n for n, _ in self.prunable]
        self.num_weights = sum(layer.weight.numel() for _, layer in self.prunable)
        self.num_thresholds = sum(layer.threshold.numel() for _, layer in self.prunable
                                  if hasattr(layer, "threshold"))
        # The round, its global state, totals and history (the same engine drives the simulator).
        self.engine = RoundEngine(self.config, self.method, self.method.init_server(self.model), self.layer_names)
        self.eval_cache: list[dict | None] = [None] * config.num_clients
        self.global_eval: dict | None = None
        self.global_test = None
        if server_eval and not self.method.personalised:
            if dataset is None:
                dataset = load_dataset(config.dataset, config.data_root, config.download)
            self.global_test = whole_test_set(dataset, self.config, self.device)
        self.nodes: dict[int, int] = {}  # partition id -> Flower node id
        # Flower node id -> (why it does not serve this run, the partition it claimed or None);
        # a node claiming a partition that another node serves is asked again once that one is gone
        self.excluded: dict[int, tuple[str, int | None]] = {}
        self._discovered = False  # the first discovery (which waits node_wait) is done
        self.wire_log: list[dict] = []  # one entry per message sent or received (in memory)
        self._wire_start = 0
        self._round: Round | None = None
        self._partitions: dict[int, Message] = {}  # the round's train messages, by partition
        # Drawn when the run starts, kept in its checkpoints and history (tells this run's files
        # from another's when the server restarts on a folder).
        self.run_id = uuid.uuid4().hex
        if self.out_dir is not None and runfolder.holds_run(self.out_dir):
            self.resume_from(self.out_dir)

    def summary(self) -> None:
        cfg = self.config
        log.info("spafl %s: %d partitions, %d per round, %d rounds, settings %s, at round %d", self.method.name,
                 cfg.num_clients, cfg.clients_per_round, cfg.rounds, self.digest, self.round)

    # --- Flower's strategy interface ----------------------------------------------------

    def configure_train(self, server_round: int, arrays: ArrayRecord | None, config: ConfigRecord | None,
                        grid: Grid) -> Iterable[Message]:
        """The train messages of round ``server_round`` (1-based, Flower's count) to the nodes of
        the sampled partitions."""
        t = server_round - 1
        if t != self.round:
            raise ValueError(f"the strategy is at round {self.round + 1}, asked to configure round {server_round}")
        self._round = rnd = self.engine.begin()
        self._partitions = {}
        out = []
        for p in rnd.cohort:
            if p in self.nodes:
                msg = self._message(self.nodes[p], MessageType.TRAIN, rnd.down, t)
                self._partitions[p] = msg
                out.append(msg)
        return out

    def _result(self, p: int, reply: Message | None) -> ClientResult:
        """Partition ``p``'s reply as the round's tally takes it (its evaluation, for a
        personalised method, into the evaluation cache)."""
        if p not in self._partitions:
            return ClientResult(p, "dropped", error="no SuperNode serves this partition")
        if reply is None:
            return ClientResult(p, "dropped", error="no reply in time")
        if reply.has_error():  # the ClientApp raised (its exception's type in the reason), or Flower failed
            reason = reply.error.reason
            return ClientResult(p, "dropped", error=reason, state_failure=failed_on_values(reason))
        method = self.method
        metrics = reply.content.metric_records.get(METRICS, {})
        try:
            if metrics.get("partition-id") != p:
                raise ValueError(f"it answers for partition {metrics.get('partition-id')!r}")
            report = metrics_report(metrics, {})
            evaluation = metrics_evaluation(metrics, self.layer_names)
            if method.personalised and evaluation is None:
                raise ValueError("the reply carries no evaluation")
        except (KeyError, TypeError, ValueError) as e:
            return ClientResult(p, "dropped", error=f"malformed reply: {e}")
        try:
            n = method.check_sample_count(report.num_samples)
        except UpdateRejected as e:
            return ClientResult(p, "refused", error=str(e))
        if method.personalised:
            self.eval_cache[p] = evaluation
        if not method.communicates:
            return ClientResult(p, "ok", report)
        try:
            up = unpack(reply.content.array_records[ARRAYS])
        except (KeyError, ValueError) as e:
            return ClientResult(p, "rejected", report, error=f"unreadable uplink: {e}")
        return ClientResult(p, "ok", report, up, n)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None,
                                                                                       MetricRecord | None]:
        """Decode, validate and aggregate the uplinks in the cohort's order (the round engine's
        tally, as the simulator's); return the next downlink and the round's training metrics."""
        rnd = self._round
        by_node = {r.metadata.src_node_id: r for r in replies}
        results = []
        for p in rnd.cohort:
            msg = self._partitions.get(p)
            results.append(self._result(p, by_node.get(msg.metadata.dst_node_id) if msg is not None else None))
        self.engine.collect(rnd, results)
        self.engine.aggregate(rnd)
        tally = rnd.tally
        train_loss = float(np.mean(tally.train_losses)) if tally.train_losses else float("nan")
        _, down = self.engine.downlink()
        metrics = MetricRecord({"train-loss": train_loss, "participants": len(tally.accepted)})
        return (pack(down) if down is not None else None), metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord | None, config: ConfigRecord | None,
                           grid: Grid) -> Iterable[Message]:
        """A global method's model to every node (personalised clients reported with their
        uplink: nothing to send)."""
        if self.method.personalised:
            return []
        _, payload = self.engine.downlink()
        return [self._message(node, MessageType.EVALUATE, payload, server_round - 1) for node in self.nodes.values()]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Update the evaluation cache, evaluate the global model on the whole test set, write
        the round's history row; return the client-averaged metrics."""
        rnd, method = self._round, self.method
        tally = rnd.tally
        start = time.perf_counter()
        node_partition = {node: p for p, node in self.nodes.items()}
        for reply in replies:
            p = node_partition.get(reply.metadata.src_node_id)
            if p is None:
                continue
            try:
                evaluation = None if reply.has_error() else metrics_evaluation(
                    reply.content.metric_records[METRICS], self.layer_names)
                reason = reply.error.reason if reply.has_error() else "no evaluation"
            except (KeyError, TypeError, ValueError) as e:
                evaluation, reason = None, f"malformed evaluation: {e}"
            if evaluation is None:
                tally.errors.append(f"client {p} evaluation failed: {reason}")
                continue
            self.eval_cache[p] = evaluation
        missing = [p for p, e in enumerate(self.eval_cache) if e is None]
        if missing:  # partitions no node has served yet: the metrics cover the others
            tally.errors.append(f"no evaluation of partition(s) {missing[:10]} yet (no SuperNode has served them); "
                                "the accuracy columns cover the other partitions")
        if self.global_test is not None:
            method.load(self.model, self.server, None)
            self.global_eval = evaluate(self.model, None, self.global_test, self.config.eval_batch_size, None,
                                        self.prunable)
        eval_s = time.perf_counter() - start
        row = self.engine.finish(rnd, [e for e in self.eval_cache if e is not None], self.global_eval, eval_s,
                                 first={"unevaluated": len(missing)}, last=self._wire_columns(rnd.index))
        return MetricRecord({"acc-mean": row["acc_mean"], "density": row["density"]})

    def _wire_columns(self, t: int) -> dict:
        cols = {"wire_payload_down": 0, "wire_payload_up": 0, "wire_message_down": 0, "wire_message_up": 0,
                "wire_eval": 0}
        for e in self.wire_log[self._wire_start:]:  # the entries logged since the last row
            if e["round"] != t:
                continue
            if e["kind"] == MessageType.TRAIN:
                cols[f"wire_payload_{e['direction']}"] += e["payload_bytes"]
                cols[f"wire_message_{e['direction']}"] += e["message_bytes"]
            elif e["kind"] == MessageType.EVALUATE:
                cols["wire_eval"] += e["message_bytes"]
        self._wire_start = len(self.wire_log)
        return cols

    # --- the run --------------------------------------------------------------------------

    def start(self, grid: Grid, initial_arrays: ArrayRecord | None = None, num_rounds: int | None = None,
              timeout: float | None = None, train_config: ConfigRecord | None = None,
              evaluate_config: ConfigRecord | None = None, evaluate_fn=None) -> list[dict]:
        """Run until ``num_rounds`` (default ``config.rounds``) rounds are done; checkpoint and
        write the history after every round; return the history. ``timeout`` overrides
        ``round_timeout``. The strategy keeps the global model, the round settings and the
        evaluation itself: Flower's ``initial_arrays``, ``train_config``, ``evaluate_config``
        and ``evaluate_fn`` are refused rather than ignored."""
        given = [name for name, value in (("initial_arrays", initial_arrays), ("train_config", train_config),
                                          ("evaluate_config", evaluate_config), ("evaluate_fn", evaluate_fn))
                 if value is not None]
        if given:
            raise ValueError(f"MethodStrategy.start does not take {given}: the global state comes from the "
                             "method (config.method) and the run's seed")
        target = self.config.rounds if num_rounds is None else num_rounds
        if timeout is not None:
            self.round_timeout = timeout or None
        self.summary()
        if self.out_dir is not None and self.round < target:  # writable, no stale temporaries
            runfolder.prepare(self.out_dir)
        while self.round < target:
            t = self.round
            self.discover(grid, sample_clients(self.config.seed, t, self.config.num_clients,
                                               self.config.clients_per_round))
            server_round = self.round + 1
            messages = list(self.configure_train(server_round, None, None, grid))
            self.aggregate_train(server_round, self._exchange(grid, MessageType.TRAIN, messages, t,
                                                              self.round_timeout))
            messages = list(self.configure_evaluate(server_round, None, None, grid))
            metrics = self.aggregate_evaluate(server_round, self._exchange(grid, MessageType.EVALUATE, messages, t,
                                                                           self.round_timeout))
            row = self.history[-1]
            log.info("round %d/%d: acc %.2f%%, density %.3f, payload %d B down / %d B up, messages %d B / %d B",
                     server_round, target, metrics["acc-mean"], metrics["density"], row["wire_payload_down"],
                     row["wire_payload_up"], row["wire_message_down"], row["wire_message_up"])
            if self.out_dir is not None:
                self.save_checkpoint()
                self.write_history()
            self._check_progress(row)
        if self.out_dir is not None and not self.history:
            self.write_history()
        return self.history

    def _check_progress(self, row: dict) -> None:
        """Count the rounds in a row that aggregated nothing (every sampled client dropped or
        rejected, or the aggregate refused; for local-only: no client trained); stop the run
        with :class:`~spafl.federated.engine.FederationStalled` after
        ``config.max_failed_rounds`` of them (:class:`~spafl.federated.engine.FailedRounds`)."""
        tally = self._round.tally
        if tally.failed:
            log.warning(tally.outcome(row["round"]))
        self.engine.check_progress(row)

    # --- files ----------------------------------------------------------------------------

    def summary_dict(self) -> dict:
        last = self.history[-1] if self.history else {}
        return {"method": self.method.name, "rounds": len(self.history), "final_acc": last.get("acc_mean"),
                "final_density": last.get("density"), "comm_gbit_paper": last.get("comm_gbit_paper_total"),
                "bytes_exchanged": last.get("bytes_total"), "num_thresholds": self.num_thresholds}

    def write_history(self) -> None:
        meta = {"engine": "flower", "run_id": self.run_id, "config": self.config.to_dict(),
                "environment": environment(self.device),
                "command": self.command, "settings_digest": self.digest, "num_thresholds": self.num_thresholds,
                "num_weights": self.num_weights, "layers": self.layer_names, "summary": self.summary_dict()}
        runfolder.write_history(self.out_dir, meta, self.history, self.layer_names)

    def state_dict(self) -> dict:
        return {"version": CHECKPOINT_VERSION, "engine": "flower", "run_id": self.run_id,
                "config": self.config.to_dict(), **self.engine.state_dict(), "eval_cache": self.eval_cache,
                "global_eval": self.global_eval}

    def save_checkpoint(self, path: str | Path | None = None) -> Path:
        """The server's state to ``path`` (default ``<out_dir>/checkpoint.pt``), atomically, the
        checkpoint before it kept as ``checkpoint.prev.pt`` (:func:`runfolder.save_checkpoint`)."""
        path = Path(path) if path is not None else self.out_dir / runfolder.CHECKPOINT
        return runfolder.save_checkpoint(path, self.state_dict())

    def resume_from(self, folder: str | Path) -> None:
        """Continue the run in ``folder``: its checkpoint, or the previous one when that is
        missing or unreadable (logged), which must be the run of the folder's history (run id,
        settings, the rounds both hold: :func:`runfolder.open_checkpoint`); else
        :class:`runfolder.RunFolderError` naming the file, and nothing is changed."""
        try:
            found = runfolder.open_checkpoint(folder, engine="flower")
        except FileNotFoundError:
            return  # a history without a checkpoint: nothing to continue (the history is rewritten)
        for note in found.notes:
            log.warning(note)
        self.load_checkpoint(found.ckpt, source=found.file)

    def load_checkpoint(self, ckpt: dict | str | Path, source: str | Path | None = None) -> None:
        """Load a checkpoint (a dict as :func:`runfolder.read_checkpoint` gives it, or a file read
        with it); its settings must be this run's."""
        if not isinstance(ckpt, dict):
            source = Path(ckpt)
            ckpt = runfolder.read_checkpoint(source, engine="flower")
        problems = config_mismatch(ckpt["config"], self.config)
        if problems:
            raise ValueError(f"{source} was written by a run with other settings:\n  " + "\n  ".join(problems))
        try:
            self.engine.load_state_dict(ckpt)
            self.eval_cache = ckpt["eval_cache"]
            self.global_eval = ckpt["global_eval"]
        except (KeyError, TypeError, AttributeError, IndexError, RuntimeError) as e:
            raise runfolder.RunFolderError(f"{source} is a malformed checkpoint ({type(e).__name__}: {e})") from e
        if ckpt.get("run_id"):
            self.run_id = str(ckpt["run_id"])
        log.info("continuing the run in %s from round %d", Path(source).parent if source else "?", self.round)


def server_app(config: FedConfig | None = None, out_dir: str | Path | None = None, *, server_eval: bool = True,
               round_timeout: float = 600.0, node_wait: float = 300.0, rejoin_wait: float = 30.0,
               dataset: ImageDataset | None = None, on_start=None) -> ServerApp:
    """A ``ServerApp`` running :class:`MethodStrategy` for ``config``; with ``config`` None
    (what ``flwr run`` loads), the settings come from Flower's run config. ``on_start(strategy)``
    is called before the first round (to keep a handle on it)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if config is None:
            cfg, options = config_from_run_config(context.run_config)
            kwargs = dict(out_dir=options["out-dir"] or None, server_eval=options["server-eval"],
                          round_timeout=float(options["round-timeout"]), node_wait=float(options["node-wait"]),
                          rejoin_wait=float(options["rejoin-wait"]))
        else:
            cfg = config
            kwargs = dict(out_dir=out_dir, server_eval=server_eval, round_timeout=round_timeout, node_wait=node_wait,
                          rejoin_wait=rejoin_wait, dataset=dataset)
        with warnings.catch_warnings():
            warnings.simplefilter("always", FederatedWarning)
            strategy = MethodStrategy(cfg, **kwargs)
            if on_start is not None:
                on_start(strategy)
            strategy.start(grid)

    return app


app = server_app()
