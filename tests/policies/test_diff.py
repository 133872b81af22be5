"""The one policy diff engine (exitwise.policies.diff): exact values, structural changes, cells paired by name."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest

from exitwise.policies.diff import FieldChange, diff_documents, same


def _doc() -> dict[str, Any]:
    """A small policy document: 3 exits (2 early), 3 classes, a default and a 'mobile' table, a null 'scan'."""
    return {
        "schema": "exitwise.policy/v1",
        "model": {"name": "m", "version": "1"},
        "exits": [{"name": "s1", "cost": 1.0, "calibrator": {"type": "temperature", "temperature": 1.2}},
                  {"name": "s2", "cost": 2.0}, {"name": "final", "cost": 4.0}],
        "classes": ["a", "b", "c"],
        "score": "max_prob",
        "thresholds": {"default": [[0.9, None, 0.8], [0.85, 0.95, None]],
                       "mobile": [[0.92, 0.97, 0.81], None],
                       "scan": None},
        "guarantee": {"risk": "disagreement", "eps": 0.02, "delta": 0.05, "method": "ltt", "n": 1000,
                      "certified": True, "segments": {"__all__": {"eps": 0.02, "n": 1000, "upper_bound": 0.018,
                                                                  "certified": True}}},
        "expected": {"compute_fraction": 0.6, "risk": 0.012, "batch_compute_fraction": {"1": 0.6, "8": 0.9}},
        "data": {"fingerprint": "sha256:abc"},
        "parent": None,
        "content_hash": "0" * 64,
    }


def _changed(diff: Any) -> dict[str, tuple[Any, Any]]:
    return {f.path: (f.before, f.after) for f in diff.changed}


def test_exact_equality_of_json_values() -> None:
    assert same(1, 1.0) and same(math.nan, math.nan) and same(None, None) and same("x", "x")
    assert not same(True, 1) and not same(0, False) and not same(None, 0) and not same(0.1, 0.1 + 1e-17 + 1e-16)
    assert same({"a": [1, {"b": math.nan}]}, {"a": (1.0, {"b": math.nan})})
    assert not same({"a": 1}, {"a": 1, "b": None}) and not same([1, 2], [1, 2, 3])
    assert same(10**400, 10**400) and not same(10**400, 10**400 + 1)  # integers beyond float range


def test_identical_documents() -> None:
    doc = _doc()
    other = {**copy.deepcopy(doc), "version": 7, "state": "active", "content_hash": "1" * 64}  # governance only
    d = diff_documents(doc, other)
    assert d.identical and d.changed_fields == () and d.changed == () and d.thresholds == ()
    assert d.cells_compared == 3 * 2 * 3  # default, mobile, scan x 2 early exits x 3 classes
    assert not d.unpaired and d.before_hash == "0" * 64 and d.after_hash == "1" * 64
    assert all(isinstance(f, FieldChange) and not f.changed for f in d.fields)


def test_a_change_is_never_rounded_away() -> None:
    a, b = _doc(), _doc()
    b["thresholds"]["default"][0][0] = 0.9 + 1e-13
    b["guarantee"]["eps"] = 0.02 + 1e-15
    d = diff_documents(a, b)
    assert [(t.segment, t.exit, t.exit_name, t.class_, t.before, t.after) for t in d.thresholds] == [
        ("default", 0, "s1", "a", 0.9, 0.9 + 1e-13)]  # mobile and scan have their own tables
    assert _changed(d) == {"guarantee.eps": (0.02, 0.02 + 1e-15)}
    assert d.guarantee["eps"] == (0.02, 0.02 + 1e-15) and d.changed_fields == ("guarantee", "thresholds")


def test_segments_read_the_default_as_the_decision_rule_does() -> None:
    a, b = _doc(), _doc()
    b["thresholds"]["studio"] = copy.deepcopy(a["thresholds"]["default"])  # an own table equal to the default
    del b["thresholds"]["scan"]  # scan now reads the default instead of never exiting
    b["thresholds"]["default"][1][2] = 0.7  # null -> 0.7: every segment without a table exits there now
    d = diff_documents(a, b)
    cells = {(t.segment, t.exit_name, t.class_): (t.before, t.after) for t in d.thresholds}
    assert cells == {
        ("default", "s2", "c"): (None, 0.7),
        ("scan", "s1", "a"): (None, 0.9), ("scan", "s1", "c"): (None, 0.8),
        ("scan", "s2", "a"): (None, 0.85), ("scan", "s2", "b"): (None, 0.95), ("scan", "s2", "c"): (None, 0.7),
    }  # studio: b's own table equals a's default, which a's studio read
    assert d.cells_compared == 4 * 2 * 3
    assert _changed(d) == {"thresholds.segments": (["mobile", "scan"], ["mobile", "studio"])}


def test_an_inserted_exit_is_a_field_change_and_the_others_pair_by_name() -> None:
    a, b = _doc(), _doc()
    b["exits"].insert(1, {"name": "s1b", "cost": 1.5})
    b["thresholds"] = {k: None if v is None else [v[0], [0.5, 0.5, 0.5], *v[1:]]
                       for k, v in copy.deepcopy(a["thresholds"]).items()}
    d = diff_documents(a, b)
    assert d.thresholds == ()  # s1 and s2 keep their thresholds; s1b is not paired with s2
    assert d.cells_compared == 3 * 2 * 3
    assert (d.unpaired.exits_before, d.unpaired.exits_after) == ((), ("s1b",))
    assert _changed(d) == {"exits": (["s1", "s2", "final"], ["s1", "s1b", "s2", "final"])}
    b["thresholds"]["default"][2][0] = 0.86  # s2's first cell, now at index 2
    (t,) = diff_documents(a, b).thresholds
    assert (t.exit, t.exit_name, t.class_, t.before, t.after) == (2, "s2", "a", 0.85, 0.86)


def test_reordered_and_renamed_classes() -> None:
    a, b = _doc(), _doc()
    order = [2, 0, 1]
    b["classes"] = [a["classes"][i] for i in order]
    b["thresholds"] = {k: None if v is None else [None if r is None else [r[i] for i in order] for r in v]
                       for k, v in a["thresholds"].items()}
    d = diff_documents(a, b)
    assert d.thresholds == () and not d.unpaired and _changed(d) == {"classes": (["a", "b", "c"], ["c", "a", "b"])}
    b["classes"][0] = "z"  # renamed: its cells cannot be paired
    d = diff_documents(a, b)
    assert (d.unpaired.classes_before, d.unpaired.classes_after) == (("c",), ("z",))
    assert d.cells_compared == 3 * 2 * 2 and d.thresholds == ()


def test_calibrators_costs_and_other_fields_are_reviewed() -> None:
    a, b = _doc(), _doc()
    b["exits"][0]["calibrator"] = {"type": "temperature", "temperature": 1.25}
    b["exits"][2]["cost"] = 4.5
    b["forced_full_depth"] = {"classes": ["b"], "segments": []}
    b["model"]["version"] = "2"
    b["solver"] = {"grid": 100}  # not a reviewed field, still named
    d = diff_documents(a, b)
    assert _changed(d) == {
        "model.version": ("1", "2"),
        "exits.s1.calibrator": ({"type": "temperature", "temperature": 1.2},
                                {"type": "temperature", "temperature": 1.25}),
        "exits.final.cost": (4.0, 4.5),
        "forced_full_depth.classes": ([], ["b"]),
    }
    assert d.changed_fields == ("exits", "forced_full_depth", "model", "solver") and d.thresholds == ()


def test_repeated_names_pair_with_their_own_repeat() -> None:
    a, b = _doc(), _doc()
    for doc in (a, b):
        doc["exits"][1]["name"] = "s1"  # two early exits named s1
    b["thresholds"]["default"][1][0] = 0.5
    (t,) = diff_documents(a, b).thresholds
    assert (t.exit, t.exit_name, t.before, t.after) == (1, "s1", 0.85, 0.5)


@pytest.mark.parametrize("key", ["guarantee", "expected", "thresholds", "data"])
def test_missing_sections_do_not_break_the_diff(key: str) -> None:
    a, b = _doc(), _doc()
    del b[key]
    d = diff_documents(a, b)
    assert key in d.changed_fields and not d.identical
