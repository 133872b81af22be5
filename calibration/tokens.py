"""Token-level exit logs of a language model: the top-k of every exit, not the whole vocabulary.

One row is one generated token. Per exit it holds the k largest logits (``values``, sorted
descending) with their vocabulary ids (``indices``) and the log-sum-exp of the exit's *full*
vocabulary at temperature 1 (``lse``): the top-k probabilities are then exact, and the mass the
other V - k tokens share (the tail) is known. Rows of one sequence (``groups``) are dependent,
so splits and certification work on whole groups (:mod:`exitwise.calibration.groups`).

10^6 tokens x 12 exits x top-32 is 3.1 GB as float32 values + int32 ids: the dense (n, K, V)
logits of the same traffic at V = 32k would be 1.5 TB.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from exitwise.calibration.exceptions import CardError, InputError
from exitwise.calibration.logs import ModelCard, SegmentColumn, check_row_arrays

__all__ = ["TokenLogs"]


@dataclass(frozen=True, eq=False)
class TokenLogs:
    """Top-k exit logs: ``values`` (n, K, k) float32 sorted descending along the last axis,
    ``indices`` (n, K, k) int32 vocabulary ids, ``lse`` (n, K) float32 full-vocabulary
    log-sum-exp; ``groups`` (n,) int64 codes of the group (sequence) column, ``group_levels``
    their values; ``positions`` (n,) int64; ``labels`` (n,) int64 token ids or None.
    """

    values: np.ndarray
    indices: np.ndarray
    lse: np.ndarray
    card: ModelCard
    groups: np.ndarray | None = None
    group_levels: np.ndarray | None = None
    positions: np.ndarray | None = None
    labels: np.ndarray | None = None
    segments: dict[str, SegmentColumn] = field(default_factory=dict)
    request_ids: np.ndarray | None = None
    ts: np.ndarray | None = None
    source: str = "<memory>"

    def __post_init__(self) -> None:
        if self.card.vocab_size is None:
            raise CardError(f"{self.source}: token-level logs need a model card with 'vocab_size'")
        if self.values.ndim != 3 or self.indices.shape != self.values.shape:
            raise InputError(f"{self.source}: top-k values and indices must both have shape (n, K, k), "
                             f"got {self.values.shape} and {self.indices.shape}")
        n, k_exits, top = self.values.shape
        if k_exits != self.card.n_exits:
            raise CardError(f"{self.source}: logs have {k_exits} exits but the model card lists {self.card.n_exits}")
        if not 1 <= top <= self.card.vocab_size:
            raise InputError(f"{self.source}: top-k width {top} must be in 1..vocab_size ({self.card.vocab_size})")
        if self.lse.shape != (n, k_exits):
            raise InputError(f"{self.source}: lse must have shape ({n}, {k_exits}), got {self.lse.shape}")
        check_row_arrays(self.source, n, {"groups": self.groups, "positions": self.positions, "labels": self.labels},
                         self.segments)

    @property
    def n(self) -> int:
        return int(self.values.shape[0])

    @property
    def n_exits(self) -> int:
        return int(self.values.shape[1])

    @property
    def top_k(self) -> int:
        return int(self.values.shape[2])

    @property
    def n_classes(self) -> int:
        """The vocabulary size V (the model's classes are its tokens)."""
        return int(self.card.vocab_size or 0)

    @property
    def vocab_size(self) -> int:
        return self.n_classes

    @property
    def token_level(self) -> bool:
        return True

    @property
    def class_names(self) -> tuple[str, ...]:
        raise InputError(f"{self.source}: token-level logs name their classes by vocabulary id; "
                         "per-class options take token-frequency buckets instead")

    def take(self, index: np.ndarray) -> TokenLogs:
        """A subset of rows (a split), sharing the card and the group levels."""
        def sub(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[index]
        return TokenLogs(
            values=self.values[index], indices=self.indices[index], lse=self.lse[index], card=self.card,
            groups=sub(self.groups), group_levels=self.group_levels, positions=sub(self.positions),
            labels=sub(self.labels), segments={k: v.take(index) for k, v in self.segments.items()},
            request_ids=sub(self.request_ids), ts=sub(self.ts), source=self.source,
        )

    def segment_values(self, keys: Sequence[str]) -> np.ndarray:
        """Composite segment value per row for ``keys`` (joined with ``|``), dtype object."""
        for key in keys:
            if key not in self.segments:
                raise InputError(
                    f"{self.source}: unknown segment column {key!r}; available: {sorted(self.segments) or 'none'}")
        if not keys:
            return np.full(self.n, "", dtype=object)
        out = self.segments[keys[0]].values().astype(str)
        for key in keys[1:]:
            out = np.char.add(np.char.add(out, "|"), self.segments[key].values().astype(str))
        return out.astype(object)
