"""Exit-log files: every form round-trips, every bad input names file, row/column and cause."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from small_card import CLASSES, K, small_card

from exitwise.calibration.exceptions import InputError, LogFormatError
from exitwise.calibration.logfiles.cards import card_from_dict, card_to_dict, load_card
from exitwise.calibration.logfiles.forms import detect_form
from exitwise.calibration.logfiles.readers import load_logs
from exitwise.calibration.logfiles.writers import write_logs
from exitwise.calibration.logs import ExitLogs, ExitSpec, ModelCard, SegmentColumn
from exitwise.calibration.summaries import fingerprint, time_window
from exitwise.calibration.synthetic import synthetic_logs

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "digits"
FORMS = [("wide", ".parquet"), ("long", ".parquet"), ("jsonl", ".jsonl"), ("npz", ".npz")]
C = len(CLASSES)


def _rows(n: int = 6) -> list[dict]:
    """Valid wide rows with string ids, class-name labels and a segment."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        row = {"request_id": f"r{i}", "label": CLASSES[i % C], "region": "eu" if i % 2 else "us"}
        for k in range(K):
            row[f"exit_{k}"] = rng.normal(size=C).round(3).tolist()
        rows.append(row)
    return rows


def _wide(tmp_path: Path, rows: list[dict], name: str = "logs.parquet") -> Path:
    path = tmp_path / name
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _long(tmp_path: Path, rows: list[dict], name: str = "long.parquet") -> Path:
    out = []
    for row in rows:
        base = {key: v for key, v in row.items() if not key.startswith("exit_")}
        for key, value in row.items():
            if key.startswith("exit_"):
                out.append({**base, "exit": int(key[5:]), "logits": value})
    path = tmp_path / name
    pq.write_table(pa.Table.from_pylist(out), path)
    return path


def _jsonl(tmp_path: Path, rows: list[dict], name: str = "logs.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _error(path: Path, card: ModelCard, exc: type[Exception] = LogFormatError) -> str:
    with pytest.raises(exc) as info:
        load_logs(path, card)
    message = str(info.value)
    assert str(path) in message, message
    assert isinstance(info.value, InputError)
    return message


def _assert_same(a: ExitLogs, b: ExitLogs, *, ids: bool = True) -> None:
    assert a.logits.dtype == np.float32 and b.logits.dtype == np.float32
    np.testing.assert_array_equal(a.logits, b.logits)
    if a.labels is None:
        assert b.labels is None
    else:
        np.testing.assert_array_equal(a.labels, b.labels)
    assert sorted(a.segments) == sorted(b.segments)
    for name, col in a.segments.items():
        np.testing.assert_array_equal(col.values(), b.segments[name].values())
    if ids:
        np.testing.assert_array_equal(a.request_ids, b.request_ids)
    if a.ts is None:
        assert b.ts is None
    else:
        np.testing.assert_array_equal(a.ts, b.ts)


# ------------------------------------------------------------------------------ round trips


@pytest.fixture(scope="module")
def synth() -> ExitLogs:
    return synthetic_logs(300, 4, 5, segments={"region": 3, "device": 2}, seed=7)


@pytest.mark.parametrize(("form", "ext"), FORMS)
@pytest.mark.parametrize("label_names", [False, True])
def test_every_form_round_trips(tmp_path, synth, form, ext, label_names):
    path = write_logs(synth, tmp_path / f"logs{ext}", form=form, label_names=label_names)
    assert detect_form(path) == form
    back = load_logs(path, synth.card)
    _assert_same(synth, back)
    assert fingerprint(back) == fingerprint(synth)
    assert back.source == str(path)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp files left behind


@pytest.mark.parametrize(("form", "ext"), FORMS)
def test_float16_storage_is_close(tmp_path, synth, form, ext):
    path = write_logs(synth, tmp_path / f"logs{ext}", form=form, dtype=np.float16)
    back = load_logs(path, synth.card)
    assert back.logits.dtype == np.float32
    np.testing.assert_allclose(back.logits, synth.logits.astype(np.float16).astype(np.float32))
    assert fingerprint(back) != fingerprint(synth)


def test_form_detected_from_contents_without_extension(tmp_path, synth):
    for form, ext in FORMS:
        path = write_logs(synth, tmp_path / f"x{ext}", form=form)
        bare = path.rename(tmp_path / f"noext_{form}")
        assert detect_form(bare) == form
        _assert_same(synth, load_logs(bare, synth.card))


def test_hand_written_files_load(tmp_path):
    """Files written by other tools (pyarrow from rows, plain JSON) load with names mapped."""
    rows = _rows()
    card = small_card()
    wide = load_logs(_wide(tmp_path, rows), card)
    long = load_logs(_long(tmp_path, rows), card)
    jsonl = load_logs(_jsonl(tmp_path, rows), card)
    for logs in (wide, long, jsonl):
        assert logs.logits.shape == (6, K, C)
        np.testing.assert_array_equal(logs.labels, [0, 1, 2, 3, 0, 1])
        assert logs.segments["region"].levels == ("eu", "us")
        assert list(logs.request_ids) == [f"r{i}" for i in range(6)]
        np.testing.assert_allclose(logs.logits[2, 1], np.float32(rows[2]["exit_1"]))
    assert fingerprint(wide) == fingerprint(long) == fingerprint(jsonl)


def test_long_form_rows_in_any_order(tmp_path):
    rows = _rows()
    path = _long(tmp_path, rows)
    table = pq.read_table(path)
    shuffled = table.take(np.random.default_rng(1).permutation(table.num_rows))
    pq.write_table(shuffled, tmp_path / "shuffled.parquet")
    a = load_logs(path, small_card())
    b = load_logs(tmp_path / "shuffled.parquet", small_card())
    order = np.argsort(b.request_ids.astype(str))
    np.testing.assert_array_equal(a.logits, b.logits[order])
    np.testing.assert_array_equal(a.labels, b.labels[order])


def test_card_without_optional_fields_and_unlabelled_logs(tmp_path):
    card = card_from_dict({"model": "m", "exits": [{"name": "a", "cost": 1}, {"name": "b", "cost": 2}]})
    assert card.classes is None and card.segment_columns == ()
    rows = [{"request_id": i, "exit_0": [0.0, 1.0, 2.0], "exit_1": [1.0, 0.0, 2.0]} for i in range(3)]
    logs = load_logs(_wide(tmp_path, rows), card)
    assert logs.labels is None and logs.segments == {} and logs.n_classes == 3
    assert logs.request_ids.dtype == np.int64
    assert logs.class_names == ("0", "1", "2")


def test_integer_labels_and_class_index_names(tmp_path):
    card = small_card(classes=None, segment_columns=())
    rows = _rows()
    for i, row in enumerate(rows):
        row["label"] = i % C
    assert list(load_logs(_wide(tmp_path, rows), card).labels) == [0, 1, 2, 3, 0, 1]
    for i, row in enumerate(rows):
        row["label"] = str(i % C)  # names default to the class indices as strings
    assert list(load_logs(_jsonl(tmp_path, rows), card).labels) == [0, 1, 2, 3, 0, 1]


def test_ts_column_parsed_and_time_window(tmp_path):
    rows = _rows(3)
    for i, row in enumerate(rows):
        row["ts"] = f"2024-03-0{i + 1}T12:00:00+01:00"
    logs = load_logs(_jsonl(tmp_path, rows), small_card())
    assert logs.ts.dtype == np.dtype("datetime64[us]")
    assert time_window(logs) == ("2024-03-01T11:00:00Z", "2024-03-03T11:00:00Z")
    assert time_window(load_logs(_wide(tmp_path, _rows(3)), small_card())) is None


def test_digits_fixture_loads():
    card = load_card(FIXTURE / "card.json")
    logs = load_logs(FIXTURE / "logs.parquet", card)
    assert logs.logits.shape == (1797, 4, 10)
    assert logs.segments["ink"].levels == ("heavy", "light", "medium")
    acc = (logs.logits.argmax(axis=2) == logs.labels[:, None]).mean(axis=0)
    assert np.all(np.diff(acc) > 0) and acc[0] < 0.7 and acc[-1] > 0.93
    assert (FIXTURE / "logs.parquet").stat().st_size < 400_000


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(1, 12),
    k=st.integers(2, 4),
    c=st.integers(2, 5),
    labelled=st.booleans(),
    str_ids=st.booleans(),
    n_seg=st.integers(0, 2),
    seed=st.integers(0, 2**16),
    scale=st.sampled_from([1e-3, 1.0, 1e4]),
)
def test_round_trip_property(tmp_path_factory, n, k, c, labelled, str_ids, n_seg, seed, scale):
    rng = np.random.default_rng(seed)
    card = ModelCard(
        model="p",
        exits=tuple(ExitSpec(f"x{j}", float(j + 1)) for j in range(k)),
        classes=tuple(f"c{j}" for j in range(c)),
        segment_columns=tuple(f"s{j}" for j in range(n_seg)),
    )
    logits = (rng.standard_normal((n, k, c)) * scale).astype(np.float32)
    ids = np.array([f"id-{v}" for v in rng.permutation(10 * n)[:n]], dtype=object) if str_ids else None
    logs = ExitLogs(
        logits=logits,
        card=card,
        labels=rng.integers(0, c, n) if labelled else None,
        segments={f"s{j}": SegmentColumn.from_values(rng.choice(["a", "b b", "ü"], n)) for j in range(n_seg)},
        request_ids=ids,
    )
    tmp = tmp_path_factory.mktemp("rt")
    for form, ext in FORMS:
        back = load_logs(write_logs(logs, tmp / f"f{ext}", form=form), card)
        _assert_same(logs, back, ids=ids is not None)
        if ids is None:  # long form needs ids: written as row numbers when the logs have none
            expected = np.arange(n) if form == "long" else None
            np.testing.assert_array_equal(back.request_ids, expected)
        if ids is not None or form != "long":
            assert fingerprint(back) == fingerprint(logs)


# ------------------------------------------------------------------------------ bad logs


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("writer", [_wide, _long, _jsonl])
def test_non_finite_logit_names_sample_exit_class(tmp_path, bad, writer):
    rows = _rows()
    rows[4]["exit_2"][3] = bad
    rows[5]["exit_0"][0] = bad  # later sample: the first offending one is reported
    message = _error(writer(tmp_path, rows), small_card())
    what = "NaN" if bad != bad else ("+Inf" if bad > 0 else "-Inf")
    assert "request_id 'r4'" in message and f"logit is {what} at exit 2 (e2), class 3" in message


def test_non_finite_logit_npz(tmp_path, synth):
    logits = synth.logits.copy()
    logits[17, 1, 2] = np.nan
    path = tmp_path / "bad.npz"
    np.savez(path, logits=logits)
    message = _error(path, synth.card)
    assert "row 17" in message and "NaN at exit 1 (stage2), class 2" in message


@pytest.mark.parametrize("writer", [_wide, _jsonl])
def test_ragged_logits(tmp_path, writer):
    rows = _rows()
    rows[3]["exit_1"] = rows[3]["exit_1"][:-1]
    message = _error(writer(tmp_path, rows), small_card())
    assert "row 3" in message and "'r3'" in message and "ragged" in message
    assert "column 'exit_1' has 3 values, expected 4" in message


def test_ragged_logits_without_card_classes(tmp_path):
    rows = _rows()
    rows[2]["exit_0"] = [*rows[2]["exit_0"], 1.0]
    message = _error(_long(tmp_path, rows), small_card(classes=None))
    assert "row 6" in message and "'r2'" in message and "has 5 values, expected 4" in message


def test_class_count_mismatch_with_card(tmp_path):
    message = _error(_wide(tmp_path, _rows()), small_card(classes=("a", "b", "c")))
    assert "row 0" in message and "expected 3 (the model card lists that many classes)" in message


def test_missing_exit_column(tmp_path):
    rows = _rows()
    for row in rows:
        del row["exit_2"]
    for path in (_wide(tmp_path, rows), _jsonl(tmp_path, rows)):
        message = _error(path, small_card())
        assert "missing exit column 'exit_2'" in message and "lists 3 exits" in message


def test_missing_exit_in_one_row(tmp_path):
    rows = _rows()
    rows[1]["exit_1"] = None
    message = _error(_wide(tmp_path, rows), small_card())
    assert "row 1 (request_id 'r1')" in message and "exit_1 is missing" in message
    del rows[1]["exit_1"]
    message = _error(_jsonl(tmp_path, rows), small_card())
    assert "row 1 (line 2, request_id 'r1')" in message and "exit_1 is missing" in message


def test_long_form_sample_missing_an_exit(tmp_path):
    rows = _rows()
    del rows[4]["exit_1"]
    message = _error(_long(tmp_path, rows), small_card())
    assert "request id 'r4' is missing exit 1 (e1)" in message and "has exits [0, 2]" in message


def test_more_exits_than_card(tmp_path):
    rows = _rows()
    for row in rows:
        row["exit_3"] = [0.0] * C
    message = _error(_wide(tmp_path, rows), small_card())
    assert "column 'exit_3'" in message and "the card lists 3 exits" in message
    message = _error(_long(tmp_path, rows), small_card())
    assert "exit 3 out of range" in message and "lists 3 exits" in message and "row 3" in message


def test_npz_exit_and_class_mismatch(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, logits=np.zeros((5, 2, C), dtype=np.float32))
    message = _error(path, small_card(segment_columns=()))
    assert "'logits' has 2 exits" in message and "card lists 3" in message and "missing exit" in message
    np.savez(path, logits=np.zeros((5, K, 7), dtype=np.float32))
    assert "has 7 classes" in _error(path, small_card(segment_columns=()))
    np.savez(path, logits=np.zeros((5, K * C), dtype=np.float32))
    assert "must have shape (n, K, C)" in _error(path, small_card(segment_columns=()))
    np.savez(path, logits=np.zeros((5, K, C)), labels=np.zeros(4, dtype=int))
    assert "array 'labels' has shape (4,), expected (5,)" in _error(path, small_card(segment_columns=()))


@pytest.mark.parametrize("writer", [_wide, _long, _jsonl])
def test_unknown_label_name(tmp_path, writer):
    rows = _rows()
    rows[3]["label"] = "gnu"
    message = _error(writer(tmp_path, rows), small_card())
    assert "'r3'" in message and "unknown label 'gnu' in column 'label'" in message and "'cat'" in message


def test_label_index_out_of_range(tmp_path):
    rows = _rows()
    for i, row in enumerate(rows):
        row["label"] = i
    message = _error(_wide(tmp_path, rows), small_card())
    assert "row 4 (request_id 'r4')" in message and "unknown label 4" in message and "0..3" in message
    path = tmp_path / "x.npz"
    np.savez(path, logits=np.zeros((2, K, C)), labels=np.array([0, -1]), seg_region=np.array(["a", "b"]))
    assert "row 1" in _error(path, small_card()) and "unknown label -1" in _error(path, small_card())


def test_null_and_fractional_labels(tmp_path):
    rows = _rows()
    rows[2]["label"] = None
    assert "row 2" in (m := _error(_wide(tmp_path, rows), small_card())) and "label column 'label' is null" in m
    for i, row in enumerate(rows):
        row["label"] = i % C + (0.5 if i == 1 else 0.0)
    assert "label 1.5" in (m := _error(_wide(tmp_path, rows), small_card())) and "row 1" in m


@pytest.mark.parametrize("writer", [_wide, _jsonl])
def test_duplicate_request_ids(tmp_path, writer):
    rows = _rows()
    rows[4]["request_id"] = "r1"
    message = _error(writer(tmp_path, rows), small_card())
    assert "duplicate request id 'r1'" in message and "rows 1 and 4" in message


def test_duplicate_request_ids_long_and_npz(tmp_path):
    rows = _rows()
    rows[4]["request_id"] = "r1"
    message = _error(_long(tmp_path, rows), small_card())
    assert "duplicate request id 'r1' with exit 0 at rows 3 and 12" in message
    path = tmp_path / "x.npz"
    np.savez(path, logits=np.zeros((3, K, C)), request_id=np.array([7, 8, 7]), seg_region=np.array(["a"] * 3))
    assert "duplicate request id 7" in (m := _error(path, small_card())) and "rows 0 and 2" in m


def test_long_form_inconsistent_per_sample_column(tmp_path):
    path = _long(tmp_path, _rows())
    table = pq.read_table(path)
    labels = table.column("label").to_pylist()
    labels[4] = "fox"  # r1's exit-1 row
    pq.write_table(table.set_column(table.column_names.index("label"), "label", pa.array(labels)), path)
    message = _error(path, small_card())
    assert "row 4 (request_id 'r1')" in message and "column 'label' differs between the rows" in message


@pytest.mark.parametrize("writer", [_wide, _jsonl])
def test_empty_and_blank_files(tmp_path, writer):
    (tmp_path / "zero.parquet").write_bytes(b"")
    assert "empty file" in _error(tmp_path / "zero.parquet", small_card())
    empty = pa.Table.from_pylist(_rows()).slice(0, 0)
    pq.write_table(empty, tmp_path / "norows.parquet")
    assert "empty file (no rows)" in _error(tmp_path / "norows.parquet", small_card())
    (tmp_path / "blank.jsonl").write_text("\n  \n")
    assert "empty file (no rows)" in _error(tmp_path / "blank.jsonl", small_card())
    np.savez(tmp_path / "none.npz", logits=np.zeros((0, K, C)))
    assert "empty file" in _error(tmp_path / "none.npz", small_card())


def test_corrupt_and_unreadable_files(tmp_path, synth):
    (tmp_path / "junk.parquet").write_bytes(b"this is not parquet at all")
    assert "cannot read Parquet file" in _error(tmp_path / "junk.parquet", small_card())
    good = write_logs(synth, tmp_path / "good.parquet")
    data = good.read_bytes()
    (tmp_path / "cut.parquet").write_bytes(data[: len(data) // 2])
    assert "cannot read Parquet file" in _error(tmp_path / "cut.parquet", synth.card)
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 broken zip")
    assert "cannot read NPZ file" in _error(tmp_path / "junk.npz", small_card())
    np.savez(tmp_path / "pickled.npz", logits=np.zeros((2, K, C)), seg_region=np.array(["a", None], dtype=object))
    assert "object (pickled) arrays" in _error(tmp_path / "pickled.npz", small_card())
    (tmp_path / "latin.jsonl").write_bytes(b'{"a": "\xff\xfe"}\n')
    assert "not UTF-8" in _error(tmp_path / "latin.jsonl", small_card())
    assert "file not found" in _error(tmp_path / "missing.parquet", small_card())
    assert "is a directory" in _error(tmp_path, small_card())


def test_jsonl_line_errors(tmp_path):
    path = tmp_path / "logs.jsonl"
    lines = [json.dumps(r) for r in _rows(3)]
    path.write_text("\n".join([lines[0], "", lines[1], "{not json"]) + "\n")
    assert "line 4: invalid JSON" in _error(path, small_card())
    path.write_text("\n".join([lines[0], "[1, 2]"]) + "\n")
    assert "line 2: expected a JSON object, got list" in _error(path, small_card())
    rows = _rows(3)
    rows[2]["exit_0"] = ["a", "b", "c", "d"]
    message = _error(_jsonl(tmp_path, rows), small_card())
    assert "row 2 (line 3)" in message and "column 'exit_0' must be a list of numbers" in message
    rows = _rows(3)
    rows[1]["region"] = 5
    message = _error(_jsonl(tmp_path, rows), small_card())
    assert "row 1 (line 2)" in message and "column 'region' mixes types (str in row 0, int here)" in message


def test_unknown_format(tmp_path):
    path = tmp_path / "logs.txt"
    path.write_text("exit_0,exit_1\n1,2\n")
    message = _error(path, small_card())
    assert "unknown log format" in message and ".parquet" in message
    with pytest.raises(LogFormatError, match="unknown log form 'csv'"):
        load_logs(path, small_card(), form="csv")


def test_missing_and_bad_segment_columns(tmp_path):
    rows = _rows()
    message = _error(_wide(tmp_path, rows), small_card(segment_columns=("region", "device")))
    assert "missing segment column 'device'" in message
    rows[3]["region"] = None
    message = _error(_wide(tmp_path, rows), small_card())
    assert "row 3 (request_id 'r3')" in message and "segment column 'region' is null" in message
    rows[3]["region"] = "eu|us"
    message = _error(_wide(tmp_path, rows), small_card())
    assert "row 3" in message and "contains '|'" in message
    path = tmp_path / "x.npz"
    np.savez(path, logits=np.zeros((2, K, C)))
    assert "missing array 'seg_region'" in _error(path, small_card())


def test_bad_ts_and_types(tmp_path):
    rows = _rows(3)
    for row in rows:
        row["ts"] = "2024-01-01T00:00:00Z"
    rows[1]["ts"] = "yesterday"
    message = _error(_wide(tmp_path, rows), small_card())
    assert "row 1 (request_id 'r1')" in message and "'yesterday' is not an ISO-8601 time" in message
    rows = _rows(3)
    for row in rows:
        row["exit_1"] = ["x"] * C
    assert "column 'exit_1' holds lists of string" in _error(_wide(tmp_path, rows), small_card())
    rows = _rows(3)
    for row in rows:
        row["exit_1"] = 1.0
    assert "column 'exit_1' must hold a list of C logits per row" in _error(_wide(tmp_path, rows), small_card())
    rows = _rows(3)
    for row in rows:
        row["request_id"] = 1.5
    assert "request id column 'request_id' has type double" in _error(_wide(tmp_path, rows), small_card())


def test_null_logit_inside_list(tmp_path):
    rows = _rows()
    rows[2]["exit_1"][1] = None
    message = _error(_wide(tmp_path, rows), small_card())
    assert "row 2 (request_id 'r2')" in message and "null logit at class 1" in message


def test_exits_count_mismatch_card_vs_logs(tmp_path, synth):
    path = write_logs(synth, tmp_path / "x.npz")
    card = card_from_dict({**card_to_dict(synth.card), "exits": card_to_dict(synth.card)["exits"][:3]})
    assert "'logits' has 4 exits (axis 1) but the model card lists 3" in _error(path, card)


# ------------------------------------------------------------------------------ writing


def test_write_is_atomic_and_checks_dtype(tmp_path, synth):
    target = tmp_path / "out.parquet"
    target.write_bytes(b"previous")
    big = ExitLogs(logits=synth.logits * 1e5, card=synth.card)
    with pytest.raises(InputError, match="float16: sample 0 has"):
        write_logs(big, target, dtype=np.float16)
    with pytest.raises(InputError, match="dtype must be float32 or float16"):
        write_logs(synth, target, dtype=np.float64)
    with pytest.raises(InputError, match="cannot tell the log form"):
        write_logs(synth, tmp_path / "out.csv")
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.parquet"]
    write_logs(synth, target)
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(1, 20),
    k=st.integers(2, 4),
    c=st.integers(2, 5),
    data=st.data(),
    bad=st.sampled_from([np.nan, np.inf, -np.inf]),
)
def test_first_non_finite_logit_is_reported_in_every_form(tmp_path_factory, n, k, c, data, bad):
    """Whatever the form, the error names the first bad (sample, exit, class) in row-major order."""
    card = ModelCard(model="p", exits=tuple(ExitSpec(f"x{j}", float(j + 1)) for j in range(k)))
    logits = np.random.default_rng(n * 100 + k * 10 + c).standard_normal((n, k, c)).astype(np.float32)
    cells = data.draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, k - 1), st.integers(0, c - 1)),
                               min_size=1, max_size=4))
    for cell in cells:
        logits[cell] = bad
    i, e, j = min(cells)
    logs = ExitLogs(logits=logits, card=card, request_ids=np.array([f"q{v}" for v in range(n)], dtype=object))
    tmp = tmp_path_factory.mktemp("nf")
    for form, ext in FORMS:
        path = write_logs(logs, tmp / f"f{ext}", form=form)
        message = _error(path, card)
        assert f"request_id 'q{i}')" in message, message
        assert f"at exit {e} (x{e}), class {j};" in message, message


@pytest.mark.parametrize("writer", ["wide", "long"])
def test_many_row_groups_keep_file_row_numbers(tmp_path, writer):
    """Parquet is decoded a row group at a time; rows are still numbered from the file's start."""
    rows = _rows(9)
    path = (_wide if writer == "wide" else _long)(tmp_path, rows)
    pq.write_table(pq.read_table(path), path, row_group_size=2)
    assert pq.ParquetFile(path).metadata.num_row_groups > 2
    good = load_logs(path, small_card())
    np.testing.assert_allclose(good.logits[7, 2], np.float32(rows[7]["exit_2"]))
    rows[7]["exit_2"] = rows[7]["exit_2"][:2]
    path = (_wide if writer == "wide" else _long)(tmp_path, rows)
    pq.write_table(pq.read_table(path), path, row_group_size=2)
    row = 7 if writer == "wide" else 7 * K + 2
    assert f"row {row} (request_id 'r7'): ragged logits" in _error(path, small_card())
