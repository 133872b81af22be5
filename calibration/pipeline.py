"""The solve pipeline, end to end: validate the request, split, calibrate, choose a family, solve, certify.

:func:`prepare` checks a :class:`SolveSpec` against the logs, draws the choose / certify
split (:class:`~exitwise.calibration.splits.Splits`), fits one calibrator per exit on the
choose rows and scores every row once. :func:`solve_prepared` chooses the policy family by
cross-validation on the choose rows (:func:`choose_family`, :mod:`exitwise.calibration.selection`),
fits the chosen family's path on them (:mod:`exitwise.calibration.families`) and walks it with
the fixed-sequence test (:mod:`exitwise.calibration.certify`) on the certify rows, which
nothing else touched; :func:`solve` does both. The baselines reuse :class:`Prepared` and
:func:`certify_candidates`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np

from exitwise.calibration.buckets import DEFAULT_SHARES
from exitwise.calibration.calibrate import fit_exit_calibrators
from exitwise.calibration.calibrators import Calibrator
from exitwise.calibration.certify import (
    ALL,
    Certification,
    Constraint,
    aim,
    fixed_sequence,
    hb_upper_bound,
    min_groups,
    min_rows,
    upper_bound,
)
from exitwise.calibration.evaluate import SEQUENCE_RISKS, ScoredLogs, check_risk, composite_segments
from exitwise.calibration.exceptions import InputError
from exitwise.calibration.families import candidate_families
from exitwise.calibration.family_choice import choose_family
from exitwise.calibration.group_solve import (
    check_group_segments,
    group_splits,
    resolve_groups,
)
from exitwise.calibration.groups import GroupIndex, group_losses
from exitwise.calibration.logs import ExitLogs
from exitwise.calibration.path_plan import PathPlan, plan_path
from exitwise.calibration.rule import CALIBRATORS, SCORES, CompiledPolicy, first_exit
from exitwise.calibration.selection import (
    Selection,
)
from exitwise.calibration.solver import (
    Problem,
    ProgressFn,
    SolverPath,
    SolverSettings,
    compile_thresholds,
)
from exitwise.calibration.splits import Splits, SplitSpec
from exitwise.calibration.tokens import TokenLogs
from exitwise.calibration.topk_calibrate import fit_topk_calibrators
from exitwise.calibration.vocabulary import Vocabulary, choose_buckets

__all__ = [
    "PathPlan",
    "Prepared",
    "Solution",
    "SolveSpec",
    "certify_candidates",
    "check_budget",
    "choose_family",
    "curve_indices",
    "finish_solution",
    "parse_budgets",
    "plan_path",
    "prepare",
    "segment_budgets",
    "solve",
    "solve_prepared",
]


@dataclass(frozen=True)
class SolveSpec:
    """Everything ``exitwise solve`` asks for (validated by :func:`prepare`)."""

    risk: str = "disagreement"
    eps: float = 0.01
    delta: float = 0.05
    score: str = "max_prob"
    calibrator: str = "temperature"
    segment_keys: tuple[str, ...] = ()
    segment_budgets: tuple[tuple[str, float], ...] = ()
    forbid_classes: tuple[str, ...] = ()
    forbid_segments: tuple[str, ...] = ()
    max_exit: int | None = None
    seed: int = 0
    split: SplitSpec = field(default_factory=SplitSpec)
    settings: SolverSettings = field(default_factory=SolverSettings)
    families: tuple[str, ...] = ()  # candidate families (empty: every applicable one)
    folds: int = 5  # cross-validation folds for the family choice (3 when more than cv_large rows)
    cv_rows: int = 12_000  # choose rows used by the cross-validation, at most
    cv_large: int = 10_000
    group_column: str | None = None  # dependent rows: split and certify by group (token logs: the sequence)
    bucket_shares: tuple[float, ...] = DEFAULT_SHARES  # token-frequency buckets of a vocabulary ...
    bucket_mapping: Mapping[str, Any] | None = None  # ... or a user mapping {bucket: [token ids]}

    @property
    def budgets_need_constant_segments(self) -> bool:
        return bool(self.segment_budgets)

    @property
    def calibration_target(self) -> Literal["labels", "final"]:
        """What the calibrators learn to predict: the labels for induced error, else the final exit's answer."""
        return "labels" if self.risk == "induced_error" else "final"

    def to_json(self) -> dict[str, Any]:
        return {
            "method": "family chosen by cross-validation; lagrangian or shared-threshold path",
            "risk": self.risk, "eps": self.eps, "delta": self.delta, "score": self.score,
            "calibrator": self.calibrator, "segment_keys": list(self.segment_keys),
            "segment_budgets": {k: v for k, v in self.segment_budgets},
            "forbid_classes": list(self.forbid_classes), "forbid_segments": list(self.forbid_segments),
            "max_exit": self.max_exit, "seed": self.seed,
            "split": self.split.to_json(), "families": list(self.families), "folds": self.folds,
            "cv_rows": self.cv_rows, "group_column": self.group_column,
            "buckets": ({"method": "mapping"} if self.bucket_mapping is not None
                        else {"method": "frequency", "shares": list(self.bucket_shares)}),
            "min_cell": self.settings.min_cell, "min_pool": self.settings.min_pool,
            "passes": self.settings.passes, "order": "safe to aggressive",
        }


@dataclass(frozen=True, eq=False)
class Prepared:
    """Validated inputs, splits, fitted calibrators and the scores of every row under them."""

    spec: SolveSpec
    logs: ExitLogs
    splits: Splits
    calibrators: tuple[dict[str, Any], ...]
    calibrator_objects: tuple[Calibrator, ...]
    scored: ScoredLogs  # all rows
    loss: np.ndarray  # (n, K) bool
    seg_codes: np.ndarray  # (n,) codes into seg_levels
    seg_levels: tuple[str, ...]
    forced_classes: np.ndarray  # (C,)
    forced_segments: np.ndarray  # (S,) user-forbidden segments
    budgets: Mapping[int, float]  # constrained segment code -> eps
    variants: dict[bool, Prepared] = field(default_factory=dict, repr=False)
    groups: GroupIndex | None = None  # dependent rows: certification is over groups
    vocabulary: Vocabulary | None = None  # token-level logs: thresholds per token bucket
    memo: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def cert_groups(self) -> GroupIndex | None:
        """The groups of the certify rows (codes 0..G-1 in certify-row order), or None."""
        if self.groups is None:
            return None
        if "cert_groups" not in self.memo:
            self.memo["cert_groups"] = self.groups.take(self.splits.certify)
        return self.memo["cert_groups"]

    @property
    def calibrated(self) -> bool:
        """Whether the scores come from fitted calibrators (False: every exit's is the identity)."""
        return any(c.get("type") != "identity" for c in self.calibrators)

    def take(self, rows: np.ndarray) -> Prepared:
        """The preparation of ``rows`` only (all of them in the choose split): a sample to cross-validate on."""
        rows = np.asarray(rows)
        every = Splits(choose=np.arange(rows.size), certify=np.zeros(0, dtype=np.int64), seed=self.splits.seed)
        return replace(self, logs=self.logs.take(rows), splits=every, scored=self.scored.take(rows),
                       loss=self.loss[rows], seg_codes=self.seg_codes[rows], variants={}, groups=None, memo={})

    def variant(self, calibrated: bool) -> Prepared:
        """This preparation on the fitted calibrators' scores (True) or the raw softmax's (False:
        identity calibrators, scored once and cached)."""
        if calibrated or not self.calibrated:
            return self
        if False not in self.variants:
            raw = tuple({"type": "identity"} for _ in self.calibrators)
            scored = ScoredLogs.from_logs(self.logs, raw, self.spec.score)
            self.variants[False] = replace(self, calibrators=raw, calibrator_objects=(), scored=scored,
                                           loss=scored.loss_matrix(self.spec.risk), variants={})
        return self.variants[False]

    @property
    def allowed_exits(self) -> np.ndarray:
        k1 = self.scored.n_exits - 1
        allowed = np.ones(k1, dtype=bool)
        if self.spec.max_exit is not None:
            allowed[self.spec.max_exit + 1:] = False
        return allowed

    def problem(self, rows: np.ndarray, forced_segments: np.ndarray | None = None) -> Problem:
        """The solver's view of some rows (the select split, or any other for oracles)."""
        sc = self.scored
        vocab = self.vocabulary
        preds = sc.preds[rows] if vocab is None else vocab.bucket_of[sc.preds[rows]].astype(np.int64)
        return Problem(
            scores=sc.scores[rows], preds=preds, loss=self.loss[rows], seg=self.seg_codes[rows],
            costs=sc.costs / sc.costs[-1], n_classes=self.n_columns, n_segments=len(self.seg_levels),
            allowed_exits=self.allowed_exits, forced_classes=self.forced_classes,
            forced_segments=self.forced_segments if forced_segments is None else forced_segments,
        )

    @property
    def n_columns(self) -> int:
        """Columns of the threshold table: classes, or token buckets."""
        return self.scored.n_classes if self.vocabulary is None else len(self.vocabulary.names)

    @property
    def column_names(self) -> tuple[str, ...]:
        return self.logs.class_names if self.vocabulary is None else self.vocabulary.names

    def compile(self, tau: np.ndarray, forced_segments: np.ndarray) -> CompiledPolicy:
        vocab = self.vocabulary
        return compile_thresholds(
            tau, segment_levels=self.seg_levels, segment_keys=self.spec.segment_keys,
            calibrators=self.calibrators, score=self.spec.score, forced_classes=self.forced_classes,
            forced_segments=forced_segments, max_exit=self.spec.max_exit,
            class_bucket=None if vocab is None else vocab.bucket_of.astype(np.intp),
            top_k=None if vocab is None else vocab.top_k,
        )

    def policy_rows(self, rows: np.ndarray) -> np.ndarray:
        """Row of the compiled policy's threshold table for each of ``rows``."""
        if not self.spec.segment_keys:
            return np.zeros(rows.size, dtype=np.intp)
        return (self.seg_codes[rows] + 1).astype(np.intp)


def check_budget(eps: float, name: str = "eps") -> float:
    """A risk budget or confidence level must lie strictly between 0 and 1."""
    try:
        value = float(eps)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number in (0, 1), got {eps!r}") from None
    if not (0.0 < value < 1.0) or not math.isfinite(value):
        raise InputError(f"{name} must be in (0, 1), got {eps!r}")
    return value


def parse_budgets(items: Sequence[str]) -> tuple[tuple[str, float], ...]:
    """``SEG=EPS`` strings (``*=EPS`` for every segment value) to pairs; InputError if malformed."""
    out = []
    for item in items:
        seg, sep, value = str(item).rpartition("=")
        if not sep or not seg:
            raise InputError(f"--segment-budget {item!r}: expected SEGMENT=EPS, e.g. 'mobile=0.02'")
        out.append((seg, check_budget(value, f"--segment-budget {seg}")))
    return tuple(out)


def prepare(logs: ExitLogs | TokenLogs, spec: SolveSpec, *, progress: ProgressFn | None = None,
            splits: Splits | None = None, calibrators: Sequence[Calibrator] | None = None) -> Prepared:
    """Validate ``spec`` against ``logs``, split, fit calibrators and score every row once.

    With groups (a group column, or token-level logs) the split is cut between groups; for
    token-level logs the threshold columns are token buckets chosen on the choose rows.
    ``splits`` and ``calibrators`` given (the scale engine: a sample, every row choosing, and
    calibrators fitted on the whole stream) replace the drawn split and the fit.
    """
    check_budget(spec.eps, "eps")
    check_budget(spec.delta, "delta")
    check_risk(spec.risk, logs.labels is not None, logs.source)
    groups = resolve_groups(logs, spec.group_column)
    if spec.risk in SEQUENCE_RISKS and groups is None:
        raise InputError(f"risk {spec.risk!r} is defined per group: give --group-column (the sequence id column)")
    if spec.score not in SCORES:
        raise InputError(f"unknown score {spec.score!r}; expected one of {', '.join(SCORES)}")
    if spec.calibrator not in CALIBRATORS:
        raise InputError(f"unknown calibrator {spec.calibrator!r}; expected one of {', '.join(CALIBRATORS)}")
    k_total = logs.n_exits
    if spec.max_exit is not None and not 0 <= spec.max_exit <= k_total - 1:
        raise InputError(f"--max-exit {spec.max_exit} is out of range 0..{k_total - 1}")
    seg_codes, seg_levels = composite_segments(logs.segments, spec.segment_keys, logs.n)
    counts = np.bincount(seg_codes, minlength=len(seg_levels))
    forced_segments = np.zeros(len(seg_levels), dtype=bool)
    for name in spec.forbid_segments:
        if not spec.segment_keys:
            raise InputError(f"--forbid-segment {name!r} needs --segment-key")
        if name not in seg_levels:
            raise InputError(f"--forbid-segment {name!r}: no rows have that segment value; "
                             f"values: {', '.join(seg_levels)}")
        forced_segments[seg_levels.index(name)] = True
    # "*=EPS" gives every segment value a budget; a named value's own budget wins over it
    budgets: dict[int, float] = {}
    explicit: dict[int, float] = {}
    for name, eps in spec.segment_budgets:
        if not spec.segment_keys:
            raise InputError(f"--segment-budget {name}={eps} needs --segment-key (the column(s) it refers to)")
        check_budget(eps, f"--segment-budget {name}")
        if name == "*":
            budgets.update(dict.fromkeys(range(len(seg_levels)), eps))
            continue
        if name not in seg_levels or counts[seg_levels.index(name)] == 0:
            raise InputError(f"--segment-budget {name}={eps}: no rows have segment value {name!r} "
                             f"in {'|'.join(spec.segment_keys)}; values: {', '.join(seg_levels)}")
        explicit[seg_levels.index(name)] = eps
    budgets.update(explicit)
    if splits is None:
        splits = (Splits.draw(logs.n, spec.split, spec.seed) if groups is None
                  else group_splits(groups, spec.split, spec.seed))
    if groups is not None and spec.budgets_need_constant_segments:
        check_group_segments(groups, seg_codes, seg_levels, spec.segment_keys)
    vocabulary = (choose_buckets(logs, splits.choose, spec.bucket_shares, spec.bucket_mapping)
                  if isinstance(logs, TokenLogs) else None)
    classes = logs.class_names if vocabulary is None else vocabulary.names
    forced_classes = np.zeros(len(classes), dtype=bool)
    kind = "class" if vocabulary is None else "token bucket"
    for name in spec.forbid_classes:
        if name not in classes:
            raise InputError(f"--forbid-class {name!r} is not a {kind} of the model; {kind}s: {', '.join(classes)}")
        forced_classes[classes.index(name)] = True
    if spec.folds < 2:
        raise InputError(f"cross-validation needs at least 2 folds, got {spec.folds}")
    candidate_families(segmented=bool(spec.segment_keys), calibrated=True, names=spec.families)  # names valid?
    if progress is not None:
        progress("fitting calibrators", 0.0)
    # too few rows to choose from: nothing is fitted, the raw scores certify on every row
    method = spec.calibrator if splits.choose.size else "identity"
    if calibrators is not None:
        cal_objects = list(calibrators)
    elif isinstance(logs, TokenLogs):
        cal_objects = fit_topk_calibrators(logs, method, target=spec.calibration_target,
                                           index=splits.choose if splits.choose.size else None, seed=spec.seed)
    else:
        cal_objects = fit_exit_calibrators(logs, method, target=spec.calibration_target,
                                           index=splits.choose if splits.choose.size else None)  # identity: no fit
    cal_dicts = tuple(c.to_dict() for c in cal_objects)
    if progress is not None:
        progress("scoring exits", 0.0)
    scored = ScoredLogs.from_logs(logs, cal_dicts, spec.score)
    return Prepared(
        spec=spec, logs=logs, splits=splits, calibrators=cal_dicts, calibrator_objects=tuple(cal_objects),
        scored=scored, loss=scored.loss_matrix(spec.risk), seg_codes=seg_codes, seg_levels=seg_levels,
        forced_classes=forced_classes, forced_segments=forced_segments, budgets=budgets,
        groups=groups, vocabulary=vocabulary,
    )


@dataclass(frozen=True, eq=False)
class Solution:
    """A solved and certified policy, with everything the document and the baselines need.

    ``prepared`` is the preparation the chosen family's scores came from (the raw-softmax
    variant for ``shared_raw``): its calibrators are the policy's.
    """

    prepared: Prepared
    path: SolverPath
    family: str
    selection: Selection | None
    certification: Certification
    constraints: tuple[Constraint, ...]  # indices into the certify split
    uncertified: Mapping[str, tuple[float, int]]  # segment value -> (eps, certify rows)
    forced_segments: np.ndarray  # (S,) forbidden or uncertifiable
    tau: np.ndarray  # (S, K-1, C) chosen thresholds (all NaN: full depth)
    policy: CompiledPolicy
    curve: tuple[dict[str, float], ...]
    timings: Mapping[str, float]

    @property
    def certified(self) -> bool:
        return bool(self.certification.certified)


BudgetPlan = tuple[list[tuple[int, float, int]], dict[str, tuple[float, int]], np.ndarray, dict[int, float]]


def segment_budgets(prepared: Prepared, size_of: Callable[[int], int]) -> BudgetPlan:
    """The per-segment budgets and what the certify units (``size_of(segment code)``) allow.

    Returns (segment, eps, units) of each budget that can be certified, {segment value: (eps,
    units)} of those too small to (they run at full depth), the forced segments (user-forbidden
    or uncertifiable) and the path's aim per certifiable segment. Units are rows, or groups.
    """
    spec = prepared.spec
    fewest = min_rows if prepared.groups is None or spec.risk in SEQUENCE_RISKS else min_groups
    kept: list[tuple[int, float, int]] = []
    uncertified: dict[str, tuple[float, int]] = {}
    forced = prepared.forced_segments.copy()
    aims: dict[int, float] = {}
    for s, eps in sorted(prepared.budgets.items()):
        if forced[s]:
            continue
        n_s = int(size_of(s))
        if n_s < fewest(eps, spec.delta):
            uncertified[prepared.seg_levels[s]] = (eps, n_s)
            forced[s] = True
            continue
        kept.append((s, eps, n_s))
        aims[s] = aim(n_s, eps, spec.delta, spec.settings.floor_power)
    return kept, uncertified, forced, aims


def _certify_constraints(prepared: Prepared) -> tuple[list[Constraint], dict[str, tuple[float, int]], np.ndarray,
                                                      dict[int, float]]:
    spec = prepared.spec
    cert_codes = prepared.seg_codes[prepared.splits.certify]
    if prepared.cert_groups is not None:  # one unit per certify group (its first row's segment)
        cert_codes = prepared.cert_groups.first(cert_codes)  # budgets need one segment per group (checked)
    kept, uncertified, forced, aims = segment_budgets(prepared, lambda s: int(np.count_nonzero(cert_codes == s)))
    constraints = [Constraint(name=ALL, eps=spec.eps, index=np.arange(cert_codes.size))]
    constraints += [Constraint(name=prepared.seg_levels[s], eps=eps, index=np.flatnonzero(cert_codes == s))
                    for s, eps, _ in kept]
    return constraints, uncertified, forced, aims


def certify_candidates(
    prepared: Prepared,
    policies: Sequence[CompiledPolicy],
    constraints: Sequence[Constraint],
    *,
    progress: Callable[[float], None] | None = None,
) -> tuple[Certification, dict[int, tuple[float, float]], Callable[[int], np.ndarray]]:
    """Fixed-sequence test of ``policies`` (safe to aggressive) on the certify split.

    Each tested candidate is routed by the rule (:func:`exitwise.calibration.rule.first_exit`) on the
    certify rows. Returns the certification, {candidate: (risk, compute fraction)} of the
    candidates evaluated so far, and the loss function (to evaluate more candidates).
    """
    cert_rows = prepared.splits.certify
    # column-major: the rule gathers one exit's column of the pending rows at a time
    scores_c = np.asfortranarray(prepared.scored.scores[cert_rows])
    preds_c = np.asfortranarray(prepared.scored.preds[cert_rows])
    loss_c = prepared.loss[cert_rows]
    costs = prepared.scored.costs / prepared.scored.costs[-1]
    groups = prepared.cert_groups
    rows_idx = np.arange(cert_rows.size)
    stats: dict[int, tuple[float, float]] = {}
    layouts: dict[tuple[Any, ...], np.ndarray] = {}

    def table_rows(pol: CompiledPolicy) -> np.ndarray:
        """Each certify row's row of the policy's threshold table (the rule's segment lookup)."""
        key = (pol.segment_keys, tuple(pol.segment_index.items()))
        if key not in layouts:
            if not pol.segment_keys:
                layouts[key] = np.zeros(cert_rows.size, dtype=np.intp)
            elif pol.segment_keys == prepared.spec.segment_keys and all(
                    pol.segment_index.get(v) == i + 1 for i, v in enumerate(prepared.seg_levels)):
                layouts[key] = prepared.policy_rows(cert_rows)
            else:
                lookup = np.array([pol.segment_index.get(v, 0) for v in prepared.seg_levels], dtype=np.intp)
                layouts[key] = lookup[prepared.seg_codes[cert_rows]]
        return layouts[key]

    def losses(j: int) -> np.ndarray:
        pol = policies[j]
        exit_at = first_exit(pol, scores_c, preds_c, table_rows(pol)).exit
        loss = loss_c[rows_idx, exit_at]
        compute = float(costs[exit_at].mean()) if loss.size else 1.0
        if groups is not None:  # one number per certify group: the units that are independent
            loss = group_losses(groups, loss, prepared.spec.risk)
        stats[j] = (float(loss.mean()) if loss.size else 0.0, compute)
        return loss

    n_pts = len(policies)
    cert = fixed_sequence(
        losses, n_pts, constraints, prepared.spec.delta,
        progress=None if progress is None else (lambda j: progress((j + 1) / max(n_pts, 1))),
    )
    return cert, stats, losses


def curve_indices(n_points: int, n_tested: int, curve_points: int) -> list[int]:
    """The candidates on the reported compute-vs-risk curve: every tested one, and up to
    ``curve_points`` evenly spaced among the untested rest."""
    out = list(range(n_tested))
    if curve_points and n_points > n_tested:
        rest = np.arange(n_tested, n_points)
        want = rest[np.unique(np.linspace(0, rest.size - 1, min(curve_points, rest.size)).round().astype(int))]
        out += [int(j) for j in want]
    return out


def finish_solution(prepared: Prepared, plan: PathPlan, cert: Certification, stats: Mapping[int, tuple[float, float]],
                    constraints: Sequence[Constraint], uncertified: Mapping[str, tuple[float, int]],
                    forced: np.ndarray, timings: Mapping[str, float], curve: Sequence[int]) -> Solution:
    """The :class:`Solution` of a certified path: the chosen thresholds, compiled, and the curve.

    ``stats`` maps a candidate to its (risk, compute fraction) on the certify split, for at
    least every candidate in ``curve``.
    """
    path = plan.path
    n_units = int(constraints[0].n)
    points = tuple(
        {path.knob: float(path.points[j].lam), "select_risk": float(path.points[j].select_risk),
         "risk": stats[j][0], "compute_fraction": stats[j][1],
         "eps": _bound(prepared, stats[j][0], n_units),
         "certified": cert.chosen is not None and j <= cert.chosen}
        for j in sorted(set(curve))
    )
    s_total, k1, c = len(prepared.seg_levels), prepared.scored.n_exits - 1, prepared.n_columns
    tau = path.points[cert.chosen].tau if cert.chosen is not None else np.full((s_total, k1, c), np.nan)
    chosen_prep = plan.prepared
    return Solution(
        prepared=chosen_prep, path=path, family=plan.family, selection=plan.selection, certification=cert,
        constraints=tuple(constraints), uncertified=uncertified, forced_segments=forced, tau=tau,
        policy=chosen_prep.compile(tau, forced), curve=points, timings=dict(timings),
    )


def solve_prepared(prepared: Prepared, *, progress: ProgressFn | None = None,
                   curve_points: int = 6) -> Solution:
    """Choose the family on the choose rows, fit its path there, certify it on the certify rows."""
    constraints, uncertified, forced, aims = _certify_constraints(prepared)
    plan = plan_path(prepared, constraints, forced, aims,
                     progress=None if progress is None else (lambda m, f: progress(m, 0.85 * f)))
    t2 = time.perf_counter()
    cert, stats, losses = certify_candidates(
        plan.prepared, plan.policies, constraints,
        progress=None if progress is None else (lambda f: progress("certifying", 0.85 + 0.1 * f)),
    )
    t3 = time.perf_counter()
    curve = curve_indices(len(plan.policies), len(stats), curve_points)
    for j in curve:  # the compute-vs-risk curve on the certify split (for the report)
        if j not in stats:
            losses(j)
    t4 = time.perf_counter()
    if progress is not None:
        progress("done", 1.0)
    return finish_solution(prepared, plan, cert, stats, constraints, uncertified, forced,
                           {**plan.seconds, "certify": t3 - t2, "curve": t4 - t3}, curve)


def _bound(prepared: Prepared, risk: float, n: int) -> float:
    """The upper confidence bound of a realised risk on n certify units (rows, or groups)."""
    spec = prepared.spec
    if prepared.groups is not None and spec.risk not in SEQUENCE_RISKS:
        return hb_upper_bound(risk, n, spec.delta) or 1.0
    return upper_bound(round(risk * n), n, spec.delta) or 1.0


def solve(logs: ExitLogs | TokenLogs, spec: SolveSpec, *, progress: ProgressFn | None = None) -> Solution:
    """Validate, split, calibrate, solve the path and certify it: the whole of ``exitwise solve``."""
    return solve_prepared(prepare(logs, spec, progress=progress), progress=progress)
