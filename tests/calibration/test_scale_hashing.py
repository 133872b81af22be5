"""The hashes behind the scale engine's split and sample, against a plain-Python reference."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from exitwise.calibration.scale.hashing import SALT_SAMPLE, SALT_SPLIT, hash_ids, row_hashes, unit_interval
from exitwise.calibration.scale.passes import SplitSelector, fixed_sum

M64 = (1 << 64) - 1


def _fnv(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & M64
    return h


def _mix(h: int) -> int:
    h ^= h >> 30
    h = (h * 0xBF58476D1CE4E5B9) & M64
    h ^= h >> 27
    h = (h * 0x94D049BB133111EB) & M64
    return h ^ (h >> 31)


def _reference(value: int | str, seed: int, salt: int) -> int:
    """The documented hash, one id at a time: FNV-1a of the bytes, xor the mixed key, mixed."""
    data = value.encode() if isinstance(value, str) else int(value).to_bytes(8, "little", signed=True)
    key = _mix((seed * 0x9E3779B97F4A7C15 + salt) % (1 << 64))
    return _mix(_fnv(data) ^ key)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(max_size=40), min_size=1, max_size=30), st.integers(0, 2**31))
def test_string_ids_hash_like_the_reference(ids: list[str], seed: int) -> None:
    got = hash_ids(np.asarray(ids, dtype=object), seed, SALT_SPLIT)
    assert [int(v) for v in got] == [_reference(v, seed, SALT_SPLIT) for v in ids]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=1, max_size=30), st.integers(0, 2**31))
def test_integer_ids_hash_like_the_reference_whatever_their_width(ids: list[int], seed: int) -> None:
    got = hash_ids(np.asarray(ids, dtype=np.int64), seed, SALT_SAMPLE)
    assert [int(v) for v in got] == [_reference(v, seed, SALT_SAMPLE) for v in ids]
    small = [v for v in ids if -(2**31) <= v < 2**31]
    if small:  # an int32 column and an int64 column of the same ids split alike
        narrow = hash_ids(pa.array(small, type=pa.int32()), seed, SALT_SAMPLE)
        assert np.array_equal(narrow, hash_ids(np.asarray(small, dtype=np.int64), seed, SALT_SAMPLE))


def test_the_split_share_is_the_choose_fraction_and_the_seed_reshuffles() -> None:
    ids = np.arange(200_000)
    a = SplitSelector(seed=0, choose_fraction=0.1, choose=True).mask(ids)
    b = SplitSelector(seed=1, choose_fraction=0.1, choose=True).mask(ids)
    sd = (0.1 * 0.9 / ids.size) ** 0.5
    assert abs(a.mean() - 0.1) < 5 * sd
    assert abs((a & b).mean() - 0.01) < 5 * (0.01 / ids.size) ** 0.5  # independent across seeds
    certify = SplitSelector(seed=0, choose_fraction=0.1, choose=False).mask(ids)
    assert np.array_equal(certify, ~a)
    perm = np.random.default_rng(3).permutation(ids.size)  # a row's split follows its id, not its place
    assert np.array_equal(SplitSelector(0, 0.1, True).mask(ids[perm]), a[perm])


def test_unit_interval_is_uniform_and_below_one() -> None:
    u = unit_interval(hash_ids(np.arange(100_000), 5, SALT_SPLIT))
    assert u.min() >= 0.0 and u.max() < 1.0
    counts = np.histogram(u, bins=10, range=(0, 1))[0]
    assert np.all(np.abs(counts - 10_000) < 5 * 100)


def test_row_hashes_see_every_logit_bit() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(size=(50, 3, 4)).astype(np.float32)
    h = row_hashes(z)
    assert len(set(h.tolist())) == 50
    z2 = z.copy()
    z2[7, 2, 3] = np.nextafter(z2[7, 2, 3], np.float32(np.inf))
    h2 = row_hashes(z2)
    assert h2[7] != h[7] and np.array_equal(np.delete(h2, 7), np.delete(h, 7))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=200), st.randoms())
def test_fixed_sums_do_not_depend_on_order_or_batches(values: list[float], rnd: object) -> None:
    arr = np.asarray(values)
    order = list(range(arr.size))
    rnd.shuffle(order)  # type: ignore[attr-defined]
    cut = len(order) // 2
    whole = fixed_sum(arr)
    assert whole == fixed_sum(arr[order[:cut]]) + fixed_sum(arr[order[cut:]])
    assert abs(whole / 2**32 - sum(values)) <= arr.size * 2**-33 + 1e-6 * max(1.0, abs(sum(values)))
