"""Reading a dataset from disk into an :class:`~.data.ImageDataset` (:func:`load_dataset`).

The readers parse torchvision's on-disk layouts directly (no torchvision needed):

- Fashion-MNIST: ``<root>/FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` (IDX);
- CIFAR-10: ``<root>/cifar-10-batches-py/{data_batch_1..5,test_batch}`` (python pickles);
- CIFAR-100: ``<root>/cifar-100-python/{train,test}`` (python pickles, fine labels).

``download=True`` asks torchvision to fetch the files when it is installed. The digits set
ships with the package. Every file is checked before it is trusted (sizes, shapes, labels; a
pickle may hold arrays only).
"""

from __future__ import annotations

import gzip
import io
import math
import pickle
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from ..datasets import load_digits
from .data import ImageDataset

# Published per-channel statistics (train split, [0, 1] scale).
_STATS = {
    "fmnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.49139968, 0.48215827, 0.44653124), (0.24703233, 0.24348505, 0.26158768)),
    "cifar100": ((0.5070751, 0.48654887, 0.44091785), (0.26733428, 0.25643846, 0.27615049)),
}


# The IDX header: a big-endian u32 magic (0x0000, a type byte, a dimension count) and one
# big-endian u32 per dimension. Fashion-MNIST's files are unsigned bytes (type 0x08).
_IDX_UBYTE = 0x08


_IDX_MAX_BYTES = 1 << 31  # Fashion-MNIST's largest file is 47 MB


def _idx_dims(path: Path, data: bytes, magic: int, ndim: int) -> tuple[int, ...]:
    """The dimension sizes of an IDX header ``data``; ``ValueError`` naming ``path`` when it is
    short, of another magic, or negative."""
    if len(data) < 4:
        raise ValueError(f"{path}: {len(data)} bytes, too short for an IDX header (a 4-byte magic)")
    (found,) = struct.unpack(">i", data[:4])
    if found != magic:
        raise ValueError(f"{path}: IDX magic {found}, expected {magic} "
                         f"(unsigned bytes, {ndim} dimension{'s' if ndim != 1 else ''})")
    if len(data) < 4 + 4 * ndim:
        raise ValueError(f"{path}: IDX header truncated: {len(data)} bytes, the header alone needs {4 + 4 * ndim} "
                         f"(magic and {ndim} dimension sizes)")
    dims = struct.unpack(f">{ndim}i", data[4 : 4 + 4 * ndim])
    if any(d < 0 for d in dims):
        raise ValueError(f"{path}: IDX header has negative dimension sizes {dims}")
    return dims


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """The uint8 array of an IDX file (``.gz`` or plain) whose magic must be ``magic``.

    Every problem raises ``ValueError`` naming the file: a truncated or corrupt gzip stream
    (gzip checks its CRC and length), a header shorter than its dimension count, another magic,
    or a body whose size is not the product of the dimensions."""
    ndim = magic & 0xFF
    head = 4 + 4 * ndim
    try:
        # Read the header, then no more than the body it declares (and one byte to tell a longer
        # file): a small gzip that inflates without end (a gzip bomb) stops there.
        with (gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")) as f:
            data = f.read(head)
            dims = _idx_dims(path, data, magic, ndim)
            expected = math.prod(dims)
            if expected > _IDX_MAX_BYTES:
                raise ValueError(f"{path}: header declares {dims} ({expected} bytes), more than the "
                                 f"{_IDX_MAX_BYTES} bytes this reader accepts")
            data += f.read(expected + 1)
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{path}: not a readable {'gzip ' if path.suffix == '.gz' else ''}file "
                         f"({type(e).__name__}: {e}); delete it and fetch it again") from e
    body = len(data) - head
    if body > expected:
        raise ValueError(f"{path}: header says {dims} ({expected} bytes) but the file holds more after it")
    if body != expected:
        raise ValueError(f"{path}: header says {dims} ({expected} bytes) but the file holds {body} bytes after it")
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find(folder: Path, stem: str) -> Path:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{stem}[.gz] not found in {folder}")


def read_fashion_mnist(root: str | Path) -> ImageDataset:
    """Fashion-MNIST from ``<root>/FashionMNIST/raw`` (``root`` may also be that folder)."""
    root = Path(root)
    raw = root if (root / "train-labels-idx1-ubyte.gz").exists() or (root / "train-labels-idx1-ubyte").exists() \
        else root / "FashionMNIST" / "raw"
    if not raw.is_dir():
        raise FileNotFoundError(f"Fashion-MNIST not found: expected {root}/FashionMNIST/raw (torchvision's layout)")
    parts = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = _read_idx(_find(raw, f"{prefix}-images-idx3-ubyte"), 2051)
        labels = _read_idx(_find(raw, f"{prefix}-labels-idx1-ubyte"), 2049)
        if len(images) != len(labels):
            raise ValueError(f"Fashion-MNIST {split}: {len(images)} images but {len(labels)} labels")
        parts[split] = (torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))
    return _checked("fmnist", parts, 10)


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds plain containers and numpy arrays and nothing else: a pickle
    naming any other callable (the way a crafted file runs code) is refused."""

    # What pickle writes for an ndarray under numpy 1 and 2 and every protocol, and the codec
    # protocol 2 uses for bytes.
    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
        *((f"numpy{core}.multiarray", name) for core in (".core", "._core") for name in ("_reconstruct", "scalar")),
        *((f"numpy{core}.numeric", "_frombuffer") for core in (".core", "._core")),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing {module}.{name}: a CIFAR batch holds only arrays, lists, "
                                         "numbers and strings")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    """A CIFAR batch file (a pickled dict) read without running code from it."""
    try:
        with open(path, "rb") as f:
            data = _ArrayUnpickler(io.BufferedReader(f), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            MemoryError, UnicodeDecodeError, struct.error) as e:
        raise ValueError(f"{path}: not a readable CIFAR batch ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a CIFAR batch must be a dict, got {type(data).__name__}")
    return data


def _cifar_part(files: list[Path], label_key: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[n, 3, 32, 32]`` uint8 and labels ``[n]`` int64 of CIFAR batch files."""
    xs, ys = [], []
    for path in files:
        entry = _unpickle(path)
        if b"data" not in entry or label_key not in entry:
            raise ValueError(f"{path}: a batch lacks {b'data'!r} or {label_key!r}")
        try:
            data = np.asarray(entry[b"data"])
            labels = np.asarray(entry[label_key])
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: data or labels are not arrays ({e})") from e
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise ValueError(f"{path}: data must be [n, 3072] uint8 rows, got {data.dtype} {data.shape}")
        if labels.ndim != 1 or len(labels) != len(data) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"{path}: {len(data)} images need {len(data)} integer labels, got {labels.dtype} "
                             f"{labels.shape}")
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(labels.astype(np.int64))
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def read_cifar10(root: str | Path) -> ImageDataset:
    """CIFAR-10 from ``<root>/cifar-10-batches-py`` (``root`` may also be that folder)."""
    root = Path(root)
    folder = root if (root / "test_batch").exists() else root / "cifar-10-batches-py"
    if not folder.is_dir():
        raise FileNotFoundError(f"CIFAR-10 not found: expected {root}/cifar-10-batches-py (torchvision's layout)")
    train = [_find(folder, f"data_batch_{i}") for i in range(1, 6)]
    parts = {"train": _cifar_part(train, b"labels"), "test": _cifar_part([_find(folder, "test_batch")], b"labels")}
    return _checked("cifar10", parts, 10)


def read_cifar100(root: str | Path) -> ImageDataset:
    """CIFAR-100 (fine labels) from ``<root>/cifar-100-python`` (``root`` may also be that folder)."""
    root = Path(root)
    folder = root if (root / "test").is_file() and (root / "train").is_file() else root / "cifar-100-python"
    if not folder.is_dir():
        raise FileNotFoundError(f"CIFAR-100 not found: expected {root}/cifar-100-python (torchvision's layout)")
    parts = {s: _cifar_part([_find(folder, s)], b"fine_labels") for s in ("train", "test")}
    return _checked("cifar100", parts, 100)


def _checked(name: str, parts: dict, num_classes: int) -> ImageDataset:
    shapes = {split: tuple(x.shape[1:]) for split, (x, _y) in parts.items()}
    if shapes["test"] != shapes["train"]:
        raise ValueError(f"{name}: the test split's images are {shapes['test']} but the train split's "
                         f"{shapes['train']}; a damaged file header?")
    for split, (_x, y) in parts.items():
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise ValueError(f"{name} {split}: labels outside [0, {num_classes})")
    mean, std = _STATS[name]
    return ImageDataset(name, *parts["train"], *parts["test"], num_classes=num_classes, mean=mean, std=std)


def _digits() -> ImageDataset:
    images, labels = load_digits()
    # A fixed 80/20 split (independent of the run's seed, so every run sees the same test set).
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    n_test = len(labels) // 5
    test, train = order[:n_test], order[n_test:]
    x = images.unsqueeze(1)
    mean, std = float(x[train].mean()), float(x[train].std())
    return ImageDataset("digits", x[train], labels[train], x[test], labels[test], 10, (mean,), (std,))


_READERS = {"fmnist": read_fashion_mnist, "cifar10": read_cifar10, "cifar100": read_cifar100}
_TORCHVISION = {"fmnist": "FashionMNIST", "cifar10": "CIFAR10", "cifar100": "CIFAR100"}
# Where the files come from (the sources torchvision downloads) and where the readers look.
_SOURCES = {"fmnist": "the four {train,t10k}-{images-idx3,labels-idx1}-ubyte.gz files of "
                      "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
            "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz (unpacked)",
            "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz (unpacked)"}
_LAYOUTS = {"fmnist": "FashionMNIST/raw/<file>.gz", "cifar10": "cifar-10-batches-py/{data_batch_1..5,test_batch}",
            "cifar100": "cifar-100-python/{train,test}"}


def load_dataset(name: str, root: str | Path | None = None, download: bool = False) -> ImageDataset:
    """Read a dataset by name (``digits``, ``fmnist``, ``cifar10``, ``cifar100``)."""
    if name == "digits":
        return _digits()
    if name not in _READERS:
        raise ValueError(f"unknown dataset {name!r}; known: digits, {', '.join(_READERS)}")
    if root is None:
        raise ValueError(f"dataset {name!r} needs data_root (the folder torchvision would be given)")
    if download:
        _download(name, Path(root))
    return _READERS[name](root)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def _download(name: str, root: Path) -> None:
    """Fetch ``name`` into ``root`` with torchvision. On failure (torchvision missing, no
    network, a refused or broken download) raise one ``ValueError`` naming the cause and the
    files to fetch by hand, after removing everything the attempt created: the folders it made
    (``root`` itself included) and the files it left, partial archives among them. What was
    there before is not touched."""
    by_hand = (f"fetch {_SOURCES[name]} yourself and place the files under {root} as {_LAYOUTS[name]}, then run "
               "without download")
    try:
        import torchvision.datasets as tvd
    except Exception as e:  # not installed, or a build that does not import
        raise ValueError(f"download needs torchvision, which does not import here ({_first_line(e)}); install the "
                         f"release that matches your torch (docs/getting-started.md: for torch 2.13, pip install "
                         f"torchvision==0.28.0) or {by_hand}") from None
    top = root.absolute()  # the highest folder the download would create (torchvision makes parents too)
    while not top.parent.exists():
        top = top.parent
    existed = root.exists()
    before = set(root.rglob("*")) if existed else set()
    try:
        for train in (True, False):
            getattr(tvd, _TORCHVISION[name])(str(root), train=train, download=True)
    except (Exception, KeyboardInterrupt) as e:
        _remove_new(root if existed else top, existed, before)
        if isinstance(e, KeyboardInterrupt):
            raise
        raise ValueError(f"could not download {name} into {root} ({_first_line(e)}); {by_hand}") from None


def _remove_new(root: Path, existed: bool, before: set[Path]) -> None:
    """Remove what a failed download created under ``root`` (all of ``root`` when it did not exist)."""
    if not existed:
        shutil.rmtree(root, ignore_errors=True)
        return
    for path in sorted(set(root.rglob("*")) - before, key=lambda p: len(p.parts), reverse=True):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


# --- the non-IID split --------------------------------------------------------------------
