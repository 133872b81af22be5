"""Columns of exit logs, one at a time, to validated numpy arrays; errors name the file, row and column.

The readers (:mod:`.tables`, :mod:`.readers`) hand every column of every form to these
decoders: logits lists into a dense (n, K, C) float32 array, labels (indices or class names),
segment values, request ids and times. Each raises
:class:`~exitwise.calibration.exceptions.LogFormatError` at the first bad value with
:class:`Where` naming its row (index, line, request id).
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from exitwise.calibration.exceptions import InputError, LogFormatError
from exitwise.calibration.logfiles.forms import TS_COLUMN
from exitwise.calibration.logs import ExitLogs, ModelCard, SegmentColumn

__all__ = [
    "ColumnSource",
    "Where",
    "build_logs",
    "card_class_count",
    "check_finite",
    "column_array",
    "decode_ids",
    "decode_labels",
    "decode_segment",
    "decode_timestamps",
    "exit_namer",
    "fill_lists",
    "first_null",
    "is_list_type",
    "list_width",
]

_CHECK_CHUNK_ROWS = 1 << 16  # rows per finiteness check: bounds the temporary bool array


class ColumnSource(Protocol):
    """A table the readers take columns from: an Arrow table or a Parquet file read column by column."""

    column_names: list[str]
    num_rows: int

    def column(self, name: str) -> pa.ChunkedArray: ...


class Where:
    """Formats 'row i (request_id ...)' lazily: ids are only decoded for the error message."""

    def __init__(self, ids: pa.Array | np.ndarray | None, id_column: str, lines: np.ndarray | None = None,
                 first_row: int | None = 0):
        self.ids = ids
        self.id_column = id_column
        self.lines = lines
        self.first_row = first_row  # the file row of the table's row 0 (a batch); None: unknown (Spark)

    def __call__(self, row: int) -> str:
        parts = []
        if self.lines is not None:
            parts.append(f"line {int(self.lines[row])}")
        if self.ids is not None:
            value = self.ids[row]
            value = value.as_py() if isinstance(value, pa.Scalar) else value
            if isinstance(value, np.generic):
                value = value.item()
            parts.append(f"{self.id_column} {value!r}")
        if self.first_row is None and parts:  # rows of a file in an order that is not the file's
            return ", ".join(parts)
        return f"row {(self.first_row or 0) + row}" + (f" ({', '.join(parts)})" if parts else "")


def column_array(table: ColumnSource, name: str) -> pa.Array:
    """One column as a single array (dictionary columns decoded)."""
    col = table.column(name)
    arr = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    return arr


def first_null(arr: pa.Array) -> int:
    """Index of the first null of ``arr`` (which has one)."""
    return int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])


def list_width(col: pa.ChunkedArray, n_classes: int | None) -> int:
    """C: from the card, else the length of the first non-null list."""
    if n_classes is not None:
        return n_classes
    for arr in col.chunks:
        if len(arr) and is_list_type(arr.type):
            valid = pc.drop_null(pc.list_value_length(arr))
            if len(valid):
                return int(valid[0].as_py())
    return 0


def is_list_type(typ: pa.DataType) -> bool:
    """A list, large list or fixed-size list type."""
    return pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ)


def fill_lists(
    col: pa.ChunkedArray,
    name: str,
    out: np.ndarray,
    src: str,
    where: Where,
    *,
    card_classes: bool,
    rows_to: np.ndarray | None = None,
    offset: int = 0,
) -> None:
    """Copy a list<number> column into ``out`` (rows, C), chunk by chunk.

    Nulls and ragged lengths are found from the list offsets (``list_value_length``) without
    touching the values. ``rows_to`` scatters row i to ``out[rows_to[i]]`` (long form);
    ``offset`` is the file row of the column's first row (a row group read on its own).
    """
    typ = col.type
    c = out.shape[1]
    if not is_list_type(typ):
        raise LogFormatError(f"{src}: column {name!r} must hold a list of C logits per row, got type {typ}")
    vtype = typ.value_type
    if not (pa.types.is_floating(vtype) or pa.types.is_integer(vtype)):
        raise LogFormatError(f"{src}: column {name!r} holds lists of {vtype}; logits must be numbers")
    start = offset
    for arr in col.chunks:
        m = len(arr)
        if arr.null_count:
            row = start + first_null(arr)
            raise LogFormatError(
                f"{src}: {where(row)}: {name} is missing (null); every exit must be logged for every sample"
            )
        lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
        bad = np.flatnonzero(lengths != c)
        if bad.size:
            row = start + int(bad[0])
            why = "the model card lists that many classes" if card_classes else "the first row has that many"
            raise LogFormatError(
                f"{src}: {where(row)}: ragged logits: column {name!r} has {int(lengths[bad[0]])} values, "
                f"expected {c} ({why})"
            )
        values = pc.list_flatten(arr)
        if values.null_count:
            r, cls = divmod(first_null(values), c)
            raise LogFormatError(f"{src}: {where(start + r)}: column {name!r} has a null logit at class {cls}")
        block = values.to_numpy(zero_copy_only=False).reshape(m, c)
        if rows_to is None:
            out[start : start + m] = block
        else:
            out[rows_to[start : start + m]] = block
        start += m


def check_finite(
    logits: np.ndarray, src: str, locate: Callable[[int, int], str], exit_names: Callable[[int], str]
) -> None:
    """Raise at the first non-finite logit in (sample, exit, class) order; ``locate(i, k)`` names its row."""
    n = logits.shape[0]
    for start in range(0, n, _CHECK_CHUNK_ROWS):
        chunk = logits[start : start + _CHECK_CHUNK_ROWS]
        finite = np.isfinite(chunk)
        if finite.all():
            continue
        i, k, c = (int(v) for v in np.argwhere(~finite)[0])
        value = float(chunk[i, k, c])
        what = "NaN" if np.isnan(value) else ("+Inf" if value > 0 else "-Inf")
        raise LogFormatError(
            f"{src}: {locate(start + i, k)}: logit is {what} at exit {k} ({exit_names(k)}), class {c}; "
            "logits must be finite"
        )


def decode_labels(arr: pa.Array, column: str, card: ModelCard, n_classes: int, src: str, where: Where) -> np.ndarray:
    """Class indices (int64) from int indices or class names."""
    if arr.null_count:
        row = first_null(arr)
        raise LogFormatError(
            f"{src}: {where(row)}: label column {column!r} is null; label every row or leave the column out"
        )
    typ = arr.type
    names = card.class_names(n_classes)
    if pa.types.is_integer(typ):
        labels = arr.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    elif pa.types.is_floating(typ):
        raw = arr.to_numpy(zero_copy_only=False)
        bad = np.flatnonzero(~np.isfinite(raw) | (raw != np.round(raw)))
        if bad.size:
            row = int(bad[0])
            raise LogFormatError(
                f"{src}: {where(row)}: label {raw[row].item()!r} in column {column!r} is not a class index or name"
            )
        labels = raw.astype(np.int64)
    elif pa.types.is_string(typ) or pa.types.is_large_string(typ):
        index = pc.index_in(arr, value_set=pa.array(list(names), type=arr.type))
        if index.null_count:
            row = first_null(index)
            shown = list(names) if len(names) <= 20 else [*names[:20], "..."]
            raise LogFormatError(
                f"{src}: {where(row)}: unknown label {arr[row].as_py()!r} in column {column!r}; classes are {shown}"
            )
        return index.to_numpy(zero_copy_only=False).astype(np.int64)
    else:
        raise LogFormatError(
            f"{src}: label column {column!r} has type {typ}; expected class indices (int) or class names (string)"
        )
    bad = np.flatnonzero((labels < 0) | (labels >= n_classes))
    if bad.size:
        row = int(bad[0])
        raise LogFormatError(
            f"{src}: {where(row)}: unknown label {int(labels[row])} in column {column!r}; "
            f"class indices are 0..{n_classes - 1}"
        )
    return labels


def decode_segment(arr: pa.Array, column: str, src: str, where: Where) -> SegmentColumn:
    """A segment column as sorted levels + int32 codes (same encoding as SegmentColumn.from_values)."""
    if arr.null_count:
        row = first_null(arr)
        raise LogFormatError(f"{src}: {where(row)}: segment column {column!r} is null")
    typ = arr.type
    if pa.types.is_integer(typ) or pa.types.is_boolean(typ):
        arr = pc.cast(arr, pa.string())
    elif not (pa.types.is_string(typ) or pa.types.is_large_string(typ)):
        raise LogFormatError(f"{src}: segment column {column!r} has type {typ}; expected strings")
    encoded = pc.dictionary_encode(arr)
    levels = np.asarray(encoded.dictionary.to_pylist(), dtype=object)
    for level in levels:
        if "|" in level:
            row = int(np.flatnonzero(np.asarray(arr.to_pylist(), dtype=object) == level)[0])
            raise LogFormatError(
                f"{src}: {where(row)}: segment column {column!r} value {level!r} contains '|', "
                "which separates composite segment values"
            )
    order = sorted(range(len(levels)), key=lambda j: levels[j])
    rank = np.empty(len(levels), dtype=np.int32)
    rank[order] = np.arange(len(levels), dtype=np.int32)
    codes = rank[encoded.indices.to_numpy(zero_copy_only=False)]
    return SegmentColumn(codes=codes, levels=tuple(str(levels[j]) for j in order))


def decode_ids(arr: pa.Array, column: str, src: str, where: Where) -> np.ndarray:
    """Request ids as int64 or object (str) array; nulls and duplicates are errors."""
    if arr.null_count:
        row = first_null(arr)
        raise LogFormatError(f"{src}: row {row}: request id column {column!r} is null")
    typ = arr.type
    if pa.types.is_integer(typ):
        ids = arr.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    elif pa.types.is_string(typ) or pa.types.is_large_string(typ):
        ids = arr.to_numpy(zero_copy_only=False).astype(object, copy=False)
    else:
        raise LogFormatError(f"{src}: request id column {column!r} has type {typ}; expected strings or integers")
    if pc.count_distinct(arr).as_py() != len(arr):
        _, inverse, counts = np.unique(
            ids.astype(str) if ids.dtype == object else ids, return_inverse=True, return_counts=True
        )
        dup_rows = np.flatnonzero(counts[inverse] > 1)
        row = int(dup_rows[0])
        other = int(dup_rows[np.flatnonzero(inverse[dup_rows] == inverse[row])[1]])
        raise LogFormatError(
            f"{src}: duplicate request id {_py(ids[row])!r} in column {column!r} at rows {row} and {other}; "
            "each sample must appear once"
        )
    return ids


def _py(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def decode_timestamps(arr: pa.Array, src: str, where: Where) -> np.ndarray:
    """``ts`` as datetime64[us] (UTC): timestamps, dates, ISO-8601 strings or unix seconds."""
    if arr.null_count:
        row = first_null(arr)
        raise LogFormatError(f"{src}: {where(row)}: column {TS_COLUMN!r} is null")
    typ = arr.type
    if pa.types.is_timestamp(typ):
        if typ.tz is not None:
            arr = arr.cast(pa.timestamp(typ.unit, tz="UTC")).cast(pa.timestamp(typ.unit))
        return arr.to_numpy(zero_copy_only=False).astype("datetime64[us]")
    if pa.types.is_date(typ):
        return arr.cast(pa.timestamp("us")).to_numpy(zero_copy_only=False).astype("datetime64[us]")
    if pa.types.is_integer(typ) or pa.types.is_floating(typ):
        secs = arr.to_numpy(zero_copy_only=False).astype(np.float64)
        bad = np.flatnonzero(~np.isfinite(secs))
        if bad.size:
            raise LogFormatError(f"{src}: {where(int(bad[0]))}: column {TS_COLUMN!r} is not a finite time")
        return np.round(secs * 1e6).astype("int64").astype("datetime64[us]")
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        # lazy: pandas costs 0.26 s of imports (python -X importtime, min of 11) and only ISO-8601
        # time strings need it; logs without a time column, or with native timestamps, never load it here
        import pandas as pd

        text = pd.Series(arr.to_numpy(zero_copy_only=False))
        parsed = pd.to_datetime(text, utc=True, format="ISO8601", errors="coerce")
        bad = np.flatnonzero(parsed.isna().to_numpy())
        if bad.size:
            row = int(bad[0])
            raise LogFormatError(
                f"{src}: {where(row)}: column {TS_COLUMN!r} value {arr[row].as_py()!r} is not an ISO-8601 time"
            )
        return parsed.dt.tz_convert(None).to_numpy().astype("datetime64[us]")
    raise LogFormatError(f"{src}: column {TS_COLUMN!r} has type {typ}; expected a timestamp or ISO-8601 string")


def exit_namer(card: ModelCard) -> Callable[[int], str]:
    """Exit index -> the card's name for it (``exit_k`` past the card's exits)."""
    return lambda k: card.exits[k].name if k < card.n_exits else f"exit_{k}"


def card_class_count(card: ModelCard) -> int | None:
    """C from the card, or None when the card lists no classes (then the data tell)."""
    return None if card.classes is None else len(card.classes)


def build_logs(
    logits: np.ndarray,
    card: ModelCard,
    labels: np.ndarray | None,
    segments: dict[str, SegmentColumn],
    ids: np.ndarray | None,
    ts: np.ndarray | None,
    src: str,
) -> ExitLogs:
    try:
        return ExitLogs(
            logits=logits, card=card, labels=labels, segments=segments, request_ids=ids, ts=ts, source=src
        )
    except InputError as exc:
        raise LogFormatError(str(exc)) from None


def read_npz_arrays(p: Path, src: str) -> dict[str, np.ndarray]:
    """Every array of an NPZ file (no pickles), or LogFormatError naming the file."""
    try:
        with p.open("rb") as fh, np.load(fh, allow_pickle=False) as npz:  # own handle: closed even if corrupt
            return {name: npz[name] for name in npz.files}
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise LogFormatError(
                f"{src}: holds object (pickled) arrays, which are not loaded; store strings as unicode arrays"
            ) from None
        raise LogFormatError(f"{src}: cannot read NPZ file (corrupt or not NPZ): {exc}") from None
    except (zipfile.BadZipFile, OSError, EOFError, KeyError) as exc:
        raise LogFormatError(f"{src}: cannot read NPZ file (corrupt or not NPZ): {exc}") from None
