"""What the clients train on: a dataset in memory (:class:`ImageDataset`, read by
:mod:`.datafiles`), its seeded Dirichlet split over the clients, and each client's split as
tensors on the device (:class:`ClientData`: one tensor per split, so a batch is an index gather,
not a Python loop over samples), with the augmentation the presets use (:func:`crop_flip`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class ImageDataset:
    """A whole labelled image dataset in host memory.

    ``train_x``/``test_x``: uint8 ``[n, C, H, W]`` (0..255) or float32 in [0, 1];
    ``train_y``/``test_y``: int64 ``[n]``; ``mean``/``std``: per-channel statistics of the
    training images on the [0, 1] scale, for the standard normalisation.
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])


def dirichlet_split(train_y: np.ndarray, test_y: np.ndarray, num_clients: int, alpha: float, num_classes: int,
                    rng: np.random.Generator) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Split train AND test indices among clients, class by class, with shared proportions.

    For each class ``c`` draw ``p_c ~ Dirichlet(alpha * 1_N)`` once; shuffle the class's train
    indices and cut them at ``floor(cumsum(p_c) * n_c)`` (the reference code's cut), and the
    class's test indices with the same ``p_c``. Each client's train indices are then shuffled.
    """
    train_parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    test_parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c in range(num_classes):
        p = rng.dirichlet(np.full(num_clients, float(alpha)))
        for labels, parts in ((train_y, train_parts), (test_y, test_parts)):
            idx = np.flatnonzero(labels == c)
            rng.shuffle(idx)
            cuts = (np.cumsum(p) * len(idx)).astype(np.int64)[:-1]
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].append(chunk)
    train = [np.concatenate(p).astype(np.int64) for p in train_parts]
    for t in train:
        rng.shuffle(t)
    test = [np.sort(np.concatenate(p)).astype(np.int64) for p in test_parts]
    return train, test


def split_for_run(dataset: ImageDataset, num_clients: int, alpha: float, min_train_samples: int, seed: int,
                  max_draws: int = 1000) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The run's split: Dirichlet draws from a generator keyed by ``seed``, re-drawn (as the
    reference CIFAR code does for batch norm) until every client has ``min_train_samples``."""
    rng = np.random.default_rng([seed, 0x5B1])
    train_y, test_y = dataset.train_y.numpy(), dataset.test_y.numpy()
    if len(train_y) < num_clients * min_train_samples:
        raise ValueError(f"{len(train_y)} training samples cannot give {num_clients} clients "
                         f"{min_train_samples} samples each")
    for _ in range(max_draws):
        train, test = dirichlet_split(train_y, test_y, num_clients, alpha, dataset.num_classes, rng)
        if min(len(t) for t in train) >= min_train_samples:
            return train, test
    raise ValueError(f"no Dirichlet(alpha={alpha}) split in {max_draws} draws gave every one of {num_clients} "
                     f"clients {min_train_samples} training samples; raise alpha or lower min_train_samples")


def split_digest(train: list[np.ndarray], test: list[np.ndarray]) -> str:
    """A short hash of a split, stored in checkpoints to prove a resumed run sees the same data."""
    h = hashlib.sha256()
    for part in (*train, *test):
        h.update(np.int64(len(part)).tobytes())
        h.update(part.astype(np.int64).tobytes())
    return h.hexdigest()[:16]


# --- tensors on the device ----------------------------------------------------------------


@dataclass
class ClientData:
    """One client's local data on the device: ``train_x [n, C, H, W]`` float, ``train_y [n]``,
    ``test_x``, ``test_y``, already normalised. ``augment`` applies crop-and-flip to training
    batches with ``fill`` (the normalised value of a black pixel, per channel) as padding."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    augment: bool = False
    fill: torch.Tensor | None = None

    @property
    def num_train(self) -> int:
        return int(self.train_y.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.test_y.shape[0])


def _to_float(x: torch.Tensor, dataset: ImageDataset, normalize: str, device: torch.device) -> torch.Tensor:
    x = x.to(device)
    if x.dtype == torch.uint8:
        x = x.float()
        if normalize == "raw":
            return x
        x = x / 255.0
    elif normalize == "raw":
        x = x.float() * 255.0
        return x
    mean = torch.tensor(dataset.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(dataset.std, device=device).view(1, -1, 1, 1)
    return (x.float() - mean) / std


def client_data(dataset: ImageDataset, train_idx: list[np.ndarray], test_idx: list[np.ndarray], normalize: str,
                augment: bool, device: torch.device) -> list[ClientData]:
    """Normalise the dataset once on the device and cut it into per-client tensors."""
    train_x = _to_float(dataset.train_x, dataset, normalize, device)
    test_x = _to_float(dataset.test_x, dataset, normalize, device)
    train_y, test_y = dataset.train_y.to(device), dataset.test_y.to(device)
    fill = None
    if augment:
        black = torch.zeros((1, dataset.image_shape[0], 1, 1), dtype=dataset.train_x.dtype)
        fill = _to_float(black, dataset, normalize, device).view(-1)
    out = []
    for tr, te in zip(train_idx, test_idx, strict=True):
        tr_t = torch.from_numpy(tr).to(device)
        te_t = torch.from_numpy(te).to(device)
        out.append(ClientData(train_x[tr_t], train_y[tr_t], test_x[te_t], test_y[te_t], augment, fill))
    return out


def crop_flip(x: torch.Tensor, fill: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """The standard CIFAR augmentation on a batch ``[B, C, H, W]`` on its device: pad by ``pad``
    with ``fill`` per channel, crop a random ``H x W`` window, flip horizontally with p = 1/2."""
    b, c, h, w = x.shape
    padded = fill.view(1, c, 1, 1).expand(b, c, h + 2 * pad, w + 2 * pad).clone()
    padded[:, :, pad : pad + h, pad : pad + w] = x
    offsets = torch.randint(0, 2 * pad + 1, (2, b), device=x.device, generator=generator)
    flip = torch.rand(b, device=x.device, generator=generator) < 0.5
    rows = offsets[0].view(b, 1, 1) + torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w).expand(b, 1, w)
    cols = torch.where(flip.view(b, 1, 1), w - 1 - cols, cols) + offsets[1].view(b, 1, 1)
    batch = torch.arange(b, device=x.device).view(b, 1, 1)
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()
