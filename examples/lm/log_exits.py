"""Token-level exit logs of the trained LM on held-out stdlib files (the token-level Parquet form of docs/formats.md).

Sequences: every held-out file (``data.split_files``) is cut into non-overlapping windows of
``WINDOW + 1`` = 65 tokens (stride 64, never across files; shorter files are skipped); ``--sequences``
of them are drawn without replacement with ``numpy.random.default_rng(seed)`` and numbered
0..N-1 in (file, offset) order. Each window is one teacher-forced sequence: at position p the
model sees the window's tokens 0..p and ``label`` is token p + 1. Only positions
``--log-from`` (32) .. 63 are logged: the first 32 tokens act as the prompt, the logged 32 as
the continuation, as in generate.py (32-token prompts, 32 new tokens); this also halves the
rows per sequence, so more sequences (groups) fit in the ~5 MB the repository ships.

Per exit j: ``exit_<j>_values`` = the top-k logits rounded DOWN to multiples of 2^-10 and
stored as float32 (the low mantissa bits are zero, so zstd packs them to ~2 bytes; rounding
DOWN keeps sum(exp(values - lse)) <= 1, the tail mass is never negative; a probability moves
by at most 0.1 % of itself -- float16 rounding would move it by up to 0.8 % at logits of 8-16,
measured up to 7e-3 on max_prob), ``exit_<j>_indices`` (int32), ``exit_<j>_lse`` (float32
logsumexp of the full vocabulary, exact). Segment ``file_kind`` (module / package / codec, see data.py). Written
with pyarrow directly, zstd level 19, byte-stream-split floats; a fixed seed, so a re-run
writes the same rows and values.

Card costs (cumulative multiply-accumulates per token, ``model.block_macs`` /
``model.head_macs``): exit j = (j + 1) x (one block at the logs' mean attended context 32.5
+ one exit head), i.e. every exit head on the way is evaluated, as the early-exit decoder does.

    .venv/bin/python examples/lm/log_exits.py      # writes examples/data/lm/tokens.parquet, card.json, metadata.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAYON_NUM_THREADS", "2")

import data
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from model import ExitLM, block_macs, greedy_generate, head_macs, load_model
from tokenizers import Tokenizer

REPO = Path(__file__).resolve().parents[2]
DATA_DIR = REPO / "examples" / "data" / "lm"
WINDOW = 64
MODEL_NAME = "pystd-lm"


def heldout_windows(tok: Tokenizer) -> tuple[np.ndarray, list[str], list[tuple[str, int]]]:
    """All (WINDOW + 1)-token windows of the held-out files: tokens (n, 65) int64, their
    file_kind, their (file, offset)."""
    _, files = data.split_files()
    rows, kinds, where = [], [], []
    for f, ids in zip(files, data.encode_files(tok, files), strict=True):
        for s in range(0, len(ids) - WINDOW, WINDOW):
            rows.append(ids[s:s + WINDOW + 1])
            kinds.append(data.file_kind(f))
            where.append((f, s))
    return np.stack(rows).astype(np.int64), kinds, where


def select(n_windows: int, n: int, seed: int) -> np.ndarray:
    """Indices (sorted) of the n windows drawn without replacement."""
    if n > n_windows:
        raise ValueError(f"asked for {n} sequences, the held-out files have {n_windows} windows")
    return np.sort(np.random.default_rng(seed).choice(n_windows, size=n, replace=False))


GRID_BITS = 10


def floor_grid(v: np.ndarray, bits: int = GRID_BITS) -> np.ndarray:
    """Round float32 values DOWN to multiples of 2^-bits (exact in float32 for |v| < 2^(24-bits))."""
    scale = float(2 ** bits)
    return (np.floor(v.astype(np.float64) * scale) / scale).astype(np.float32)


@torch.no_grad()
def exit_logits(model: ExitLM, x: torch.Tensor) -> list[torch.Tensor]:
    """Dense logits of every exit for windows x (B, T): L tensors (B, T, V)."""
    return [model.head(i, h) for i, h in enumerate(model.hidden_states(x))]


def run(model: ExitLM, tokens: np.ndarray, top_k: int, batch: int = 32) -> dict[str, np.ndarray]:
    """Top-k (exact float32), lse and per-exit statistics (argmax, label logit) over the windows."""
    n, n_layer = len(tokens), model.n_layer
    out = {"values": np.zeros((n, WINDOW, n_layer, top_k), np.float32),
           "indices": np.zeros((n, WINDOW, n_layer, top_k), np.int32),
           "lse": np.zeros((n, WINDOW, n_layer), np.float32),
           "label_logit": np.zeros((n, WINDOW, n_layer), np.float32)}
    for i in range(0, n, batch):
        x = torch.from_numpy(tokens[i:i + batch, :-1])
        y = torch.from_numpy(tokens[i:i + batch, 1:])
        for j, z in enumerate(exit_logits(model, x)):
            v, idx = z.topk(top_k, dim=-1)
            out["values"][i:i + batch, :, j] = v.numpy()
            out["indices"][i:i + batch, :, j] = idx.numpy().astype(np.int32)
            out["lse"][i:i + batch, :, j] = torch.logsumexp(z, dim=-1).numpy()
            out["label_logit"][i:i + batch, :, j] = z.gather(-1, y[..., None])[..., 0].numpy()
    return out


def check(values: np.ndarray, indices: np.ndarray, lse: np.ndarray, vocab: int) -> None:
    """The spec's row checks (values non-increasing, ids distinct and in range, lse >= top,
    top-k mass <= 1 + 1e-3) on (n, K, k) arrays; raises on the first failure."""
    if not np.isfinite(values).all() or not np.isfinite(lse).all():
        raise ValueError("non-finite values or lse")
    if (np.diff(values, axis=-1) > 0).any():
        raise ValueError("values not sorted descending")
    srt = np.sort(indices, axis=-1)
    if (srt[..., 1:] == srt[..., :-1]).any() or indices.min() < 0 or indices.max() >= vocab:
        raise ValueError("duplicate or out-of-range ids")
    if (lse < values[..., 0]).any():
        raise ValueError("lse below the top value")
    mass = np.exp(values.astype(np.float64) - lse[..., None]).sum(-1)
    if (mass > 1 + 1e-3).any():
        raise ValueError(f"top-k mass above 1: {mass.max()}")


def table(seq_ids: np.ndarray, kinds: list[str], labels: np.ndarray, positions: np.ndarray, values: np.ndarray,
          indices: np.ndarray, lse: np.ndarray) -> pa.Table:
    """The Token Parquet table: one row per (sequence, position); arrays are (n, t, ...)."""
    n, t, n_layer, k = values.shape
    rows = n * t
    cols: dict[str, pa.Array] = {
        "sequence_id": pa.array(np.repeat(seq_ids, t).astype(np.int64)),
        "position": pa.array(np.tile(positions.astype(np.int64), n)),
        "label": pa.array(labels.reshape(-1).astype(np.int64)),
        "file_kind": pa.array(np.repeat(np.asarray(kinds, dtype=object), t), type=pa.string()),
    }
    offsets = pa.array(np.arange(0, rows * k + 1, k, dtype=np.int32))
    for j in range(n_layer):
        cols[f"exit_{j}_values"] = pa.ListArray.from_arrays(offsets, pa.array(values[:, :, j].reshape(-1)))
        cols[f"exit_{j}_indices"] = pa.ListArray.from_arrays(offsets, pa.array(indices[:, :, j].reshape(-1)))
        cols[f"exit_{j}_lse"] = pa.array(lse[:, :, j].reshape(-1))
    return pa.table(cols)


def write_parquet(tab: pa.Table, path: Path) -> None:
    """zstd 19, byte-stream-split for the float columns, no dictionaries for the numeric ones."""
    floats = [c for c in tab.column_names if c.endswith(("_values", "_lse"))]
    tmp = path.with_suffix(".tmp")
    pq.write_table(tab, tmp, compression="zstd", compression_level=19,
                   use_dictionary=["file_kind"], use_byte_stream_split=floats, write_statistics=False)
    tmp.replace(path)


def card(model: ExitLM, top_k: int) -> dict[str, Any]:
    """card.json (a token-level model card): exits with cumulative MAC costs, vocab_size, group/position columns."""
    cfg = model.cfg
    per_exit = block_macs(cfg, (WINDOW + 1) / 2) + head_macs(cfg)
    return {
        "model": MODEL_NAME, "version": "1",
        "description": (f"6-layer decoder-only LM (d_model {cfg.d_model}) on Python stdlib source, an exit after every "
                        f"layer; top-{top_k} token logs of held-out files (examples/lm). Costs: multiply-accumulates "
                        "per token, cumulative, one block + one exit head per exit"),
        "exits": [{"name": f"layer{j + 1}", "cost": round((j + 1) * per_exit)} for j in range(cfg.n_layer)],
        "vocab_size": cfg.vocab_size, "group_column": "sequence_id", "position_column": "position",
        "label_column": "label", "segment_columns": ["file_kind"],
    }


def stats(res: dict[str, np.ndarray], y: np.ndarray, kinds: list[str]) -> dict[str, Any]:
    """Held-out loss, accuracy and disagreement with the last exit, per exit (and per file_kind),
    over the logged positions (res arrays (n, t, L, ...), labels y (n, t))."""
    pred = res["indices"][..., 0]  # (n, t, L)
    last = pred[..., -1:]
    kind = np.repeat(np.asarray(kinds)[:, None], y.shape[1], axis=1)
    out: dict[str, Any] = {
        "loss": (res["lse"] - res["label_logit"]).mean(axis=(0, 1)).round(4).tolist(),
        "accuracy": (pred == y[..., None]).mean(axis=(0, 1)).round(4).tolist(),
        "disagreement_with_last": (pred != last).mean(axis=(0, 1)).round(4).tolist(),
        "sequence_disagreement_with_last": (pred != last).any(axis=1).mean(axis=0).round(4).tolist(),
        "by_file_kind": {},
    }
    for k in data.FILE_KINDS:
        m = kind == k
        if m.any():
            out["by_file_kind"][k] = {
                "tokens": int(m.sum()),
                "accuracy": (pred[m] == y[m][:, None]).mean(axis=0).round(4).tolist(),
                "disagreement_with_last": (pred[m] != last[m]).mean(axis=0).round(4).tolist(),
            }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", type=Path, default=DATA_DIR, help="model.pt and tokenizer.json; output here")
    ap.add_argument("--sequences", type=int, default=900)
    ap.add_argument("--log-from", type=int, default=32, help="first logged position (0..63)")
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--seed", type=int, default=2013)
    ap.add_argument("--traffic", choices=("generated", "text"), default="generated",
                    help="log the model's own greedy continuation of each prompt (what a served decoder sees) or "
                         "the held-out text itself (teacher forcing)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    t0 = time.time()
    model = load_model(str(args.data_dir / "model.pt"))
    tok = Tokenizer.from_file(str(args.data_dir / "tokenizer.json"))
    windows, kinds, where = heldout_windows(tok)
    sel = select(len(windows), args.sequences, args.seed)
    tokens, kinds = windows[sel], [kinds[i] for i in sel]
    fed = tokens
    if args.traffic == "generated":  # the full model's greedy continuation of the first log_from + 1 tokens
        prompts = torch.from_numpy(tokens[:, :args.log_from + 1])
        with torch.no_grad():
            gen = torch.cat([greedy_generate(model, prompts[i:i + 64], WINDOW - args.log_from)
                             for i in range(0, len(prompts), 64)])
        fed = np.concatenate([tokens[:, :args.log_from + 1], gen.numpy()], axis=1)
    res = {key: a[:, args.log_from:] for key, a in run(model, fed, args.top_k).items()}
    labels = tokens[:, 1 + args.log_from:]
    positions = np.arange(args.log_from, WINDOW)
    values = floor_grid(res["values"])
    n, t, n_layer, k = values.shape
    check(values.reshape(n * t, n_layer, k), res["indices"].reshape(n * t, n_layer, k),
          res["lse"].reshape(n * t, n_layer), model.cfg.vocab_size)
    path = args.data_dir / "tokens.parquet"
    write_parquet(table(np.arange(n), kinds, labels, positions, values, res["indices"], res["lse"]), path)
    c = card(model, args.top_k)
    (args.data_dir / "card.json").write_text(json.dumps(c, indent=2) + "\n")
    meta = {
        "command": (f"examples/lm/log_exits.py --sequences {args.sequences} --top-k {args.top_k} "
                    f"--seed {args.seed} --log-from {args.log_from} --traffic {args.traffic}"),
        "traffic": args.traffic,
        "seed": args.seed, "log_from": args.log_from,
        "values_grid": f"2^-{GRID_BITS}, rounded down", "rows": n * t, "sequences": n, "window": WINDOW,
        "top_k": k, "heldout_windows": len(windows),
        "file_kind_sequences": {kk: kinds.count(kk) for kk in data.FILE_KINDS},
        "windows": [f"{where[i][0]}@{where[i][1]}" for i in sel],
        "tokens_parquet_bytes": path.stat().st_size,
        "tokens_parquet_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "model_sha256": hashlib.sha256((args.data_dir / "model.pt").read_bytes()).hexdigest(),
        "seconds": round(time.time() - t0, 1),
        **stats(res, labels, kinds),
    }
    (args.data_dir / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps({kk: v for kk, v in meta.items() if kk not in ("windows", "by_file_kind")}, indent=1))


if __name__ == "__main__":
    main()
