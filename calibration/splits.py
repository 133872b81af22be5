"""Seeded random splits of the rows of exit logs: the one place rows are assigned to a split.

:func:`split_rows` cuts one seeded permutation of the rows into consecutive parts. The
calibration job (``exitwise calibrate``) takes a fit / report split from it; ``exitwise
solve`` takes *choose* / *certify* (:class:`SplitSpec`, :class:`Splits`). The same ``n``,
sizes and seed always give the same rows.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from exitwise.calibration.exceptions import InputError

__all__ = ["MIN_CHOOSE", "SplitSpec", "Splits", "choose_fraction", "split_rows"]

# Below this many choose rows the solver does not choose anything from data: it certifies the
# raw-softmax shared threshold (a path fixed before seeing any row) on every row.
MIN_CHOOSE = 600


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


def choose_fraction(n: int) -> float:
    """The default share of n rows that choose the policy (calibrators, family, path).

    The rest certify. Each certify row tightens the bound; each choose row sharpens the
    choice. At n = 10^4 and eps = 0.01 the certifiable risk is 0.0083 with every row, 0.0080
    with 70 %: the first 30 % cost little. Past ~3 * 10^4 rows the choice is already sharp
    and the share falls (the cap :attr:`SplitSpec.max_choose` then bounds the rows).
    """
    if n <= 30_000:
        return 0.3
    return max(0.1, 0.3 * (30_000 / n) ** 0.5)


@dataclass(frozen=True)
class SplitSpec:
    """How the calibration logs are split: *choose* (fit the calibrators, choose the policy
    family by cross-validation, solve its path: all on the same rows) and *certify* (the rest,
    untouched by everything that chose the path).

    ``choose`` is a fraction of the rows, or None for :func:`choose_fraction` of n; at most
    ``max_choose`` rows. With fewer than :data:`MIN_CHOOSE` choose rows nothing is chosen
    from data and every row certifies.
    """

    choose: float | None = None
    max_choose: int = 100_000

    def size(self, n: int) -> int:
        """Choose rows of n rows (0 when too few to choose from data); certify gets the rest."""
        if self.choose is not None and not 0 < self.choose < 1:
            raise InputError(f"the choose fraction must be in (0, 1), got {self.choose}")
        if n < 2:
            raise InputError(f"too few rows to solve a policy: {n}")
        frac = choose_fraction(n) if self.choose is None else float(self.choose)
        n_choose = min(round(frac * n), self.max_choose)
        return n_choose if n_choose >= MIN_CHOOSE else 0

    def to_json(self) -> dict[str, float | int | None]:
        return {"choose": self.choose, "max_choose": self.max_choose}


@dataclass(frozen=True, eq=False)
class Splits:
    """Row indices (sorted, so log order is kept) of the two splits of ``exitwise solve``."""

    choose: np.ndarray
    certify: np.ndarray
    seed: int

    @classmethod
    def draw(cls, n: int, spec: SplitSpec, seed: int) -> Splits:
        """The choose / certify split of n rows under ``spec`` (rows from :func:`split_rows`)."""
        choose, certify = split_rows(n, [spec.size(n)], seed)
        return cls(choose=choose, certify=certify, seed=seed)

    def to_json(self) -> dict[str, int]:
        return {"choose": int(self.choose.size), "certify": int(self.certify.size), "seed": int(self.seed)}
