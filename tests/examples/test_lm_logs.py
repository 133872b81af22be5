"""The LM example's shipped token logs (examples/data/lm): the Token Parquet rules checked with pyarrow
and numpy alone, then the logs through the project's reader, solver and evaluator."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from exitwise.calibration.evaluate import evaluate
from exitwise.calibration.groups import GroupIndex, split_groups
from exitwise.calibration.logfiles.cards import load_card
from exitwise.calibration.logfiles.readers import load_logs
from exitwise.calibration.pipeline import SolveSpec, solve

DATA = Path(__file__).resolve().parents[2] / "examples" / "data" / "lm"


@pytest.fixture(scope="module")
def card() -> dict[str, Any]:
    return json.loads((DATA / "card.json").read_text())


@pytest.fixture(scope="module")
def meta() -> dict[str, Any]:
    return json.loads((DATA / "metadata.json").read_text())


@pytest.fixture(scope="module")
def table() -> dict[str, np.ndarray]:
    t = pq.read_table(DATA / "tokens.parquet")
    out = {c: t[c].to_numpy() for c in ("sequence_id", "position", "label", "exit_0_lse")}
    out["file_kind"] = np.asarray(t["file_kind"].to_pylist())
    for j in range(6):
        out[f"values{j}"] = np.stack(t[f"exit_{j}_values"].to_numpy(zero_copy_only=False))
        out[f"indices{j}"] = np.stack(t[f"exit_{j}_indices"].to_numpy(zero_copy_only=False))
        out[f"lse{j}"] = t[f"exit_{j}_lse"].to_numpy()
        assert t.schema.field(f"exit_{j}_values").type.value_type == "float"
        assert t.schema.field(f"exit_{j}_indices").type.value_type == "int32"
    return out


def test_card_describes_token_logs(card: dict[str, Any]) -> None:
    assert card["vocab_size"] == 4096
    assert (card["group_column"], card["position_column"], card["label_column"]) == ("sequence_id", "position", "label")
    assert card["segment_columns"] == ["file_kind"]
    costs = [e["cost"] for e in card["exits"]]
    assert len(costs) == 6 and costs[0] > 0 and bool((np.diff(costs) > 0).all())


def test_shipped_logs_fit_the_budget() -> None:
    assert (DATA / "tokens.parquet").stat().st_size + (DATA / "card.json").stat().st_size < 5_000_000


def test_rows_follow_the_token_parquet_rules(table: dict[str, np.ndarray], card: dict[str, Any]) -> None:
    seq, pos = table["sequence_id"], table["position"]
    keys = seq * 1000 + pos
    assert len(np.unique(keys)) == len(keys)  # (group, position) unique
    assert set(np.unique(pos)) == set(range(32, 64))
    assert set(table["file_kind"]) <= {"module", "package", "codec"}
    assert ((table["label"] >= 0) & (table["label"] < card["vocab_size"])).all()
    for j in range(6):
        v, i, lse = table[f"values{j}"], table[f"indices{j}"], table[f"lse{j}"]
        assert v.shape == i.shape == (len(seq), 8)
        assert np.isfinite(v).all() and np.isfinite(lse).all()
        assert (np.diff(v, axis=1) <= 0).all()
        srt = np.sort(i, axis=1)
        assert (srt[:, 1:] != srt[:, :-1]).all() and i.min() >= 0 and i.max() < card["vocab_size"]
        assert (lse >= v[:, 0]).all()
        assert (np.exp(v.astype(np.float64) - lse[:, None]).sum(1) <= 1 + 1e-3).all()


def test_metadata_matches_the_rows(table: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    y = table["label"]
    last = table["indices5"][:, 0]
    for j in range(6):
        pred = table[f"indices{j}"][:, 0]
        assert (pred == y).mean() == pytest.approx(meta["accuracy"][j], abs=6e-5)
        assert (pred != last).mean() == pytest.approx(meta["disagreement_with_last"][j], abs=6e-5)
    assert meta["rows"] == len(y) and meta["sequences"] == len(np.unique(table["sequence_id"]))


def test_shipped_logs_certify_a_sequence_policy_that_holds_on_the_other_half() -> None:
    """The project's reader loads the example's logs; a policy certified on half the sequences
    keeps its sequence-level promise on the other half and saves compute."""
    logs = load_logs(DATA / "tokens.parquet", load_card(DATA / "card.json"))
    groups = GroupIndex.from_values(logs.groups)
    cal, held = split_groups(groups, groups.n_groups // 2, seed=0)
    sol = solve(logs.take(cal), SolveSpec(risk="sequence_disagreement", eps=0.05))
    assert sol.certified
    ev = evaluate(sol.policy, logs.take(held), risk="sequence_disagreement")
    assert ev.groups["sequence_disagreement"] <= 0.05 and ev.compute_fraction < 0.95
