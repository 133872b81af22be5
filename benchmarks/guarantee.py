"""The guarantee at the scale of the README tables: violations over fresh calibration samples.

    .venv/bin/python benchmarks/guarantee.py [--repeats 30] [--n-cal 40000] [--n-test 1000000] [--eps 0.01]

Each repeat draws a *new* calibration sample (``synthetic_logs(n_cal, 4, 10, segments={'region': 4})``
with its own seed), solves and certifies at (eps, delta = 0.05) with the default split, and
measures the certified policy's risk on one large fresh test sample (its standard error is
about sqrt(eps / n_test)). With probability >= 1 - delta per repeat the risk is <= eps, so
the number of violations should be around delta * repeats or fewer. (The test suite runs the
same check with 150 small repeats: tests/calibration/test_certify.py.) Prints the realised
risks, the violation count, wall time and peak memory (tracemalloc).
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
from pathlib import Path

import numpy as np
from scipy.stats import binom

ROOT = Path(__file__).resolve().parents[1]

from compare import SYNTHETIC  # noqa: E402

from exitwise.calibration.pipeline import SolveSpec  # noqa: E402
from exitwise.calibration.synthetic import synthetic_logs  # noqa: E402
from exitwise.policies.authoring import solve_policy  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--n-cal", type=int, default=40_000)
    ap.add_argument("--n-test", type=int, default=1_000_000)
    ap.add_argument("--eps", type=float, default=0.01)
    ap.add_argument("--delta", type=float, default=0.05)
    ap.add_argument("--risk", default="disagreement", choices=("disagreement", "induced_error"))
    args = ap.parse_args()
    kw = SYNTHETIC
    test = synthetic_logs(args.n_test, seed=2, **kw)
    tracemalloc.start()
    t0 = time.perf_counter()
    risks, computes = [], []
    for r in range(args.repeats):
        cal = synthetic_logs(args.n_cal, seed=1000 + r, **kw)
        spec = SolveSpec(risk=args.risk, eps=args.eps, delta=args.delta, segment_keys=("region",), seed=r)
        outcome = solve_policy(cal, spec, test_logs=test, baselines=())
        sol, ev = outcome.solution, outcome.held_out.solver
        risks.append(ev.risk)
        computes.append(ev.compute_fraction)
        print(f"repeat {r:3d}: certified={sol.certified} risk {100 * ev.risk:.3f}% "
              f"compute {100 * ev.compute_fraction:.1f}%", flush=True)
    wall = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    arr = np.asarray(risks)
    violations = int((arr > args.eps).sum())
    tolerance = int(binom.ppf(0.99, args.repeats, args.delta))
    print(f"{args.risk}, eps={args.eps}, delta={args.delta}: {violations} of {args.repeats} repeats above eps "
          f"(at most ~{args.delta * args.repeats:.1f} expected, {tolerance} at the 99% binomial quantile); "
          f"realised risk mean {100 * arr.mean():.3f}% sd {100 * arr.std():.3f}% max {100 * arr.max():.3f}%; "
          f"compute mean {100 * np.mean(computes):.1f}%; test SE ~{100 * np.sqrt(args.eps / args.n_test):.3f}%")
    print(f"wall {wall:.1f} s for {args.repeats} solves + evaluations; peak traced memory {peak / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
