"""The token buckets of a language model's policy, chosen on the choose rows (or given by the user)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from exitwise.calibration.buckets import frequency_buckets, mapping_buckets
from exitwise.calibration.exceptions import InputError
from exitwise.calibration.tokens import TokenLogs

__all__ = ["Vocabulary", "choose_buckets"]


@dataclass(frozen=True, eq=False)
class Vocabulary:
    """The token buckets of a language model's policy: the threshold table's columns."""

    size: int
    top_k: int
    bucket_of: np.ndarray  # (V,) uint8
    names: tuple[str, ...]
    tokens: tuple[int, ...]  # tokens per bucket
    method: str  # "frequency" or "mapping"


def choose_buckets(logs: TokenLogs, rows: np.ndarray, shares: Sequence[float],
                   mapping: Mapping[str, Any] | None) -> Vocabulary:
    """Token buckets from the choose rows' final answers (their frequency), or the user's mapping."""
    try:
        if mapping is not None:
            bucket_of, names, sizes = mapping_buckets(mapping, logs.vocab_size)
            method = "mapping"
        else:
            finals = logs.indices[rows, -1, 0]
            bucket_of, names, sizes = frequency_buckets(finals, logs.vocab_size, shares)
            method = "frequency"
    except ValueError as exc:
        raise InputError(str(exc)) from None
    return Vocabulary(size=logs.vocab_size, top_k=logs.top_k, bucket_of=bucket_of, names=names, tokens=sizes,
                      method=method)
