"""The choose rows spilled to local disk during the first pass, for the temperature passes.

On one machine the temperature passes (Newton steps over every choose row) would otherwise
read the whole dataset again for a tenth of its rows. During pass 1, :class:`Spill` appends
the logits (and labels) of the choose rows to two flat files in a private temporary directory;
:class:`SpillSource` replays them in batches from a memory map. The rows are the same
whatever their order, and the temperature statistics are order-free, so the result equals a
pass over the dataset. If the disk fills up, spilling stops and the passes read the dataset.
The directory is removed when the run ends, however it ends.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from exitwise.calibration.logs import ExitLogs, ModelCard
from exitwise.calibration.scale.dataset import DEFAULT_BATCH_ROWS, Chunk, RowSelector

__all__ = ["Spill", "SpillSource", "Tee"]


class Spill:
    """Append-only float32 logits and int64 labels of the selected rows, in a temporary directory."""

    def __init__(self, card: ModelCard, select: RowSelector, directory: str | None = None) -> None:
        self.card = card
        self.select = select
        self.dir = Path(tempfile.mkdtemp(prefix="exitwise-spill-", dir=directory))
        self.rows = 0
        self.shape: tuple[int, int] | None = None
        self.labelled: bool | None = None
        self.failed: str | None = None
        self._logits: BinaryIO | None = open(self.dir / "logits.f32", "wb")  # noqa: SIM115  (closed in finish)
        self._labels: BinaryIO | None = open(self.dir / "labels.i64", "wb")  # noqa: SIM115

    def write(self, chunk: Chunk) -> None:
        if self.failed is not None or self._logits is None or self._labels is None:
            return
        logs = chunk.logs
        assert logs.request_ids is not None
        index = np.flatnonzero(self.select(logs.request_ids))
        if not index.size:
            return
        self.shape = (logs.n_exits, logs.n_classes)
        self.labelled = logs.labels is not None
        try:
            self._logits.write(np.ascontiguousarray(logs.logits[index], dtype=np.float32).tobytes())
            if logs.labels is not None:
                self._labels.write(np.ascontiguousarray(logs.labels[index], dtype=np.int64).tobytes())
        except OSError as exc:  # a full disk: fall back to reading the dataset
            self.failed = f"spilling the choose rows failed ({exc.strerror or exc}); reading the dataset instead"
            self.close()
            return
        self.rows += int(index.size)

    def close(self) -> None:
        for f in (self._logits, self._labels):
            if f is not None:
                f.close()
        self._logits = self._labels = None

    def source(self, batch_rows: int = DEFAULT_BATCH_ROWS) -> SpillSource | None:
        """The spilled rows as a source (None when spilling failed or nothing was spilled)."""
        self.close()
        if self.failed is not None or self.shape is None or self.rows == 0:
            return None
        return SpillSource(self, batch_rows)

    def remove(self) -> None:
        self.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class SpillSource:
    """The spilled rows, replayed in batches (request ids are not kept: the rows are already selected)."""

    def __init__(self, spill: Spill, batch_rows: int) -> None:
        assert spill.shape is not None
        self._spill = spill
        self._batch = batch_rows
        k, c = spill.shape
        self._logits = np.memmap(spill.dir / "logits.f32", dtype=np.float32, mode="r", shape=(spill.rows, k, c))
        self._labels = (np.memmap(spill.dir / "labels.i64", dtype=np.int64, mode="r", shape=(spill.rows,))
                        if spill.labelled else None)

    @property
    def rows(self) -> int:
        return self._spill.rows

    @property
    def name(self) -> str:
        return str(self._spill.dir)

    @property
    def card(self) -> ModelCard:
        return self._spill.card

    def chunks(self, select: RowSelector | None = None) -> Iterator[Chunk]:
        """Every spilled row (``select`` must be None: the rows were selected when spilled)."""
        assert select is None, "spilled rows carry no request ids to select by"
        for start in range(0, self.rows, self._batch):
            stop = min(self.rows, start + self._batch)
            labels = None if self._labels is None else np.asarray(self._labels[start:stop])
            logs = ExitLogs(logits=np.asarray(self._logits[start:stop]), card=self.card, labels=labels,
                            source=self.name)
            yield Chunk(logs=logs, file=self.name, first_row=start, read=stop - start)

    def check_unchanged(self) -> None:
        return None


class Tee:
    """A reducer that also spills what it sees (pass 1 on one machine)."""

    def __init__(self, reducer: Any, spill: Spill) -> None:
        self.reducer = reducer
        self.spill = spill

    def update(self, chunk: Chunk) -> None:
        self.reducer.update(chunk)
        self.spill.write(chunk)
