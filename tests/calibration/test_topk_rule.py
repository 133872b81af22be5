"""Scores from the top-k of a large vocabulary, and the policies whose threshold columns are token buckets.

The references are independent of :mod:`exitwise.calibration.topk`: the dense scores of the
full logits (the classification rule), rows whose tail is truly equal (where the tail model is
the truth), and per-row arithmetic with ``math.fsum``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exitwise.calibration.buckets import encode_bucket_map
from exitwise.calibration.rule import CompiledPolicy, decide, exit_scores
from exitwise.calibration.topk import dense_topk, topk_exit_scores

SCORES = ("max_prob", "margin", "entropy")
PLATT = {"type": "platt", "coef": [0.9, 1.4, -0.6], "intercept": 0.3}


def _calibrators(t: float) -> list[dict]:
    return [{"type": "identity"}, {"type": "temperature", "temperature": t}, PLATT]


def _logits(seed: int, n: int, v: int, scale: float, ties: bool) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if ties:  # few distinct values: many ties, also at the k-th value
        return rng.integers(0, 4, size=(n, v)).astype(np.float64) * scale
    return rng.normal(size=(n, v)) * scale


rows = st.builds(_logits, seed=st.integers(0, 2**31 - 1), n=st.integers(1, 6), v=st.integers(2, 60),
                 scale=st.floats(0.05, 8.0), ties=st.booleans())


@settings(max_examples=60, deadline=None)
@given(x=rows, t=st.floats(0.2, 5.0))
def test_top_k_equal_to_the_vocabulary_gives_the_dense_scores(x: np.ndarray, t: float) -> None:
    v = x.shape[1]
    for cal in _calibrators(t):
        for score in SCORES:
            dense, dense_pred = exit_scores(x, cal, score)
            top, top_pred = exit_scores(x, cal, score, top_k=v)
            np.testing.assert_allclose(top, dense, rtol=1e-9, atol=1e-12, err_msg=f"{cal} {score}")
            np.testing.assert_array_equal(top_pred, dense_pred)


@settings(max_examples=60, deadline=None)
@given(x=rows, data=st.data())
def test_at_temperature_one_max_prob_and_margin_are_exact_for_any_k(x: np.ndarray, data: st.DataObject) -> None:
    v = x.shape[1]
    k = data.draw(st.integers(1, v), label="k")
    for cal in ({"type": "identity"}, {"type": "temperature", "temperature": 1.0}):
        np.testing.assert_allclose(exit_scores(x, cal, "max_prob", top_k=k)[0], exit_scores(x, cal, "max_prob")[0],
                                   rtol=1e-10, atol=1e-13)
        if k >= 2:  # with k = 1 the runner-up is not in the logs: the equal tail's token stands in for it
            np.testing.assert_allclose(exit_scores(x, cal, "margin", top_k=k)[0], exit_scores(x, cal, "margin")[0],
                                       rtol=1e-10, atol=1e-13)


@settings(max_examples=60, deadline=None)
@given(x=rows, data=st.data())
def test_top_k_entropy_confidence_is_a_lower_bound_at_temperature_one(x: np.ndarray, data: st.DataObject) -> None:
    k = data.draw(st.integers(1, x.shape[1]), label="k")
    for cal in ({"type": "identity"}, {"type": "temperature", "temperature": 1.0}):
        exact = exit_scores(x, cal, "entropy")[0]
        bound = exit_scores(x, cal, "entropy", top_k=k)[0]
        assert np.all(bound <= exact + 1e-12), (bound - exact).max()
        assert np.all(bound >= -1e-12)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), v=st.integers(3, 400), data=st.data(), t=st.floats(0.3, 4.0))
def test_where_the_tail_really_is_equal_the_top_k_scores_are_exact(seed: int, v: int, data: st.DataObject,
                                                                   t: float) -> None:
    """A row whose V - k tail logits are all equal is exactly the tail model: every score at every
    temperature must equal the dense one."""
    k = data.draw(st.integers(1, v - 1), label="k")
    rng = np.random.default_rng(seed)
    n = 5
    head = np.sort(rng.normal(size=(n, k)) * 3, axis=1)[:, ::-1]
    tail = head[:, -1:] - rng.uniform(0.01, 4.0, size=(n, 1))  # below the k-th value, mass not negligible
    x = np.concatenate([head, np.repeat(tail, v - k, axis=1)], axis=1)
    x = x[:, rng.permutation(v)]
    for cal in _calibrators(t):
        for score in SCORES:
            np.testing.assert_allclose(exit_scores(x, cal, score, top_k=k)[0], exit_scores(x, cal, score)[0],
                                       rtol=1e-8, atol=1e-10, err_msg=f"{cal} {score} k={k}")


@settings(max_examples=80, deadline=None)
@given(x=rows, data=st.data())
def test_dense_topk_is_value_descending_then_lowest_id(x: np.ndarray, data: st.DataObject) -> None:
    k = data.draw(st.integers(1, x.shape[1]), label="k")
    vals, ids, lse = dense_topk(x, k)
    order = np.argsort(-x, axis=1, kind="stable")[:, :k]  # reference: (value desc, id asc)
    np.testing.assert_array_equal(ids, order)
    np.testing.assert_array_equal(ids[:, 0], np.argmax(x, axis=1))
    np.testing.assert_array_equal(vals, np.take_along_axis(x, order, axis=1))
    assert ids.dtype == np.int64 and vals.dtype == np.float64
    for i, row in enumerate(x):
        m = max(row)
        assert lse[i] == pytest.approx(m + math.log(math.fsum(math.exp(r - m) for r in row)), rel=1e-13, abs=1e-13)


def test_topk_exit_scores_checks_its_shapes() -> None:
    with pytest.raises(ValueError, match=r"lse must have shape \(3,\)"):
        topk_exit_scores(np.zeros((3, 2)), np.zeros(2), 10, {"type": "identity"}, "max_prob")
    with pytest.raises(ValueError, match=r"top-k width 5 must be in 1\.\.4"):
        topk_exit_scores(np.zeros((3, 5)), np.zeros(3), 4, {"type": "identity"}, "max_prob")


# ---------------------------------------------------------------- vocabulary policies


def _vocab_doc(bucket_of: np.ndarray, n_buckets: int, thresholds: dict, *, top_k: int = 8, score: str = "max_prob",
               calibrator: dict | None = None, k_exits: int = 3, **extra: object) -> dict:
    doc = {
        "exits": [{"name": f"layer{i}", "cost": float(i + 1), "calibrator": calibrator or {"type": "identity"}}
                  for i in range(k_exits)],
        "classes": [f"bucket{b}" for b in range(n_buckets)],
        "score": score,
        "segment_keys": ["file_kind"],
        "thresholds": thresholds,
        "vocabulary": {"size": int(bucket_of.shape[0]), "top_k": top_k, "bucket_of": encode_bucket_map(bucket_of),
                       "buckets": {"method": "mapping",
                                   "tokens": [int(c) for c in np.bincount(bucket_of, minlength=n_buckets)]}},
    }
    doc.update(extra)
    return doc


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), v=st.integers(8, 300), n_buckets=st.integers(1, 6), data=st.data())
def test_vocabulary_policy_thresholds_are_looked_up_by_the_bucket_of_the_answer(
        seed: int, v: int, n_buckets: int, data: st.DataObject) -> None:
    """Identity calibrator and max_prob: the score is the exact softmax maximum (any k), computed
    here with fsum; the threshold is the one of the predicted token's bucket and segment."""
    rng = np.random.default_rng(seed)
    bucket = rng.integers(0, n_buckets, size=v).astype(np.uint8)
    cell = st.one_of(st.none(), st.floats(0.0, 1.0))
    table = {"default": [data.draw(st.lists(cell, min_size=n_buckets, max_size=n_buckets)) for _ in range(2)],
             "code": [data.draw(st.lists(cell, min_size=n_buckets, max_size=n_buckets)), None]}
    forced = data.draw(st.lists(st.integers(0, n_buckets - 1), max_size=2, unique=True), label="forced")
    doc = _vocab_doc(bucket, n_buckets, table, top_k=data.draw(st.integers(1, v)),
                     forced_full_depth={"classes": [f"bucket{b}" for b in forced], "segments": ["vendored"]})
    policy = CompiledPolicy.from_document(doc)
    assert (policy.n_outputs, policy.n_classes, policy.n_exits) == (v, n_buckets, 3)
    n = 30
    x = rng.normal(size=(n, v)) * rng.uniform(0.5, 6.0)
    segs = rng.choice(["code", "prose", "vendored"], size=n)
    for k in range(2):
        got = decide(policy, k, x, segs)
        for i in range(n):
            c = int(np.argmax(x[i]))
            b = int(bucket[c])
            m = max(x[i])
            p_max = 1.0 / math.fsum(math.exp(r - m) for r in x[i])
            rows_ = table.get(segs[i], table["default"]) if segs[i] != "vendored" else None
            tau = None if rows_ is None or rows_[k] is None else rows_[k][b]
            expected = tau is not None and b not in forced and p_max >= tau
            if tau is not None and abs(p_max - tau) < 1e-9:
                continue  # on the threshold: rounding decides
            assert bool(got[i]) == expected, (k, i, segs[i], b, p_max, tau)
    assert decide(policy, 2, x, segs).all()


def test_vocabulary_policy_needs_logits_over_the_whole_vocabulary() -> None:
    policy = CompiledPolicy.from_document(_vocab_doc(np.zeros(50, dtype=np.uint8), 1, {"default": [[0.5], [0.5]]}))
    with pytest.raises(ValueError, match=r"shape \(n, 50\)"):
        decide(policy, 0, np.zeros((2, 1)))


def _bucket_doc_with(bucket_of: dict) -> dict:
    doc = _vocab_doc(np.zeros(100, dtype=np.uint8), 4, {"default": [[0.5] * 4, [0.5] * 4]})
    doc["vocabulary"]["bucket_of"] = bucket_of
    return doc


def _encoded(raw: bytes, sha_of: bytes | None = None) -> dict:
    return {"encoding": "zlib+base64:uint8", "data": base64.b64encode(zlib.compress(raw)).decode(),
            "sha256": hashlib.sha256(raw if sha_of is None else sha_of).hexdigest()}


@pytest.mark.parametrize(("bucket_of", "message"), [
    ({"encoding": "zlib+base64:uint8", "data": "@@not base64@@", "sha256": "0" * 64}, "does not decode"),
    ({"encoding": "zlib+base64:uint8", "data": base64.b64encode(b"not zlib").decode(), "sha256": "0" * 64},
     "does not decode"),
    (_encoded(bytes(100), sha_of=bytes(99)), "sha256 does not match"),
    (_encoded(bytes(99)), r"holds 99 entries, expected one per token \(100\)"),
    (_encoded(bytes(101)), r"holds 101 entries, expected one per token \(100\)"),
    (_encoded(bytes(50_000_000)), r"holds 101\+ entries"),  # a zip bomb: 50 MB of zeros in ~50 KB
    (_encoded(bytes([1] * 50 + [4] + [0] * 49)), r"maps token 50 to bucket 4, but there are 4 buckets"),
    ({"encoding": "gzip", "data": "", "sha256": ""}, "encoding must be 'zlib\\+base64:uint8'"),
    ({"encoding": "zlib+base64:uint8", "data": 5, "sha256": "x"}, "needs string 'data' and 'sha256'"),
    ("base64...", "bucket_of must be an object"),
    ({"encoding": "zlib+base64:uint8", "data": "A" * (1 << 21), "sha256": "x"}, "characters, more than"),
])
def test_bad_bucket_maps_are_rejected_naming_the_problem(bucket_of: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CompiledPolicy.from_document(_bucket_doc_with(bucket_of))


@pytest.mark.parametrize(("vocab", "message"), [
    ({"size": 0, "top_k": 1}, "vocabulary.size must be a positive integer"),
    ({"size": 100, "top_k": True}, "vocabulary.top_k must be a positive integer"),
    ({"size": 100, "top_k": 101}, "top_k 101 at most size"),
    ("all", "vocabulary must be an object"),
])
def test_bad_vocabulary_fields_are_rejected(vocab: object, message: str) -> None:
    doc = _vocab_doc(np.zeros(100, dtype=np.uint8), 4, {"default": [[0.5] * 4, [0.5] * 4]})
    doc["vocabulary"] = vocab if not isinstance(vocab, dict) else {**doc["vocabulary"], **vocab}
    with pytest.raises(ValueError, match=message):
        CompiledPolicy.from_document(doc)


def test_a_vocabulary_policy_document_stays_small_at_150k_tokens() -> None:
    rng = np.random.default_rng(3)
    v = 151_936
    bucket = np.full(v, 3, dtype=np.uint8)
    bucket[rng.choice(v, 6000, replace=False)] = rng.integers(0, 3, size=6000)
    doc = _vocab_doc(bucket, 4, {"default": [[0.9, 0.8, 0.95, None], [0.85, 0.8, 0.9, None]]}, top_k=32)
    assert len(json.dumps(doc)) < 64 * 1024
    policy = CompiledPolicy.from_document(doc)
    np.testing.assert_array_equal(policy.class_bucket, bucket)
