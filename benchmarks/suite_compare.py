"""The solver against certified baselines on every data set of the suite (issue 11).

    .venv/bin/python benchmarks/compare.py --suite                 # eps 0.01, 5 split seeds
    .venv/bin/python benchmarks/compare.py --suite --seeds 3 --only fashion_resnet --eps 0.005

For each data set of ``benchmarks/suite.json`` and each split seed, at delta = 0.05:
``solve_policy`` on the calibration logs (the family chosen by cross-validation), then on the
separate test logs the compute fraction and realised risk of

* the solver;
* CALM as its authors run it: one shared threshold on the raw softmax, a fixed grid, Learn-then-
  Test on *every* calibration row;
* per-exit thresholds (Lagrangian path on the choose split, certified on the certify split);
* an out-of-sample oracle: the solver's chosen family fitted on one half of the test logs (its
  most aggressive point whose risk there is at most the solver's realised risk) and scored on
  the other half, both ways round (not deployable: it saw test data);
* the ratio of the solver to the better of the two certified baselines (means over seeds);
* with the data set's first segment column: the solver with budget eps for every segment value
  against the solver with that key and no segment budget, and whether that global policy
  already kept every segment on the test logs.

Means over seeds with their standard deviation; markdown on stdout, raw numbers with --json.
Wall time and peak memory (tracemalloc) of the whole run go to stderr.
"""

from __future__ import annotations

import json
import sys
import time
import tracemalloc
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from exitwise.calibration.evaluate import ScoredLogs, composite_segments, evaluate_scored
from exitwise.calibration.families import FAMILIES, family_path
from exitwise.calibration.logfiles.cards import load_card
from exitwise.calibration.logfiles.readers import load_logs
from exitwise.calibration.pipeline import Solution, SolveSpec, parse_budgets
from exitwise.calibration.solver import Problem
from exitwise.calibration.splits import SplitSpec
from exitwise.policies.authoring import solve_policy

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "suite.json"
DELTA = 0.05


def _oracle(solution: Solution, test: Any, realised: float, seed: int) -> float:
    """Compute fraction of the chosen family fitted on half the test logs at the solver's realised risk,
    scored on the other half (mean of both ways round)."""
    prep = solution.prepared
    spec = prep.spec
    scored = ScoredLogs.from_logs(test, prep.calibrators, spec.score)
    loss = scored.loss_matrix(spec.risk)
    codes, levels = composite_segments(scored.segments, spec.segment_keys, scored.n)
    halves = np.array_split(np.random.default_rng(1000 + seed).permutation(scored.n), 2)
    family = FAMILIES[solution.family]
    out = []
    for fit, score in (halves, halves[::-1]):
        fit = np.sort(fit)
        problem = Problem(
            scores=scored.scores[fit], preds=scored.preds[fit], loss=loss[fit], seg=codes[fit],
            costs=scored.costs / scored.costs[-1], n_classes=scored.n_classes, n_segments=len(levels),
            allowed_exits=prep.allowed_exits, forced_classes=prep.forced_classes,
            forced_segments=np.zeros(len(levels), dtype=bool))
        path = family_path(family, problem, eps=spec.eps, target=realised, settings=spec.settings)
        fit_scored, held = scored.take(fit), scored.take(np.sort(score))
        best = 1.0
        for p in path.points:
            pol = solution.prepared.compile(p.tau, np.zeros(len(levels), dtype=bool)) if levels == prep.seg_levels \
                else None
            if pol is None:
                continue
            if evaluate_scored(pol, fit_scored, spec.risk).risk <= realised:
                best = min(best, evaluate_scored(pol, held, spec.risk).compute_fraction)
        out.append(best)
    return float(np.mean(out))


def _worst_segment(ev: Any, key: str) -> float:
    segs = ev.segments.get(key, {})
    return max((s.risk for s in segs.values()), default=0.0)


def run_dataset(entry: dict[str, Any], eps: float, seeds: int, choose: float | None = None,
                segments: bool = True) -> dict[str, Any]:
    card = load_card(ROOT / entry["card"])
    cal = load_logs(ROOT / entry["calibration"], card)
    test = load_logs(ROOT / entry["test"], card)
    key = (entry.get("segment_columns") or [None])[0]
    runs = []
    for seed in range(seeds):
        t0 = time.perf_counter()
        spec = SolveSpec(eps=eps, delta=DELTA, seed=seed, split=SplitSpec(choose=choose))
        outcome = solve_policy(cal, spec, test_logs=test, baselines=("calm", "per_exit"))
        sol, held = outcome.solution, outcome.held_out
        row: dict[str, Any] = {
            "seed": seed, "family": sol.family, "seconds": time.perf_counter() - t0,
            "solver": held.solver.compute_fraction, "solver_risk": held.solver.risk, "certified": sol.certified,
            "calm": held.baselines["calm"].evaluation.compute_fraction,
            "calm_risk": held.baselines["calm"].evaluation.risk, "calm_certified": held.baselines["calm"].certified,
            "per_exit": held.baselines["per_exit"].evaluation.compute_fraction,
            "per_exit_risk": held.baselines["per_exit"].evaluation.risk,
        }
        row["oracle"] = _oracle(sol, test, held.solver.risk, seed)
        if key and segments:
            keyed = replace(spec, segment_keys=(key,))
            glob = solve_policy(cal, keyed, test_logs=test, baselines=())
            seg = solve_policy(cal, replace(keyed, segment_budgets=parse_budgets([f"*={eps}"])), test_logs=test,
                               baselines=())
            row["global_keyed"] = glob.held_out.solver.compute_fraction
            row["global_keeps_segments"] = _worst_segment(glob.held_out.solver, key) <= eps
            row["segments"] = seg.held_out.solver.compute_fraction
            row["segments_family"] = seg.solution.family
            row["segments_worst"] = _worst_segment(seg.held_out.solver, key)
        runs.append(row)
        print(f"[{entry['name']} eps={eps} seed={seed}] {row['family']}: solver {row['solver']:.3f} "
              f"calm {row['calm']:.3f} per-exit {row['per_exit']:.3f} oracle {row['oracle']:.3f} "
              f"({row['seconds']:.1f} s)", file=sys.stderr, flush=True)
    return {"name": entry["name"], "segment_column": key, "runs": runs}


def _ms(values: list[float]) -> str:
    a = np.asarray(values, dtype=float)
    return f"{100 * a.mean():.1f}% ± {100 * a.std(ddof=1) if a.size > 1 else 0.0:.1f}"


def table(results: list[dict[str, Any]], eps: float) -> str:
    lines = [
        f"eps = {eps:g} (disagreement), delta = {DELTA}; compute fraction on the test logs, mean ± sd over "
        f"{len(results[0]['runs'])} split seeds",
        "",
        "| data set | solver | CALM (all rows) | per-exit | out-of-sample oracle | solver ÷ best certified "
        "| families chosen | risk ≤ eps |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ratios, ok, pairs = [], 0, 0
    for res in results:
        runs = res["runs"]
        s = np.mean([r["solver"] for r in runs])
        best = min(np.mean([r["calm"] for r in runs]), np.mean([r["per_exit"] for r in runs]))
        ratios.append(s / best)
        good = sum(r["solver_risk"] <= eps for r in runs)
        ok, pairs = ok + good, pairs + len(runs)
        fams = ", ".join(f"{f}×{n}" for f, n in sorted(_count([r["family"] for r in runs]).items()))
        lines.append(f"| {res['name']} | {_ms([r['solver'] for r in runs])} | {_ms([r['calm'] for r in runs])} | "
                     f"{_ms([r['per_exit'] for r in runs])} | {_ms([r['oracle'] for r in runs])} | "
                     f"{s / best:.3f} | {fams} | {good}/{len(runs)} |")
    lines.append(f"| **suite mean** | | | | | **{np.mean(ratios):.3f}** | | {ok}/{pairs} |")
    seg_lines = ["", "Per-segment budgets (eps for every value of the first segment column) against the same "
                     "solve with that key and no budget:", "",
                 "| data set | column | global keeps every segment | global | with budgets | ratio |",
                 "|---|---|---|---|---|---|"]
    for res in results:
        runs = [r for r in res["runs"] if "segments" in r]
        if not runs:
            continue
        g = np.mean([r["global_keyed"] for r in runs])
        sb = np.mean([r["segments"] for r in runs])
        keeps = sum(r["global_keeps_segments"] for r in runs)
        seg_lines.append(f"| {res['name']} | {res['segment_column']} | {keeps}/{len(runs)} seeds | "
                         f"{_ms([r['global_keyed'] for r in runs])} | {_ms([r['segments'] for r in runs])} | "
                         f"{sb / g:.3f} |")
    return "\n".join(lines + seg_lines)


def _count(items: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return out


def main(eps: float, seeds: int, only: list[str] | None, json_out: Path | None, choose: float | None = None,
         segments: bool = True) -> str:
    suite = json.loads(SUITE.read_text())["datasets"]
    if only:
        suite = [d for d in suite if d["name"] in only]
    tracemalloc.start()
    t0 = time.perf_counter()
    results = [run_dataset(entry, eps, seeds, choose, segments) for entry in suite]
    wall = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"suite comparison: {wall:.1f} s wall, peak {peak / 2**20:.0f} MiB (tracemalloc)", file=sys.stderr)
    if json_out:
        json_out.write_text(json.dumps({"eps": eps, "results": results}, indent=1, default=float), encoding="utf-8")
    return table(results, eps)
