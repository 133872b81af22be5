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

__all__ = ["Reservoir", "Rows"]


@dataclass(frozen=True, eq=False)
class Rows:
    """Rows held in memory with their keys: the decoded columns of :class:`ExitLogs`, segments as values."""

    priority: np.ndarray  # uint64
    row_hash: np.ndarray  # uint64
    logits: np.ndarray  # (m, K, C) float32
    labels: np.ndarray | None
    ids: np.ndarray
    segments: dict[str, np.ndarray]  # column -> values (object, str)
    ts: np.ndarray | None

    @classmethod
    def of(cls, logs: ExitLogs, index: np.ndarray, priority: np.ndarray, row_hash: np.ndarray) -> Rows:
        assert logs.request_ids is not None
        return cls(priority=priority[index], row_hash=row_hash[index], logits=logs.logits[index],
                   labels=None if logs.labels is None else logs.labels[index], ids=logs.request_ids[index],
                   segments={k: v.values()[index] for k, v in logs.segments.items()},
                   ts=None if logs.ts is None else logs.ts[index])

    @property
    def n(self) -> int:
        return int(self.priority.size)

    def take(self, index: np.ndarray) -> Rows:
        return Rows(priority=self.priority[index], row_hash=self.row_hash[index], logits=self.logits[index],
                    labels=None if self.labels is None else self.labels[index], ids=self.ids[index],
                    segments={k: v[index] for k, v in self.segments.items()},
                    ts=None if self.ts is None else self.ts[index])

    @staticmethod
    def concat(parts: Sequence[Rows]) -> Rows:
        first = parts[0]
        if len(parts) == 1:
            return first
        ids = np.concatenate([p.ids for p in parts])
        return Rows(
            priority=np.concatenate([p.priority for p in parts]),
            row_hash=np.concatenate([p.row_hash for p in parts]),
            logits=np.concatenate([p.logits for p in parts]),
            labels=None if first.labels is None else np.concatenate([p.labels for p in parts]),  # type: ignore[misc]
            ids=ids,
            segments={k: np.concatenate([p.segments[k] for p in parts]) for k in first.segments},
            ts=None if first.ts is None else np.concatenate([p.ts for p in parts]),  # type: ignore[misc]
        )

    def order(self) -> np.ndarray:
        """Indices sorting the rows by key (priority, then row hash, then id)."""
        return np.lexsort((self.ids.astype(str), self.row_hash, self.priority))

    def to_logs(self, card: ModelCard, source: str) -> ExitLogs:
        """These rows, sorted by key, as ExitLogs."""
        rows = self.take(self.order())
        return ExitLogs(logits=rows.logits, card=card, labels=rows.labels,
                        segments={k: SegmentColumn.from_values(v.astype(str)) for k, v in rows.segments.items()},
                        request_ids=rows.ids, ts=rows.ts, source=source)


@dataclass(eq=False)
class Reservoir:
    """The rows with the ``k`` smallest keys seen so far (and any tied with the k-th)."""

    k: int
    whole_groups: bool = False  # rows of one group share a priority: keep or drop them together
    parts: list[Rows] = field(default_factory=list)
    held: int = 0
    bound: tuple[int, int] | None = None  # the k-th smallest key once k rows were seen

    def offer(self, logs: ExitLogs, index: np.ndarray, priority: np.ndarray, row_hash: np.ndarray) -> None:
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
        if rows.n > self.k:
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
