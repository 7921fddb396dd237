"""Hostile input at the server and in the data files: the checks that keep one bad client or
one bad file from stopping a run or running code, each with the reproduction it answers."""

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from spafl.federated.data import read_cifar10, read_fashion_mnist

# --- data files -----------------------------------------------------------------------------


def _idx_bytes(array: np.ndarray, magic: int) -> bytes:
    return struct.pack(">i", magic) + struct.pack(f">{array.ndim}i", *array.shape) + array.astype(np.uint8).tobytes()


def _fmnist(root: Path, compress: bool = True) -> Path:
    """A tiny Fashion-MNIST in torchvision's layout; returns its raw folder."""
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    files = {"train-images-idx3-ubyte": (rng.integers(0, 256, (7, 28, 28)), 2051),
             "train-labels-idx1-ubyte": (rng.integers(0, 10, 7), 2049),
             "t10k-images-idx3-ubyte": (rng.integers(0, 256, (3, 28, 28)), 2051),
             "t10k-labels-idx1-ubyte": (rng.integers(0, 10, 3), 2049)}
    for name, (array, magic) in files.items():
        data = _idx_bytes(array, magic)
        if compress:
            (raw / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (raw / name).write_bytes(data)
    return raw


def test_corrupt_idx_files_name_the_file_and_the_problem(tmp_path):
    raw = _fmnist(tmp_path)
    read_fashion_mnist(tmp_path)  # the intact set reads
    target = raw / "train-images-idx3-ubyte.gz"
    good = target.read_bytes()
    payload = gzip.decompress(good)
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x10  # inside the deflate stream: the CRC (or the stream) no longer checks out
    cases = [
        (good[: len(good) // 2], r"not a readable gzip file \(EOFError"),  # truncated download
        (bytes(flipped), "not a readable gzip file"),
        (b"plain bytes, not gzip", r"not a readable gzip file \(BadGzipFile"),
        (gzip.compress(payload[:10]), r"IDX header truncated: 10 bytes, the header alone needs 16"),
        (gzip.compress(payload[:3]), "too short for an IDX header"),
        (gzip.compress(struct.pack(">i", 2049) + payload[4:]), "IDX magic 2049, expected 2051"),
        (gzip.compress(payload[:-5]), r"header says \(7, 28, 28\) \(5488 bytes\) but the file holds 5483"),
        (gzip.compress(payload + b"x"), "holds 5489"),
        (gzip.compress(payload[:4] + struct.pack(">i", -7) + payload[8:]), "negative dimension"),
    ]
    for data, match in cases:
        target.write_bytes(data)
        with pytest.raises(ValueError, match=match) as info:
            read_fashion_mnist(tmp_path)
        assert str(target) in str(info.value), info.value


def test_corrupt_plain_idx_file(tmp_path):
    raw = _fmnist(tmp_path, compress=False)
    target = raw / "t10k-labels-idx1-ubyte"
    target.write_bytes(target.read_bytes()[:6])
    with pytest.raises(ValueError, match=f"{target}: IDX header truncated"):
        read_fashion_mnist(tmp_path)


class _Payload:
    """Pickles to a call of os.system: what a crafted dataset file would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _cifar10(root: Path) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (2, 3072)).astype(np.uint8), b"labels": [1, 2]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    return folder


def test_crafted_cifar_pickle_runs_no_code(tmp_path):
    folder = _cifar10(tmp_path)
    assert read_cifar10(tmp_path).train_x.shape == (10, 3, 32, 32)
    marker = tmp_path / "pwned"
    target = folder / "data_batch_3"
    target.write_bytes(pickle.dumps({b"data": _Payload(marker), b"labels": [0]}))
    with pytest.raises(ValueError, match=f"{target}: not a readable CIFAR batch.*refusing (posix|os|nt).system"):
        read_cifar10(tmp_path)
    assert not marker.exists()
    for data, match in [(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}), "2 images need 2"),
                        (pickle.dumps({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}), "uint8 rows"),
                        (pickle.dumps([1, 2]), "must be a dict"),
                        (pickle.dumps({b"data": 1})[:-3], "not a readable CIFAR batch")]:
        target.write_bytes(data)
        with pytest.raises(ValueError, match=match) as info:
            read_cifar10(tmp_path)
        assert str(target) in str(info.value)
