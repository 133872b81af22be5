"""How wrong is the top-k "tail model" at temperature T != 1? A markdown table per exit.

The tail model of exitwise.calibration.topk: the V - k tokens outside the top-k share the known tail mass
m = 1 - sum_i exp(v_i - lse) equally, each with logit u = log(m) + lse - log(V - k); at
temperature T, LSE_T = logaddexp(logsumexp(v / T), log(V - k) + u / T) and
max_prob(T) = exp(v_1 / T - LSE_T) (``tail_max_prob``, the spec's formula; m is clipped at 0).
Exact: softmax(z / T).max() of the dense logits z, recomputed with the model on the same
held-out windows the shipped ``tokens.parquet`` logs (rows matched by sequence and position,
labels checked). Per T: the error with the SHIPPED top-k values (rounded down to multiples of
2^-10) and, in parentheses, with the exact float32 top-k (the tail model alone). T = 1 is a
control: there the tail model is exact and only the rounding remains. A second table gives the
share of tokens where the tail model is ABOVE the exact value: spreading the tail uniformly
minimises sum(exp(u_i / T)) for T < 1 (convexity), so there it over-states max_prob, and
maximises it for T > 1 (it under-states max_prob).

    .venv/bin/python examples/lm/tail_error.py     # reads examples/data/lm/{tokens.parquet,metadata.json,model.pt}
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "2")

import log_exits
import numpy as np
import pyarrow.parquet as pq
import torch
from model import load_model
from tokenizers import Tokenizer

TEMPERATURES = (0.5, 0.8, 1.0, 1.25, 2.0)


def packed_tail_max_prob(values: np.ndarray, lse: np.ndarray, temperature: float) -> np.ndarray:
    """max_prob at temperature T with the tail mass packed at the k-th logit v_k (each tail
    logit is <= v_k, so m e^lse / e^v_k tokens at v_k; fractional count): the opposite extreme
    of the uniform tail. Not the spec's formula: the two bracket the exact value for every T."""
    v = values.astype(np.float64)
    z = lse.astype(np.float64)
    m = np.maximum(1.0 - np.exp(v - z[:, None]).sum(axis=1), 0.0)
    with np.errstate(divide="ignore"):
        tail = np.log(m) + z + v[:, -1] * (1.0 / temperature - 1.0)
        lse_t = np.logaddexp(_logsumexp(v / temperature, axis=1), tail)
    return np.exp(v[:, 0] / temperature - lse_t)


def _logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
    mx = a.max(axis=axis, keepdims=True)
    return (mx + np.log(np.exp(a - mx).sum(axis=axis, keepdims=True))).squeeze(axis)


def tail_max_prob(values: np.ndarray, lse: np.ndarray, vocab_size: int, temperature: float) -> np.ndarray:
    """max_prob at temperature T from top-k values (n, k) and the full log-sum-exp (n,) under
    the equal-tail model of exitwise.calibration.topk (float64)."""
    v = values.astype(np.float64)
    z = lse.astype(np.float64)
    n_tail = vocab_size - v.shape[1]
    m = np.maximum(1.0 - np.exp(v - z[:, None]).sum(axis=1), 0.0)
    with np.errstate(divide="ignore"):
        u = np.log(m) + z - np.log(n_tail)
        lse_t = np.logaddexp(_logsumexp(v / temperature, axis=1), np.log(n_tail) + u / temperature)
    return np.exp(v[:, 0] / temperature - lse_t)


@torch.no_grad()
def dense_max_prob(model: torch.nn.Module, tokens: np.ndarray, log_from: int,
                   temps: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Exact max_prob(T) of every exit, (len(temps), n, t, L), and the exact float32 top-k values
    (n, t, L, k_max=64) for the logged positions."""
    n, n_layer = len(tokens), model.n_layer
    t = log_exits.WINDOW - log_from
    out = np.zeros((len(temps), n, t, n_layer))
    top = np.zeros((n, t, n_layer, 64), np.float32)
    for i in range(0, n, 32):
        x = torch.from_numpy(tokens[i:i + 32, :-1])
        for j, z in enumerate(log_exits.exit_logits(model, x)):
            z = z[:, log_from:].double()
            for ti, temp in enumerate(temps):
                out[ti, i:i + 32, :, j] = torch.softmax(z / temp, dim=-1).amax(dim=-1).numpy()
            top[i:i + 32, :, j] = z.float().topk(64, dim=-1).values.numpy()
    return out, top


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", type=Path, default=log_exits.DATA_DIR)
    args = ap.parse_args()
    torch.set_num_threads(2)
    meta = json.loads((args.data_dir / "metadata.json").read_text())
    card = json.loads((args.data_dir / "card.json").read_text())
    vocab, n_exits = card["vocab_size"], len(card["exits"])
    model = load_model(str(args.data_dir / "model.pt"))
    tok = Tokenizer.from_file(str(args.data_dir / "tokenizer.json"))
    windows, _, _ = log_exits.heldout_windows(tok)
    tokens = windows[log_exits.select(len(windows), meta["sequences"], meta["seed"])]
    log_from = meta["log_from"]
    tab = pq.read_table(args.data_dir / "tokens.parquet")
    n, t = len(tokens), log_exits.WINDOW - log_from
    if not np.array_equal(tab["label"].to_numpy().reshape(n, t), tokens[:, 1 + log_from:]):
        raise SystemExit("tokens.parquet does not match the windows of metadata.json: re-run log_exits.py")
    exact, top = dense_max_prob(model, tokens, log_from, TEMPERATURES)
    k = meta["top_k"]
    print(f"max_prob(T): |tail model - exact dense|, {n * t} held-out tokens, V = {vocab}, top-{k}; "
          "shipped values (2^-10 grid, rounded down), in parentheses the exact float32 top-k\n")
    head = " | ".join(f"T={tt}: max / mean" for tt in TEMPERATURES)
    print(f"| exit | {head} |")
    print("|---|" + "---|" * len(TEMPERATURES))
    summary: dict[str, list[list[float]]] = {}
    above: list[list[float]] = []
    bracket: list[list[tuple[float, float]]] = []
    for j in range(n_exits):
        values = np.stack(tab[f"exit_{j}_values"].to_numpy(zero_copy_only=False)).astype(np.float32)
        lse = tab[f"exit_{j}_lse"].to_numpy()
        cells = []
        above.append([])
        bracket.append([])
        for ti, temp in enumerate(TEMPERATURES):
            ref = exact[ti, :, :, j].reshape(-1)
            err = np.abs(tail_max_prob(values, lse, vocab, temp) - ref)
            exact_top = top[:, :, j, :k].reshape(-1, k)
            uni, packed = tail_max_prob(exact_top, lse, vocab, temp), packed_tail_max_prob(exact_top, lse, temp)
            err_x = np.abs(uni - ref)
            above[-1].append(float((uni - ref > 1e-6).mean()))
            lo, hi = np.minimum(uni, packed), np.maximum(uni, packed)
            bracket[-1].append((float(((lo <= ref + 1e-5) & (ref <= hi + 1e-5)).mean()), float((hi - lo).mean())))
            cells.append(f"{err.max():.1e} / {err.mean():.1e} ({err_x.max():.1e} / {err_x.mean():.1e})")
            summary.setdefault(f"T={temp}", []).append([float(err.max()), float(err.mean())])
        print(f"| {card['exits'][j]['name']} | " + " | ".join(cells) + " |")
    print("\nshare of tokens where the tail model's max_prob (exact float32 top-k) is above the exact one by > 1e-6:\n")
    print("| exit | " + " | ".join(f"T={tt}" for tt in TEMPERATURES) + " |")
    print("|---|" + "---|" * len(TEMPERATURES))
    for j in range(n_exits):
        print(f"| {card['exits'][j]['name']} | " + " | ".join(f"{a:.1%}" for a in above[j]) + " |")
    print("\nthe uniform tail and the tail packed at v_k bracket the exact max_prob: share of tokens inside "
          "the bracket (exact float32 top-k, tolerance 1e-5) / mean bracket width:\n")
    print("| exit | " + " | ".join(f"T={tt}" for tt in TEMPERATURES) + " |")
    print("|---|" + "---|" * len(TEMPERATURES))
    for j in range(n_exits):
        print(f"| {card['exits'][j]['name']} | " + " | ".join(f"{a:.1%} / {w:.3f}" for a, w in bracket[j]) + " |")
    print()
    print("max abs error over all exits, top-k from the exact float32 logits, k = 8 / 16 / 32 / 64:")
    for ti, temp in enumerate(TEMPERATURES):
        errs = []
        for kk in (8, 16, 32, 64):
            e = max(float(np.abs(tail_max_prob(top[:, :, j, :kk].reshape(-1, kk), tab[f"exit_{j}_lse"].to_numpy(),
                                               vocab, temp) - exact[ti, :, :, j].reshape(-1)).max())
                    for j in range(n_exits))
            errs.append(f"{e:.1e}")
        print(f"- T={temp}: " + " / ".join(errs))
    summary["share_above"] = above
    summary["bracket_inside_width"] = bracket
    (args.data_dir / "tail_error.json").write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
