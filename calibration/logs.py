"""In-memory exit logs: the one structure every part of exitwise computes on.

Loaders (``exitwise.calibration.logfiles``) turn the file forms of the design contract into an :class:`ExitLogs`;
the synthetic generator (``exitwise.calibration.synthetic``) builds one directly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from exitwise.calibration.exceptions import CardError, InputError

MAX_VOCAB = 1 << 22  # 4 Mi tokens: larger than any vocabulary in use, small enough to map in memory


@dataclass(frozen=True)
class ExitSpec:
    """One exit of the model: its name and its cumulative cost (any unit)."""

    name: str
    cost: float


@dataclass(frozen=True)
class ModelCard:
    """What the logs describe: exits with cumulative costs, classes, column names."""

    model: str
    exits: tuple[ExitSpec, ...]
    classes: tuple[str, ...] | None = None
    label_column: str = "label"
    id_column: str = "request_id"
    segment_columns: tuple[str, ...] = ()
    version: str | None = None
    vocab_size: int | None = None  # set: token-level logs of a language model (top-k per exit)
    group_column: str | None = None  # rows sharing its value are dependent (a sequence, a user)
    position_column: str = "position"  # token position in its sequence (token logs)

    def __post_init__(self) -> None:
        if not self.model:
            raise CardError("model card: 'model' must be a non-empty name")
        if len(self.exits) < 2:
            raise CardError(f"model card: needs at least 2 exits, found {len(self.exits)}")
        costs = [e.cost for e in self.exits]
        for k, c in enumerate(costs):
            if not np.isfinite(c) or c <= 0:
                raise CardError(f"model card: exit {k} ({self.exits[k].name!r}) cost {c!r} must be finite and > 0")
        for k in range(1, len(costs)):
            if costs[k] <= costs[k - 1]:
                raise CardError(
                    "model card: costs must strictly increase (they are cumulative); "
                    f"exit {k} ({self.exits[k].name!r}) cost {costs[k]!r} <= exit {k - 1} cost {costs[k - 1]!r}"
                )
        names = [e.name for e in self.exits]
        if len(set(names)) != len(names):
            raise CardError(f"model card: exit names must be unique, got {names}")
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            raise CardError("model card: class names must be unique")
        if self.vocab_size is not None:
            if isinstance(self.vocab_size, bool) or not isinstance(self.vocab_size, int) or not (
                    2 <= self.vocab_size <= MAX_VOCAB):
                raise CardError(f"model card: 'vocab_size' must be an integer in 2..{MAX_VOCAB}, "
                                f"got {self.vocab_size!r}")
            if self.classes is not None:
                raise CardError("model card: give 'classes' (a classifier) or 'vocab_size' (a language model), "
                                "not both")

    @property
    def token_level(self) -> bool:
        """Whether the card describes token-level logs of a language model (top-k per exit)."""
        return self.vocab_size is not None

    @property
    def n_exits(self) -> int:
        return len(self.exits)

    @property
    def costs(self) -> np.ndarray:
        """Cumulative costs as a float64 array of shape (K,)."""
        return np.array([e.cost for e in self.exits], dtype=np.float64)

    def class_names(self, n_classes: int) -> tuple[str, ...]:
        """Class names, defaulting to the indices as strings."""
        if self.classes is None:
            return tuple(str(i) for i in range(n_classes))
        return self.classes


@dataclass(frozen=True, eq=False)
class SegmentColumn:
    """A categorical column stored as int32 codes into ``levels`` (sorted, unique strings)."""

    codes: np.ndarray
    levels: tuple[str, ...]

    @classmethod
    def from_values(cls, values: Sequence[str] | np.ndarray) -> SegmentColumn:
        levels, codes = np.unique(np.asarray(values, dtype=str), return_inverse=True)
        return cls(codes=codes.astype(np.int32).ravel(), levels=tuple(str(v) for v in levels))

    def values(self) -> np.ndarray:
        """The decoded string values, shape (n,)."""
        return np.asarray(self.levels, dtype=object)[self.codes]

    def take(self, index: np.ndarray) -> SegmentColumn:
        return SegmentColumn(codes=self.codes[index], levels=self.levels)

    def compact(self) -> SegmentColumn:
        """The same column without the levels no sample uses (the sorted order is kept)."""
        used = np.bincount(self.codes, minlength=len(self.levels)) > 0
        if used.all():
            return self
        remap = (np.cumsum(used) - 1).astype(np.int32)
        return SegmentColumn(
            codes=remap[self.codes], levels=tuple(lv for lv, u in zip(self.levels, used, strict=True) if u)
        )


def check_row_arrays(source: str, n: int, arrays: Mapping[str, np.ndarray | None],
                     segments: Mapping[str, SegmentColumn]) -> None:
    """Every per-row array (None: absent) and segment column has one entry per row."""
    for name, arr in arrays.items():
        if arr is not None and arr.shape != (n,):
            raise InputError(f"{source}: {name} must have shape ({n},), got {arr.shape}")
    for name, col in segments.items():
        if col.codes.shape != (n,):
            raise InputError(f"{source}: segment column {name!r} has {col.codes.shape[0]} rows, expected {n}")


@dataclass(frozen=True, eq=False)
class ExitLogs:
    """Dense exit logs: ``logits`` (n, K, C) float32 with labels, segments and ids.

    ``labels`` are class indices (int64) or None when the logs are unlabelled.
    ``segments`` maps a segment column name to its :class:`SegmentColumn`.
    """

    logits: np.ndarray
    card: ModelCard
    labels: np.ndarray | None = None
    segments: dict[str, SegmentColumn] = field(default_factory=dict)
    request_ids: np.ndarray | None = None
    ts: np.ndarray | None = None
    source: str = "<memory>"

    def __post_init__(self) -> None:
        if self.logits.ndim != 3:
            raise InputError(f"{self.source}: logits must have shape (n, K, C), got {self.logits.shape}")
        n, k, c = self.logits.shape
        if k != self.card.n_exits:
            raise CardError(f"{self.source}: logs have {k} exits but the model card lists {self.card.n_exits}")
        if self.card.classes is not None and len(self.card.classes) != c:
            raise CardError(f"{self.source}: logs have {c} classes but the model card lists {len(self.card.classes)}")
        check_row_arrays(self.source, n, {"labels": self.labels}, self.segments)

    @property
    def n(self) -> int:
        return int(self.logits.shape[0])

    @property
    def n_exits(self) -> int:
        return int(self.logits.shape[1])

    @property
    def n_classes(self) -> int:
        return int(self.logits.shape[2])

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.card.class_names(self.n_classes)

    def take(self, index: np.ndarray) -> ExitLogs:
        """A subset of rows (a split), sharing the card."""
        return ExitLogs(
            logits=self.logits[index],
            card=self.card,
            labels=None if self.labels is None else self.labels[index],
            segments={k: v.take(index) for k, v in self.segments.items()},
            request_ids=None if self.request_ids is None else self.request_ids[index],
            ts=None if self.ts is None else self.ts[index],
            source=self.source,
        )

    def segment_values(self, keys: Sequence[str]) -> np.ndarray:
        """Composite segment value per sample for ``keys`` (joined with ``|``), dtype object."""
        for key in keys:
            if key not in self.segments:
                raise InputError(
                    f"{self.source}: unknown segment column {key!r}; available: {sorted(self.segments) or 'none'}"
                )
        if not keys:
            return np.full(self.n, "", dtype=object)
        parts = [self.segments[k].values() for k in keys]
        if len(parts) == 1:
            return parts[0]
        out = parts[0].astype(str)
        for p in parts[1:]:
            out = np.char.add(np.char.add(out, "|"), p.astype(str))
        return out.astype(object)
