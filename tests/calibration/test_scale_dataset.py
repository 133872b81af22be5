"""Parquet datasets read in batches: partitions, --where, schema checks, bad rows named by file and row."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from exitwise.calibration.exceptions import InputError, LogFormatError
from exitwise.calibration.logfiles.writers import write_logs
from exitwise.calibration.logs import ExitLogs, ModelCard
from exitwise.calibration.scale.dataset import ArraySource, ParquetDataset
from exitwise.calibration.scale.passes import SplitSelector
from exitwise.calibration.scale.where import parse_where
from exitwise.calibration.synthetic import synthetic_logs

DAYS = ("2026-10-31", "2026-11-01", "2026-11-02")


@pytest.fixture(scope="module")
def logs() -> ExitLogs:
    return synthetic_logs(3_000, 3, 4, seed=7)


def write_dataset(logs: ExitLogs, root: Path, files_per_day: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """``logs`` shuffled over day=... partitions, several files each; returns the rows of each file."""
    perm = np.random.default_rng(seed).permutation(logs.n)
    out = {}
    for day, part in zip(DAYS, np.array_split(perm, len(DAYS)), strict=True):
        (root / f"day={day}").mkdir(parents=True, exist_ok=True)
        for i, rows in enumerate(np.array_split(part, files_per_day)):
            path = root / f"day={day}" / f"part-{i}.parquet"
            write_logs(logs.take(rows), path)
            out[str(path)] = rows
    return out


def test_where_parses_clauses_and_refuses_what_it_cannot_read() -> None:
    f = parse_where("date >= '2026-11-01' and model in ('a', \"b\") and shard < 3")
    assert [str(c) for c in f.clauses] == ["date >= '2026-11-01'", "model in ('a', 'b')", "shard < 3"]
    assert f.keeps({"date": "2026-11-02", "model": "b", "shard": "2"})
    assert not f.keeps({"date": "2026-10-31", "model": "b", "shard": "2"})
    assert not f.keeps({"date": "2026-11-02", "model": "c", "shard": "2"})
    assert not f.keeps({"date": "2026-11-02", "model": "a", "shard": "10"})  # numbers compare as numbers
    for bad, says in [("date >=", "ends too early"), ("date ~ 3", "cannot parse"), ("date = 1 or x = 2", "'and'"),
                      ("= 3", "partition column name"), ("date in 'a'", "'('"), ("x = y", "quoted string")]:
        with pytest.raises(InputError, match=re.escape(says)):
            parse_where(bad)
    with pytest.raises(InputError, match="not a number"):
        parse_where("day > 3").keeps({"day": "2026-11-01"})
    assert parse_where("  ").clauses == ()


def test_a_partitioned_dataset_streams_every_row_once_with_partition_values(logs: ExitLogs, tmp_path: Path) -> None:
    files = write_dataset(logs, tmp_path)
    (tmp_path / "_SUCCESS").write_text("")
    (tmp_path / "card.json").write_text("{}")  # not data: skipped
    card = ModelCard(model=logs.card.model, exits=logs.card.exits, classes=logs.card.classes,
                     segment_columns=(*logs.card.segment_columns, "day"))
    ds = ParquetDataset(tmp_path, card, batch_rows=257)
    assert ds.rows == logs.n and ds.partition_keys == ("day",)
    seen: list[np.ndarray] = []
    for chunk in ds.chunks():
        rows = files[chunk.file][chunk.first_row:chunk.first_row + chunk.logs.n]
        np.testing.assert_array_equal(chunk.logs.logits, logs.logits[rows])
        np.testing.assert_array_equal(chunk.logs.request_ids, logs.request_ids[rows])
        day = Path(chunk.file).parent.name.split("=")[1]
        assert set(chunk.logs.segments["day"].levels) == {day}
        seen.append(rows)
    assert np.array_equal(np.sort(np.concatenate(seen)), np.arange(logs.n))
    kept = ParquetDataset(tmp_path, card, where=parse_where("day >= '2026-11-01'"))
    assert {f.partition for f in kept.files} == {(("day", "2026-11-01"),), (("day", "2026-11-02"),)}
    assert kept.rows == sum(r.size for p, r in files.items() if "2026-10-31" not in p)
    with pytest.raises(InputError, match=r"'region' is not a partition column.*partitions: day"):
        ParquetDataset(tmp_path, card, where=parse_where("region = 'x'"))


def test_selected_rows_are_the_split_whatever_the_batches(logs: ExitLogs, tmp_path: Path) -> None:
    write_dataset(logs, tmp_path)
    sel = SplitSelector(seed=3, choose_fraction=0.25, choose=True)
    want = np.sort(logs.request_ids[sel.mask(logs.request_ids)])
    for batch in (64, 1000):
        got = np.concatenate([c.logs.request_ids for c in ParquetDataset(tmp_path, logs.card, batch_rows=batch)
                              .chunks(sel)])
        assert np.array_equal(np.sort(got), want)
    mem = np.concatenate([c.logs.request_ids for c in ArraySource(logs, batch_rows=333).chunks(sel)])
    assert np.array_equal(np.sort(mem), want)
    read = sum(c.read for c in ArraySource(logs, batch_rows=333).chunks(sel))
    assert logs.n - 333 < read <= logs.n  # a last batch without a selected row is not reported


def test_a_file_with_another_schema_is_named_before_any_row_is_read(logs: ExitLogs, tmp_path: Path) -> None:
    files = write_dataset(logs, tmp_path)
    odd = sorted(files)[3]
    table = pq.read_table(odd)
    i = table.schema.get_field_index("exit_1")
    wide = table.set_column(i, "exit_1", table.column("exit_1").cast(pa.list_(pa.float64())))
    pq.write_table(wide, odd)
    with pytest.raises(LogFormatError) as err:
        ParquetDataset(tmp_path, logs.card)
    msg = str(err.value)
    assert msg.startswith(odd) and "another schema" in msg and "'exit_1'" in msg
    assert "double> here, list<element: float> there" in msg
    pq.write_table(table.drop(["label"]), odd)
    with pytest.raises(LogFormatError, match=f"^{odd}: another schema.*'label' is missing here"):
        ParquetDataset(tmp_path, logs.card)


def test_a_nan_in_a_late_batch_names_its_file_row_and_request_id(logs: ExitLogs, tmp_path: Path) -> None:
    files = write_dataset(logs, tmp_path)
    last = sorted(files)[-1]
    rows = files[last]
    bad = logs.take(rows)
    z = bad.logits.copy()
    z[rows.size - 3, 1, 2] = np.nan
    write_logs(ExitLogs(logits=z, card=bad.card, labels=bad.labels, segments=bad.segments,
                        request_ids=bad.request_ids, ts=bad.ts), last)
    ds = ParquetDataset(tmp_path, logs.card, batch_rows=100)
    with pytest.raises(LogFormatError) as err:
        for _ in ds.chunks():
            pass
    rid = int(logs.request_ids[rows[rows.size - 3]])
    assert str(err.value).startswith(f"{last}: row {rows.size - 3} (request_id {rid!r}): logit is NaN at exit 1")


def test_corrupt_files_and_files_changed_between_passes_are_errors(logs: ExitLogs, tmp_path: Path) -> None:
    files = write_dataset(logs, tmp_path)
    victim = sorted(files)[1]
    ds = ParquetDataset(tmp_path, logs.card)
    os.utime(victim, ns=(1, 1))
    with pytest.raises(LogFormatError, match=f"^{victim}: the file changed during the run"):
        ds.check_unchanged()
    Path(victim).write_bytes(b"PAR1 not really")
    with pytest.raises(LogFormatError, match=f"^{victim}: cannot read Parquet file"):
        ParquetDataset(tmp_path, logs.card)
    shutil.rmtree(tmp_path)
    tmp_path.mkdir()
    with pytest.raises(LogFormatError, match="no Parquet files"):
        ParquetDataset(tmp_path, logs.card)
    (tmp_path / "a=1").mkdir()
    write_logs(logs.take(np.arange(10)), tmp_path / "a=1" / "x.parquet")
    write_logs(logs.take(np.arange(10, 20)), tmp_path / "y.parquet")
    with pytest.raises(LogFormatError, match="same partition depth"):
        ParquetDataset(tmp_path, logs.card)


def test_logs_without_request_ids_cannot_be_split_by_hash(logs: ExitLogs, tmp_path: Path) -> None:
    anonymous = ExitLogs(logits=logs.logits[:50], card=logs.card, labels=logs.labels[:50])
    with pytest.raises(InputError, match="no request ids"):
        ArraySource(anonymous)
    write_logs(anonymous, tmp_path / "a.parquet")
    with pytest.raises(LogFormatError, match="missing id column 'request_id'"):
        ParquetDataset(tmp_path, logs.card)
