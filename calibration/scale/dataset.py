"""Exit logs as a stream of bounded batches: a Parquet dataset on disk, or logs already in memory.

:class:`ParquetDataset` is a file or a directory tree of Parquet files in the wide form
(``exit_<k>`` list columns, one row per request; see the formats page), optionally in hive
partitions (``date=2026-11-01/model=a/part-0.parquet``). Partition values become string
columns, which the card may list as segment columns; ``--where`` keeps whole files by them.
Every file's footer is checked against the first before any row is read, so a file with
another schema is named before work starts; a batch's rows are decoded and checked by the
same code as a single file, and an error names the file and its row.

:class:`ArraySource` streams :class:`~exitwise.calibration.logs.ExitLogs` already in memory
the same way: the in-memory path of the scale engine, and its equality tests.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from exitwise.calibration.exceptions import InputError, LogFormatError
from exitwise.calibration.logfiles.columns import Where, decode_ids, decode_segment
from exitwise.calibration.logfiles.forms import EXIT_RE, TS_COLUMN, token_column
from exitwise.calibration.logfiles.tables import read_wide_table
from exitwise.calibration.logfiles.token_columns import decode_groups
from exitwise.calibration.logfiles.tokens import read_token_parquet
from exitwise.calibration.logs import ExitLogs, ModelCard
from exitwise.calibration.scale.where import PartitionFilter
from exitwise.calibration.tokens import TokenLogs

__all__ = ["ArraySource", "Chunk", "LogFile", "ParquetDataset", "RowSelector", "Source", "row_keys"]

DEFAULT_BATCH_ROWS = 65_536
MAX_FILES = 200_000
_DATA_SUFFIXES = (".parquet", ".parq", "")  # "": Hive's part-00000 files


class RowSelector(Protocol):
    """Selects rows of a batch by their keys before the logits are decoded: the request id
    (``key`` None) or the value of a group column (the same strings :func:`row_keys` gives)."""

    @property
    def key(self) -> str | None: ...

    def __call__(self, keys: np.ndarray) -> np.ndarray: ...


def row_keys(logs: ExitLogs | TokenLogs, column: str | None) -> np.ndarray:
    """What a row is split by: its request id (``column`` None) or the value of its group column."""
    if isinstance(logs, TokenLogs) and column is not None and column == logs.card.group_column:
        if logs.groups is None or logs.group_levels is None:
            raise InputError(f"{logs.source}: token logs without their group column {column!r}")
        return logs.group_levels[logs.groups]
    if column is None:
        if logs.request_ids is None:
            raise InputError(f"{logs.source}: no request ids: the scale engine splits by a hash of the request id")
        return logs.request_ids
    if column in logs.segments:
        return logs.segments[column].values()
    raise InputError(f"{logs.source}: --group-column {column!r} is not a segment column of the card "
                     f"(segment_columns: {sorted(logs.segments) or 'none'}): the scale engine groups rows by one")


@dataclass(frozen=True, eq=False)
class Chunk:
    """A batch of decoded rows: ``logs`` are rows ``first_row ..`` of ``file`` (all, or the selected ones).

    ``read`` counts the rows read from the files for it (with the batches before it that had no
    selected row): what progress counts.
    """

    logs: ExitLogs | TokenLogs
    file: str
    first_row: int
    read: int


class TableColumns:
    """An Arrow table read like a Parquet file column by column (what the token reader takes)."""

    def __init__(self, table: pa.Table) -> None:
        self._table = table
        self.column_names = table.column_names
        self.num_rows = table.num_rows

    def column(self, name: str) -> pa.ChunkedArray:
        return self._table.column(name)

    def blocks(self, names: list[str]) -> Iterator[tuple[int, list[str], list[pa.ChunkedArray]]]:
        yield 0, names, [self._table.column(n) for n in names]


class Source(Protocol):
    """What the scale engine reads: rows in batches, the same rows on every pass."""

    @property
    def rows(self) -> int: ...

    @property
    def name(self) -> str: ...

    @property
    def card(self) -> ModelCard: ...

    def chunks(self, select: RowSelector | None = None) -> Iterator[Chunk]: ...

    def check_unchanged(self) -> None: ...


@dataclass(frozen=True)
class LogFile:
    """One Parquet file of a dataset: its partition values and what its footer says."""

    path: Path
    partition: tuple[tuple[str, str], ...]
    rows: int
    size: int
    mtime_ns: int


def _partition_of(rel: Path, where: Path) -> tuple[tuple[str, str], ...]:
    parts = []
    for part in rel.parent.parts:
        key, sep, value = part.partition("=")
        if not sep or not key:
            continue  # a plain directory level: no partition
        parts.append((unquote(key), unquote(value)))
    keys = [k for k, _ in parts]
    if len(set(keys)) != len(keys):
        raise LogFormatError(f"{where}: partition key repeated in the path {rel}")
    return tuple(parts)


def _list_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "_")))
        for name in sorted(filenames):
            if name.startswith((".", "_")) or Path(name).suffix.lower() not in _DATA_SUFFIXES:
                continue  # Spark's _SUCCESS and .crc files, hidden files, cards and notes beside the data
            out.append(Path(dirpath) / name)
            if len(out) > MAX_FILES:
                raise InputError(f"{root}: more than {MAX_FILES:,} files; point at a partition directory or "
                                 f"filter with --where")
    return out


def _describe(schema: pa.Schema, name: str) -> str:
    return str(schema.field(name).type) if name in schema.names else "missing"


class ParquetDataset:
    """A Parquet file or directory of exit logs in the wide form, read in batches of ``batch_rows``."""

    def __init__(self, path: str | os.PathLike[str], card: ModelCard, *, where: PartitionFilter | None = None,
                 batch_rows: int = DEFAULT_BATCH_ROWS) -> None:
        if not 1 <= int(batch_rows) <= 1 << 22:
            raise InputError(f"--batch-rows must be in 1..{1 << 22}, got {batch_rows}")
        root = Path(path)
        if not root.exists():
            raise LogFormatError(f"{root}: no such file or directory")
        self.root = root
        self.card = card
        self.where = where or PartitionFilter()
        self.batch_rows = int(batch_rows)
        files = _list_files(root)
        if not files:
            raise LogFormatError(f"{root}: no Parquet files in the directory")
        self.partition_keys = self._partition_keys(files)
        self.where.check_columns(set(self.partition_keys), str(root))
        self.files: tuple[LogFile, ...] = tuple(self._open(files))
        self.schema = self._check_schemas()

    def _partition_keys(self, files: list[Path]) -> tuple[str, ...]:
        base = self.root if self.root.is_dir() else self.root.parent
        first = _partition_of(files[0].relative_to(base), files[0])
        keys = tuple(k for k, _ in first)
        for f in files[1:]:
            other = tuple(k for k, _ in _partition_of(f.relative_to(base), f))
            if other != keys:
                raise LogFormatError(f"{f}: partition keys {list(other)} differ from {list(keys)} of {files[0]}: "
                                     "every file of a dataset sits at the same partition depth")
        return keys

    def _open(self, files: list[Path]) -> Iterator[LogFile]:
        base = self.root if self.root.is_dir() else self.root.parent
        for f in files:
            partition = _partition_of(f.relative_to(base), f)
            if not self.where.keeps(dict(partition)):
                continue
            try:
                meta = pq.read_metadata(f)
            except (pa.ArrowException, OSError) as exc:
                raise LogFormatError(f"{f}: cannot read Parquet file (corrupt or not Parquet): {exc}") from None
            st = f.stat()
            yield LogFile(path=f, partition=partition, rows=int(meta.num_rows), size=st.st_size,
                          mtime_ns=st.st_mtime_ns)

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)

    @property
    def name(self) -> str:
        return self.root.name

    def _needed(self, schema: pa.Schema) -> list[str]:
        card = self.card
        if card.token_level:  # per exit the top-k values, their ids and the lse; the group splits
            names = [token_column(k, part) for k in range(card.n_exits) for part in ("values", "indices", "lse")]
            names += [c for c in (card.group_column, card.position_column, card.id_column)
                      if c is not None and (c == card.group_column or c in schema.names)]
        else:
            names = [f"exit_{k}" for k in range(card.n_exits)] + [card.id_column]
        names += [c for c in (card.label_column, TS_COLUMN) if c in schema.names]
        names += [c for c in card.segment_columns if c not in self.partition_keys]
        return names

    def _check_schemas(self) -> pa.Schema | None:
        """Every file's footer against the first's (names and types of the columns read)."""
        if not self.files:
            return None
        first = self.files[0]
        ref = pq.read_schema(first.path)
        card = self.card
        extra = sorted(k for c in ref.names if (m := EXIT_RE.fullmatch(c)) and (k := int(m.group(1))) >= card.n_exits)
        if extra:
            raise LogFormatError(f"{first.path}: column 'exit_{extra[0]}' has no exit in the model card "
                                 f"({card.n_exits} exits)")
        if card.token_level and card.group_column is None:
            raise LogFormatError(f"{first.path}: the card names no group_column: token logs are split by a hash of "
                                 "their sequence, so every row needs one")
        if not card.token_level and card.id_column not in ref.names:
            raise LogFormatError(f"{first.path}: missing id column {card.id_column!r}: the scale engine splits by a "
                                 f"hash of the request id, so every row needs one (the card's id_column)")
        clash = [k for k in self.partition_keys if k in ref.names]
        if clash:
            raise LogFormatError(f"{first.path}: column {clash[0]!r} is also a partition directory "
                                 f"({clash[0]}=...): rename one of them")
        needed = self._needed(ref)
        for name in needed:
            if name not in ref.names:
                raise LogFormatError(f"{first.path}: missing column {name!r} (the model card needs it)")
        for f in self.files[1:]:
            try:
                schema = pq.read_schema(f.path)
            except (pa.ArrowException, OSError) as exc:
                raise LogFormatError(f"{f.path}: cannot read Parquet schema (corrupt or not Parquet): {exc}") from None
            for name in needed + [c for c in (card.label_column, TS_COLUMN) if c in schema.names]:
                if name not in ref.names or name not in schema.names or not schema.field(name).type.equals(
                        ref.field(name).type):
                    raise LogFormatError(
                        f"{f.path}: another schema than {first.path}: column {name!r} is "
                        f"{_describe(schema, name)} here, {_describe(ref, name)} there; every file of a dataset "
                        f"must have the same columns and types")
        return ref

    def partition_of(self, path: str | os.PathLike[str]) -> tuple[tuple[str, str], ...]:
        """The hive partition values of a file of the dataset, from its path."""
        base = self.root if self.root.is_dir() else self.root.parent
        p = Path(path)
        return _partition_of(p.relative_to(base) if p.is_absolute() else p, p)

    def decode(self, table: pa.Table, file: str, partition: tuple[tuple[str, str], ...],
               first_row: int | None, read: int) -> Chunk:
        """Rows of one file as a checked :class:`Chunk`: the partition values the card uses become columns.

        ``first_row`` None (rows not in file order, as on Spark): errors name rows by request id.
        """
        for key, value in partition:
            if key in self.card.segment_columns:
                table = table.append_column(key, pa.array([value] * table.num_rows, type=pa.string()))
        logs: ExitLogs | TokenLogs
        if self.card.token_level:  # token errors name rows by group and position
            logs = read_token_parquet(TableColumns(table), self.card, file)  # type: ignore[arg-type]
        else:
            logs = read_wide_table(table, self.card, file, first_row=first_row)
        return Chunk(logs=logs, file=file, first_row=0 if first_row is None else first_row, read=read)

    @property
    def columns(self) -> list[str]:
        """The columns a pass reads from the files (partition columns come from the paths)."""
        return [] if self.schema is None else self._needed(self.schema)

    def chunks(self, select: RowSelector | None = None) -> Iterator[Chunk]:
        """Every file's rows in batches (the files in path order), decoded and checked."""
        if self.schema is None:
            return
        columns = self.columns
        skipped = 0
        for f in self.files:
            first_row = 0
            try:
                reader = pq.ParquetFile(f.path)
                batches = reader.iter_batches(batch_size=self.batch_rows, columns=columns)
                for batch in batches:
                    n = batch.num_rows
                    if n == 0:
                        continue
                    if select is not None:
                        keep = select(self._keys(batch, f, select.key, first_row))
                        if not keep.any():
                            first_row += n
                            skipped += n
                            continue
                        batch = batch.filter(pa.array(keep))
                    # selected rows are not the file's rows in order: errors name them by request id
                    yield self.decode(pa.Table.from_batches([batch]), str(f.path), f.partition,
                                      first_row if select is None else None, skipped + n)
                    first_row += n
                    skipped = 0
            except (pa.ArrowException, OSError) as exc:
                raise LogFormatError(f"{f.path}: cannot read rows from row {first_row} on (corrupt Parquet "
                                     f"file): {exc}") from None

    def _keys(self, batch: pa.RecordBatch, f: LogFile, column: str | None, first_row: int | None) -> np.ndarray:
        """The split keys of a batch's rows, decoded as :func:`row_keys` gives them from decoded logs."""
        name = self.card.id_column if column is None else column
        partition = dict(f.partition)
        if name in partition:
            return np.full(batch.num_rows, partition[name], dtype=object)
        arr = batch.column(name)
        where = Where(arr, name, first_row=first_row)
        if pa.types.is_dictionary(arr.type):
            arr = arr.dictionary_decode()
        if column is None:
            return decode_ids(arr, name, str(f.path), where)
        if self.card.token_level and column == self.card.group_column:
            codes, levels = decode_groups(arr, name, str(f.path), where)
            return levels[codes]
        return decode_segment(arr, name, str(f.path), where).values()

    def check_unchanged(self) -> None:
        """LogFormatError if a file changed or went away since the dataset was opened (between passes)."""
        for f in self.files:
            try:
                st = f.path.stat()
            except OSError:
                raise LogFormatError(f"{f.path}: the file went away during the run; nothing was written") from None
            if (st.st_size, st.st_mtime_ns) != (f.size, f.mtime_ns):
                raise LogFormatError(f"{f.path}: the file changed during the run (size or modification time); "
                                     "the passes would not see the same rows, so nothing was written")


@dataclass(frozen=True, eq=False)
class ArraySource:
    """Logs in memory, streamed in batches like a dataset (the engine's in-memory path)."""

    logs: ExitLogs | TokenLogs
    batch_rows: int = DEFAULT_BATCH_ROWS
    label: str = field(default="")

    def __post_init__(self) -> None:
        if self.logs.request_ids is None and not self.logs.card.token_level:
            raise InputError(f"{self.logs.source}: no request ids: the scale engine splits by a hash of the "
                             f"request id (the card's id_column {self.logs.card.id_column!r})")

    @property
    def rows(self) -> int:
        return self.logs.n

    @property
    def card(self) -> ModelCard:
        return self.logs.card

    @property
    def name(self) -> str:
        return self.label or Path(str(self.logs.source)).name

    def chunks(self, select: RowSelector | None = None) -> Iterator[Chunk]:
        n, step = self.logs.n, int(self.batch_rows)
        keys = None if select is None else row_keys(self.logs, select.key)
        skipped = 0
        for start in range(0, n, step):
            index = np.arange(start, min(n, start + step))
            read = index.size
            if keys is not None and select is not None:
                index = index[select(keys[index])]
                if not index.size:
                    skipped += read
                    continue
            yield Chunk(logs=self.logs.take(index), file=str(self.logs.source), first_row=start, read=skipped + read)
            skipped = 0

    def check_unchanged(self) -> None:
        return None
