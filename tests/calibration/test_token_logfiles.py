"""Token-level log files: both forms round-trip exactly, every bad input names file, row, group, position,
exit and column; the card's token fields; telling the forms apart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exitwise.calibration.exceptions import CardError, InputError, LogFormatError
from exitwise.calibration.logfiles import token_writers
from exitwise.calibration.logfiles.cards import card_from_dict, card_to_dict, load_card, write_card
from exitwise.calibration.logfiles.forms import detect_form
from exitwise.calibration.logfiles.readers import load_logs
from exitwise.calibration.logfiles.writers import write_logs
from exitwise.calibration.logs import ExitSpec, ModelCard, SegmentColumn
from exitwise.calibration.synthetic import synthetic_logs
from exitwise.calibration.synthetic_tokens import synthetic_token_logs
from exitwise.calibration.tokens import TokenLogs

V = 50
K = 3
TOP = 4


def _card(**overrides: Any) -> ModelCard:
    fields: dict[str, Any] = {
        "model": "lm",
        "exits": tuple(ExitSpec(f"layer{k + 1}", float(k + 1)) for k in range(K)),
        "vocab_size": V,
        "group_column": "sequence_id",
        "segment_columns": ("domain",),
    }
    fields.update(overrides)
    return ModelCard(**fields)


def _arrays(n: int, n_exits: int, top: int, vocab: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Valid top-k data built here: descending values, distinct ids, lse leaving a positive tail."""
    rng = np.random.default_rng(seed)
    values = -np.sort(-rng.normal(3.0, 2.0, (n, n_exits, top)), axis=-1).astype(np.float32)
    ids = np.argsort(rng.random((n, n_exits, vocab)), axis=-1)[:, :, :top].astype(np.int32)
    head = np.log(np.exp(values.astype(np.float64)).sum(axis=-1))
    lse = (head + rng.uniform(0.01, 2.0, (n, n_exits))).astype(np.float32)
    return values, ids, lse


def _logs(n_seq: int = 3, seq_len: int = 4, *, str_groups: bool = True, seed: int = 0, **extra: Any) -> TokenLogs:
    n = n_seq * seq_len
    values, ids, lse = _arrays(n, K, TOP, V, seed)
    levels = np.array([f"s{j}" for j in range(n_seq)], dtype=object) if str_groups else np.arange(
        100, 100 + n_seq, dtype=np.int64)
    fields: dict[str, Any] = dict(
        values=values, indices=ids, lse=lse, card=_card(), groups=np.repeat(np.arange(n_seq), seq_len),
        group_levels=levels, positions=np.tile(np.arange(seq_len, dtype=np.int64), n_seq),
        labels=np.arange(n, dtype=np.int64) % V,
        segments={"domain": SegmentColumn.from_values(np.where(np.arange(n) % 2 == 0, "code", "chat"))},
    )
    fields.update(extra)
    return TokenLogs(**fields)


def _rows(logs: TokenLogs) -> list[dict[str, Any]]:
    """The tokens form as plain rows (built here, not by the writer), for hand-edited files."""
    rows = []
    for i in range(logs.n):
        row: dict[str, Any] = {
            "sequence_id": logs.group_levels[logs.groups[i]].item() if isinstance(
                logs.group_levels[logs.groups[i]], np.generic) else logs.group_levels[logs.groups[i]],
            "position": int(logs.positions[i]),
            "label": int(logs.labels[i]),
            "domain": str(logs.segments["domain"].values()[i]),
        }
        for k in range(logs.n_exits):
            row[f"exit_{k}_values"] = [float(v) for v in logs.values[i, k]]
            row[f"exit_{k}_indices"] = [int(v) for v in logs.indices[i, k]]
            row[f"exit_{k}_lse"] = float(logs.lse[i, k])
        rows.append(row)
    return rows


def _parquet(tmp_path: Path, rows: list[dict[str, Any]], name: str = "tokens.parquet",
             schema: pa.Schema | None = None) -> Path:
    path = tmp_path / name
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def _npz(tmp_path: Path, logs: TokenLogs, name: str = "tokens.npz", **changes: Any) -> Path:
    arrays: dict[str, Any] = {
        "topk_values": logs.values, "topk_indices": logs.indices, "lse": logs.lse,
        "sequence_id": np.asarray(logs.group_levels)[logs.groups].astype(str), "position": logs.positions,
        "labels": logs.labels, "seg_domain": logs.segments["domain"].values().astype(str),
    }
    arrays.update(changes)
    path = tmp_path / name
    np.savez(path, **{key: value for key, value in arrays.items() if value is not None})
    return path


def _error(path: Path, card: ModelCard, *parts: str, exc: type[Exception] = LogFormatError) -> str:
    with pytest.raises(exc) as info:
        load_logs(path, card)
    message = str(info.value)
    assert isinstance(info.value, InputError)
    for part in (str(path), *parts):
        assert part in message, (part, message)
    return message


def _assert_same(a: TokenLogs, b: TokenLogs) -> None:
    assert b.values.dtype == np.float32 and b.indices.dtype == np.int32 and b.lse.dtype == np.float32
    np.testing.assert_array_equal(a.values, b.values)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.lse, b.lse)
    np.testing.assert_array_equal(np.asarray(a.group_levels)[a.groups], np.asarray(b.group_levels)[b.groups])
    assert b.groups.dtype == np.int64 and list(b.group_levels) == sorted(b.group_levels)
    np.testing.assert_array_equal(a.positions, b.positions)
    for name in ("labels", "request_ids", "ts"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None)
        if x is not None:
            np.testing.assert_array_equal(x, y)
    assert sorted(a.segments) == sorted(b.segments)
    for name, col in a.segments.items():
        np.testing.assert_array_equal(col.values(), b.segments[name].values())


# ------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize(("ext", "form"), [(".parquet", "tokens"), (".npz", "token_npz")])
@pytest.mark.parametrize("str_groups", [True, False])
def test_both_forms_round_trip_exactly(tmp_path, ext, form, str_groups):
    logs = _logs(str_groups=str_groups, request_ids=np.repeat(np.array(["a", "b", "c"], dtype=object), 4),
                 ts=np.datetime64("2024-05-01T00:00:00", "us") + np.arange(12).astype("timedelta64[s]"))
    path = write_logs(logs, tmp_path / f"logs{ext}")
    assert detect_form(path) == form
    back = load_logs(path, logs.card)
    assert isinstance(back, TokenLogs) and back.source == str(path)
    _assert_same(logs, back)
    assert back.group_levels.dtype == (object if str_groups else np.int64)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind


def test_synthetic_logs_round_trip_and_form_from_contents(tmp_path):
    logs = synthetic_token_logs(6, 7, n_exits=4, vocab_size=300, top_k=8, seed=3)
    for ext in (".parquet", ".npz"):
        path = write_logs(logs, tmp_path / f"x{ext}")
        bare = path.rename(tmp_path / f"noext_{ext[1:]}")
        assert detect_form(bare) == ("tokens" if ext == ".parquet" else "token_npz")
        _assert_same(logs, load_logs(bare, logs.card))


def test_many_row_groups_keep_file_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(token_writers, "_WRITE_CHUNK_ROWS", 5)
    logs = _logs(4, 5)
    path = write_logs(logs, tmp_path / "rg.parquet")
    assert pq.ParquetFile(path).metadata.num_row_groups == 4
    _assert_same(logs, load_logs(path, logs.card))
    bad = logs.indices.copy()
    bad[13, 2, 1] = V + 7
    broken = TokenLogs(**{**_fields(logs), "indices": bad})
    path = write_logs(broken, tmp_path / "rg_bad.parquet")
    _error(path, logs.card, "row 13 (sequence_id 's2', position 3)", "exit 2 (layer3)", "'exit_2_indices'",
           f"token id {V + 7}")


def _fields(logs: TokenLogs) -> dict[str, Any]:
    return {name: getattr(logs, name) for name in (
        "values", "indices", "lse", "card", "groups", "group_levels", "positions", "labels", "segments",
        "request_ids", "ts")}


@st.composite
def _token_logs(draw: st.DrawFn) -> TokenLogs:
    n_seq = draw(st.integers(1, 4))
    seq_len = draw(st.integers(1, 5))
    n_exits = draw(st.integers(2, 4))
    vocab = draw(st.integers(2, 40))
    top = draw(st.integers(1, vocab))
    seed = draw(st.integers(0, 2**16))
    values, ids, lse = _arrays(n_seq * seq_len, n_exits, top, vocab, seed)
    if top == vocab:  # no tail: lse is the log-sum-exp of the top-k itself
        lse = np.log(np.exp(values.astype(np.float64)).sum(axis=-1)).astype(np.float32) + np.float32(1e-4)
    card = ModelCard(model="lm", exits=tuple(ExitSpec(f"e{k}", float(k + 1)) for k in range(n_exits)),
                     vocab_size=vocab, group_column="g", position_column="pos",
                     segment_columns=("lang",) if draw(st.booleans()) else ())
    str_groups = draw(st.booleans())
    levels = np.array([f"seq-{j}" for j in range(n_seq)], dtype=object) if str_groups else np.arange(
        n_seq, dtype=np.int64) * 7 - 3
    n = n_seq * seq_len
    rng = np.random.default_rng(seed)
    return TokenLogs(
        values=values, indices=ids, lse=lse, card=card, groups=np.repeat(np.arange(n_seq), seq_len),
        group_levels=levels, positions=np.tile(np.arange(seq_len, dtype=np.int64) * 3, n_seq),
        labels=rng.integers(0, vocab, n) if draw(st.booleans()) else None,
        segments={"lang": SegmentColumn.from_values(rng.choice(["en", "de"], n))} if card.segment_columns else {},
        request_ids=np.arange(n, dtype=np.int64) // 2 if draw(st.booleans()) else None,
    )


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(logs=_token_logs(), ext=st.sampled_from([".parquet", ".npz"]))
def test_round_trip_property(tmp_path_factory, logs, ext):
    path = write_logs(logs, tmp_path_factory.mktemp("rt") / f"logs{ext}")
    _assert_same(logs, load_logs(path, logs.card))


# ------------------------------------------------------------------------------ bad values, named


def _edit(rows: list[dict[str, Any]], i: int, key: str, value: Any) -> list[dict[str, Any]]:
    rows[i][key] = value
    return rows


def test_non_finite_values_and_lse(tmp_path):
    logs = _logs()
    rows = _rows(logs)
    rows[5]["exit_1_values"][2] = float("nan")
    _error(_parquet(tmp_path, rows), logs.card, "row 5 (sequence_id 's1', position 1)", "exit 1 (layer2)",
           "'exit_1_values' slot 2 is NaN")
    rows = _edit(_rows(logs), 7, "exit_0_lse", float("inf"))
    _error(_parquet(tmp_path, rows, "inf.parquet"), logs.card, "row 7 (sequence_id 's1', position 3)",
           "exit 0 (layer1)", "'exit_0_lse' is +Inf")
    values = logs.values.copy()
    values[2, 2, 0] = -np.inf
    _error(_npz(tmp_path, logs, topk_values=values), logs.card, "row 2 (sequence_id 's0', position 2)",
           "exit 2 (layer3)", "'topk_values' [:, 2] slot 0 is -Inf")


def test_unsorted_values(tmp_path):
    logs = _logs()
    rows = _rows(logs)
    rows[4]["exit_2_values"][1], rows[4]["exit_2_values"][2] = rows[4]["exit_2_values"][2], rows[4]["exit_2_values"][1]
    _error(_parquet(tmp_path, rows), logs.card, "row 4 (sequence_id 's1', position 0)", "exit 2 (layer3)",
           "'exit_2_values' is not sorted: slot 2", "non-increasing")


@pytest.mark.parametrize("bad_id", [-1, V, 2**40])
def test_token_id_out_of_range(tmp_path, bad_id):
    logs = _logs()
    rows = _rows(logs)
    rows[9]["exit_1_indices"][3] = bad_id
    schema = None if bad_id < 2**31 else pa.Table.from_pylist(rows).schema
    _error(_parquet(tmp_path, rows, schema=schema), logs.card, "row 9 (sequence_id 's2', position 1)",
           "exit 1 (layer2)", "'exit_1_indices' slot 3", f"token id {bad_id}, out of range", f"0..{V - 1}")
    ids = logs.indices.astype(np.int64)
    ids[9, 1, 3] = bad_id
    _error(_npz(tmp_path, logs, topk_indices=ids), logs.card, "row 9 (sequence_id 's2', position 1)",
           "'topk_indices' [:, 1] slot 3", f"token id {bad_id}")


def test_duplicate_ids_in_a_row(tmp_path):
    logs = _logs()
    rows = _rows(logs)
    rows[3]["exit_0_indices"][3] = rows[3]["exit_0_indices"][1]
    _error(_parquet(tmp_path, rows), logs.card, "row 3 (sequence_id 's0', position 3)", "exit 0 (layer1)",
           f"'exit_0_indices' repeats token id {rows[3]['exit_0_indices'][1]} (slots 1 and 3)", "distinct")


def test_ragged_top_k(tmp_path):
    logs = _logs()
    rows = _rows(logs)
    rows[6]["exit_1_indices"] = rows[6]["exit_1_indices"][:3]
    _error(_parquet(tmp_path, rows), logs.card, "row 6 (sequence_id 's1', position 2)", "exit 1 (layer2)",
           "ragged top-k: column 'exit_1_indices' has 3 entries, expected 4")
    rows = _rows(logs)
    for row in rows:  # every row of one exit logs a different k
        row["exit_2_values"] = row["exit_2_values"][:2]
    _error(_parquet(tmp_path, rows, "k.parquet"), logs.card, "row 0 (sequence_id 's0', position 0)", "exit 2",
           "'exit_2_values' has 2 entries, expected 4")


def test_lse_below_top_and_negative_tail(tmp_path):
    logs = _logs()
    rows = _rows(logs)
    rows[10]["exit_2_lse"] = rows[10]["exit_2_values"][0] - 0.5
    _error(_parquet(tmp_path, rows), logs.card, "row 10 (sequence_id 's2', position 2)", "exit 2 (layer3)",
           "'exit_2_lse'", "is below the top value")
    rows = _rows(logs)
    head = float(np.log(np.exp(np.asarray(rows[1]["exit_1_values"], dtype=np.float64)).sum()))
    rows[1]["exit_1_lse"] = head - 0.01  # above the top value, below the top-k's own log-sum-exp
    assert rows[1]["exit_1_lse"] > rows[1]["exit_1_values"][0]
    _error(_parquet(tmp_path, rows, "tail.parquet"), logs.card, "row 1 (sequence_id 's0', position 1)",
           "exit 1 (layer2)", "top-k probabilities sum to", "tail mass would be negative")


def test_tail_within_tolerance_is_accepted(tmp_path):
    logs = _logs()
    rows = _rows(logs)
    head = float(np.log(np.exp(np.asarray(rows[1]["exit_1_values"], dtype=np.float64)).sum()))
    rows[1]["exit_1_lse"] = head - 5e-4  # probabilities sum to ~1.0005: rounding, tolerated
    back = load_logs(_parquet(tmp_path, rows), logs.card)
    assert back.lse[1, 1] == np.float32(head - 5e-4)


def test_duplicate_group_and_position(tmp_path):
    logs = _logs()
    rows = _edit(_rows(logs), 9, "position", 3)  # s2 has positions 0..3: row 9 repeats row 11
    _error(_parquet(tmp_path, rows), logs.card, "row 9 (sequence_id 's2', position 3) and row 11",
           "same token", "(group, position) pair must appear once")
    positions = logs.positions.copy()
    positions[1] = 0
    _error(_npz(tmp_path, logs, position=positions), logs.card, "row 0 (sequence_id 's0', position 0) and row 1")


def test_missing_columns_list_what_the_file_has(tmp_path):
    logs = _logs()
    rows = [{key: v for key, v in row.items() if key not in ("position", "exit_1_lse")} for row in _rows(logs)]
    message = _error(_parquet(tmp_path, rows), logs.card, "missing columns ['position', 'exit_1_lse']",
                     "the file has columns", "'exit_0_values'")
    assert "'sequence_id'" in message.split("the file has columns")[1]
    arrays = _npz(tmp_path, logs, lse=None)
    _error(arrays, logs.card, "missing array ['lse']", "found arrays", "'topk_values'")
    rows = [{key: v for key, v in row.items() if key != "domain"} for row in _rows(logs)]
    _error(_parquet(tmp_path, rows, "seg.parquet"), logs.card, "missing segment column 'domain'")


def test_more_exits_than_the_card(tmp_path):
    logs = _logs()
    rows = _rows(logs)
    for row in rows:
        row["exit_3_values"], row["exit_3_indices"], row["exit_3_lse"] = (
            row["exit_2_values"], row["exit_2_indices"], row["exit_2_lse"])
    _error(_parquet(tmp_path, rows), logs.card, "'exit_3_values' has no exit in the model card", "lists 3 exits")
    _error(_npz(tmp_path, logs, lse=logs.lse[:, :2], topk_values=logs.values[:, :2], topk_indices=logs.indices[:, :2]),
           logs.card, "'topk_values' has 2 exits (axis 1) but the model card lists 3")


@pytest.mark.parametrize(
    ("column", "value", "expected"),
    [
        ("label", V + 1, f"label {V + 1} in column 'label' is out of range: token ids are 0..{V - 1}"),
        ("label", -2, "label -2 in column 'label' is out of range"),
        ("position", -1, "position -1 in column 'position' is negative"),
    ],
)
def test_bad_labels_and_positions(tmp_path, column, value, expected):
    logs = _logs()
    rows = _edit(_rows(logs), 8, column, value)
    _error(_parquet(tmp_path, rows), logs.card, "row 8 (sequence_id 's2'", expected)


def test_nulls_are_named(tmp_path):
    logs = _logs()
    rows = _edit(_rows(logs), 2, "label", None)
    _error(_parquet(tmp_path, rows), logs.card, "row 2 (sequence_id 's0', position 2)", "label column 'label' is null")
    rows = _edit(_rows(logs), 5, "exit_2_values", None)
    _error(_parquet(tmp_path, rows, "v.parquet"), logs.card, "row 5 (sequence_id 's1', position 1)",
           "exit 2 (layer3)", "'exit_2_values' is missing (null)")
    rows = _rows(logs)
    rows[6]["exit_0_indices"][2] = None
    _error(_parquet(tmp_path, rows, "i.parquet"), logs.card, "row 6 (sequence_id 's1', position 2)",
           "'exit_0_indices' has a null at slot 2")
    rows = _edit(_rows(logs), 4, "sequence_id", None)
    _error(_parquet(tmp_path, rows, "g.parquet"), logs.card, "row 4 (sequence_id None, position 0)",
           "group column 'sequence_id' is null")
    rows = _edit(_rows(logs), 11, "exit_1_lse", None)
    _error(_parquet(tmp_path, rows, "l.parquet"), logs.card, "row 11 (sequence_id 's2', position 3)",
           "'exit_1_lse' is missing (null)")


def test_wrong_types(tmp_path):
    logs = _logs()
    rows = _rows(logs)
    for row in rows:
        row["exit_0_indices"] = [float(v) for v in row["exit_0_indices"]]
    _error(_parquet(tmp_path, rows), logs.card, "'exit_0_indices' holds lists of double; token ids must be integers")
    rows = [{**row, "position": float(row["position"])} for row in _rows(logs)]
    _error(_parquet(tmp_path, rows, "p.parquet"), logs.card, "position column 'position' has type double")
    rows = [{**row, "sequence_id": 0.5} for row in _rows(logs)]
    _error(_parquet(tmp_path, rows, "g.parquet"), logs.card, "group column 'sequence_id' has type double")
    _error(_npz(tmp_path, logs, topk_indices=logs.indices.astype(np.float32)), logs.card,
           "array 'topk_indices' has dtype float32; expected integer token ids")
    _error(_npz(tmp_path, logs, lse=logs.lse[:, :, None]), logs.card, "array 'lse' has shape (12, 3, 1)")
    _error(_npz(tmp_path, logs, labels=logs.labels[:5]), logs.card, "array 'labels' has shape (5,), expected (12,)")


def test_classification_file_with_token_card_and_vice_versa(tmp_path):
    synth = synthetic_logs(20, K, 5, segments={"domain": 2}, seed=1)
    card = _card()
    for form, ext in (("wide", ".parquet"), ("long", ".parquet")):
        path = write_logs(synth, tmp_path / f"{form}{ext}", form=form)
        _error(path, card, "missing columns", "looks like classification logits", "'vocab_size'")
    path = write_logs(synth, tmp_path / "c.npz")
    _error(path, card, "missing arrays", "classification logits", "'vocab_size'")
    path = write_logs(synth, tmp_path / "c.jsonl")
    _error(path, card, "token-level logs", "not 'jsonl'")
    logs = _logs()
    classifier = ModelCard(model="lm", exits=logs.card.exits, classes=tuple(str(j) for j in range(V)))
    for ext, held in ((".parquet", "exit_k_values"), (".npz", "'topk_values'")):
        path = write_logs(logs, tmp_path / f"t{ext}")
        _error(path, classifier, "holds token-level logs", held, "no 'vocab_size'", exc=CardError)
    with pytest.raises(LogFormatError, match="unknown log form 'tokenz'"):
        load_logs(path, card, form="tokenz")


def test_empty_and_corrupt_files(tmp_path):
    logs = _logs()
    rows = _rows(logs)
    schema = pa.Table.from_pylist(rows).schema
    _error(_parquet(tmp_path, [], "empty.parquet", schema=schema), logs.card, "empty file (no rows)")
    _error(_npz(tmp_path, logs, "e.npz", topk_values=logs.values[:0], topk_indices=logs.indices[:0], lse=logs.lse[:0],
                sequence_id=np.zeros(0, str), position=np.zeros(0, np.int64), labels=None, seg_domain=None), logs.card,
           "empty file (no rows)")
    (tmp_path / "zero.parquet").write_bytes(b"")
    _error(tmp_path / "zero.parquet", logs.card, "empty file")
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 not really parquet")
    _error(tmp_path / "junk.parquet", logs.card, "cannot read Parquet file (corrupt or not Parquet)")
    good = write_logs(logs, tmp_path / "good.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(good[: len(good) // 2])
    _error(tmp_path / "cut.npz", logs.card, "cannot read NPZ file (corrupt or not NPZ)")


def test_writer_refusals(tmp_path):
    logs = _logs()
    with pytest.raises(InputError, match="not 'wide'"):
        write_logs(logs, tmp_path / "x.parquet", form="wide")
    with pytest.raises(InputError, match="float32"):
        write_logs(logs, tmp_path / "x.parquet", dtype=np.float16)
    with pytest.raises(InputError, match="cannot tell the log form"):
        write_logs(logs, tmp_path / "x.jsonl")
    with pytest.raises(InputError, match="without groups"):
        write_logs(TokenLogs(**{**_fields(logs), "groups": None}), tmp_path / "x.parquet")
    assert list(tmp_path.iterdir()) == []


def test_card_without_groups_reads_positions_only(tmp_path):
    logs = _logs()
    card = _card(group_column=None)
    plain = TokenLogs(**{**_fields(logs), "card": card, "groups": None, "group_levels": None})
    for ext in (".parquet", ".npz"):
        back = load_logs(write_logs(plain, tmp_path / f"ng{ext}"), card)
        assert back.groups is None and back.group_levels is None
        np.testing.assert_array_equal(back.values, logs.values)


# ------------------------------------------------------------------------------ detection


def test_detection_tells_token_forms_from_classification_forms(tmp_path):
    synth = synthetic_logs(10, 3, 4, seed=0)
    assert detect_form(write_logs(synth, tmp_path / "w.parquet")) == "wide"
    assert detect_form(write_logs(synth, tmp_path / "n.npz")) == "npz"
    logs = _logs()
    assert detect_form(write_logs(logs, tmp_path / "t.parquet")) == "tokens"
    assert detect_form(write_logs(logs, tmp_path / "t.npz")) == "token_npz"
    pq.write_table(pa.table({"exit_0_values": [[1.0]]}), tmp_path / "only.parquet")
    assert detect_form(tmp_path / "only.parquet") == "tokens"
    np.savez(tmp_path / "bare.npz", topk_values=np.zeros((1, 2, 1)))
    assert detect_form(tmp_path / "bare.npz") == "token_npz"


# ------------------------------------------------------------------------------ cards


GOOD = {"model": "lm", "exits": [{"name": "a", "cost": 1.0}, {"name": "b", "cost": 2.0}], "vocab_size": 4096}


def test_token_card_fields_round_trip(tmp_path):
    card = card_from_dict({**GOOD, "position_column": "pos", "segment_columns": ["file_kind"]})
    assert (card.vocab_size, card.group_column, card.position_column) == (4096, "sequence_id", "pos")
    assert card.token_level
    assert load_card(write_card(card, tmp_path / "card.json")) == card
    (tmp_path / "card.yaml").write_text(yaml.safe_dump(card_to_dict(card)))
    assert load_card(tmp_path / "card.yaml") == card
    written = json.loads((tmp_path / "card.json").read_text())
    assert (written["vocab_size"], written["group_column"], written["position_column"]) == (4096, "sequence_id", "pos")
    no_groups = card_from_dict({**GOOD, "group_column": None})
    assert no_groups.group_column is None
    assert card_from_dict(card_to_dict(no_groups)) == no_groups
    named = card_from_dict({**GOOD, "group_column": "conversation"})
    assert named.group_column == "conversation"


def test_classification_card_is_written_as_before():
    card = card_from_dict({"model": "m", "exits": GOOD["exits"], "classes": ["x", "y"]})
    assert not card.token_level and card.group_column is None
    assert sorted(card_to_dict(card)) == ["classes", "exits", "id_column", "label_column", "model", "segment_columns"]
    grouped = card_from_dict({"model": "m", "exits": GOOD["exits"], "group_column": "user"})
    assert card_to_dict(grouped)["group_column"] == "user" and grouped.group_column == "user"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"vocab_size": "32000"}, "field 'vocab_size' must be an integer in 2..4194304"),
        ({"vocab_size": True}, "field 'vocab_size' must be an integer"),
        ({"vocab_size": 1}, "field 'vocab_size' must be an integer"),
        ({"vocab_size": 32000.0}, "field 'vocab_size' must be an integer"),
        ({"classes": ["x", "y"]}, "fields 'classes' and 'vocab_size' exclude each other"),
        ({"group_column": 7}, "field 'group_column' must be a non-empty column name"),
        ({"position_column": ""}, "field 'position_column' must be a non-empty column name"),
        ({"group_column": "label"}, "field 'group_column': 'label' is already used as label_column"),
        ({"group_column": "request_id"}, "field 'group_column': 'request_id' is already used as id_column"),
        ({"position_column": "ts"}, "field 'position_column': 'ts' is already used as the time column"),
        ({"group_column": "lang", "segment_columns": ["lang"]}, "field 'group_column': 'lang' is already a segment"),
        ({"group_column": "exit_0_values"}, "'exit_0_values' is the name of an exit-log data column"),
        ({"position_column": "topk_indices"}, "'topk_indices' is the name of an exit-log data column"),
        ({"group_column": "position"}, "fields 'group_column' and 'position_column' are both 'position'"),
        ({"segment_columns": ["exit_2_lse"]}, "'exit_2_lse' is already used as a non-segment column"),
        ({"vocab": 3}, "unknown field 'vocab'"),
    ],
)
def test_bad_token_card_fields_name_the_field(tmp_path, change, expected):
    path = tmp_path / "card.json"
    path.write_text(json.dumps({**GOOD, **change}))
    with pytest.raises(CardError) as info:
        load_card(path)
    assert str(path) in str(info.value) and expected in str(info.value), str(info.value)
