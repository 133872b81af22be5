"""Token buckets: the columns of a large-vocabulary policy's threshold table.

A policy with one threshold per class is fine for 10 classes and absurd for 150k tokens (a
2.4 MB document, a report of 32k rows, cells with no data). Token-level policies give every
token one of B buckets (B <= 255) and keep one threshold per (segment, exit, bucket). The map
from token id to bucket travels in the policy document, compactly:

    {"encoding": "zlib+base64:uint8", "data": "<base64 of zlib(uint8[V])>", "sha256": "<hex of uint8[V]>"}

Frequency buckets (:func:`frequency_buckets`) cut the tokens, most frequent first, where their
cumulative share of the traffic crosses the given shares: frequent tokens (punctuation,
indentation) are answered confidently by shallow layers, rare ones are not. A user-given
mapping (:func:`mapping_buckets`) serves any other grouping. Decoding uses the standard library
and numpy only (the runtime client decodes).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["ENCODING", "MAX_BUCKETS", "decode_bucket_map", "encode_bucket_map", "frequency_buckets",
           "mapping_buckets"]

ENCODING = "zlib+base64:uint8"
MAX_BUCKETS = 255
DEFAULT_SHARES = (0.5, 0.8, 0.95)
_MAX_ENCODED = 1 << 20  # characters of base64: ~750 KB, far above any real map (a 150k map is ~30 KB)


def encode_bucket_map(bucket_of: np.ndarray) -> dict[str, str]:
    """The document form of a (V,) map from token id to bucket index."""
    arr = np.ascontiguousarray(bucket_of, dtype=np.uint8)
    raw = arr.tobytes()
    return {"encoding": ENCODING, "data": base64.b64encode(zlib.compress(raw, 9)).decode("ascii"),
            "sha256": hashlib.sha256(raw).hexdigest()}


def decode_bucket_map(doc: Any, size: int, n_buckets: int) -> np.ndarray:
    """The (V,) intp map of a document's ``vocabulary.bucket_of``; ValueError naming what is wrong."""
    if not isinstance(doc, Mapping):
        raise ValueError("policy: vocabulary.bucket_of must be an object {encoding, data, sha256}")
    if doc.get("encoding") != ENCODING:
        raise ValueError(f"policy: vocabulary.bucket_of.encoding must be {ENCODING!r}, got {doc.get('encoding')!r}")
    data, digest = doc.get("data"), doc.get("sha256")
    if not isinstance(data, str) or not isinstance(digest, str):
        raise ValueError("policy: vocabulary.bucket_of needs string 'data' and 'sha256'")
    if len(data) > _MAX_ENCODED:
        raise ValueError(f"policy: vocabulary.bucket_of.data is {len(data)} characters, more than {_MAX_ENCODED}")
    try:
        packed = base64.b64decode(data.encode("ascii"), validate=True)
        dec = zlib.decompressobj()
        raw = dec.decompress(packed, size + 1)  # never inflate more than the vocabulary (zip bombs)
    except (binascii.Error, zlib.error, UnicodeEncodeError) as exc:
        raise ValueError(f"policy: vocabulary.bucket_of.data does not decode ({exc})") from None
    if len(raw) != size or dec.unconsumed_tail:
        raise ValueError(f"policy: vocabulary.bucket_of holds {len(raw)}{'+' if dec.unconsumed_tail else ''} "
                         f"entries, expected one per token ({size})")
    if hashlib.sha256(raw).hexdigest() != digest:
        raise ValueError("policy: vocabulary.bucket_of.sha256 does not match its data")
    arr = np.frombuffer(raw, dtype=np.uint8)
    top = int(arr.max()) if arr.size else 0
    if top >= n_buckets:
        raise ValueError(f"policy: vocabulary.bucket_of maps token {int(np.argmax(arr >= n_buckets))} to bucket "
                         f"{top}, but there are {n_buckets} buckets (classes)")
    return arr.astype(np.intp)


def frequency_buckets(tokens: np.ndarray, vocab_size: int, shares: Sequence[float] = DEFAULT_SHARES
                      ) -> tuple[np.ndarray, tuple[str, ...], tuple[int, ...]]:
    """Buckets by token frequency in ``tokens`` (the final exit's answers of the choose rows).

    Tokens sorted by count (descending, ties by id) go to bucket b while the traffic share of
    the tokens before them is below ``shares[b]``; the rest (and every unseen token) go to the
    last bucket. Returns the (V,) uint8 map, bucket names and tokens per bucket.
    """
    shares = tuple(float(s) for s in shares)
    if not shares or any(not 0.0 < s < 1.0 for s in shares) or list(shares) != sorted(set(shares)):
        raise ValueError(f"bucket shares must be increasing numbers in (0, 1), got {list(shares)}")
    if len(shares) + 1 > MAX_BUCKETS:
        raise ValueError(f"at most {MAX_BUCKETS} buckets")
    counts = np.bincount(np.asarray(tokens, dtype=np.int64), minlength=vocab_size)[:vocab_size]
    order = np.lexsort((np.arange(vocab_size), -counts))
    before = np.concatenate([[0], np.cumsum(counts[order])[:-1]]) / max(int(counts.sum()), 1)
    bucket_sorted = np.searchsorted(np.asarray(shares), before, side="right")
    bucket_sorted[counts[order] == 0] = len(shares)
    bucket_of = np.empty(vocab_size, dtype=np.uint8)
    bucket_of[order] = bucket_sorted.astype(np.uint8)
    names = (*(f"top{round(100 * s)}%" for s in shares), "rest")
    sizes = tuple(int(x) for x in np.bincount(bucket_of, minlength=len(names)))
    return bucket_of, names, sizes


def mapping_buckets(mapping: Mapping[str, Any], vocab_size: int, other: str = "other"
                    ) -> tuple[np.ndarray, tuple[str, ...], tuple[int, ...]]:
    """Buckets from a user mapping ``{bucket name: [token id or "a-b" id range, ...]}``.

    Tokens not listed go to a last bucket named ``other``; a token listed twice is an error.
    """
    if not isinstance(mapping, Mapping) or not mapping:
        raise ValueError("bucket mapping must be a non-empty object {bucket name: [token ids or 'a-b' ranges]}")
    if len(mapping) + 1 > MAX_BUCKETS:
        raise ValueError(f"bucket mapping has {len(mapping)} buckets; at most {MAX_BUCKETS - 1}")
    bucket_of = np.full(vocab_size, len(mapping), dtype=np.int64)
    seen = np.zeros(vocab_size, dtype=bool)
    names = []
    for b, (name, ids) in enumerate(mapping.items()):
        if not isinstance(name, str) or not name or name == other or "|" in name:
            raise ValueError(f"bucket name {name!r} must be a non-empty string without '|', not {other!r}")
        if not isinstance(ids, list):
            raise ValueError(f"bucket {name!r}: expected a list of token ids or 'a-b' ranges")
        for item in ids:
            lo, hi = _id_range(item, vocab_size, name)
            if seen[lo:hi + 1].any():
                dup = lo + int(np.argmax(seen[lo:hi + 1]))
                raise ValueError(f"bucket {name!r}: token {dup} is already in another bucket")
            seen[lo:hi + 1] = True
            bucket_of[lo:hi + 1] = b
        names.append(name)
    names.append(other)
    sizes = tuple(int(x) for x in np.bincount(bucket_of, minlength=len(names)))
    return bucket_of.astype(np.uint8), tuple(names), sizes


def _id_range(item: Any, vocab_size: int, name: str) -> tuple[int, int]:
    if isinstance(item, int) and not isinstance(item, bool):
        lo = hi = item
    elif isinstance(item, str) and item.count("-") == 1 and all(p.strip().isdigit() for p in item.split("-")):
        lo, hi = (int(p) for p in item.split("-"))
    else:
        raise ValueError(f"bucket {name!r}: {item!r} is not a token id or an 'a-b' range")
    if not 0 <= lo <= hi < vocab_size:
        raise ValueError(f"bucket {name!r}: {item!r} is outside the vocabulary 0..{vocab_size - 1}")
    return lo, hi
