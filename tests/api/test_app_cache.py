"""The runtime read path: pre-serialised bytes, ETag/304, Cache-Control and cross-replica invalidation."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from exitwise.api.app import create_app
from exitwise.api.routes.runtime import etag_matches
from exitwise.policies import lifecycle
from exitwise.policies.canonical import verify_content_hash
from exitwise.policies.db import unit_of_work
from exitwise.policies.principals import add_principal, disable_principal, get_principal

SLACK_S = 2.0  # scheduling slack on a loaded 2-core machine, on top of the stated bound


def _served(api: httpx.Client, world: Any, model: str, env: str = "production", **headers: str) -> httpx.Response:
    return api.get(f"/v1/models/{model}/policy", params={"env": env}, headers={**world.auth("rita"), **headers})


def test_body_is_preserialised_canonical_json_with_validators(api: httpx.Client, world: Any,
                                                              make_doc: Callable[..., dict]) -> None:
    m = world.model("bytes")
    (doc,) = world.seed(make_doc, m, versions=1, approve=1, activate={"production": 1})
    resp = _served(api, world, m)
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "application/json"
    assert resp.headers["cache-control"] == "no-cache"
    body = resp.json()
    assert resp.content == json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    assert verify_content_hash(body) and body["content_hash"] == doc["content_hash"]
    assert {k: body[k] for k in ("version", "environment", "killed", "state")} == {
        "version": 1, "environment": "production", "killed": False, "state": "active"}
    assert resp.headers["etag"].startswith(f'"{doc["content_hash"]}.v1.live.a')


def test_if_none_match_304_and_etag_follows_kill_state(api: httpx.Client, world: Any,
                                                      make_doc: Callable[..., dict]) -> None:
    m = world.model("etag")
    world.seed(make_doc, m, versions=1, approve=1, activate={"production": 1})
    first = _served(api, world, m)
    etag = first.headers["etag"]
    for candidate in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        not_modified = _served(api, world, m, **{"If-None-Match": candidate})
        assert not_modified.status_code == 304, candidate
        assert not_modified.content == b""
        assert not_modified.headers["etag"] == etag and not_modified.headers["cache-control"] == "no-cache"
    assert _served(api, world, m, **{"If-None-Match": '"stale"'}).status_code == 200

    assert api.post(f"/v1/models/{m}/kill", json={"env": "production", "reason": "x"},
                    headers=world.auth("alice")).status_code == 200
    killed = _served(api, world, m, **{"If-None-Match": etag})
    assert killed.status_code == 200 and killed.json()["killed"] is True
    assert killed.headers["etag"] != etag and ".killed.a" in killed.headers["etag"]
    assert _served(api, world, m, **{"If-None-Match": killed.headers["etag"]}).status_code == 304

    exact = api.get(f"/v1/models/{m}/versions/1/policy", headers=world.auth("rita"))
    assert exact.status_code == 200
    assert api.get(f"/v1/models/{m}/versions/1/policy", headers={**world.auth("rita"),
                   "If-None-Match": exact.headers["etag"]}).status_code == 304


def test_rollback_to_the_same_version_changes_the_etag(api: httpx.Client, world: Any,
                                                        make_doc: Callable[..., dict]) -> None:
    """Same content, number and kill state, but a new activation (and ``activated_at``): a new body."""
    m = world.model("reactivated")
    world.seed(make_doc, m, versions=2, approve=2, activate={"production": 1})
    first = _served(api, world, m)
    world.activate(m, 2, "production")
    assert api.post(f"/v1/models/{m}/rollback", json={"env": "production", "to": 1, "reason": "back"},
                    headers=world.auth("bob")).status_code == 200
    again = _served(api, world, m, **{"If-None-Match": first.headers["etag"]})
    assert again.status_code == 200, "a stale ETag must not answer 304 after a re-activation"
    assert again.json()["version"] == 1 and again.json()["activated_at"] != first.json()["activated_at"]
    assert again.headers["etag"] != first.headers["etag"]


def test_etag_matching_rules() -> None:
    assert etag_matches('"a"', '"a"') and etag_matches('W/"a"', '"a"') and etag_matches(' "b" , "a"', '"a"')
    assert etag_matches("*", '"a"') and not etag_matches('"ab"', '"a"') and not etag_matches("a", '"a"')


def _wait_for(predicate: Callable[[], bool], timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.02)
    raise AssertionError(f"condition not met within {timeout:.1f} s")


def test_change_via_any_replica_or_the_cli_is_served_within_the_ttl(
        world: Any, asgi_client: TestClient, live_client: httpx.Client, make_doc: Callable[..., dict],
        cache_ttl: float) -> None:
    """Two replicas on one database: the TestClient app (A) and the uvicorn process (B)."""
    m = world.model("replica")
    world.seed(make_doc, m, versions=3, approve=3, activate={"production": 1})
    for replica in (asgi_client, live_client):  # warm both caches on v1
        assert _served(replica, world, m).json()["version"] == 1

    # through replica A: A serves v2 at once, B within the TTL
    changed = time.monotonic()
    assert asgi_client.post(f"/v1/models/{m}/versions/2/activate", json={"env": "production", "reason": "x"},
                            headers=world.auth("bob")).status_code == 200
    assert _served(asgi_client, world, m).json()["version"] == 2
    _wait_for(lambda: _served(live_client, world, m).json()["version"] == 2, cache_ttl + SLACK_S)
    assert time.monotonic() - changed < cache_ttl + SLACK_S

    # through the CLI's code path (service call on its own connection): both replicas within the TTL
    with unit_of_work(world.engine) as s:
        lifecycle.activate(m, 3, "production", actor=get_principal("bob", session=s), reason="cli", session=s)
    for replica in (asgi_client, live_client):
        _wait_for(lambda r=replica: _served(r, world, m).json()["version"] == 3, cache_ttl + SLACK_S)
    with unit_of_work(world.engine) as s:
        lifecycle.kill(m, "production", actor=get_principal("alice", session=s), reason="cli", session=s)
    for replica in (asgi_client, live_client):
        _wait_for(lambda r=replica: _served(r, world, m).json()["killed"], cache_ttl + SLACK_S)


def test_cache_hits_do_not_touch_the_database(world: Any, make_doc: Callable[..., dict],
                                              make_settings: Callable[..., Any]) -> None:
    m = world.model("hits")
    world.seed(make_doc, m, versions=1, approve=1, activate={"production": 1})
    app = create_app(make_settings(cache_ttl_ms=60_000), engine=world.engine)
    with TestClient(app) as client:
        for _ in range(30):
            assert _served(client, world, m).status_code == 200
        assert app.state.cache.checks == 1  # one generation read for 30 requests within the TTL
        missing = client.get("/v1/models/ghost/policy", headers=world.auth("rita"))
        assert missing.status_code == 404 and client.get("/v1/models/ghost/policy",
                                                         headers=world.auth("rita")).status_code == 404
        assert app.state.cache.checks == 1
    zero = create_app(make_settings(cache_ttl_ms=0), engine=world.engine)
    with TestClient(zero) as client:
        for _ in range(3):
            _served(client, world, m)
        assert zero.state.cache.checks >= 3  # ttl 0: every request reads the counter


def test_disabled_principal_loses_read_access_within_the_ttl(world: Any, live_client: httpx.Client,
                                                            cache_ttl: float) -> None:
    with unit_of_work(world.engine) as s:
        admin = get_principal("admin", session=s)
        name = world.model("runtime")
        token = add_principal(name, "reader", actor=admin, session=s).token
    headers = {"Authorization": f"Bearer {token}"}
    assert live_client.get("/v1/me", headers=headers).status_code == 200  # now cached
    with unit_of_work(world.engine) as s:
        disable_principal(name, actor=get_principal("admin", session=s), session=s)
    _wait_for(lambda: live_client.get("/v1/me", headers=headers).status_code == 401, cache_ttl + SLACK_S)


@pytest.mark.parametrize("env", ["staging", "canary-eu"])
def test_environments_are_separate(api: httpx.Client, world: Any, make_doc: Callable[..., dict], env: str) -> None:
    m = world.model("envs")
    world.seed(make_doc, m, versions=2, approve=2, activate={"production": 1, env: 2}, kill=(env,))
    prod, other = _served(api, world, m), _served(api, world, m, env=env)
    assert (prod.json()["version"], prod.json()["killed"]) == (1, False)
    assert (other.json()["version"], other.json()["killed"], other.json()["environment"]) == (2, True, env)


def test_fast_lane_answers_exactly_like_the_route(world: Any, make_doc: Callable[..., dict],
                                                  make_settings: Callable[..., Any]) -> None:
    m = world.model("lane")
    world.seed(make_doc, m, versions=2, approve=2, activate={"production": 1})
    app = create_app(make_settings(cache_ttl_ms=60_000), engine=world.engine)
    lane = app.fast_lane
    keep = ("etag", "cache-control", "content-type", "content-length")
    with TestClient(app) as client:
        cold = _served(client, world, m)  # the FastAPI route: fills the cache
        assert lane.hits == 0
        hot = _served(client, world, m)
        assert lane.hits == 1
        assert (hot.status_code, hot.content) == (cold.status_code, cold.content)
        assert {k: hot.headers[k] for k in keep} == {k: cold.headers[k] for k in keep}
        slow_304 = client.get(f"/v1/models/{m}/policy", params={"env": "production", "x": "1"},
                              headers={**world.auth("rita"), "If-None-Match": cold.headers["etag"]})
        fast_304 = _served(client, world, m, **{"If-None-Match": cold.headers["etag"]})
        assert lane.hits == 2 and slow_304.status_code == fast_304.status_code == 304
        assert {k: fast_304.headers.get(k) for k in keep} == {k: slow_304.headers.get(k) for k in keep}

        # everything unusual falls through to the route, which answers it properly
        before = lane.hits
        assert client.get(f"/v1/models/{m}/policy").status_code == 401
        assert client.get(f"/v1/models/{m}/policy", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert client.get(f"/v1/models/{m}/policy?env=UP", headers=world.auth("rita")).status_code == 422
        assert client.get(f"/v1/models/{m}/policy?env=staging", headers=world.auth("rita")).status_code == 404
        assert client.head(f"/v1/models/{m}/policy", headers=world.auth("rita")).status_code == 405
        assert client.get(f"/v1/models/{m}/policy?env=%70roduction", headers=world.auth("rita")).json()["version"] \
            == 1
        assert lane.hits == before

        # a change through this replica reaches the lane at once (local writes re-check the generation)
        assert client.post(f"/v1/models/{m}/versions/2/activate", json={"env": "production", "reason": "x"},
                           headers=world.auth("bob")).status_code == 200
        assert _served(client, world, m).json()["version"] == 2
        assert _served(client, world, m).json()["version"] == 2 and lane.hits == before + 1
