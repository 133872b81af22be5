"""The one decision rule (design contract, "Scores and the decision rule").

At exit k < K-1, for a sample with segment value s:

1. p = calibrated probabilities of exit k; c = argmax of the exit's logits
   (calibration never changes the answer, only the confidence in it).
2. score = p[c] (``max_prob``), p[c] - max_{j != c} p[j] (``margin``), or
   1 - H(p) / log C (``entropy``, normalised entropy).
3. tau = thresholds[s][k][b(c)], falling back to ``default`` for an unknown segment;
   NaN (``null`` in JSON) means "never exit here".
4. Exit iff score >= tau, the policy is not killed, k <= max_exit, c is not a
   forced-full-depth class and s is not a forced-full-depth segment.

For a language model's large vocabulary (``vocabulary`` in the document) b(c) is the token's
bucket and the scores come from the exit's top-k and log-sum-exp
(:mod:`exitwise.calibration.topk`); for a classifier b(c) = c. The last exit always answers.
This module is imported by the solver, the evaluator, the MLflow model and the runtime client,
so it depends on numpy and the standard library only. The formulas are written once against an
array :class:`~exitwise.calibration.arrays.Namespace`: numpy (the same calls and bits as the
solver's) or, at the runtime, a torch tensor on its device, without torch being a dependency.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from exitwise.calibration.arrays import NUMPY, Namespace, namespace
from exitwise.calibration.buckets import decode_bucket_map
from exitwise.calibration.topk import dense_exit_scores

SCORES = ("max_prob", "margin", "entropy")
CALIBRATORS = ("identity", "temperature", "platt")
SEGMENT_SEPARATOR = "|"
_CHUNK_ELEMENTS = 1 << 22  # rows x classes processed at once, bounds temporary memory


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature`` in float64, stable for large logits."""
    return _softmax(NUMPY, logits, temperature)


def _softmax(o: Namespace, logits: Any, temperature: float = 1.0) -> Any:
    z = o.to_float(logits) / float(temperature)
    z = z - o.amax(z, axis=-1, keepdims=True)
    z = o.iexp(z)
    z /= o.sum(z, axis=-1, keepdims=True)
    return z


def platt_features(probs: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Confidence features of one exit for Platt scaling, shape (n, 3).

    phi = [logit(p_c), p_c - p_(2), 1 - H(p)/log C] with p the uncalibrated softmax,
    c the predicted class and p_(2) the runner-up probability.
    """
    return _platt_features(NUMPY, probs, pred)


def _platt_features(o: Namespace, probs: Any, pred: Any) -> Any:
    top = o.take_rows(probs, pred)
    eps = 1e-12
    top_c = o.clip(top, eps, 1.0 - eps)
    logit = o.log(top_c) - o.log1p(-top_c)
    runner = _runner_up(o, probs, pred)
    ent = _normalised_confidence(o, probs)
    return o.stack([logit, top - runner, ent], axis=1)


def _runner_up(o: Namespace, probs: Any, pred: Any) -> Any:
    if probs.shape[1] < 2:
        return o.zeros(probs.shape[0], like=probs)
    return o.max_excluding(probs, pred)


def _normalised_confidence(o: Namespace, probs: Any) -> Any:
    """1 - H(p)/log C, in [0, 1]; 1 for a one-hot p, 0 for the uniform p."""
    c = probs.shape[1]
    if c < 2:
        return o.ones(probs.shape[0], like=probs)
    with o.errstate(divide="ignore", invalid="ignore"):
        plogp = o.where(probs > 0, probs * o.log(probs), 0.0)
    return 1.0 + o.sum(plogp, axis=1) / float(np.log(c))


def calibrated_probs(logits: np.ndarray, calibrator: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated probabilities (n, C) float64 and the predicted class (n,) of one exit.

    ``calibrator`` is the policy document's calibrator object: ``{"type": "identity"}``,
    ``{"type": "temperature", "temperature": T}`` or
    ``{"type": "platt", "coef": [w1, w2, w3], "intercept": b}``. For Platt the answer's
    probability is sigmoid(w . phi + b) and the rest is shared in proportion to the
    uncalibrated probabilities of the other classes.
    """
    return _calibrated_probs(NUMPY, logits, calibrator)


def _calibrated_probs(o: Namespace, logits: Any, calibrator: Mapping[str, Any]) -> tuple[Any, Any]:
    kind = calibrator.get("type")
    pred = o.argmax(logits, axis=1)
    if kind == "identity":
        return _softmax(o, logits), pred
    if kind == "temperature":
        return _softmax(o, logits, float(calibrator["temperature"])), pred
    if kind == "platt":
        q = _softmax(o, logits)
        phi = _platt_features(o, q, pred)
        conf = 1.0 / (1.0 + o.exp(-(o.lincomb(phi, calibrator["coef"]) + float(calibrator["intercept"]))))
        qc = o.take_rows(q, pred)
        rest = o.where(qc < 1.0, (1.0 - conf) / o.maximum(1.0 - qc, 1e-300), 0.0)
        p = q * rest[:, None]
        return o.put_rows(p, pred, conf), pred
    raise ValueError(f"unknown calibrator type {kind!r}; expected one of {CALIBRATORS}")


def score_from_probs(probs: np.ndarray, pred: np.ndarray, score: str) -> np.ndarray:
    """The exit score of each row from calibrated probabilities (see module docstring)."""
    return _score_from_probs(NUMPY, probs, pred, score)


def _score_from_probs(o: Namespace, probs: Any, pred: Any, score: str) -> Any:
    if score == "max_prob":
        return o.take_rows(probs, pred)
    if score == "margin":
        return o.take_rows(probs, pred) - _runner_up(o, probs, pred)
    if score == "entropy":
        return _normalised_confidence(o, probs)
    raise ValueError(f"unknown score {score!r}; expected one of {SCORES}")


def exit_scores(
    logits: Any, calibrator: Mapping[str, Any], score: str, top_k: int | None = None
) -> tuple[Any, Any]:
    """Score (n,) float64 and predicted class (n,) int64 of one exit, in bounded-memory chunks.

    This is the only function that computes scores for decisions (solver, evaluator, MLflow
    model and runtime client all come through here), so every caller gets the same bits.
    With ``top_k`` (a large-vocabulary policy) the score is computed from the row's top-k and
    log-sum-exp, exactly as the solver computed it from token-level logs. ``logits`` is a numpy
    array (numpy results) or another library's array, e.g. a torch tensor (results of that
    library on its device; float32 where the device has no float64, see
    :mod:`exitwise.calibration.arrays`).
    """
    o = namespace(logits)
    return _exit_scores(o, o.prepare(logits), calibrator, score, top_k)


def _exit_scores(o: Namespace, logits: Any, calibrator: Mapping[str, Any], score: str, top_k: int | None
                 ) -> tuple[Any, Any]:
    n, c = logits.shape
    if score not in SCORES:
        raise ValueError(f"unknown score {score!r}; expected one of {SCORES}")
    scores = o.empty_float(n, logits)
    preds = o.empty_int(n, logits)
    step = max(1, _CHUNK_ELEMENTS // max(c, 1))
    for start in range(0, n, step):
        sl = slice(start, min(n, start + step))
        if top_k is None:
            scores[sl], preds[sl] = _chunk_scores(o, logits[sl], calibrator, score)
        else:
            scores[sl], preds[sl] = dense_exit_scores(o, logits[sl], top_k, calibrator, score)
    return scores, preds


def _chunk_scores(o: Namespace, logits: Any, calibrator: Mapping[str, Any], score: str) -> tuple[Any, Any]:
    """Scores of one chunk from e = exp(z), z = logits/T - max(logits/T), S = sum(e).

    e[c] == 1 exactly, so p[c] = 1/S and the margin is (1 - e_(2))/S; the normalised
    confidence uses H(p) = log S - sum(e * z)/S (one exp per entry, one log per row). Platt's
    features come from the same e and S. Only Platt with margin/entropy scores needs the full
    calibrated distribution.
    """
    kind = calibrator.get("type")
    if kind not in CALIBRATORS:
        raise ValueError(f"unknown calibrator type {kind!r}; expected one of {CALIBRATORS}")
    if kind == "platt" and score != "max_prob":
        p, pred = _calibrated_probs(o, logits, calibrator)
        return _score_from_probs(o, p, pred, score), pred
    t = float(calibrator["temperature"]) if kind == "temperature" else 1.0
    pred = o.argmax(logits, axis=1)
    z = o.to_float(logits) / t
    z -= o.amax(z, axis=1, keepdims=True)
    e = o.exp(z)
    total = o.sum(e, axis=1)
    n, c = e.shape
    if kind != "platt" and score == "max_prob":
        return 1.0 / total, pred
    second = o.second_largest(e) if c > 1 else o.zeros(n, like=e)
    if kind != "platt" and score == "margin":
        return (1.0 - second) / total, pred
    if c > 1:
        conf = 1.0 - (o.log(total) - o.rowdot(e, z) / total) / float(np.log(c))
    else:
        conf = o.ones(n, like=e)
    if kind != "platt":
        return conf, pred
    top = 1.0 / total
    top_c = o.clip(top, 1e-12, 1.0 - 1e-12)
    phi = o.stack([o.log(top_c) - o.log1p(-top_c), top - second / total, conf], axis=1)
    return 1.0 / (1.0 + o.exp(-(o.lincomb(phi, calibrator["coef"]) + float(calibrator["intercept"])))), pred


@dataclass(frozen=True, eq=False)
class RuleArrays:
    """A policy's arrays as one array library holds them on one device (None: nothing forced)."""

    thresholds: Any
    forced_classes: Any
    forced_segments: Any
    class_bucket: Any


@dataclass(frozen=True, eq=False)
class CompiledPolicy:
    """A policy document turned into arrays for the decision rule.

    ``thresholds`` has shape (S + 1, K - 1, C); row 0 is ``default`` and row i > 0 the
    segment whose value maps to i in ``segment_index``; NaN means never exit. For a
    large-vocabulary policy the C columns are token buckets: ``class_bucket`` (V,) maps a token
    id to its column and ``top_k`` is the width the scores are computed from.
    """

    thresholds: np.ndarray
    segment_index: Mapping[str, int]
    forced_classes: np.ndarray
    forced_segments: np.ndarray
    max_exit: int
    killed: bool
    calibrators: tuple[Mapping[str, Any], ...]
    score: str
    segment_keys: tuple[str, ...]
    class_bucket: np.ndarray | None = None
    top_k: int | None = None
    # copies of the small arrays on the devices decisions ran on, made once per (library, device, dtype)
    _on_device: dict[Hashable, RuleArrays] = field(default_factory=dict, init=False, compare=False, repr=False)

    @property
    def n_exits(self) -> int:
        return int(self.thresholds.shape[1]) + 1

    @property
    def n_classes(self) -> int:
        """Columns of the threshold table: classes, or token buckets of a vocabulary."""
        return int(self.thresholds.shape[2])

    @property
    def n_outputs(self) -> int:
        """Logits per row an exit gives: the classes, or the vocabulary size."""
        return self.n_classes if self.class_bucket is None else int(self.class_bucket.shape[0])

    def columns(self, preds: np.ndarray) -> np.ndarray:
        """The threshold-table column of each predicted class (its bucket for a vocabulary)."""
        return preds if self.class_bucket is None else self.class_bucket[preds]

    def arrays(self, o: Namespace, like: Any) -> RuleArrays:
        """The rule's arrays in namespace ``o`` on ``like``'s device (thresholds in its float dtype).

        numpy: the policy's own arrays. Elsewhere they are copied to the device once and kept
        (a GPU decision does not move the policy every call), so treat a compiled policy's
        arrays as immutable.
        """
        if o is NUMPY:
            got = self._on_device.get("numpy")
            if got is None:  # the same array objects: nothing to go stale
                got = self._on_device["numpy"] = RuleArrays(self.thresholds, self.forced_classes,
                                                            self.forced_segments, self.class_bucket)
            return got
        key = (o.name, o.device_key(like), str(o.float_dtype(like)))
        got = self._on_device.get(key)
        if got is None:
            bucket = self.class_bucket
            got = RuleArrays(
                thresholds=o.from_host(self.thresholds, like, floating=True),
                forced_classes=o.from_host(self.forced_classes, like) if self.forced_classes.any() else None,
                forced_segments=o.from_host(self.forced_segments, like) if self.forced_segments.any() else None,
                class_bucket=None if bucket is None else o.from_host(bucket, like),
            )
            self._on_device[key] = got
        return got

    @classmethod
    def from_document(cls, doc: Mapping[str, Any]) -> CompiledPolicy:
        """Compile a policy document (a parsed JSON object); raises ValueError if malformed."""
        exits = doc["exits"]
        k = len(exits)
        classes = list(doc["classes"])
        c = len(classes)
        score = doc.get("score", "max_prob")
        if score not in SCORES:
            raise ValueError(f"policy: unknown score {score!r}")
        table = doc["thresholds"]
        forced = doc.get("forced_full_depth") or {}
        forced_segs = list(forced.get("segments") or [])
        names = [key for key in table if key != "default"]
        names += [s for s in forced_segs if s not in table]
        index = {name: i + 1 for i, name in enumerate(names)}
        default = _threshold_rows(table["default"], k, c, "default")
        thr = np.empty((len(names) + 1, k - 1, c), dtype=np.float64)
        thr[0] = default
        for name, i in index.items():
            thr[i] = _threshold_rows(table[name], k, c, name) if name in table else default
        fc = np.zeros(c, dtype=bool)
        pos = {name: i for i, name in enumerate(classes)}
        for name in forced.get("classes") or []:
            if name not in pos:
                raise ValueError(f"policy: forced_full_depth class {name!r} is not one of the classes")
            fc[pos[name]] = True
        fs = np.zeros(len(names) + 1, dtype=bool)
        for name in forced_segs:
            fs[index[name]] = True
        max_exit = doc.get("max_exit")
        bucket, top_k = _vocabulary(doc.get("vocabulary"), c)
        return cls(
            thresholds=thr,
            segment_index=index,
            forced_classes=fc,
            forced_segments=fs,
            max_exit=k - 1 if max_exit is None else int(max_exit),
            killed=bool(doc.get("killed", False)),
            calibrators=tuple(e.get("calibrator") or {"type": "identity"} for e in exits),
            score=score,
            segment_keys=tuple(doc.get("segment_keys") or ()),
            class_bucket=bucket,
            top_k=top_k,
        )

    def segment_codes(self, segments: Sequence[str] | np.ndarray | None, n: int) -> np.ndarray:
        """Row index into ``thresholds`` for each sample's segment value (0 = default)."""
        if segments is None:
            return np.zeros(n, dtype=np.intp)
        values = np.asarray(segments, dtype=object)
        if values.shape != (n,):
            raise ValueError(f"segments must have one value per sample ({n}), got shape {values.shape}")
        if not self.segment_index:
            return np.zeros(n, dtype=np.intp)
        get = self.segment_index.get
        return np.fromiter((get(v, 0) for v in values), dtype=np.intp, count=n)


def _vocabulary(vocab: Any, n_buckets: int) -> tuple[np.ndarray | None, int | None]:
    """The token-to-bucket map and top-k width of a document's ``vocabulary`` (None: a classifier)."""
    if vocab is None:
        return None, None
    if not isinstance(vocab, Mapping):
        raise ValueError("policy: vocabulary must be an object {size, top_k, bucket_of}")
    size, top_k = vocab.get("size"), vocab.get("top_k")
    for name, value in (("size", size), ("top_k", top_k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"policy: vocabulary.{name} must be a positive integer, got {value!r}")
    if not 2 <= size <= 1 << 22 or top_k > size:
        raise ValueError(f"policy: vocabulary.size {size} must be in 2..{1 << 22} and top_k {top_k} at most size")
    return decode_bucket_map(vocab.get("bucket_of"), size, n_buckets), int(top_k)


def _threshold_rows(rows: Any, k: int, c: int, where: str) -> np.ndarray:
    if rows is None:
        return np.full((k - 1, c), np.nan)
    if len(rows) != k - 1:
        raise ValueError(f"policy: thresholds[{where!r}] must have {k - 1} rows (one per early exit), got {len(rows)}")
    out = np.full((k - 1, c), np.nan)
    for j, row in enumerate(rows):
        if row is None:
            continue
        if len(row) != c:
            raise ValueError(f"policy: thresholds[{where!r}][{j}] must have {c} entries, got {len(row)}")
        out[j] = [np.nan if v is None else float(v) for v in row]
    return out


def exit_mask(policy: CompiledPolicy, k: int, scores: Any, preds: Any, seg_codes: Any) -> Any:
    """Steps 3-4 of the rule: which samples exit at exit ``k`` given their scores.

    numpy arrays, or another library's on one device (``seg_codes`` may be a host array then).
    """
    o = namespace(scores)
    n = scores.shape[0]
    if k >= policy.n_exits - 1:
        return o.full_bool(n, True, scores)
    if policy.killed or k > policy.max_exit:
        return o.full_bool(n, False, scores)
    if o is not NUMPY and namespace(seg_codes) is NUMPY:
        seg_codes = o.from_host(np.asarray(seg_codes), scores)
    return _exit_mask(o, policy.arrays(o, scores), k, scores, preds, seg_codes)


def _exit_mask(o: Namespace, arr: RuleArrays, k: int, scores: Any, preds: Any, seg_codes: Any) -> Any:
    cols = preds if arr.class_bucket is None else o.take(arr.class_bucket, preds)
    tau = o.lookup(arr.thresholds, seg_codes, k, cols)
    with o.errstate(invalid="ignore"):
        mask = scores >= tau  # NaN threshold compares False: never exit
    if arr.forced_classes is not None:
        mask &= ~o.take(arr.forced_classes, cols)
    if arr.forced_segments is not None:
        mask &= ~o.take(arr.forced_segments, seg_codes)
    return mask


def decide(
    policy: CompiledPolicy,
    k: int,
    logits: Any,
    segments: Sequence[str] | np.ndarray | None = None,
) -> Any:
    """Boolean exit mask for a batch of exit-``k`` logits (n, C): the whole rule.

    ``logits``: a numpy array (a numpy mask) or an array of another library, e.g. a torch tensor
    on any device (a bool tensor on that device; torch is not a dependency). Segment values stay
    host strings; their codes are moved to the device.
    """
    o = namespace(logits)
    logits = o.prepare(logits)
    shape = tuple(logits.shape)
    if len(shape) != 2 or shape[1] != policy.n_outputs:
        raise ValueError(f"logits must have shape (n, {policy.n_outputs}), got {shape}")
    if not 0 <= k < policy.n_exits:
        raise ValueError(f"exit index {k} out of range 0..{policy.n_exits - 1}")
    n = shape[0]
    if k >= policy.n_exits - 1:
        return o.full_bool(n, True, logits)
    if policy.killed or k > policy.max_exit:
        return o.full_bool(n, False, logits)
    scores, preds = _exit_scores(o, logits, policy.calibrators[k], policy.score, policy.top_k)
    codes = policy.segment_codes(segments, n)  # host-side: segment values are strings
    if o is not NUMPY:
        no_segments = segments is None or not policy.segment_index
        codes = o.zeros_index(n, logits) if no_segments else o.from_host(codes, logits)
    return _exit_mask(o, policy.arrays(o, scores), k, scores, preds, codes)


@dataclass(frozen=True, eq=False)
class Routing:
    """Where each sample exits, what it answers and with which score there."""

    exit: np.ndarray  # (n,) int64
    answer: np.ndarray  # (n,) int64
    confidence: np.ndarray  # (n,) float64, the score at the exit taken


def first_exit(
    policy: CompiledPolicy, scores: np.ndarray, preds: np.ndarray, seg_codes: np.ndarray
) -> Routing:
    """Apply the rule to precomputed per-exit scores and predictions, both (n, K)."""
    n, k_total = scores.shape
    exit_at = np.full(n, k_total - 1, dtype=np.int64)
    pending = np.ones(n, dtype=bool)
    for k in range(k_total - 1):
        if not pending.any():
            break
        idx = np.flatnonzero(pending)
        m = exit_mask(policy, k, scores[idx, k], preds[idx, k], seg_codes[idx])
        taken = idx[m]
        exit_at[taken] = k
        pending[taken] = False
    rows = np.arange(n)
    return Routing(exit=exit_at, answer=preds[rows, exit_at], confidence=scores[rows, exit_at])


def _same_but_thresholds(policies: Sequence[CompiledPolicy]) -> bool:
    base = policies[0]
    return base.class_bucket is None and all(
        p.class_bucket is None and p.thresholds.shape == base.thresholds.shape
        and p.segment_index == base.segment_index and p.max_exit == base.max_exit and p.killed == base.killed
        and np.array_equal(p.forced_classes, base.forced_classes)
        and np.array_equal(p.forced_segments, base.forced_segments)
        for p in policies[1:])


def first_exits(
    policies: Sequence[CompiledPolicy], scores: np.ndarray, preds: np.ndarray, seg_codes: np.ndarray
) -> np.ndarray:
    """The exit of every sample (n, P) under each of ``policies``: :func:`first_exit` for many at once.

    Candidates of one path differ only in their thresholds; the rule then runs once over all of
    them, exit by exit on (n, P) arrays (the same comparisons, ``score >= tau`` with NaN never
    exiting, the same forced classes and segments). Policies that differ in more fall back to
    one :func:`first_exit` each.
    """
    n, k_total = scores.shape
    if not policies:
        return np.zeros((n, 0), dtype=np.int64)
    if not _same_but_thresholds(policies):
        return np.stack([first_exit(p, scores, preds, seg_codes).exit for p in policies], axis=1)
    base = policies[0]
    exit_at = np.full((n, len(policies)), k_total - 1, dtype=np.int64)
    if base.killed:
        return exit_at
    tau = np.stack([p.thresholds for p in policies])  # (P, S + 1, K - 1, C)
    allowed_seg = ~base.forced_segments[seg_codes]
    pending = np.ones(exit_at.shape, dtype=bool)
    for k in range(min(k_total - 1, base.max_exit + 1)):
        cols = preds[:, k]
        with np.errstate(invalid="ignore"):
            taken = scores[:, k, None] >= tau[:, seg_codes, k, cols].T  # NaN threshold compares False
        taken &= (allowed_seg & ~base.forced_classes[cols])[:, None]
        taken &= pending
        exit_at[taken] = k
        pending &= ~taken
        if not pending.any():
            break
    return exit_at


def score_all_exits(
    logits: np.ndarray, calibrators: Sequence[Mapping[str, Any]], score: str, top_k: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Scores and predictions of every exit: two (n, K) arrays (float64, int64)."""
    n, k_total, _ = logits.shape
    scores = np.empty((n, k_total), dtype=np.float64)
    preds = np.empty((n, k_total), dtype=np.int64)
    for k in range(k_total):
        scores[:, k], preds[:, k] = exit_scores(logits[:, k, :], calibrators[k], score, top_k)
    return scores, preds


def route(
    policy: CompiledPolicy,
    logits: np.ndarray,
    segments: Sequence[str] | np.ndarray | None = None,
) -> Routing:
    """The rule over full-depth logs (n, K, C): exit taken, answer and confidence per sample."""
    logits = np.asarray(logits)
    if logits.ndim != 3 or logits.shape[1:] != (policy.n_exits, policy.n_outputs):
        raise ValueError(
            f"logits must have shape (n, {policy.n_exits}, {policy.n_outputs}), got {logits.shape}"
        )
    scores, preds = score_all_exits(logits, policy.calibrators, policy.score, policy.top_k)
    return first_exit(policy, scores, preds, policy.segment_codes(segments, logits.shape[0]))
