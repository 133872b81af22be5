"""Token buckets: the compact bucket map of a policy document, frequency and user-mapping buckets."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exitwise.calibration.buckets import (
    MAX_BUCKETS,
    decode_bucket_map,
    encode_bucket_map,
    frequency_buckets,
    mapping_buckets,
)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), v=st.integers(1, 150_000), n_buckets=st.integers(1, MAX_BUCKETS))
def test_encode_decode_round_trip(seed: int, v: int, n_buckets: int) -> None:
    rng = np.random.default_rng(seed)
    bucket_of = rng.integers(0, n_buckets, size=v).astype(np.uint8)
    doc = json.loads(json.dumps(encode_bucket_map(bucket_of)))  # what travels is JSON
    got = decode_bucket_map(doc, v, n_buckets)
    np.testing.assert_array_equal(got, bucket_of)
    assert got.dtype == np.intp and got.shape == (v,)


def _zipf_stream(rng: np.random.Generator, vocab: int, n: int) -> np.ndarray:
    """A token stream with Zipf-distributed ranks (exponent ~1.1, like text), ranks scattered over the ids."""
    ranks = rng.zipf(1.1, size=4 * n)
    ranks = ranks[ranks <= vocab][:n] - 1
    return rng.permutation(vocab)[ranks]


@pytest.mark.parametrize("vocab", [32_000, 151_936])
def test_frequency_map_of_a_zipf_stream_encodes_under_64_kb(vocab: int) -> None:
    rng = np.random.default_rng(vocab)
    tokens = _zipf_stream(rng, vocab, 1_000_000)
    bucket_of, names, sizes = frequency_buckets(tokens, vocab)
    assert len(names) == 4 and sum(sizes) == vocab
    assert min(sizes) > 0  # every bucket holds tokens: the cut is not degenerate
    encoded = json.dumps(encode_bucket_map(bucket_of))
    assert len(encoded) < 64 * 1024, len(encoded)
    np.testing.assert_array_equal(decode_bucket_map(json.loads(encoded), vocab, len(names)), bucket_of)


shares_st = st.lists(st.floats(0.01, 0.99), min_size=1, max_size=5, unique=True).map(sorted)


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), vocab=st.integers(1, 80), n=st.integers(0, 400), shares=shares_st)
def test_frequency_buckets_cut_the_traffic_at_the_shares(seed: int, vocab: int, n: int, shares: list[float]) -> None:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, size=n) if n else np.zeros(0, dtype=np.int64)
    tokens = np.minimum(tokens, rng.integers(0, vocab, size=n)) if n else tokens  # skewed to low ids
    bucket_of, names, sizes = frequency_buckets(tokens, vocab, shares)
    last = len(shares)
    assert names[-1] == "rest" and len(names) == last + 1
    assert bucket_of.dtype == np.uint8 and bucket_of.shape == (vocab,)
    assert list(sizes) == [int((bucket_of == b).sum()) for b in range(last + 1)]
    # reference: walk the tokens by count (descending, ties by id) with the traffic share before each one
    counts = [int((tokens == t).sum()) for t in range(vocab)]
    order = sorted(range(vocab), key=lambda t: (-counts[t], t))
    before = 0
    for t in order:
        if counts[t] == 0:
            expected = last
        else:
            share = before / n
            expected = sum(1 for s in shares if s <= share)
        assert bucket_of[t] == expected, (t, counts[t], before, n)
        before += counts[t]
    # a more frequent token is never in a later bucket than a rarer one
    for i in range(vocab):
        for j in range(vocab):
            if counts[i] > counts[j]:
                assert bucket_of[i] <= bucket_of[j]


@pytest.mark.parametrize("shares", [[], [0.5, 0.5], [0.8, 0.5], [0.0, 0.5], [0.5, 1.0], [1.5]])
def test_frequency_buckets_reject_bad_shares(shares: list[float]) -> None:
    with pytest.raises(ValueError, match="bucket shares must be increasing numbers in"):
        frequency_buckets(np.array([0, 1, 1]), 4, shares)


def test_frequency_buckets_at_most_255_buckets() -> None:
    shares = list(np.linspace(0.001, 0.999, MAX_BUCKETS))
    with pytest.raises(ValueError, match=f"at most {MAX_BUCKETS} buckets"):
        frequency_buckets(np.array([0, 1, 1]), 4, shares)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), vocab=st.integers(1, 200))
def test_mapping_buckets_put_listed_tokens_in_their_bucket_and_the_rest_in_other(
        data: st.DataObject, vocab: int) -> None:
    ids = data.draw(st.lists(st.integers(0, vocab - 1), unique=True, max_size=min(vocab, 30)), label="ids")
    n_buckets = data.draw(st.integers(1, 4), label="buckets")
    which = [data.draw(st.integers(0, n_buckets - 1)) for _ in ids]
    mapping: dict[str, list] = {f"b{b}": [] for b in range(n_buckets)}
    for token, b in zip(ids, which, strict=True):
        mapping[f"b{b}"].append(token)
    bucket_of, names, sizes = mapping_buckets(mapping, vocab)
    assert names == (*mapping, "other")
    for token in range(vocab):
        expected = which[ids.index(token)] if token in ids else n_buckets
        assert bucket_of[token] == expected
    assert sum(sizes) == vocab and sizes[-1] == vocab - len(ids)


def test_mapping_buckets_take_id_ranges() -> None:
    bucket_of, names, sizes = mapping_buckets({"digits": ["10-19"], "space": [0, "5-5"]}, 25)
    assert names == ("digits", "space", "other")
    assert sizes == (10, 2, 13)
    assert list(np.flatnonzero(bucket_of == 0)) == list(range(10, 20))
    assert list(np.flatnonzero(bucket_of == 1)) == [0, 5]


@pytest.mark.parametrize(("mapping", "message"), [
    ({}, "bucket mapping must be a non-empty object"),
    ([1, 2], "bucket mapping must be a non-empty object"),
    ({"a": [1], "b": ["0-3"]}, "bucket 'b': token 1 is already in another bucket"),
    ({"a": [10]}, r"bucket 'a': 10 is outside the vocabulary 0\.\.9"),
    ({"a": ["3-12"]}, "outside the vocabulary"),
    ({"a": ["5-2"]}, "outside the vocabulary"),
    ({"a": ["x"]}, r"bucket 'a': 'x' is not a token id or an 'a-b' range"),
    ({"a": [True]}, "is not a token id"),
    ({"a": [1.5]}, "is not a token id"),
    ({"a": 3}, "bucket 'a': expected a list"),
    ({"": [1]}, "must be a non-empty string"),
    ({"a|b": [1]}, "without '\\|'"),
    ({"other": [1]}, "not 'other'"),
])
def test_mapping_buckets_reject_bad_mappings(mapping: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        mapping_buckets(mapping, 10)  # type: ignore[arg-type]


def test_mapping_buckets_at_most_254_named_buckets() -> None:
    with pytest.raises(ValueError, match="at most 254"):
        mapping_buckets({f"b{i}": [i] for i in range(MAX_BUCKETS)}, 1000)
