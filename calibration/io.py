"""Reading and writing exit logs and model cards (DESIGN.md, "Exit logs").

Four file forms hold the same data (n samples, K exits, C classes):

* **wide Parquet** / **JSON Lines**: one row per sample, ``request_id``, optional label,
  segment and ``ts`` columns, and ``exit_0`` ... ``exit_{K-1}``, each a list of C floats;
* **long Parquet**: one row per (sample, exit) with ``exit`` (int) and ``logits`` (list of C
  floats), the per-sample columns repeated on every row of the sample;
* **NPZ**: ``logits`` (n, K, C), optional ``labels`` (n,), ``seg_<name>`` (n,),
  ``request_id`` (n,) and ``ts`` (n,).

Every loader validates once, here at the boundary, and raises :class:`LogFormatError`
(or :class:`CardError` for the card) whose message names the file, the row (index and
request id) or column, and what is wrong. Nothing is dropped silently. Parquet is read
with vectorised pyarrow/numpy code (list lengths come from the offsets), so 10^6 x 12 x 10
logits load in seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from exitwise.calibration.atomic import atomic_path as _atomic_path
from exitwise.calibration.exceptions import CardError, InputError, LogFormatError
from exitwise.calibration.logs import ExitLogs, ExitSpec, ModelCard, SegmentColumn

__all__ = [
    "FORMS",
    "TS_COLUMN",
    "card_from_dict",
    "card_to_dict",
    "detect_form",
    "fingerprint",
    "load_card",
    "load_logs",
    "segment_counts",
    "time_window",
    "write_card",
    "write_logs",
]

FORMS = ("wide", "long", "jsonl", "npz")
TS_COLUMN = "ts"
EXIT_COLUMN = "exit"
LOGITS_COLUMN = "logits"
SEGMENT_PREFIX = "seg_"
_EXIT_RE = re.compile(r"exit_(\d+)")
_PARQUET_SUFFIXES = (".parquet", ".pq", ".parq")
_JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
_CARD_FIELDS = (
    "model",
    "version",
    "exits",
    "classes",
    "label_column",
    "id_column",
    "segment_columns",
    "description",
    "metadata",
)
_READ_VALUES = 1 << 19  # rows x exit columns decoded per Parquet read: bounds Arrow's buffers
_WRITE_CHUNK_ROWS = 1 << 17  # rows per Parquet row group / JSONL batch: bounds writer memory
_CHECK_CHUNK_ROWS = 1 << 16  # rows per finiteness check: bounds the temporary bool array


# --------------------------------------------------------------------------- model card


def load_card(path: str | os.PathLike[str]) -> ModelCard:
    """Read a JSON or YAML model card; :class:`CardError` names the file and the field."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CardError(f"{p}: model card not found") from None
    except IsADirectoryError:
        raise CardError(f"{p}: is a directory, expected a model card file (JSON or YAML)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CardError(f"{p}: cannot read model card: {exc}") from exc
    if not text.strip():
        raise CardError(f"{p}: model card is empty")
    suffix = p.suffix.lower()
    if suffix == ".json":
        data = _parse_json_card(text, p)
    elif suffix in (".yaml", ".yml"):
        data = _parse_yaml_card(text, p)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = _parse_yaml_card(text, p)
    return card_from_dict(data, source=str(p))


def _parse_json_card(text: str, p: Path) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CardError(f"{p}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None


def _parse_yaml_card(text: str, p: Path) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise CardError(f"{p}: invalid YAML{where}: {problem}") from None


def card_from_dict(data: Any, *, source: str = "<card>") -> ModelCard:
    """Build a :class:`ModelCard` from a parsed card, naming the field that is wrong."""
    if not isinstance(data, Mapping):
        raise CardError(f"{source}: a model card must be a mapping (JSON object), got {type(data).__name__}")
    unknown = [key for key in data if key not in _CARD_FIELDS]
    if unknown:
        raise CardError(f"{source}: unknown field {unknown[0]!r}; expected fields: {', '.join(_CARD_FIELDS)}")
    model, version = _card_model(data, source)
    exits = _card_exits(data, source)
    classes = None
    if data.get("classes") is not None:
        raw = data["classes"]
        if not isinstance(raw, list) or not raw:
            raise CardError(f"{source}: field 'classes' must be a non-empty list of class names")
        for j, name in enumerate(raw):
            if isinstance(name, bool) or not isinstance(name, str | int) or name == "":
                raise CardError(f"{source}: field 'classes[{j}]' must be a non-empty string, got {name!r}")
        classes = tuple(str(name) for name in raw)
    label_column = _card_name(data, "label_column", "label", source)
    id_column = _card_name(data, "id_column", "request_id", source)
    raw_segments = data.get("segment_columns")
    segment_columns: tuple[str, ...] = ()
    if raw_segments is not None:
        if not isinstance(raw_segments, list):
            raise CardError(f"{source}: field 'segment_columns' must be a list of column names, got {raw_segments!r}")
        for j, name in enumerate(raw_segments):
            if not isinstance(name, str) or not name:
                raise CardError(f"{source}: field 'segment_columns[{j}]' must be a non-empty string, got {name!r}")
        segment_columns = tuple(raw_segments)
        if len(set(segment_columns)) != len(segment_columns):
            raise CardError(f"{source}: field 'segment_columns' lists a column twice: {list(segment_columns)}")
    reserved = {label_column: "label_column", id_column: "id_column", TS_COLUMN: "the time column"}
    for name in segment_columns:
        if name in reserved or _EXIT_RE.fullmatch(name) or name in (EXIT_COLUMN, LOGITS_COLUMN):
            raise CardError(f"{source}: field 'segment_columns': {name!r} is already used as a non-segment column")
    if label_column == id_column:
        raise CardError(f"{source}: fields 'label_column' and 'id_column' are both {label_column!r}")
    try:
        return ModelCard(
            model=model,
            exits=exits,
            classes=classes,
            label_column=label_column,
            id_column=id_column,
            segment_columns=segment_columns,
            version=version,
        )
    except CardError as exc:
        raise CardError(f"{source}: {exc}") from None


def _card_model(data: Mapping[str, Any], source: str) -> tuple[str, str | None]:
    raw = data.get("model")
    version = data.get("version")
    if isinstance(raw, Mapping):
        version = raw.get("version", version)
        raw = raw.get("name")
    if not isinstance(raw, str) or not raw.strip():
        raise CardError(f"{source}: field 'model' must be a non-empty model name, got {raw!r}")
    if version is not None:
        if isinstance(version, bool) or not isinstance(version, str | int | float):
            raise CardError(f"{source}: field 'version' must be a string, got {version!r}")
        version = str(version)
    return raw, version


def _card_exits(data: Mapping[str, Any], source: str) -> tuple[ExitSpec, ...]:
    raw = data.get("exits")
    if not isinstance(raw, list) or not raw:
        raise CardError(f"{source}: field 'exits' must be a non-empty list of {{name, cost}} objects, got {raw!r}")
    exits = []
    for k, item in enumerate(raw):
        if not isinstance(item, Mapping):
            raise CardError(f"{source}: field 'exits[{k}]' must be an object with 'name' and 'cost', got {item!r}")
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise CardError(f"{source}: field 'exits[{k}].name' must be a non-empty string, got {name!r}")
        cost = item.get("cost")
        if isinstance(cost, bool) or not isinstance(cost, int | float):
            raise CardError(f"{source}: field 'exits[{k}].cost' must be a number (cumulative cost), got {cost!r}")
        if not np.isfinite(cost) or cost <= 0:
            raise CardError(f"{source}: field 'exits[{k}].cost' must be finite and > 0, got {cost!r}")
        exits.append(ExitSpec(name=name, cost=float(cost)))
    return tuple(exits)


def _card_name(data: Mapping[str, Any], field: str, default: str, source: str) -> str:
    value = data.get(field)
    if value is None:
        return default
    if not isinstance(value, str) or not value:
        raise CardError(f"{source}: field {field!r} must be a non-empty column name, got {value!r}")
    return value


def card_to_dict(card: ModelCard) -> dict[str, Any]:
    """The JSON form of a card (what :func:`load_card` reads)."""
    out: dict[str, Any] = {
        "model": card.model,
        "exits": [{"name": e.name, "cost": e.cost} for e in card.exits],
    }
    if card.version is not None:
        out["version"] = card.version
    if card.classes is not None:
        out["classes"] = list(card.classes)
    out["label_column"] = card.label_column
    out["id_column"] = card.id_column
    out["segment_columns"] = list(card.segment_columns)
    return out


def write_card(card: ModelCard, path: str | os.PathLike[str]) -> Path:
    """Write ``card`` as JSON (atomically)."""
    target = Path(path)
    with _atomic_path(target) as tmp:
        tmp.write_text(json.dumps(card_to_dict(card), indent=2) + "\n", encoding="utf-8")
    return target


# --------------------------------------------------------------------------- loading


def detect_form(path: str | os.PathLike[str]) -> str:
    """The log form of ``path`` ("wide", "long", "jsonl" or "npz") from its extension or contents."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in _PARQUET_SUFFIXES:
        return _parquet_form(p)
    if suffix in _JSONL_SUFFIXES:
        return "jsonl"
    if suffix == ".npz":
        return "npz"
    try:
        with p.open("rb") as fh:
            head = fh.read(64)
    except OSError as exc:
        raise LogFormatError(f"{p}: cannot read: {exc}") from exc
    if head.startswith(b"PAR1"):
        return _parquet_form(p)
    if head.startswith(b"PK\x03\x04"):
        return "npz"
    if head.lstrip().startswith(b"{"):
        return "jsonl"
    raise LogFormatError(
        f"{p}: unknown log format (extension {suffix or 'none'!r}, contents not recognised); "
        "expected wide/long Parquet (.parquet), JSON Lines (.jsonl) or NPZ (.npz)"
    )


def _parquet_form(p: Path) -> str:
    try:
        names = pq.read_schema(p).names
    except (pa.ArrowException, OSError) as exc:
        raise LogFormatError(f"{p}: cannot read Parquet file (corrupt or not Parquet): {exc}") from None
    return "long" if EXIT_COLUMN in names and LOGITS_COLUMN in names else "wide"


def load_logs(path: str | os.PathLike[str], card: ModelCard, *, form: str | None = None) -> ExitLogs:
    """Load exit logs in any form of DESIGN.md into dense float32 (n, K, C) :class:`ExitLogs`.

    ``form`` overrides detection from the extension/contents. Raises :class:`LogFormatError`
    naming the file, the row (index and request id) or column, and the cause.
    """
    p = Path(path)
    if not p.exists():
        raise LogFormatError(f"{p}: file not found")
    if p.is_dir():
        raise LogFormatError(f"{p}: is a directory, expected an exit-log file")
    if p.stat().st_size == 0:
        raise LogFormatError(f"{p}: empty file (no rows)")
    if form is None:
        form = detect_form(p)
    if form not in FORMS:
        raise LogFormatError(f"{p}: unknown log form {form!r}; expected one of {', '.join(FORMS)}")
    src = str(p)
    if form == "npz":
        return _load_npz(p, card, src)
    if form == "jsonl":
        return _load_jsonl(p, card, src)
    table = _read_parquet(p)
    if form == "long":
        return _from_long_table(table, card, src)
    return _from_wide_table(table, card, src)


def _read_parquet(p: Path) -> _ParquetColumns:
    try:
        return _ParquetColumns(pq.ParquetFile(p), p)
    except (pa.ArrowException, OSError) as exc:
        raise LogFormatError(f"{p}: cannot read Parquet file (corrupt or not Parquet): {exc}") from None


class _ParquetColumns:
    """A Parquet file read one column at a time, so peak memory is the output plus one column."""

    def __init__(self, pf: pq.ParquetFile, path: Path):
        self._pf = pf
        self._path = path
        self.column_names = pf.schema_arrow.names
        self.num_rows = pf.metadata.num_rows

    def column(self, name: str) -> pa.ChunkedArray:
        return self.columns([name])[0]

    def columns(self, names: list[str]) -> list[pa.ChunkedArray]:
        try:
            table = self._pf.read(columns=names)
        except (pa.ArrowException, OSError) as exc:
            raise LogFormatError(f"{self._path}: cannot read columns {names} (corrupt Parquet file): {exc}") from None
        return [table.column(i) for i in range(len(names))]

    def blocks(self, names: list[str]) -> Iterator[tuple[int, list[str], list[pa.ChunkedArray]]]:
        """(first row, names, columns) per row group and group of columns.

        Arrow decodes the columns of one read in parallel; reading a row group at a time
        keeps Arrow's decode buffers to a few tens of MB instead of whole columns.
        """
        meta = self._pf.metadata
        offset = 0
        for i in range(meta.num_row_groups):
            rows = meta.row_group(i).num_rows
            per_read = max(1, min(len(names), _READ_VALUES // max(1, rows)))
            for first in range(0, len(names), per_read):
                group = names[first : first + per_read]
                try:
                    table = self._pf.read_row_group(i, columns=group)
                except (pa.ArrowException, OSError) as exc:
                    raise LogFormatError(
                        f"{self._path}: cannot read row group {i} (rows {offset}..{offset + rows - 1}) "
                        f"of columns {group} (corrupt Parquet file): {exc}"
                    ) from None
                yield offset, group, [table.column(j) for j in range(len(group))]
            offset += rows


def _blocks(
    table: pa.Table | _ParquetColumns, names: list[str]
) -> Iterator[tuple[int, list[str], list[pa.ChunkedArray]]]:
    if isinstance(table, _ParquetColumns):
        yield from table.blocks(names)
    else:
        yield 0, names, [table.column(name) for name in names]


class _Where:
    """Formats 'row i (request_id ...)' lazily: ids are only decoded for the error message."""

    def __init__(self, ids: pa.Array | np.ndarray | None, id_column: str, lines: np.ndarray | None = None):
        self.ids = ids
        self.id_column = id_column
        self.lines = lines

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
        return f"row {row}" + (f" ({', '.join(parts)})" if parts else "")


def _column(table: pa.Table | _ParquetColumns, name: str) -> pa.Array:
    """One column as a single array (dictionary columns decoded)."""
    col = table.column(name)
    arr = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    return arr


def _first_null(arr: pa.Array) -> int:
    return int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])


def _list_width(col: pa.ChunkedArray, n_classes: int | None) -> int:
    """C: from the card, else the length of the first non-null list."""
    if n_classes is not None:
        return n_classes
    for arr in col.chunks:
        if len(arr) and _is_list(arr.type):
            valid = pc.drop_null(pc.list_value_length(arr))
            if len(valid):
                return int(valid[0].as_py())
    return 0


def _is_list(typ: pa.DataType) -> bool:
    return pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ)


def _fill_lists(
    col: pa.ChunkedArray,
    name: str,
    out: np.ndarray,
    src: str,
    where: _Where,
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
    if not _is_list(typ):
        raise LogFormatError(f"{src}: column {name!r} must hold a list of C logits per row, got type {typ}")
    vtype = typ.value_type
    if not (pa.types.is_floating(vtype) or pa.types.is_integer(vtype)):
        raise LogFormatError(f"{src}: column {name!r} holds lists of {vtype}; logits must be numbers")
    start = offset
    for arr in col.chunks:
        m = len(arr)
        if arr.null_count:
            row = start + _first_null(arr)
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
            r, cls = divmod(_first_null(values), c)
            raise LogFormatError(f"{src}: {where(start + r)}: column {name!r} has a null logit at class {cls}")
        block = values.to_numpy(zero_copy_only=False).reshape(m, c)
        if rows_to is None:
            out[start : start + m] = block
        else:
            out[rows_to[start : start + m]] = block
        start += m


def _check_finite(
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


def _labels(arr: pa.Array, column: str, card: ModelCard, n_classes: int, src: str, where: _Where) -> np.ndarray:
    """Class indices (int64) from int indices or class names."""
    if arr.null_count:
        row = _first_null(arr)
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
            row = _first_null(index)
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


def _segment(arr: pa.Array, column: str, src: str, where: _Where) -> SegmentColumn:
    """A segment column as sorted levels + int32 codes (same encoding as SegmentColumn.from_values)."""
    if arr.null_count:
        row = _first_null(arr)
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


def _ids(arr: pa.Array, column: str, src: str, where: _Where) -> np.ndarray:
    """Request ids as int64 or object (str) array; nulls and duplicates are errors."""
    if arr.null_count:
        row = _first_null(arr)
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


def _timestamps(arr: pa.Array, src: str, where: _Where) -> np.ndarray:
    """``ts`` as datetime64[us] (UTC): timestamps, dates, ISO-8601 strings or unix seconds."""
    if arr.null_count:
        row = _first_null(arr)
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


def _exit_name(card: ModelCard) -> Callable[[int], str]:
    return lambda k: card.exits[k].name if k < card.n_exits else f"exit_{k}"


def _n_classes(card: ModelCard) -> int | None:
    return None if card.classes is None else len(card.classes)


def _from_wide_table(
    table: pa.Table | _ParquetColumns, card: ModelCard, src: str, lines: np.ndarray | None = None
) -> ExitLogs:
    n = table.num_rows
    if n == 0:
        raise LogFormatError(f"{src}: empty file (no rows)")
    names = table.column_names
    k_card = card.n_exits
    found = sorted(int(m.group(1)) for c in names if (m := _EXIT_RE.fullmatch(c)))
    missing = [k for k in range(k_card) if f"exit_{k}" not in names]
    if missing:
        raise LogFormatError(
            f"{src}: missing exit column 'exit_{missing[0]}': the model card lists {k_card} exits "
            f"(exit_0 .. exit_{k_card - 1}); the file has {[f'exit_{k}' for k in found] or 'none'}"
        )
    extra = [k for k in found if k >= k_card]
    if extra:
        raise LogFormatError(
            f"{src}: column 'exit_{extra[0]}' has no exit in the model card: the file has {found[-1] + 1} exit "
            f"columns, the card lists {k_card} exits"
        )
    id_arr = _column(table, card.id_column) if card.id_column in names else None
    where = _Where(id_arr, card.id_column, lines)
    ids = None if id_arr is None else _ids(id_arr, card.id_column, src, where)
    logits: np.ndarray | None = None
    for offset, group, cols in _blocks(table, [f"exit_{k}" for k in range(k_card)]):
        for name, col in zip(group, cols, strict=True):
            if logits is None:
                n_classes = _list_width(col, _n_classes(card))
                if n_classes < 2:
                    raise LogFormatError(f"{src}: column {name!r}: logits need at least 2 classes, found {n_classes}")
                logits = np.empty((n, k_card, n_classes), dtype=np.float32)
            k = int(name[len("exit_") :])
            _fill_lists(
                col, name, logits[:, k, :], src, where, card_classes=card.classes is not None, offset=offset
            )
        del cols
    assert logits is not None  # k_card >= 2 (ModelCard)
    _check_finite(logits, src, lambda i, k: where(i), _exit_name(card))
    return _assemble(table, logits, ids, card, src, where)


def _assemble(
    table: pa.Table | _ParquetColumns,
    logits: np.ndarray,
    ids: np.ndarray | None,
    card: ModelCard,
    src: str,
    where: _Where,
) -> ExitLogs:
    """Per-sample columns (label, segments, ts) of a one-row-per-sample table, then the ExitLogs."""
    names = table.column_names
    n_classes = logits.shape[2]
    labels = None
    if card.label_column in names:
        labels = _labels(_column(table, card.label_column), card.label_column, card, n_classes, src, where)
    segments = {}
    for column in card.segment_columns:
        if column not in names:
            raise LogFormatError(
                f"{src}: missing segment column {column!r} (listed in the model card's segment_columns)"
            )
        segments[column] = _segment(_column(table, column), column, src, where)
    ts = _timestamps(_column(table, TS_COLUMN), src, where) if TS_COLUMN in names else None
    return _build(logits, card, labels, segments, ids, ts, src)


def _build(
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


def _from_long_table(table: pa.Table | _ParquetColumns, card: ModelCard, src: str) -> ExitLogs:
    rows = table.num_rows
    if rows == 0:
        raise LogFormatError(f"{src}: empty file (no rows)")
    names = table.column_names
    for required in (card.id_column, EXIT_COLUMN, LOGITS_COLUMN):
        if required not in names:
            raise LogFormatError(
                f"{src}: long-form logs need columns {card.id_column!r}, 'exit' and 'logits'; "
                f"missing column {required!r}"
            )
    id_arr = _column(table, card.id_column)
    where = _Where(id_arr, card.id_column)
    if id_arr.null_count:
        raise LogFormatError(f"{src}: row {_first_null(id_arr)}: request id column {card.id_column!r} is null")
    exit_arr = _column(table, EXIT_COLUMN)
    k_card = card.n_exits
    if not pa.types.is_integer(exit_arr.type):
        raise LogFormatError(f"{src}: column 'exit' has type {exit_arr.type}; expected exit indices 0..{k_card - 1}")
    if exit_arr.null_count:
        raise LogFormatError(f"{src}: {where(_first_null(exit_arr))}: column 'exit' is null")
    exit_idx = exit_arr.to_numpy(zero_copy_only=False).astype(np.int64)
    bad = np.flatnonzero((exit_idx < 0) | (exit_idx >= k_card))
    if bad.size:
        row = int(bad[0])
        raise LogFormatError(
            f"{src}: {where(row)}: exit {int(exit_idx[row])} out of range: the model card lists {k_card} exits "
            f"(0..{k_card - 1}); the file has exits up to {int(exit_idx.max())}"
        )
    encoded = pc.dictionary_encode(id_arr)  # samples in order of first appearance
    sample = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    n = len(encoded.dictionary)
    key = sample * k_card + exit_idx
    counts = np.bincount(key, minlength=n * k_card)
    if (counts > 1).any():
        dup = int(np.flatnonzero(counts > 1)[0])
        r1, r2 = (int(r) for r in np.flatnonzero(key == dup)[:2])
        raise LogFormatError(
            f"{src}: duplicate request id {encoded.dictionary[dup // k_card].as_py()!r} with exit {dup % k_card} "
            f"at rows {r1} and {r2}; each (request id, exit) pair must appear once"
        )
    if (counts == 0).any():
        hole = int(np.flatnonzero(counts == 0)[0])
        rid = encoded.dictionary[hole // k_card].as_py()
        have = sorted(int(v) for v in exit_idx[sample == hole // k_card])
        raise LogFormatError(
            f"{src}: request id {rid!r} is missing exit {hole % k_card} ({card.exits[hole % k_card].name}); "
            f"it has exits {have}; every exit must be logged for every sample"
        )
    flat: np.ndarray | None = None
    for offset, _, (col,) in _blocks(table, [LOGITS_COLUMN]):
        if flat is None:
            n_classes = _list_width(col, _n_classes(card))
            if n_classes < 2:
                raise LogFormatError(f"{src}: column 'logits': logits need at least 2 classes, found {n_classes}")
            flat = np.empty((n * k_card, n_classes), dtype=np.float32)
        _fill_lists(
            col, LOGITS_COLUMN, flat, src, where, card_classes=card.classes is not None, rows_to=key, offset=offset
        )
        del col
    assert flat is not None
    n_classes = flat.shape[1]
    logits = flat.reshape(n, k_card, n_classes)
    row_of = np.empty(n * k_card, dtype=np.int64)
    row_of[key] = np.arange(rows, dtype=np.int64)
    row_of = row_of.reshape(n, k_card)
    first_row = row_of.min(axis=1)
    _check_finite(logits, src, lambda i, k: where(int(row_of[i, k])), _exit_name(card))

    def per_sample(values: np.ndarray, column: str) -> np.ndarray:
        """The value of each sample from its first row; every other row must repeat it."""
        rep = values[first_row]
        diff = np.flatnonzero(values != rep[sample])
        if diff.size:
            row = int(diff[0])
            first = int(first_row[sample[row]])
            shown = _column(table, column)
            raise LogFormatError(
                f"{src}: {where(row)}: column {column!r} differs between the rows of one sample "
                f"(row {first}: {shown[first].as_py()!r}, row {row}: {shown[row].as_py()!r})"
            )
        return rep

    labels = None
    if card.label_column in names:
        row_labels = _labels(_column(table, card.label_column), card.label_column, card, n_classes, src, where)
        labels = per_sample(row_labels, card.label_column)
    segments = {}
    for column in card.segment_columns:
        if column not in names:
            raise LogFormatError(
                f"{src}: missing segment column {column!r} (listed in the model card's segment_columns)"
            )
        seg = _segment(_column(table, column), column, src, where)
        codes = per_sample(seg.codes, column)
        segments[column] = _compact(SegmentColumn(codes=codes, levels=seg.levels))
    ts = None
    if TS_COLUMN in names:
        ts = per_sample(_timestamps(_column(table, TS_COLUMN), src, where), TS_COLUMN)
    ids_np = encoded.dictionary.to_numpy(zero_copy_only=False)
    ids = ids_np.astype(np.int64) if pa.types.is_integer(id_arr.type) else ids_np.astype(object)
    return _build(logits, card, labels, segments, ids, ts, src)


def _compact(col: SegmentColumn) -> SegmentColumn:
    """Drop levels no sample uses (keeps the sorted order)."""
    used = np.bincount(col.codes, minlength=len(col.levels)) > 0
    if used.all():
        return col
    remap = (np.cumsum(used) - 1).astype(np.int32)
    return SegmentColumn(codes=remap[col.codes], levels=tuple(lv for lv, u in zip(col.levels, used, strict=True) if u))


def _load_jsonl(p: Path, card: ModelCard, src: str) -> ExitLogs:
    """JSON Lines, one wide row per line (blank lines are skipped; errors give the line number)."""
    records: list[dict[str, Any]] = []
    lines: list[int] = []
    try:
        with p.open("r", encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise LogFormatError(
                        f"{src}: line {lineno}: invalid JSON: {exc.msg} (column {exc.colno})"
                    ) from None
                if not isinstance(obj, dict):
                    raise LogFormatError(f"{src}: line {lineno}: expected a JSON object, got {type(obj).__name__}")
                records.append(obj)
                lines.append(lineno)
    except UnicodeDecodeError as exc:
        raise LogFormatError(f"{src}: not UTF-8 text (corrupt or not JSON Lines): {exc}") from None
    except OSError as exc:
        raise LogFormatError(f"{src}: cannot read: {exc}") from exc
    if not records:
        raise LogFormatError(f"{src}: empty file (no rows)")
    line_of = np.asarray(lines, dtype=np.int64)
    keys: dict[str, None] = {}
    for rec in records:
        keys.update(dict.fromkeys(rec))
    columns: dict[str, pa.Array] = {}
    for name in keys:
        values = [rec.get(name) for rec in records]
        if _EXIT_RE.fullmatch(name):
            columns[name] = _json_list_column(values, name, src, line_of)
        else:
            try:
                columns[name] = pa.array(values)
            except (pa.ArrowException, ValueError, TypeError, OverflowError):
                kinds = [type(v).__name__ for v in values]
                row = next(i for i, t in enumerate(kinds) if t not in ("NoneType", kinds[0]))
                raise LogFormatError(
                    f"{src}: row {row} (line {lines[row]}): column {name!r} mixes types "
                    f"({kinds[0]} in row 0, {kinds[row]} here)"
                ) from None
    return _from_wide_table(pa.table(columns), card, src, lines=line_of)


def _json_list_column(values: list[Any], name: str, src: str, lines: np.ndarray) -> pa.Array:
    try:
        return pa.array(values, type=pa.list_(pa.float64()))
    except (pa.ArrowException, ValueError, TypeError, OverflowError):
        pass
    for row, value in enumerate(values):
        ok = isinstance(value, list) and all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in value
        )
        if value is not None and not ok:
            raise LogFormatError(
                f"{src}: row {row} (line {int(lines[row])}): column {name!r} must be a list of numbers, "
                f"got {json.dumps(value)[:60]}"
            )
    raise LogFormatError(f"{src}: column {name!r}: values cannot be read as lists of numbers")


def _load_npz(p: Path, card: ModelCard, src: str) -> ExitLogs:
    try:
        with p.open("rb") as fh, np.load(fh, allow_pickle=False) as npz:  # own handle: closed even if corrupt
            arrays = {name: npz[name] for name in npz.files}
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise LogFormatError(
                f"{src}: holds object (pickled) arrays, which are not loaded; store strings as unicode arrays"
            ) from None
        raise LogFormatError(f"{src}: cannot read NPZ file (corrupt or not NPZ): {exc}") from None
    except (zipfile.BadZipFile, OSError, EOFError, KeyError) as exc:
        raise LogFormatError(f"{src}: cannot read NPZ file (corrupt or not NPZ): {exc}") from None
    if "logits" not in arrays:
        raise LogFormatError(f"{src}: missing array 'logits' of shape (n, K, C); found arrays {sorted(arrays)}")
    raw = arrays["logits"]
    if raw.ndim != 3:
        raise LogFormatError(f"{src}: array 'logits' must have shape (n, K, C), got {raw.shape}")
    if not (np.issubdtype(raw.dtype, np.floating) or np.issubdtype(raw.dtype, np.integer)):
        raise LogFormatError(f"{src}: array 'logits' has dtype {raw.dtype}; logits must be numbers")
    n, k, c = raw.shape
    if n == 0:
        raise LogFormatError(f"{src}: empty file (no rows): array 'logits' has 0 samples")
    if k != card.n_exits:
        raise LogFormatError(
            f"{src}: array 'logits' has {k} exits (axis 1) but the model card lists {card.n_exits}"
            + (" (missing exit)" if k < card.n_exits else "")
        )
    if card.classes is not None and c != len(card.classes):
        raise LogFormatError(
            f"{src}: array 'logits' has {c} classes (axis 2) but the model card lists {len(card.classes)}"
        )
    if c < 2:
        raise LogFormatError(f"{src}: logits need at least 2 classes, found {c}")
    logits = np.ascontiguousarray(raw, dtype=np.float32)
    del raw
    for name, arr in arrays.items():
        if name != "logits" and arr.shape != (n,):
            raise LogFormatError(f"{src}: array {name!r} has shape {arr.shape}, expected ({n},) (one per sample)")
    id_name = next((nm for nm in (card.id_column, "request_id", "request_ids") if nm in arrays), None)
    id_arr = None if id_name is None else _np_to_arrow(arrays[id_name], id_name, src)
    where = _Where(id_arr, card.id_column)
    ids = None if id_arr is None else _ids(id_arr, id_name or card.id_column, src, where)
    _check_finite(logits, src, lambda i, k: where(i), _exit_name(card))
    labels = None
    label_name = next((nm for nm in ("labels", card.label_column) if nm in arrays), None)
    if label_name is not None:
        labels = _labels(_np_to_arrow(arrays[label_name], label_name, src), label_name, card, c, src, where)
    segments = {}
    seg_names = list(card.segment_columns)
    seg_names += [nm[len(SEGMENT_PREFIX) :] for nm in arrays if nm.startswith(SEGMENT_PREFIX)]
    for column in dict.fromkeys(seg_names):
        key = SEGMENT_PREFIX + column
        if key not in arrays:
            raise LogFormatError(
                f"{src}: missing array {key!r} for segment column {column!r} (listed in the model card)"
            )
        segments[column] = _segment(_np_to_arrow(arrays[key], key, src), column, src, where)
    ts = None
    if TS_COLUMN in arrays:
        ts = _timestamps(_np_to_arrow(arrays[TS_COLUMN], TS_COLUMN, src), src, where)
    return _build(logits, card, labels, segments, ids, ts, src)


def _np_to_arrow(arr: np.ndarray, name: str, src: str) -> pa.Array:
    try:
        return pa.array(arr)
    except (pa.ArrowException, ValueError, TypeError) as exc:
        raise LogFormatError(f"{src}: array {name!r} with dtype {arr.dtype} cannot be read: {exc}") from None


# --------------------------------------------------------------------------- summaries


def fingerprint(logs: ExitLogs) -> str:
    """``"sha256:<hex>"`` over logits bytes, labels, segments, request ids and ts.

    Deterministic and cheap (array bytes are hashed in place): equal logs give equal
    fingerprints whatever file form they were loaded from. Float32 logits are hashed, so
    logs saved as float16 fingerprint differently from their float32 source.
    """
    h = hashlib.sha256()
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
    if logs.labels is not None:
        h.update(np.ascontiguousarray(logs.labels, dtype=np.int64))
    for name in sorted(logs.segments):
        col = _compact(logs.segments[name])
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
    return "sha256:" + h.hexdigest()


def time_window(logs: ExitLogs) -> tuple[str, str] | None:
    """First and last ``ts`` as ISO-8601 UTC strings, or None without a time column."""
    if logs.ts is None or logs.ts.size == 0:
        return None
    lo, hi = logs.ts.min(), logs.ts.max()
    return (
        np.datetime_as_string(lo, unit="s") + "Z",
        np.datetime_as_string(hi, unit="s") + "Z",
    )


def segment_counts(logs: ExitLogs) -> dict[str, dict[str, int]]:
    """Rows per value of every segment column: ``{column: {value: count}}``."""
    out: dict[str, dict[str, int]] = {}
    for name, col in logs.segments.items():
        counts = np.bincount(col.codes, minlength=len(col.levels))
        out[name] = {level: int(cnt) for level, cnt in zip(col.levels, counts, strict=True) if cnt}
    return out


# --------------------------------------------------------------------------- writing


def _form_from_suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in _PARQUET_SUFFIXES:
        return "wide"
    if suffix in _JSONL_SUFFIXES:
        return "jsonl"
    if suffix == ".npz":
        return "npz"
    raise InputError(f"{path}: cannot tell the log form from extension {suffix!r}; pass form= one of {FORMS}")


def write_logs(
    logs: ExitLogs,
    path: str | os.PathLike[str],
    *,
    form: str | None = None,
    dtype: Any = np.float32,
    label_names: bool = False,
    compression: str = "zstd",
) -> Path:
    """Write ``logs`` in one of the DESIGN.md forms, atomically (temp file + ``os.replace``).

    ``form`` defaults from the extension (.parquet -> wide, .jsonl, .npz); ``dtype`` is
    float32 or float16 for the stored logits; ``label_names`` writes labels as class names
    instead of indices. Column names come from the logs' model card.
    """
    target = Path(path)
    form = form or _form_from_suffix(target)
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
    with _atomic_path(target) as tmp:
        if form == "npz":
            _write_npz(logs, tmp, dt, label_names)
        elif form == "jsonl":
            _write_jsonl(logs, tmp, dt, label_names)
        else:
            _write_parquet(logs, tmp, dt, label_names, long=form == "long", compression=compression)
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
