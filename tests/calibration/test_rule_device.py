"""The decision rule on torch tensors (and array-API arrays) against the numpy reference.

numpy is the reference the solver and the certification use; a tensor must get the same
decisions (scores equal to ~1e-12: float64 arithmetic in another library's kernels) as a bool
tensor on its own device. Runs on every device this machine has (CPU always; CUDA and MPS when
present). torch is an optional test dependency: without it this module is skipped.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exitwise.calibration.arrays import NUMPY, ArrayAPINamespace, TorchNamespace, namespace
from exitwise.calibration.buckets import encode_bucket_map
from exitwise.calibration.rule import CompiledPolicy, _exit_mask, _exit_scores, decide, exit_mask, exit_scores
from exitwise.calibration.topk import dense_topk, topk_exit_scores
from exitwise.policies.runtime import RuntimePolicy

torch = pytest.importorskip("torch")

DEVICES = ["cpu"]
if torch.cuda.is_available():
    DEVICES.append("cuda")
if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
    DEVICES.append("mps")
SCORES = ("max_prob", "margin", "entropy")
CALIBRATORS = ({"type": "identity"}, {"type": "temperature", "temperature": 0.6},
               {"type": "temperature", "temperature": 2.5},
               {"type": "platt", "coef": [0.9, 1.4, -0.6], "intercept": 0.3})


def _tol(device: str, cal: dict | None = None, vals: np.ndarray | None = None, lse: np.ndarray | None = None
         ) -> float | np.ndarray:
    """How far a library's scores may be from numpy's.

    float64: 1e-12. Top-k scores (``vals``, ``lse``) at T != 1 depend on the tail mass
    m = 1 - sum(exp(vals - lse)), whose absolute rounding error (~1e-16: the libraries'
    log-sum-exp differ in the last bits) is amplified by 1/(T m); each row gets that share of
    slack. A device without float64 (MPS, or ``_Float32Torch`` here) computes in float32: 1e-4,
    and the tail mass is known to ~1e-7 only.
    """
    f32 = device in ("mps", "float32")
    base, eps = (1e-4, 2e-6) if f32 else (1e-12, 1e-15)
    if vals is None or lse is None or cal is None or cal["type"] != "temperature":
        return base
    m = np.clip(1.0 - np.exp(vals - lse[:, None]).sum(axis=1), 1e-300, 1.0)
    return base + eps * (1 if f32 else vals.shape[1] + 1) / (float(cal["temperature"]) * m)


class _Float32Torch(TorchNamespace):
    """torch as on a device without float64 (Apple MPS), which this machine does not have."""

    def float_dtype(self, like: torch.Tensor) -> torch.dtype:
        return torch.float32


def _tensor(x: np.ndarray, device: str) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).to(device)


def _classification_doc(seed: int, k: int, c: int, score: str, cal: dict) -> dict:
    rng = np.random.default_rng(seed)

    def rows() -> list:
        return [None if rng.random() < 0.15 else [None if rng.random() < 0.1 else float(t)
                                                  for t in rng.uniform(0.0, 1.0, size=c)] for _ in range(k - 1)]

    return {
        "exits": [{"name": f"e{i}", "cost": float(i + 1), "calibrator": cal} for i in range(k)],
        "classes": [f"c{i}" for i in range(c)],
        "score": score,
        "segment_keys": ["region"],
        "thresholds": {"default": rows(), "eu": rows(), "us": rows()},
        "forced_full_depth": {"classes": ["c1"] if c > 2 else [], "segments": ["apac"]},
    }


def _vocab_doc(seed: int, v: int, n_buckets: int, top_k: int, score: str, cal: dict) -> dict:
    rng = np.random.default_rng(seed)
    doc = _classification_doc(seed, 3, n_buckets, score, cal)
    doc["classes"] = [f"bucket{b}" for b in range(n_buckets)]
    doc["forced_full_depth"]["classes"] = ["bucket1"] if n_buckets > 2 else []
    doc["vocabulary"] = {"size": v, "top_k": top_k,
                         "bucket_of": encode_bucket_map(rng.integers(0, n_buckets, size=v).astype(np.uint8))}
    return doc


def _logits(seed: int, n: int, c: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed + 1)
    x = (rng.normal(size=(n, c)) * rng.uniform(0.3, 6.0)).astype(np.float32)
    x[: n // 4] = np.round(x[: n // 4])  # ties
    return x, rng.choice(["eu", "us", "apac", "unseen"], size=n)


def _assert_same_decisions(policy: CompiledPolicy, x: np.ndarray, segs: np.ndarray, device: str) -> None:
    t = _tensor(x, device)
    for k in range(policy.n_exits):
        want = decide(policy, k, x, segs)
        got = decide(policy, k, t, segs)
        assert isinstance(got, torch.Tensor) and got.dtype == torch.bool and got.device == t.device
        assert got.shape == (x.shape[0],)
        np.testing.assert_array_equal(got.cpu().numpy(), want, err_msg=f"exit {k}")


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(2, 4), c=st.integers(1, 12),
       score=st.sampled_from(SCORES), cal=st.sampled_from(CALIBRATORS))
def test_classification_decisions_and_scores_equal_numpy(device: str, seed: int, k: int, c: int, score: str,
                                                         cal: dict) -> None:
    policy = CompiledPolicy.from_document(_classification_doc(seed, k, c, score, cal))
    x, segs = _logits(seed, 64, c)
    _assert_same_decisions(policy, x, segs, device)
    want, want_pred = exit_scores(x, cal, score)
    got, got_pred = exit_scores(_tensor(x, device), cal, score)
    np.testing.assert_allclose(got.cpu().numpy(), want, rtol=0, atol=_tol(device))
    np.testing.assert_array_equal(got_pred.cpu().numpy(), want_pred)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), v=st.integers(2, 3000), n_buckets=st.integers(1, 5), data=st.data(),
       score=st.sampled_from(SCORES), cal=st.sampled_from(CALIBRATORS))
def test_vocabulary_decisions_and_scores_equal_numpy(device: str, seed: int, v: int, n_buckets: int,
                                                     data: st.DataObject, score: str, cal: dict) -> None:
    top_k = data.draw(st.integers(1, min(v, 64)), label="top_k")
    policy = CompiledPolicy.from_document(_vocab_doc(seed, v, n_buckets, top_k, score, cal))
    x, segs = _logits(seed, 40, v)
    _assert_same_decisions(policy, x, segs, device)
    want, want_pred = exit_scores(x, cal, score, top_k)
    got, got_pred = exit_scores(_tensor(x, device), cal, score, top_k)
    vals, _, lse = dense_topk(x, top_k)
    assert np.all(np.abs(got.cpu().numpy() - want) <= _tol(device, cal, vals, lse))
    np.testing.assert_array_equal(got_pred.cpu().numpy(), want_pred)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), v=st.integers(2, 200), ties=st.booleans(), data=st.data())
def test_dense_topk_and_topk_scores_equal_numpy(device: str, seed: int, v: int, ties: bool,
                                                data: st.DataObject) -> None:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 3, size=(20, v)).astype(np.float64) if ties else rng.normal(size=(20, v)) * 4
    k = data.draw(st.integers(1, v), label="k")
    vals, ids, lse = dense_topk(x, k)
    t_vals, t_ids, t_lse = dense_topk(_tensor(x, device), k)
    np.testing.assert_array_equal(t_ids.cpu().numpy(), ids)  # the same canonical ids, ties included
    np.testing.assert_array_equal(t_vals.cpu().numpy(), vals)
    np.testing.assert_allclose(t_lse.cpu().numpy(), lse, rtol=0, atol=_tol(device))
    for cal in CALIBRATORS:
        for score in SCORES:
            want = topk_exit_scores(vals, lse, v, cal, score)
            got = topk_exit_scores(t_vals, t_lse, v, cal, score)
            assert isinstance(got, torch.Tensor) and got.device == t_vals.device
            assert np.all(np.abs(got.cpu().numpy() - want) <= _tol(device, cal, vals, lse)), (cal, score)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), v=st.integers(2, 500), data=st.data(), score=st.sampled_from(SCORES),
       cal=st.sampled_from(CALIBRATORS))
def test_without_float64_the_rule_runs_in_float32(seed: int, v: int, data: st.DataObject, score: str,
                                                  cal: dict) -> None:
    """The float32 fallback (MPS) on CPU: float32 results, no NaN, near the numpy scores, and the
    policy's thresholds copied in float32."""
    ns = _Float32Torch(torch)
    top_k = data.draw(st.one_of(st.none(), st.integers(1, min(v, 64))), label="top_k")
    x, _ = _logits(seed, 40, v)
    want, want_pred = exit_scores(x, cal, score, top_k)
    got, got_pred = _exit_scores(ns, torch.from_numpy(x), cal, score, top_k)
    assert got.dtype == torch.float32 and not torch.isnan(got).any()
    vals, lse = dense_topk(x, top_k)[::2] if top_k is not None else (None, None)
    assert np.all(np.abs(got.numpy().astype(np.float64) - want) <= _tol("float32", cal, vals, lse))
    np.testing.assert_array_equal(got_pred.numpy(), want_pred)
    policy = CompiledPolicy.from_document(_classification_doc(seed, 3, 4, score, cal))
    assert policy.arrays(ns, got).thresholds.dtype == torch.float32


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_any_float_dtype_decides_like_numpy_on_the_same_values(dtype: str) -> None:
    policy = CompiledPolicy.from_document(_classification_doc(7, 3, 10, "entropy", CALIBRATORS[1]))
    x, segs = _logits(7, 50, 10)
    t = torch.from_numpy(x).to(getattr(torch, dtype))
    same_values = t.to(torch.float64).numpy()  # what the tensor holds, exactly
    np.testing.assert_array_equal(decide(policy, 0, t, segs).numpy(), decide(policy, 0, same_values, segs))


def test_tensors_requiring_grad_and_strided_views_are_accepted() -> None:
    policy = CompiledPolicy.from_document(_classification_doc(3, 3, 6, "margin", CALIBRATORS[3]))
    x, segs = _logits(3, 30, 6)
    t = torch.from_numpy(np.ascontiguousarray(x.T)).T.requires_grad_(True)  # a transposed view
    assert not t.is_contiguous()
    got = decide(policy, 0, t, segs)
    assert not got.requires_grad
    np.testing.assert_array_equal(got.numpy(), decide(policy, 0, x, segs))


def test_killed_past_max_exit_and_last_exit_return_tensors() -> None:
    doc = _classification_doc(1, 4, 3, "max_prob", CALIBRATORS[0]) | {"max_exit": 1}
    x = torch.zeros(5, 3)
    assert decide(CompiledPolicy.from_document(doc), 3, x).tolist() == [True] * 5
    assert decide(CompiledPolicy.from_document(doc), 2, x).tolist() == [False] * 5
    killed = CompiledPolicy.from_document(doc | {"killed": True})
    assert decide(killed, 0, x).dtype == torch.bool and not decide(killed, 0, x).any()
    with pytest.raises(ValueError, match=r"shape \(n, 3\), got \(5,\)"):
        decide(killed, 0, torch.zeros(5))


def test_runtime_policy_decides_tensors_and_counts_them() -> None:
    doc = _classification_doc(5, 3, 4, "max_prob", CALIBRATORS[1])
    policy = RuntimePolicy(compiled=CompiledPolicy.from_document(doc), document=doc, source="server")
    x, segs = _logits(5, 40, 4)
    got = policy.decide(0, torch.from_numpy(x), segs)
    want = policy.decide(0, x, segs)
    assert isinstance(got, torch.Tensor) and isinstance(want, np.ndarray)
    np.testing.assert_array_equal(got.numpy(), want)
    decided, exited = policy._counts.snapshot()
    assert decided == {0: 80} and exited == {0: 2 * int(want.sum())}


def test_fallback_returns_tensor_masks_of_the_inputs_kind() -> None:
    fallback = RuntimePolicy.full_depth(n_exits=3)
    x = torch.randn(6, 4, dtype=torch.float16)
    early, last = fallback.decide(0, x), fallback.decide(2, x)
    assert early.dtype == last.dtype == torch.bool and early.device == x.device
    assert early.tolist() == [False] * 6 and last.tolist() == [True] * 6
    assert fallback._counts.snapshot() == ({0: 6, 2: 6}, {0: 0, 2: 6})
    with pytest.raises(ValueError, match=r"shape \(n, C\), got \(6,\)"):
        fallback.decide(0, torch.zeros(6))


def test_policy_arrays_are_copied_to_a_device_once() -> None:
    policy = CompiledPolicy.from_document(_classification_doc(2, 3, 4, "max_prob", CALIBRATORS[0]))
    ns = namespace(torch.zeros(1))
    first = policy.arrays(ns, torch.zeros(1))
    assert policy.arrays(ns, torch.ones(3)) is first
    assert first.thresholds.dtype == torch.float64
    np.testing.assert_array_equal(first.thresholds.numpy(), policy.thresholds)
    assert policy.arrays(NUMPY, np.zeros(1)).thresholds is policy.thresholds


def test_namespace_of_arrays() -> None:
    for x in (np.zeros(2), [1.0, 2.0], (1.0,), np.float64(1.0)):
        assert namespace(x) is NUMPY
        assert (namespace(x).name, namespace(x).xp) == ("numpy", np)
    ns = namespace(torch.zeros(2))
    assert (ns.name, ns.xp) == ("torch", torch)
    assert namespace(torch.nn.Parameter(torch.zeros(2))) is ns


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), c=st.integers(1, 50), score=st.sampled_from(SCORES),
       cal=st.sampled_from(CALIBRATORS), top_k=st.one_of(st.none(), st.integers(1, 50)))
def test_the_standard_array_api_path_equals_numpy(seed: int, c: int, score: str, cal: dict,
                                                  top_k: int | None) -> None:
    """The path for libraries with ``__array_namespace__`` (CuPy, JAX, ...), run on numpy's own
    standard namespace, gives the numpy path's scores and decisions."""
    if top_k is not None:
        top_k = min(top_k, c)
        if c < 2:
            return
    api = ArrayAPINamespace(np)
    x, segs = _logits(seed, 32, c)
    want, want_pred = exit_scores(x, cal, score, top_k)
    got, got_pred = _exit_scores(api, x, cal, score, top_k)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(got_pred, want_pred)
    policy = CompiledPolicy.from_document(_classification_doc(seed, 3, c, score, cal))
    codes = policy.segment_codes(segs, 32)
    np.testing.assert_array_equal(_exit_mask(api, policy.arrays(api, x), 0, want, want_pred, codes),
                                  exit_mask(policy, 0, want, want_pred, codes))
    if c >= 2:
        np.testing.assert_array_equal(api.topk(x, min(c, 3))[1], dense_topk(x, min(c, 3))[1])


def test_the_runtime_client_does_not_import_torch() -> None:
    code = ("import sys, numpy as np, exitwise.policies.runtime as r, exitwise.calibration.rule as rule\n"
            "rule.decide(rule.CompiledPolicy.from_document({'exits': [{'name': 'a', 'cost': 1}, {'name': 'b', "
            "'cost': 2}], 'classes': ['x', 'y'], 'thresholds': {'default': [[0.5, 0.5]]}}), 0, np.zeros((2, 2)))\n"
            "assert 'torch' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)
