"""Splits: one seeded permutation cut into parts; solve's choose / certify and calibrate's fit / report."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exitwise.calibration.exceptions import InputError
from exitwise.calibration.pipeline import SolveSpec
from exitwise.calibration.splits import Splits, SplitSpec, choose_fraction, split_rows


def test_splits_are_a_seeded_partition():
    sp = Splits.draw(10_000, SolveSpec().split, 3)
    allrows = np.concatenate([sp.choose, sp.certify])
    assert sorted(allrows.tolist()) == list(range(10_000))
    assert sp.to_json() == {"choose": 3000, "certify": 7000, "seed": 3}
    again = Splits.draw(10_000, SolveSpec().split, 3)
    assert np.array_equal(sp.certify, again.certify)
    assert not np.array_equal(sp.certify, Splits.draw(10_000, SolveSpec().split, 4).certify)


@settings(max_examples=50, deadline=None)
@given(n=st.integers(2, 500), data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_split_rows_cuts_one_seeded_permutation_in_order(n, data, seed):
    """Part j is the j-th slice of default_rng(seed).permutation(n), sorted; the last part is the rest."""
    sizes = data.draw(st.lists(st.integers(0, n), max_size=3).filter(lambda s: sum(s) <= n))
    parts = split_rows(n, sizes, seed)
    perm = np.random.default_rng(seed).permutation(n)
    bounds = np.cumsum([0, *sizes, n - sum(sizes)])
    assert len(parts) == len(sizes) + 1
    for part, lo, hi in zip(parts, bounds[:-1], bounds[1:], strict=True):
        np.testing.assert_array_equal(part, np.sort(perm[lo:hi]))
    assert sorted(np.concatenate(parts).tolist()) == list(range(n))


def test_solve_and_calibrate_draw_their_rows_the_same_way():
    """The choose rows of solve's split are the fit rows of a calibrate split of the same size and seed."""
    sp = Splits.draw(5000, SplitSpec(), 7)
    fit, rest = split_rows(5000, [sp.choose.size], 7)
    np.testing.assert_array_equal(fit, sp.choose)
    np.testing.assert_array_equal(rest, sp.certify)


@pytest.mark.parametrize(
    ("spec", "n", "message"),
    [
        (SplitSpec(choose=1.0), 1000, "the choose fraction must be in (0, 1), got 1.0"),
        (SplitSpec(choose=0.0), 1000, "the choose fraction must be in (0, 1), got 0.0"),
        (SplitSpec(), 1, "too few rows to solve a policy: 1"),
    ],
)
def test_bad_split_specs_are_named(spec, n, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Splits.draw(n, spec, 0)


def test_choose_rows_follow_n_and_are_capped():
    assert SplitSpec().size(10_000) == 3000
    assert SplitSpec(max_choose=700).size(10_000) == 700
    assert SplitSpec(choose=0.5).size(4000) == 2000
    # too few rows to choose anything from data: every row certifies
    assert SplitSpec().size(1999) == 600 and SplitSpec().size(1990) == 0
    # the share falls past 30,000 rows, the rows do not
    sizes = [SplitSpec(max_choose=10**9).size(n) for n in (30_000, 60_000, 240_000, 10**6)]
    assert sizes == sorted(sizes) and sizes[1] / 60_000 < 0.3 and sizes[-1] / 10**6 >= 0.1 - 1e-9
    with pytest.raises(InputError, match="cannot cut 5 rows"):
        split_rows(5, [3, 3], 0)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 400_000))
def test_choose_fraction_is_a_share_and_never_grows_with_n(n):
    frac = choose_fraction(n)
    assert 0.1 <= frac <= 0.3
    assert choose_fraction(n + 1000) <= frac
