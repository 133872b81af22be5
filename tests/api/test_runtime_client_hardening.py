"""PolicyClient hardening (issue 15): body cap, runtime fields, disk cache checks, default cache dir,
short reprs, loud auth failures, status and counters. Real HTTP on loopback throughout.

The client's names are read from the module (``rt.X``) so that, on a client without them, each
test fails on its own assertion rather than the whole file failing to import.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import exitwise.policies.runtime as rt
from exitwise.api.cache import policy_etag
from exitwise.policies.canonical import with_content_hash
from exitwise.policies.runtime_cache import CACHE_FORMAT

MODEL, ENV = "fashion-cnn", "production"
MiB = 1024 * 1024


def _served(make_doc: Callable[..., dict], variant: int = 0, **governance: Any) -> dict[str, Any]:
    """A policy as the server serves it: document plus governance fields (outside the content hash)."""
    return {**make_doc(model=MODEL, variant=variant), "version": variant + 1, "environment": ENV, "killed": False,
            "state": "active", **governance}


def _client(url: str, cache_dir: Any, **kw: Any) -> rt.PolicyClient:
    return rt.PolicyClient(url, MODEL, ENV, "token", cache_dir=cache_dir, timeout=5, **kw)


# ---------------------------------------------------------------- 1. the body cap


@pytest.mark.parametrize(("declare", "limit"), [(False, None), (True, 1 * MiB)], ids=["streamed", "content-length"])
def test_a_huge_body_is_refused_without_reading_it(policy_stub: Any, make_doc: Callable[..., dict], tmp_path: Path,
                                                   declare: bool, limit: int | None) -> None:
    """50 MB (a valid policy padded with spaces, which json.loads accepts) is refused past the cap.

    Without a Content-Length the client stops at the default 8 MiB; with one above the cap
    (here 1 MiB) it reads nothing. Memory stays bounded (tracemalloc peak well under the body)
    and the server gets out only what the socket buffers held before the client hung up.
    """
    client = _client(policy_stub.url, tmp_path, **({} if limit is None else {"max_body_bytes": limit}))
    good = _served(make_doc)
    policy_stub.serve(good)
    assert client.refresh().outcome == "updated"

    total = 50_000_000
    policy_stub.huge(_served(make_doc, variant=1), total, declare=declare)
    tracemalloc.start()
    try:
        started = time.monotonic()
        result = client.refresh()
        elapsed = time.monotonic() - started
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.outcome == "rejected" and result.reason == "too_large", result
    assert f"max_body_bytes={limit or 8 * MiB}" in (result.detail or "")
    assert ("Content-Length" in (result.detail or "")) == declare
    assert client.policy.version == 1 and client.policy.source == "server"  # the previous policy is kept
    assert peak < 3 * (limit or 8 * MiB), f"peak {peak / MiB:.1f} MiB for a {total / 1e6:.0f} MB body"
    assert policy_stub.done.wait(10)
    assert policy_stub.sent < total / 2, f"the server got {policy_stub.sent / 1e6:.1f} MB out: the client kept reading"
    assert elapsed < 5, elapsed

    policy_stub.serve(_served(make_doc, variant=1))  # the connection pool still works afterwards
    assert client.refresh().outcome == "updated" and client.policy.version == 2
    assert client.counters()["refusals"] == {"too_large": 1}
    client.close()


def test_compressed_and_deeply_nested_bodies_are_rejected(policy_stub: Any, make_doc: Callable[..., dict],
                                                          tmp_path: Path) -> None:
    client = _client(policy_stub.url, tmp_path)
    policy_stub.serve(_served(make_doc))
    assert client.refresh().outcome == "updated"
    policy_stub.serve(b"[" * 100_000)  # json.loads raises RecursionError, not ValueError: refresh must not raise
    result = client.refresh()
    assert (result.outcome, result.reason) == ("rejected", "json"), result
    policy_stub.serve(b"\x1f\x8b" + b"\0" * 20)
    policy_stub.headers["Content-Encoding"] = "gzip"  # the client asks for identity; a compressed body is not decoded
    result = client.refresh()
    assert (result.outcome, result.reason) == ("rejected", "encoding"), result
    assert client.policy.version == 1
    client.close()


# ---------------------------------------------------------------- 2. runtime fields


def test_runtime_fields_are_validated(policy_stub: Any, make_doc: Callable[..., dict], tmp_path: Path) -> None:
    client = _client(policy_stub.url, tmp_path)
    policy_stub.serve(_served(make_doc))
    assert client.refresh().outcome == "updated"
    bad_rate = [{**_served(make_doc), **with_content_hash({**make_doc(model=MODEL), "shadow_rate": rate})}
                for rate in ("abc", 1.5, -0.1, None, True)]  # shadow_rate is hashed: these hashes are valid
    cases = [(doc, "shadow_rate") for doc in bad_rate] + [
        (_served(make_doc, killed="false"), "killed"),  # bool("false") is True: a string must not pass
        (_served(make_doc, killed=0), "killed"),
        (_served(make_doc, version="3"), "version"),
        (_served(make_doc, version=0), "version"),
        (_served(make_doc, environment="staging"), "environment 'staging'"),
    ]
    for doc, why in cases:
        policy_stub.serve(doc, etag='"x"')
        result = client.refresh()
        assert result.outcome == "rejected" and why in (result.detail or ""), (why, result)
        assert client.policy.version == 1 and not client.policy.killed
        client.policy.shadow()  # still the good policy: never raises
    # the ETag the exitwise server sends carries the kill state; a body that contradicts it is not used
    policy_stub.serve(_served(make_doc, variant=1), etag=policy_etag(_served(make_doc, 1)["content_hash"], 2, True))
    result = client.refresh()
    assert (result.outcome, result.reason) == ("rejected", "etag"), result
    assert client.counters()["refusals"] == {"field": 9, "environment": 1, "etag": 1}
    with pytest.raises(rt.PolicyRejected, match="shadow_rate"):
        rt.verify_policy_document(bad_rate[0], MODEL)
    client.close()


# ---------------------------------------------------------------- 3. the disk cache


def _cache(cache_dir: Path) -> tuple[Path, dict[str, Any]]:
    path = cache_dir / f"{MODEL}@{ENV}.json"
    return path, json.loads(path.read_text())


def _write(path: Path, cached: dict[str, Any], body: dict[str, Any] | None = None, *, rehash: bool = False) -> None:
    if body is not None:
        cached = {**cached, "body": json.dumps(body)}
        if rehash:
            cached["body_sha256"] = hashlib.sha256(cached["body"].encode()).hexdigest()
    path.write_text(json.dumps(cached))


def test_disk_cache_is_checked_against_model_env_digest_and_etag(policy_stub: Any, make_doc: Callable[..., dict],
                                                                 tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    killed = _served(make_doc, killed=True)
    policy_stub.serve(killed)
    client = _client(policy_stub.url, tmp_path)
    assert client.refresh().outcome == "updated" and client.policy.killed
    client.close()
    path, cached = _cache(tmp_path)

    def reload(env: str = ENV) -> rt.RuntimePolicy:
        c = rt.PolicyClient(policy_stub.url, MODEL, env, "t", cache_dir=tmp_path)
        c.close()
        return c.policy

    assert (reload().source, reload().killed) == ("disk", True)

    # a file written for production, found under staging's name (a copied or shared cache dir)
    staging = path.with_name(f"{MODEL}@staging.json")
    staging.write_bytes(path.read_bytes())
    caplog.clear()
    assert reload("staging").is_fallback
    assert "written for 'fashion-cnn'@'production'" in caplog.text

    assert {"model": MODEL, "env": ENV, "etag": policy_etag(killed["content_hash"], 1, True)}.items() <= cached.items()
    assert cached["body_sha256"] == hashlib.sha256(cached["body"].encode()).hexdigest()
    # ... even when the file's own env field is edited: the document's environment disagrees
    _write(staging, {**cached, "env": "staging"})
    assert reload("staging").is_fallback and "environment 'production', expected 'staging'" in caplog.text

    unkilled = {**killed, "killed": False}  # killed is a governance field: outside the content hash
    caplog.clear()
    _write(path, cached, unkilled)  # a naive edit
    assert reload().is_fallback and "body_sha256" in caplog.text
    _write(path, cached, unkilled, rehash=True)  # the digest recomputed too; the ETag still says killed
    assert reload().is_fallback and "disagrees" in caplog.text
    _write(path, {**cached, "model": "other"})
    assert reload().is_fallback
    path.write_text(json.dumps({"etag": cached["etag"], "saved_at": 0, "policy": killed}))  # the old format
    assert reload().is_fallback and CACHE_FORMAT in caplog.text
    _write(path, cached)
    assert (reload().source, reload().killed) == ("disk", True)  # untouched: used


def test_an_answer_without_an_exitwise_etag_is_not_cached(policy_stub: Any, make_doc: Callable[..., dict],
                                                          tmp_path: Path) -> None:
    client = _client(policy_stub.url, tmp_path)
    policy_stub.serve(_served(make_doc))
    cache_file = tmp_path / f"{MODEL}@{ENV}.json"
    assert client.refresh().outcome == "updated" and cache_file.exists()
    policy_stub.serve(_served(make_doc, variant=1), etag='"proxy-tag"')
    assert client.refresh().outcome == "updated" and client.policy.version == 2
    assert not cache_file.exists()  # not v1 either: a restart must not bring back a superseded policy
    client.close()


# ---------------------------------------------------------------- 4. the default cache directory


def test_cache_dir_defaults_to_a_per_user_directory_or_is_off(policy_stub: Any, make_doc: Callable[..., dict],
                                                              tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    policy_stub.serve(_served(make_doc))
    for var in ("EXITWISE_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    home = rt.PolicyClient(policy_stub.url, MODEL, ENV, "t")  # no cache_dir: the per-user default
    assert home.refresh().outcome == "updated"
    assert (tmp_path / "home" / ".cache" / "exitwise" / f"{MODEL}@{ENV}.json").exists()
    home.close()
    assert rt.default_cache_dir() == tmp_path / "home" / ".cache" / "exitwise"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert rt.default_cache_dir() == tmp_path / "home" / ".cache" / "exitwise"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert rt.default_cache_dir() == tmp_path / "xdg" / "exitwise"
    monkeypatch.setenv("EXITWISE_CACHE_DIR", str(tmp_path / "explicit"))

    client = rt.PolicyClient(policy_stub.url, MODEL, ENV, "t")  # no cache_dir
    assert client.cache_file == tmp_path / "explicit" / f"{MODEL}@{ENV}.json"
    assert not (tmp_path / "explicit").exists()  # created on first save, not before
    assert client.refresh().outcome == "updated" and client.cache_file.exists()
    assert stat.S_IMODE(os.stat(tmp_path / "explicit").st_mode) == 0o700  # writable by the runtime only
    client.close()
    assert rt.PolicyClient(policy_stub.url, MODEL, ENV, "t").policy.source == "disk"

    off = rt.PolicyClient(policy_stub.url, MODEL, ENV, "t", cache_dir=False)
    assert off.cache_file is None and off.policy.is_fallback  # the disk copy above is not read
    assert off.refresh().outcome == "updated"
    policy_stub.serve({"type": "urn:exitwise:problem:not-found", "title": "Not found", "status": 404}, status=404,
                 content_type="application/problem+json")
    assert off.refresh().outcome == "no_active_policy"
    off.close()
    with pytest.raises(ValueError, match="cache_dir=True"):
        rt.PolicyClient(policy_stub.url, MODEL, ENV, "t", cache_dir=True)  # type: ignore[arg-type]


# ---------------------------------------------------------------- 5. short reprs


def test_reprs_are_short_and_carry_no_token(policy_stub: Any, make_doc: Callable[..., dict], tmp_path: Path) -> None:
    doc = _served(make_doc, version=3)
    policy_stub.serve(doc)
    client = rt.PolicyClient(policy_stub.url, MODEL, ENV, "s3cret-token", cache_dir=tmp_path)
    assert repr(client.policy) == ("RuntimePolicy(source='fallback', version=None, killed=False, "
                                   "content_hash=None)")
    client.refresh()
    assert repr(client.policy) == (f"RuntimePolicy(source='server', version=3, killed=False, "
                                   f"content_hash='{doc['content_hash'][:12]}…')")
    text = repr(client)
    assert len(text) < 200 and "s3cret" not in text and MODEL in text and "version=3" in text, text
    client.close()


# ---------------------------------------------------------------- 6. loud failures, status, counters


def _problem(status: int) -> dict[str, Any]:
    return {"type": "urn:exitwise:problem:unauthorized", "title": "Unauthorized", "status": status,
            "detail": "invalid or disabled token"}


@pytest.mark.parametrize("status", [401, 403])
def test_a_refused_token_is_loud(policy_stub: Any, make_doc: Callable[..., dict], tmp_path: Path, status: int,
                                 caplog: pytest.LogCaptureFixture) -> None:
    policy_stub.serve(_problem(status), status=status, content_type="application/problem+json")
    client = _client(policy_stub.url, tmp_path / "empty")
    with pytest.raises(rt.PolicyAuthError, match=f"refused the token.*HTTP {status}.*invalid or disabled token") as err:
        client.start()  # nothing on disk: a wrong token must not leave the runtime at full depth silently
    assert isinstance(err.value, rt.PolicyClientError) and err.value.status == status
    assert client.policy.is_fallback
    assert [r.levelno for r in caplog.records if "refused the token" in r.getMessage()] == [logging.ERROR]
    client.close()

    policy_stub.serve(_served(make_doc))
    with _client(policy_stub.url, tmp_path) as seeded:
        assert seeded.refresh().outcome == "updated"
    policy_stub.serve(_problem(status), status=status, content_type="application/problem+json")
    caplog.clear()
    with _client(policy_stub.url, tmp_path, poll_interval=60) as client:
        assert client.start().policy.source == "disk"  # a cached policy is kept, loudly
        assert client.refresh().outcome == "unauthorized"
        errors = [r for r in caplog.records if "refused the token" in r.getMessage()]
        assert len(errors) == 2 and all(r.levelno == logging.ERROR for r in errors)  # every poll
        st = client.status()
        assert (st.source, st.version, st.last_outcome, st.last_status, st.consecutive_failures) == (
            "disk", 1, "unauthorized", status, 2)
        assert st.last_detail == "invalid or disabled token" and st.on_fallback_since is None
        assert client.counters()["polls"] == {"unauthorized": 2}


def test_the_real_server_refuses_a_wrong_token_loudly(live_server: Any, tmp_path: Path) -> None:
    client = rt.PolicyClient(live_server.base_url, "no-such-model", ENV, "not-a-token", cache_dir=tmp_path)
    with pytest.raises(rt.PolicyAuthError, match="HTTP 401"):
        client.start()
    client.close()


def test_status_counters_and_the_fallback_alarm(policy_stub: Any, make_doc: Callable[..., dict], tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="exitwise.runtime")
    policy_stub.serve(b"down", status=503, content_type="text/plain")
    before = time.time()
    client = _client(policy_stub.url, tmp_path, fallback_alarm_after=0.3)
    st = client.status()
    assert (st.source, st.version, st.policy_age_s, st.last_outcome, st.consecutive_failures) == (
        "fallback", None, None, None, 0)
    assert st.on_fallback_since is not None and before <= st.on_fallback_since <= time.time()

    def alarms() -> int:
        return sum(r.levelno == logging.ERROR and "FULL DEPTH" in r.getMessage() for r in caplog.records)

    assert client.refresh().outcome == "unavailable" and alarms() == 0  # not yet 0.3 s on the fallback
    time.sleep(0.35)
    client.refresh()
    client.refresh()
    assert alarms() == 2  # once per poll
    assert client.status().consecutive_failures == 3 and client.status().last_status == 503

    policy_stub.serve(_served(make_doc))
    assert client.refresh().outcome == "updated"
    st = client.status()
    assert (st.source, st.version, st.on_fallback_since, st.consecutive_failures) == ("server", 1, None, 0)
    assert st.policy_age_s is not None and 0 <= st.policy_age_s < 5 and st.last_success is not None
    policy_stub.serve(b"down", status=503, content_type="text/plain")
    client.refresh()
    assert alarms() == 2  # a policy is in use: no alarm
    counters = client.counters()
    assert (counters["polls"], counters["refusals"]) == ({"unavailable": 4, "updated": 1}, {})
    client.close()

    time.sleep(0.05)
    disk = _client(policy_stub.url, tmp_path)
    assert disk.status().source == "disk" and disk.status().policy_age_s >= 0.05  # since it was served and saved
    disk.close()
    quiet = _client(policy_stub.url, tmp_path / "none", fallback_alarm_after=None)
    quiet.refresh()
    assert alarms() == 2
    quiet.close()
