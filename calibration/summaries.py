"""Summaries of exit logs for the policy document's ``data`` section: fingerprint, time window, segment counts."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

from exitwise.calibration.logs import ExitLogs
from exitwise.calibration.tokens import TokenLogs

__all__ = ["fingerprint", "segment_counts", "time_window"]


def fingerprint(logs: ExitLogs | TokenLogs) -> str:
    """``"sha256:<hex>"`` over logits bytes, labels, segments, request ids and ts.

    Deterministic and cheap (array bytes are hashed in place): equal logs give equal
    fingerprints whatever file form they were loaded from. Float32 logits are hashed, so
    logs saved as float16 fingerprint differently from their float32 source.
    """
    h = hashlib.sha256()
    if isinstance(logs, TokenLogs):
        return _token_fingerprint(logs, h)
    header = {
        "shape": list(logs.logits.shape),
        "labels": logs.labels is not None,
        "segments": sorted(logs.segments),
        "ids": None if logs.request_ids is None else ("int" if logs.request_ids.dtype.kind in "iu" else "str"),
        "ts": logs.ts is not None,
    }
    h.update(json.dumps(header, sort_keys=True).encode())
    n = logs.n
    step = max(1, (1 << 24) // max(1, logs.n_exits * logs.n_classes))
    for start in range(0, n, step):
        h.update(np.ascontiguousarray(logs.logits[start : start + step], dtype=np.float32))
    _hash_rows(h, logs)
    return "sha256:" + h.hexdigest()


def _token_fingerprint(logs: TokenLogs, h: Any) -> str:
    """The fingerprint of token-level logs: top-k values, ids and lse, groups, positions, the rest."""
    header = {"form": "tokens", "shape": list(logs.values.shape), "vocab_size": logs.vocab_size,
              "labels": logs.labels is not None, "segments": sorted(logs.segments),
              "groups": logs.groups is not None, "positions": logs.positions is not None,
              "ids": None if logs.request_ids is None else ("int" if logs.request_ids.dtype.kind in "iu" else "str"),
              "ts": logs.ts is not None}
    h.update(json.dumps(header, sort_keys=True).encode())
    step = max(1, (1 << 24) // max(1, logs.n_exits * logs.top_k))
    for start in range(0, logs.n, step):
        sl = slice(start, start + step)
        h.update(np.ascontiguousarray(logs.values[sl], dtype=np.float32))
        h.update(np.ascontiguousarray(logs.indices[sl], dtype=np.int32))
        h.update(np.ascontiguousarray(logs.lse[sl], dtype=np.float32))
    if logs.groups is not None:
        levels = logs.group_levels if logs.group_levels is not None else np.unique(logs.groups)
        values = np.asarray(levels)[logs.groups]
        if values.dtype.kind in "iu":
            h.update(np.ascontiguousarray(values, dtype=np.int64))
        else:
            h.update("\x1f".join(str(v) for v in values).encode())
    if logs.positions is not None:
        h.update(np.ascontiguousarray(logs.positions, dtype=np.int64))
    _hash_rows(h, logs)
    return "sha256:" + h.hexdigest()


def _hash_rows(h: Any, logs: ExitLogs | TokenLogs) -> None:
    """Labels, segments, request ids and timestamps (shared by both kinds of logs)."""
    n = logs.n
    if logs.labels is not None:
        h.update(np.ascontiguousarray(logs.labels, dtype=np.int64))
    for name in sorted(logs.segments):
        col = logs.segments[name].compact()
        h.update(json.dumps([name, list(col.levels)]).encode())
        h.update(np.ascontiguousarray(col.codes, dtype=np.int32))
    if logs.request_ids is not None:
        ids = logs.request_ids
        if ids.dtype.kind in "iu":
            h.update(np.ascontiguousarray(ids, dtype=np.int64))
        else:
            for start in range(0, n, 1 << 16):
                h.update("\x1f".join(str(v) for v in ids[start : start + (1 << 16)]).encode())
                h.update(b"\x1e")
    if logs.ts is not None:
        h.update(np.ascontiguousarray(logs.ts.astype("datetime64[us]").astype(np.int64)))


def time_window(logs: ExitLogs | TokenLogs) -> tuple[str, str] | None:
    """First and last ``ts`` as ISO-8601 UTC strings, or None without a time column."""
    if logs.ts is None or logs.ts.size == 0:
        return None
    lo, hi = logs.ts.min(), logs.ts.max()
    return (
        np.datetime_as_string(lo, unit="s") + "Z",
        np.datetime_as_string(hi, unit="s") + "Z",
    )


def segment_counts(logs: ExitLogs | TokenLogs) -> dict[str, dict[str, int]]:
    """Rows per value of every segment column: ``{column: {value: count}}``."""
    out: dict[str, dict[str, int]] = {}
    for name, col in logs.segments.items():
        counts = np.bincount(col.codes, minlength=len(col.levels))
        out[name] = {level: int(cnt) for level, cnt in zip(col.levels, counts, strict=True) if cnt}
    return out

