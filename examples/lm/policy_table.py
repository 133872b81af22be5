"""calibrate -> solve -> evaluate on the LM's token logs, then early-exit generation through PolicyClient.

    .venv/bin/python examples/lm/policy_table.py      # ~2 min; needs model.pt (examples/lm/train.py)

1. The shipped logs (``examples/data/lm/tokens.parquet``: the full model's greedy continuations
   of 900 held-out prompts, 32 logged tokens each) are cut by sequence, seeded, into a
   calibration half and a held-out half.
2. ``exitwise calibrate`` fits per-exit temperatures on the top-k; ``exitwise solve`` certifies a
   policy for each risk (``disagreement``: the mean per-sequence token disagreement;
   ``sequence_disagreement``: the share of sequences with any disagreeing token) and
   eps in {1 %, 2 %, 5 %}, delta = 5 %; ``exitwise evaluate`` measures each on the held-out half.
3. The six policies are stored, approved and activated (one environment each) in a throw-away
   embedded store, served by ``exitwise serve`` on 127.0.0.1, and fetched by ``PolicyClient``;
   ``model.generate_early_exit`` decodes 32 tokens greedily for held-out prompts no log row came
   from, with ``client.policy.decide`` on the exit heads' torch tensors and KV backfill, and the
   output is compared with full-depth greedy decoding.

Prints a markdown table; writes ``examples/data/lm/policy_table.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from log_exits import WINDOW, heldout_windows, select
from model import generate_early_exit, greedy_generate, load_model
from tokenizers import Tokenizer

from exitwise.calibration.groups import GroupIndex, split_groups
from exitwise.calibration.logfiles.cards import load_card
from exitwise.calibration.logfiles.readers import load_logs
from exitwise.calibration.logfiles.writers import write_logs
from exitwise.policies.runtime import PolicyClient

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "examples" / "data" / "lm"
EXITWISE = Path(sys.executable).parent / "exitwise"
RISKS = ("disagreement", "sequence_disagreement")
EPS = (0.01, 0.02, 0.05)
MODEL = "pystd-lm"


def cli(env: dict[str, str], *args: Any) -> str:
    """One ``exitwise`` command; its stdout (raises with stderr on failure)."""
    proc = subprocess.run([str(EXITWISE), *map(str, args)], env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"exitwise {' '.join(map(str, args))}: {proc.stderr.strip()}")
    return proc.stdout


def split(tmp: Path, seed: int) -> tuple[Path, Path, Path]:
    """Calibration and held-out halves of the shipped logs, cut between sequences."""
    card_path = DATA / "card.json"
    logs = load_logs(DATA / "tokens.parquet", load_card(card_path))
    groups = GroupIndex.from_values(logs.groups)
    cal_rows, held_rows = split_groups(groups, groups.n_groups // 2, seed)
    cal, held = tmp / "calibration.parquet", tmp / "held_out.parquet"
    write_logs(logs.take(cal_rows), cal)
    write_logs(logs.take(held_rows), held)
    return cal, held, card_path


def serve(env: dict[str, str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(EXITWISE), "serve", "--host", "127.0.0.1", "--port", str(port)], env=env,
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.terminate()
    raise RuntimeError(f"exitwise serve did not start: {log.read_text()[-2000:]}")


def prompts(n: int, seed: int, log_seed: int, logged: int) -> torch.Tensor:
    """Prompts (n, 33) from held-out windows no log row came from."""
    tok = Tokenizer.from_file(str(DATA / "tokenizer.json"))
    windows, _, _ = heldout_windows(tok)
    used = set(select(len(windows), logged, log_seed).tolist())
    free = np.array([i for i in range(len(windows)) if i not in used])
    pick = np.sort(np.random.default_rng(seed).choice(free, size=min(n, free.size), replace=False))
    return torch.from_numpy(windows[pick, :WINDOW // 2 + 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompts", type=int, default=300)
    args = ap.parse_args()
    torch.set_num_threads(2)
    meta = json.loads((DATA / "metadata.json").read_text())
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        env = {**os.environ, "EXITWISE_DATA_DIR": str(tmp / "store"), "MLFLOW_DISABLE_TELEMETRY": "true",
               "EXITWISE_MLFLOW_SYNC": "off", "EXITWISE_EVIDENCE_ROOTS": str(tmp)}
        env.pop("EXITWISE_DATABASE_URL", None)
        cal, held, card = split(tmp, args.seed)
        calib = json.loads(cli(env, "calibrate", cal, "--card", card, "--out", tmp / "cal", "--json"))
        rows: list[dict[str, Any]] = []
        for risk in RISKS:
            for eps in EPS:
                out = tmp / f"{risk}-{eps}.json"
                solved = json.loads(cli(env, "solve", cal, "--card", card, "--risk", risk, "--eps", eps,
                                        "--no-baselines", "--out", out, "--seed", args.seed, "--json"))
                ev = json.loads(cli(env, "evaluate", out, held, "--card", card, "--json"))
                rows.append({"risk": risk, "eps": eps, "policy": out, "certified": solved["certified"],
                             "upper_bound": solved["upper_bound"], "compute_fraction": ev["compute_fraction"],
                             "token_disagreement": ev["disagreement"],
                             "mean_sequence_disagreement": ev["groups"]["mean_disagreement"],
                             "sequence_disagreement": ev["groups"]["sequence_disagreement"]})
        admin = cli(env, "principal", "add", "admin", "--role", "admin", "--quiet").strip()
        tok = {name: json.loads(cli(env, "principal", "add", name, "--role", role, "--token", admin,
                                    "--json"))["token"]
               for name, role in (("author", "author"), ("approver", "approver"), ("runtime", "reader"))}
        for n, row in enumerate(rows, start=1):
            cli(env, "policy", "create", row["policy"], "--token", tok["author"])
            cli(env, "policy", "approve", MODEL, n, "--reason", "example", "--token", tok["approver"],
                "--accept-weaker", "one environment per budget in this example")
            row["env"] = f"{'seq' if row['risk'] != 'disagreement' else 'tok'}-{round(row['eps'] * 100)}"
            cli(env, "policy", "activate", MODEL, n, "--env", row["env"], "--reason", "example",
                "--token", tok["approver"])
        server, base = serve(env, tmp / "serve.log")
        try:
            model = load_model(str(DATA / "model.pt"))
            p = prompts(args.prompts, args.seed, meta["seed"], meta["sequences"])
            n_new = WINDOW // 2
            with torch.no_grad():
                full = greedy_generate(model, p, n_new)
            for row in rows:
                with PolicyClient(base, MODEL, row["env"], tok["runtime"], cache_dir=False, n_exits=model.n_layer,
                                  n_classes=model.cfg.vocab_size, shadow_upload=False) as client:
                    if client.refresh().outcome != "updated":
                        raise RuntimeError(f"{row['env']}: {client.status()}")
                    with torch.no_grad():
                        out, stats = generate_early_exit(model, p, n_new, lambda k, z: client.policy.decide(k, z))
                row["generation_compute_fraction"] = float(stats.compute_fraction)
                row["identical_texts"] = float((out == full).all(dim=1).float().mean())
                row["generated_token_disagreement"] = float((out != full).float().mean())
        finally:
            server.terminate()
            server.wait(timeout=10)
    for row in rows:
        row["policy"] = row["policy"].name
    (DATA / "policy_table.json").write_text(json.dumps({"calibration": calib, "rows": rows}, indent=1) + "\n")
    print("| risk | eps | certified (bound) | compute fraction, held-out logs | token disagreement | "
          "sequence disagreement | generation: compute fraction | generation: identical texts |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        bound = "—" if r["upper_bound"] is None else f"{r['upper_bound']:.4f}"
        print(f"| `{r['risk']}` | {r['eps']:.0%} | {'yes' if r['certified'] else 'no'} ({bound}) | "
              f"{r['compute_fraction']:.3f} | {r['token_disagreement']:.4f} | {r['sequence_disagreement']:.3f} | "
              f"{r['generation_compute_fraction']:.3f} | {r['identical_texts']:.1%} |")


if __name__ == "__main__":
    main()
