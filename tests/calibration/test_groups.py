"""Groups of dependent rows: the group index, the split by groups, per-group losses."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exitwise.calibration.certify import METHOD, METHOD_GROUPS, METHOD_GROUPS_ANY
from exitwise.calibration.exceptions import InputError
from exitwise.calibration.groups import GROUP_RISKS, GroupIndex, group_losses, group_method, split_groups

# group values: small ints (many repeats) or short strings, one per row
int_values = st.lists(st.integers(-5, 30), min_size=1, max_size=300)
str_values = st.lists(st.text("abcxyz-é", min_size=0, max_size=4), min_size=1, max_size=300)
any_values = st.one_of(int_values, str_values)


def _as_array(values: list) -> np.ndarray:
    return np.array(values, dtype=object if isinstance(values[0], str) else np.int64)


@settings(max_examples=150, deadline=None)
@given(values=any_values, as_object=st.booleans())
def test_the_index_numbers_groups_by_sorted_value(values, as_object):
    arr = np.array(values, dtype=object) if as_object else _as_array(values)
    gi = GroupIndex.from_values(arr)
    expected_levels = sorted(set(values))
    assert list(gi.levels) == expected_levels and gi.n_groups == len(expected_levels) and gi.n == len(values)
    assert gi.codes.dtype == np.int64 and gi.sizes.dtype == np.int64
    assert [gi.levels[c] for c in gi.codes] == values
    assert gi.sizes.tolist() == [values.count(v) for v in expected_levels]


@settings(max_examples=100, deadline=None)
@given(values=any_values, data=st.data())
def test_take_groups_returns_the_sorted_rows_of_those_groups(values, data):
    gi = GroupIndex.from_values(_as_array(values))
    ids = data.draw(st.lists(st.integers(0, gi.n_groups - 1), max_size=gi.n_groups))
    rows = gi.take_groups(np.array(ids, dtype=np.int64))
    chosen = {sorted(set(values))[i] for i in ids}
    assert rows.tolist() == [i for i, v in enumerate(values) if v in chosen]


@settings(max_examples=100, deadline=None)
@given(values=any_values, data=st.data())
def test_per_group_mean_and_any_match_a_loop(values, data):
    gi = GroupIndex.from_values(_as_array(values))
    n = len(values)
    bits = np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    frac = np.array(data.draw(st.lists(st.floats(0, 1), min_size=n, max_size=n)))
    by = defaultdict(list)
    for v, b, f in zip(values, bits, frac, strict=True):
        by[v].append((b, f))
    levels = sorted(by)
    assert gi.mean(bits).tolist() == pytest.approx([np.mean([b for b, _ in by[v]]) for v in levels])
    assert gi.mean(frac).tolist() == pytest.approx([np.mean([f for _, f in by[v]]) for v in levels])
    assert gi.any(bits).tolist() == [any(b for b, _ in by[v]) for v in levels]
    assert gi.any(frac).tolist() == [any(f != 0 for _, f in by[v]) for v in levels]
    both = np.stack([bits, frac], axis=1)  # (n, K): one column per exit
    assert np.allclose(gi.mean(both), np.stack([gi.mean(bits), gi.mean(frac)], axis=1))
    assert np.array_equal(gi.any(both), np.stack([gi.any(bits), gi.any(frac)], axis=1))
    assert np.array_equal(group_losses(gi, bits, "disagreement"), gi.mean(bits))
    assert np.array_equal(group_losses(gi, frac, "induced_error"), gi.mean(frac))
    assert group_losses(gi, bits, "sequence_disagreement").dtype == bool
    assert np.array_equal(group_losses(gi, bits, "sequence_disagreement"), gi.any(bits))
    assert group_losses(gi, bits, "disagreement").dtype == np.float64


@settings(max_examples=100, deadline=None)
@given(values=any_values, data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_the_split_is_a_seeded_partition_of_whole_groups(values, data, seed):
    arr = _as_array(values)
    gi = GroupIndex.from_values(arr)
    n_choose = data.draw(st.integers(0, gi.n_groups))
    choose, certify = split_groups(gi, n_choose, seed)
    assert np.all(np.diff(choose) > 0) and np.all(np.diff(certify) > 0)
    assert np.array_equal(np.sort(np.concatenate([choose, certify])), np.arange(len(values)))
    side_a, side_b = set(arr[choose].tolist()), set(arr[certify].tolist())
    assert not side_a & side_b  # no group on both sides
    assert len(side_a) == n_choose and len(side_a | side_b) == gi.n_groups
    again = split_groups(GroupIndex.from_values(arr), n_choose, seed)
    assert np.array_equal(again[0], choose) and np.array_equal(again[1], certify)
    # the same groups in another row order (rows shuffled): the same groups on each side
    perm = np.random.default_rng(seed).permutation(len(values))
    shuffled = arr[perm]
    choose2, certify2 = split_groups(GroupIndex.from_values(shuffled), n_choose, seed)
    assert set(shuffled[choose2].tolist()) == side_a and set(shuffled[certify2].tolist()) == side_b


def test_different_seeds_give_different_splits():
    gi = GroupIndex.from_values(np.repeat(np.arange(200), 3))
    sides = {tuple(split_groups(gi, 100, seed)[0].tolist()) for seed in range(5)}
    assert len(sides) == 5


@settings(max_examples=100, deadline=None)
@given(values=any_values, data=st.data())
def test_codes_into_levels_index_only_the_groups_present(values, data):
    """TokenLogs subsets keep every level; the index of a subset renumbers the groups present."""
    full = GroupIndex.from_values(_as_array(values))
    rows = np.array(sorted(data.draw(st.sets(st.integers(0, len(values) - 1), min_size=1))), dtype=np.int64)
    sub = full.take(rows)
    direct = GroupIndex.from_values(_as_array([values[i] for i in rows]))
    assert list(sub.levels) == list(direct.levels)
    assert np.array_equal(sub.codes, direct.codes) and np.array_equal(sub.sizes, direct.sizes)
    # codes into unsorted levels (first appearance) give the sorted numbering too
    seen = list(dict.fromkeys(values))
    first_codes = np.array([seen.index(v) for v in values], dtype=np.int64)
    by_codes = GroupIndex.from_codes(first_codes, np.array(seen, dtype=object))
    assert np.array_equal(by_codes.codes, full.codes) and list(by_codes.levels) == list(full.levels)


def test_a_million_rows_index_and_aggregate():
    rng = np.random.default_rng(0)
    values = np.repeat(rng.permutation(40_000), 25)
    gi = GroupIndex.from_values(np.array([f"seq-{v}" for v in values[:200_000]], dtype=object))
    assert gi.n_groups == np.unique(values[:200_000]).size
    gi = GroupIndex.from_values(values)
    loss = rng.random(values.size) < 0.05
    means = gi.mean(loss)
    assert means.shape == (40_000,) and abs(means.mean() - loss.mean()) < 1e-12  # equal sizes: mean of means
    assert np.array_equal(gi.any(loss), means > 0)


def test_per_group_values_must_be_constant_within_a_group():
    gi = GroupIndex.from_values(np.array(["b", "a", "b", "a", "c"], dtype=object))
    seg = np.array(["web", "api", "web", "api", "web"], dtype=object)
    assert gi.per_group(seg, "file_kind").tolist() == ["api", "web", "web"]  # groups a, b, c
    seg[2] = "api"
    with pytest.raises(InputError, match=r"file_kind: group 'b' has rows with different values.*row 0.*row 2"):
        gi.per_group(seg, "file_kind")


def test_bad_groups_and_losses_are_named():
    with pytest.raises(InputError, match="numbers or all be strings"):
        GroupIndex.from_values(np.array([1, "a"], dtype=object))
    with pytest.raises(InputError, match="row 1 has no group value"):
        GroupIndex.from_values(np.array(["a", None], dtype=object))
    with pytest.raises(InputError, match="row 2 has no group value"):
        GroupIndex.from_values(np.array([1.0, 2.0, np.nan]))
    with pytest.raises(InputError, match="one value per row"):
        GroupIndex.from_values(np.zeros((2, 2)))
    with pytest.raises(InputError, match=r"codes must lie in 0\.\.1"):
        GroupIndex.from_codes(np.array([0, 2]), np.array(["a", "b"], dtype=object))
    gi = GroupIndex.from_values(np.array([1, 1, 2]))
    with pytest.raises(InputError, match="unknown group risk 'max'"):
        group_losses(gi, np.zeros(3, dtype=bool), "max")
    with pytest.raises(InputError, match=r"must lie in \[0, 1\]; row 2"):
        group_losses(gi, np.array([0.0, 0.5, 1.5]), "disagreement")
    with pytest.raises(InputError, match=r"must lie in \[0, 1\]; row 0"):
        group_losses(gi, np.array([np.nan, 0.5, 0.5]), "disagreement")
    with pytest.raises(InputError, match="must have 3 rows"):
        gi.mean(np.zeros(4))
    with pytest.raises(InputError, match="cannot cut 2 rows"):
        split_groups(gi, 3, 0)


def test_the_method_names_the_test_of_each_group_risk():
    assert set(GROUP_RISKS) == {"disagreement", "induced_error", "sequence_disagreement"}
    assert group_method(None) == METHOD
    assert group_method("disagreement") == group_method("induced_error") == METHOD_GROUPS
    assert group_method("sequence_disagreement") == METHOD_GROUPS_ANY
    assert "Hoeffding-Bentkus" in METHOD_GROUPS and "exact binomial" in METHOD_GROUPS_ANY
    with pytest.raises(InputError, match="unknown group risk"):
        group_method("token")
