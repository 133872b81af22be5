"""Splits: one seeded permutation cut into parts; solve's fit / select / certify and calibrate's fit / report."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exitwise.calibration.exceptions import InputError
from exitwise.calibration.pipeline import SolveSpec
from exitwise.calibration.splits import Splits, SplitSpec, split_rows


def test_splits_are_a_seeded_partition():
    sp = Splits.draw(1000, SolveSpec().split, 3)
    allrows = np.concatenate([sp.fit, sp.select, sp.certify])
    assert sorted(allrows.tolist()) == list(range(1000))
    assert sp.to_json() == {"fit": 100, "select": 300, "certify": 600, "seed": 3}
    again = Splits.draw(1000, SolveSpec().split, 3)
    assert np.array_equal(sp.certify, again.certify)
    assert not np.array_equal(sp.certify, Splits.draw(1000, SolveSpec().split, 4).certify)




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
    """The fit rows of solve's split are the fit rows of a calibrate split of the same size and seed."""
    sp = Splits.draw(1000, SplitSpec(), 7)
    fit, rest = split_rows(1000, [sp.fit.size], 7)
    np.testing.assert_array_equal(fit, sp.fit)
    np.testing.assert_array_equal(rest, np.union1d(sp.select, sp.certify))


@pytest.mark.parametrize(
    ("spec", "n", "message"),
    [
        (SplitSpec(fit=0.6, select=0.5), 1000, "split fractions must be in (0, 1) and sum below 1"),
        (SplitSpec(select=0.0), 1000, "split fractions must be in (0, 1)"),
        (SplitSpec(), 2, "too few rows to split into fit / select / certify: 2"),
    ],
)
def test_bad_split_specs_are_named(spec, n, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Splits.draw(n, spec, 0)


def test_split_sizes_are_capped_and_never_empty():
    assert SplitSpec(max_fit=50, max_select=70).sizes(10_000) == (50, 70)
    assert SplitSpec().sizes(4) == (1, 1)  # round(0.4) = 0 rows would leave the calibrators nothing to fit
    with pytest.raises(InputError, match="cannot cut 5 rows"):
        split_rows(5, [3, 3], 0)
