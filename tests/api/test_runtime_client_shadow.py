"""Shadow traffic from PolicyClient to a real loopback server (PolicyStub): what is uploaded (read back
with the project's own exit-log reader), how often, under which version, what is retried, dropped
and counted, that recording never waits on the server, and that no thread outlives close.
"""

from __future__ import annotations

import ast
import io
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exitwise.calibration.logfiles.cards import card_from_dict
from exitwise.calibration.logfiles.readers import load_logs
from exitwise.policies.runtime import PolicyClient, RuntimePolicy, verify_policy_document
from exitwise.policies.runtime_shadow import NPZ_MEDIA_TYPE, ShadowUploader

MODEL, ENV, TOKEN = "fashion-cnn", "production", "author-token"
SERVING = Path(__file__).resolve().parents[2] / "docs" / "serving.md"
K, C = 3, 4  # make_doc's policy: 3 exits, 4 classes
CARD = card_from_dict({"model": MODEL, "exits": [{"name": n, "cost": c} for n, c in
                                                  (("stage1", 1.9e6), ("stage2", 5.2e6), ("final", 9.0e6))],
                       "classes": ["T-shirt", "Trouser", "Pullover", "Dress"]})


def _served(make_doc: Callable[..., dict], version: int = 1) -> dict[str, Any]:
    return {**make_doc(model=MODEL, variant=version - 1), "version": version, "environment": ENV, "killed": False,
            "state": "active"}


def _snapshot(make_doc: Callable[..., dict], version: int) -> RuntimePolicy:
    doc = _served(make_doc, version)
    return RuntimePolicy(verify_policy_document(doc, MODEL), doc, "server")


def _logits(n: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=(n, K, C)) * 4).astype(np.float32)


def _uploader(url: str, **kw: Any) -> ShadowUploader:
    kw = {"n_exits": K, "n_classes": C, "retry_initial": 0.01, "retry_max": 0.05, **kw}
    return ShadowUploader(url, MODEL, ENV, TOKEN, **kw)


def _arrays(post: Any) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(post.body), allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}


def _version(post: Any) -> int:
    query = parse_qs(urlsplit(post.path).query)
    assert query["env"] == [ENV]
    return int(query["version"][0])


def _threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(("exitwise-shadow", "exitwise-poll"))]


@pytest.fixture
def no_threads_left() -> Iterator[None]:
    before = set(_threads())
    yield
    assert set(_threads()) <= before, _threads()


def _problem(status: int, detail: str) -> dict[str, Any]:
    return {"type": "urn:exitwise:problem:x", "title": "refused", "status": status, "detail": detail}


# ---------------------------------------------------------------- what is uploaded


def test_uploaded_rows_round_trip_through_the_exit_log_reader(policy_stub: Any, make_doc: Callable[..., dict],
                                                              tmp_path: Path, no_threads_left: None) -> None:
    policy_stub.serve(_served(make_doc, version=3))
    client = PolicyClient(policy_stub.url, MODEL, ENV, TOKEN, cache_dir=False, n_exits=K, n_classes=C)
    assert client.refresh().outcome == "updated" and client.policy.version == 3
    a, b = _logits(5, seed=1), _logits(1, seed=2)[0]  # a batch, then one sample (K, C)
    assert client.record_shadow(a, segments={"capture": ["studio", "phone"] * 2 + ["studio"]},
                                labels=[0, 1, 2, 3, 0], request_ids=["r0", "r1", "r2", "r3", "r4"]) == 5
    assert client.record_shadow(b, segments={"capture": ["phone"]}, labels=[3], request_ids=["r5"]) == 1
    assert client.flush_shadow(timeout=30)
    [post] = policy_stub.posts
    assert urlsplit(post.path).path == f"/v1/models/{MODEL}/shadow" and _version(post) == 3
    headers = {k.lower(): v for k, v in post.headers.items()}
    assert headers["content-type"] == NPZ_MEDIA_TYPE and headers["authorization"] == f"Bearer {TOKEN}"
    path = tmp_path / "shadow.npz"
    path.write_bytes(post.body)
    logs = load_logs(path, CARD)  # the reader the service's side uses: every check it makes passes
    np.testing.assert_array_equal(logs.logits, np.concatenate([a, b[np.newaxis]]))
    assert logs.labels.tolist() == [0, 1, 2, 3, 0, 3]
    assert logs.request_ids.tolist() == ["r0", "r1", "r2", "r3", "r4", "r5"]
    assert logs.segments["capture"].values().tolist() == ["studio", "phone", "studio", "phone", "studio", "phone"]
    assert logs.ts is not None and logs.ts.dtype == np.dtype("datetime64[us]") and (np.diff(logs.ts) >= 0).all()
    counters = client.counters()["shadow"]
    assert (counters["recorded"], counters["uploaded"], counters["batches"], counters["pending"]) == (6, 6, 1, 0)
    client.close()


def test_rows_are_uploaded_per_version_in_batches_of_at_most_batch_rows(
        policy_stub: Any, make_doc: Callable[..., dict], no_threads_left: None) -> None:
    client = PolicyClient(policy_stub.url, MODEL, ENV, TOKEN, cache_dir=False, shadow_batch_rows=4)
    v1, v2 = _snapshot(make_doc, 1), _snapshot(make_doc, 2)
    ids = iter(range(1000))
    recorded: dict[int, list[int]] = {1: [], 2: []}
    for policy, n in ((v1, 5), (v2, 3), (v1, 4), (v2, 2)):
        batch = [next(ids) for _ in range(n)]
        recorded[policy.version].extend(batch)
        client.record_shadow(_logits(n), policy=policy, request_ids=batch)
    client.record_shadow(_logits(2), request_ids=[998, 999])  # the client's own policy: the fallback
    assert client.flush_shadow(timeout=30)
    uploaded: dict[int, list[int]] = {1: [], 2: []}
    for post in policy_stub.posts:
        rows = _arrays(post)["request_id"].tolist()
        assert 1 <= len(rows) <= 4
        uploaded[_version(post)].extend(rows)
    assert uploaded == recorded  # one version per upload, in recording order, nothing lost
    counters = client.counters()["shadow"]
    assert (counters["uploaded"], counters["dropped_fallback"], counters["batches"]) == (14, 2, len(policy_stub.posts))
    client.close()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=st.lists(st.tuples(st.integers(1, 3), st.integers(1, 7), st.booleans()), min_size=1, max_size=8),
       batch_rows=st.integers(1, 8))
def test_any_sequence_of_records_is_uploaded_once_in_order(policy_stub: Any, records: list[tuple[int, int, bool]],
                                                           batch_rows: int) -> None:
    """Versions interleaved, records split across uploads, a request id repeated now and then.

    Per version the uploaded ids are the recorded ones in order, less the repeats that fell in
    the same upload as their first row (dropped and counted: the reader refuses duplicates);
    each row's logits travel with its id.
    """
    up = _uploader(policy_stub.url, max_rows=100, batch_rows=batch_rows)
    start = len(policy_stub.posts)
    recorded: dict[int, list[int]] = {}
    next_id = 0
    for version, n, repeat in records:
        ids = list(range(next_id, next_id + n))
        next_id += n
        if repeat and recorded.get(version):
            ids[-1] = recorded[version][-1]  # the id recorded last under this version, again
        logits = np.broadcast_to(np.asarray(ids, dtype=np.float32)[:, None, None], (n, K, C))
        assert up.record(logits, version=version, request_ids=ids) == n
        recorded.setdefault(version, []).extend(ids)
    assert up.flush(timeout=30)
    got: dict[int, list[int]] = {}
    for post in policy_stub.posts[start:]:
        arrays = _arrays(post)
        rows = arrays["request_id"].tolist()
        assert 1 <= len(rows) <= batch_rows and len(set(rows)) == len(rows)
        np.testing.assert_array_equal(arrays["logits"][:, 0, 0], rows)
        got.setdefault(_version(post), []).extend(rows)
    counters = up.counters()
    up.close()
    assert set(got) == set(recorded)
    for version, rows in got.items():
        left = iter(recorded[version])
        assert all(any(i == r for r in left) for i in rows), "not the recorded order"
        assert set(rows) == set(recorded[version])
    removed = sum(len(recorded[v]) - len(got[v]) for v in got)
    assert counters["dropped_duplicate"] == removed
    assert counters["uploaded"] + removed == counters["recorded"] == sum(n for _, n, _ in records)
    assert counters["pending"] == 0


# ---------------------------------------------------------------- failures: retried, dropped, refused


def test_transient_failures_are_retried_without_losing_rows(policy_stub: Any,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    up = _uploader(policy_stub.url)
    policy_stub.answer_posts((503, _problem(503, "overloaded")),
                             (429, _problem(429, "slow down"), {"Retry-After": "0"}), (500, b"boom"))
    logits = _logits(7)
    assert up.record(logits, version=2) == 7
    assert up.flush(timeout=30)
    assert len(policy_stub.posts) == 4 and len({p.body for p in policy_stub.posts}) == 1  # the same rows each time
    np.testing.assert_array_equal(_arrays(policy_stub.posts[-1])["logits"], logits)
    counters = up.counters()
    assert (counters["retries"], counters["uploaded"], counters["batches"], counters["pending"]) == (3, 7, 1, 0)
    assert up.last_error is None
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "failed" in r.getMessage()]
    assert len(warned) == 1 and "overloaded" in warned[0].getMessage()  # once per streak of failures
    up.close()


def test_an_unreachable_server_keeps_the_rows_until_the_flush_gives_up() -> None:
    up = _uploader("http://127.0.0.1:9", timeout=1.0)  # nothing listens on the discard port
    up.record(_logits(3), version=1)
    assert not up.flush(timeout=0.3)
    counters = up.counters()
    assert counters["pending"] == 3 and counters["retries"] >= 1 and counters["uploaded"] == 0
    assert "ConnectError" in (up.last_error or "")
    up.close(timeout=0.0)
    assert up.counters()["dropped_at_close"] == 3


@pytest.mark.parametrize("status", [400, 404, 409, 415, 422])
def test_a_permanent_refusal_drops_the_batch_and_says_why_once(policy_stub: Any, status: int,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    up = _uploader(policy_stub.url, batch_rows=4)
    policy_stub.answer_posts(*[(status, _problem(status, f"bad logs #{i}")) for i in range(3)])
    up.record(_logits(8), version=5)  # two batches of the same version, both refused
    assert up.flush(timeout=30)  # nothing is left: the refused rows are dropped, not retried
    up.record(_logits(2), version=6)
    assert up.flush(timeout=30)
    counters = up.counters()
    assert (counters["rejected"], counters["retries"], counters["uploaded"], counters["pending"]) == (10, 0, 0, 0)
    assert len(policy_stub.posts) == 3
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "refused" in r.getMessage()]
    assert len(warned) == 2, warned  # once per (status, version)
    assert f"HTTP {status}: bad logs #0" in warned[0] and "version 5" in warned[0] and "version 6" in warned[1]
    assert up.last_error == f"HTTP {status}: bad logs #2"
    up.record(_logits(1), version=5)
    assert up.flush(timeout=30) and up.counters()["uploaded"] == 1 and up.last_error is None
    up.close()


def test_a_body_too_large_is_sent_again_in_smaller_requests(policy_stub: Any) -> None:
    """413: the same rows go again, half as many per request, until the server takes them; one row
    that is still too large is dropped like any refusal."""
    up = _uploader(policy_stub.url, batch_rows=8)
    policy_stub.answer_posts((413, _problem(413, "too large")), (413, _problem(413, "too large")))
    up.record(_logits(8), version=5)
    assert up.flush(timeout=30)
    counters = up.counters()
    assert (counters["resized"], counters["uploaded"], counters["rejected"], counters["pending"]) == (2, 8, 0, 0)
    assert [_rows_of(p.body) for p in policy_stub.posts] == [8, 4, 2, 2, 2, 2]
    assert up.body_rows == 2
    policy_stub.answer_posts((413, _problem(413, "too large")), (413, _problem(413, "too large")))
    up.record(_logits(2), version=5)
    assert up.flush(timeout=30)
    assert (up.counters()["rejected"], up.body_rows) == (1, 1) and up.counters()["uploaded"] == 9
    up.close()


def _rows_of(body: bytes) -> int:
    with np.load(io.BytesIO(body), allow_pickle=False) as npz:
        return int(npz["logits"].shape[0])


@pytest.mark.parametrize("status", [401, 403])
def test_a_refused_token_drops_the_batch_and_logs_an_error(policy_stub: Any, status: int,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    up = _uploader(policy_stub.url)
    policy_stub.answer_posts((status, _problem(status, "needs the author role")))
    up.record(_logits(3), version=1)
    assert up.flush(timeout=30)
    counters = up.counters()
    assert (counters["unauthorized"], counters["rejected"], counters["pending"]) == (3, 0, 0)
    [error] = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert "refused the token" in error and "needs the author role" in error
    up.close()


# ---------------------------------------------------------------- never blocking, bounded, no thread left


def test_recording_never_waits_for_a_hanging_server(policy_stub: Any, no_threads_left: None) -> None:
    policy_stub.post_hold = threading.Event()
    up = _uploader(policy_stub.url, max_rows=20, batch_rows=2, flush_interval=3600, timeout=60)
    up.start()
    up.record(_logits(2), version=1)  # a full batch: the thread uploads it, and the server hangs
    assert policy_stub.post_entered.wait(30)
    kept: list[int] = []
    recorder = threading.Thread(target=lambda: kept.extend(up.record(_logits(1), version=1) for _ in range(50)))
    recorder.start()
    recorder.join(30)  # a liveness bound, not a timing: record would otherwise wait for the server's answer
    assert not recorder.is_alive() and sum(kept) == 18  # 2 in flight + 18 held = max_rows; 32 dropped
    assert len(policy_stub.posts) == 1
    counters = up.counters()
    assert (counters["pending"], counters["dropped_full"]) == (20, 32)
    policy_stub.post_hold.set()
    assert up.flush(timeout=30)
    assert up.counters()["uploaded"] == 20
    up.close()


def test_close_stops_every_thread_even_while_the_server_hangs(policy_stub: Any, make_doc: Callable[..., dict],
                                                              no_threads_left: None) -> None:
    policy_stub.serve(_served(make_doc))
    client = PolicyClient(policy_stub.url, MODEL, ENV, TOKEN, cache_dir=False, timeout=0.5, poll_interval=60,
                          shadow_batch_rows=2, shadow_flush_interval=3600)
    client.start()
    assert any(name.startswith("exitwise-shadow") for name in _threads())
    policy_stub.post_hold = threading.Event()
    client.record_shadow(_logits(2))
    assert policy_stub.post_entered.wait(30)
    client.close(timeout=0.2)  # the request in flight times out; the flush gives up
    assert not any(name.startswith(("exitwise-shadow", "exitwise-poll")) for name in _threads())
    counters = client.counters()["shadow"]
    assert (counters["dropped_at_close"], counters["pending"], counters["uploaded"]) == (2, 0, 0)
    assert client.record_shadow(_logits(1)) == 0 and client.counters()["shadow"]["dropped_disabled"] == 1


def test_the_background_thread_uploads_full_batches_and_stop_flushes_the_rest(
        policy_stub: Any, make_doc: Callable[..., dict], no_threads_left: None) -> None:
    policy_stub.serve(_served(make_doc))
    client = PolicyClient(policy_stub.url, MODEL, ENV, TOKEN, cache_dir=False, poll_interval=60,
                          shadow_batch_rows=3, shadow_flush_interval=3600)
    client.start()
    client.record_shadow(_logits(3))  # a full batch: uploaded by the thread, no flush asked
    assert policy_stub.post_entered.wait(30)
    client.record_shadow(_logits(1))  # less than a batch: waits for the interval, or for stop
    assert client.stop(timeout=30)
    assert [len(_arrays(p)["logits"]) for p in policy_stub.posts] == [3, 1]
    client.close()


def test_less_than_a_batch_is_uploaded_every_flush_interval(policy_stub: Any, no_threads_left: None) -> None:
    up = _uploader(policy_stub.url, batch_rows=100, flush_interval=0.1)
    up.start()
    up.record(_logits(1), version=1)
    assert policy_stub.post_entered.wait(30)  # no flush asked, no full batch: the interval uploads it
    up.record(_logits(2), version=1)
    deadline = time.monotonic() + 30
    while len(policy_stub.posts) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [len(_arrays(p)["logits"]) for p in policy_stub.posts] == [1, 2]
    up.close()


# ---------------------------------------------------------------- the client's counters and status


def test_client_counters_and_status(policy_stub: Any, make_doc: Callable[..., dict]) -> None:
    policy_stub.serve(b"down", status=503, content_type="text/plain")
    client = PolicyClient(policy_stub.url, MODEL, ENV, TOKEN, cache_dir=False, n_exits=K, n_classes=C,
                          fallback_alarm_after=0.0)
    client.refresh()
    rows = _logits(6)
    fallback = client.policy
    assert [fallback.decide(k, rows[:, k]).sum() for k in range(K)] == [0, 0, 6]  # full depth
    assert client.record_shadow(rows) == 0  # the fallback serves no version: nothing to upload under
    st = client.status()
    assert st.source == "fallback" and st.fallback_alarm and st.shadow_pending == 0

    policy_stub.serve(_served(make_doc))
    client.refresh()
    policy = client.policy
    running, exited = np.arange(6), []
    for k in range(K):  # the inference loop: a row stops at the first exit that lets it
        stop = policy.decide(k, rows[running, k], segments=np.array(["studio"] * running.size))
        exited.append(int(stop.sum()))
        running = running[~stop]
    counters = client.counters()
    assert counters["decided"] == {0: 6 + 6, 1: 6 + 6 - exited[0], 2: 6 + 6 - exited[0] - exited[1]}
    assert counters["exited"] == {0: exited[0], 1: exited[1], 2: 6 + exited[2]}
    assert sum(exited) == 6  # every row answered once
    assert counters["shadow"]["dropped_fallback"] == 6 and counters["polls"] == {"unavailable": 1, "updated": 1}

    assert client.record_shadow(rows, policy=fallback) == 0  # a snapshot taken on the fallback stays so
    assert client.record_shadow(rows) == 6
    st = client.status()
    assert (st.source, st.fallback_alarm, st.shadow_pending, st.shadow_last_error) == ("server", False, 6, None)
    policy_stub.answer_posts((422, _problem(422, "logits of another model")))
    assert client.flush_shadow(timeout=30)  # refused for good: dropped, nothing left to send
    st = client.status()
    assert (st.shadow_pending, st.shadow_last_error) == (0, "HTTP 422: logits of another model")
    assert client.counters()["shadow"]["rejected"] == 6
    with pytest.raises(TypeError, match="RuntimePolicy"):
        client.record_shadow(rows, policy=policy.document)  # type: ignore[arg-type]
    client.close()


def test_shadow_upload_off(policy_stub: Any, make_doc: Callable[..., dict], no_threads_left: None) -> None:
    policy_stub.serve(_served(make_doc))
    client = PolicyClient(policy_stub.url, MODEL, ENV, TOKEN, cache_dir=False, poll_interval=60, shadow_upload=False)
    client.start()
    assert not any(name.startswith("exitwise-shadow") for name in _threads())
    assert client.record_shadow(_logits(4)) == 0 and client.counters()["shadow"]["dropped_disabled"] == 4
    with pytest.raises(ValueError, match="exits"):
        client.record_shadow(np.zeros((2, K + 1, C)))  # a caller's mistake is still named
    assert client.flush_shadow(0.0)
    client.close()
    assert policy_stub.posts == []


def test_the_serving_page_shadow_snippet_runs(policy_stub: Any, make_doc: Callable[..., dict]) -> None:
    """docs/serving.md's serve_batch uploads every exit's logits and answers what infer_batch answers."""
    blocks = re.findall(r"```python\n(.*?)```", SERVING.read_text(encoding="utf-8"), flags=re.DOTALL)
    namespace: dict[str, Any] = {}
    for block in blocks:
        tree = ast.parse(block)
        keep = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom | ast.FunctionDef)]
        exec(compile(ast.Module(body=keep, type_ignores=[]), "serving.md", "exec"), namespace)
    assert {"infer_batch", "serve_batch"} <= set(namespace)
    policy_stub.serve({**_served(make_doc), **make_doc(model=MODEL, shadow_rate=1.0)})  # every batch is shadowed
    client = PolicyClient(policy_stub.url, MODEL, ENV, TOKEN, cache_dir=False, n_exits=K, n_classes=C)
    assert client.refresh().outcome == "updated" and client.policy.shadow_rate == 1.0
    rng = np.random.default_rng(3)
    weights = [rng.normal(size=(6, C)) * 2 for _ in range(K)]
    stages = [lambda h, w=w: (h, h @ w) for w in weights]
    x = rng.normal(size=(16, 6))
    segments = np.array(["studio", "phone"] * 8)
    answer, exit_at = namespace["serve_batch"](client, stages, x, segments, np.arange(16))
    expected = namespace["infer_batch"](client, stages, x, segments)
    assert answer.tolist() == expected[0].tolist() and exit_at.tolist() == expected[1].tolist()
    assert len(set(exit_at.tolist())) > 1  # not vacuous: rows stop at different exits
    assert client.flush_shadow(timeout=30)
    [post] = policy_stub.posts
    arrays = _arrays(post)
    np.testing.assert_allclose(arrays["logits"], np.stack([x @ w for w in weights], axis=1), rtol=1e-6)
    assert arrays["seg_capture"].tolist() == segments.tolist() and arrays["request_id"].tolist() == list(range(16))
    client.close()
