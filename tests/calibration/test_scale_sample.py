"""Bottom-k reservoirs: the same rows and bound whatever the batches and the order of merges."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from exitwise.calibration.scale.sample import Reservoir, Rows


def _rows(priority: np.ndarray, row_hash: np.ndarray, ids: np.ndarray) -> Rows:
    return Rows(priority=priority, row_hash=row_hash, arrays={"ids": ids})


@settings(max_examples=120, deadline=None)
@given(n=st.integers(0, 300), k=st.integers(1, 60), whole=st.booleans(), seed=st.integers(0, 2**32 - 1),
       parts=st.integers(1, 6))
def test_a_reservoir_is_the_k_smallest_whatever_the_merges(n: int, k: int, whole: bool, seed: int,
                                                         parts: int) -> None:
    rng = np.random.default_rng(seed)
    priority = rng.integers(0, 40, size=n).astype(np.uint64)  # many ties: groups share a priority
    row_hash = rng.integers(0, 2**63, size=n).astype(np.uint64)
    one = Reservoir(k, whole)
    one.add(_rows(priority, row_hash, np.arange(n)))
    pieces = []
    for idx in np.array_split(rng.permutation(n), parts):
        res = Reservoir(k, whole)
        for chunk in np.array_split(idx, 3):
            res.add(_rows(priority[chunk], row_hash[chunk], chunk))
        pieces.append(res)
    rng.shuffle(pieces)
    merged = pieces[0]
    for other in pieces[1:]:
        merged.merge(other)
    got, want = merged.rows(), one.rows()
    assert (got is None) == (want is None)
    assert merged.bound == one.bound
    if want is not None and got is not None:
        assert sorted(got.arrays["ids"].tolist()) == sorted(want.arrays["ids"].tolist())
        keys = sorted(zip(priority.tolist(), row_hash.tolist(), strict=True))
        if n >= k:  # the definition: every row at or below the k-th smallest key (by priority alone for groups)
            p0, h0 = keys[k - 1]
            expect = {i for i in range(n) if (priority[i] <= p0 if whole else
                                                (priority[i], row_hash[i]) <= (p0, h0))}
        else:
            expect = set(range(n))
        assert set(got.arrays["ids"].tolist()) == expect
