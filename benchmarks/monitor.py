"""Benchmark: the anytime-valid risk bound of monitoring against a fixed-n bound, and the cost of a shadow summary.

    .venv/bin/python benchmarks/monitor.py [--runs 200] [--batch 100] [--checks 100] [--eps 0.02] [--delta 0.05]
                                           [--seed 0] [--json]

Issue 12. **Simulation** (the bound alone, no model): each of ``--runs`` monitoring runs sees
Bernoulli(risk) losses in ``--checks`` batches of ``--batch`` shadow samples and is checked after
every batch. An alarm (``breach``) is raised at the first check whose lower bound is over ε —
for the confidence sequence that is exactly ``RiskBound.breached`` of the running intersection.
Three bounds on the same draws:

* ``confidence sequence``: :func:`exitwise.calibration.sequential.confidence_sequence` at δ with
  :func:`~exitwise.calibration.sequential.default_prior` (valid at every check, however many);
* ``Clopper-Pearson``: :func:`~exitwise.calibration.sequential.fixed_n_interval` at δ recomputed
  at every check, as if each check were the only one;
* ``CP, delta/checks``: Clopper–Pearson at δ / checks (Bonferroni over the checks): valid, but
  only for a number of checks fixed in advance, which monitoring does not have.

At risk = ε every alarm is false: the rate must stay <= δ (shown with its exact 95% interval over
the runs). At risk = 2ε every alarm is right: the detection rate within checks x batch samples and
the quartiles of the number of samples to the alarm (``>N``: not within N). Then the prior
strength a + b of the Beta prior is swept (``sequential.PRIOR_STRENGTH`` is the default): false
alarms at ε, how soon the bound proves a risk of 0.5ε or 0.75ε safe (upper end <= ε, the
``safe`` status) and how soon it flags 1.25ε ... 3ε; and ε is varied. Draws are seeded, one
stream per risk, shared across bounds and priors (common random numbers).

**Shadow summary cost**: a policy is solved on ``examples/data/fashion_mnist/calibration.parquet``
(segment key ``capture`` with a budget of 2ε per value, so three constrained segments) and
:func:`~exitwise.calibration.monitor.summarise_shadow` is timed on the 10,000 rows of
``test.parquet`` as one batch (best and median of ``--repeats``), then ``update_bounds`` +
``assess``. Wall time is measured untraced; peak memory in a second, ``tracemalloc``-traced run.
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from exitwise.calibration import load_card, load_logs
from exitwise.calibration.monitor import assess, start_bounds, summarise_shadow, update_bounds
from exitwise.calibration.pipeline import SolveSpec, parse_budgets
from exitwise.calibration.sequential import (
    PRIOR_STRENGTH,
    RiskBound,
    confidence_sequence,
    default_prior,
    fixed_n_interval,
)
from exitwise.policies.authoring import solve_policy

ROOT = Path(__file__).resolve().parents[1]
FASHION = ROOT / "examples" / "data" / "fashion_mnist"
STRENGTHS = (2.0, 5.0, 10.0, 20.0, 50.0, 100.0)
SAFE_RATIOS = (0.5, 0.75)  # risks below ε: samples until the bound proves it safe
RATIOS = (1.25, 1.5, 2.0, 3.0)  # risks above ε: samples to the alarm
EPS_ROWS = (0.01, 0.02, 0.05)
Bound = Callable[[np.ndarray, np.ndarray], np.ndarray]


# ---------------------------------------------------------------- simulation

class Draws:
    """Cumulative losses (runs, checks) after each batch at a given risk: one seeded stream per risk.

    The same risk gives the same draws in every section (common random numbers across bounds
    and priors), whatever else is simulated.
    """

    def __init__(self, runs: int, checks: int, batch: int, seed: int) -> None:
        self.runs, self.checks, self.batch, self.seed = runs, checks, batch, seed
        self.n = np.broadcast_to(np.arange(1, checks + 1, dtype=np.float64) * batch, (runs, checks))
        self._cache: dict[float, np.ndarray] = {}

    def __call__(self, risk: float) -> np.ndarray:
        if risk not in self._cache:
            rng = np.random.default_rng([self.seed, round(risk * 1e9)])
            self._cache[risk] = np.cumsum(rng.binomial(self.batch, risk, size=(self.runs, self.checks)), axis=1)
        return self._cache[risk]

    def first(self, hit: np.ndarray) -> np.ndarray:
        """Samples seen at each run's first check where ``hit`` (inf: never)."""
        return np.where(hit.any(axis=1), (np.argmax(hit, axis=1) + 1.0) * self.batch, np.inf)


def lower_ends(eps: float, delta: float, checks: int) -> dict[str, Bound]:
    """The lower ends compared, each a function of (samples, cumulative losses)."""
    prior = default_prior(eps)
    return {
        "confidence sequence": lambda n, s: confidence_sequence(n, s, delta, prior)[0],
        "Clopper-Pearson": lambda n, s: fixed_n_interval(n, s, delta)[0],
        "CP, delta/checks": lambda n, s: fixed_n_interval(n, s, delta / checks)[0],
    }


def rate(hits: int, runs: int) -> dict[str, Any]:
    """A rate over the runs with its exact (Clopper–Pearson) 95% interval."""
    lo, hi = fixed_n_interval(runs, hits, 0.05)
    return {"hits": hits, "rate": hits / runs, "ci95": [float(lo), float(hi)]}


def alarms(times: np.ndarray) -> dict[str, Any]:
    """Rate of runs with an event and quartiles of the samples to it (None: not within the horizon)."""
    q = np.quantile(times, [0.25, 0.5, 0.75], method="inverted_cdf")
    return {**rate(int(np.isfinite(times).sum()), times.size),
            "samples_q1_median_q3": [float(v) if np.isfinite(v) else None for v in q]}


def compare(d: Draws, eps: float, delta: float) -> dict[str, Any]:
    """Each bound's alarms at risk ε (all false) and 2ε (all right)."""
    out = {}
    for name, lower in lower_ends(eps, delta, d.checks).items():
        out[name] = {"null": alarms(d.first(lower(d.n, d(eps)) > eps)),
                     "alternative": alarms(d.first(lower(d.n, d(2 * eps)) > eps))}
    return out


def simulate(d: Draws, eps: float, delta: float, strengths: tuple[float, ...],
             eps_rows: tuple[float, ...]) -> dict[str, Any]:
    main = compare(d, eps, delta)
    # the time-uniform miscoverage of the sequence: ε outside the interval, either side, at some check
    lo, hi = confidence_sequence(d.n, d(eps), delta, default_prior(eps))
    main["confidence sequence"]["null"]["miscoverage"] = rate(int(((lo > eps) | (hi < eps)).any(axis=1).sum()),
                                                              d.runs)
    check_risk_bound(d, eps, delta)
    sweep = []
    for strength in strengths:
        prior = default_prior(eps, strength)
        row: dict[str, Any] = {"strength": strength, "prior": list(prior)}
        for ratio in (*SAFE_RATIOS, 1.0, *RATIOS):
            lo, hi = confidence_sequence(d.n, d(ratio * eps), delta, prior)
            # below ε the bound should prove the policy safe (upper <= ε), above it breached
            row[f"{ratio:g}x"] = alarms(d.first(hi <= eps if ratio < 1 else lo > eps))
        sweep.append(row)
    by_eps = [{"eps": e, **compare(d, e, delta)} for e in eps_rows]
    return {"main": main, "prior_sweep": sweep, "by_eps": by_eps}


def check_risk_bound(d: Draws, eps: float, delta: float) -> None:
    """The vectorised alarm times are what ``RiskBound.update`` batch by batch gives (a few runs).

    ``RiskBound.update`` is scalar (about 10 ms a call), so only the first two runs at 2ε and,
    at ε, the first run with a false alarm and the first without one are replayed.
    """
    for risk in (eps, 2 * eps):
        cum = d(risk)
        times = d.first(confidence_sequence(d.n, cum, delta, default_prior(eps))[0] > eps)
        if risk == eps:
            alarmed, quiet = np.flatnonzero(np.isfinite(times)), np.flatnonzero(~np.isfinite(times))
            runs = [*alarmed[:1], *quiet[:1]]
        else:
            runs = [0, 1]
        for r in runs:
            b, seen = RiskBound.start(eps, delta), np.inf
            for s in np.diff(cum[r], prepend=0):
                b = b.update(d.batch, int(s))
                if b.breached:
                    seen = float(b.n)
                    break
            if seen != times[r]:
                raise AssertionError(f"RiskBound and the vectorised bound disagree in run {r}: {seen} vs {times[r]}")


# ---------------------------------------------------------------- cost of a shadow summary

def shadow_cost(eps: float, delta: float, repeats: int) -> dict[str, Any]:
    card = load_card(FASHION / "card.json")
    cal = load_logs(FASHION / "calibration.parquet", card)
    test = load_logs(FASHION / "test.parquet", card)
    spec = SolveSpec(risk="disagreement", eps=eps, delta=delta, segment_keys=("capture",),
                     segment_budgets=parse_budgets([f"*={2 * eps}"]))
    t0 = time.perf_counter()
    document = solve_policy(cal, spec, baselines=()).document
    solve_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        summary = summarise_shadow(document, test)
        times.append(time.perf_counter() - t0)
    tracemalloc.start()
    summarise_shadow(document, test)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    t0 = time.perf_counter()
    bounds_now = update_bounds(start_bounds(document), summary)
    verdict = assess(document, bounds_now, summary, summary)
    assess_s = time.perf_counter() - t0
    best, median = min(times), float(np.median(times))
    return {
        "rows": test.n, "exits": test.n_exits, "classes": test.n_classes, "solve_seconds": solve_s,
        "segments": {k: list(v) for k, v in summary.segments.items()},
        "summarise_seconds_best": best, "summarise_seconds_median": median,
        "rows_per_second_best": test.n / best, "rows_per_second_median": test.n / median,
        "summarise_peak_bytes": int(peak), "logits_bytes": int(test.logits.nbytes),
        "summary_json_bytes": len(json.dumps(summary.to_json())),
        "update_bounds_assess_seconds": assess_s, "verdict": verdict.verdict, "reasons": list(verdict.reasons),
    }


# ---------------------------------------------------------------- output

def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _rate(r: dict[str, Any]) -> str:
    lo, hi = r["ci95"]
    return f"{r['hits']:>3} {_pct(r['rate']):>6} [{_pct(lo)}, {_pct(hi)}]"


def _quartiles(a: dict[str, Any], horizon: int) -> str:
    return " / ".join(f">{horizon}" if v is None else f"{v:.0f}" for v in a["samples_q1_median_q3"])


def show(out: dict[str, Any]) -> None:
    a = out["args"]
    runs, horizon, eps = a["runs"], a["checks"] * a["batch"], a["eps"]
    sim = out["simulation"]
    print(f"command: {out['command']}")
    print(f"{runs} runs x {a['checks']} checks x {a['batch']} shadow samples (horizon {horizon}), eps {eps}, "
          f"delta {a['delta']}, seed {a['seed']}, prior strength {PRIOR_STRENGTH:g} (default)")
    print(f"\nrisk = eps: false alarms (rate, exact 95% CI); risk = 2 eps: detected within {horizon} samples, "
          "samples to the alarm q1 / median / q3")
    print(f"{'bound':<21} {'false alarms at eps':>27}   {'detected at 2 eps':>27}   {'samples q1 / med / q3':>22}")
    for name, r in sim["main"].items():
        print(f"{name:<21} {_rate(r['null']):>27}   {_rate(r['alternative']):>27}   "
              f"{_quartiles(r['alternative'], horizon):>22}")
    mis = sim["main"]["confidence sequence"]["null"]["miscoverage"]
    print(f"confidence sequence, eps outside the interval (either side) at some check: {_rate(mis)}")

    print(f"\nprior strength a + b of the Beta prior (mean 2 eps = {min(2 * eps, 0.5):g}), confidence sequence only: "
          "false alarms at eps; below eps, runs proven safe (upper <= eps) / median samples to it; above eps, "
          "runs breached / median samples to it")
    ratios = [k for k in sim["prior_sweep"][0] if k.endswith("x") and k != "1x"]
    heads = [("safe " if float(k[:-1]) < 1 else "breach ") + k for k in ratios]
    print(f"{'a + b':>6} {'false alarms at eps':>27}" + "".join(f"{h:>15}" for h in heads))
    for row in sim["prior_sweep"]:
        mark = "  (default)" if row["strength"] == PRIOR_STRENGTH else ""
        print(f"{row['strength']:>6g} {_rate(row['1x']):>27}"
              + "".join(f"{_pct(row[k]['rate']):>7} /{_median(row[k], horizon):>6}" for k in ratios) + mark)

    print("\nby eps (default prior): false alarms at eps | detected at 2 eps, median samples to the alarm")
    names = [k for k in sim["by_eps"][0] if k != "eps"]
    print(f"{'eps':>6} " + "".join(f"{n:>34}" for n in names))
    for row in sim["by_eps"]:
        print(f"{row['eps']:>6g} " + "".join(
            f"{_pct(row[n]['null']['rate']):>12} | {_pct(row[n]['alternative']['rate']):>6}, "
            f"{_median(row[n]['alternative'], horizon):>7}    " for n in names))
    print(f"simulation: wall {out['simulation_seconds']:.2f} s (under tracemalloc), peak traced memory "
          f"{out['simulation_peak_bytes'] / 2**20:.0f} MiB")

    c = out.get("shadow")
    if c:
        print(f"\nsummarise_shadow on fashion_mnist test.parquet: {c['rows']:,} rows, {c['exits']} exits, "
              f"{c['classes']} classes, segments {c['segments']} (policy solved in {c['solve_seconds']:.1f} s)")
        print(f"  {c['summarise_seconds_best'] * 1e3:.1f} ms best / {c['summarise_seconds_median'] * 1e3:.1f} ms "
              f"median of {a['repeats']} = {c['rows_per_second_best']:,.0f} / {c['rows_per_second_median']:,.0f} "
              f"rows/s; peak traced memory {c['summarise_peak_bytes'] / 2**20:.1f} MiB "
              f"(logits {c['logits_bytes'] / 2**20:.1f} MiB); summary JSON {c['summary_json_bytes']} bytes")
        print(f"  update_bounds + assess: {c['update_bounds_assess_seconds'] * 1e3:.1f} ms; verdict {c['verdict']}"
              + (f" ({'; '.join(c['reasons'])})" if c["reasons"] else ""))


def _median(a: dict[str, Any], horizon: int) -> str:
    v = a["samples_q1_median_q3"][1]
    return f">{horizon}" if v is None else f"{v:.0f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--batch", type=int, default=100, help="shadow samples between checks")
    ap.add_argument("--checks", type=int, default=100)
    ap.add_argument("--eps", type=float, default=0.02)
    ap.add_argument("--delta", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--strengths", type=float, nargs="+", default=list(STRENGTHS), help="prior a + b to sweep")
    ap.add_argument("--repeats", type=int, default=5, help="timed summarise_shadow calls")
    ap.add_argument("--no-shadow", action="store_true", help="skip the summarise_shadow cost")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    if min(args.runs, args.batch, args.checks, args.repeats) < 1:
        ap.error("--runs, --batch, --checks and --repeats must be >= 1")
    if min(args.strengths) <= 0:
        ap.error("--strengths must be > 0 (a + b of the Beta prior)")
    if not 0 < args.eps < 1 / 3 or not 0 < args.delta < 1:
        ap.error("--eps must be in (0, 1/3) (risks up to 3 eps are simulated) and --delta in (0, 1)")
    command = shlex.join([".venv/bin/python", "benchmarks/monitor.py", "--runs", str(args.runs), "--batch",
                          str(args.batch), "--checks", str(args.checks), "--eps", str(args.eps), "--delta",
                          str(args.delta), "--seed", str(args.seed), "--strengths",
                          *[f"{s:g}" for s in args.strengths], "--repeats", str(args.repeats),
                          *(["--no-shadow"] if args.no_shadow else []), *(["--json"] if args.json else [])])
    eps_rows = tuple(sorted({*EPS_ROWS, args.eps}))
    tracemalloc.start()
    t0 = time.perf_counter()
    sim = simulate(Draws(args.runs, args.checks, args.batch, args.seed), args.eps, args.delta,
                   tuple(args.strengths), eps_rows)
    wall = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    out = {"command": command, "args": vars(args), "prior_strength_default": PRIOR_STRENGTH,
           "simulation": sim, "simulation_seconds": wall, "simulation_peak_bytes": int(peak)}
    if not args.no_shadow:
        out["shadow"] = shadow_cost(args.eps, args.delta, args.repeats)
    if args.json:
        print(json.dumps(out, sort_keys=True))
    else:
        show(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
