"""A round's history row: the client metrics (accuracy, loss, density over every client's
latest evaluation), the diagnostics of a stuck federation, and every client's numbers every
round (:class:`ClientRecord`, ``clients.npz``). The files are written by :mod:`.runfolder`."""

from __future__ import annotations

import numpy as np
import torch

# History fields that measure the machine rather than the algorithm (excluded when comparing runs).
TIMING_FIELDS = ("wall_s", "train_s", "eval_s")
TAU_STATS = ("mean", "std", "min", "max")


def _percentile10(values: np.ndarray) -> float:
    return float(np.percentile(values, 10)) if len(values) else float("nan")


def client_metrics(round_index: int, evaluations: list[dict], layer_names: list[str],
                   global_eval: dict | None = None) -> dict:
    """A round's accuracy, loss and density columns from every client's latest evaluation
    (:func:`training.evaluate` results, plus ``collapse_resets``) and, for a global method, the
    global model's on the whole test set. ``round`` is the round's number, counting from 1
    (``round_index`` 0, the index the schedules and keyed draws use, is round 1)."""
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


def summarise(history: list[dict], method: str, wall_s: float, num_thresholds: int) -> dict:
    """A run's final and best numbers from its history rows (``best_round`` counts from 1, as the
    history; the best round is the first with the highest mean accuracy); ``{"rounds": 0}``
    before any round."""
    if not history:
        return {"rounds": 0}
    best = max(history, key=lambda r: (r["acc_mean"], -r["round"]))
    last = history[-1]
    return {
        "method": method,
        "rounds": len(history),
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
        "never_sampled": last["never_sampled"],
        "wall_s": wall_s,
        "mean_round_s": wall_s / len(history),
        "num_thresholds": num_thresholds,
    }


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


