"""Running a pass on one machine, with progress: rows read, rows per second and the time left.

A runner takes a source, a reducer (:mod:`exitwise.calibration.scale.passes`) and an optional
row selector and returns the reducer with every batch folded in. :func:`run_local` reads the
batches in order in this process; the Spark runner (:mod:`exitwise.calibration.scale.spark`)
folds one reducer per partition on the executors and merges them on the driver. Both report
through a :class:`Meter`, and both check at the end of the pass that no file changed.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from exitwise.calibration.scale.dataset import Chunk, RowSelector, Source

__all__ = ["Meter", "ProgressFn", "Runner", "format_eta", "prefetch", "run_local"]

ProgressFn = Callable[[str, float], None]


class Runner(Protocol):
    def __call__(self, source: Source, reducer: Any, select: RowSelector | None, meter: Meter) -> Any: ...


def format_eta(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


@dataclass(eq=False)
class Meter:
    """Progress of one pass over ``total`` rows, as ``progress(message, fraction of the whole run)``.

    ``span`` is the (start, end) share of the whole run this pass covers; messages are
    throttled to one per ``every`` seconds.
    """

    label: str
    total: int
    progress: ProgressFn | None = None
    span: tuple[float, float] = (0.0, 1.0)
    every: float = 0.5
    done: int = 0
    started: float = field(default_factory=time.perf_counter)
    _last: float = 0.0

    def advance(self, rows: int) -> None:
        self.done += int(rows)
        now = time.perf_counter()
        if self.progress is None or (now - self._last < self.every and self.done < self.total):
            return
        self._last = now
        self.progress(self.message(now), self.fraction)

    @property
    def fraction(self) -> float:
        share = min(1.0, self.done / self.total) if self.total else 1.0
        return self.span[0] + (self.span[1] - self.span[0]) * share

    def message(self, now: float | None = None) -> str:
        elapsed = (now or time.perf_counter()) - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        left = "—" if eta == float("inf") else format_eta(eta)
        return f"{self.label}: {self.done:,}/{self.total:,} rows · {rate:,.0f} rows/s · ETA {left}"

    def finish(self) -> None:
        """The pass is over: report every row (the last batches may have had no selected row)."""
        self.advance(max(0, self.total - self.done))

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started


_DONE = object()


def prefetch(chunks: Iterator[Chunk], depth: int = 2) -> Iterator[Chunk]:
    """The batches of ``chunks``, read and decoded by a background thread up to ``depth`` ahead.

    Parquet decoding and numpy release the GIL, so reading the next batch overlaps with folding
    this one (two cores: close to twice the throughput of a pass). An error in the reader is
    raised here, in order; stopping early (an error or Ctrl-C in the consumer) stops the reader.
    """
    q: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for chunk in chunks:
                while not stop.is_set():
                    try:
                        q.put(chunk, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(_DONE)
        except BaseException as exc:  # handed to the consumer, which raises it
            q.put(exc)

    reader = threading.Thread(target=produce, name="exitwise-prefetch", daemon=True)
    reader.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while reader.is_alive():  # unblock a reader waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                reader.join(0.05)


def run_local(source: Source, reducer: Any, select: RowSelector | None, meter: Meter) -> Any:
    """Fold every batch of ``source`` (the selected rows) into ``reducer``, in this process
    (the next batch is read meanwhile: :func:`prefetch`)."""
    for chunk in prefetch(source.chunks(select)):
        reducer.update(chunk)
        meter.advance(chunk.read)
    source.check_unchanged()
    meter.finish()
    return reducer
