"""The solve pipeline's view of dependent rows: groups, group splits and the token-level aim.

Tokens of one sequence (or images of one user) are not independent: a hard sequence has many
disagreeing tokens. With a group column the split is cut between groups
(:func:`group_splits`) and each candidate is certified on one number per certify group
(:func:`exitwise.calibration.groups.group_losses`), which *are* independent.

The path solver still works token by token. A group risk (``sequence_disagreement``, the share
of sequences with any disagreeing token) lives on another scale than the token risk the path
is refined around, so :func:`token_aim` finds the token-level risk at which the path's
candidates reach the group aim on the choose groups; the path is then refined there. This only
decides where candidates are dense: the certification on the certify groups decides what is
claimed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from exitwise.calibration.exceptions import InputError
from exitwise.calibration.groups import GroupIndex, group_losses, split_groups
from exitwise.calibration.logs import ExitLogs
from exitwise.calibration.splits import MIN_CHOOSE, Splits, SplitSpec, choose_fraction
from exitwise.calibration.tokens import TokenLogs

__all__ = ["check_group_segments", "choose_group_risk", "group_splits", "resolve_groups", "token_aim"]


def resolve_groups(logs: ExitLogs | TokenLogs, column: str | None) -> GroupIndex | None:
    """The groups named by ``column``: the card's group column, a segment column or the id column.

    Token-level logs are always grouped (by the card's group column unless another is named).
    """
    card = logs.card
    if column is None and isinstance(logs, TokenLogs):
        column = card.group_column
    if column is None:
        return None
    if isinstance(logs, TokenLogs) and column == card.group_column and logs.groups is not None:
        return GroupIndex.from_values(logs.groups)
    if column in logs.segments:
        return GroupIndex.from_values(logs.segments[column].codes)
    if column == card.id_column and logs.request_ids is not None:
        raise InputError(f"{logs.source}: --group-column {column!r} is the request id column, which is unique per "
                         "row: every group would hold one row (leave --group-column out)")
    if isinstance(logs, TokenLogs) and column == card.position_column:
        raise InputError(f"{logs.source}: --group-column {column!r} is the position column; groups are sequences")
    options = sorted({*logs.segments, *([card.group_column] if card.group_column else [])})
    raise InputError(f"{logs.source}: --group-column {column!r} is not a column of the logs that can group rows; "
                     f"available: {options or 'none (declare it in the card: group_column or segment_columns)'}")


def group_splits(index: GroupIndex, spec: SplitSpec, seed: int) -> Splits:
    """The choose / certify split cut between groups: the choose share of the *groups* (the
    default share of :func:`~exitwise.calibration.splits.choose_fraction` of their count), no
    more groups than hold ``spec.max_choose`` rows on average, none when the choose rows would
    be fewer than :data:`~exitwise.calibration.splits.MIN_CHOOSE`."""
    g = index.n_groups
    if g < 2:
        raise InputError(f"too few groups to solve a policy: {g}")
    if spec.choose is not None and not 0 < spec.choose < 1:
        raise InputError(f"the choose fraction must be in (0, 1), got {spec.choose}")
    frac = choose_fraction(g) if spec.choose is None else float(spec.choose)
    mean_size = float(index.sizes.mean())
    n_choose = min(round(frac * g), max(1, int(spec.max_choose / mean_size)))
    if n_choose * mean_size < MIN_CHOOSE:
        n_choose = 0
    choose, certify = split_groups(index, n_choose, seed)
    return Splits(choose=choose, certify=certify, seed=seed)


def token_aim(group_risk_of: Callable[[int], float], token_risks: np.ndarray, group_aim: float) -> float:
    """The token-level risk at which the path's candidates reach ``group_aim`` on the choose groups.

    Walking the path safe to aggressive (as the certification will): the token risk of the last
    point whose choose-group risk stays within the aim. When even the last point stays within
    it, the path ended early: its token risk is scaled up in proportion to the remaining room.
    0 when the first point already exceeds the aim.
    """
    best = 0.0
    last_group = 0.0
    for j in range(token_risks.size):
        last_group = group_risk_of(j)
        if last_group > group_aim:
            return best
        best = float(token_risks[j])
    if best > 0 and last_group > 0:
        return best * group_aim / last_group
    return best


def choose_group_risk(index: GroupIndex, loss_rows: np.ndarray, risk: str) -> float:
    """The group risk of per-row losses (one per row of ``index``): the mean over the groups."""
    return float(np.mean(group_losses(index, loss_rows, risk))) if index.n_groups else 0.0


def check_group_segments(groups: GroupIndex, seg_codes: np.ndarray, seg_levels: Sequence[str],
                         keys: Sequence[str]) -> None:
    """Per-segment budgets over groups need one segment value per group (InputError naming the group)."""
    groups.per_group(np.asarray(seg_levels, dtype=object)[seg_codes],
                     f"--segment-budget with groups: segment column(s) {'|'.join(keys)}")
