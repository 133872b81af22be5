"""Large-vocabulary policies in the policy domain (issue 13): schema, size, diff and runtime verification.

A token-level policy's ``classes`` are B token buckets and its ``vocabulary`` section maps every
token id to one of them (``exitwise.calibration.buckets``). The documents here come from the
root conftest's ``make_doc`` through ``tests/vocab_policy_docs.py``.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vocab_policy_docs import QWEN_VOCAB, vocabulary_doc

from exitwise.calibration.buckets import decode_bucket_map, encode_bucket_map
from exitwise.calibration.rule import CompiledPolicy
from exitwise.policies.canonical import canonical_json, with_content_hash
from exitwise.policies.diff import BUCKET_MAP_FIELD, diff_documents
from exitwise.policies.runtime_errors import PolicyRejected
from exitwise.policies.runtime_verify import verify_policy_document
from exitwise.policies.schema import DocumentError, validate_document

MAX_DOC_BYTES = 64 * 1024
SMALL_V = 5000


@pytest.fixture(scope="module")
def big_doc(make_doc: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    return vocabulary_doc(make_doc())


@pytest.fixture(scope="module")
def small_doc(make_doc: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    return vocabulary_doc(make_doc(), vocab_size=SMALL_V)


def _rehash(doc: dict[str, Any]) -> dict[str, Any]:
    return with_content_hash({k: v for k, v in doc.items() if k != "content_hash"})


def _mutated(doc: dict[str, Any], change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    change(out)
    return _rehash(out)


def _raw_map(bucket_of: np.ndarray, sha: str | None = None) -> dict[str, str]:
    """A bucket map in the document's encoding, with ``sha`` instead of the true digest when given."""
    raw = np.ascontiguousarray(bucket_of, dtype=np.uint8).tobytes()
    return {"encoding": "zlib+base64:uint8", "data": base64.b64encode(zlib.compress(raw)).decode("ascii"),
            "sha256": sha or hashlib.sha256(raw).hexdigest()}


# ---------------------------------------------------------------- the schema


def test_a_vocabulary_policy_validates_and_compiles(big_doc: dict[str, Any]) -> None:
    parsed = validate_document(big_doc)
    assert parsed.vocabulary is not None and parsed.vocabulary.size == QWEN_VOCAB
    assert parsed.to_json_dict()["vocabulary"] == big_doc["vocabulary"]
    compiled = CompiledPolicy.from_document(big_doc)
    assert (compiled.n_classes, compiled.n_outputs, compiled.top_k) == (4, QWEN_VOCAB, 32)
    counts = np.bincount(compiled.class_bucket, minlength=4)
    assert counts.tolist() == big_doc["vocabulary"]["buckets"]["tokens"]


def test_without_vocabulary_nothing_changes(make_doc: Callable[..., dict[str, Any]]) -> None:
    doc = make_doc()
    parsed = validate_document(doc)
    assert parsed.vocabulary is None and "vocabulary" not in parsed.to_json_dict()
    assert CompiledPolicy.from_document(doc).class_bucket is None


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(doc: dict[str, Any]) -> None:
        node = doc
        *parents, last = path.split(".")
        for key in parents:
            node = node[key]
        node[last] = value
    return change


def _map_of(n: int, top: int) -> np.ndarray:
    out = np.arange(n) % 4
    out[-1] = top
    return out


BAD: list[tuple[str, Callable[[dict[str, Any]], None], str, str]] = [
    ("size too small", _set("vocabulary.size", 1), "vocabulary.size", "greater than or equal to 2"),
    ("size too large", _set("vocabulary.size", (1 << 22) + 1), "vocabulary.size", "less than or equal to 4194304"),
    ("size a bool", _set("vocabulary.size", True), "vocabulary.size", "valid integer"),
    ("size a string", _set("vocabulary.size", str(SMALL_V)), "vocabulary.size", "valid integer"),
    ("size a float", _set("vocabulary.size", float(SMALL_V)), "vocabulary.size", "valid integer"),
    ("top_k zero", _set("vocabulary.top_k", 0), "vocabulary.top_k", "greater than or equal to 1"),
    ("top_k above size", _set("vocabulary.top_k", SMALL_V + 1), "vocabulary",
     f"vocabulary.top_k ({SMALL_V + 1}) must be at most vocabulary.size ({SMALL_V})"),
    ("size disagrees with the map",
     lambda d: (d["vocabulary"].pop("buckets"), _set("vocabulary.size", SMALL_V - 1)(d)), "vocabulary",
     f"vocabulary.bucket_of holds {SMALL_V} entries, expected one per token ({SMALL_V - 1})"),
    ("map too short", _set("vocabulary.bucket_of", _raw_map(np.arange(SMALL_V - 1) % 4)), "vocabulary",
     f"vocabulary.bucket_of holds {SMALL_V - 1} entries, expected one per token ({SMALL_V})"),
    ("encoding", _set("vocabulary.bucket_of.encoding", "zlib+base64:uint16"), "vocabulary.bucket_of.encoding",
     "zlib+base64:uint8"),
    ("data not base64", _set("vocabulary.bucket_of.data", "@@not base64@@"), "vocabulary",
     "vocabulary.bucket_of.data does not decode"),
    ("sha256 not hex", _set("vocabulary.bucket_of.sha256", "XYZ"), "vocabulary.bucket_of.sha256", "pattern"),
    ("sha256 mismatch", _set("vocabulary.bucket_of.sha256", "0" * 64), "vocabulary",
     "vocabulary.bucket_of.sha256 does not match its data"),
    ("bucket beyond the classes", _set("vocabulary.bucket_of", _raw_map(_map_of(SMALL_V, 4))), "vocabulary",
     f"vocabulary.bucket_of maps token {SMALL_V - 1} to bucket 4, but there are 4 buckets (classes)"),
    ("method", _set("vocabulary.buckets.method", "kmeans"), "vocabulary.buckets.method",
     "'frequency' or 'mapping'"),
    ("tokens do not sum to size", _set("vocabulary.buckets.tokens", [1, 1, 1, 1]), "vocabulary",
     f"vocabulary.buckets.tokens sums to 4, expected vocabulary.size ({SMALL_V})"),
    ("tokens negative", _set("vocabulary.buckets.tokens", [-1, 1, 1, SMALL_V - 1]), "vocabulary.buckets.tokens.0",
     "greater than or equal to 0"),
    ("share out of range", _set("vocabulary.buckets.share", [1.5, 0, 0, 0]), "vocabulary.buckets.share.0",
     "less than or equal to 1"),
    ("share length", _set("vocabulary.buckets.share", [0.5, 0.5]), "vocabulary",
     "vocabulary.buckets.share has 2 entries, expected one per bucket (classes: 4)"),
    ("share sum", _set("vocabulary.buckets.share", [0.5, 0.2, 0.1, 0.1]), "vocabulary",
     "vocabulary.buckets.share sums to 0.9, expected 1"),
    ("vocabulary not an object", _set("vocabulary", [SMALL_V, 32]), "vocabulary", "valid dictionary"),
    ("bucket map missing", lambda d: d["vocabulary"].pop("bucket_of"), "vocabulary.bucket_of", "Field required"),
]


@pytest.mark.parametrize(("change", "where", "message"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_a_bad_vocabulary_is_refused_naming_the_field(small_doc: dict[str, Any], change: Any, where: str,
                                                      message: str) -> None:
    bad = _mutated(small_doc, change)
    with pytest.raises(DocumentError) as info:
        validate_document(bad)
    assert any(loc == where and message in msg for loc, msg in info.value.errors), info.value.errors


def test_token_counts_must_match_the_bucket_map(small_doc: dict[str, Any]) -> None:
    tokens = list(small_doc["vocabulary"]["buckets"]["tokens"])
    swapped = [tokens[1], tokens[0], *tokens[2:]]  # same sum, wrong buckets
    assert swapped != tokens
    bad = _mutated(small_doc, _set("vocabulary.buckets.tokens", swapped))
    with pytest.raises(DocumentError, match=rf"vocabulary.buckets.tokens\[0\] is {tokens[1]}, but the bucket map "
                                            rf"puts {tokens[0]} tokens in bucket 0"):
        validate_document(bad)
    short = _mutated(small_doc, _set("vocabulary.buckets.tokens", [tokens[0] + tokens[1], *tokens[2:]]))
    with pytest.raises(DocumentError, match=r"vocabulary.buckets.tokens has 3 entries, expected one per bucket"):
        validate_document(short)


def test_at_most_255_buckets_with_a_vocabulary(small_doc: dict[str, Any]) -> None:
    def widen(doc: dict[str, Any]) -> None:
        doc["classes"] = [f"b{i}" for i in range(256)]
        doc["thresholds"] = {"default": [[0.9] * 256 for _ in range(len(doc["exits"]) - 1)]}
        doc["forced_full_depth"] = {"classes": [], "segments": []}
        doc["vocabulary"]["buckets"] = {"method": "mapping"}
    with pytest.raises(DocumentError, match="at most 255 token buckets as classes, got 256"):
        validate_document(_mutated(small_doc, widen))
    # the same 256 classes without a vocabulary are a classifier's business
    plain = _mutated(small_doc, lambda d: (widen(d), d.pop("vocabulary")))
    validate_document(plain)


def test_buckets_section_is_optional(small_doc: dict[str, Any]) -> None:
    doc = _mutated(small_doc, lambda d: d["vocabulary"].pop("buckets"))
    assert validate_document(doc).vocabulary.buckets is None  # type: ignore[union-attr]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=st.integers(2, 3000), n_buckets=st.integers(1, 6), seed=st.integers(0, 2**32 - 1),
       flip=st.integers(0, 10**9))
def test_any_map_round_trips_and_any_changed_token_is_caught(make_doc: Callable[..., dict[str, Any]], size: int,
                                                             n_buckets: int, seed: int, flip: int) -> None:
    bucket_of = np.random.default_rng(seed).integers(0, n_buckets, size=size).astype(np.uint8)
    doc = vocabulary_doc(make_doc(), vocab_size=size, top_k=min(size, 8), n_exits=3, bucket_of=bucket_of)
    validate_document(doc)
    assert np.array_equal(CompiledPolicy.from_document(doc).class_bucket, bucket_of)
    if n_buckets == 1:
        return
    token = flip % size
    changed = bucket_of.copy()
    changed[token] = (changed[token] + 1) % n_buckets
    stale = _raw_map(changed, sha=doc["vocabulary"]["bucket_of"]["sha256"])  # new data, old digest
    with pytest.raises(DocumentError, match="sha256 does not match its data"):
        validate_document(_mutated(doc, _set("vocabulary.bucket_of", stale)))


# ---------------------------------------------------------------- size


def test_a_150k_vocabulary_policy_stays_under_64_kb(big_doc: dict[str, Any]) -> None:
    size = len(canonical_json(big_doc))
    assert len(big_doc["exits"]) == 12 and len(big_doc["classes"]) == 4 and len(big_doc["thresholds"]) == 3
    assert size < MAX_DOC_BYTES, size
    # the worst case for compression: every token in a uniformly random one of the 4 buckets
    rng = np.random.default_rng(1)
    noisy = vocabulary_doc(dict(big_doc), bucket_of=rng.integers(0, 4, QWEN_VOCAB).astype(np.uint8))
    validate_document(noisy)
    assert len(canonical_json(noisy)) < MAX_DOC_BYTES, len(canonical_json(noisy))


# ---------------------------------------------------------------- diff


def test_diff_compares_bucket_thresholds_and_the_map_by_its_digest(make_doc: Callable[..., dict[str, Any]]) -> None:
    a = vocabulary_doc(make_doc(), seed=0)
    b = copy.deepcopy(vocabulary_doc(make_doc(), seed=1))
    b["thresholds"]["studio"][3][1] = 0.5
    b = _rehash(b)
    d = diff_documents(a, b)
    early, buckets = len(a["exits"]) - 1, len(a["classes"])
    assert d.cells_compared == 3 * early * buckets  # default, phone and studio: per bucket, never per token
    assert [(c.segment, c.exit, c.class_, c.after) for c in d.thresholds] == [("studio", 3, a["classes"][1], 0.5)]
    sha_a, sha_b = a["vocabulary"]["bucket_of"]["sha256"], b["vocabulary"]["bucket_of"]["sha256"]
    assert sha_a != sha_b
    assert d.bucket_map_change == f"vocabulary bucket map changed: sha256 {sha_a} -> {sha_b}"
    maps = [f for f in d.changed if f.path.startswith("vocabulary")]
    assert {f.path for f in maps} <= {BUCKET_MAP_FIELD, "vocabulary.buckets.tokens"}
    assert [(f.before, f.after) for f in maps if f.path == BUCKET_MAP_FIELD] == [(sha_a, sha_b)]
    assert "vocabulary" in d.changed_fields
    assert len(repr(d)) < 20_000  # one change for the map, not one per token


def test_same_map_is_no_change_and_a_dropped_forced_bucket_is_a_weakening(big_doc: dict[str, Any]) -> None:
    b = _mutated(big_doc, _set("forced_full_depth", {"classes": [], "segments": ["phone"]}))
    d = diff_documents(big_doc, b)
    assert d.bucket_map_change is None and "vocabulary" not in d.changed_fields
    assert not [f for f in d.changed if f.path.startswith("vocabulary")]
    assert [w.message for w in d.weakened] == ["token bucket 'rest' is no longer forced to full depth"]
    top_k = diff_documents(big_doc, _mutated(big_doc, _set("vocabulary.top_k", 64)))
    assert [(f.path, f.before, f.after) for f in top_k.changed] == [("vocabulary.top_k", 32, 64)]


def test_a_classifier_diff_has_no_vocabulary_fields(make_doc: Callable[..., dict[str, Any]]) -> None:
    d = diff_documents(make_doc(), make_doc(variant=1))
    assert not [f for f in d.fields if f.path.startswith("vocabulary")] and d.bucket_map_change is None


# ---------------------------------------------------------------- runtime verification


def _served(doc: dict[str, Any]) -> dict[str, Any]:
    return {**doc, "version": 3, "environment": "production", "killed": False, "state": "active"}


def test_runtime_verification_accepts_a_vocabulary_policy(big_doc: dict[str, Any]) -> None:
    name = big_doc["model"]["name"]
    compiled = verify_policy_document(_served(big_doc), name, env="production", n_exits=12, n_classes=QWEN_VOCAB)
    expected = decode_bucket_map(big_doc["vocabulary"]["bucket_of"], QWEN_VOCAB, 4)
    assert np.array_equal(compiled.class_bucket, expected) and compiled.top_k == 32
    with pytest.raises(PolicyRejected, match=f"policy has a vocabulary of {QWEN_VOCAB} tokens, this runtime's "
                                             "model has 4") as info:
        verify_policy_document(_served(big_doc), name, n_classes=4)  # the buckets are not the model's outputs
    assert info.value.reason == "shape"


def test_runtime_verification_refuses_a_tampered_bucket_map(big_doc: dict[str, Any]) -> None:
    name = big_doc["model"]["name"]
    bucket_of = decode_bucket_map(big_doc["vocabulary"]["bucket_of"], QWEN_VOCAB, 4).astype(np.uint8)
    bucket_of[bucket_of == 3] = 0  # every rare token now exits with the frequent tokens' threshold
    forged = copy.deepcopy(big_doc)
    forged["vocabulary"]["bucket_of"]["data"] = encode_bucket_map(bucket_of)["data"]  # digest left as it was
    with pytest.raises(PolicyRejected, match="content_hash mismatch") as info:
        verify_policy_document(_served(forged), name)
    assert info.value.reason == "hash"
    rehashed = _rehash(forged)  # a forger who also recomputes the content hash
    with pytest.raises(PolicyRejected, match=r"policy does not compile: ValueError: policy: "
                                             r"vocabulary\.bucket_of\.sha256 does not match its data") as info:
        verify_policy_document(_served(rehashed), name)
    assert info.value.reason == "compile"
