"""Benchmark: solve + certify on token-level logs, 10^6 tokens x 12 exits x top-32 (issue 13).

    .venv/bin/python benchmarks/tokens.py                         # 10^6 tokens, both group risks
    .venv/bin/python benchmarks/tokens.py --sequences 2000 --length 50   # a quick run

Synthetic token logs (``exitwise.calibration.synthetic_tokens``: 20,000 sequences of 50 tokens,
V = 32,000, top-32, per-sequence difficulty) are generated first (not timed). Timed: the whole
of ``exitwise solve`` but reading files and writing the document — the group split, top-k
temperature fits, scoring every exit from its top-k, the token buckets, the family choice,
the path (refined at the token risk that meets the group aim) and the fixed-sequence
certification over certify *sequences*. Peak memory is measured with ``tracemalloc`` over a
second, identical call (it slows what it watches), on top of the logs already in memory.
Target: under 60 s.
"""

from __future__ import annotations

import argparse
import json
import time
import tracemalloc

from exitwise.calibration.pipeline import SolveSpec, solve
from exitwise.calibration.synthetic_tokens import synthetic_token_logs


def run(sequences: int, length: int, exits: int, vocab: int, top_k: int, risk: str, eps: float,
        memory: bool) -> dict[str, object]:
    t0 = time.perf_counter()
    logs = synthetic_token_logs(sequences, length, n_exits=exits, vocab_size=vocab, top_k=top_k, seed=0)
    generated = time.perf_counter() - t0
    spec = SolveSpec(risk=risk, eps=eps, delta=0.05)
    t0, c0 = time.perf_counter(), time.process_time()
    sol = solve(logs, spec)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = None
    if memory:
        tracemalloc.start()
        solve(logs, spec)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    logs_bytes = logs.values.nbytes + logs.indices.nbytes + logs.lse.nbytes
    result = sol.certification.chosen_step.results[0] if sol.certified else None
    return {
        "tokens": logs.n, "sequences": sequences, "exits": exits, "vocab": vocab, "top_k": top_k,
        "risk": risk, "eps": eps, "generate_s": round(generated, 1), "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1), **{f"{k}_s": round(v, 1) for k, v in sol.timings.items()},
        "logs_mb": round(logs_bytes / 2**20), "peak_extra_mb": None if peak is None else round(peak / 2**20),
        "certified": sol.certified, "certify_groups": None if result is None else result.n,
        "upper_bound": None if result is None else round(result.upper_bound, 4),
        "compute_fraction": next((round(c["compute_fraction"], 3) for c in reversed(sol.curve) if c["certified"]),
                                 None),
        "family": sol.family,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sequences", type=int, default=20_000)
    ap.add_argument("--length", type=int, default=50)
    ap.add_argument("--exits", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=32_000)
    ap.add_argument("--top-k", type=int, default=32)
    ap.add_argument("--no-memory", action="store_true", help="skip the second, traced run")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = [run(args.sequences, args.length, args.exits, args.vocab, args.top_k, risk, eps, not args.no_memory)
            for risk, eps in (("sequence_disagreement", 0.05), ("disagreement", 0.01))]
    if args.json:
        print(json.dumps(rows))
        return
    keys = ("risk", "eps", "tokens", "wall_s", "cpu_s", "choose_s", "path_s", "certify_s", "logs_mb", "peak_extra_mb",
            "certified", "certify_groups", "upper_bound", "compute_fraction", "family")
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row.get(k)) for k in keys) + " |")


if __name__ == "__main__":
    main()
