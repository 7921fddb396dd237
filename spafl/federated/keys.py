"""Keyed randomness: every random choice of a run is drawn from a generator keyed by the run's
seed and what the draw is for (a stream and its keys: the round, the client), so a round does
not depend on what ran before it: a resumed run, or another transport driving the same round,
reproduces the same history. (``rng="global"`` replaces the cohort and batch-order draws by the
reference code's sequential streams, :class:`SequentialStreams`, for comparison.)

Keys are collision-free by construction. A key is ``[seed, *stream prefix, *keys]`` given to
NumPy's ``SeedSequence``, which splits each integer into 32-bit words and ignores trailing zero
words: ``[s, 2, t, 0]`` and ``[s, 2, t]`` seed the same generator. So every stream has a fixed
number of keys (:data:`STREAMS`), the seed and every key are one word (``0 <= x < 2**32``), and
no stream's prefix can be completed into another's (checked at import, :func:`_check_streams`):
two different ``(seed, stream, keys)`` never give the same entropy. The encoding is the one
the package has always used for its streams, so every recorded run keeps its draws.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from .config import FedConfig

# stream -> (prefix after the seed, number of keys). The prefixes are the historical ones
# (sample 1, train 2, init 3; SparsyFed's two initial draws were "init" with the key 1 or 2).
STREAMS: dict[str, tuple[tuple[int, ...], int]] = {
    "sample": ((1,), 1),  # the cohort of round t
    "train": ((2,), 2),  # the batch order and augmentation of (round t, client c)
    "init": ((3,), 0),  # the initial model
    "powerprop-init": ((3, 1), 0),  # SparsyFed's Powerpropagation conversion
    "spectral": ((3, 2), 0),  # SparsyFed's spectral-norm power iteration
}
WORD = 1 << 32


def _check_streams(streams: Mapping[str, tuple[tuple[int, ...], int]]) -> None:
    """Raise ``ValueError`` unless no two streams can give the same entropy once trailing
    zeros are dropped: for every pair, their prefixes differ at a position both have, or the
    shorter prefix is complete (no keys) and the longer one continues it with a non-zero word
    (so its draws never end where the shorter one's does). Every prefix word is non-zero."""
    items = list(streams.items())
    for name, (prefix, _) in items:
        if not prefix or any(not 0 < w < WORD for w in prefix):
            raise ValueError(f"stream {name}: prefix words must be in 1..2**32-1, got {prefix}")
    for i, (a, (pa, na)) in enumerate(items):
        for b, (pb, nb) in items[i + 1:]:
            common = min(len(pa), len(pb))
            if pa[:common] != pb[:common]:
                continue
            short, n_short, long_ = (pa, na, pb) if len(pa) <= len(pb) else (pb, nb, pa)
            if len(short) == len(long_) or n_short != 0 or not any(long_[len(short):]):
                raise ValueError(f"streams {a} and {b} can draw the same keys")


_check_streams(STREAMS)


def stream_entropy(seed: int, stream: str, *keys: int) -> list[int]:
    """The ``SeedSequence`` entropy of one draw: ``[seed, *prefix, *keys]``, after checking the
    stream's key count and that the seed and keys are single 32-bit words."""
    if stream not in STREAMS:
        raise ValueError(f"unknown random stream {stream!r}; streams: {sorted(STREAMS)}")
    prefix, count = STREAMS[stream]
    if len(keys) != count:
        raise ValueError(f"stream {stream!r} takes {count} key(s), got {len(keys)}: {keys}")
    for what, value in (("seed", seed), *(("key", k) for k in keys)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < WORD:
            raise ValueError(f"{what} of stream {stream!r} must be an integer in [0, 2**32), got {value!r}")
    return [int(seed), *prefix, *(int(k) for k in keys)]


def derived_seed(seed: int, stream: str, *keys: int) -> int:
    """A 63-bit seed for one draw of ``stream`` (its keys: :data:`STREAMS`) from the run's seed."""
    entropy = stream_entropy(seed, stream, *keys)
    return int(np.random.SeedSequence(entropy).generate_state(2, np.uint64)[0] >> 1)


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


