"""Write exit logs in any file form (:func:`write_logs`), atomically; token logs go to :mod:`.token_writers`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from exitwise.calibration.atomic import atomic_path
from exitwise.calibration.exceptions import InputError
from exitwise.calibration.logfiles.forms import (
    EXIT_COLUMN,
    FORMS,
    LOGITS_COLUMN,
    SEGMENT_PREFIX,
    TOKEN_FORMS,
    TS_COLUMN,
    form_from_suffix,
)
from exitwise.calibration.logfiles.token_writers import write_token_logs
from exitwise.calibration.logs import ExitLogs
from exitwise.calibration.tokens import TokenLogs

__all__ = ["write_logs"]

_WRITE_CHUNK_ROWS = 1 << 17  # rows per Parquet row group / JSONL batch: bounds writer memory


def write_logs(
    logs: ExitLogs | TokenLogs,
    path: str | os.PathLike[str],
    *,
    form: str | None = None,
    dtype: Any = np.float32,
    label_names: bool = False,
    compression: str | None = None,
) -> Path:
    """Write ``logs`` in one of the forms of the design contract, atomically (temp file + ``os.replace``).

    ``form`` defaults from the extension (.parquet -> wide, .jsonl, .npz); ``dtype`` is
    float32 or float16 for the stored logits; ``label_names`` writes labels as class names
    instead of indices. Column names come from the logs' model card.

    ``compression`` (Parquet) defaults to zstd, and to lz4 for token logs: their float values
    barely compress and lz4 decodes them ~30 % faster (10^6 x 12 x top-32: 2.3 GB instead of 1.8 GB).

    :class:`TokenLogs` are written as "tokens" (.parquet) or "token_npz" (.npz), float32 values
    and lse, int32 ids: they read back exactly.
    """
    target = Path(path)
    if isinstance(logs, TokenLogs):
        form = form or form_from_suffix(target, tokens=True)
        if np.dtype(dtype) != np.float32 or label_names:
            raise InputError("token-level logs are stored as float32 values with integer token-id labels; "
                             "dtype and label_names do not apply")
        if form not in TOKEN_FORMS:
            raise InputError(f"token-level logs are written as one of {', '.join(TOKEN_FORMS)}, not {form!r}")
        return write_token_logs(logs, target, form, compression or "lz4")
    form = form or form_from_suffix(target)
    if form not in FORMS:
        raise InputError(f"unknown log form {form!r}; expected one of {', '.join(FORMS)}")
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.float32), np.dtype(np.float16)):
        raise InputError(f"dtype must be float32 or float16, got {dt}")
    if dt == np.float16:
        big = np.flatnonzero(np.abs(logs.logits).max(axis=(1, 2)) > np.finfo(np.float16).max)
        if big.size:
            raise InputError(
                f"cannot store logits as float16: sample {int(big[0])} has |logit| > {np.finfo(np.float16).max}"
            )
    with atomic_path(target) as tmp:
        if form == "npz":
            _write_npz(logs, tmp, dt, label_names)
        elif form == "jsonl":
            _write_jsonl(logs, tmp, dt, label_names)
        else:
            _write_parquet(logs, tmp, dt, label_names, long=form == "long", compression=compression or "zstd")
    return target


def _per_sample_arrays(logs: ExitLogs, rows: slice, label_names: bool) -> dict[str, pa.Array]:
    card = logs.card
    cols: dict[str, pa.Array] = {}
    if logs.request_ids is not None:
        ids = logs.request_ids[rows]
        cols[card.id_column] = pa.array(ids if ids.dtype.kind in "iu" else ids.astype(str))
    if logs.labels is not None:
        lab = logs.labels[rows]
        if label_names:
            cols[card.label_column] = pa.array(np.asarray(logs.class_names, dtype=object)[lab].astype(str))
        else:
            cols[card.label_column] = pa.array(lab.astype(np.int64))
    for name, seg in logs.segments.items():
        cols[name] = pa.DictionaryArray.from_arrays(
            pa.array(seg.codes[rows].astype(np.int32)), pa.array(list(seg.levels), type=pa.string())
        )
    if logs.ts is not None:
        cols[TS_COLUMN] = pa.array(logs.ts[rows].astype("datetime64[us]"))
    return cols


def _list_array(mat: np.ndarray, dt: np.dtype) -> pa.Array:
    """(m, C) -> list<float> with offsets 0, C, 2C, ... (one copy, into ``dt``)."""
    m, c = mat.shape
    values = pa.array(np.ascontiguousarray(mat, dtype=dt).ravel())
    if m * c < 2**31:
        return pa.ListArray.from_arrays(pa.array(np.arange(0, m * c + 1, c, dtype=np.int32)), values)
    return pa.LargeListArray.from_arrays(pa.array(np.arange(0, m * c + 1, c, dtype=np.int64)), values)


def _write_parquet(logs: ExitLogs, tmp: Path, dt: np.dtype, label_names: bool, *, long: bool, compression: str) -> None:
    n, k_total, _ = logs.logits.shape
    writer: pq.ParquetWriter | None = None
    step = max(1, _WRITE_CHUNK_ROWS // (k_total if long else 1))
    try:
        for start in range(0, n, step):
            rows = slice(start, min(n, start + step))
            m = rows.stop - rows.start
            per_sample = _per_sample_arrays(logs, rows, label_names)
            block = logs.logits[rows]
            if long:
                if logs.card.id_column not in per_sample:
                    per_sample[logs.card.id_column] = pa.array(np.arange(rows.start, rows.stop, dtype=np.int64))
                rep = pa.array(np.repeat(np.arange(m), k_total))
                cols = {name: arr.take(rep) for name, arr in per_sample.items()}
                cols[EXIT_COLUMN] = pa.array(np.tile(np.arange(k_total, dtype=np.int32), m))
                cols[LOGITS_COLUMN] = _list_array(block.reshape(m * k_total, -1), dt)
            else:
                cols = dict(per_sample)
                for k in range(k_total):
                    cols[f"exit_{k}"] = _list_array(block[:, k, :], dt)
            table = pa.table(cols)
            if writer is None:
                # Dictionary pages only for the repetitive per-sample columns: on float logits
                # they never pay off and cost ~2x on write and read.
                small = [nm for nm in per_sample if nm != logs.card.id_column]
                writer = pq.ParquetWriter(tmp, table.schema, compression=compression, use_dictionary=small)
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()


def _write_jsonl(logs: ExitLogs, tmp: Path, dt: np.dtype, label_names: bool) -> None:
    card = logs.card
    n, k_total, _ = logs.logits.shape
    names = np.asarray(logs.class_names, dtype=object)
    with tmp.open("w", encoding="utf-8") as fh:
        for start in range(0, n, _WRITE_CHUNK_ROWS // 8):
            stop = min(n, start + _WRITE_CHUNK_ROWS // 8)
            block = logs.logits[start:stop].astype(dt).astype(np.float64).tolist()
            seg_vals = {name: seg.values()[start:stop] for name, seg in logs.segments.items()}
            ts = None if logs.ts is None else np.datetime_as_string(logs.ts[start:stop].astype("datetime64[us]"))
            out = []
            for i in range(stop - start):
                rec: dict[str, Any] = {}
                if logs.request_ids is not None:
                    rid = logs.request_ids[start + i]
                    rec[card.id_column] = rid.item() if isinstance(rid, np.generic) else str(rid)
                if logs.labels is not None:
                    lab = int(logs.labels[start + i])
                    rec[card.label_column] = str(names[lab]) if label_names else lab
                for name, vals in seg_vals.items():
                    rec[name] = str(vals[i])
                if ts is not None:
                    rec[TS_COLUMN] = str(ts[i]) + "Z"
                for k in range(k_total):
                    rec[f"exit_{k}"] = block[i][k]
                out.append(json.dumps(rec, allow_nan=True))
            fh.write("\n".join(out) + "\n")


def _write_npz(logs: ExitLogs, tmp: Path, dt: np.dtype, label_names: bool) -> None:
    arrays: dict[str, np.ndarray] = {"logits": logs.logits.astype(dt, copy=False)}
    if logs.labels is not None:
        arrays["labels"] = (
            np.asarray(logs.class_names, dtype=str)[logs.labels] if label_names else logs.labels.astype(np.int64)
        )
    for name, seg in logs.segments.items():
        arrays[SEGMENT_PREFIX + name] = np.asarray(seg.levels, dtype=str)[seg.codes]
    if logs.request_ids is not None:
        ids = logs.request_ids
        arrays["request_id"] = ids.astype(np.int64) if ids.dtype.kind in "iu" else ids.astype(str)
    if logs.ts is not None:
        arrays[TS_COLUMN] = logs.ts.astype("datetime64[us]")
    with tmp.open("wb") as fh:
        np.savez(fh, **arrays)
