"""The wire format: what a transport carries and what the accounting measures.

A message is ``{name: tensor}``; :func:`encode` turns it into bytes (a u32 header length, a
JSON header of names, dtypes and shapes, then each tensor's little-endian data, dense or, for
a sparse method, in the smaller of a bitmap or an index layout) and :func:`decode` back,
checking the header against the expected layout before allocating anything.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping

import numpy as np
import torch

Tensors = dict[str, torch.Tensor]

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


