"""Wide and long exit-log tables to :class:`~exitwise.calibration.logs.ExitLogs`.

A table is a Parquet file read column by column (:class:`ParquetColumns`: peak memory is the
output plus one column) or an in-memory Arrow table (JSON Lines). The wide form has one row
per sample and an ``exit_k`` list column per exit; the long form one row per (sample, exit)
with ``exit`` and ``logits`` columns. Columns are decoded and checked by :mod:`.columns`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from exitwise.calibration.exceptions import LogFormatError
from exitwise.calibration.logfiles.columns import (
    Where,
    build_logs,
    card_class_count,
    check_finite,
    column_array,
    decode_ids,
    decode_labels,
    decode_segment,
    decode_timestamps,
    exit_namer,
    fill_lists,
    first_null,
    list_width,
)
from exitwise.calibration.logfiles.forms import EXIT_COLUMN, EXIT_RE, LOGITS_COLUMN, TS_COLUMN
from exitwise.calibration.logs import ExitLogs, ModelCard, SegmentColumn

__all__ = ["ParquetColumns", "open_parquet", "read_long_table", "read_wide_table"]

_READ_VALUES = 1 << 19  # rows x exit columns decoded per Parquet read: bounds Arrow's buffers


class ParquetColumns:
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


def open_parquet(p: Path) -> ParquetColumns:
    """``p`` as a :class:`ParquetColumns`; LogFormatError if it is not a readable Parquet file."""
    try:
        return ParquetColumns(pq.ParquetFile(p), p)
    except (pa.ArrowException, OSError) as exc:
        raise LogFormatError(f"{p}: cannot read Parquet file (corrupt or not Parquet): {exc}") from None


def _column_blocks(
    table: pa.Table | ParquetColumns, names: list[str]
) -> Iterator[tuple[int, list[str], list[pa.ChunkedArray]]]:
    if isinstance(table, ParquetColumns):
        yield from table.blocks(names)
    else:
        yield 0, names, [table.column(name) for name in names]


def read_wide_table(
    table: pa.Table | ParquetColumns, card: ModelCard, src: str, lines: np.ndarray | None = None,
    *, first_row: int | None = 0,
) -> ExitLogs:
    """Logs from a one-row-per-sample table with ``exit_k`` list columns; ``lines`` (JSON Lines) name rows.

    ``first_row``: the file row of the table's first row (a batch of a larger file), for error messages
    (None: unknown; errors then name the row by its request id).
    """
    n = table.num_rows
    if n == 0:
        raise LogFormatError(f"{src}: empty file (no rows)")
    names = table.column_names
    k_card = card.n_exits
    found = sorted(int(m.group(1)) for c in names if (m := EXIT_RE.fullmatch(c)))
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
    id_arr = column_array(table, card.id_column) if card.id_column in names else None
    where = Where(id_arr, card.id_column, lines, first_row)
    ids = None if id_arr is None else decode_ids(id_arr, card.id_column, src, where)
    logits: np.ndarray | None = None
    for offset, group, cols in _column_blocks(table, [f"exit_{k}" for k in range(k_card)]):
        for name, col in zip(group, cols, strict=True):
            if logits is None:
                n_classes = list_width(col, card_class_count(card))
                if n_classes < 2:
                    raise LogFormatError(f"{src}: column {name!r}: logits need at least 2 classes, found {n_classes}")
                logits = np.empty((n, k_card, n_classes), dtype=np.float32)
            k = int(name[len("exit_") :])
            fill_lists(
                col, name, logits[:, k, :], src, where, card_classes=card.classes is not None, offset=offset
            )
        del cols
    assert logits is not None  # k_card >= 2 (ModelCard)
    check_finite(logits, src, lambda i, k: where(i), exit_namer(card))
    return _assemble(table, logits, ids, card, src, where)


def _assemble(
    table: pa.Table | ParquetColumns,
    logits: np.ndarray,
    ids: np.ndarray | None,
    card: ModelCard,
    src: str,
    where: Where,
) -> ExitLogs:
    """Per-sample columns (label, segments, ts) of a one-row-per-sample table, then the ExitLogs."""
    names = table.column_names
    n_classes = logits.shape[2]
    labels = None
    if card.label_column in names:
        labels = decode_labels(column_array(table, card.label_column), card.label_column, card, n_classes, src, where)
    segments = {}
    for column in card.segment_columns:
        if column not in names:
            raise LogFormatError(
                f"{src}: missing segment column {column!r} (listed in the model card's segment_columns)"
            )
        segments[column] = decode_segment(column_array(table, column), column, src, where)
    ts = decode_timestamps(column_array(table, TS_COLUMN), src, where) if TS_COLUMN in names else None
    return build_logs(logits, card, labels, segments, ids, ts, src)


def read_long_table(table: pa.Table | ParquetColumns, card: ModelCard, src: str) -> ExitLogs:
    """Logs from a one-row-per-(sample, exit) table; every exit of every sample exactly once."""
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
    id_arr = column_array(table, card.id_column)
    where = Where(id_arr, card.id_column)
    if id_arr.null_count:
        raise LogFormatError(f"{src}: row {first_null(id_arr)}: request id column {card.id_column!r} is null")
    exit_arr = column_array(table, EXIT_COLUMN)
    k_card = card.n_exits
    if not pa.types.is_integer(exit_arr.type):
        raise LogFormatError(f"{src}: column 'exit' has type {exit_arr.type}; expected exit indices 0..{k_card - 1}")
    if exit_arr.null_count:
        raise LogFormatError(f"{src}: {where(first_null(exit_arr))}: column 'exit' is null")
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
    for offset, _, (col,) in _column_blocks(table, [LOGITS_COLUMN]):
        if flat is None:
            n_classes = list_width(col, card_class_count(card))
            if n_classes < 2:
                raise LogFormatError(f"{src}: column 'logits': logits need at least 2 classes, found {n_classes}")
            flat = np.empty((n * k_card, n_classes), dtype=np.float32)
        fill_lists(
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
    check_finite(logits, src, lambda i, k: where(int(row_of[i, k])), exit_namer(card))

    def per_sample(values: np.ndarray, column: str) -> np.ndarray:
        """The value of each sample from its first row; every other row must repeat it."""
        rep = values[first_row]
        diff = np.flatnonzero(values != rep[sample])
        if diff.size:
            row = int(diff[0])
            first = int(first_row[sample[row]])
            shown = column_array(table, column)
            raise LogFormatError(
                f"{src}: {where(row)}: column {column!r} differs between the rows of one sample "
                f"(row {first}: {shown[first].as_py()!r}, row {row}: {shown[row].as_py()!r})"
            )
        return rep

    labels = None
    if card.label_column in names:
        label_arr = column_array(table, card.label_column)
        row_labels = decode_labels(label_arr, card.label_column, card, n_classes, src, where)
        labels = per_sample(row_labels, card.label_column)
    segments = {}
    for column in card.segment_columns:
        if column not in names:
            raise LogFormatError(
                f"{src}: missing segment column {column!r} (listed in the model card's segment_columns)"
            )
        seg = decode_segment(column_array(table, column), column, src, where)
        codes = per_sample(seg.codes, column)
        segments[column] = SegmentColumn(codes=codes, levels=seg.levels).compact()
    ts = None
    if TS_COLUMN in names:
        ts = per_sample(decode_timestamps(column_array(table, TS_COLUMN), src, where), TS_COLUMN)
    ids_np = encoded.dictionary.to_numpy(zero_copy_only=False)
    ids = ids_np.astype(np.int64) if pa.types.is_integer(id_arr.type) else ids_np.astype(object)
    return build_logs(logits, card, labels, segments, ids, ts, src)

