"""How optimistic the in-sample oracle is: fit it on one half of the test logs, score it on the other.

    .venv/bin/python benchmarks/oracle_optimism.py [--data fashion|synthetic] [--eps 0.01] [--halves 5]

The in-sample oracle of ``benchmarks/compare.py`` fits the solver's threshold family (per
exit x class x segment) directly on the evaluation rows with their exact 0/1 losses. On few
rows that is mostly fitting noise: this script fits it on a random half A of the test logs and
reports compute and risk on A (in-sample, as the table does) and on the other half B (what
the same thresholds do on new traffic). A risk on B far above eps means the oracle's compute
is not reachable by any deployable policy at that eps. Prints wall time and peak memory.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from compare import load  # noqa: E402

from exitwise.calibration import baselines as bl  # noqa: E402
from exitwise.calibration.evaluate import evaluate_scored  # noqa: E402
from exitwise.calibration.pipeline import SolveSpec, solve  # noqa: E402
from exitwise.calibration.splits import split_rows  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", choices=("fashion", "synthetic"), default="fashion")
    ap.add_argument("--eps", type=float, default=0.01)
    ap.add_argument("--halves", type=int, default=5, help="random A/B splits of the test logs to average over")
    ap.add_argument("--n-cal", type=int, default=40_000, help="synthetic calibration rows")
    ap.add_argument("--n-test", type=int, default=20_000, help="synthetic test rows")
    args = ap.parse_args()
    cal, test, key, desc = load(args.data, args.n_cal, args.n_test)
    print(desc)
    tracemalloc.start()
    t0 = time.perf_counter()
    for risk in ("disagreement", "induced_error"):
        sol = solve(cal, SolveSpec(risk=risk, eps=args.eps, delta=0.05, segment_keys=(key,) if key else (), seed=0))
        held = bl.evaluation_data(sol, test)
        rows = []
        for s in range(args.halves):
            half_a, half_b = split_rows(held.n, [held.n // 2], s)
            a, b = held.take(half_a), held.take(half_b)
            pol = bl.in_sample_oracle(sol.prepared, sol, a)
            ea, eb = evaluate_scored(pol, a, risk), evaluate_scored(pol, b, risk)
            rows.append((ea.compute_fraction, ea.risk, eb.compute_fraction, eb.risk))
        m = np.mean(rows, axis=0)
        print(f"{risk}, eps={args.eps}: oracle fitted on half A ({held.n // 2:,} rows): on A compute "
              f"{100 * m[0]:.1f}% risk {100 * m[1]:.2f}%; on B compute {100 * m[2]:.1f}% risk {100 * m[3]:.2f}% "
              f"(mean of {args.halves} splits)")
    _, peak = tracemalloc.get_traced_memory()
    print(f"wall {time.perf_counter() - t0:.1f} s; peak traced memory {peak / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
