"""The decision rule against a per-sample reference written from the design contract's wording."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exitwise.calibration.rule import (
    CompiledPolicy,
    calibrated_probs,
    decide,
    exit_scores,
    route,
    softmax,
)

CLASSES = ["a", "b", "c", "d"]


def _doc(k: int, c: int, thresholds: dict, **extra) -> dict:
    doc = {
        "exits": [{"name": f"e{i}", "cost": float(i + 1), "calibrator": {"type": "temperature", "temperature": 1.5}}
                  for i in range(k)],
        "classes": CLASSES[:c],
        "score": "max_prob",
        "segment_keys": ["region"],
        "thresholds": thresholds,
    }
    doc.update(extra)
    return doc


def _reference_exit(doc: dict, logits: np.ndarray, segment: str) -> int:
    """Per-sample reading of the design contract's rule, with plain Python maths."""
    k_total = len(doc["exits"])
    forced = doc.get("forced_full_depth") or {}
    for k in range(k_total - 1):
        t = doc["exits"][k]["calibrator"]["temperature"]
        z = [float(v) / t for v in logits[k]]
        m = max(z)
        e = [math.exp(v - m) for v in z]
        p = [v / sum(e) for v in e]
        c = int(np.argmax(logits[k]))
        score = p[c]
        table = doc["thresholds"].get(segment, doc["thresholds"]["default"])
        row = None if table is None else table[k]
        tau = None if row is None else row[c]
        if doc.get("killed") or (doc.get("max_exit") is not None and k > doc["max_exit"]):
            continue
        if doc["classes"][c] in forced.get("classes", []) or segment in forced.get("segments", []):
            continue
        if tau is not None and score >= tau:
            return k
    return k_total - 1


thresholds_strategy = st.one_of(st.none(), st.floats(0.2, 1.0))


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    k=st.integers(2, 4),
    c=st.integers(2, 4),
    data=st.data(),
)
def test_route_matches_per_sample_reference(seed: int, k: int, c: int, data: st.DataObject) -> None:
    rng = np.random.default_rng(seed)
    n = 40
    logits = (rng.normal(size=(n, k, c)) * 3).astype(np.float32)
    segs = rng.choice(["eu", "us", "apac"], size=n)
    rows = lambda: [  # noqa: E731
        data.draw(st.one_of(st.none(), st.lists(thresholds_strategy, min_size=c, max_size=c))) for _ in range(k - 1)
    ]
    thresholds = {"default": rows(), "eu": rows()}
    forced = {"classes": data.draw(st.lists(st.sampled_from(CLASSES[:c]), max_size=1)),
              "segments": data.draw(st.lists(st.sampled_from(["us", "apac"]), max_size=1))}
    max_exit = data.draw(st.one_of(st.none(), st.integers(0, k - 1)))
    doc = _doc(k, c, thresholds, forced_full_depth=forced, max_exit=max_exit,
               killed=data.draw(st.booleans()))
    policy = CompiledPolicy.from_document(doc)
    got = route(policy, logits, segs)
    want = np.array([_reference_exit(doc, logits[i], segs[i]) for i in range(n)])
    np.testing.assert_array_equal(got.exit, want)
    np.testing.assert_array_equal(got.answer, logits[np.arange(n), want].argmax(axis=1))
    # decide() at each exit agrees with route() on the samples still pending there
    pending = np.ones(n, dtype=bool)
    for j in range(k):
        mask = decide(policy, j, logits[:, j, :], segs)
        np.testing.assert_array_equal(mask[pending], got.exit[pending] == j)
        pending &= ~mask


def test_last_exit_always_answers_and_killed_never_exits_early() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 3, 3)).astype(np.float32)
    doc = _doc(3, 3, {"default": [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]})
    assert (route(CompiledPolicy.from_document(doc), logits).exit == 0).all()
    doc["killed"] = True
    killed = CompiledPolicy.from_document(doc)
    assert (route(killed, logits).exit == 2).all()
    assert decide(killed, 2, logits[:, 2, :]).all()


def test_unknown_segment_falls_back_to_default() -> None:
    logits = np.array([[[5.0, 0.0], [5.0, 0.0]]] * 2, dtype=np.float32)
    doc = _doc(2, 2, {"default": [[0.5, 0.5]], "eu": [None]})
    policy = CompiledPolicy.from_document(doc)
    np.testing.assert_array_equal(route(policy, logits, ["eu", "mars"]).exit, [1, 0])


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), shift=st.floats(-50, 50), t=st.floats(0.05, 20))
def test_calibrated_probs_shift_invariant_and_normalised(seed: int, shift: float, t: float) -> None:
    z = np.random.default_rng(seed).normal(size=(20, 5)) * 4
    platt = {"type": "platt", "coef": [0.7, 0.3, 0.2], "intercept": -0.1}
    for cal in ({"type": "temperature", "temperature": t}, platt):
        p, pred = calibrated_probs(z, cal)
        p2, pred2 = calibrated_probs(z + shift, cal)
        np.testing.assert_allclose(p, p2, atol=1e-9)
        np.testing.assert_array_equal(pred, pred2)
        np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-9)
        assert (p >= 0).all()


def test_temperature_one_is_identity_and_scores_are_in_range() -> None:
    z = np.random.default_rng(1).normal(size=(30, 6)) * 3
    p1, _ = calibrated_probs(z, {"type": "temperature", "temperature": 1.0})
    p0, _ = calibrated_probs(z, {"type": "identity"})
    np.testing.assert_array_equal(p1, p0)
    np.testing.assert_allclose(p0, softmax(z))
    for score in ("max_prob", "margin", "entropy"):
        s, _ = exit_scores(z, {"type": "identity"}, score)
        assert ((s >= -1e-12) & (s <= 1 + 1e-12)).all()


def test_max_prob_score_monotone_in_top_logit() -> None:
    z = np.zeros((10, 3))
    z[:, 0] = np.linspace(0.1, 5, 10)
    s, pred = exit_scores(z, {"type": "temperature", "temperature": 2.0}, "max_prob")
    assert (pred == 0).all() and (np.diff(s) > 0).all()


def test_chunked_scores_equal_unchunked(monkeypatch: pytest.MonkeyPatch) -> None:
    z = np.random.default_rng(2).normal(size=(1000, 7)).astype(np.float32)
    full = exit_scores(z, {"type": "temperature", "temperature": 0.7}, "margin")
    monkeypatch.setattr("exitwise.calibration.rule._CHUNK_ELEMENTS", 70)
    chunked = exit_scores(z, {"type": "temperature", "temperature": 0.7}, "margin")
    np.testing.assert_array_equal(full[0], chunked[0])
    np.testing.assert_array_equal(full[1], chunked[1])


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["thresholds"].update(default=[[0.5, 0.5]]), "must have 2 rows"),
        (lambda d: d["thresholds"].update(default=[[0.5], [0.5]]), "must have 2 entries"),
        (lambda d: d.update(forced_full_depth={"classes": ["zzz"]}), "'zzz'"),
        (lambda d: d.update(score="nope"), "unknown score"),
    ],
)
def test_malformed_documents_are_rejected(mutate, message: str) -> None:
    doc = _doc(3, 2, {"default": [[0.5, 0.5], None]})
    mutate(doc)
    with pytest.raises(ValueError, match=message):
        CompiledPolicy.from_document(doc)


def test_decide_validates_shapes() -> None:
    policy = CompiledPolicy.from_document(_doc(3, 2, {"default": [[0.5, 0.5], None]}))
    with pytest.raises(ValueError, match=r"shape \(n, 2\)"):
        decide(policy, 0, np.zeros((4, 3)))
    with pytest.raises(ValueError, match="out of range"):
        decide(policy, 3, np.zeros((4, 2)))


def test_rule_imports_numpy_only() -> None:
    code = (
        "import sys, exitwise.calibration.rule, exitwise.policies.canonical\n"
        "bad = [m for m in ('pandas', 'pyarrow', 'scipy', 'sqlalchemy', 'fastapi', 'mlflow', 'sklearn')"
        " if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), t=st.floats(0.05, 20), c=st.integers(2, 12))
def test_fast_scores_agree_with_full_probabilities(seed: int, t: float, c: int) -> None:
    from exitwise.calibration.rule import score_from_probs

    z = (np.random.default_rng(seed).normal(size=(50, c)) * 5).astype(np.float32)
    for cal in ({"type": "temperature", "temperature": t},
                {"type": "platt", "coef": [0.8, 0.5, -0.3], "intercept": 0.2}):
        p, pred = calibrated_probs(z, cal)
        for score in ("max_prob", "margin", "entropy"):
            fast, fast_pred = exit_scores(z, cal, score)
            np.testing.assert_array_equal(fast_pred, pred)
            np.testing.assert_allclose(fast, score_from_probs(p, pred, score), rtol=1e-9, atol=1e-10)
