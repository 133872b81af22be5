"""Shadow-traffic exit logs as uploaded: the accepted formats, read against the policy they were served under.

A runtime uploads the full-depth exit logs of its shadow requests in one of the log formats of
the design contract (docs/formats.md), as the body of one request:

=================================================  ===========================================
media type                                         body
=================================================  ===========================================
``application/x-npz``                              NPZ: ``logits`` (n, K, C), optional ``labels``,
                                                   ``seg_<column>``, ``request_id``, ``ts``
``application/vnd.apache.parquet``                 wide (or long) Parquet
``application/x-ndjson``                           JSON Lines, one wide row per line
``application/json``                               a JSON array of wide rows
=================================================  ===========================================

There is no separate model card: the card is the policy's (exit names and costs, classes, the
policy's segment columns), so logs of another shape are refused with the reason. A ``model``
column (or NPZ array), when present, must name the policy's model in every row.
"""

from __future__ import annotations

import json
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from exitwise.calibration.exceptions import InputError, LogFormatError
from exitwise.calibration.logfiles.cards import card_from_dict
from exitwise.calibration.logfiles.readers import load_logs
from exitwise.calibration.logfiles.writers import write_logs
from exitwise.calibration.logs import ExitLogs, ModelCard, SegmentColumn
from exitwise.policies.errors import UnsupportedMediaType

__all__ = ["MEDIA_TYPES", "MODEL_COLUMN", "card_of", "concat_logs", "encode_npz", "media_kind", "media_type_of",
           "read_shadow_logs"]

MEDIA_TYPES: dict[str, str] = {
    "application/x-npz": "npz",
    "application/vnd.apache.parquet": "parquet",
    "application/x-parquet": "parquet",
    "application/x-ndjson": "jsonl",
    "application/jsonl": "jsonl",
    "application/json": "json",
}
_SUFFIX = {"npz": ".npz", "parquet": ".parquet", "jsonl": ".jsonl", "json": ".jsonl"}
MODEL_COLUMN = "model"


def card_of(document: Mapping[str, Any]) -> ModelCard:
    """The model card a policy document implies (its exits, classes and segment columns)."""
    return card_from_dict({
        "model": document["model"]["name"],
        "exits": [{"name": e["name"], "cost": e["cost"]} for e in document["exits"]],
        "classes": [str(c) for c in document["classes"]],
        "segment_columns": list(document.get("segment_keys") or []),
    }, source="the policy")


def media_kind(content_type: str | None) -> str:
    """The body format of a ``Content-Type`` (parameters ignored); 415 for anything else."""
    base = (content_type or "").split(";", 1)[0].strip().lower()
    if base not in MEDIA_TYPES:
        raise UnsupportedMediaType(f"shadow logs must be sent as one of {', '.join(MEDIA_TYPES)}; "
                                   f"got Content-Type {base or 'none'!r}")
    return MEDIA_TYPES[base]


def _json_rows_to_jsonl(body: bytes) -> bytes:
    try:
        rows = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LogFormatError(f"shadow logs: body is not valid JSON: {exc}") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise LogFormatError("shadow logs: a JSON body must be an array of row objects "
                             "(exit_0 … exit_{K-1} lists of logits, optional label and segment columns)")
    return "\n".join(json.dumps(r, allow_nan=False) for r in rows).encode()


def _model_values(path: Path, kind: str) -> np.ndarray | None:
    """The uploaded ``model`` column, if any (the reader ignores unknown columns)."""
    try:
        if kind == "npz":
            with path.open("rb") as fh, np.load(fh, allow_pickle=False) as npz:
                return np.asarray(npz[MODEL_COLUMN]).astype(str) if MODEL_COLUMN in npz.files else None
        if kind == "parquet":
            if MODEL_COLUMN not in pq.read_schema(path).names:
                return None
            return np.asarray(pq.read_table(path, columns=[MODEL_COLUMN]).column(0).to_pylist(), dtype=str)
        with path.open("rb") as fh:
            values = [json.loads(line).get(MODEL_COLUMN) for line in fh if line.strip()]
        return None if all(v is None for v in values) else np.asarray(values, dtype=str)
    except (OSError, ValueError, EOFError, KeyError, AttributeError, zipfile.BadZipFile, pa.ArrowException):
        return None  # the reader names what is wrong with the file


def read_shadow_logs(body: bytes, content_type: str | None, document: Mapping[str, Any], *,
                     max_rows: int) -> ExitLogs:
    """Read an uploaded body as exit logs of ``document``'s model; ``InputError`` (422) naming what is wrong."""
    kind = media_kind(content_type)
    if not body:
        raise LogFormatError("shadow logs: empty body (no rows)")
    if kind == "json":
        body = _json_rows_to_jsonl(body)
    card = card_of(document)
    with tempfile.TemporaryDirectory(prefix="exitwise-shadow-") as tmp:
        path = Path(tmp) / f"shadow{_SUFFIX[kind]}"
        path.write_bytes(body)
        models = _model_values(path, kind)
        try:
            logs = load_logs(path, card, form="jsonl" if kind in ("json", "jsonl") else None)
        except InputError as exc:  # name the upload, not the temporary file
            raise type(exc)(str(exc).replace(str(path), "shadow logs")) from None
    logs = replace(logs, source="shadow logs")
    if models is not None:
        bad = np.flatnonzero(models != card.model)
        if bad.size:
            raise InputError(f"shadow logs: row {int(bad[0])} is of model {str(models[bad[0]])!r}, "
                             f"this endpoint is for {card.model!r}")
    if logs.n > max_rows:
        raise InputError(f"shadow logs: {logs.n} rows in one upload; at most {max_rows} (send smaller batches)")
    return logs



def media_type_of(path: Path) -> str:
    """The media type to upload a log file as, from its extension (a ``.json`` array or JSON Lines)."""
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return "application/x-npz"
    if suffix in (".parquet", ".pq", ".parq"):
        return "application/vnd.apache.parquet"
    if suffix in (".jsonl", ".ndjson"):
        return "application/x-ndjson"
    if suffix == ".json":
        with path.open("rb") as fh:
            head = fh.read(64).lstrip()
        return "application/json" if head.startswith(b"[") else "application/x-ndjson"
    raise InputError(f"{path}: unknown log format (extension {suffix or 'none'!r}); "
                     "expected .parquet, .jsonl, .json or .npz")


def encode_npz(logs: ExitLogs) -> bytes:
    """``logs`` as an NPZ upload body (the project's own NPZ writer, so the reader takes it back)."""
    with tempfile.TemporaryDirectory(prefix="exitwise-shadow-") as tmp:
        path = write_logs(logs, Path(tmp) / "batch.npz")
        return path.read_bytes()


def concat_logs(parts: Sequence[ExitLogs], source: str) -> ExitLogs:
    """One :class:`ExitLogs` of several batches of the same model (ids and times kept when all have them)."""
    if not parts:
        raise InputError(f"{source}: no shadow rows")
    card = parts[0].card
    labels = None if any(p.labels is None for p in parts) else np.concatenate([p.labels for p in parts])  # type: ignore[misc]
    ids = None if any(p.request_ids is None for p in parts) else np.concatenate(
        [np.asarray(p.request_ids).astype(str) for p in parts])
    ts = None if any(p.ts is None for p in parts) else np.concatenate([p.ts for p in parts])  # type: ignore[misc]
    segments = {name: SegmentColumn.from_values(np.concatenate([p.segments[name].values() for p in parts]))
                for name in parts[0].segments if all(name in p.segments for p in parts)}
    return ExitLogs(logits=np.concatenate([p.logits for p in parts]), card=card, labels=labels, segments=segments,
                    request_ids=ids, ts=ts, source=source)
