"""The README comparison table: solver vs baselines, realised on held-out test logs (issue 3).

    .venv/bin/python benchmarks/compare.py --data synthetic            # synthetic logs with segments
    .venv/bin/python benchmarks/compare.py --data synthetic-overconfident  # one segment's early exits over-confident
    .venv/bin/python benchmarks/compare.py --data fashion              # examples/data/fashion_mnist
    .venv/bin/python benchmarks/compare.py --data both --seeds 3 --out /tmp/compare.md
    .venv/bin/python benchmarks/compare.py --suite                     # every data set of the suite, 5 seeds

For each risk (disagreement, induced_error) and eps (0.005, 0.01, 0.02), at delta = 0.05:
solve on the calibration logs (split fit / select / certify with ``--seeds`` different
seeds), then measure every policy on the separate test logs: compute fraction, realised
risk and the worst segment's realised risk. Rows: the solver (certified), CALM, per-exit
thresholds (both certified the same way), one global max-prob threshold (chosen on the
select split, uncertified), full depth, the in-sample oracle of the solver's family
(thresholds fitted on the test logs themselves) and the per-sample oracle; plus the solver
with a budget of eps for every segment value (``--segment-budget '*=EPS'``). Numbers are
means over seeds; "max risk" is the largest realised risk over seeds. Markdown on stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from exitwise.calibration import baselines as bl  # noqa: E402
from exitwise.calibration.logfiles.cards import load_card  # noqa: E402
from exitwise.calibration.logfiles.readers import load_logs  # noqa: E402
from exitwise.calibration.pipeline import SolveSpec, parse_budgets  # noqa: E402
from exitwise.calibration.synthetic import synthetic_logs  # noqa: E402
from exitwise.policies.authoring import solve_policy  # noqa: E402

FASHION = ROOT / "examples" / "data" / "fashion_mnist"
EPS = (0.005, 0.01, 0.02)
SYNTHETIC: dict[str, Any] = {"n_exits": 4, "n_classes": 10, "segments": {"region": 4}}  # synthetic_logs shape
RISKS = ("disagreement", "induced_error")
ROWS = ("solver", "solver_segments", *bl.NAMES)
LABEL = {**bl.LABELS, "solver": "**solver (certified)**",
         "solver_segments": "solver, budget eps per segment (certified)"}


def _overconfident(logs: Any, value: str, factor: float) -> Any:
    """The same logs with the early exits' logits of one segment value scaled by ``factor``
    (that segment's shallow exits are over-confident, e.g. a capture device the early
    layers never saw; one temperature per exit cannot fix it, per-segment thresholds can).
    """
    col = logs.segments["region"]
    rows = col.codes == col.levels.index(value)
    logits = logs.logits.copy()
    logits[rows, :-1, :] *= factor
    return dataclasses.replace(logs, logits=logits)


def load(data: str, n_cal: int, n_test: int) -> tuple[Any, Any, str | None, str]:
    """(calibration logs, test logs, segment key or None, description)."""
    if data in ("synthetic", "synthetic-overconfident"):
        kw = SYNTHETIC
        cal = synthetic_logs(n_cal, seed=1, **kw)
        test = synthetic_logs(n_test, seed=2, **kw)
        desc = (f"synthetic (`synthetic_logs(n, 4, 10, segments={{'region': 4}})`): "
                f"{cal.n:,} calibration rows (seed 1), {test.n:,} test rows (seed 2)")
        if data == "synthetic-overconfident":
            cal, test = _overconfident(cal, "region_3", 2.0), _overconfident(test, "region_3", 2.0)
            desc += "; early-exit logits of segment region_3 (the hard one) scaled x2 (over-confident)"
        return cal, test, "region", desc
    card = load_card(FASHION / "card.json")
    cal = load_logs(FASHION / "calibration.parquet", card)
    test = load_logs(FASHION / "test.parquet", card)
    key = card.segment_columns[0] if card.segment_columns else None
    return cal, test, key, (f"Fashion-MNIST (`examples/data/fashion_mnist`): {cal.n:,} calibration rows, "
                            f"{test.n:,} test rows, {cal.n_exits} exits, segment column {key or 'none'}")


def _worst(ev: Any, key: str | None) -> float | None:
    segs = ev.segments.get(key or "", {})
    return max(s.risk for s in segs.values()) if segs else None


def run_one(cal: Any, test: Any, key: str | None, risk: str, eps: float, seed: int) -> dict[str, dict[str, Any]]:
    keys = (key,) if key else ()
    out: dict[str, dict[str, Any]] = {}
    t0 = time.perf_counter()
    outcome = solve_policy(cal, SolveSpec(risk=risk, eps=eps, delta=0.05, segment_keys=keys, seed=seed),
                           test_logs=test)
    ev = outcome.held_out.solver
    out["solver"] = {"cf": ev.compute_fraction, "risk": ev.risk, "worst": _worst(ev, key),
                     "cert": outcome.solution.certified, "seconds": time.perf_counter() - t0}
    for name, res in outcome.held_out.baselines.items():
        e = res.evaluation
        out[name] = {"cf": e.compute_fraction, "risk": e.risk, "worst": _worst(e, key), "cert": res.certified}
    if key:
        seg = solve_policy(cal, SolveSpec(risk=risk, eps=eps, delta=0.05, segment_keys=keys, seed=seed,
                                          segment_budgets=parse_budgets([f"*={eps}"])), test_logs=test, baselines=())
        e = seg.held_out.solver
        out["solver_segments"] = {"cf": e.compute_fraction, "risk": e.risk, "worst": _worst(e, key),
                                  "cert": seg.solution.certified, "uncertified": sorted(seg.solution.uncertified)}
    return out


def _fmt(v: float | None, pct: bool = True, digits: int = 2) -> str:
    if v is None or not np.isfinite(v):
        return "—"
    return f"{100 * v:.{digits}f}%" if pct else f"{v:.{digits}f}"


def table(results: dict[float, list[dict[str, dict[str, Any]]]], key: str | None) -> str:
    head = "| policy | " + " | ".join(f"eps={e:g}: compute / risk (max) / worst seg." for e in EPS) + " |"
    lines = [head, "|---|" + "---|" * len(EPS)]
    for row in ROWS:
        if row == "solver_segments" and not key:
            continue
        cells = []
        for eps in EPS:
            runs = [r[row] for r in results[eps] if row in r]
            if not runs:
                cells.append("—")
                continue
            cf = float(np.mean([r["cf"] for r in runs]))
            rk = [r["risk"] for r in runs]
            worst = [r["worst"] for r in runs if r["worst"] is not None]
            cell = f"{_fmt(cf, digits=1)} / {_fmt(float(np.mean(rk)), digits=3)} ({_fmt(max(rk), digits=3)})"
            if worst:
                w = float(np.mean(worst))
                cell += f" / {'**' if max(worst) > eps else ''}{_fmt(w, digits=3)}{'**' if max(worst) > eps else ''}"
            cells.append(cell)
        lines.append(f"| {LABEL.get(row, row)} | " + " | ".join(cells) + " |")
    ratio = []
    for eps in EPS:
        s = np.mean([r["solver"]["cf"] for r in results[eps]])
        o = np.mean([r["oracle"]["cf"] for r in results[eps]])
        c = np.mean([r["calm"]["cf"] for r in results[eps]])
        p = np.mean([r["per_exit"]["cf"] for r in results[eps]])
        ratio.append(f"{s / o:.3f} / {s / c:.3f} / {s / p:.3f}")
    lines.append("| solver compute ÷ oracle / ÷ CALM / ÷ per-exit | " + " | ".join(ratio) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", choices=("synthetic", "synthetic-overconfident", "fashion", "both"), default="both")
    ap.add_argument("--suite", action="store_true", help="every data set of benchmarks/suite.json (suite_compare.py)")
    ap.add_argument("--eps", type=float, default=0.01, help="risk budget of --suite")
    ap.add_argument("--only", nargs="*", help="--suite: only these data sets")
    ap.add_argument("--choose-fraction", type=float, help="--suite: share of rows that choose (default: by n)")
    ap.add_argument("--no-segments", action="store_true", help="--suite: skip the per-segment budget runs")
    ap.add_argument("--seeds", type=int, default=1, help="split seeds to average over")
    ap.add_argument("--n-cal", type=int, default=40_000, help="synthetic calibration rows")
    ap.add_argument("--n-test", type=int, default=200_000, help="synthetic test rows")
    ap.add_argument("--out", type=Path, help="also write the markdown here")
    ap.add_argument("--json", type=Path, help="write the raw numbers here")
    args = ap.parse_args(argv)
    if args.suite:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from suite_compare import main as suite_main  # lazy: only --suite needs it

        text = suite_main(args.eps, args.seeds if args.seeds > 1 else 5, args.only, args.json, args.choose_fraction,
                         not args.no_segments)
        print(text)
        if args.out:
            args.out.write_text(text + "\n", encoding="utf-8")
        return
    datasets = ("synthetic", "fashion") if args.data == "both" else (args.data,)
    parts: list[str] = []
    raw: dict[str, Any] = {}
    for data in datasets:
        if data == "fashion" and not (FASHION / "calibration.parquet").exists():
            parts.append(f"_Fashion-MNIST logs not found in {FASHION}; skipped._")
            continue
        cal, test, key, desc = load(data, args.n_cal, args.n_test)
        parts.append(f"### {desc}\n")
        raw[data] = {}
        for risk in RISKS:
            results: dict[float, list[dict[str, dict[str, Any]]]] = {eps: [] for eps in EPS}
            for eps in EPS:
                for seed in range(args.seeds):
                    results[eps].append(run_one(cal, test, key, risk, eps, seed))
                    print(f"[{data} {risk} eps={eps} seed={seed}] done", file=sys.stderr, flush=True)
            raw[data][risk] = {str(e): v for e, v in results.items()}
            parts.append(f"**{risk}** (delta = 0.05, {args.seeds} split seed(s); compute fraction / realised "
                         f"risk on the test logs, mean (max over seeds) / worst segment's realised risk "
                         f"(mean over seeds, **bold** when it is above eps for any seed))\n")
            parts.append(table(results, key) + "\n")
    text = "\n".join(parts)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    if args.json:
        args.json.write_text(json.dumps(raw, indent=1, default=float), encoding="utf-8")


if __name__ == "__main__":
    main()
