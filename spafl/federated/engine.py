"""The round, once for every transport.

A round is: the cohort and the downlink (:meth:`RoundEngine.begin`), the client jobs (run by
the transport: in-process threads, :func:`run_client`, or Flower nodes), the server's tally of
what came back in the cohort's order (:meth:`RoundEngine.collect`: dropped, refused, trained,
rejected or accepted, every check of :mod:`.rules` applied through the method), the aggregate
(:meth:`RoundEngine.aggregate`, with the rollback to an earlier global state when most of the
cohort could not train from this one: :class:`RollbackRing`), the evaluation (the transport's
again) and the history row (:meth:`RoundEngine.finish`), then the stall check
(:meth:`RoundEngine.check_progress`).

The two transports: :class:`.simulator.Simulator` (clients in this process, in threads) and
:class:`spafl.flower.MethodStrategy` (clients on Flower nodes, reached through its ``Grid``).
Neither assembles a round itself: what they differ in is only how a client job is run and how
its result reaches the server. A new rule for what the server accepts or how it aggregates
goes into :mod:`.rules` and the method (``Method.update_bounds``, ``Method.aggregate``), and
reaches both transports through :meth:`RoundEngine.collect` / :meth:`RoundEngine.aggregate`.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from . import accounting
from .config import FedConfig
from .history import client_metrics, round_diagnostics
from .keys import SequentialStreams, sample_clients
from .methods import Method
from .rules import AggregateWarning, CohortMemory, FederatedWarning, UpdateRejected
from .training import ClientReport, learning_rate, penalty_coefficient
from .wire import decode, encode

Tensors = dict[str, torch.Tensor]


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
        self.accepted_ids: list[int] = []  # the client of each accepted update
        self.clipped = 0  # accepted updates the server clipped to the cohort (rules.clip_to_cohort)
        self.weights: list[int] = []
        self.reports: list = []
        self.errors: list[str] = []
        self.trained_ids: list[int] = []
        self.train_losses: list[float] = []
        self.dropped = self.rejected = self.bytes_up = self.nnz_up = 0
        self.state_failures = 0  # dropped clients whose training failed on the values it was given
        self.flops = 0.0
        self.refused: str | None = None  # why the round's aggregate was refused (None: it was not)
        self.rolled_back_to: int | None = None  # the round whose global state was restored (RollbackRing)

    def drop(self, cid: int, reason: str, state_failure: bool = False) -> None:
        """Client ``cid`` failed (``state_failure``: its training failed on the values it was
        given, which counts against the global state: :meth:`RollbackRing.untrainable`)."""
        self.dropped += 1
        self.state_failures += bool(state_failure)
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
        self.accepted_ids.append(cid)
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
            # only in a round after which an earlier global state was restored (RollbackRing)
            **({"rolled_back_to": self.rolled_back_to} if self.rolled_back_to is not None else {}),
            "train_loss": float(np.mean(self.train_losses)) if self.train_losses else float("nan"),
            "lr": learning_rate(config, t),
            "lambda": penalty_coefficient(config, t) if method.name == "spafl" else 0.0,
            "comm_bits_paper": bits,
            "comm_gbit_paper_total": accounting.gbit(totals["comm_bits_paper"]),
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


def aggregate_round(method: Method, server, tally: RoundTally, memory: CohortMemory | None = None):
    """``method.aggregate`` of the round's accepted updates, each first clipped to the cohort
    (:meth:`Method.clip_updates`: norm, pull against the cohort, shift of a whole tensor, and,
    with the server's ``memory``, the push across rounds): the next global state. Each clipped
    tensor is a line in the tally's errors naming its client, tensor, what was measured and the
    limit (warned with the others by
    :meth:`RoundTally.warn`, and in the history). What the method sets aside or refuses (an
    :class:`AggregateWarning` each) goes into the errors too, a refusal also into
    ``tally.refused`` (the ``aggregate_refused`` column)."""
    updates, clipped = method.clip_updates(server, tally.accepted, tally.accepted_ids, memory, weights=tally.weights)
    for event in clipped:
        factor = {"against": method.against_limit, "shift": method.shift_limit,
                  "drift": {"shift": method.drift_shift_limit, "against": method.drift_against_limit}.get(
                      event.which, method.drift_limit),
                  "aggregate": method.aggregate_limit}.get(event.kind, method.norm_limit)()
        client = tally.accepted_ids[event.index] if event.index is not None else None
        tally.errors.append(event.describe(client, factor))
    tally.clipped = len({event.index for event in clipped if event.index is not None})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", AggregateWarning)
        new = method.aggregate(server, updates, tally.weights)
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


class RollbackRing:
    """The last ``depth`` global states that a round's cohort trained from successfully (the
    round aggregated something), oldest first; 0 keeps none (the rollback is off).

    A round that shows its cohort cannot train from the global state (:meth:`untrainable`):
    more than half of the sampled cohort either trained, replied with a report and had its update
    rejected by the server's checks (non-finite values, changes past what SGD can reach from the
    global state, the wrong sparsity), or failed in training on the values it was given (an
    error that names them, :func:`failed_on_values`: SpaFL's layers refuse non-finite
    thresholds). Such a round aggregates nothing (the updates of an
    accepted minority are refused too: measured, they were the adversary's alone) and restores
    the newest kept state (:meth:`RoundEngine.aggregate`), one level further back for each such
    round in a row. Clients that did not reply (a timeout, a lost node, a transport error) or
    failed otherwise (out of memory, a lost device) are not evidence against the global state,
    and a refused aggregate is not either (its updates were accepted: the cohort could train
    from the global state).
    One client, or any minority of a cohort, cannot cause a rollback: the rest of the cohort
    would have to be rejected too, which only the global state does."""

    def __init__(self, depth: int):
        self.depth = depth
        self.states: list = []

    def __len__(self) -> int:
        return len(self.states)

    def trained_from(self, state) -> None:
        """Keep ``state``: a round's cohort trained from it and the round aggregated something."""
        if self.depth:
            self.states = [*self.states, state][-self.depth:]

    def pop(self):
        """The newest kept state, removed from the ring (None: the ring is empty)."""
        if not self.states:
            return None
        *self.states, newest = self.states
        return newest

    @staticmethod
    def untrainable(tally: RoundTally) -> bool:
        """Whether ``tally``'s round showed that its cohort cannot train from the global state
        (see the class): more than half of the sampled cohort trained and replied, and the
        server rejected those clients' updates, or they failed in training on the values they
        were given."""
        if not tally.method.communicates:
            return False
        sampled = len(tally.cohort) if tally.cohort is not None else tally.method.config.clients_per_round
        return 2 * RollbackRing.failures(tally) > sampled

    @staticmethod
    def failures(tally: RoundTally) -> int:
        """The sampled clients of ``tally``'s round that count against its global state: those
        that trained and had their update rejected, and those whose training failed on the
        values it was given."""
        return len(tally.trained_ids) - len(tally.accepted) + tally.state_failures

    def state_dict(self) -> list[dict]:
        """The kept states (each the method's ``state_dict()``: tensors and numbers), oldest first."""
        return [state.state_dict() for state in self.states]

    def load_state_dict(self, stored, server, method: Method) -> None:
        """The kept states from :meth:`state_dict`, as states of ``server``'s type; None (a
        checkpoint written before the ring existed): empty. A ring that does not hold states of
        this run's global state (their tensors' names, shapes and dtypes; rounds not after
        ``server``'s) is refused (``ValueError`` naming it); beyond ``depth`` (a resumed run
        that lowered it) only the newest are kept."""
        if stored is None:
            self.states = []
            return
        if not isinstance(stored, (list, tuple)):
            raise ValueError(f"the rollback ring in the checkpoint must be a list of global states, "
                             f"got a {type(stored).__name__}")
        expected = {k: (tuple(v.shape), v.dtype) for k, v in method.expected_update(server).items()}
        states, last = [], -1
        for i, d in enumerate(stored):
            where = f"the rollback ring's state {i} in the checkpoint"
            if not isinstance(d, Mapping):
                raise ValueError(f"{where} is not a global state's mapping (got a {type(d).__name__})")
            try:
                state = type(server).from_state_dict(d)
                tensors = method.expected_update(state)
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise ValueError(f"{where} is malformed ({type(e).__name__}: {e})") from e
            got = {k: (tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else type(v).__name__
                   for k, v in tensors.items()}
            if got != expected:
                raise ValueError(f"{where} does not hold this run's global state (tensors {got}, expected {expected})")
            if not last <= state.round <= server.round:
                raise ValueError(f"{where} is of round {state.round}: the ring's rounds must not decrease and not "
                                 f"pass the global state's ({server.round})")
            last = state.round
            states.append(state)
        self.states = states[-self.depth:] if self.depth else []


@dataclass
class ClientResult:
    """What a transport brings back from one sampled client. ``outcome``: ``"ok"`` (trained;
    its uplink ``up`` and validated sample count ``num_samples`` when the method communicates),
    ``"dropped"`` (failed, or its report is malformed), ``"refused"`` (an impossible sample
    count: it does not count as trained) or ``"rejected"`` (trained, but its update is not this
    round's uplink in form); ``error`` says why; ``state_failure``: a dropped client's training
    failed on the values it was given (:func:`failed_on_values`)."""

    cid: int
    outcome: str
    report: ClientReport | None = None
    up: bytes | None = None
    num_samples: int | None = None
    error: str | None = None
    state_failure: bool = False


# The errors a client's training raises on the values it was given (SpaFL's layers: a
# ValueError for non-finite thresholds; arithmetic on them), as opposed to a lost node, a
# timeout, a lost device or memory: they count against the global state (RollbackRing).
VALUE_ERRORS = ("ValueError", "ArithmeticError", "FloatingPointError", "OverflowError", "ZeroDivisionError")


def failed_on_values(error: BaseException | str | None) -> bool:
    """Whether ``error`` (an exception, or a failed client's reason as a transport reports it:
    ``"ValueError: ..."``, or Flower's ``"<class 'ValueError'>:<'...'>"``) is one a client's
    training raises on the values it was given (:data:`VALUE_ERRORS`)."""
    if isinstance(error, BaseException):
        return isinstance(error, (ValueError, ArithmeticError))
    if not isinstance(error, str):
        return False
    head = error.split(":", 1)[0].strip()
    if head.startswith("<class '") and head.endswith("'>"):
        head = head[len("<class '"):-2]
    return head.rsplit(".", 1)[-1] in VALUE_ERRORS


@dataclass
class Round:
    """One round in progress: its index (from 0), cohort (in the order drawn), the clients'
    train seeds (``rng="global"``; None each otherwise), the downlink message and its bytes
    (None: the method sends nothing) and the tally."""

    index: int
    cohort: list[int]
    seeds: list
    message: Tensors
    down: bytes | None
    tally: RoundTally
    start: float = field(default_factory=time.perf_counter)
    train_losses: dict[int, float] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    train_s: float = 0.0


def check_report(report: object) -> None:
    """Raise ``ValueError`` unless ``report`` is a :class:`ClientReport` whose numbers the
    history can take: FLOPs a finite non-negative number, the training loss a number (NaN
    allowed: a client whose loss diverged still reports). Its update and sample count are the
    server's checks (:meth:`Method.check_payload`, :meth:`Method.check_sample_count`)."""
    if not isinstance(report, ClientReport):
        raise ValueError(f"a client returns (state, ClientReport), got a {type(report).__name__} as its report")
    for name in ("flops", "train_loss"):
        value = getattr(report, name)
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise ValueError(f"malformed report: {name} must be a number, got {type(value).__name__}")
    if not (math.isfinite(report.flops) and report.flops >= 0):
        raise ValueError(f"malformed report: flops must be finite and non-negative, got {report.flops!r}")


def run_client(method: Method, client_fn: Callable, model, state, rnd: Round, cid: int, seeds, data,
               config: FedConfig, macs: Mapping[str, int], server, reset: Mapping | None = None):
    """One client's job in this process: ``(its new state, ClientResult)``. The downlink is
    decoded from the round's bytes (what a remote client receives); ``reset`` (a global
    method's initial state) is loaded first so that nothing of a previous client's round stays
    in the working model. The client's sample count is checked against what it holds, and its
    update's form before it is encoded (:meth:`Method.check_payload`)."""
    try:
        received = decode(rnd.down) if rnd.down is not None else {}
        if reset is not None:
            model.load_state_dict(reset)
        kwargs = {"train_seeds": seeds} if seeds is not None else {}
        new_state, report = client_fn(model, state, received, data, config, rnd.index, cid, macs, **kwargs)
    except Exception as e:  # the client failed mid-round: drop it from this round
        return None, ClientResult(cid, "dropped", error=f"{type(e).__name__}: {e}", state_failure=failed_on_values(e))
    try:
        check_report(report)
    except Exception as e:  # a malformed report: the client's own doing
        return None, ClientResult(cid, "dropped", error=f"{type(e).__name__}: {e}")
    if not method.communicates:
        return new_state, ClientResult(cid, "ok", report)
    try:
        n = method.check_sample_count(report.num_samples, known=data.num_train)
    except UpdateRejected as e:
        return None, ClientResult(cid, "refused", error=str(e))
    try:
        method.check_payload(report.update, server)
        up = encode(report.update, sparse=method.sparse_wire)
    except (UpdateRejected, TypeError, ValueError) as e:
        return new_state, ClientResult(cid, "rejected", report, error=str(e))
    return new_state, ClientResult(cid, "ok", report, up, n)


class RoundEngine:
    """The server's side of a run, whatever the transport: the global state (``server``), the
    per-client FLOPs, the running totals, the history, the rounds in a row that aggregated
    nothing and the global states to roll back to (:class:`RollbackRing`). ``layer_names``: the
    layers whose densities the history reports."""

    def __init__(self, config: FedConfig, method: Method, server, layer_names: list[str]):
        self.config, self.method, self.server = config, method, server
        self.layer_names = layer_names
        self.client_flops = np.zeros(config.num_clients)
        self.totals = {"comm_bits_paper": 0.0, "bytes": 0, "wall_s": 0.0}
        self.history: list[dict] = []
        self.failures = FailedRounds(config.max_failed_rounds)
        self.streams = SequentialStreams(config.seed) if config.rng == "global" else None
        self._downlink: tuple | None = None
        self.memory = CohortMemory()  # each client's push across rounds (rules.CohortMemory)
        self.rollback = RollbackRing(config.rollback_depth)  # the global states to fall back to

    @property
    def round(self) -> int:
        """Rounds done (the next round's index, counting from 0)."""
        return self.server.round

    def downlink(self) -> tuple[Tensors, bytes | None]:
        """The method's message from the current global state and its encoding (None: the method
        sends nothing), computed once per global state (a global model's evaluation payload is
        the same bytes)."""
        if self._downlink is None or self._downlink[0] is not self.server:
            method = self.method
            message = method.broadcast(self.server) if method.communicates else {}
            down = encode(message, sparse=method.sparse_wire) if method.communicates else None
            self._downlink = (self.server, message, down)
        return self._downlink[1], self._downlink[2]

    def begin(self) -> Round:
        """The next round: its cohort (keyed by the round, or the sequential streams' next draws,
        every client's batch seeds drawn in cohort order before any client trains) and downlink."""
        cfg, t = self.config, self.round
        start = time.perf_counter()
        if self.streams is not None:
            cohort = self.streams.sample(cfg.num_clients, cfg.clients_per_round)
            seeds = [self.streams.epoch_seeds(cfg.local_epochs) for _ in cohort]
        else:
            cohort = sample_clients(cfg.seed, t, cfg.num_clients, cfg.clients_per_round)
            seeds = [None] * len(cohort)
        message, down = self.downlink()
        return Round(t, cohort, seeds, message, down, RoundTally(self.method, self.server, cohort), start)

    def collect(self, rnd: Round, results: list[ClientResult]) -> None:
        """Tally the clients' results, in the order given (the cohort's, whatever finished first)."""
        tally, method = rnd.tally, self.method
        for r in results:
            if r.outcome == "dropped":
                tally.drop(r.cid, r.error, r.state_failure)
                continue
            if r.outcome == "refused":
                tally.reject(r.cid, r.error)
                continue
            report = self._bounded_flops(r, tally)
            self.client_flops[r.cid] += report.flops
            rnd.train_losses[r.cid] = report.train_loss
            tally.trained(r.cid, report)
            if r.outcome == "rejected":
                tally.reject(r.cid, r.error)
            elif method.communicates:
                tally.receive(r.cid, r.report, r.up, r.num_samples)

    def _bounded_flops(self, r: ClientResult, tally: RoundTally) -> ClientReport:
        """``r``'s report, its FLOPs no more than the most a legitimate round of a client with
        its sample count can cost (:meth:`Method.flops_bound`): a larger claim would swamp the
        run's totals, so it is counted at the bound and reported in the round's errors."""
        report = r.report
        limit = self.method.flops_bound(r.num_samples)
        if limit is None or report.flops <= limit:
            return report
        samples = r.num_samples if r.num_samples is not None else f"at most {self.method.sample_bound}"
        tally.errors.append(f"client {r.cid} reported {report.flops:.4g} FLOPs, more than the {limit:.4g} a round "
                            f"of its {samples} samples can cost at full density; counted as {limit:.4g}")
        return replace(report, flops=limit)

    def aggregate(self, rnd: Round, sync: Callable[[], None] | None = None) -> None:
        """The next global state from the round's accepted updates (:func:`aggregate_round`) and
        the method's round metrics; ``sync`` (a device synchronisation) before the training time
        is taken."""
        before = self.server
        self.server = aggregate_round(self.method, self.server, rnd.tally, self.memory)
        self._roll_back(rnd.tally, before)
        rnd.extra = self.method.round_metrics(before, self.server, rnd.tally.reports)
        if sync is not None:
            sync()
        rnd.train_s = time.perf_counter() - rnd.start

    def _roll_back(self, tally: RoundTally, before) -> None:
        """After the aggregate: keep ``before`` (the state the round trained from) in the
        rollback ring when the round aggregated something; when the round showed that no cohort
        can train from that state (:meth:`RollbackRing.untrainable`), refuse what a minority's
        accepted updates would have made of it (the round aggregates nothing) and restore the
        ring's newest state (:meth:`Method.restore`), recorded in the tally (``rolled_back_to``,
        a line in its errors). The memories of the clients' and the federation's pushes
        (:class:`CohortMemory`) are not rolled back: what the clients sent is still counted.
        With ``rollback_depth`` 0 nothing here changes the round."""
        ring = self.rollback
        if not ring.depth:
            return
        if not RollbackRing.untrainable(tally):
            if not tally.failed:
                ring.trained_from(before)
            return
        sampled = len(tally.cohort) if tally.cohort is not None else self.config.clients_per_round
        rejected = len(tally.trained_ids) - len(tally.accepted)
        why = (f"{RollbackRing.failures(tally)} of {sampled} sampled clients could not train from the global state "
               f"({rejected} update(s) rejected, {tally.state_failures} training(s) failed on its values)")
        if not tally.failed:  # a minority's updates were accepted: not from a state the cohort can train from
            self.server = self.method.restore(before, self.server)
            tally.refused = f"{why}: the {len(tally.accepted)} accepted update(s) are not aggregated"
        saved = ring.pop()
        if saved is None:
            tally.errors.append(f"rollback: {why}, and no earlier global state is left to restore "
                                f"(rollback_depth = {ring.depth})")
            return
        self.server = self.method.restore(saved, self.server)
        tally.rolled_back_to = saved.round
        restored = f"the global state after round {saved.round}" if saved.round else "the initial global state"
        tally.errors.append(f"rollback: {why}; {restored} is restored ({len(ring)} earlier state(s) left, "
                            f"rollback_depth = {ring.depth})")

    def finish(self, rnd: Round, evaluations: list[dict], global_eval: dict | None, eval_s: float,
               first: Mapping | None = None, last: Mapping | None = None) -> dict:
        """Warn the round's errors and append its history row: the client metrics of
        ``evaluations`` (every client's latest; ``global_eval``: the global model's on the whole
        test set), ``first`` (a transport's columns after them), the tally's columns, the
        diagnostics, ``last`` (a transport's own columns at the end)."""
        rnd.tally.warn(rnd.index)
        t = rnd.index
        timings = {"train_s": rnd.train_s, "eval_s": eval_s, "wall_s": time.perf_counter() - rnd.start}
        with warnings.catch_warnings():  # no client evaluated yet: the columns are NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            row = client_metrics(t, evaluations, self.layer_names, global_eval)
        row.update(first or {})
        row.update(rnd.tally.columns(self.config, t, rnd.message, len(rnd.down or b""), self.totals,
                                     self.client_flops, timings, rnd.extra))
        row.update(round_diagnostics(self.server, self.history, row, self.config.num_clients))
        row.update(last or {})
        self.history.append(row)
        return row

    def check_progress(self, row: dict) -> None:
        """Count ``row``'s round if it aggregated nothing; :class:`FederationStalled` after
        ``config.max_failed_rounds`` of them in a row."""
        self.failures.update(row, self.config)

    # --- state ----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The server's side of a checkpoint (top-level keys of the transports' checkpoints)."""
        return {"server": self.server.state_dict(), "client_flops": torch.from_numpy(self.client_flops.copy()),
                "history": self.history, "totals": dict(self.totals),
                "streams": self.streams.state_dict() if self.streams is not None else None,
                "cohort_memory": self.memory.state_dict(), "rollback": self.rollback.state_dict()}

    def load_state_dict(self, ckpt: Mapping) -> None:
        self.server = type(self.server).from_state_dict(ckpt["server"])
        self.client_flops = torch.as_tensor(ckpt["client_flops"], dtype=torch.float64).numpy().copy()
        self.history = ckpt["history"]
        self.totals = dict(ckpt["totals"])
        if self.streams is not None:
            self.streams.load_state_dict(ckpt["streams"])
        self.failures = FailedRounds(self.config.max_failed_rounds, self.history)
        self.memory = CohortMemory()
        self.memory.load_state_dict(ckpt.get("cohort_memory"))
        self.rollback = RollbackRing(self.config.rollback_depth)
        self.rollback.load_state_dict(ckpt.get("rollback"), self.server, self.method)


class EngineView:
    """What a transport (the simulator, the Flower strategy) shows of its :class:`RoundEngine`
    (``self.engine``): rounds done, the global state, the history and the running totals."""

    engine: RoundEngine

    @property
    def round(self) -> int:
        """Rounds done (the next round's index, counting from 0)."""
        return self.engine.round

    @property
    def server(self):
        """The global state (the method's: SpaFL's thresholds, a global model's tensors)."""
        return self.engine.server

    @property
    def history(self) -> list[dict]:
        return self.engine.history

    @property
    def totals(self) -> dict:
        return self.engine.totals

    @property
    def client_flops(self) -> np.ndarray:
        return self.engine.client_flops
