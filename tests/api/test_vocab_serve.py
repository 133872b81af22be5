"""A 150k-vocabulary policy through the REST API and the runtime client; the 413 answer as a problem document.

The issue's report: "POST of the policy was refused with 413, and the problem type was
about:blank". A token-bucket policy is tens of KB and goes through; a body over the limit (a
policy with one threshold column per token, 2.4 MB) is refused with a problem document that
says what happened and names the limit.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from vocab_policy_docs import QWEN_VOCAB, token_stream, vocabulary_doc

from exitwise.api.app import create_app
from exitwise.api.settings import ApiSettings
from exitwise.calibration.rule import CompiledPolicy, decide
from exitwise.policies.canonical import canonical_json, with_content_hash
from exitwise.policies.runtime import PolicyClient

TOO_LARGE = "urn:exitwise:problem:body-too-large"
DEFAULT_LIMIT = 1 << 20


def assert_too_large(resp: httpx.Response, limit: int) -> dict[str, Any]:
    assert resp.status_code == 413, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    body = resp.json()
    assert body["type"] == TOO_LARGE and body["status"] == 413 and body["title"] == "Request body too large"
    assert body["detail"] == f"request body is larger than the limit of {limit} bytes"
    assert body["limit_bytes"] == limit and body["instance"]
    return body


def _per_token_policy(make_doc: Callable[..., dict[str, Any]], model: str) -> bytes:
    """What a policy with one threshold column per token looks like: megabytes."""
    classes = [f"t{i}" for i in range(QWEN_VOCAB)]
    row = [0.9] * QWEN_VOCAB
    doc = make_doc(model=model, classes=classes, thresholds={"default": [row, row]},
                   forced_full_depth={"classes": [], "segments": []})
    return json.dumps(doc).encode()


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)  # answered before any database work
def test_a_policy_over_the_limit_is_a_too_large_problem(api: httpx.Client, world: Any,
                                                        make_doc: Callable[..., dict[str, Any]]) -> None:
    alice = {**world.auth("alice"), "content-type": "application/json"}
    body = _per_token_policy(make_doc, world.model("per-token"))
    assert len(body) > 2 * DEFAULT_LIMIT
    problem = assert_too_large(api.post("/v1/policies", content=body, headers=alice), DEFAULT_LIMIT)
    assert problem["instance"] == "/v1/policies"

    def chunks() -> Iterator[bytes]:  # no Content-Length: the streamed bytes are counted
        for start in range(0, len(body), 65536):
            yield body[start:start + 65536]

    assert_too_large(api.post("/v1/policies", content=chunks(), headers=alice), DEFAULT_LIMIT)


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_the_problem_names_a_configured_limit(world: Any, make_settings: Callable[..., ApiSettings]) -> None:
    with TestClient(create_app(make_settings(max_body_bytes=4096), engine=world.engine)) as client:
        headers = {**world.auth("alice"), "content-type": "application/json"}
        assert_too_large(client.post("/v1/policies", content=b" " * 5000, headers=headers), 4096)

        def chunks() -> Iterator[bytes]:
            yield b"[" + b" " * 3000
            yield b" " * 3000 + b"]"

        assert_too_large(client.post("/v1/policies", content=chunks(), headers=headers), 4096)
        assert client.post("/v1/policies", content=b"[]", headers=headers).status_code == 422  # under the limit


def test_a_150k_vocabulary_policy_is_stored_served_and_diffed(api: httpx.Client, world: Any,
                                                              make_doc: Callable[..., dict[str, Any]]) -> None:
    m = world.model("lm")
    alice, bob, rita = world.auth("alice"), world.auth("bob"), world.auth("rita")
    d1 = vocabulary_doc(make_doc(model=m), seed=0)
    d1 = with_content_hash({**{k: v for k, v in d1.items() if k != "content_hash"}, "model": {"name": m}})
    d2 = vocabulary_doc(make_doc(model=m, parent=1), seed=1)
    d2 = with_content_hash({**{k: v for k, v in d2.items() if k != "content_hash"}, "model": {"name": m}})
    assert len(canonical_json(d1)) < 64 * 1024
    created = api.post("/v1/policies", json=d1, headers=alice)
    assert created.status_code == 201, created.text
    assert created.json()["document"] == d1
    assert api.post("/v1/policies", json=d2, headers=alice).status_code == 201
    assert api.post(f"/v1/models/{m}/versions/1/approve", json={"reason": "ok"}, headers=bob).status_code == 200
    act = api.post(f"/v1/models/{m}/versions/1/activate", json={"env": "production", "reason": "go"}, headers=bob)
    assert act.status_code == 200, act.text
    served = api.get(f"/v1/models/{m}/policy", params={"env": "production"}, headers=rita).json()
    assert served["vocabulary"] == d1["vocabulary"] and served["content_hash"] == d1["content_hash"]

    diff = api.get(f"/v1/models/{m}/diff", params={"a": 1, "b": 2}, headers=rita)
    assert diff.status_code == 200 and len(diff.content) < 20_000  # per bucket, never per token
    body = diff.json()
    assert "vocabulary" in body["changed_fields"]
    assert {t["class"] for t in body["thresholds"]} <= set(d1["classes"])


def _dense_logits(policy_doc: dict[str, Any], n: int, seed: int) -> np.ndarray:
    """(n, V) logits whose answer is a frequent token for half the rows, with a clear winner."""
    rng = np.random.default_rng(seed)
    v = policy_doc["vocabulary"]["size"]
    logits = rng.normal(size=(n, v)).astype(np.float32)
    answers = token_stream(v, n=n, seed=0)  # the helper's own token law: frequent tokens come up
    logits[np.arange(n), answers] += rng.uniform(5.0, 30.0, size=n).astype(np.float32)
    return logits


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_the_runtime_client_fetches_and_applies_a_150k_policy(world: Any, make_doc: Callable[..., dict[str, Any]],
                                                              live_server: Any, tmp_path: Path) -> None:
    m = world.model("lm-runtime")
    doc = vocabulary_doc(make_doc(model=m))
    doc = with_content_hash({**{k: v for k, v in doc.items() if k != "content_hash"}, "model": {"name": m}})
    world.seed(lambda **_: doc, m, versions=1, approve=1, activate={"production": 1})
    client = PolicyClient(live_server.base_url, m, "production", world.tokens["rita"], cache_dir=tmp_path,
                          timeout=10, n_exits=12, n_classes=QWEN_VOCAB, shadow_upload=False)
    try:
        assert client.refresh().outcome == "updated", client.status()
        policy = client.policy
        assert policy.version == 1 and policy.compiled is not None and policy.compiled.top_k == 32
        logits = _dense_logits(doc, 48, seed=3)
        reference = CompiledPolicy.from_document(doc)
        for k in (0, 5):
            got = policy.decide(k, logits, ["studio"] * 48)
            np.testing.assert_array_equal(got, decide(reference, k, logits, ["studio"] * 48))
        first = policy.decide(0, logits)
        assert first.any() and not first.all()  # the comparison above is not vacuous
    finally:
        client.close()

    wrong = PolicyClient(live_server.base_url, m, "production", world.tokens["rita"], cache_dir=False, timeout=10,
                         n_exits=12, n_classes=4, shadow_upload=False)  # the buckets are not the model's outputs
    try:
        assert wrong.refresh().outcome == "rejected"
        assert wrong.policy.is_fallback
    finally:
        wrong.close()
