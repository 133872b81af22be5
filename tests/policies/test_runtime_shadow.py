"""exitwise.policies.runtime_shadow without a server: what ``record`` accepts, refuses, drops and
counts, the buffer's bound, and the per-exit decision counter. Uploads are tested against a real
loopback server in tests/api/test_runtime_client_shadow.py.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exitwise.calibration.rule import CompiledPolicy
from exitwise.policies.runtime import RuntimePolicy
from exitwise.policies.runtime_shadow import SHADOW_COUNTERS, ShadowUploader
from exitwise.policies.runtime_status import ExitCounter

K, C = 3, 4
NOWHERE = "http://127.0.0.1:9"  # nothing listens: these tests never upload


@pytest.fixture
def uploader() -> Iterator[ShadowUploader]:
    up = ShadowUploader(NOWHERE, "m", "production", "t", max_rows=10, batch_rows=4, n_exits=K, n_classes=C)
    yield up
    up.close(timeout=0.0)


def _logits(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, K, C)).astype(np.float32)


def _balanced(counts: dict[str, int]) -> bool:
    """recorded = uploaded + rejected + unauthorized + dropped_duplicate + dropped_at_close + pending."""
    out = ("uploaded", "rejected", "unauthorized", "dropped_duplicate", "dropped_at_close", "pending")
    return counts["recorded"] == sum(counts[name] for name in out)


def test_the_buffer_is_bounded_drops_new_rows_and_counts_them(uploader: ShadowUploader) -> None:
    assert uploader.record(_logits(6), version=1) == 6
    assert uploader.record(_logits(6), version=2) == 4  # 10 held at most: the last 2 rows are dropped
    held = uploader._groups[(2, False, None, ())][0].logits  # white box: only what is held was copied
    assert held.shape[0] == 4 and (held.base is None or held.base.shape[0] == 4)
    assert uploader.record(_logits(1)[0], version=1) == 0  # one sample, (K, C)
    counts = uploader.counters()
    assert set(SHADOW_COUNTERS) | {"pending"} == set(counts)
    assert (counts["recorded"], counts["dropped_full"], counts["pending"]) == (10, 3, 10)
    assert uploader.pending == 10 and _balanced(counts)
    uploader.close(timeout=0.0)  # nothing can be uploaded (no server): what is held is dropped and counted
    counts = uploader.counters()
    assert (counts["dropped_at_close"], counts["pending"]) == (10, 0) and _balanced(counts)
    assert uploader.record(_logits(2), version=1) == 0 and uploader.counters()["dropped_disabled"] == 2


def test_rows_of_the_fallback_and_with_upload_off_are_dropped_and_counted() -> None:
    off = ShadowUploader(NOWHERE, "m", "production", "t", upload=False)
    assert off.record(_logits(3), version=1) == 0
    assert off.record(_logits(2), version=None) == 0
    counts = off.counters()
    assert (counts["dropped_disabled"], counts["dropped_fallback"], counts["recorded"]) == (3, 2, 0)
    off.start()  # nothing to upload with: no thread
    assert not [t for t in threading.enumerate() if t.name.startswith("exitwise-shadow")]
    assert off.flush(0.0)
    off.close()


def test_non_finite_rows_are_dropped_not_raised(uploader: ShadowUploader) -> None:
    """The service refuses a batch with one non-finite logit; the row is dropped at record time."""
    logits = _logits(5)
    logits[1, 2, 0] = np.nan
    logits[3, 0, 3] = np.inf
    big = _logits(1).astype(np.float64)
    big[0, 0, 0] = 1e300  # finite in float64, infinite in the float32 the logs hold
    assert uploader.record(logits, version=1, request_ids=["a", "b", "c", "d", "e"]) == 3
    assert uploader.record(big, version=1) == 0
    assert (uploader.counters()["dropped_invalid"], uploader.pending) == (3, 3)


def test_record_copies_what_it_keeps(uploader: ShadowUploader) -> None:
    logits = _logits(2)
    ids = np.array([7, 8])
    uploader.record(logits, version=1, request_ids=ids)
    logits[:] = 0.0
    ids[:] = 0
    held = next(iter(uploader._groups.values()))[0]  # white box: what the buffer holds
    np.testing.assert_array_equal(held.logits, _logits(2))
    assert held.ids.tolist() == [7, 8]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"logits": np.zeros((2, 2, K, C))}, r"shape \(K, C\) or \(n, K, C\)"),
    ({"logits": np.zeros((2, K + 1, C))}, "4 exits, this model has 3"),
    ({"logits": np.zeros((2, K, C + 1))}, "5 classes, this model has 4"),
    ({"logits": np.array([[["a"] * C] * K])}, "must be numbers"),
    ({"version": 0}, "positive integer"),
    ({"version": True}, "positive integer"),
    ({"version": "3"}, "positive integer"),
    ({"labels": [0, 1, 2]}, r"shape \(2,\)"),
    ({"labels": [0.0, 1.0]}, "class indices"),
    ({"labels": [0, C]}, "0..3"),
    ({"request_ids": [1]}, r"shape \(2,\)"),
    ({"request_ids": np.array(["a", None], dtype=object)}, "NoneType"),
    ({"segments": {"region": ["eu"]}}, r"segment 'region'.*shape \(2,\)"),
    ({"segments": {"region": ["eu|us", "eu"]}}, r"must not contain '\|'"),
    ({"segments": {"region": [1.5, 2.5]}}, "must be strings"),
    ({"segments": {"a/b": ["x", "y"]}}, "without '/'"),
    ({"segments": {"": ["x", "y"]}}, "non-empty"),
    ({"segments": {1: ["x", "y"]}}, "non-empty"),
    ({"shape": (K, C + 2)}, "expected 3 x 6"),
])
def test_caller_mistakes_raise_and_name_the_argument(uploader: ShadowUploader, kwargs: dict[str, Any],
                                                     message: str) -> None:
    call: dict[str, Any] = {"logits": _logits(2), "version": 1, **kwargs}
    with pytest.raises(ValueError, match=message):
        uploader.record(call.pop("logits"), **call)
    assert uploader.counters()["recorded"] == 0 and uploader.pending == 0


def test_the_first_batch_fixes_the_shape_when_none_is_configured() -> None:
    up = ShadowUploader(NOWHERE, "m", "production", None)
    assert up.record(_logits(2), version=1) == 2
    with pytest.raises(ValueError, match="expected 3 x 4"):
        up.record(np.zeros((1, K, C + 1)), version=1)
    with pytest.raises(ValueError, match="expected 3 x 5"):
        up.record(np.zeros((1, K, C)), version=None, shape=(K, C + 1))  # validated even when dropped
    up.close(timeout=0.0)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"max_rows": 0}, "max_rows"), ({"batch_rows": 1.5}, "batch_rows"), ({"max_rows": 5, "batch_rows": 6}, "exceed"),
    ({"flush_interval": 0}, "flush_interval"), ({"retry_initial": 2.0, "retry_max": 1.0}, "retry_max"),
])
def test_bad_settings_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ShadowUploader(NOWHERE, "m", "production", None, **kwargs)


# ---------------------------------------------------------------- decisions per exit


def _doc() -> dict[str, Any]:
    return {"exits": [{"name": f"e{k}", "cost": float(k + 1), "calibrator": {"type": "identity"}} for k in range(K)],
            "classes": [f"c{j}" for j in range(C)], "score": "max_prob", "segment_keys": [],
            "thresholds": {"default": [[0.6] * C for _ in range(K - 1)]}, "forced_full_depth": {}}


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, K - 1), st.integers(0, 30), st.integers(0, 2**31)), max_size=12))
def test_decide_counts_rows_decided_and_stopped_per_exit(calls: list[tuple[int, int, int]]) -> None:
    counts = ExitCounter()
    policy = RuntimePolicy(CompiledPolicy.from_document(_doc()), _doc(), "server", _counts=counts)
    decided: dict[int, int] = {}
    stopped: dict[int, int] = {}
    for k, n, seed in calls:
        mask = policy.decide(k, np.random.default_rng(seed).normal(size=(n, C)) * 3)
        decided[k] = decided.get(k, 0) + n
        stopped[k] = stopped.get(k, 0) + int(mask.sum())
    assert counts.snapshot() == (dict(sorted(decided.items())), dict(sorted(stopped.items())))
    last = decided.get(K - 1)
    assert last is None or counts.snapshot()[1][K - 1] == last  # every row reaching the last exit stops there


def test_the_exit_counter_loses_nothing_across_threads() -> None:
    counts = ExitCounter()
    fallback = RuntimePolicy.full_depth(n_exits=K, counts=counts)
    rows = np.zeros((5, C))

    def work() -> None:
        for i in range(2000):
            fallback.decide(i % K, rows)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    decided, exited = counts.snapshot()
    per_exit = [4 * 5 * len(range(k, 2000, K)) for k in range(K)]
    assert decided == dict(enumerate(per_exit))
    assert exited == {0: 0, 1: 0, 2: per_exit[2]}  # the fallback stops only at the last exit
