"""Canonical form, content hash and document validation (design contract, "The policy document")."""

from __future__ import annotations

import copy
import hashlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from exitwise.policies.canonical import canonical_json, content_hash, verify_content_hash, with_content_hash
from exitwise.policies.schema import DocumentError, validate_document


def _minimal() -> dict:
    return with_content_hash({
        "schema": "exitwise.policy/v1",
        "model": {"name": "m", "version": "1"},
        "exits": [{"name": "e0", "cost": 1.0, "calibrator": {"type": "temperature", "temperature": 1.2}},
                  {"name": "e1", "cost": 2.0, "calibrator": {"type": "identity"}}],
        "classes": ["x", "y"],
        "score": "max_prob",
        "segment_keys": [],
        "thresholds": {"default": [[0.9, None]]},
        "forced_full_depth": {"classes": [], "segments": []},
        "max_exit": None,
        "shadow_rate": 0.01,
        "guarantee": {"risk": "disagreement", "eps": 0.01, "delta": 0.05, "method": "ltt", "n": 100,
                      "certified": True, "segments": {}},
        "expected": {"compute_fraction": 0.7},
        "data": {"fingerprint": "sha256:00"},
        "parent": None,
    })


def test_canonical_form_is_sorted_compact_utf8() -> None:
    assert canonical_json({"b": 1, "a": ["é", 2.5]}) == '{"a":["é",2.5],"b":1}'.encode()


def test_hash_is_sha256_of_canonical_form_without_governance_fields() -> None:
    doc = _minimal()
    body = {k: v for k, v in doc.items() if k != "content_hash"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    want = hashlib.sha256(text.encode()).hexdigest()
    assert doc["content_hash"] == want
    governed = dict(doc, version=3, state="approved", approvals=[{"by": "bob"}], killed=True)
    assert content_hash(governed) == want and verify_content_hash(governed)


@given(st.dictionaries(st.text(max_size=5), st.one_of(st.integers(), st.floats(allow_nan=False, allow_infinity=False),
                                                       st.text(max_size=5), st.none()), max_size=6))
def test_canonical_json_round_trips(doc: dict) -> None:
    assert json.loads(canonical_json(doc)) == doc
    assert canonical_json(json.loads(canonical_json(doc))) == canonical_json(doc)


def test_any_content_change_changes_the_hash() -> None:
    doc = _minimal()
    changed = copy.deepcopy(doc)
    changed["thresholds"]["default"][0][0] = 0.91
    assert content_hash(changed) != doc["content_hash"]
    assert not verify_content_hash(changed)


def test_non_finite_numbers_are_refused() -> None:
    with pytest.raises(ValueError, match=r"non-finite number at \$\.a\[1\]"):
        canonical_json({"a": [1.0, float("nan")]})


def test_valid_document_validates() -> None:
    parsed = validate_document(_minimal())
    assert parsed.model.name == "m"
    assert parsed.to_json_dict()["schema"] == "exitwise.policy/v1"


@pytest.mark.parametrize(
    ("mutate", "where"),
    [
        (lambda d: d.update(schema="other/v9"), "schema"),
        (lambda d: d["thresholds"].update(default=[[0.9, None], [0.1, 0.1]]), "thresholds"),
        (lambda d: d["thresholds"].update(default=[[0.9]]), "thresholds['default'][0]"),
        (lambda d: d["exits"][1].update(cost=0.5), "exits[1].cost"),
        (lambda d: d["guarantee"].update(eps=1.5), "guarantee.eps"),
        (lambda d: d.update(max_exit=5), "max_exit"),
        (lambda d: d["forced_full_depth"].update(classes=["q"]), "unknown classes"),
        (lambda d: d["exits"][0].update(calibrator={"type": "temperature"}), "temperature"),
        (lambda d: d.pop("guarantee"), "guarantee"),
    ],
)
def test_invalid_documents_name_the_problem(mutate, where: str) -> None:
    doc = _minimal()
    mutate(doc)
    doc = with_content_hash(doc) if "schema" in doc and doc["schema"] == "exitwise.policy/v1" else doc
    with pytest.raises(DocumentError) as info:
        validate_document(doc)
    assert where in str(info.value)


def test_tampered_hash_is_refused() -> None:
    doc = _minimal()
    doc["shadow_rate"] = 0.5
    with pytest.raises(DocumentError, match="content_hash: does not match"):
        validate_document(doc)
