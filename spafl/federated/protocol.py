"""SpaFL's round as plain functions over plain data, independent of any loop or transport.

Server side: :func:`init_server`, :func:`sample_clients`, :func:`broadcast`,
:func:`check_payload`, :func:`validate_update` (with :func:`threshold_bounds`, what a legitimate
client can send), :func:`check_sample_count`, :func:`aggregate` (the mean, or a robust
:func:`aggregate_tensors`) and :func:`check_aggregate`. Client side: :func:`client_round` (receive the
thresholds, apply the threshold-guided weight update, train, report) and :func:`evaluate`.
Messages are dicts of tensors; :func:`encode` / :func:`decode` turn them into bytes and back
(a header of names, dtypes and shapes, then the raw little-endian data), which is what a
transport would carry and what the accounting measures.

Every random choice is drawn from a generator keyed by ``(seed, round, client)``, so a round
does not depend on what ran before it: a resumed run, or another engine driving these same
functions, reproduces the same history. (``rng="global"`` replaces the cohort and batch-order
draws by the reference code's sequential streams, :class:`SequentialStreams`, for comparison.)
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..convert import named_threshold_layers, threshold_penalty
from ..layers import ThresholdConv2d
from .config import FedConfig
from .data import ClientData, crop_flip

Tensors = dict[str, torch.Tensor]


class UpdateRejected(ValueError):
    """A client's update failed the server's checks; the global state was not touched."""


class FederatedWarning(UserWarning):
    """A client was dropped from a round or its update was rejected, or the server set aside
    part of a round's input or refused its aggregate (the run goes on)."""


# --- keyed randomness ---------------------------------------------------------------------

_STREAMS = {"sample": 1, "train": 2, "init": 3}


def derived_seed(seed: int, stream: str, *keys: int) -> int:
    """A 63-bit seed for one (stream, round, client, ...) from the run's seed."""
    return int(np.random.SeedSequence([seed, _STREAMS[stream], *keys]).generate_state(2, np.uint64)[0] >> 1)


def sample_clients(seed: int, round_index: int, num_clients: int, k: int) -> list[int]:
    """``k`` of ``num_clients`` clients, uniformly without replacement, keyed by the round."""
    rng = np.random.default_rng(derived_seed(seed, "sample", round_index))
    return sorted(int(i) for i in rng.choice(num_clients, size=k, replace=False))


class SequentialStreams:
    """``rng="global"``: the reference code's plain sequential draws instead of keyed streams.

    The cohort comes from one NumPy ``RandomState`` seeded once (``np.random.seed(seed)``;
    ``np.random.choice(N, K, replace=False)`` every round, in the order drawn), and each
    client's batch order from one torch generator seeded once, from which every sampled client,
    in cohort order, draws one seed per local epoch (what a shuffling ``DataLoader`` draws from
    torch's global generator at the start of each epoch). Every draw depends on all the draws
    before it: a run is reproducible from its start, and a resumed run continues exactly only
    because the streams' states travel in the checkpoint (:meth:`state_dict`)."""

    def __init__(self, seed: int):
        self.sampler = np.random.RandomState(seed)
        self.batches = torch.Generator().manual_seed(seed)

    def sample(self, num_clients: int, k: int) -> list[int]:
        """The next round's cohort, in the order drawn (not sorted)."""
        return [int(i) for i in self.sampler.choice(num_clients, size=k, replace=False)]

    def epoch_seeds(self, epochs: int) -> list[int]:
        """The next client's seeds, one per local epoch."""
        return [int(torch.empty((), dtype=torch.int64).random_(generator=self.batches)) for _ in range(epochs)]

    def state_dict(self) -> dict:
        """Plain tensors and numbers (loads with ``torch.load(weights_only=True)``)."""
        kind, keys, pos, has_gauss, gauss = self.sampler.get_state()
        return {"sampler_keys": torch.from_numpy(keys.astype(np.int64)), "sampler_pos": int(pos),
                "sampler_has_gauss": int(has_gauss), "sampler_gauss": float(gauss),
                "batches": self.batches.get_state()}

    def load_state_dict(self, d: Mapping) -> None:
        keys = d["sampler_keys"].numpy().astype(np.uint32)
        self.sampler.set_state(("MT19937", keys, int(d["sampler_pos"]), int(d["sampler_has_gauss"]),
                                float(d["sampler_gauss"])))
        self.batches.set_state(d["batches"])


# --- server -------------------------------------------------------------------------------


@dataclass
class ServerState:
    """The global thresholds ``tau_g`` and their change in the last aggregation ``delta``
    (``tau_g(t) - tau_g(t-1)``; zero before the first), as float32 on the host."""

    thresholds: Tensors
    delta: Tensors
    round: int = 0

    def state_dict(self) -> dict:
        return {"thresholds": self.thresholds, "delta": self.delta, "round": self.round}

    @classmethod
    def from_state_dict(cls, d: Mapping) -> ServerState:
        return cls(dict(d["thresholds"]), dict(d["delta"]), int(d["round"]))


def model_thresholds(model: nn.Module) -> Tensors:
    """``{layer name: tau}`` for every threshold layer, detached float32 copies on the host."""
    out = {name: layer.threshold.detach().float().cpu().clone() for name, layer in named_threshold_layers(model)}
    if not out:
        raise ValueError("the model has no threshold layers (build it from spafl layers or call spafl.sparsify)")
    return out


def init_server(model: nn.Module) -> ServerState:
    tau = model_thresholds(model)
    return ServerState(tau, {k: torch.zeros_like(v) for k, v in tau.items()})


def broadcast(state: ServerState, th_update: bool) -> Tensors:
    """The downlink message: the global thresholds, and the global change when clients apply
    the threshold-guided weight update (a client that skipped last round cannot derive it)."""
    msg = {f"tau/{k}": v for k, v in state.thresholds.items()}
    if th_update:
        msg.update({f"delta/{k}": v for k, v in state.delta.items()})
    return msg


# --- what the server accepts ----------------------------------------------------------------
#
# A client is trusted with nothing: its update must be the tensors the server expects (names,
# shapes, dtype, finite values), each value within what a legitimate client's round can
# produce (:class:`UpdateBounds`, from :func:`update_bounds` / :func:`threshold_bounds`), its
# sample count a positive integer no larger than the server knows the client to hold, and the
# aggregate is checked again before it becomes the global state (:func:`check_aggregate`).

# The bound on one gradient coordinate assumed for a run without gradient clipping. Measured
# on this project's CPU runs (largest |gradient| coordinate any SGD step saw): digits-cnn 60
# rounds 5.6 on thresholds and 3.6 on weights (FedAvg 2.3, SparsyFed 5.2, Top-K 3.7 over 20
# rounds); fmnist-lenet5, raw 0..255 pixels, 2 rounds: 44 on thresholds, 49 on weights. With
# clipping (every CIFAR preset) the clip norm is the bound and nothing is assumed.
DEFAULT_GRAD_BOUND = 1000.0


def gradient_bound(config: FedConfig) -> float:
    """``G``, the largest |gradient| coordinate a legitimate client's SGD step applies: the
    clip norm when gradient clipping is on (it bounds the whole gradient's norm), else
    ``config.grad_bound`` (default :data:`DEFAULT_GRAD_BOUND`)."""
    if config.clip is not None:
        return float(config.clip)
    return float(config.grad_bound if config.grad_bound is not None else DEFAULT_GRAD_BOUND)


def local_steps(config: FedConfig, num_samples: int) -> int:
    """SGD steps of one client's round: ``local_epochs * batches``."""
    return config.local_epochs * num_batches(num_samples, config.batch_size, config.drop_last)


def sgd_reach(config: FedConfig, round_index: int, num_samples: int, start: torch.Tensor,
              grad_bound: float) -> torch.Tensor:
    """Per coordinate, the furthest a round of local SGD can move a parameter from ``start``
    (same shape), when no gradient coordinate exceeds ``grad_bound``.

    SGD with momentum ``mu`` (PyTorch's: ``v <- mu v + g + wd p``, ``p <- p - lr v``) keeps
    ``|v| <= (G + wd |p|) / (1 - mu)`` (a geometric series; momentum carried over from earlier
    rounds obeys it too), so ``S`` steps at ``lr`` move a coordinate at most
    ``D = S lr (G + wd |start|) / (1 - mu - S lr wd)`` (the ``wd`` terms bound ``|p|`` by
    ``|start| + D``). Infinite when ``S lr wd >= 1 - mu`` (weight decay that strong bounds
    nothing)."""
    steps = local_steps(config, num_samples)
    lr = learning_rate(config, round_index)
    mu, wd = config.momentum, config.weight_decay
    denominator = 1.0 - mu - steps * lr * wd
    if denominator <= 0:
        return torch.full_like(start, math.inf)
    return steps * lr * (grad_bound + wd * start.abs()) / denominator


def threshold_floor(config: FedConfig) -> float:
    """The lowest threshold the server accepts: ``-ln(G / th_coeff)``, where the penalty's own
    gradient ``lambda_t exp(-tau)`` reaches the gradient bound ``G`` (``lambda_t <= th_coeff``
    in both schedules). Above it the thresholds' gradient is at most ``2 G`` (task loss and
    penalty); below it the penalty, not the task, moves the threshold, and a little lower its
    ``exp(-tau)`` overflows float32 and every client that receives it fails. ``-inf`` without
    a penalty (``th_coeff = 0``)."""
    if config.th_coeff <= 0:
        return -math.inf
    return -math.log(gradient_bound(config) / config.th_coeff)


@dataclass(frozen=True)
class UpdateBounds:
    """What a legitimate client can return for one tensor, relative to the global value ``g``
    it was sent: every value ``u`` within ``max_change`` of ``g`` (a tensor of ``g``'s shape
    or a number), or equal to 0 when ``zero_ok`` (a post-training prune: Top-K), or within
    ``max_change`` of 0 when ``reset_ok`` (SpaFL's collapse guard resets thresholds to 0, then
    training goes on); and ``u >= floor``. ``rule`` says where the bound comes from (it is
    quoted when an update is rejected)."""

    max_change: torch.Tensor | float = math.inf
    floor: float = -math.inf
    zero_ok: bool = False
    reset_ok: bool = False
    rule: str = ""


def threshold_bounds(config: FedConfig, state: ServerState, num_samples: int) -> dict[str, UpdateBounds]:
    """SpaFL's rule for a client's thresholds in round ``state.round``, per layer.

    A legitimate client starts from the global thresholds and trains them with ``S`` SGD steps
    (``S = local_epochs * batches`` of its ``num_samples``) at ``lr_t``, momentum ``mu``;
    every gradient coordinate of its thresholds is at most ``G_tau`` = the clip norm with
    clipping, else ``2 G`` (task-loss gradient ``G``, :func:`gradient_bound`, plus the
    penalty's, at most ``G`` above :func:`threshold_floor`). So each threshold lies within
    ``D = S lr_t G_tau / (1 - mu)`` (:func:`sgd_reach`, weight decay included) of its global
    value, or, with the collapse guard on (which resets a layer's thresholds to 0), within
    ``D`` of 0; and no lower than ``-ln(G / th_coeff)``. The bound is loose on purpose (a
    worst case, no data assumed): in the measured runs the largest change in a round was 0.96
    (digits-cnn, ``D`` in the thousands) and the lowest threshold -1.25 (floor -13.1). It stops
    absurd values; a robust ``aggregator`` limits what values inside it can do."""
    g = gradient_bound(config)
    g_tau = g if config.clip is not None else 2.0 * g
    floor = threshold_floor(config)
    steps = local_steps(config, num_samples)
    lr = learning_rate(config, state.round)
    rule = (f"{steps} SGD steps at lr {lr:.3g}, momentum {config.momentum}, |gradient| <= {g_tau:g}"
            f"{' (clip)' if config.clip is not None else ''}; floor {floor:.3g}")
    return {name: UpdateBounds(sgd_reach(config, state.round, num_samples, tau, g_tau), floor, False,
                               config.collapse_density is not None, rule)
            for name, tau in state.thresholds.items()}


def _rejection(name: str, bad: torch.Tensor, what: str, value: torch.Tensor, rule: str) -> UpdateRejected:
    first = tuple(int(i) for i in torch.nonzero(bad)[0]) if bad.dim() else ()
    return UpdateRejected(f"{name}: {int(bad.sum())} value(s) {what}; first at {list(first)}: "
                          f"{float(value[first] if bad.dim() else value):.4g}" + (f" (rule: {rule})" if rule else ""))


def check_bounds(name: str, value: torch.Tensor, reference: torch.Tensor, bounds: UpdateBounds) -> None:
    """Raise :class:`UpdateRejected` unless every value of ``value`` obeys ``bounds`` relative
    to the global ``reference`` (same shape)."""
    if bounds.floor > -math.inf:
        low = value < bounds.floor
        if bool(low.any()):
            raise _rejection(name, low, f"below the floor {bounds.floor:.4g}", value, bounds.rule)
    limit = torch.as_tensor(bounds.max_change, dtype=torch.float64)
    # A relative slack of 1e-5 for float32 rounding in the client's arithmetic.
    slack = 1e-5 * (limit + reference.double().abs())
    change = (value.double() - reference.double()).abs()
    ok = change <= limit + slack
    if bounds.zero_ok:
        ok |= value == 0
    if bounds.reset_ok:
        ok |= value.double().abs() <= limit + slack
    if not bool(ok.all()):
        far = ~ok
        worst = float(change[far].max())
        raise _rejection(name, far, f"further from the global value than a legitimate round can move them "
                         f"(largest change {worst:.4g}, bound {float(limit.max() if limit.dim() else limit):.4g})",
                         value, bounds.rule)


def check_payload(tensors: object, expected: Mapping[str, torch.Tensor] | None = None,
                  max_numel: int | None = None) -> None:
    """Raise :class:`UpdateRejected` unless ``tensors`` is a message :func:`encode` can
    serialise: a mapping of string names to dense (strided) tensors with data (not ``meta``)
    of an encodable dtype; with ``expected``, exactly its names, shapes and dtypes; without
    it, at most ``max_numel`` values in all when given. Nothing is copied or serialised, so
    the check is cheap for any input (a huge tensor is refused by its shape); the server's
    round loop runs it on each client's report inside its per-client error handling, before
    :func:`encode`."""
    if not isinstance(tensors, Mapping):
        raise UpdateRejected(f"an update must be a mapping of tensors, got {type(tensors).__name__}")
    names = list(tensors)
    odd = [n for n in names if not isinstance(n, str)]
    if odd:
        raise UpdateRejected(f"tensor names must be strings, got {odd[:3]!r}")
    if expected is not None:
        missing, extra = sorted(set(expected) - set(names)), sorted(set(names) - set(expected))
        if missing or extra:
            raise UpdateRejected(f"update names differ: missing {missing[:10]}, unexpected {extra[:10]}")
    total = 0
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise UpdateRejected(f"{name}: expected a tensor, got {type(t).__name__}")
        if t.layout != torch.strided:
            raise UpdateRejected(f"{name}: a {t.layout} tensor; updates are dense (strided) tensors")
        if t.is_meta:
            raise UpdateRejected(f"{name}: a meta tensor (a shape without data)")
        if expected is not None:
            ref = expected[name]
            if t.shape != ref.shape:
                raise UpdateRejected(f"{name}: shape {tuple(t.shape)}, expected {tuple(ref.shape)}")
            if t.dtype != ref.dtype:
                raise UpdateRejected(f"{name}: dtype {t.dtype}, expected {ref.dtype}")
        elif t.dtype not in _DTYPES:
            raise UpdateRejected(f"{name}: dtype {t.dtype} cannot be sent (sendable: {', '.join(map(str, _DTYPES))})")
        total += t.numel()
    if max_numel is not None and total > max_numel:
        raise UpdateRejected(f"{total} values, more than the {max_numel} allowed")


def validate_update(update: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor],
                    bounds: Mapping[str, UpdateBounds] | None = None) -> None:
    """Raise :class:`UpdateRejected` unless ``update`` holds exactly the expected tensors: same
    names, shapes and dtype (float32), all finite, and, with ``bounds`` (per name, relative to
    the values of ``expected``, the global state the client was sent), every value within
    what a legitimate client can produce (:func:`check_bounds`)."""
    check_payload(update, expected)
    for name, ref in expected.items():
        t = update[name]
        if not bool(torch.isfinite(t).all()):
            raise UpdateRejected(f"{name}: {int((~torch.isfinite(t)).sum())} non-finite value(s)")
        if bounds is not None and name in bounds:
            check_bounds(name, t, ref, bounds[name])


def check_sample_count(num_samples: object, known: int | None = None) -> int:
    """A client's reported training-sample count, validated: a positive integer (a bool, a
    float, NaN are refused), and no more than ``known`` (what the server knows the client or
    the whole training set holds) when given. Raises :class:`UpdateRejected`."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)):
        raise UpdateRejected(f"sample count must be an integer, got {type(num_samples).__name__} {num_samples!r}")
    n = int(num_samples)
    if n < 1:
        raise UpdateRejected(f"sample count must be positive, got {n}")
    if known is not None and n > known:
        raise UpdateRejected(f"sample count {n} is more than the {known} training samples the server knows of")
    return n


# --- aggregation -----------------------------------------------------------------------------


def aggregate_tensors(updates: list[Mapping[str, torch.Tensor]], names: Iterable[str], aggregator: str = "mean",
                      trim_fraction: float = 0.2, weights: list[float] | None = None) -> Tensors:
    """Per name, the coordinate-wise aggregate of the updates' tensors (float32):

    - ``"mean"``: the mean, weighted by ``weights`` (positive, finite) when given, else uniform;
    - ``"median"``: the median (the mean of the two middle values for an even count), as
      Flower's FedMedian;
    - ``"trimmed-mean"``: the mean after dropping the ``floor(trim_fraction * n)`` smallest
      and largest values, as Flower's FedTrimmedAvg.

    The median and the trimmed mean ignore ``weights``: a client cannot buy influence with its
    reported sample count, and no fraction of values below one half (the median) or below
    ``trim_fraction`` (the trimmed mean) can move them outside the range of the others."""
    if not updates:
        raise ValueError("nothing to aggregate")
    if aggregator not in ("mean", "median", "trimmed-mean"):
        raise ValueError(f"unknown aggregator {aggregator!r}; aggregators: mean, median, trimmed-mean")
    n = len(updates)
    out = {}
    if aggregator == "mean" and weights is not None:
        if len(weights) != n:
            raise ValueError(f"{n} updates but {len(weights)} weights")
        w = torch.tensor(weights, dtype=torch.float64)
        if not bool(torch.isfinite(w).all()) or bool((w <= 0).any()):
            raise ValueError(f"weights must be positive and finite, got {weights}")
        w = (w / w.sum()).float()
    for name in names:
        if aggregator == "mean" and weights is not None:
            out[name] = sum(wi * u[name].float() for wi, u in zip(w, updates, strict=True))
            continue
        stacked = torch.stack([u[name].float() for u in updates])
        if aggregator == "mean":
            out[name] = stacked.mean(0)
            continue
        ordered = stacked.sort(0).values
        if aggregator == "median":
            mid = n // 2
            out[name] = ordered[mid] if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2
        else:
            k = int(trim_fraction * n)
            out[name] = ordered[k : n - k].mean(0)
    return out


def aggregate(state: ServerState, updates: list[Mapping[str, torch.Tensor]], aggregator: str = "mean",
              trim_fraction: float = 0.2) -> ServerState:
    """SpaFL's aggregation: ``tau_g <- mean_k tau_k`` (uniform over the accepted updates; or
    their coordinate-wise median or trimmed mean, :func:`aggregate_tensors`) and
    ``delta <- tau_g(new) - tau_g(old)``. No updates: thresholds kept, ``delta = 0``."""
    if not updates:
        return keep(state)
    new = aggregate_tensors(updates, state.thresholds, aggregator, trim_fraction)
    delta = {k: new[k] - state.thresholds[k] for k in new}
    return ServerState(new, delta, state.round + 1)


def keep(state: ServerState) -> ServerState:
    """The next round's state when nothing is aggregated: the same thresholds, no change."""
    zeros = {k: torch.zeros_like(v) for k, v in state.thresholds.items()}
    return ServerState(dict(state.thresholds), zeros, state.round + 1)


def check_aggregate(before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor],
                    bounds: Mapping[str, UpdateBounds] | None = None) -> None:
    """Raise :class:`UpdateRejected` unless the aggregate ``after`` could become the global
    state: the names, shapes and dtypes of ``before``, finite, and within ``bounds`` of
    ``before`` (an aggregate of updates that each passed :func:`validate_update` always is; this
    catches a caller that aggregated unchecked updates, and arithmetic that overflowed)."""
    try:
        validate_update(after, before, bounds)
    except UpdateRejected as e:
        raise UpdateRejected(f"aggregate refused: {e}") from e


# --- the wire format ----------------------------------------------------------------------

_DTYPES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.int64: "i64"}
_NP = {"f32": np.float32, "f16": np.float16, "bf16": np.int16, "i64": np.int64}
_ITEMSIZE = {"f32": 4, "f16": 2, "bf16": 2, "i64": 8}


def _index_dtype(numel: int) -> str:
    return "u16" if numel <= 1 << 16 else "u32" if numel <= 1 << 32 else "u64"


_INDEX_NP = {"u16": np.uint16, "u32": np.uint32, "u64": np.uint64}


def sparse_layout(numel: int, nnz: int, itemsize: int) -> tuple[str, int]:
    """The smallest encoding of a tensor with ``nnz`` non-zeros and its size in bytes:
    ``"dense"`` (every value), ``"bitmap"`` (the non-zero values plus one bit per entry) or
    ``"index"`` (the non-zero values plus their flat positions as u16/u32/u64). Ties go to the
    simpler encoding, in that order."""
    index_size = {"u16": 2, "u32": 4, "u64": 8}[_index_dtype(numel)]
    sizes = {"dense": numel * itemsize, "bitmap": nnz * itemsize + -(-numel // 8),
             "index": nnz * (itemsize + index_size)}
    kind = min(sizes, key=lambda k: (sizes[k], list(sizes).index(k)))
    return kind, sizes[kind]


def _le_bytes(arr: np.ndarray) -> bytes:
    return arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()


def encode(tensors: Mapping[str, torch.Tensor], sparse: bool = False) -> bytes:
    """Serialise ``{name: tensor}``: u32 header length, a JSON header, then each tensor's
    little-endian bytes in header order.

    The header maps each name to ``[dtype, shape]`` (dense) or, with ``sparse=True`` and when
    smaller (:func:`sparse_layout`), to ``[dtype, shape, "bitmap", nnz]`` (non-zero values, then
    a little-endian bit per entry) or ``[dtype, shape, "index", nnz, index dtype]`` (non-zero
    values, then their flat positions)."""
    header, blobs = {}, []
    if not isinstance(tensors, Mapping):
        raise TypeError(f"encode takes a mapping of tensors, got {type(tensors).__name__}")
    for name, t in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"cannot encode a tensor named {name!r}: names are strings")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: cannot encode a {type(t).__name__}, only tensors")
        if t.layout != torch.strided or t.is_meta:
            raise TypeError(f"{name}: cannot encode a {'meta' if t.is_meta else t.layout} tensor, only dense ones "
                            "with data")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name}: cannot encode dtype {t.dtype} (encodable: {', '.join(map(str, _DTYPES))})")
        dtype = _DTYPES[t.dtype]
        t = t.detach().cpu().contiguous()
        flat = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).reshape(-1).numpy()
        kind = "dense"
        if sparse:
            nonzero = (t != 0).reshape(-1).numpy()
            nnz = int(nonzero.sum())
            kind, _ = sparse_layout(flat.size, nnz, _ITEMSIZE[dtype])
        if kind == "dense":
            header[name] = [dtype, list(t.shape)]
            blobs.append(_le_bytes(flat))
        elif kind == "bitmap":
            header[name] = [dtype, list(t.shape), "bitmap", nnz]
            blobs += [_le_bytes(flat[nonzero]), np.packbits(nonzero, bitorder="little").tobytes()]
        else:
            index = _index_dtype(flat.size)
            header[name] = [dtype, list(t.shape), "index", nnz, index]
            positions = np.flatnonzero(nonzero).astype(_INDEX_NP[index])
            blobs += [_le_bytes(flat[nonzero]), _le_bytes(positions)]
    head = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<I", len(head)) + head + b"".join(blobs)


def payload_header(payload: bytes) -> tuple[dict, int]:
    """``(header, its end offset)`` of an :func:`encode` payload, without reading the tensors:
    ``{name: [dtype, shape, layout...]}``."""
    if len(payload) < 4:
        raise ValueError("payload shorter than its header length field")
    (n,) = struct.unpack("<I", payload[:4])
    try:
        header = json.loads(payload[4 : 4 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"malformed payload header: {e}") from e
    if not isinstance(header, dict):
        raise ValueError("malformed payload header: not a table of tensors")
    return header, 4 + n


# The most values :func:`decode` builds from one payload unless told otherwise: a sparse layout
# can declare a huge tensor in a few bytes, and decoding it allocates the whole tensor. 2**28
# float32 values are 1 GiB, far above every model here (ResNet-18: 2.8 million weights).
DECODE_MAX_NUMEL = 1 << 28


def decode(payload: bytes, expected: Mapping[str, torch.Tensor] | None = None,
           max_numel: int = DECODE_MAX_NUMEL) -> Tensors:
    """Inverse of :func:`encode`; raises ``ValueError`` on a truncated or malformed payload.

    The header is checked before anything is allocated: with ``expected``, it must declare
    exactly those names, dtypes and shapes; without it, at most ``max_numel`` values in all
    (a sparse entry declares its size, and decoding allocates it)."""
    header, offset = payload_header(payload)
    total = 0
    for name, entry in header.items():
        if not isinstance(entry, list) or len(entry) < 2:
            raise ValueError(f"{name}: malformed header entry {entry!r}")
        dtype, shape = entry[0], entry[1]
        if not isinstance(dtype, str) or dtype not in _NP:
            raise ValueError(f"{name}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise ValueError(f"{name}: shape must be a list of non-negative integers, got {shape!r}")
        total += math.prod(shape)
    if expected is not None:
        missing, extra = sorted(set(expected) - set(header)), sorted(set(header) - set(expected))
        if missing or extra:
            raise ValueError(f"payload names differ: missing {missing[:10]}, unexpected {extra[:10]}")
        for name, ref in expected.items():
            dtype, shape = header[name][0], header[name][1]
            if _DTYPES.get(ref.dtype) != dtype or list(ref.shape) != shape:
                raise ValueError(f"{name}: payload declares {dtype} {shape}, expected {_DTYPES.get(ref.dtype)} "
                                 f"{list(ref.shape)}")
    elif total > max_numel:
        raise ValueError(f"payload declares {total} values, more than the {max_numel} allowed")

    def take(name: str, np_dtype, count: int) -> np.ndarray:
        nonlocal offset
        size = count * np.dtype(np_dtype).itemsize
        if offset + size > len(payload):
            raise ValueError(f"payload truncated in {name}")
        arr = np.frombuffer(payload, dtype=np.dtype(np_dtype).newbyteorder("<"), count=count, offset=offset)
        offset += size
        return arr.astype(np_dtype)

    out = {}
    for name, entry in header.items():
        dtype, shape, *layout = entry
        count = math.prod(shape)
        if not layout:
            flat = take(name, _NP[dtype], count)
        else:
            if len(layout) < 2 or type(layout[1]) is not int:
                raise ValueError(f"{name}: unknown layout {layout!r}")
            kind, nnz = layout[0], layout[1]
            if not 0 <= nnz <= count:
                raise ValueError(f"{name}: {nnz} non-zeros in a tensor of {count}")
            values = take(name, _NP[dtype], nnz)
            if kind == "bitmap":
                bits = take(name, np.uint8, -(-count // 8))
                positions = np.flatnonzero(np.unpackbits(bits, count=count, bitorder="little"))
            elif kind == "index" and len(layout) == 3 and layout[2] in _INDEX_NP:
                positions = take(name, _INDEX_NP[layout[2]], nnz).astype(np.int64)
            else:
                raise ValueError(f"{name}: unknown layout {layout!r}")
            if len(positions) != nnz or (nnz and (positions[0] < 0 or positions[-1] >= count
                                                  or bool((np.diff(positions) <= 0).any()))):
                raise ValueError(f"{name}: positions do not match its {nnz} non-zeros")
            flat = np.zeros(count, dtype=_NP[dtype])
            flat[positions] = values
        t = torch.from_numpy(flat).reshape(shape)
        out[name] = t.view(torch.bfloat16) if dtype == "bf16" else t
    if offset != len(payload):
        raise ValueError(f"payload has {len(payload) - offset} trailing bytes")
    return out


def payload_bits(tensors: Mapping[str, torch.Tensor], sparse: bool = False) -> int:
    """Bits of the tensors' data in :func:`encode`'s layout, without the header: what the
    papers count (32 bits per float32 value sent, plus the bitmap or indices of a sparse one)."""
    total = 0
    for t in tensors.values():
        itemsize = t.element_size()
        if sparse:
            total += sparse_layout(t.numel(), int(torch.count_nonzero(t)), itemsize)[1]
        else:
            total += t.numel() * itemsize
    return 8 * total


# --- client -------------------------------------------------------------------------------


def penalty_coefficient(config: FedConfig, round_index: int) -> float:
    """``lambda_t``: ``th_coeff * sigmoid(10 t / penalty_scheduler - 5)`` or the constant."""
    if config.penalty_schedule == "constant":
        return config.th_coeff
    z = 10.0 * round_index / config.penalty_scheduler - 5.0
    return config.th_coeff / (1.0 + math.exp(-z)) if z > -700 else 0.0


@torch.no_grad()
def threshold_guided_update(model: nn.Module, delta: Mapping[str, torch.Tensor]) -> None:
    """``W_i <- W_i - delta_i * sign(sum_j W_ij) / c`` for every unit, with ``c`` = kh*kw for
    a conv and fan-in for a linear layer (the reference code's constants)."""
    for name, layer in named_threshold_layers(model):
        d = delta[name].to(device=layer.weight.device, dtype=layer.weight.dtype)
        w = layer.weight
        c = w[0, 0].numel() if isinstance(layer, ThresholdConv2d) else w.shape[1]
        sign = torch.sign(w.reshape(w.shape[0], -1).sum(1))
        w.sub_((d * sign / c).view(-1, *([1] * (w.dim() - 1))))


@dataclass
class ClientReport:
    """What a client's round produced besides its new state: the uplink ``update`` (SpaFL: its
    thresholds) and local statistics (not sent in SpaFL; used for logging and accounting)."""

    update: Tensors
    num_samples: int
    train_loss: float
    flops: float
    stats: dict = field(default_factory=dict)

    @property
    def thresholds(self) -> Tensors:
        """SpaFL's name for the uplink."""
        return self.update

    @thresholds.setter
    def thresholds(self, value: Tensors) -> None:
        self.update = value


def set_thresholds(model: nn.Module, tau: Mapping[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, layer in named_threshold_layers(model):
            layer.threshold.copy_(tau[name])


def num_batches(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last else -(-n // batch_size)


def learning_rate(config: FedConfig, round_index: int) -> float:
    """``lr * lr_decay**t``, or with ``lr_final`` set, SparsyFed's exponential schedule from
    ``lr`` at round 0 to ``lr_final`` at round ``rounds``: ``lr * (lr_final / lr)**(t / rounds)``."""
    if config.lr_final is not None:
        return config.lr * math.exp(round_index / config.rounds * math.log(config.lr_final / config.lr))
    return config.lr * config.lr_decay**round_index


# --- the client's state: its model and, with a per-run optimiser, its momentum --------------

# Keys of the momentum buffers in a client's state (``optimizer_lifetime="per-run"``), beside the
# model's own state-dict entries: ``momentum/<parameter name>``.
MOMENTUM_PREFIX = "momentum/"


def model_entries(state: Mapping[str, torch.Tensor]) -> Tensors:
    """The model's entries of a client's state (without the optimiser's momentum buffers)."""
    return {k: v for k, v in state.items() if not k.startswith(MOMENTUM_PREFIX)}


def momentum_entries(state: Mapping[str, torch.Tensor] | None) -> Tensors:
    """``{parameter name: momentum buffer}`` kept in a client's state (empty: none kept)."""
    return {k[len(MOMENTUM_PREFIX):]: v for k, v in (state or {}).items() if k.startswith(MOMENTUM_PREFIX)}


def load_client_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load a client's state into ``model`` (every model entry; the momentum buffers stay out)."""
    model.load_state_dict(model_entries(state))


def sgd(model: nn.Module, config: FedConfig, round_index: int,
        momentum: Mapping[str, torch.Tensor] | None = None) -> torch.optim.SGD:
    """The round's SGD optimiser at :func:`learning_rate`, with ``momentum`` (``{parameter
    name: buffer}`` saved after the client's previous round, see :func:`client_state`) loaded
    into it: an optimiser kept for the client's whole life, whose learning rate follows the
    schedule, steps exactly as this one does."""
    opt = torch.optim.SGD(model.parameters(), lr=learning_rate(config, round_index), momentum=config.momentum,
                          weight_decay=config.weight_decay)
    if momentum:
        params = dict(model.named_parameters())
        unknown = sorted(set(momentum) - set(params))
        if unknown:
            raise ValueError(f"momentum buffers for parameters the model does not have: {unknown[:5]}")
        for name, buffer in momentum.items():
            p = params[name]
            if buffer.shape != p.shape:
                raise ValueError(f"momentum buffer of {name}: shape {tuple(buffer.shape)}, parameter {tuple(p.shape)}")
            opt.state[p]["momentum_buffer"] = buffer.detach().to(device=p.device, dtype=p.dtype).clone()
    return opt


def optimizer_momentum(model: nn.Module, optimizer: torch.optim.Optimizer) -> Tensors:
    """The optimiser's momentum buffers as ``momentum/<parameter name>`` entries (copies;
    parameters without a buffer yet, or SGD without momentum, have none)."""
    out = {}
    for name, p in model.named_parameters():
        buffer = optimizer.state.get(p, {}).get("momentum_buffer")
        if buffer is not None:
            out[MOMENTUM_PREFIX + name] = buffer.detach().clone()
    return out


def client_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, config: FedConfig) -> Tensors:
    """What a client keeps after its round: detached copies of the model's state and, with
    ``optimizer_lifetime="per-run"``, the optimiser's momentum buffers (:func:`optimizer_momentum`;
    plain tensors, so the state loads with ``torch.load(weights_only=True)``)."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if optimizer is not None and config.optimizer_lifetime == "per-run":
        state.update(optimizer_momentum(model, optimizer))
    return state


def train_generators(config: FedConfig, round_index: int, client_id: int, device: torch.device,
                     train_seeds: list[int] | None = None) -> list[torch.Generator]:
    """One generator per local epoch for the batch order (and augmentation): by default the
    same generator, keyed by ``(seed, round, client)``, for every epoch; with ``train_seeds``
    (``rng="global"``: drawn by :class:`SequentialStreams`), one seeded generator per epoch."""
    if train_seeds is None:
        generator = torch.Generator(device=device)
        generator.manual_seed(derived_seed(config.seed, "train", round_index, client_id))
        return [generator] * config.local_epochs
    if len(train_seeds) != config.local_epochs:
        raise ValueError(f"{len(train_seeds)} train seeds for {config.local_epochs} local epochs")
    return [torch.Generator(device=device).manual_seed(int(s)) for s in train_seeds]


def local_train(model: nn.Module, data: ClientData, config: FedConfig, round_index: int,
                generator: torch.Generator | list[torch.Generator], penalty: bool = True,
                optimizer: torch.optim.Optimizer | None = None) -> torch.Tensor:
    """Local training: SpaFL's objective (cross-entropy plus the threshold penalty), or plain
    cross-entropy with ``penalty=False``, with ``optimizer`` (default: a fresh :func:`sgd`).
    ``generator``: one for every epoch, or a list of one per epoch (:func:`train_generators`).
    Returns the mean training loss (a device tensor: no host sync inside the loop)."""
    opt = optimizer if optimizer is not None else sgd(model, config, round_index)
    generators = list(generator) if isinstance(generator, (list, tuple)) else [generator] * config.local_epochs
    if len(generators) != config.local_epochs:
        raise ValueError(f"{len(generators)} generators for {config.local_epochs} local epochs")
    lam = penalty_coefficient(config, round_index) if penalty else 0.0
    n, b = data.num_train, config.batch_size
    steps = num_batches(n, b, config.drop_last)
    device = data.train_x.device
    total = torch.zeros((), device=device)
    seen = 0
    model.train()
    for generator in generators:
        order = torch.randperm(n, device=device, generator=generator)
        for s in range(steps):
            idx = order[s * b : (s + 1) * b]
            x, y = data.train_x[idx], data.train_y[idx]
            if data.augment:
                x = crop_flip(x, data.fill, generator)
            loss = F.cross_entropy(model(x), y)
            objective = loss + lam * threshold_penalty(model) if lam else loss
            opt.zero_grad(set_to_none=True)
            objective.backward()
            if config.clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), config.clip)
            opt.step()
            total += loss.detach() * len(idx)
            seen += len(idx)
    return total / max(seen, 1)


def layer_macs(model: nn.Module, image_shape: tuple[int, ...], device: torch.device,
               layers: list[tuple[str, nn.Module]] | None = None) -> dict[str, int]:
    """Multiply-adds of each threshold layer (or of ``layers``) for ONE sample at full density:
    ``out * in/groups * kh * kw * H_out * W_out`` for a conv and ``out * in`` per row for a
    linear layer (rows per sample: 1 for the paper's CNNs, the token count for the ViT)."""
    macs: dict[str, int] = {}
    hooks = []
    for name, layer in (named_threshold_layers(model) if layers is None else layers):
        def hook(module, _inputs, output, name=name):
            per_out = module.weight[0].numel()  # in/groups * kh * kw, or in
            macs[name] = int(output[0].numel()) * per_out  # output[0]: one sample
        hooks.append(layer.register_forward_hook(hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, *image_shape), device=device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return macs


def comm_bits_paper(num_thresholds: int, clients_per_round: int) -> int:
    """The paper's communication per round: ``2 * K * T * 32`` bits (T float32 thresholds
    down to and up from each of the K sampled clients)."""
    return 2 * clients_per_round * num_thresholds * 32


def densities(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{layer: bool mask [out]}`` of the current weights and thresholds (on the device)."""
    return {name: layer.mask for name, layer in named_threshold_layers(model)}


def training_flops(config: FedConfig, num_train: int, masks: Mapping[str, torch.Tensor], macs: Mapping[str, int],
                   num_thresholds: int, num_weights: int) -> float:
    """The paper's count for one client's round (a multiply-add is one FLOP): forward =
    ``local_epochs * |D_k| * sum_l density_l * MACs_l``, backward = 2 * forward, plus
    ``T * batches_per_epoch + n_weights`` for the thresholds (the reference's count; pass 0 for
    a method without thresholds). ``masks[l]``: SpaFL's unit mask, or for an unstructured
    method a tensor whose mean is the layer's fraction of non-zero weights; the densities are
    those at the end of local training."""
    dense = sum(float(torch.as_tensor(masks[k]).float().mean()) * macs[k] for k in macs)
    forward = config.local_epochs * num_train * dense
    return 3.0 * forward + num_thresholds * num_batches(num_train, config.batch_size, config.drop_last) + num_weights


def client_round(model: nn.Module, state: Mapping[str, torch.Tensor], message: Mapping[str, torch.Tensor],
                 data: ClientData, config: FedConfig, round_index: int, client_id: int,
                 macs: Mapping[str, int], *, train_seeds: list[int] | None = None) -> tuple[Tensors, ClientReport]:
    """One client's round on a working ``model``: load the client's ``state`` (weights, batch
    norm buffers and, with ``optimizer_lifetime="per-run"``, its optimiser's momentum), take
    the global thresholds from ``message``, apply the threshold-guided update, train, and
    return ``(new state, report)``. ``state`` itself is not modified, so a client that fails
    mid-round keeps the state it had. ``train_seeds``: see :func:`train_generators`."""
    load_client_state(model, state)
    tau = {k[len("tau/"):]: v for k, v in message.items() if k.startswith("tau/")}
    set_thresholds(model, tau)
    if config.th_update:
        threshold_guided_update(model, {k[len("delta/"):]: v for k, v in message.items() if k.startswith("delta/")})
    generators = train_generators(config, round_index, client_id, data.train_x.device, train_seeds)
    kept = momentum_entries(state) if config.optimizer_lifetime == "per-run" else None
    optimizer = sgd(model, config, round_index, kept)
    loss = local_train(model, data, config, round_index, generators, optimizer=optimizer)
    masks = densities(model)
    n_thresholds = sum(v.numel() for v in tau.values())
    n_weights = sum(layer.weight.numel() for _, layer in named_threshold_layers(model))
    flops = training_flops(config, data.num_train, masks, macs, n_thresholds, n_weights)
    new_state = client_state(model, optimizer, config)
    report = ClientReport(model_thresholds(model), data.num_train, float(loss), flops)
    return new_state, report


def layer_densities(layers: list[tuple[str, nn.Module]]) -> tuple[dict[str, torch.Tensor], torch.Tensor, int]:
    """``({layer: density}, active weights, prunable weights)`` on the device. A threshold
    layer's density is its fraction of active units (each carries ``weight[0].numel()``
    weights); any other layer's is its fraction of non-zero weights."""
    per_layer, active, total = {}, [], 0
    for name, layer in layers:
        if hasattr(layer, "threshold"):
            m = layer.mask
            per_layer[name] = m.float().mean()
            active.append(m.sum() * layer.weight[0].numel())
        else:
            nz = layer.weight != 0
            per_layer[name] = nz.float().mean()
            active.append(nz.sum())
        total += layer.weight.numel()
    return per_layer, torch.stack(active).sum() if active else torch.zeros(()), total


@torch.no_grad()
def evaluate(model: nn.Module, state: Mapping[str, torch.Tensor] | None, data: ClientData, batch_size: int,
             mask_layer: str | None = None, layers: list[tuple[str, nn.Module]] | None = None) -> dict:
    """A model on ``data``'s test split: accuracy (%), mean loss, the number of test samples,
    its densities (unweighted layer mean, weighted, per layer; over the threshold layers, or
    over ``layers``) and, if ``mask_layer`` names a threshold layer, its unit mask (bool
    ``[out]`` on the host). ``state`` is loaded first unless None (already loaded)."""
    if state is not None:
        load_client_state(model, state)
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=data.test_x.device)
    loss = torch.zeros((), device=data.test_x.device)
    for i in range(0, data.num_test, batch_size):
        logits = model(data.test_x[i : i + batch_size])
        y = data.test_y[i : i + batch_size]
        correct += (logits.argmax(1) == y).sum()
        loss += F.cross_entropy(logits.float(), y, reduction="sum")
    layers = list(named_threshold_layers(model)) if layers is None else layers
    per_layer_t, active, total = layer_densities(layers)
    mask = None
    if mask_layer is not None:
        layer = dict(layers).get(mask_layer)
        mask = layer.mask if layer is not None and hasattr(layer, "threshold") else None
    n = data.num_test
    values = torch.stack([correct.float(), loss, *per_layer_t.values(), active.to(loss.device).float()])
    values = values.cpu().tolist()  # the one host sync of an evaluation
    per_layer = dict(zip(per_layer_t, values[2:-1], strict=True))
    return {
        "acc": 100.0 * values[0] / n if n else float("nan"),
        "loss": values[1] / n if n else float("nan"),
        "num_test": n,
        "density": sum(per_layer.values()) / len(per_layer) if per_layer else float("nan"),
        "density_weighted": values[-1] / total if total else float("nan"),
        "layers": per_layer,
        "mask": None if mask is None else mask.cpu(),
    }
