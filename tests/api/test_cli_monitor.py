"""``exitwise monitor`` on the bundled Fashion-MNIST policy (in-process CLI, SQLite and PostgreSQL)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from exitwise.calibration.logfiles.cards import load_card
from exitwise.calibration.logfiles.readers import load_logs
from exitwise.calibration.logfiles.writers import write_logs
from exitwise.calibration.pipeline import SolveSpec
from exitwise.policies.authoring import solve_policy

DATA = Path(__file__).resolve().parents[2] / "examples" / "data" / "fashion_mnist"
MODEL = "fashion-cnn"


@pytest.fixture(scope="module")
def fashion(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A policy certified on the clean calibration logs, and shadow files: clean (the held-out test logs),
    corrupted (the test images with noise and contrast loss: examples/fashion_mnist/corrupt.py), of another
    shape, not logs at all."""
    d = tmp_path_factory.mktemp("monitor-cli")
    card = load_card(DATA / "card.json")
    logs = load_logs(DATA / "calibration.parquet", card)
    doc = solve_policy(logs, SolveSpec(risk="disagreement", eps=0.02, delta=0.05), evidence={
        "logs": str(DATA / "calibration.parquet"), "card": str(DATA / "card.json")}).document
    (d / "policy.json").write_text(json.dumps(doc))
    test = load_logs(DATA / "test.parquet", card)
    narrow = dataclasses.replace(test.take(np.arange(50)), logits=test.logits[:50, :, :9].copy(),
                                 card=dataclasses.replace(card, classes=card.classes[:9]))
    write_logs(narrow, d / "narrow.parquet")
    (d / "notes.txt").write_text("not logs")
    return {"policy": d / "policy.json", "clean": DATA / "test.parquet", "corrupted": DATA / "corrupted.parquet",
            "narrow": d / "narrow.parquet", "notes": d / "notes.txt"}


@pytest.fixture
def store(cli: Any, store_env: str, committed_actors: Any, fashion: dict[str, Path]) -> dict[str, str]:
    tokens = committed_actors.tokens
    assert cli("policy", "create", fashion["policy"], "--token", tokens["alice"]).code == 0
    assert cli("policy", "approve", MODEL, "1", "-r", "reviewed", "--token", tokens["bob"]).code == 0
    assert cli("policy", "activate", MODEL, "1", "--env", "production", "-r", "go", "--token", tokens["bob"]).code == 0
    return tokens


def test_clean_traffic_stays_ok_and_corrupted_traffic_breaches(cli: Any, store: dict[str, str], fashion: Any,
                                                           tmp_path: Path) -> None:
    alice = store["alice"]
    assert cli("monitor", "status", MODEL, "--env", "production", "--json").json()["verdict"] == "unknown"
    r = cli("monitor", "ingest", fashion["clean"], "--model", MODEL, "--env", "production", "--batch-rows", "2500",
            "--token", alice, "--json", "--fail-on", "watch")
    assert r.code == 0, r.err
    assert [b["rows"] for b in r.json()["batches"]] == [2500] * 4 and r.json()["verdict"] == "ok"
    status = cli("monitor", "status", MODEL, "--env", "production", "--json").json()
    assert status["verdict"] == "ok" and status["rows"] == 10_000
    overall = status["assessment"]["segments"]["__all__"]
    assert overall["upper"] < 0.02 and overall["status"] == "safe"
    assert all(d["psi"] < 0.1 for d in status["assessment"]["drift"])

    r = cli("monitor", "ingest", fashion["corrupted"], "--model", MODEL, "--env", "production", "--token", alice,
            "--fail-on", "breach", "--batch-rows", "5000")
    assert r.code == 3 and "→ breach" in r.out and r.err.startswith("error: ") and "verdict breach" in r.err
    human = cli("monitor", "status", MODEL, "--env", "production")
    assert human.code == 0 and "breach" in human.out and "recommendation: recalibrate" in human.out
    assert cli("monitor", "status", MODEL, "--env", "production", "--fail-on", "watch").code == 3

    points = cli("monitor", "series", MODEL, "--env", "production", "--json").json()["points"]
    assert [p["n"] for p in points] == [2500, 5000, 7500, 10_000, 15_000, 20_000]
    assert points[-1]["lower"] > 0.02 >= points[-2]["lower"]

    r = cli("monitor", "export", MODEL, "--env", "production", "--out", tmp_path / "shadow.parquet", "--json")
    assert r.code == 0 and r.json()["rows"] == 10_000  # the corrupted rows reuse the request ids: kept once
    card = dataclasses.replace(load_card(DATA / "card.json"), segment_columns=())  # the policy has no segments
    exported, clean = load_logs(tmp_path / "shadow.parquet", card), load_logs(fashion["clean"], card)
    assert exported.n == 10_000 and np.array_equal(exported.logits, clean.logits)
    assert np.array_equal(exported.labels, clean.labels)
    log = cli("audit", "log", "--model", MODEL, "--json").json()["events"]
    # newest first: ok on clean traffic, watch (drift) after the first corrupted batch, then breach
    assert [e["details"]["to"] for e in log if e["action"] == "monitor.verdict"] == ["breach", "watch", "ok"]


def test_auto_kill_is_an_approvers_setting(cli: Any, store: dict[str, str], fashion: Any) -> None:
    args = ("monitor", "configure", MODEL, "--env", "production", "--auto-kill", "-r", "contain breaches")
    assert cli(*args, "--token", store["alice"]).code == 1  # an author may not
    r = cli(*args, "--token", store["bob"], "--json")
    assert r.code == 0 and r.json()["auto_kill"] is True
    r = cli("monitor", "ingest", fashion["corrupted"], "--model", MODEL, "--env", "production", "--token",
            store["alice"])
    assert r.code == 0 and "automatic kill switch TRIPPED" in r.out
    assert cli("policy", "active", MODEL, "--env", "production", "--json").json()["killed"] is True


@pytest.mark.parametrize(("which", "needle"),
                         [("narrow", "has 9 values, expected 10"), ("notes", "unknown log format")])
def test_bad_files_are_one_line_errors_and_store_nothing(cli: Any, store: dict[str, str], fashion: Any,
                                                         which: str, needle: str) -> None:
    r = cli("monitor", "ingest", fashion[which], "--model", MODEL, "--env", "production", "--token", store["alice"])
    assert r.code == 2 and r.err.startswith("error: ") and r.err.count("\n") == 1 and needle in r.err, r.err
    assert cli("monitor", "status", MODEL, "--env", "production", "--json").json()["rows"] == 0


def test_ingest_needs_a_token(cli: Any, store: dict[str, str], fashion: Any) -> None:
    r = cli("monitor", "ingest", fashion["clean"], "--model", MODEL, "--env", "production")
    assert r.code == 1 and "--token" in r.err
