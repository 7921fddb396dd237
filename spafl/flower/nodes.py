"""How spafl's Flower server talks to the nodes: the messages it sends (every one logged, both
ways, with its payload and message size: the wire columns of the history) and which node serves
which partition (learnt by a ``query`` to every node; a node that cannot serve the run, or
claims a partition another connected node serves, is excluded with a warning)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from ..federated.wire import payload_header
from .wire import ARRAYS, CONFIG, METRICS, message_size, metrics_evaluation, pack, unpack

log = logging.getLogger("flwr").getChild("spafl")


class NodeExchange:
    """The part of :class:`.server.MethodStrategy` that talks to nodes. Its state (set by the
    strategy): ``nodes`` (partition id -> node id), ``excluded`` (node id -> (reason, claimed
    partition)), ``wire_log``, and the run's ``config``, ``digest``, ``layer_names``,
    ``method``, ``eval_cache``, ``node_wait`` / ``rejoin_wait``."""

    # --- messages -----------------------------------------------------------------------

    def _message(self, node: int, kind: str, payload: bytes | None, round_index: int) -> Message:
        content = RecordDict({CONFIG: ConfigRecord({"round": round_index, "digest": self.digest})})
        if payload is not None:
            content[ARRAYS] = pack(payload)
        return Message(content, dst_node_id=node, message_type=kind)

    def _log(self, kind: str, direction: str, partition: int | None, msg: Message, round_index: int) -> None:
        content = msg.content if not msg.has_error() else RecordDict()
        records = {name: sorted(rec.keys()) for name, rec in content.items()}
        tensors, payload = {}, 0
        if ARRAYS in content.array_records:  # names and sizes from the header (the tally decodes uplinks)
            try:
                raw = unpack(content.array_records[ARRAYS])
                payload = len(raw)
                header, _ = payload_header(raw)
                tensors = {k: math.prod(v[1]) for k, v in header.items()}
            except (ValueError, TypeError, IndexError, KeyError):  # a malformed uplink: the tally rejects it
                tensors = {"<malformed>": 0}
        self.wire_log.append({"round": round_index, "kind": kind, "direction": direction, "partition": partition,
                 "payload_bytes": payload, "message_bytes": message_size(msg), "records": records,
                 "tensors": tensors})

    def _exchange(self, grid: Grid, kind: str, messages: list[Message], round_index: int,
                  timeout: float | None) -> list[Message]:
        """Send ``messages`` and return the replies that came back in time, logging every message
        both ways (partition ids where known)."""
        partition = {node: p for p, node in self.nodes.items()}
        for msg in messages:
            self._log(kind, "down", partition.get(msg.metadata.dst_node_id), msg, round_index)
        replies = list(grid.send_and_receive(messages, timeout=timeout)) if messages else []
        if kind != MessageType.QUERY and timeout is not None:  # the query names its own (discover)
            silent = {m.metadata.dst_node_id for m in messages} - {r.metadata.src_node_id for r in replies}
            connected = set(grid.get_node_ids()) if silent else set()
            for node in sorted(silent):
                log.warning("round %d: node %d (partition %s) did not reply to the %s message within %.0f s; the "
                            "round goes on without it", round_index + 1, node, partition.get(node, "?"), kind,
                            timeout)
                if node in connected:  # a node that left is reported gone by the next discovery
                    self._exclude_silent(node, partition.get(node), f"did not reply to the {kind} message of "
                                         f"round {round_index + 1} within {timeout:.0f} s")
        for reply in replies:
            p = partition.get(reply.metadata.src_node_id)
            if p is None and not reply.has_error() and METRICS in reply.content.metric_records:
                p = reply.content.metric_records[METRICS].get("partition-id")
            self._log(kind, "up", None if p is None else int(p), reply, round_index)
        return replies

    # --- nodes --------------------------------------------------------------------------

    def discover(self, grid: Grid, needed: Iterable[int] | None = None) -> None:
        """Learn which node serves which partition: query every connected node not yet known.
        A node that cannot serve this run (its query fails or times out, it runs other
        settings, it claims a partition outside the run, or one that another connected node
        already serves) is excluded from sampling with a warning; the run goes on without it.

        The first discovery waits up to ``node_wait`` seconds for all ``num_clients``
        partitions; later ones wait up to ``rejoin_wait`` only while a partition in ``needed``
        (the round's cohort) has no node. A personalised method's clients answer with their
        evaluation, the first entry of the evaluation cache."""
        n = self.config.num_clients
        first = not self._discovered
        wanted = set(range(n)) if first or needed is None else set(needed)
        wait = self.node_wait if first else self.rejoin_wait
        deadline = time.monotonic() + wait
        while True:
            connected = set(grid.get_node_ids())
            gone = {p for p, node in self.nodes.items() if node not in connected}
            for p in sorted(gone):
                log.warning("the SuperNode of partition %d (node %d) is gone", p, self.nodes[p])
            self.nodes = {p: node for p, node in self.nodes.items() if node in connected}
            self.excluded = {node: e for node, e in self.excluded.items() if node in connected}
            served = set(self.nodes.values())
            # a node excluded as a duplicate is asked again once its partition is free
            retry = {node for node, (_, p) in self.excluded.items() if p is not None and p not in self.nodes}
            new = sorted((connected - served - set(self.excluded)) | retry)
            if new:
                messages = [self._message(node, MessageType.QUERY, None, self.round) for node in new]
                timeout = max(deadline - time.monotonic(), 10.0)
                replies = self._exchange(grid, MessageType.QUERY, messages, self.round, timeout)
                answered = set()
                for reply in replies:
                    answered.add(reply.metadata.src_node_id)
                    self._register(reply)
                for node in sorted(set(new) - answered):  # asked again at the next pass
                    log.warning("node %d did not answer the query within %.0f s", node, timeout)
            if wanted <= set(self.nodes) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        self._discovered = True
        missing = sorted(wanted - set(self.nodes))
        if missing:
            log.warning("no SuperNode serves partition(s) %s%s after %.0f s; they are dropped when sampled",
                        missing[:10], " ..." if len(missing) > 10 else "", wait)

    def _exclude(self, node: int, reason: str, partition: int | None) -> None:
        if self.excluded.get(node, ("",))[0] != reason:
            log.warning("node %d excluded from sampling: %s", node, reason)
        self.excluded[node] = (reason, partition)

    def _exclude_silent(self, node: int, partition: int | None, reason: str) -> None:
        """Exclude a node that let a round's message time out, for the rest of the run: sampled
        again, it would cost every later round that samples it the whole round timeout. Its
        partition is free for another node (a SuperNode restarted for it has a new node id and
        is queried as any new node)."""
        if partition is not None and self.nodes.get(partition) == node:
            del self.nodes[partition]
        self._exclude(node, reason, None)

    def _register(self, reply: Message) -> None:
        """Record the partition a query's reply claims, or exclude its node (see :meth:`discover`)."""
        node = reply.metadata.src_node_id
        if reply.has_error():
            self._exclude(node, f"cannot serve this run: {reply.error.reason}", None)
            return
        try:
            digest = reply.content.config_records[CONFIG]["digest"]
            metrics = reply.content.metric_records[METRICS]
            p = metrics["partition-id"]
            evaluation = metrics_evaluation(metrics, self.layer_names)
        except (KeyError, TypeError, ValueError) as e:
            self._exclude(node, f"malformed reply to the query ({type(e).__name__}: {e})", None)
            return
        if digest != self.digest:
            self._exclude(node, f"runs settings {digest}, the server {self.digest}: every SuperNode must run the "
                          "same run config", None)
            return
        if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p < self.config.num_clients:
            self._exclude(node, f"serves partition {p!r}, outside 0..{self.config.num_clients - 1}", None)
            return
        holder = self.nodes.get(p)
        if holder is not None and holder != node:
            self._exclude(node, f"claims partition {p}, which node {holder} serves", p)
            return
        self.excluded.pop(node, None)
        self.nodes[p] = node
        if self.method.personalised and evaluation is None:
            log.warning("node %d (partition %d) sent no evaluation with its query", node, p)
        elif evaluation is not None and self.eval_cache[p] is None:
            self.eval_cache[p] = evaluation

