"""Deterministic 64-bit hashes of request ids and rows: the split, the sample and the fingerprint.

The scale engine (:mod:`exitwise.calibration.scale`) never looks at row order. A row's split
(choose or certify) and its place in the stratified sample are functions of its request id
and the seed alone, so the same rows land in the same split whatever the file layout, the
batch size or the Spark partitioning. The dataset's fingerprint is a sum of per-row hashes,
which does not depend on the order either.

The hash is FNV-1a over the id's bytes (a string id's UTF-8, an integer id's eight
little-endian bytes) followed by the splitmix64 finaliser, vectorised with numpy: no Python
loop over rows, and the same numbers on every machine.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["SALT_SAMPLE", "SALT_SPLIT", "hash_ids", "mix", "row_hashes", "unit_interval", "value_hashes"]

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)
SALT_SPLIT = 0x5350  # "SP": which split a request id falls in
SALT_SAMPLE = 0x534D  # "SM": a choose row's priority in the sample (smallest first)


def mix(h: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser of uint64 values (a bijection that spreads every input bit)."""
    with np.errstate(over="ignore"):
        h = h.astype(np.uint64, copy=True)
        h ^= h >> np.uint64(30)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(27)
        h *= np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(31)
    return h


def _fnv_strings(arr: pa.Array) -> np.ndarray:
    """FNV-1a of every string of ``arr`` (no nulls), one vectorised step per byte position."""
    arr = arr.cast(pa.large_binary()) if not pa.types.is_large_binary(arr.type) else arr
    n = len(arr)
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64, count=n + 1, offset=arr.offset * 8)
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8) if arr.buffers()[2] is not None else np.zeros(0, np.uint8)
    starts, lengths = offsets[:-1], np.diff(offsets)
    h = np.full(n, _FNV_OFFSET, dtype=np.uint64)
    longest = int(lengths.max()) if n else 0
    with np.errstate(over="ignore"):
        for p in range(longest):
            live = np.flatnonzero(lengths > p)
            h[live] = (h[live] ^ data[starts[live] + p].astype(np.uint64)) * _FNV_PRIME
    return h


def _fnv_uint64(values: np.ndarray) -> np.ndarray:
    """FNV-1a over the eight little-endian bytes of each uint64."""
    h = np.full(values.shape, _FNV_OFFSET, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for byte in range(8):
            h = (h ^ ((values >> np.uint64(8 * byte)) & np.uint64(0xFF))) * _FNV_PRIME
    return h


def value_hashes(values: np.ndarray | pa.Array) -> np.ndarray:
    """A 64-bit hash per value: integers by value (whatever their width), strings by UTF-8 bytes."""
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        arr = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    else:
        values = np.asarray(values)
        if values.dtype.kind in "iu":
            return _fnv_uint64(values.astype(np.int64).view(np.uint64))
        # objects straight to Arrow: numpy's fixed-width strings would drop trailing NUL characters
        items = values.tolist() if values.dtype.kind == "U" else [v if isinstance(v, str) else str(v)
                                                                  for v in values.tolist()]
        arr = pa.array(items, type=pa.large_string())
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if pa.types.is_integer(arr.type):
        return _fnv_uint64(arr.to_numpy(zero_copy_only=False).astype(np.int64).view(np.uint64))
    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        arr = pc.cast(arr, pa.large_string())
    return _fnv_strings(arr)


def hash_ids(ids: np.ndarray | pa.Array, seed: int, salt: int) -> np.ndarray:
    """uint64 hash of each request id under ``seed`` and ``salt`` (the split, or the sample)."""
    key = np.uint64((int(seed) * 0x9E3779B97F4A7C15 + int(salt)) % (1 << 64))
    return mix(value_hashes(ids) ^ mix(np.array([key], dtype=np.uint64))[0])


def unit_interval(h: np.ndarray) -> np.ndarray:
    """uint64 hashes as floats uniform on [0, 1) (their top 53 bits)."""
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def row_hashes(logits: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each row's float32 logits (n, K, C): its bit pattern, word by word."""
    n = logits.shape[0]
    words = np.ascontiguousarray(logits, dtype=np.float32).reshape(n, -1).view(np.uint32)
    h = np.full(n, _FNV_OFFSET, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(words.shape[1]):
            h = (h ^ words[:, j].astype(np.uint64)) * _FNV_PRIME
    return mix(h)
