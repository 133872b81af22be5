"""Baseline early-exit generation runs of the trained LM (no exitwise policy yet).

200 prompts of 32 tokens (the first 32 tokens of held-out windows, drawn with ``--seed``), 32
new tokens each, greedy, batched. Runs:

- ``decide`` always False: must reproduce ``greedy_generate`` (full depth) token for token;
  also compared with the cache-free reference (full forward over the whole prefix each step),
  which can differ in the last float32 bits;
- ``decide`` = max softmax probability of the exit >= threshold, the same threshold at every
  layer, for a few thresholds.

Reported per run: compute fraction (mean over tokens of blocks run until the exit / 6), the MAC
fraction (blocks + exit heads on the way, over 6 blocks + 6 heads), the MACs per token over a
plain decoder's (6 blocks + ONE head: at V = 4096, d = 128 a head costs 2.6 blocks, so asking
every exit is dear), backfill blocks per token,
the share of the 200 continuations identical to full-depth greedy, the mean length of the
identical prefix, and the per-step disagreement: the emitted token vs the last exit's argmax for
the SAME prefix (available because the backfill computes the last layer anyway) -- the quantity
the token logs' ``disagreement`` risk measures.

    .venv/bin/python examples/lm/generate.py        # prints a markdown table, writes examples/data/lm/generation.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAYON_NUM_THREADS", "2")

import log_exits
import torch
from model import (
    ExitLM,
    block_macs,
    generate_early_exit,
    greedy_generate,
    greedy_generate_nocache,
    head_macs,
    load_model,
)
from tokenizers import Tokenizer

THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
PROMPT, NEW = 32, 32


def max_prob_rule(threshold: float) -> Any:
    """decide(l, logits): exit where the exit's max softmax probability >= threshold."""
    def decide(layer: int, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.double(), dim=-1).amax(dim=-1) >= threshold
    return decide


def summarize(model: ExitLM, out: torch.Tensor, ref: torch.Tensor, stats: Any, seconds: float) -> dict[str, Any]:
    """The numbers of one run (see the module docstring)."""
    cfg = model.cfg
    bm, hm = block_macs(cfg, PROMPT + NEW / 2), head_macs(cfg)
    same = (out == ref)
    prefix = torch.where(same.all(1), torch.full((len(out),), out.shape[1]), (~same).int().argmax(1))
    hist = torch.bincount(stats.exit_layer.flatten(), minlength=model.n_layer)
    row: dict[str, Any] = {
        "compute_fraction": round(stats.compute_fraction, 4),
        "mac_fraction": round(stats.mac_fraction(bm, hm), 4),
        # MACs per token over a plain decoder's (L blocks + the last head only)
        "macs_vs_plain": round(stats.mac_fraction(bm, hm) * model.n_layer * (bm + hm) / (model.n_layer * bm + hm), 3),
        "backfill_blocks_per_token": round(float(stats.backfill_blocks.double().mean()), 3),
        "identical_sequences": round(float(same.all(1).double().mean()), 4),
        "mean_identical_prefix": round(float(prefix.double().mean()), 2),
        "exit_histogram": (hist.double() / hist.sum()).round(decimals=4).tolist(),
        "seconds": round(seconds, 2),
    }
    if stats.final_token is not None:
        row["step_disagreement"] = round(float((out != stats.final_token).double().mean()), 4)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", type=Path, default=log_exits.DATA_DIR)
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(2)
    model = load_model(str(args.data_dir / "model.pt"))
    tok = Tokenizer.from_file(str(args.data_dir / "tokenizer.json"))
    windows, _, _ = log_exits.heldout_windows(tok)
    prompts = torch.from_numpy(windows[log_exits.select(len(windows), args.prompts, args.seed), :PROMPT])
    t = time.time()
    ref = greedy_generate(model, prompts, NEW)
    t_ref = time.time() - t
    nocache = greedy_generate_nocache(model, prompts, NEW)
    t = time.time()
    never, st = generate_early_exit(model, prompts, NEW, lambda layer, z: torch.zeros(len(z), dtype=torch.bool))
    res: dict[str, Any] = {
        "prompts": args.prompts, "prompt_tokens": PROMPT, "new_tokens": NEW, "seed": args.seed,
        "greedy_seconds": round(t_ref, 2),
        "never_equals_greedy": bool(torch.equal(never, ref)),
        "greedy_vs_nocache_identical_sequences": round(float((ref == nocache).all(1).double().mean()), 4),
        "runs": {"never": summarize(model, never, ref, st, time.time() - t)},
    }
    for thr in THRESHOLDS:
        t = time.time()
        out, st = generate_early_exit(model, prompts, NEW, max_prob_rule(thr), track_final=True)
        res["runs"][f"max_prob>={thr}"] = summarize(model, out, ref, st, time.time() - t)
    (args.data_dir / "generation.json").write_text(json.dumps(res, indent=1) + "\n")
    print(f"never-exit == full-depth greedy: {res['never_equals_greedy']}; cached greedy == cache-free greedy on "
          f"{res['greedy_vs_nocache_identical_sequences']:.1%} of the {args.prompts} continuations\n")
    print("| decide | compute fraction | MAC fraction | MACs vs plain decoder | backfill blocks/token "
          "| step disagreement | identical continuations | mean identical prefix | exit histogram (layer 1..6) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in res["runs"].items():
        hist = " ".join(f"{h:.2f}" for h in r["exit_histogram"])
        print(f"| {name} | {r['compute_fraction']:.3f} | {r['mac_fraction']:.3f} | {r['macs_vs_plain']:.2f} "
              f"| {r['backfill_blocks_per_token']:.2f} | {r.get('step_disagreement', 0.0):.3f} "
              f"| {r['identical_sequences']:.1%} "
              f"| {r['mean_identical_prefix']:.1f} / {NEW} | {hist} |")


if __name__ == "__main__":
    main()
