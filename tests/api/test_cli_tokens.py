"""A 150k-vocabulary language model end to end through the CLI: calibrate, solve, evaluate, create,
approve (re-verified from the token logs), activate, serve to ``PolicyClient``, MLflow, report.

The logs are synthetic token logs (``exitwise.calibration.synthetic_tokens``) of a model with
V = 151,936 tokens (the size of a Qwen vocabulary), 4 exits and the top-16 of each.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest

from exitwise.calibration.logfiles.cards import write_card
from exitwise.calibration.logfiles.writers import write_logs
from exitwise.calibration.rule import CompiledPolicy, decide, route
from exitwise.calibration.synthetic_tokens import synthetic_token_logs
from exitwise.policies.mlflow.config import mlflow_config, model_uri
from exitwise.policies.runtime import PolicyClient

VOCAB = 151_936
MODEL = "synthetic-lm"


@pytest.fixture
def token_files(tmp_path: Path) -> tuple[Path, Path]:
    logs = synthetic_token_logs(700, 16, n_exits=4, vocab_size=VOCAB, top_k=16, seed=5, segments=())
    path = write_logs(logs, tmp_path / "evidence" / "tokens.parquet")
    card = write_card(logs.card, tmp_path / "evidence" / "card.json")
    return Path(path), Path(card)


def _dense(doc: dict[str, Any], n: int, seed: int) -> np.ndarray:
    """(n, K, V) logits with a clear, frequent answer for most rows."""
    rng = np.random.default_rng(seed)
    k = len(doc["exits"])
    logits = rng.normal(size=(n, k, VOCAB)).astype(np.float32)
    answer = rng.integers(0, 50, n)
    boost = rng.uniform(3.0, 25.0, size=(n, 1)) * np.linspace(0.5, 1.0, k)[None, :]
    logits[np.arange(n)[:, None], np.arange(k)[None, :], answer[:, None]] += boost.astype(np.float32)
    return logits


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_a_150k_vocabulary_policy_end_to_end(cli: Any, store_env: str, token_files: tuple[Path, Path],
                                             tmp_path: Path, spawn_server: Any,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    logs, card = token_files
    r = cli("calibrate", logs, "--card", card, "--out", tmp_path / "cal", "--json")
    assert r.code == 0, r.err
    cal = r.json()
    assert cal["target"] in ("final", "labels") and len(cal["exits"]) == 4

    policy = tmp_path / "policy.json"
    r = cli("solve", logs, "--card", card, "--risk", "sequence_disagreement", "--eps", "0.1", "--out", policy,
            "--no-baselines", "--json")
    assert r.code == 0, r.err
    assert r.json()["certified"]
    raw = policy.read_bytes()
    assert len(raw) < 64 * 1024
    doc = json.loads(raw)
    assert doc["vocabulary"]["size"] == VOCAB and len(doc["classes"]) == 4
    assert doc["guarantee"]["unit"] == "group" and doc["guarantee"]["risk"] == "sequence_disagreement"

    r = cli("evaluate", policy, logs, "--card", card, "--json")
    assert r.code == 0, r.err
    groups = r.json()["groups"]
    assert groups["n"] == 700 and 0.0 <= groups["sequence_disagreement"] <= 1.0

    admin = cli("principal", "add", "admin", "--role", "admin", "--quiet").out.strip()
    tok = {name: cli("principal", "add", name, "--role", role, "--token", admin, "--json").json()["token"]
           for name, role in (("alice", "author"), ("bob", "approver"), ("rita", "reader"))}
    assert cli("policy", "create", policy, "--token", tok["alice"]).code == 0
    monkeypatch.setenv("EXITWISE_EVIDENCE_ROOTS", str(tmp_path / "evidence"))
    r = cli("policy", "approve", MODEL, "1", "--reason", "token logs reviewed", "--token", tok["bob"], "--json")
    assert r.code == 0, r.err
    assert r.json()["certificate"]["status"] == "reverified", r.out
    assert "490 certify groups" in r.json()["certificate"]["detail"]
    r = cli("policy", "activate", MODEL, "1", "--env", "production", "--reason", "go", "--token", tok["bob"])
    assert r.code == 0, r.err

    report = tmp_path / "report.html"
    r = cli("report", MODEL, "1", "--format", "html", "--out", report)
    assert r.code == 0, r.err
    html = report.read_text(encoding="utf-8")
    assert len(html) < 300 * 1024 and "top50%" in html and html.count("<tr") < 200

    server = spawn_server(store_env, Path(str(tmp_path / "exitwise-data")))
    client = PolicyClient(server.base_url, MODEL, "production", tok["rita"], cache_dir=False, timeout=10,
                          n_exits=4, n_classes=VOCAB, shadow_upload=False)
    dense = _dense(doc, 24, seed=1)
    try:
        assert client.refresh().outcome == "updated", client.status()
        reference = CompiledPolicy.from_document(doc)
        masks = [client.policy.decide(k, dense[:, k, :]) for k in range(4)]
        for k, mask in enumerate(masks):
            np.testing.assert_array_equal(mask, decide(reference, k, dense[:, k, :]))
        assert masks[-1].all()
    finally:
        client.close()

    monkeypatch.chdir(tmp_path)
    r = cli("mlflow", "sync")
    assert r.code == 0, r.err
    config = mlflow_config(tmp_path / "exitwise-data")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", config.tracking_uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", config.registry_uri)
    model = mlflow.pyfunc.load_model(model_uri(MODEL, "production"))
    out = model.predict(pd.DataFrame({f"exit_{k}": list(dense[:3, k, :]) for k in range(4)}))
    expected = route(reference, dense[:3])
    np.testing.assert_array_equal(out["exit"].to_numpy(), expected.exit)
    np.testing.assert_array_equal(out["answer"].to_numpy(), expected.answer)
