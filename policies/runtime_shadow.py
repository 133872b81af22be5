"""Shadow traffic of the runtime client: a bounded buffer and its uploader (numpy, httpx, standard library).

A request that ``policy.shadow()`` picked runs at full depth; the inference server hands every
exit's logits to :meth:`exitwise.policies.runtime.PolicyClient.record_shadow`, which puts them
in a :class:`ShadowUploader`: a bounded buffer that a background thread uploads to
``POST /v1/models/{model}/shadow?env=&version=`` as exit-log NPZ bodies (``logits``, ``ts``, and
``labels``, ``seg_<column>``, ``request_id`` when given: the format
``exitwise.calibration.logfiles.readers.load_logs`` reads), one upload per policy version.

Bounds: at most ``max_rows`` rows are held, waiting or being uploaded (a failing server is
retried without holding more); past it new rows are dropped and counted, never queued. One
upload at a time, at most ``batch_rows`` rows each. :meth:`ShadowUploader.record` validates
and copies outside the lock, then holds it only to append: it never waits on the network.
"""

from __future__ import annotations

import io
import logging
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote

import httpx
import numpy as np

from exitwise.policies.runtime_http import problem_detail, read_prefix

__all__ = [
    "DEFAULT_BATCH_ROWS",
    "DEFAULT_FLUSH_INTERVAL",
    "DEFAULT_MAX_ROWS",
    "NPZ_MEDIA_TYPE",
    "SHADOW_COUNTERS",
    "ShadowUploader",
]

log = logging.getLogger("exitwise.runtime")

DEFAULT_MAX_ROWS = 10_000
DEFAULT_BATCH_ROWS = 1_000
DEFAULT_FLUSH_INTERVAL = 30.0
NPZ_MEDIA_TYPE = "application/x-npz"
# recorded = uploaded + rejected + unauthorized + dropped_duplicate + dropped_at_close + pending
SHADOW_COUNTERS = ("recorded", "uploaded", "batches", "retries", "resized", "rejected", "unauthorized", "dropped_full",
                   "dropped_fallback", "dropped_invalid", "dropped_disabled", "dropped_duplicate", "dropped_at_close")

_Step = Literal["empty", "sent", "dropped", "retry", "resized"]
_GroupKey = tuple[int, bool, str | None, tuple[str, ...]]  # version, labels?, request-id kind, segment columns


@dataclass(eq=False)
class _Rows:
    """Rows of one ``record`` call (or a slice of them): owned arrays, all of length n."""

    seq: int
    logits: np.ndarray  # (n, K, C) float32
    labels: np.ndarray | None  # (n,) int64
    ids: np.ndarray | None  # (n,) int64 or str
    segments: tuple[tuple[str, np.ndarray], ...]  # (column, (n,) str), sorted by column
    ts: np.datetime64  # when they were recorded (UTC, microseconds)

    def __len__(self) -> int:
        return int(self.logits.shape[0])

    def key(self, version: int) -> _GroupKey:
        kind = None if self.ids is None else ("int" if self.ids.dtype.kind == "i" else "str")
        return version, self.labels is not None, kind, tuple(c for c, _ in self.segments)

    def part(self, rows: slice | np.ndarray) -> _Rows:
        return _Rows(self.seq, self.logits[rows], None if self.labels is None else self.labels[rows],
                     None if self.ids is None else self.ids[rows],
                     tuple((c, v[rows]) for c, v in self.segments), self.ts)


def _encode_npz(parts: Sequence[_Rows]) -> tuple[bytes, int]:
    """The exit-log NPZ of ``parts`` (same columns) and how many rows it holds.

    A request id seen twice keeps its first row (the reader refuses duplicates, which would
    lose the whole batch). Written with :func:`numpy.savez`, no object arrays.
    """
    first = parts[0]
    arrays: dict[str, np.ndarray] = {"logits": np.concatenate([p.logits for p in parts])}
    if first.labels is not None:
        arrays["labels"] = np.concatenate([p.labels for p in parts if p.labels is not None])
    for i, (column, _) in enumerate(first.segments):
        arrays[f"seg_{column}"] = np.concatenate([p.segments[i][1] for p in parts])
    if first.ids is not None:
        arrays["request_id"] = np.concatenate([p.ids for p in parts if p.ids is not None])
    arrays["ts"] = np.concatenate([np.full(len(p), p.ts, dtype="datetime64[us]") for p in parts])
    n = arrays["logits"].shape[0]
    if first.ids is not None:
        _, first_rows = np.unique(arrays["request_id"], return_index=True)
        if first_rows.size < n:
            keep = np.sort(first_rows)
            arrays = {name: values[keep] for name, values in arrays.items()}
            n = int(keep.size)
    buffer = io.BytesIO()
    np.savez(buffer, allow_pickle=False, **arrays)
    return buffer.getvalue(), n


def _column(values: Any, n: int, what: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.shape != (n,):
        raise ValueError(f"{what} must have one value per row, shape ({n},), got {arr.shape}")
    return arr


def _strings(values: Any, n: int, what: str) -> np.ndarray:
    """A (n,) unicode array of ``values`` (str, or int/bool written as text); None is refused."""
    arr = _column(values, n, what)
    if arr.dtype.kind == "O":
        bad = [v for v in arr.tolist() if not isinstance(v, str | int) or isinstance(v, bool)]
        if bad:
            raise ValueError(f"{what} must be strings (or integers), found {type(bad[0]).__name__} {bad[0]!r}")
    elif arr.dtype.kind not in "Uiub":
        raise ValueError(f"{what} must be strings, got dtype {arr.dtype}")
    return arr.astype(str)


def _checked(logits: Any, model: tuple[int | None, int | None], wanted: tuple[int, int] | None, labels: Any,
             request_ids: Any, segments: Mapping[str, Any] | None,
             ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, list[tuple[str, np.ndarray]]]:
    """``record``'s arguments checked: logits (n, K, C) (a view), labels, request ids, segment columns.

    ``model``: the configured (exits, classes), either None; ``wanted``: the (K, C) this call must have.
    """
    raw = np.asarray(logits)
    if raw.ndim == 2:
        raw = raw[np.newaxis]
    if raw.ndim != 3:
        raise ValueError(f"shadow logits must have shape (K, C) or (n, K, C), got {np.shape(logits)}")
    if raw.dtype.kind not in "fiu":
        raise ValueError(f"shadow logits must be numbers, got dtype {raw.dtype}")
    n, k, c = raw.shape
    for name, expected, got in (("exits", model[0], k), ("classes", model[1], c)):
        if expected is not None and got != expected:
            raise ValueError(f"shadow logits have {got} {name}, this model has {expected}")
    if wanted is not None and (k, c) != tuple(wanted):
        raise ValueError(f"shadow logits have {k} exits x {c} classes, expected {wanted[0]} x {wanted[1]}")
    if c < 2:
        raise ValueError(f"shadow logits need at least 2 classes, got {c}")
    label_arr = None
    if labels is not None:
        label_arr = _column(labels, n, "labels")
        if label_arr.dtype.kind not in "iu":
            raise ValueError(f"labels must be class indices (integers), got dtype {label_arr.dtype}")
        if n and (label_arr.min() < 0 or label_arr.max() >= c):
            raise ValueError(f"labels must be class indices in 0..{c - 1}, found {label_arr.min()}.."
                             f"{label_arr.max()}")
    id_arr = None
    if request_ids is not None:
        id_arr = _column(request_ids, n, "request_ids")
        id_arr = id_arr.astype(np.int64) if id_arr.dtype.kind in "iu" else _strings(id_arr, n, "request_ids")
    seg_cols: list[tuple[str, np.ndarray]] = []
    for column, values in sorted((segments or {}).items(), key=lambda item: str(item[0])):
        if not isinstance(column, str) or not column or "/" in column or not column.isprintable():
            raise ValueError(f"segment column names must be non-empty printable text without '/', got {column!r}")
        arr = _strings(values, n, f"segment {column!r}")
        if n and (np.char.find(arr, "|") >= 0).any():
            raise ValueError(f"segment {column!r} values must not contain '|' (it joins composite segments)")
        seg_cols.append((column, arr))
    return raw, label_arr, id_arr, seg_cols


class ShadowUploader:
    """A bounded buffer of full-depth exit logits and the thread that uploads it.

    ``upload=False``: :meth:`record` still validates, then drops and counts (``dropped_disabled``).
    ``n_exits`` / ``n_classes``: the model's shape; when None the first recorded batch fixes it.
    Transient failures (connect errors, timeouts, 408, 429, 5xx) are retried with exponential
    backoff from ``retry_initial`` to ``retry_max`` seconds (jittered, ``Retry-After`` honoured
    up to ``retry_max``); the rows stay held meanwhile. Any other answer but 2xx drops the batch:
    A 413 (body too large) sends the same rows again with half as many rows per request
    (``resized``; the smaller size stays). 401/403 count as ``unauthorized`` and log an ERROR,
    the rest (400, 404, 409, 415, 422, a 413 for one row, ...)
    as ``rejected`` with a WARNING; each once per (status, version) until an upload succeeds.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        env: str,
        token: str | None,
        *,
        upload: bool = True,
        timeout: float = 5.0,
        max_rows: int = DEFAULT_MAX_ROWS,
        batch_rows: int = DEFAULT_BATCH_ROWS,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
        n_exits: int | None = None,
        n_classes: int | None = None,
        retry_initial: float = 0.5,
        retry_max: float = 30.0,
    ) -> None:
        for name, value in (("max_rows", max_rows), ("batch_rows", batch_rows)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"shadow {name} must be a positive integer, got {value!r}")
        if batch_rows > max_rows:
            raise ValueError(f"shadow batch_rows ({batch_rows}) must not exceed max_rows ({max_rows}): "
                             "a full batch could never be held")
        for name, value in (("flush_interval", flush_interval), ("retry_initial", retry_initial),
                            ("timeout", timeout)):
            if not value > 0:
                raise ValueError(f"shadow {name} must be > 0 seconds, got {value!r}")
        if not retry_max >= retry_initial:
            raise ValueError(f"shadow retry_max ({retry_max!r}) must be >= retry_initial ({retry_initial!r})")
        self.where = f"{model}@{env}"
        self.max_rows, self.batch_rows, self.flush_interval = max_rows, batch_rows, float(flush_interval)
        self.body_rows = batch_rows  # rows per request: halved on 413 until the server takes them
        self.retry_initial, self.retry_max = float(retry_initial), float(retry_max)
        self._path, self._env, self._timeout = f"/v1/models/{quote(model, safe='')}/shadow", env, float(timeout)
        self._shape = None if n_exits is None or n_classes is None else (n_exits, n_classes)
        self._n_exits, self._n_classes = n_exits, n_classes
        self._http: httpx.Client | None = None
        if upload:
            headers = {"Accept": "application/json", "Accept-Encoding": "identity",
                       "User-Agent": "exitwise-runtime/1"}
            if token:
                headers["Authorization"] = f"Bearer {token}"
            self._http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)
        self._lock = threading.Lock()  # the buffer and the counters; never held across I/O
        self._wake = threading.Condition(self._lock)
        self._send_lock = threading.Lock()  # one upload at a time (the thread, or flush's caller)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._groups: dict[_GroupKey, deque[_Rows]] = {}
        self._seq = 0
        self._waiting = 0  # rows in _groups
        self._inflight = 0  # rows being uploaded (still held)
        self._inflight_seq = 0
        self._closed = False
        self._counts: Counter[str] = Counter(dict.fromkeys(SHADOW_COUNTERS, 0))
        self._streak = 0  # transient failures in a row (send-lock holder only)
        self._retry_after: float | None = None  # the last transient answer's Retry-After
        self._logged: set[tuple[int, int]] = set()  # (status, version) already logged
        self.last_error: str | None = None

    # ------------------------------------------------------------------ recording

    def record(
        self,
        logits: Any,
        *,
        version: int | None,
        segments: Mapping[str, Any] | None = None,
        labels: Any = None,
        request_ids: Any = None,
        shape: tuple[int, int] | None = None,
    ) -> int:
        """Keep the full-depth logits of one sample (K, C) or a batch (n, K, C); return the rows kept.

        ``version``: the policy version that served them (None: the fallback, rows dropped).
        ``segments``: {column: (n,) strings}; ``labels``: (n,) class indices; ``request_ids``:
        (n,) strings or integers; ``shape``: the (K, C) this call must have (the policy's).
        Raises ``ValueError`` for a caller's mistake (shapes, types, ``|`` in a segment value);
        never for a full buffer (rows dropped, ``dropped_full``). Rows with a non-finite logit
        are dropped (``dropped_invalid``): the service would refuse the whole batch.
        """
        if version is not None and (isinstance(version, bool) or not isinstance(version, int) or version < 1):
            raise ValueError(f"version must be a positive integer or None, got {version!r}")
        raw, label_arr, id_arr, seg_cols = _checked(logits, (self._n_exits, self._n_classes), shape or self._shape,
                                                    labels, request_ids, segments)
        n, k, c = raw.shape
        with self._lock:
            if version is None or self._http is None or self._closed:
                self._counts["dropped_fallback" if version is None else "dropped_disabled"] += n
                return 0
            room = self.max_rows - self._waiting - self._inflight
            self._counts["dropped_full"] += max(0, n - max(room, 0))
        if room <= 0:
            return 0
        cut = slice(0, min(n, room))  # copy only what can be held: the caller may reuse its buffers
        with np.errstate(over="ignore", invalid="ignore"):  # too large for float32: inf, dropped below
            values = np.array(raw[cut], dtype=np.float32)
        rows = _Rows(0, values, None if label_arr is None else label_arr[cut].astype(np.int64),
                     None if id_arr is None else np.array(id_arr[cut]),
                     tuple((col, np.array(v[cut])) for col, v in seg_cols), np.datetime64(time.time_ns() // 1000, "us"))
        finite = np.isfinite(values).all(axis=(1, 2))
        if not finite.all():
            rows = rows.part(np.flatnonzero(finite))
        with self._lock:
            self._counts["dropped_invalid"] += values.shape[0] - len(rows)
            if self._closed:
                self._counts["dropped_disabled"] += len(rows)
                return 0
            if self._shape is None:
                self._shape = (k, c)
            elif self._shape != (k, c):  # another thread fixed it meanwhile
                raise ValueError(f"shadow logits have {k} exits x {c} classes, expected "
                                 f"{self._shape[0]} x {self._shape[1]}")
            room = self.max_rows - self._waiting - self._inflight  # another thread may have filled it
            take = min(len(rows), room)
            self._counts["dropped_full"] += len(rows) - take
            if take <= 0:
                return 0
            if take < len(rows):
                rows = rows.part(slice(0, take))
            self._seq += 1
            rows.seq = self._seq
            self._groups.setdefault(rows.key(version), deque()).append(rows)
            self._waiting += take
            self._counts["recorded"] += take
            if self._waiting >= self.batch_rows:
                self._wake.notify()
        return take

    # ------------------------------------------------------------------ state

    @property
    def pending(self) -> int:
        """Rows held now: waiting, or being uploaded."""
        with self._lock:
            return self._waiting + self._inflight

    def counters(self) -> dict[str, int]:
        """Totals since construction (:data:`SHADOW_COUNTERS`) and ``pending``."""
        with self._lock:
            return {**self._counts, "pending": self._waiting + self._inflight}

    # ------------------------------------------------------------------ uploading

    def start(self) -> None:
        """Upload in a daemon thread: when ``batch_rows`` rows wait, and every ``flush_interval`` seconds."""
        if self._http is None or self._closed or (self._thread is not None and self._thread.is_alive()):
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"exitwise-shadow-{self.where}", daemon=True)
        self._thread.start()

    def flush(self, timeout: float = 10.0) -> bool:
        """Upload what was recorded before this call, in this thread; True when none of it is left.

        Rows the server refused for good count as done (they are dropped and counted). Transient
        failures are retried with backoff until ``timeout`` (each request's own timeout is cut to
        what is left); False when rows are still held then.
        """
        deadline = time.monotonic() + max(0.0, timeout)
        with self._lock:
            mark = self._seq
        while self._held_upto(mark):
            left = deadline - time.monotonic()
            if self._http is None or left <= 0 or not self._send_lock.acquire(timeout=left):
                return False
            try:
                step = self._send(mark, deadline)
            finally:
                self._send_lock.release()
            if step == "retry":
                time.sleep(max(0.0, min(self._delay(), deadline - time.monotonic())))
        return True

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop the thread (it finishes the request it is in: one HTTP timeout at most), then
        :meth:`flush` for at most ``timeout`` seconds; True when nothing was left."""
        self._stop.set()
        with self._wake:
            self._wake.notify_all()
        thread = self._thread
        if thread is not None:
            thread.join(self._timeout + 1.0)
            if thread.is_alive():
                log.warning("exitwise shadow %s: the upload thread did not stop within %.1f s", self.where,
                            self._timeout + 1.0)
            else:
                self._thread = None
        done = self.flush(timeout)
        if not done:
            log.warning("exitwise shadow %s: %d rows not uploaded at stop (last error: %s)", self.where,
                        self.pending, self.last_error)
        return done

    def close(self, timeout: float = 10.0) -> None:
        """:meth:`stop`, drop what is still held (``dropped_at_close``) and close the connections."""
        self.stop(timeout)
        with self._lock:
            self._closed = True
            self._counts["dropped_at_close"] += self._waiting
            self._groups.clear()
            self._waiting = 0
        if self._http is not None:
            self._http.close()

    def _run(self) -> None:
        due = time.monotonic() + self.flush_interval
        while True:
            with self._wake:
                while not self._stop.is_set() and self._waiting < self.batch_rows and time.monotonic() < due:
                    self._wake.wait(due - time.monotonic())
            if self._stop.is_set():
                return
            everything = time.monotonic() >= due
            if everything:
                due = time.monotonic() + self.flush_interval
            try:
                self._drain(everything)
            except Exception:  # the uploader must survive anything; rows stay bounded
                log.exception("exitwise shadow %s: upload failed", self.where)
                if self._stop.wait(self.retry_max):
                    return

    def _drain(self, everything: bool) -> None:
        """Upload while a full batch waits (``everything``: while anything waits), until stopped."""
        while not self._stop.is_set():
            with self._lock:
                waiting = self._waiting
            if waiting == 0 or (not everything and waiting < self.batch_rows):
                return
            with self._send_lock:
                step = self._send(None, None)
            if step == "retry" and self._stop.wait(self._delay()):
                return

    def _held_upto(self, mark: int) -> bool:
        """Whether a row recorded at or before sequence ``mark`` is still held."""
        with self._lock:
            if self._inflight and self._inflight_seq <= mark:
                return True
            return any(q[0].seq <= mark for q in self._groups.values())

    def _take(self, mark: int | None) -> tuple[_GroupKey, list[_Rows], int] | None:
        """The oldest rows of the group holding the oldest row, up to ``batch_rows`` (marked in flight)."""
        with self._lock:
            heads = [(q[0].seq, key) for key, q in self._groups.items()]
            if not heads:
                return None
            seq, key = min(heads)
            if mark is not None and seq > mark:
                return None
            queue, taken, n = self._groups[key], [], 0
            while queue and n < self.body_rows:
                rows = queue.popleft()
                room = self.body_rows - n
                if len(rows) > room:
                    queue.appendleft(rows.part(slice(room, None)))
                    rows = rows.part(slice(0, room))
                taken.append(rows)
                n += len(rows)
            if not queue:
                del self._groups[key]
            self._waiting -= n
            self._inflight, self._inflight_seq = n, seq
            return key, taken, n

    def _send(self, mark: int | None, deadline: float | None) -> _Step:
        """Upload one batch (the caller holds ``_send_lock``) and settle its rows."""
        batch = self._take(mark)
        if batch is None:
            return "empty"
        key, taken, n = batch
        try:
            body, kept = _encode_npz(taken)
            status, detail, retry_after = self._post(key[0], body, deadline)
        except BaseException:
            with self._lock:
                self._put_back(key, taken, n)
            raise
        if status == 413 and n > 1:  # too large for the server: the same rows again, in smaller requests
            with self._lock:
                self._put_back(key, taken, n)
                self.body_rows = max(1, n // 2)
                self._counts["resized"] += 1
            log.warning("exitwise shadow %s: the server refused %d rows as too large (HTTP 413: %s); sending at "
                        "most %d rows per request from now on", self.where, n, detail, self.body_rows)
            return "resized"
        transient = status is None or status in (408, 429) or status >= 500
        with self._lock:
            if transient:
                self._put_back(key, taken, n)
                self._counts["retries"] += 1
            else:
                self._inflight = 0
                if 200 <= status < 300:
                    self._counts["uploaded"] += kept
                    self._counts["dropped_duplicate"] += n - kept
                    self._counts["batches"] += 1
                else:
                    self._counts["unauthorized" if status in (401, 403) else "rejected"] += n
            pending = self._waiting + self._inflight
        if transient:
            self._streak += 1
            self._retry_after = retry_after
            self.last_error = f"HTTP {status}: {detail}" if status is not None else detail
            (log.warning if self._streak == 1 else log.debug)(
                "exitwise shadow %s: upload of %d rows (version %d) failed (%s); retrying, %d rows held",
                self.where, n, key[0], self.last_error, pending)
            return "retry"
        if 200 <= status < 300:
            if self._streak:
                log.info("exitwise shadow %s: uploads work again after %d failures", self.where, self._streak)
            self._streak, self.last_error = 0, None
            self._logged.clear()
            return "sent"
        self.last_error = f"HTTP {status}: {detail}"
        if (status, key[0]) not in self._logged:
            self._logged.add((status, key[0]))
            if status in (401, 403):
                log.error("exitwise shadow %s: the server %s refused the token (HTTP %d: %s); dropped %d rows of "
                          "version %d (uploading needs an author's token)", self.where, self._http_url(), status,
                          detail, n, key[0])
            else:
                log.warning("exitwise shadow %s: the server refused %d rows of version %d (HTTP %d: %s); dropped",
                            self.where, n, key[0], status, detail)
        return "dropped"

    def _put_back(self, key: _GroupKey, taken: list[_Rows], n: int) -> None:
        """Put rows that could not be uploaded back at the front of their group (under ``_lock``)."""
        self._groups.setdefault(key, deque()).extendleft(reversed(taken))
        self._waiting += n
        self._inflight = 0

    def _post(self, version: int, body: bytes, deadline: float | None) -> tuple[int | None, str, float | None]:
        """(status or None for a transport error, problem detail, Retry-After seconds)."""
        if self._http is None:
            return None, "uploading is off", None
        timeout: Any = httpx.USE_CLIENT_DEFAULT
        if deadline is not None:
            timeout = httpx.Timeout(max(0.01, min(self._timeout, deadline - time.monotonic())))
        try:
            with self._http.stream("POST", self._path, params={"env": self._env, "version": str(version)},
                                   content=body, headers={"Content-Type": NPZ_MEDIA_TYPE}, timeout=timeout) as resp:
                head = read_prefix(resp)
                after = resp.headers.get("retry-after", "").strip()
                return (resp.status_code, problem_detail(resp.headers, head, resp.reason_phrase),
                        float(after) if after.isdigit() else None)
        except httpx.HTTPError as exc:
            return None, f"{type(exc).__name__}: {exc}", None

    def _delay(self) -> float:
        """Backoff before the next try: initial * 2^(failures-1), capped, jittered to [50 %, 100 %]."""
        base = min(self.retry_max, self.retry_initial * 2.0 ** max(0, min(self._streak - 1, 30)))
        delay = base * random.uniform(0.5, 1.0)
        after = self._retry_after
        return delay if after is None else max(delay, min(after, self.retry_max))

    def _http_url(self) -> str:
        return "" if self._http is None else str(self._http.base_url)
