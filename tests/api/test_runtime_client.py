"""exitwise.policies.runtime.PolicyClient against a real server process, a tampering server and its disk cache."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from exitwise.calibration.rule import CompiledPolicy, decide
from exitwise.policies import lifecycle
from exitwise.policies.canonical import with_content_hash
from exitwise.policies.db import unit_of_work
from exitwise.policies.principals import get_principal
from exitwise.policies.runtime import PolicyClient, RuntimePolicy, verify_policy_document

SLACK_S = 2.0
POLL_S = 0.05
FORBIDDEN = ("fastapi", "starlette", "sqlalchemy", "alembic", "mlflow", "pandas", "scipy", "pydantic", "sklearn")


def _logits(n: int = 64, c: int = 4, seed: int = 0, scale: float = 6.0) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=(n, c)) * scale).astype(np.float32)


def _wait_for(predicate: Callable[[], bool], timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.01)
    raise AssertionError(f"condition not met within {timeout:.1f} s")


def test_client_imports_numpy_and_httpx_only() -> None:
    code = ("import json, sys; import policies.runtime; "
            f"print(json.dumps(sorted(m for m in {FORBIDDEN!r} if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert json.loads(out.stdout) == []


def test_client_follows_a_real_server(world: Any, make_doc: Callable[..., dict], tmp_path: Path, cache_ttl: float,
                                      start_live_server: Callable[..., Any]) -> None:
    """v1 -> v2 within the stated delay -> kill never exits -> server down keeps the last good policy."""
    m = world.model("runtime")
    docs = world.seed(make_doc, m, versions=2, approve=2, activate={"production": 1})
    server = start_live_server()
    cache_dir = tmp_path / "cache"
    client = PolicyClient(server.base_url, m, "production", world.tokens["rita"], cache_dir=cache_dir,
                          poll_interval=POLL_S, timeout=5, seed=1)
    logits = _logits()
    assert client.policy.is_fallback and not client.policy.decide(0, logits).any() and not client.policy.shadow()

    assert client.refresh().outcome == "updated"
    assert (client.policy.version, client.policy.source, client.policy.killed) == (1, "server", False)
    expected = decide(CompiledPolicy.from_document(docs[0]), 0, logits)
    assert expected.any() and not expected.all()  # the check below is not vacuous
    np.testing.assert_array_equal(client.policy.decide(0, logits), expected)
    assert client.refresh().outcome == "not_modified"

    client.start()  # background polling
    try:
        changed = time.monotonic()
        with unit_of_work(world.engine) as s:  # what `exitwise policy activate` does
            lifecycle.activate(m, 2, "production", actor=get_principal("bob", session=s), reason="v2", session=s)
        delay = _wait_for(lambda: client.policy.version == 2, POLL_S + cache_ttl + SLACK_S)
        assert time.monotonic() - changed < POLL_S + cache_ttl + SLACK_S, delay
        np.testing.assert_array_equal(client.policy.decide(0, logits),
                                      decide(CompiledPolicy.from_document(docs[1]), 0, logits))

        killed = httpx.post(f"{server.base_url}/v1/models/{m}/kill", json={"env": "production", "reason": "incident"},
                            headers=world.auth("alice"), timeout=10)
        assert killed.status_code == 200
        _wait_for(lambda: client.policy.killed, POLL_S + cache_ttl + SLACK_S)
        policy = client.policy
        sure = np.zeros((8, 4), dtype=np.float32)
        sure[:, 0] = 50.0  # certain answers: would exit anywhere if not killed
        assert not policy.decide(0, sure).any() and not policy.decide(1, sure).any()
        assert policy.decide(2, sure).all()  # the last exit always answers
    finally:
        client.stop()

    server.stop()
    result = client.refresh()
    assert result.outcome == "unavailable"
    assert (client.policy.version, client.policy.killed) == (2, True)
    client.close()

    restarted = PolicyClient(server.base_url, m, "production", world.tokens["rita"], cache_dir=cache_dir)
    assert (restarted.policy.source, restarted.policy.version, restarted.policy.killed) == ("disk", 2, True)
    assert restarted.refresh().outcome == "unavailable" and restarted.policy.version == 2
    restarted.close()

    never = PolicyClient(server.base_url, m, "production", world.tokens["rita"], cache_dir=tmp_path / "empty")
    assert never.refresh().outcome == "unavailable"
    assert never.policy.is_fallback and not never.policy.decide(0, sure).any()
    never.close()


def _served_doc(make_doc: Callable[..., dict], model: str = "fashion-cnn", variant: int = 0) -> dict[str, Any]:
    return {**make_doc(model=model, variant=variant), "version": variant + 1, "environment": "production",
            "killed": False, "state": "active"}


def test_corrupted_bodies_are_rejected_and_the_previous_policy_kept(policy_stub: Any, make_doc: Callable[..., dict],
                                                                    tmp_path: Path) -> None:
    good = _served_doc(make_doc)
    client = PolicyClient(policy_stub.url, "fashion-cnn", "production", "token", cache_dir=tmp_path, timeout=5)
    policy_stub.serve(good)
    assert client.refresh().outcome == "updated" and client.policy.version == 1
    logits = _logits()
    before = client.policy.decide(0, logits)

    edited = json.loads(json.dumps(good))
    edited["thresholds"]["default"][0] = [0.0, 0.0, 0.0, 0.0]  # exit always; content_hash left as it was
    other_model = {**_served_doc(make_doc, model="other-model")}
    malformed = with_content_hash({**make_doc(), "thresholds": {"default": [[0.5]]}})  # hash fine, shape wrong
    wrong_schema = with_content_hash({**make_doc(), "schema": "exitwise.policy/v0"})
    for body, why in ((edited, "content_hash mismatch"), (b'{"schema": "exitwise.pol', "JSON"),
                      (other_model, "model"), (malformed, "does not compile"), (b"[1, 2]", "not a JSON object"),
                      (wrong_schema, "schema")):
        policy_stub.serve(body)
        result = client.refresh()
        assert result.outcome == "rejected", why
        assert why.split()[0].lower() in (result.detail or "").lower() or why == "JSON", result.detail
        assert client.policy.version == 1 and client.policy.source == "server"
        np.testing.assert_array_equal(client.policy.decide(0, logits), before)

    policy_stub.serve(b"oops", status=500, content_type="text/plain")
    assert client.refresh().outcome == "unavailable" and client.policy.version == 1
    policy_stub.serve(b"<html>not found</html>", status=404, content_type="text/html")  # a proxy, not the API
    assert client.refresh().outcome == "unavailable" and client.policy.version == 1

    # the disk copy is the last good policy, and a tampered disk copy is ignored at start-up
    saved = next(tmp_path.glob("*.json"))
    assert json.loads(json.loads(saved.read_text())["body"])["content_hash"] == good["content_hash"]
    assert PolicyClient(policy_stub.url, "fashion-cnn", "production", "t", cache_dir=tmp_path).policy.version == 1
    cached = json.loads(saved.read_text())
    cached["body"] = json.dumps({**json.loads(cached["body"]), "shadow_rate": 1.0})
    saved.write_text(json.dumps(cached))
    assert PolicyClient(policy_stub.url, "fashion-cnn", "production", "t", cache_dir=tmp_path).policy.is_fallback
    saved.write_text("{truncated")
    assert PolicyClient(policy_stub.url, "fashion-cnn", "production", "t", cache_dir=tmp_path).policy.is_fallback

    # the API says no policy is active: full depth, and no stale copy survives a restart
    policy_stub.serve({"type": "urn:exitwise:problem:not-found", "title": "Not found", "status": 404}, status=404,
                 content_type="application/problem+json")
    assert client.refresh().outcome == "no_active_policy"
    assert client.policy.is_fallback and not list(tmp_path.glob("*.json"))
    policy_stub.serve(_served_doc(make_doc, variant=1))
    assert client.refresh().outcome == "updated" and client.policy.version == 2
    client.close()


def test_shadow_rate_and_seeded_rng(make_doc: Callable[..., dict]) -> None:
    doc = _served_doc(make_doc)  # shadow_rate 0.01
    compiled = verify_policy_document(doc, "fashion-cnn")
    import random

    a = RuntimePolicy(compiled, doc, "server", _rng=random.Random(7))
    b = RuntimePolicy(compiled, doc, "server", _rng=random.Random(7))
    draws_a = [a.shadow() for _ in range(20_000)]
    assert draws_a == [b.shadow() for _ in range(20_000)]
    assert 0.005 < sum(draws_a) / len(draws_a) < 0.015
    never = RuntimePolicy(compiled, {**doc, "shadow_rate": 0.0}, "server")
    assert not any(never.shadow() for _ in range(1000))
    assert not any(RuntimePolicy.full_depth().shadow() for _ in range(1000))


def test_client_arguments_and_fallback_shapes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="poll_interval"):
        PolicyClient("http://127.0.0.1:9", "m", "production", None, cache_dir=tmp_path, poll_interval=0)
    fallback = RuntimePolicy.full_depth()
    assert fallback.decide(0, np.zeros((3, 5))).tolist() == [False] * 3
    with pytest.raises(ValueError, match="shape"):
        fallback.decide(0, np.zeros(3))
    known = RuntimePolicy.full_depth(n_exits=3)  # the last exit of a known model answers
    assert [known.decide(k, np.zeros((2, 5))).tolist() for k in range(3)] == [[False] * 2, [False] * 2, [True] * 2]
    with pytest.raises(ValueError, match="out of range"):
        known.decide(3, np.zeros((2, 5)))


def test_policy_for_another_architecture_is_rejected(policy_stub: Any, make_doc: Callable[..., dict],
                                                     tmp_path: Path) -> None:
    policy_stub.serve(_served_doc(make_doc))  # 3 exits, 4 classes
    for shape, why in (({"n_exits": 4, "n_classes": 4}, "3 exits"), ({"n_exits": 3, "n_classes": 10}, "4 classes")):
        client = PolicyClient(policy_stub.url, "fashion-cnn", "production", "t", cache_dir=tmp_path, **shape)
        result = client.refresh()
        assert result.outcome == "rejected" and why in (result.detail or ""), result.detail
        assert client.policy.is_fallback and client.policy.n_exits == shape["n_exits"]
        client.close()
    fits = PolicyClient(policy_stub.url, "fashion-cnn", "production", "t", cache_dir=tmp_path, n_exits=3, n_classes=4)
    assert fits.refresh().outcome == "updated" and fits.policy.version == 1
    fits.close()
