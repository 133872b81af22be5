"""Seeded random splits of the rows of exit logs: the one place rows are assigned to a split.

:func:`split_rows` cuts one seeded permutation of the rows into consecutive parts. The
calibration job (``exitwise calibrate``) takes a fit / report split from it; ``exitwise
solve`` takes fit / select / certify (:class:`SplitSpec`, :class:`Splits`). The same ``n``,
sizes and seed always give the same rows.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from exitwise.calibration.exceptions import InputError

__all__ = ["SplitSpec", "Splits", "split_rows"]


def split_rows(n: int, sizes: Sequence[int], seed: int) -> tuple[np.ndarray, ...]:
    """Rows 0..n-1 in a seeded random order, cut into parts of ``sizes`` followed by the rest.

    Part j is ``perm[s_j : s_j + sizes[j]]`` of ``perm = default_rng(seed).permutation(n)``
    (``s_j`` the sum of the sizes before it); the last part holds the remaining rows. Each part
    is sorted, so the rows keep their log order. Returns ``len(sizes) + 1`` index arrays.
    """
    if any(int(size) < 0 for size in sizes) or sum(int(size) for size in sizes) > n:
        raise InputError(f"cannot cut {n} rows into parts of {list(sizes)} rows and the rest")
    perm = np.random.default_rng(seed).permutation(n)
    bounds = np.cumsum([0, *sizes])
    parts = [perm[start:stop] for start, stop in itertools.pairwise(bounds)] + [perm[bounds[-1]:]]
    return tuple(np.sort(part) for part in parts)


@dataclass(frozen=True)
class SplitSpec:
    """How the calibration logs are split: fit calibrators / select the path / certify.

    Fractions of the rows, with caps on the first two (more certify rows give tighter bounds;
    the calibrators and the thresholds need only so many). The defaults give certification
    60 %: on the bundled Fashion-MNIST logs (10,000 rows) 0.1 / 0.3 came closest to the
    in-sample oracle in 5 of 6 (risk, eps) cases among 0.2/0.4, 0.2/0.3, 0.1/0.3, 0.15/0.25
    and 0.1/0.2 (3 split seeds each); a one-parameter temperature needs only ~1,000 rows.
    """

    fit: float = 0.1
    select: float = 0.3
    max_fit: int = 50_000
    max_select: int = 250_000

    def sizes(self, n: int) -> tuple[int, int]:
        """(fit rows, select rows) of n rows: each at least 1 and within its cap; certify gets the rest."""
        if not (0 < self.fit < 1 and 0 < self.select < 1 and self.fit + self.select < 1):
            raise InputError(
                f"split fractions must be in (0, 1) and sum below 1, got fit={self.fit}, select={self.select}"
            )
        n_fit = max(1, min(round(self.fit * n), self.max_fit))
        n_sel = max(1, min(round(self.select * n), self.max_select))
        if n_fit + n_sel >= n:
            raise InputError(f"too few rows to split into fit / select / certify: {n}")
        return n_fit, n_sel


@dataclass(frozen=True, eq=False)
class Splits:
    """Row indices (sorted, so log order is kept) of the three splits of ``exitwise solve``."""

    fit: np.ndarray
    select: np.ndarray
    certify: np.ndarray
    seed: int

    @classmethod
    def draw(cls, n: int, spec: SplitSpec, seed: int) -> Splits:
        """The fit / select / certify split of n rows under ``spec`` (rows from :func:`split_rows`)."""
        fit, select, certify = split_rows(n, spec.sizes(n), seed)
        return cls(fit=fit, select=select, certify=certify, seed=seed)

    def to_json(self) -> dict[str, int]:
        return {"fit": int(self.fit.size), "select": int(self.select.size), "certify": int(self.certify.size),
                "seed": int(self.seed)}
