"""Test helper: a large-vocabulary (token-bucket) policy document made from a classification one.

:func:`vocabulary_doc` takes a document of the root conftest's ``make_doc`` and turns it into
the form ``exitwise solve`` writes for token-level logs (spec of issue 13): ``classes`` are the
B bucket names (the threshold columns), ``vocabulary`` carries the size, the top-k width and
the token-to-bucket map. The map comes from :func:`exitwise.calibration.buckets.frequency_buckets`
on a Zipf-distributed token stream over a shuffled vocabulary (frequent tokens are scattered
over the ids, as in a real BPE vocabulary), so its compressed size is a realistic one.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np

from exitwise.calibration.buckets import encode_bucket_map, frequency_buckets
from exitwise.policies.canonical import with_content_hash

QWEN_VOCAB = 151_936  # the vocabulary of the 150k example


def token_stream(vocab_size: int, n: int = 200_000, seed: int = 0) -> np.ndarray:
    """``n`` token ids drawn from a Zipf(1.1) law over a random permutation of the vocabulary."""
    rng = np.random.default_rng(seed)
    ranks = np.minimum(rng.zipf(1.1, size=n) - 1, vocab_size - 1)
    return rng.permutation(vocab_size)[ranks]


def bucket_map(vocab_size: int, shares: Sequence[float] = (0.5, 0.8, 0.95), seed: int = 0
               ) -> tuple[np.ndarray, tuple[str, ...], tuple[int, ...], list[float]]:
    """(map, names, tokens per bucket, share of the stream per bucket) of frequency buckets."""
    tokens = token_stream(vocab_size, seed=seed)
    bucket_of, names, sizes = frequency_buckets(tokens, vocab_size, shares)
    share = np.bincount(bucket_of[tokens], minlength=len(names)) / tokens.size
    return bucket_of, names, sizes, [round(float(s), 6) for s in share]


def vocabulary_doc(base: dict[str, Any], *, vocab_size: int = QWEN_VOCAB, top_k: int = 32, n_exits: int = 12,
                   shares: Sequence[float] = (0.5, 0.8, 0.95), seed: int = 0,
                   bucket_of: np.ndarray | None = None, with_share: bool = True) -> dict[str, Any]:
    """``base`` (a ``make_doc`` document) as a token-bucket policy with ``n_exits`` exits.

    Thresholds are kept per segment (default, ``studio``; ``phone`` forced to full depth), one
    column per bucket, falling with depth and rarer buckets stricter; the last bucket ("rest")
    is forced to full depth. ``bucket_of`` overrides the frequency map (then no ``share``).
    """
    doc = copy.deepcopy({k: v for k, v in base.items() if k != "content_hash"})
    if bucket_of is None:
        bucket_of, names, sizes, share = bucket_map(vocab_size, shares, seed)
    else:
        names = tuple(f"b{i}" for i in range(int(bucket_of.max()) + 1))
        sizes = tuple(int(x) for x in np.bincount(bucket_of, minlength=len(names)))
        share = None
    b = len(names)
    doc["exits"] = [{"name": f"layer{4 * (j + 1)}", "cost": float(j + 1),
                     "calibrator": {"type": "temperature", "temperature": round(1.0 + 0.05 * j, 3)}}
                    for j in range(n_exits)]

    def rows(base_tau: float) -> list[list[float | None]]:
        return [[round(min(1.0, base_tau - 0.02 * j + 0.01 * c), 6) if c < b - 1 else None for c in range(b)]
                for j in range(n_exits - 1)]

    doc["classes"] = list(names)
    doc["thresholds"] = {"default": rows(0.9), "studio": rows(0.85), "phone": None}
    doc["forced_full_depth"] = {"classes": [names[-1]], "segments": ["phone"]}
    buckets: dict[str, Any] = {"method": "frequency" if share is not None else "mapping", "tokens": list(sizes)}
    if with_share and share is not None:
        buckets["share"] = share
    doc["vocabulary"] = {"size": vocab_size, "top_k": top_k, "bucket_of": encode_bucket_map(bucket_of),
                         "buckets": buckets}
    rates = [round(0.5 / n_exits, 6)] * (n_exits - 1)
    doc["expected"] = {**doc["expected"], "exit_rate": [*rates, round(1.0 - sum(rates), 6)]}
    doc["model"] = {**doc["model"], "name": f"{doc['model']['name']}-lm"}
    return with_content_hash(doc)
