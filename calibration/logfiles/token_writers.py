"""Write token-level logs in their two file forms ("tokens" Parquet, "token_npz"), atomically.

Values and lse are stored as float32 and ids as int32, so a file reads back exactly as written.
The Parquet form is written a row group at a time (bounded memory); list columns are built from
the (n, K, k) arrays with fixed offsets 0, k, 2k, ... (one copy, no Python loop per row).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from exitwise.calibration.atomic import atomic_path
from exitwise.calibration.exceptions import InputError
from exitwise.calibration.logfiles.forms import SEGMENT_PREFIX, TOKEN_ARRAYS, TOKEN_FORMS, TS_COLUMN, token_column
from exitwise.calibration.tokens import TokenLogs

__all__ = ["write_token_logs"]

_WRITE_CHUNK_ROWS = 1 << 16  # tokens per Parquet row group: 65536 x 12 x 32 x 8 B = 200 MB of top-k data


def write_token_logs(logs: TokenLogs, target: Path, form: str, compression: str = "lz4") -> Path:
    """Write ``logs`` as ``form`` ("tokens" or "token_npz") to ``target`` atomically; returns the path."""
    if form not in TOKEN_FORMS:
        raise InputError(f"token-level logs are written as one of {', '.join(TOKEN_FORMS)}, not {form!r}")
    card = logs.card
    if card.group_column is not None and logs.groups is None:
        raise InputError(
            f"cannot write token logs without groups: the model card names group column {card.group_column!r}"
        )
    if logs.positions is None:
        raise InputError(f"cannot write token logs without positions (column {card.position_column!r})")
    with atomic_path(target) as tmp:
        if form == "token_npz":
            _write_npz(logs, tmp)
        else:
            _write_parquet(logs, tmp, compression)
    return target


def _group_values(logs: TokenLogs, rows: slice) -> np.ndarray:
    """The group column's original values of ``rows`` (int64 or str)."""
    assert logs.groups is not None
    codes = logs.groups[rows]
    if logs.group_levels is None:
        return codes.astype(np.int64)
    values = np.asarray(logs.group_levels)[codes]
    return values.astype(np.int64) if values.dtype.kind in "iu" else values.astype(str)


def _ids(ids: np.ndarray) -> np.ndarray:
    return ids.astype(np.int64) if ids.dtype.kind in "iu" else ids.astype(str)


def _per_token(logs: TokenLogs, rows: slice) -> dict[str, pa.Array]:
    card = logs.card
    cols: dict[str, pa.Array] = {}
    if card.group_column is not None:
        cols[card.group_column] = pa.array(_group_values(logs, rows))
    assert logs.positions is not None
    cols[card.position_column] = pa.array(logs.positions[rows].astype(np.int64))
    if logs.labels is not None:
        cols[card.label_column] = pa.array(logs.labels[rows].astype(np.int64))
    if logs.request_ids is not None:
        cols[card.id_column] = pa.array(_ids(logs.request_ids[rows]))
    for name, seg in logs.segments.items():
        cols[name] = pa.DictionaryArray.from_arrays(
            pa.array(seg.codes[rows].astype(np.int32)), pa.array(list(seg.levels), type=pa.string())
        )
    if logs.ts is not None:
        cols[TS_COLUMN] = pa.array(logs.ts[rows].astype("datetime64[us]"))
    return cols


def _list_array(mat: np.ndarray, dtype: type[np.generic]) -> pa.Array:
    """(m, k) -> list<dtype> with offsets 0, k, 2k, ..."""
    m, k = mat.shape
    values = pa.array(np.ascontiguousarray(mat, dtype=dtype).ravel())
    if m * k < 2**31:
        return pa.ListArray.from_arrays(pa.array(np.arange(0, m * k + 1, k, dtype=np.int32)), values)
    return pa.LargeListArray.from_arrays(pa.array(np.arange(0, m * k + 1, k, dtype=np.int64)), values)


def _write_parquet(logs: TokenLogs, tmp: Path, compression: str) -> None:
    writer: pq.ParquetWriter | None = None
    try:
        for start in range(0, logs.n, _WRITE_CHUNK_ROWS):
            rows = slice(start, min(logs.n, start + _WRITE_CHUNK_ROWS))
            cols = _per_token(logs, rows)
            repetitive = [nm for nm in cols if nm not in (logs.card.position_column, TS_COLUMN)]
            for k in range(logs.n_exits):
                cols[token_column(k, "values")] = _list_array(logs.values[rows, k, :], np.float32)
                cols[token_column(k, "indices")] = _list_array(logs.indices[rows, k, :], np.int32)
                cols[token_column(k, "lse")] = pa.array(np.ascontiguousarray(logs.lse[rows, k], dtype=np.float32))
            table = pa.table(cols)
            if writer is None:
                # dictionary pages for the repetitive per-token columns only: on float values they never pay off
                writer = pq.ParquetWriter(tmp, table.schema, compression=compression, use_dictionary=repetitive)
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()


def _write_npz(logs: TokenLogs, tmp: Path) -> None:
    card = logs.card
    arrays: dict[str, np.ndarray] = dict(zip(TOKEN_ARRAYS, (
        logs.values.astype(np.float32, copy=False),
        logs.indices.astype(np.int32, copy=False),
        logs.lse.astype(np.float32, copy=False),
    ), strict=True))
    everything = slice(0, logs.n)
    if card.group_column is not None:
        arrays[card.group_column] = _group_values(logs, everything)
    assert logs.positions is not None
    arrays[card.position_column] = logs.positions.astype(np.int64, copy=False)
    if logs.labels is not None:
        arrays["labels"] = logs.labels.astype(np.int64, copy=False)
    for name, seg in logs.segments.items():
        arrays[SEGMENT_PREFIX + name] = np.asarray(seg.levels, dtype=str)[seg.codes]
    if logs.request_ids is not None:
        arrays["request_id"] = _ids(logs.request_ids)
    if logs.ts is not None:
        arrays[TS_COLUMN] = logs.ts.astype("datetime64[us]")
    with tmp.open("wb") as fh:
        np.savez(fh, **arrays)
