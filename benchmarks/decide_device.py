"""Benchmark: ``decide`` on torch tensors and on numpy against one exit-head matmul (issue 13, item 4).

    .venv/bin/python benchmarks/decide_device.py [--n 64] [--vocab 32000] [--hidden 768] [--threads 2]
                                                 [--device cpu] [--repeat 30] [--json]

Cases: a language model's exit (vocabulary policy: top_k 32, temperature calibrator, 4 token
buckets, logits (n, V)) and a classifier's exit (C = 10). For each: the exit head, one
(n, hidden) @ (hidden, V) float32 torch matmul, the reference cost; ``decide`` on the torch
tensor (on ``--device``); ``decide`` on the same logits as a numpy array. Each time is the
median of ``--repeat`` warm single calls (the 10th percentile beside it, and the ratios of both:
on a shared machine torch's second thread is often descheduled, which inflates the median). Peak memory of one call
is measured in a fresh subprocess per case: the growth of the resident set during the call
(sampled from /proc, Linux; torch's CPU allocator is invisible to tracemalloc) and, for numpy,
tracemalloc's peak of the call. Prints a table (``--json``: one JSON object); it
asserts nothing. torch is needed here, not by exitwise.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from exitwise.calibration.buckets import encode_bucket_map, frequency_buckets
from exitwise.calibration.rule import CompiledPolicy, decide

CALIBRATOR = {"type": "temperature", "temperature": 1.3}


def _policy(outputs: int, vocabulary: bool, top_k: int) -> CompiledPolicy:
    """A 3-exit policy: for a vocabulary, 4 frequency buckets of a Zipf token stream."""
    rng = np.random.default_rng(0)
    if vocabulary:
        ranks = rng.zipf(1.1, size=200_000)
        tokens = rng.permutation(outputs)[ranks[ranks <= outputs] - 1]
        bucket_of, names, _ = frequency_buckets(tokens, outputs)
        vocab = {"size": outputs, "top_k": top_k, "bucket_of": encode_bucket_map(bucket_of)}
        classes = list(names)
    else:
        vocab, classes = None, [f"c{i}" for i in range(outputs)]
    row = [float(t) for t in rng.uniform(0.3, 0.9, size=len(classes))]
    doc: dict[str, Any] = {
        "exits": [{"name": f"e{i}", "cost": float(i + 1), "calibrator": CALIBRATOR} for i in range(3)],
        "classes": classes, "score": "max_prob", "thresholds": {"default": [row, row]},
    }
    if vocab is not None:
        doc["vocabulary"] = vocab
    return CompiledPolicy.from_document(doc)


def _inputs(n: int, hidden: int, outputs: int, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(n, hidden, generator=gen)
    w = torch.randn(hidden, outputs, generator=gen) / hidden**0.5
    logits = (h @ w) * 4.0
    return h.to(device), w.to(device), logits.to(device)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elif device == "mps":
        torch.mps.synchronize()


def _time(fn: Callable[[], object], repeat: int, device: str) -> tuple[float, float]:
    """(median, 10th percentile) of ``repeat`` warm single calls, seconds."""
    for _ in range(3):
        fn()
    _sync(device)
    singles = np.empty(repeat)
    for i in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        singles[i] = time.perf_counter() - t0
    return float(np.median(singles)), float(np.percentile(singles, 10))


def _calls(case: str, args: argparse.Namespace) -> dict[str, Callable[[], object]]:
    vocabulary = case == "vocabulary"
    outputs = args.vocab if vocabulary else args.classes
    policy = _policy(outputs, vocabulary, args.top_k)
    h, w, logits = _inputs(args.n, args.hidden, outputs, args.device)
    host = logits.cpu().numpy()
    out = torch.empty(args.n, outputs, device=args.device)
    return {
        "exit head matmul": lambda: torch.matmul(h, w, out=out),
        "decide torch": lambda: decide(policy, 0, logits),
        "decide numpy": lambda: decide(policy, 0, host),
    }


def _rss_mb() -> float:
    """This process's resident set now (Linux /proc), MiB."""
    with open("/proc/self/statm", encoding="ascii") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _memory(case: str, what: str, args: argparse.Namespace) -> dict[str, float | None]:
    """In this (fresh) process: the peak growth of the resident set during one call (sampled every
    0.2 ms by a thread; the libraries release the GIL in their kernels) and tracemalloc's peak for numpy."""
    torch.set_num_threads(args.threads)
    fn = _calls(case, args)[what]
    gc.collect()
    base, peak, stop = _rss_mb(), [0.0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.0002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    traced = None
    if what == "decide numpy":
        tracemalloc.start()
    fn()
    if what == "decide numpy":
        traced = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    time.sleep(0.002)
    stop.set()
    sampler.join()
    return {"rss_growth_mb": max(peak[0], _rss_mb()) - base, "tracemalloc_peak_mb": traced}


def _measure_memory(case: str, what: str, args: argparse.Namespace) -> dict[str, float | None]:
    cmd = [sys.executable, __file__, "--memory-of", f"{case}:{what}", "--n", str(args.n), "--vocab", str(args.vocab),
           "--classes", str(args.classes), "--hidden", str(args.hidden), "--top-k", str(args.top_k),
           "--threads", str(args.threads), "--device", args.device]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True)
    return json.loads(proc.stdout)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=32_000)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--top-k", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=30, help="calls timed per vocabulary figure (x20 for C = 10)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--memory-of", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_of:
        case, what = args.memory_of.split(":", 1)
        print(json.dumps(_memory(case, what, args)))
        return 0

    torch.set_num_threads(args.threads)
    rows = []
    for case in ("vocabulary", "classification"):
        repeat = args.repeat if case == "vocabulary" else 20 * args.repeat
        calls = _calls(case, args)
        timed = {what: _time(fn, repeat, args.device) for what, fn in calls.items()}
        matmul, matmul_p10 = timed["exit head matmul"]
        for what, (med, p10) in timed.items():
            rows.append({"case": case, "call": what, "ms": med * 1e3, "ms_p10": p10 * 1e3, "x_matmul": med / matmul,
                         "x_matmul_p10": p10 / matmul_p10, **_measure_memory(case, what, args)})
    report = {"n": args.n, "vocab": args.vocab, "classes": args.classes, "hidden": args.hidden, "top_k": args.top_k,
              "device": args.device, "torch": torch.__version__, "numpy": np.__version__,
              "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(), "load_average": os.getloadavg(),
              "repeat": args.repeat, "rows": rows}
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"batch {args.n}, hidden {args.hidden}, device {args.device}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), numpy {np.__version__}, {os.cpu_count()} cpus, load average "
          f"{os.getloadavg()[0]:.1f}; median (p10) of warm calls; memory: one call's peak in a fresh process")
    print(f"{'case':28} {'call':17} {'ms':>9} {'(p10)':>9} {'x matmul':>9} {'(p10)':>7} {'peak RSS +MB':>13} "
          f"{'tracemalloc MB':>15}")
    for r in rows:
        label = (f"vocabulary V={args.vocab} top{args.top_k}" if r["case"] == "vocabulary"
                 else f"classification C={args.classes}")
        traced = "" if r["tracemalloc_peak_mb"] is None else f"{r['tracemalloc_peak_mb']:.1f}"
        print(f"{label:28} {r['call']:17} {r['ms']:9.3f} {r['ms_p10']:9.3f} {r['x_matmul']:9.2f} "
              f"{r['x_matmul_p10']:7.2f} {r['rss_growth_mb']:13.1f} {traced:>15}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
