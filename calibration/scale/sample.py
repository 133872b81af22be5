"""Bottom-k samples by hash: the rows of a stream with the smallest keys, whatever the order they came in.

A row's key is (priority, row hash): the priority is a hash of its request id and the seed,
the row hash one of its logits. A :class:`Reservoir` keeps every row whose key is at most the
k-th smallest key seen (ties at the boundary are all kept), so the kept set depends only on
the rows, not on batches, files or Spark partitions; two reservoirs merge into the
reservoir of the union. The final sample is sorted by key: a canonical order, so what is
fitted on it does not depend on the order the rows were read in either.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from exitwise.calibration.logs import ExitLogs, ModelCard, SegmentColumn
from exitwise.calibration.tokens import TokenLogs

__all__ = ["Reservoir", "Rows"]


_SEG = "segment:"  # prefix of a segment column's values among the arrays of Rows


@dataclass(frozen=True, eq=False)
class Rows:
    """Rows held in memory with their keys: every per-row array of their logs (classifier or
    token-level), segment columns and token groups as values, so rows of different batches concatenate."""

    priority: np.ndarray  # uint64
    row_hash: np.ndarray  # uint64
    arrays: dict[str, np.ndarray]

    @classmethod
    def of(cls, logs: ExitLogs | TokenLogs, index: np.ndarray, priority: np.ndarray, row_hash: np.ndarray) -> Rows:
        arrays: dict[str, np.ndarray | None]
        if isinstance(logs, TokenLogs):
            groups = None if logs.groups is None or logs.group_levels is None else logs.group_levels[logs.groups]
            arrays = {"values": logs.values, "indices": logs.indices, "lse": logs.lse, "groups": groups,
                      "positions": logs.positions}
        else:
            arrays = {"logits": logs.logits}
        arrays.update({"labels": logs.labels, "ids": logs.request_ids, "ts": logs.ts})
        arrays.update({_SEG + k: v.values() for k, v in logs.segments.items()})
        return cls(priority=priority[index], row_hash=row_hash[index],
                   arrays={k: v[index] for k, v in arrays.items() if v is not None})

    @property
    def n(self) -> int:
        return int(self.priority.size)

    def take(self, index: np.ndarray) -> Rows:
        return Rows(priority=self.priority[index], row_hash=self.row_hash[index],
                    arrays={k: v[index] for k, v in self.arrays.items()})

    @staticmethod
    def concat(parts: Sequence[Rows]) -> Rows:
        if len(parts) == 1:
            return parts[0]
        return Rows(priority=np.concatenate([p.priority for p in parts]),
                    row_hash=np.concatenate([p.row_hash for p in parts]),
                    arrays={k: np.concatenate([p.arrays[k] for p in parts]) for k in parts[0].arrays})

    def order(self) -> np.ndarray:
        """Indices sorting the rows by key (priority, then row hash, then id)."""
        ids = self.arrays.get("ids")
        keys = (self.row_hash, self.priority) if ids is None else (ids.astype(str), self.row_hash, self.priority)
        return np.lexsort(keys)

    def to_logs(self, card: ModelCard, source: str) -> ExitLogs | TokenLogs:
        """These rows, sorted by key, as the logs of ``card`` (ExitLogs, or TokenLogs for a vocabulary)."""
        a = self.take(self.order()).arrays
        segments = {k[len(_SEG):]: SegmentColumn.from_values(v.astype(str)) for k, v in a.items() if k.startswith(_SEG)}
        if card.token_level:
            groups = levels = None
            if "groups" in a:
                levels, groups = np.unique(a["groups"], return_inverse=True)
            return TokenLogs(values=a["values"], indices=a["indices"], lse=a["lse"], card=card,
                             groups=None if groups is None else groups.astype(np.int64).ravel(), group_levels=levels,
                             positions=a.get("positions"), labels=a.get("labels"), segments=segments,
                             request_ids=a.get("ids"), ts=a.get("ts"), source=source)
        return ExitLogs(logits=a["logits"], card=card, labels=a.get("labels"), segments=segments,
                        request_ids=a.get("ids"), ts=a.get("ts"), source=source)


@dataclass(eq=False)
class Reservoir:
    """The rows with the ``k`` smallest keys seen so far (and any tied with the k-th)."""

    k: int
    whole_groups: bool = False  # rows of one group share a priority: keep or drop them together
    parts: list[Rows] = field(default_factory=list)
    held: int = 0
    bound: tuple[int, int] | None = None  # the k-th smallest key once k rows were seen

    def offer(self, logs: ExitLogs | TokenLogs, index: np.ndarray, priority: np.ndarray, row_hash: np.ndarray
              ) -> None:
        """Add rows ``index`` of ``logs`` that can still be among the k smallest (the rest are never copied)."""
        if index.size == 0 or self.k <= 0:
            return
        if self.bound is not None:
            index = index[self._below(priority[index], row_hash[index])]
        if index.size:
            self._append(Rows.of(logs, index, priority, row_hash))

    def _below(self, priority: np.ndarray, row_hash: np.ndarray) -> np.ndarray:
        assert self.bound is not None
        p0, h0 = self.bound
        if self.whole_groups:
            return priority <= p0
        return (priority < p0) | ((priority == p0) & (row_hash <= h0))

    def beyond(self, priority: np.ndarray, row_hash: np.ndarray) -> np.ndarray:
        """Rows past this reservoir's bound (all False before it has one)."""
        if self.bound is None:
            return np.zeros(priority.shape, dtype=bool)
        return ~self._below(priority, row_hash)

    def add(self, rows: Rows) -> None:
        if rows.n == 0 or self.k <= 0:
            return
        if self.bound is not None:
            keep = self._below(rows.priority, rows.row_hash)
            if not keep.all():
                rows = rows.take(np.flatnonzero(keep))
            if rows.n == 0:
                return
        self._append(rows)

    def _append(self, rows: Rows) -> None:
        self.parts.append(rows)
        self.held += rows.n
        if self.held >= 2 * self.k + 1024:
            self.compact()

    def compact(self) -> None:
        """Drop every row past the k-th smallest key (ties kept)."""
        if not self.parts:
            return
        rows = Rows.concat(self.parts)
        if rows.n >= self.k:  # the bound is always the k-th smallest key held: the union's, whatever the merges
            order = np.lexsort((rows.row_hash, rows.priority))
            kth = order[self.k - 1]
            self.bound = (int(rows.priority[kth]), int(rows.row_hash[kth]))
            rows = rows.take(np.flatnonzero(self._below(rows.priority, rows.row_hash)))
        self.parts = [rows]
        self.held = rows.n

    def merge(self, other: Reservoir) -> None:
        for part in other.parts:
            self.add(part)
        self.compact()

    def rows(self) -> Rows | None:
        self.compact()
        return self.parts[0] if self.parts else None
