"""The scale engine: solve and certify a policy from logs that do not fit in memory.

Three passes over the rows (:mod:`exitwise.calibration.scale.passes`), each a reducer that a
runner folds batches into — on this machine (:func:`~exitwise.calibration.scale.runner.run_local`)
or on Spark — and only small things on the driver in between:

1. every row: which split each request id hashes to, the stratified sample of choose rows
   (by hash, so the same whatever the layout), a sample of certify rows for the
   calibration report, the fingerprint and the row counts;
2. the choose rows: temperatures. A pilot is fitted on the sample, then each pass adds up
   the NLL's exact gradient and curvature at the current temperature over every choose row
   and takes one Newton step, until the step is below ``newton_tol`` (skipped when the
   sample holds every choose row: the pilot is then the fit);
3. the certify rows: the loss counts of every candidate of the path, chosen on the sample by
   the same family choice and solver as in memory, and the fixed-sequence test on them.

Nothing touches the certify rows before pass 3, so the guarantee is the in-memory one. The
same data and seed give the same counts and the same policy bit for bit, in memory, streamed
or on Spark (see the equality tests).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from exitwise.calibration.calibrators import Calibrator, TemperatureScaler, calibrator_from_dict
from exitwise.calibration.certify import (
    ALL,
    Certification,
    Constraint,
    CountedConstraint,
    fixed_sequence,
    fixed_sequence_counts,
    min_groups,
)
from exitwise.calibration.certify import min_rows as min_rows_
from exitwise.calibration.evaluate import SEQUENCE_RISKS, Evaluation, SegmentStats, check_risk
from exitwise.calibration.exceptions import InputError
from exitwise.calibration.groups import GROUP_RISKS
from exitwise.calibration.logs import ExitLogs, ModelCard
from exitwise.calibration.pipeline import (
    PathPlan,
    Prepared,
    Solution,
    SolveSpec,
    check_budget,
    curve_indices,
    finish_solution,
    plan_path,
    prepare,
    segment_budgets,
)
from exitwise.calibration.scale.dataset import DEFAULT_BATCH_ROWS, Source
from exitwise.calibration.scale.passes import (
    ALL_COLUMN,
    FIXED,
    N_DIS,
    N_EXITS,
    N_IND,
    N_RIGHT,
    N_ROWS,
    CertifyPass,
    SamplePass,
    SplitSelector,
    TemperaturePass,
)
from exitwise.calibration.scale.runner import Meter, ProgressFn, Runner, run_local
from exitwise.calibration.scale.spill import Spill, SpillSource, Tee
from exitwise.calibration.splits import MIN_CHOOSE, Splits, choose_fraction

__all__ = ["HashSplit", "ScaleSettings", "ScaleSolve", "evaluation_from_counts", "make_spill", "refine_temperatures",
           "sample_pass", "solve_at_scale"]

_T_BOUNDS = (1e-2, 1e2)


@dataclass(frozen=True)
class ScaleSettings:
    """How the scale engine samples and fits (see the scale page of the docs for the measurements)."""

    sample_rows: int = 100_000  # choose rows the path is chosen on (uniform by hash) ...
    floor_rows: int = 2_000  # ... topped up to this many per stratum (segment value)
    report_rows: int = 100_000  # certify rows the calibration report is measured on
    newton_passes: int = 4  # most temperature passes over the choose rows
    newton_tol: float = 1e-4  # stop when the Newton step on log T is below this
    spill: bool = True  # on one machine, keep the choose rows on local disk for the temperature passes
    spill_dir: str | None = None  # where (None: the system's temporary directory)

    def check(self) -> ScaleSettings:
        for name in ("sample_rows", "report_rows"):
            if not 1_000 <= int(getattr(self, name)) <= 5_000_000:
                raise InputError(f"{name.replace('_', '-')} must be in 1,000..5,000,000, got {getattr(self, name)}")
        if not 0 <= int(self.floor_rows) <= int(self.sample_rows):
            raise InputError(f"floor-rows must be in 0..sample-rows, got {self.floor_rows}")
        if not 0 <= int(self.newton_passes) <= 20:
            raise InputError(f"newton-passes must be in 0..20, got {self.newton_passes}")
        return self


@dataclass(frozen=True)
class HashSplit:
    """The choose / certify split by a hash of the request id or group (``guarantee.split`` of the document).

    ``choose`` and ``certify`` count rows; ``group_counts`` (with groups) counts groups.
    """

    seed: int
    choose_fraction: float
    key_column: str
    choose: int
    certify: int
    sample: int
    group_counts: Mapping[str, int] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"method": "hash", "key_column": self.key_column, "choose_fraction": self.choose_fraction,
                "choose": self.choose, "certify": self.certify, "sample": self.sample, "seed": self.seed}


@dataclass(frozen=True, eq=False)
class ScaleSolve:
    """A policy solved at scale, with what its document needs and what the passes measured."""

    solution: Solution
    expected: Evaluation
    report: ExitLogs  # the certify sample the calibration report is measured on
    data: Mapping[str, Any]
    counts: CertifyPass
    passes: Mapping[str, Mapping[str, float]]  # per pass: rows read and seconds


def _check_spec(spec: SolveSpec, card: ModelCard) -> None:
    check_budget(spec.eps, "eps")
    check_budget(spec.delta, "delta")
    if card.token_level and spec.group_column is None:
        raise InputError("token-level logs are split and certified by sequence: the card needs a group_column")
    if spec.risk in SEQUENCE_RISKS and spec.group_column is None:
        raise InputError(f"risk {spec.risk!r} is defined per group: give --group-column (the sequence id column)")


def _splitter(spec: SolveSpec, frac: float, choose: bool) -> SplitSelector:
    """The rows of one split: by request id, or by group with a group column."""
    return SplitSelector(spec.seed, frac, choose, key=spec.group_column)


def _choose_fraction(spec: SolveSpec, n: int) -> float:
    """The share of request ids in the choose split (0 when too few rows would choose)."""
    if n < 2:
        raise InputError(f"too few rows to solve a policy: {n}")
    frac = choose_fraction(n) if spec.split.choose is None else float(spec.split.choose)
    if not 0 < frac < 1:
        raise InputError(f"the choose fraction must be in (0, 1), got {frac}")
    return frac if round(frac * n) >= MIN_CHOOSE else 0.0


def refine_temperatures(source: Source, runner: Runner, pilot: Sequence[Calibrator], target: str,
                        settings: ScaleSettings, progress: ProgressFn | None, split: SplitSelector,
                        passes: dict[str, dict[str, float]], spilled: SpillSource | None) -> list[Calibrator]:
    """Newton steps on log(1/T) of each temperature exit of ``pilot`` from exact sums over every
    choose row (read from ``spilled`` when pass 1 kept them on local disk, else from the source).

    ``target``: "labels" or "final" (the final exit's answer). Exits that are not temperature
    scalers, or whose pilot sits at a bound, keep the pilot.
    """
    cals = list(pilot)
    lo, hi = -math.log(_T_BOUNDS[1]), -math.log(_T_BOUNDS[0])
    u: list[float | None] = [
        math.log(1.0 / c.temperature_) if isinstance(c, TemperatureScaler) and not c.at_bound_ else None
        for c in cals]
    for it in range(settings.newton_passes):
        if all(v is None for v in u):
            break
        reducer = TemperaturePass(betas=tuple(None if v is None else math.exp(v) for v in u), target=target)
        if spilled is not None:
            meter = Meter(f"pass 2/3 temperatures ({it + 1}, spilled rows)", spilled.rows, progress, (0.35, 0.55))
            reducer = run_local(spilled, reducer, None, meter)
        else:
            meter = Meter(f"pass 2/3 temperatures ({it + 1})", source.rows, progress, (0.35, 0.55))
            reducer = runner(source, reducer, split, meter)
        passes[f"temperature_{it + 1}"] = {"rows": float(reducer.rows), "seconds": meter.seconds}
        moved = 0.0
        for k, v in enumerate(u):
            if v is None:
                continue
            g, h = reducer.step(k)
            beta = math.exp(v)
            slope = beta * h  # d NLL' / d log beta
            if not (math.isfinite(g) and math.isfinite(slope)) or slope <= 0:
                u[k] = None  # flat: keep the pilot
                continue
            new = min(max(v - g / slope, lo), hi)
            moved = max(moved, abs(new - v))
            u[k] = new
        for k, v in enumerate(u):
            if v is not None:
                cals[k] = calibrator_from_dict({"type": "temperature", "temperature": float(math.exp(-v))})
        if moved <= settings.newton_tol:
            break
    return cals


def _constraints(prepared: Prepared, certify_counts: Mapping[str, int], n_cert: int
                 ) -> tuple[list[CountedConstraint], list[CountedConstraint], dict[str, tuple[float, int]],
                            np.ndarray, dict[int, float]]:
    """The constraints from the certify units (rows, or groups) per stratum: (for the path, for the
    test, uncertified, forced, aims).

    A ``*=EPS`` budget also covers values that have certify units but no choose row: they are
    tested (they run at full depth: a segment value the policy has no row for does) but give the path
    no target.
    """
    spec = prepared.spec
    kept, uncertified, forced, aims = segment_budgets(prepared, lambda s: certify_counts.get(prepared.seg_levels[s], 0))
    path_cons = [CountedConstraint(ALL, spec.eps, n_cert)]
    path_cons += [CountedConstraint(prepared.seg_levels[s], eps, n_s) for s, eps, n_s in kept]
    min_rows = min_rows_ if prepared.groups is None or spec.risk in SEQUENCE_RISKS else min_groups
    star = dict(spec.segment_budgets).get("*")
    test_cons = list(path_cons)
    if star is not None:
        for name in sorted(set(certify_counts) - set(prepared.seg_levels)):
            n_s = int(certify_counts[name])
            if n_s < min_rows(star, spec.delta):
                uncertified[name] = (star, n_s)  # too few to test: a value the path never saw
                continue
            test_cons.append(CountedConstraint(name, star, n_s))
    return path_cons, test_cons, uncertified, forced, aims


def source_batch(source: Source) -> int:
    """The batch size of ``source`` (the default when it has none)."""
    return int(getattr(source, "batch_rows", DEFAULT_BATCH_ROWS))


def _fingerprint(p1: SamplePass) -> str:
    body = {"rows": p1.rows, "sum64": f"{p1.fingerprint:016x}", "shape": list(p1.shape or ()),
            "labels": bool(p1.labelled), "segments": sorted(p1.segment_counts)}
    return "sha256:" + hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _iso(us: int) -> str:
    return np.datetime_as_string(np.datetime64(us, "us"), unit="s") + "Z"


def _data(p1: SamplePass, source: Source, split: HashSplit, where: str | None) -> dict[str, Any]:
    """The document's ``data`` section (no evidence: the caller adds where the logs are)."""
    out: dict[str, Any] = {
        "fingerprint": _fingerprint(p1),
        "rows": {"total": p1.rows, "labelled": p1.rows if p1.labelled else 0, "skipped": 0,
                 "choose": split.choose, "certify": split.certify},
        "time_window": None if p1.ts_range is None else [_iso(p1.ts_range[0]), _iso(p1.ts_range[1])],
        "segment_counts": {c: dict(sorted(v.items())) for c, v in sorted(p1.segment_counts.items())},
        "source": source.name,
    }
    if where:
        out["where"] = where
    return out


def evaluation_from_counts(counts: CertifyPass, j: int, risk: str, costs: np.ndarray, labelled: bool) -> Evaluation:
    """Candidate j's :class:`Evaluation` on the certify rows, from the pass's counts alone.

    Per-row arrays are empty and batch compute fractions are not measured: both depend on
    the order of the rows, which the scale engine does not keep.
    """
    cost = np.asarray(costs, dtype=np.float64) / float(costs[-1])
    risk_slot = N_IND if risk == "induced_error" else N_DIS

    def stats(row: np.ndarray) -> SegmentStats:
        n = int(row[N_ROWS])
        losses = {"disagreement": int(row[N_DIS])} | ({"induced_error": int(row[N_IND])} if labelled else {})
        return SegmentStats(n=n, compute_fraction=float(row[N_EXITS:] @ cost) / n, risk=int(row[risk_slot]) / n,
                            disagreement=int(row[N_DIS]) / n,
                            induced_error=int(row[N_IND]) / n if labelled else None, risk_type=risk, losses=losses)

    whole = counts.counts[ALL_COLUMN][""][j]
    overall = stats(whole)
    n = overall.n
    full_right = counts.full_right.get(ALL_COLUMN, {}).get("", 0)
    segments = {name: {level: stats(block[j]) for level, block in sorted(blocks.items())}
                for name, blocks in sorted(counts.counts.items()) if name != ALL_COLUMN}
    empty = np.zeros(0, dtype=np.int64)
    return Evaluation(
        risk_type=risk, n=n, compute_fraction=overall.compute_fraction, risk=overall.risk,
        disagreement=overall.disagreement, induced_error=overall.induced_error,
        exit_rate=tuple(float(v) / n for v in whole[N_EXITS:]), batch_compute_fraction={}, segments=segments,
        accuracy=int(whole[N_RIGHT]) / n if labelled else None,
        full_depth_accuracy=full_right / n if labelled else None,
        exit=empty, answer=empty, loss=empty.astype(bool), losses=dict(overall.losses),
    )


def make_spill(source: Source, runner: Runner, settings: ScaleSettings, split: SplitSelector,
               temperature: bool) -> Spill | None:
    """A spill of the choose rows when the temperature passes will need them and run on this machine."""
    if not (settings.spill and temperature and runner is run_local and split.choose_fraction > 0
            and split.choose_fraction * source.rows > settings.sample_rows):
        return None
    return Spill(source.card, split, settings.spill_dir)


def sample_pass(source: Source, runner: Runner, settings: ScaleSettings, seed: int, frac: float,
                strata_keys: tuple[str, ...], progress: ProgressFn | None, spill: Spill | None,
                passes: dict[str, dict[str, float]], group_column: str | None = None) -> SamplePass:
    """Pass 1 over every row (teeing the choose rows into ``spill``)."""
    meter = Meter("pass 1/3 sample", source.rows, progress, (0.0, 0.35))
    reducer = SamplePass(seed=seed, choose_fraction=frac, strata_keys=strata_keys, sample_rows=settings.sample_rows,
                         floor_rows=settings.floor_rows if strata_keys else 0, report_rows=settings.report_rows,
                         group_column=group_column)
    got = runner(source, reducer if spill is None else Tee(reducer, spill), None, meter)
    p1: SamplePass = got.reducer if isinstance(got, Tee) else got
    passes["sample"] = {"rows": float(p1.rows), "seconds": meter.seconds}
    return p1


def solve_at_scale(source: Source, spec: SolveSpec, settings: ScaleSettings | None = None, *,
                   runner: Runner = run_local, progress: ProgressFn | None = None,
                   where: str | None = None) -> ScaleSolve:
    """Solve and certify ``spec`` on ``source`` in three passes (see the module docstring)."""
    settings = (settings or ScaleSettings()).check()
    card = source.card
    if card.token_level and spec.group_column is None:  # token logs are grouped by their sequence, as in memory
        spec = replace(spec, group_column=card.group_column)
    _check_spec(spec, card)
    frac = _choose_fraction(spec, source.rows)
    spill = make_spill(source, runner, settings, _splitter(spec, frac, True),
                       spec.calibrator == "temperature" and not card.token_level)
    try:
        return _solve(source, spec, settings, runner, progress, where, frac, spill)
    finally:
        if spill is not None:
            spill.remove()


def _solve(source: Source, spec: SolveSpec, settings: ScaleSettings, runner: Runner, progress: ProgressFn | None,
           where: str | None, frac: float, spill: Spill | None) -> ScaleSolve:
    card = source.card
    passes: dict[str, dict[str, float]] = {}
    p1 = sample_pass(source, runner, settings, spec.seed, frac, spec.segment_keys, progress, spill, passes,
                     spec.group_column)
    if p1.rows < 2:
        raise InputError(f"{source.name}: too few rows to solve a policy: {p1.rows}")
    check_risk(spec.risk, bool(p1.labelled), source.name)
    sample = p1.choose_sample()
    report = p1.report_sample()
    if report is None:
        raise InputError(f"{source.name}: no certify rows: every request id hashed to the choose split")
    choose_split = _splitter(spec, frac, True)
    if sample is None:  # nothing chooses: the raw shared threshold certified on every row
        base = report.to_logs(card, source.name)
        splits = Splits(choose=np.zeros(0, dtype=np.int64), certify=np.zeros(0, dtype=np.int64), seed=spec.seed)
    else:
        base = sample.to_logs(card, source.name)
        splits = Splits(choose=np.arange(base.n), certify=np.zeros(0, dtype=np.int64), seed=spec.seed)
    if progress is not None:
        progress("fitting pilot calibrators on the sample", 0.35)
    prepared = prepare(base, spec, splits=splits)
    if sample is not None and spec.calibrator == "temperature" and p1.n_choose > base.n and not card.token_level:
        cals = refine_temperatures(source, runner, prepared.calibrator_objects, spec.calibration_target, settings,
                                   progress, choose_split, passes,
                                   None if spill is None else spill.source(source_batch(source)))
        prepared = prepare(base, spec, splits=splits, calibrators=cals)
    grouped = spec.group_column is not None
    if grouped:
        path_cons, test_cons, uncertified, forced, aims = _constraints(prepared, p1.certify_group_counts(),
                                                                       p1.n_certify_groups())
    else:
        path_cons, test_cons, uncertified, forced, aims = _constraints(prepared, p1.certify_counts, p1.n_certify)
    if progress is not None:
        progress("choosing the family and its path on the sample", 0.55)
    plan: PathPlan = plan_path(prepared, path_cons, forced, aims)
    full_depth = plan.prepared.compile(np.full_like(plan.path.points[0].tau, np.nan) if plan.path.points else
                                       np.full((len(prepared.seg_levels), base.n_exits - 1, prepared.n_columns),
                                               np.nan), forced)
    candidates = (*plan.policies, full_depth)
    meter = Meter("pass 3/3 certify", source.rows, progress, (0.6, 1.0))
    labelled = bool(p1.labelled)
    p3 = runner(source, CertifyPass(policies=candidates, calibrators=plan.prepared.calibrators, score=spec.score,
                                    strata_keys=spec.segment_keys, group_column=spec.group_column,
                                    labelled=labelled), _splitter(spec, frac, False), meter)
    passes["certify"] = {"rows": float(p3.rows), "seconds": meter.seconds}
    n_pts = len(plan.policies)
    evals = {j: evaluation_from_counts(p3, j, spec.risk, card.costs, labelled) for j in range(n_pts + 1)}
    if grouped:
        cert, constraints, group_risk = _certify_groups(p3, spec, test_cons, n_pts, source.name)
        stats = {j: (group_risk(j), e.compute_fraction) for j, e in evals.items()}
        evals = {j: replace(e, groups=group_figures(p3, j, labelled)) for j, e in evals.items()}
        counts = {"total": len(p1.choose_groups) + p1.n_certify_groups(), "choose": len(p1.choose_groups),
                  "certify": p1.n_certify_groups()}
    else:
        cert, constraints = _certify_rows(p3, spec, test_cons, n_pts), test_cons
        stats = {j: (e.risk, e.compute_fraction) for j, e in evals.items()}
        counts = None
    split = HashSplit(seed=spec.seed, choose_fraction=frac, key_column=spec.group_column or card.id_column,
                      choose=p1.n_choose, certify=p1.n_certify, sample=0 if sample is None else base.n,
                      group_counts=counts)
    solution = finish_solution(prepared, replace(plan, prepared=replace(plan.prepared, splits=split)), cert, stats,
                               constraints, uncertified, forced, {k: v["seconds"] for k, v in passes.items()},
                               curve_indices(n_pts, len(cert.steps), 6))
    chosen = n_pts if cert.chosen is None else cert.chosen
    return ScaleSolve(solution=solution, expected=evals[chosen], report=report.to_logs(card, source.name),
                      data=_data(p1, source, split, where), counts=p3, passes=passes)


def _certify_rows(p3: CertifyPass, spec: SolveSpec, constraints: Sequence[CountedConstraint],
                  n_pts: int) -> Certification:
    """The fixed-sequence test from the loss counts per constraint (exact binomial over rows)."""
    strata = "|".join(spec.segment_keys)

    def losses(j: int) -> list[int]:
        return [p3.losses(j, ALL_COLUMN if c.name == ALL else strata, "" if c.name == ALL else c.name,
                          spec.risk)[0] for c in constraints]

    return fixed_sequence_counts(losses, n_pts, constraints, spec.delta)


def _certify_groups(p3: CertifyPass, spec: SolveSpec, counted: Sequence[CountedConstraint], n_pts: int,
                    where: str) -> tuple[Certification, list[Constraint], Callable[[int], float]]:
    """The fixed-sequence test over certify groups: one loss per group, as in memory.

    A group's loss is the mean of its rows' losses (Hoeffding-Bentkus) or whether any row lost
    (``sequence_disagreement``: the exact binomial); groups are in key order, so every float is
    added up in the same order whatever the batches.
    """
    assert p3.groups is not None
    table = p3.groups.consolidate()
    size = table["rows"].astype(np.float64)
    lost = table["ind"] if spec.risk == "induced_error" else table["dis"]
    every = np.arange(size.size)
    constraints = [Constraint(ALL, spec.eps, every)]
    if len(counted) > 1:
        strata = p3.groups.strata(p3.stratum_levels, where)
        constraints += [Constraint(c.name, c.eps, np.flatnonzero(strata == c.name)) for c in counted[1:]]

    def losses(j: int) -> np.ndarray:
        return lost[:, j] > 0 if GROUP_RISKS[spec.risk] == "any" else lost[:, j] / size

    def risk(j: int) -> float:
        return float(losses(j).mean()) if size.size else 0.0

    return fixed_sequence(losses, n_pts, constraints, spec.delta), constraints, risk


def group_figures(p3: CertifyPass, j: int, labelled: bool) -> dict[str, Any]:
    """Candidate j's figures per group (the ``groups`` of an evaluation, see ``group_summary``)."""
    assert p3.groups is not None
    table = p3.groups.consolidate()
    size = table["rows"].astype(np.float64)
    g = int(size.size)
    dis = table["dis"][:, j]
    out: dict[str, Any] = {
        "n": g, "mean_disagreement": float((dis / size).mean()) if g else None,
        "sequence_disagreement": float((dis > 0).mean()) if g else None,
        "sequences_with_disagreement": int((dis > 0).sum()),
        "compute_fraction": float((table["cost"][:, j] / FIXED / size).mean()) if g else None,
        "sequence_disagreement_interval": None,
    }
    if labelled and "ind" in table:
        out["mean_induced_error"] = float((table["ind"][:, j] / size).mean()) if g else None
    return out
