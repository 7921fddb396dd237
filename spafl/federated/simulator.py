"""The in-process federated loop: N clients on one device, driving a method's functions
(:mod:`.methods`: SpaFL or a baseline) through the round engine (:mod:`.engine`).

Only the sampled clients change in a round, so only they are re-evaluated; the others' cached
results stand (evaluation is deterministic), and every round still reports all N clients.
Checkpoints hold the whole run (server state, every client's weights, batch-norm buffers and
kept optimiser momentum, cached evaluations, history) and are written atomically; since each
round's randomness is keyed by ``(seed, round, client)``, a resumed run continues with exactly
the history an uninterrupted run would have (with ``rng="global"`` the sequential streams'
states travel in the checkpoint instead).

On a CPU the round's clients can train, and be evaluated, in parallel threads (``workers``):
each worker has its own copy of the model, every client its own keyed generators, and the
results are applied in the cohort's order, so the history is the same for any worker count.
"""

from __future__ import annotations

import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .._env import environment
from ..convert import named_threshold_layers
from . import runfolder
from .accounting import layer_macs
from .build import check_dataset, initial_model, resolve_device, whole_test_set
from .config import FedConfig, config_mismatch
from .data import ImageDataset, client_data, split_digest, split_for_run
from .datafiles import load_dataset
from .engine import ClientResult, EngineView, FederationStalled, RoundEngine, run_client
from .history import ClientRecord, summarise
from .methods import make_method
from .progress import ProgressLine
from .rules import FederatedWarning
from .runfolder import CHECKPOINT_VERSION
from .training import MOMENTUM_PREFIX, evaluate, model_entries, momentum_entries
from .workers import Workers, check_workers


class Simulator(EngineView):
    """``config.method`` (SpaFL by default) over ``config.num_clients`` in-process clients.

    Args:
        config: the run (validated here).
        dataset: an :class:`ImageDataset` to use instead of reading ``config.dataset``.
        model_fn: builds the (untrained) model instead of ``config.model``; for SpaFL it must
            contain threshold layers (see :func:`spafl.sparsify`); the other methods convert
            it (:func:`spafl.densify`, Powerpropagation). Called once, after seeding.
        out_dir: where the history, checkpoints and plots go (None: nowhere).
        client_fn: the client's round (default: the method's ``client_round``, for SpaFL
            :func:`methods.spafl.client_round`); a different function can inject faults or run the
            client elsewhere. With ``workers > 1`` it is called from several threads at once
            (on different models). With ``rng="global"`` it also receives ``train_seeds=``.
        progress: draw a progress line on stderr.
        workers: how many clients train (and are evaluated) at once, in threads of this
            process, CPU only. The history does not depend on it. The simulator does not change
            torch's thread settings: for ``workers > 1`` call ``torch.set_num_threads(1)``, or
            run inside ``with ThreadPolicy.choose(...).applied():`` (:class:`spafl.federated.ThreadPolicy`),
            else the workers' intra-op threads compete for the cores. ``spafl train`` chooses
            both (``--workers``, ``--threads``).
    """

    def __init__(self, config: FedConfig, *, dataset: ImageDataset | None = None,
                 model_fn: Callable[[], nn.Module] | None = None, out_dir: str | Path | None = None,
                 client_fn: Callable | None = None, progress: bool = False, command: str | None = None,
                 workers: int = 1):
        self.config = config.validate()
        # Drawn once when the run starts, kept in its checkpoints and history: what tells this
        # run's files from another's when a folder is resumed.
        self.run_id = uuid.uuid4().hex
        self.method = make_method(self.config)
        self.device = resolve_device(config.device)
        self.workers = check_workers(workers, self.device)
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
        # What the server knows of its clients bounds the sample counts they may report (and
        # the local steps an update may have taken), not the named dataset's size.
        self.method.sample_bound = max(c.num_train for c in self.clients)
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
                if model_fn is None:
                    raise ValueError(f"mask_layer {self.mask_layer!r} is not a threshold layer; layers: "
                                     f"{self.layer_names}")
                # A preset names a layer of its own model (digits-cnn: fc3); a model of the user's
                # need not have it. The mask only feeds masks.npz and the mask plot.
                warnings.warn(f"mask_layer {self.mask_layer!r} is not a threshold layer of the model model_fn built; "
                              f"recording the masks of {self.layer_names[0]!r} instead (set mask_layer to one of "
                              f"{self.layer_names})", FederatedWarning, stacklevel=2)
                self.mask_layer = self.layer_names[0]
        self.macs = layer_macs(self.model, self.image_shape, self.device, layers=self.prunable)
        self.num_thresholds = sum(layer.threshold.numel() for _, layer in named_threshold_layers(self.model))
        self.num_weights = sum(layer.weight.numel() for _, layer in self.prunable)
        # Every client of a personalised method starts from the same initial model (one shared
        # dict: a client's round never mutates the state it is given, it returns a new one);
        # the clients of a global method hold nothing between rounds (with a per-run optimiser,
        # its momentum alone).
        initial = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self._initial_state = initial
        self.client_states: list[dict[str, torch.Tensor] | None] = (
            [initial] * config.num_clients if self.method.personalised else [None] * config.num_clients)
        # The round, its global state, totals and history (the same engine drives Flower's server).
        self.engine = RoundEngine(self.config, self.method, self.method.init_server(self.model), self.layer_names)
        self.eval_cache: list[dict | None] = [None] * config.num_clients
        self.global_eval: dict | None = None
        self.mask_history: list[np.ndarray] = []
        self.client_record = ClientRecord(config.num_clients)
        # Working models: slot 0 is self.model; the other workers' copies are made on first use.
        self._workers = Workers(self.model, self.method.prunable, self.workers)
        self._refresh(range(config.num_clients))

    # --- workers ----------------------------------------------------------------------

    def _parallel(self, fn: Callable, items: Sequence) -> list:
        """``[fn(slot, item) for item in items]`` over the workers (:meth:`Workers.map`)."""
        return self._workers.map(fn, items)

    def close(self) -> None:
        """Stop the worker threads (a later round starts them again)."""
        self._workers.close()

    def __enter__(self) -> Simulator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- one round --------------------------------------------------------------------

    def _evaluate_on(self, slot: tuple, i: int, server) -> tuple[dict, dict | None]:
        """Client ``i``'s evaluation on a working model; with ``collapse_in_eval`` (personalised
        methods), also its state after the evaluation when that changed it (a guard reset during
        evaluation persists, as in the reference clients, which keep their model objects)."""
        model, prunable = slot
        method, state = self.method, self.client_states[i]
        method.load(model, server, state)
        result = evaluate(model, None, self.clients[i], self.config.eval_batch_size, self.mask_layer, prunable)
        after = model.state_dict()
        result["collapse_resets"] = sum(int(v) for k, v in after.items() if k.endswith("collapse_resets"))
        changed = None
        if self.config.collapse_in_eval and method.personalised and any(
                not torch.equal(after[k], v) for k, v in model_entries(state).items()):
            changed = {k: v.detach().clone() for k, v in after.items()}
            changed.update({MOMENTUM_PREFIX + k: v for k, v in momentum_entries(state).items()})
        return result, changed

    def _refresh(self, ids) -> float:
        """Evaluate clients ``ids`` (personalised methods) or the global model on every client
        and on the whole test set (global methods).

        With ``collapse_in_eval`` the reference loop evaluates every client every round, and an
        evaluation can reset a collapsed layer's thresholds. An untrained client's weights and
        thresholds have not changed since its last evaluation, whose per-layer densities are in
        the cache, so its guard fires again exactly when one of those densities is at or below
        ``collapse_density``: only such clients are evaluated besides ``ids``, which gives the
        reference loop's results without evaluating all of them."""
        start = time.perf_counter()
        method, server, n = self.method, self.server, self.config.num_clients
        if method.personalised:
            ids = list(ids)
            if self.config.collapse_in_eval and self.config.collapse_density is not None:
                chosen = set(ids)
                ids += [i for i in range(n) if i not in chosen and self._guard_would_fire(i)]
            results = self._parallel(lambda slot, i: self._evaluate_on(slot, i, server), ids)
            for i, (result, changed) in zip(ids, results, strict=True):
                self.eval_cache[i] = result
                if changed is not None:
                    self.client_states[i] = changed
            return time.perf_counter() - start

        # A global model: one load per worker, then its share of the clients, and the whole
        # test set as one more share.
        chunks = [list(c) for c in np.array_split(np.arange(n), min(self.workers, n))]

        def share(slot, chunk):
            model, prunable = slot
            method.load(model, server, None)
            if chunk is None:
                return evaluate(model, None, self.global_test, self.config.eval_batch_size, None, prunable)
            out = []
            for i in chunk:
                result = evaluate(model, None, self.clients[int(i)], self.config.eval_batch_size, self.mask_layer,
                                  prunable)
                result["collapse_resets"] = 0
                out.append(result)
            return out

        results = self._parallel(share, [*chunks, None])
        for chunk, evaluations in zip(chunks, results[:-1], strict=True):
            for i, result in zip(chunk, evaluations, strict=True):
                self.eval_cache[int(i)] = result
        self.global_eval = results[-1]
        return time.perf_counter() - start

    def _guard_would_fire(self, i: int) -> bool:
        """Whether client ``i``'s last evaluation left a layer at or below the collapse guard."""
        cached = self.eval_cache[i]
        if cached is None:
            return True
        limit = self.config.collapse_density
        return any(density <= limit for density in cached["layers"].values())

    def _client_job(self, slot: tuple, job: tuple) -> tuple:
        """One client's round on a working model (:func:`engine.run_client`)."""
        rnd, cid, seeds = job
        reset = None if self.method.personalised else self._initial_state
        return run_client(self.method, self.client_fn, slot[0], self.client_states[cid], rnd, cid, seeds,
                          self.clients[cid], self.config, self.macs, rnd.tally.server, reset)

    def run_round(self) -> dict:
        """Run the next round and return its history row."""
        engine = self.engine
        rnd = engine.begin()
        outcomes = self._parallel(self._client_job, list(zip([rnd] * len(rnd.cohort), rnd.cohort, rnd.seeds,
                                                              strict=True)))
        results: list[ClientResult] = []
        for new_state, result in outcomes:
            # The client's own state is its business; the server only sees the uplink.
            if result.outcome in ("ok", "rejected") and new_state is not None:
                self.client_states[result.cid] = new_state
            results.append(result)
        engine.collect(rnd, results)
        sync = (lambda: torch.cuda.synchronize(self.device)) if self.device.type == "cuda" else None
        engine.aggregate(rnd, sync)
        eval_s = self._refresh(rnd.tally.trained_ids)
        row = engine.finish(rnd, self.eval_cache, self.global_eval, eval_s)
        self.client_record.append(row["round"], self.eval_cache, rnd.cohort, rnd.train_losses)
        if self.mask_layer is not None:
            self.mask_history.append(np.stack([c["mask"].numpy() for c in self.eval_cache]).astype(np.uint8))
        return row

    # --- the whole run ----------------------------------------------------------------

    def run(self, rounds: int | None = None) -> list[dict]:
        """Run until ``rounds`` (default ``config.rounds``) rounds are done, checkpointing every
        ``config.checkpoint_every`` rounds and at the end; write the history; return it.

        A round that aggregates nothing (every sampled client dropped or rejected, or the
        aggregate refused) is warned about and marked in the history (``round_failed``); after
        ``config.max_failed_rounds`` of them in a row the run is saved and stops with
        :class:`FederationStalled`. A round in which most of the cohort trained and was rejected
        restores an earlier global state (:class:`.engine.RollbackRing`, ``rolled_back_to``)."""
        target = self.config.rounds if rounds is None else rounds
        if self.out_dir is not None and self.round < target:  # before any training
            runfolder.prepare(self.out_dir)
        bar = ProgressLine(target, self.round) if self.progress else None
        try:
            while self.round < target:
                row = self.run_round()
                if bar is not None:
                    bar.update(row)
                every = self.config.checkpoint_every
                saved = False
                if self.out_dir is not None and ((every and self.round % every == 0) or self.round == target):
                    self._save()
                    saved = True
                try:
                    self.engine.check_progress(row)
                except FederationStalled:
                    if self.out_dir is not None and not saved:
                        self._save()
                    raise
        finally:
            if bar is not None:
                bar.close()
        if self.out_dir is not None and not self.history:
            self.write_history()
        return self.history

    def _save(self) -> None:
        self.save_checkpoint()
        self.write_history()

    def summary(self) -> dict:
        """The run's final and best numbers (:func:`.history.summarise`)."""
        return summarise(self.history, self.method.name, self.totals["wall_s"], self.num_thresholds)

    # --- files ------------------------------------------------------------------------

    def write_history(self) -> None:
        """``history.csv`` (one row per round, per-layer densities as ``density:<layer>``
        columns, global threshold statistics as ``tau:<layer>:<stat>``), ``history.json``
        (rows, summary, config, environment), ``masks.npz``, ``clients.npz``."""
        meta = {"config": self.config.to_dict(), "environment": environment(self.device), "command": self.command,
                "run_id": self.run_id, "split_digest": self.split_digest, "num_thresholds": self.num_thresholds,
                "num_weights": self.num_weights, "layers": self.layer_names, "macs_per_sample": self.macs,
                "mask_layer": self.mask_layer, "summary": self.summary()}
        runfolder.write_history(self.out_dir, meta, self.history, self.layer_names, self.mask_history, self.mask_layer,
                                self.client_record)

    def state_dict(self) -> dict:
        """The whole run as plain containers of tensors and numbers (loads with
        ``torch.load(weights_only=True)``)."""
        return {
            "version": CHECKPOINT_VERSION,
            "engine": "simulator",
            "run_id": self.run_id,
            "config": self.config.to_dict(),
            "dataset": self.dataset_name,
            "split_digest": self.split_digest,
            **self.engine.state_dict(),  # server, client_flops, history, totals, streams
            "global_eval": self.global_eval,
            # A client that never trained holds the initial state: stored once, not once per client.
            **self._client_states_dict(),
            "eval_cache": self.eval_cache,
            "mask_history": [torch.from_numpy(m) for m in self.mask_history],
            "clients": self.client_record.state_dict(),
        }

    def _client_states_dict(self) -> dict:
        """``client_states`` with None for every client still at the initial state (listed in
        ``untrained``; the state itself is ``initial_state``, once)."""
        initial = self._initial_state
        untrained = [i for i, s in enumerate(self.client_states) if s is initial]
        return {"client_states": [None if s is initial else s for s in self.client_states],
                "untrained": untrained, "initial_state": initial if untrained else None}

    def load_state_dict(self, ckpt: dict) -> None:
        if ckpt.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"checkpoint version {ckpt.get('version')!r}; this spafl reads {CHECKPOINT_VERSION}")
        problems = config_mismatch(ckpt["config"], self.config)
        if problems:
            raise ValueError("the checkpoint was written by a different configuration:\n  " + "\n  ".join(problems))
        if ckpt["split_digest"] != self.split_digest:
            raise ValueError("the data split differs from the checkpoint's (different dataset files?)")
        if ckpt.get("run_id"):  # checkpoints written before run ids keep the one drawn here
            self.run_id = str(ckpt["run_id"])
        self.engine.load_state_dict(ckpt)
        self.global_eval = ckpt.get("global_eval")
        untrained = set(ckpt.get("untrained") or ())
        if untrained:
            self._initial_state = {k: v.to(self.device) for k, v in ckpt["initial_state"].items()}
        self.client_states = [self._initial_state if i in untrained else
                              None if s is None else {k: v.to(self.device) for k, v in s.items()}
                              for i, s in enumerate(ckpt["client_states"])]
        self.eval_cache = ckpt["eval_cache"]
        self.mask_history = [np.asarray(m.numpy() if isinstance(m, torch.Tensor) else m, dtype=np.uint8)
                             for m in ckpt["mask_history"]]
        self.client_record.load_state_dict(ckpt["clients"])

    def save_checkpoint(self, path: str | Path | None = None) -> Path:
        """Write the whole run to ``path`` (default ``<out_dir>/checkpoint.pt``) atomically: a
        temporary file in the same folder, fsync'd, then renamed over the old checkpoint, which
        stays as ``checkpoint.prev.pt`` (:func:`runfolder.save_checkpoint`)."""
        path = Path(path) if path is not None else self.out_dir / runfolder.CHECKPOINT
        return runfolder.save_checkpoint(path, self.state_dict())

    @classmethod
    def resume(cls, path: str | Path, config: FedConfig | None = None, *, log: Callable[[str], None] | None = None,
               **kwargs) -> Simulator:
        """Rebuild a run from a checkpoint. ``path`` is the run folder (its ``checkpoint.pt``,
        or the previous one, ``checkpoint.prev.pt``, when that is missing or unreadable) or a
        checkpoint file. The checkpoint must belong to the run whose history is in the folder
        the run continues in (``out_dir``, default the checkpoint's), else
        :class:`runfolder.RunFolderError` and nothing is changed
        (:func:`runfolder.open_checkpoint`). What the user should know (a fallback) goes to
        ``log``, else is warned (:class:`runfolder.CheckpointWarning`).

        ``config`` may change only ``rounds``, ``checkpoint_every``, ``data_root``,
        ``download``, ``device``, ``memory_format``, ``eval_batch_size``, ``max_failed_rounds`` and
        ``rollback_depth``; by default the checkpoint's own configuration is used. ``kwargs`` go
        to the constructor (``dataset``, ``workers``...)."""
        path = Path(path)
        kwargs.setdefault("out_dir", path if path.is_dir() else path.parent)
        found = runfolder.open_checkpoint(path, kwargs["out_dir"])
        runfolder.warn_notes(found.notes, log)
        return cls.from_checkpoint(found.ckpt, config, source=found.file, **kwargs)

    @classmethod
    def from_checkpoint(cls, ckpt: dict, config: FedConfig | None = None, *, source: str | Path = "the checkpoint",
                        **kwargs) -> Simulator:
        """A simulator continuing the run in ``ckpt`` (as :func:`runfolder.read_checkpoint`
        returns it, read from ``source``); see :meth:`resume`."""
        if config is None:
            try:
                config = FedConfig(**ckpt["config"]).validate()
            except (TypeError, ValueError) as e:
                raise runfolder.RunFolderError(f"{source} holds settings this spafl cannot run: {e}") from e
        sim = cls(config, **kwargs)
        try:
            sim.load_state_dict(ckpt)
        except (KeyError, TypeError, AttributeError, IndexError, RuntimeError) as e:
            raise runfolder.RunFolderError(f"{source} is a malformed checkpoint ({type(e).__name__}: {e})") from e
        return sim
