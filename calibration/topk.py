"""Exit scores from the top-k of a large vocabulary (token-level logs of a language model).

A language model's exit has V = 32k..150k logits per token; logs keep the k largest
(``values``, descending) and the log-sum-exp of all V at temperature 1 (``lse``). The top-k
probabilities exp(v_i - lse) are then exact, and the mass the other V - k tokens share, the
*tail* m = 1 - sum_i exp(v_i - lse), is known; how it is shared is not.

**The tail model.** The tail tokens share m equally: each has logit u = lse + log m - log(V - k).
At temperature T the log-partition is LSE_T = logaddexp(logsumexp(v / T), log(V - k) + u / T);
at T = 1 this is exactly ``lse``. Scores (with p_i = exp(v_i / T - LSE_T)):

* ``max_prob`` = p_1 and ``margin`` = p_1 - p_2: exact at T = 1; at T != 1 the tail's share of
  the partition is modelled (a tail of equal logits is the most spread one, so at T > 1 it
  is the largest and at T < 1 the smallest the true tail can be);
* ``entropy`` = 1 - H / log V with H = -sum_i p_i log p_i - (V - k) q log q, q = exp(u / T - LSE_T):
  the equal tail has the largest entropy any tail of mass m can have, so this confidence is
  a lower bound of the true one (a token exits no earlier than with the exact entropy).

The solver scores logs with this function and the runtime scores a dense exit head's logits
with the same function after taking their top-k and log-sum-exp (:func:`dense_topk`), so both
compute the same numbers: what was certified is what runs. numpy and the standard library only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["dense_topk", "topk_exit_scores"]

_CHUNK_ELEMENTS = 1 << 21


def dense_topk(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The k largest logits of each row (descending), their ids and the row's log-sum-exp.

    ``logits`` (n, V); returns values (n, k) float64, ids (n, k) int64 and lse (n,) float64.
    Ties are broken by the lower id (as ``argmax`` does), so the first id is the argmax.
    """
    z = np.asarray(logits, dtype=np.float64)
    n, v = z.shape
    k = min(int(k), v)
    if k < v:
        part = np.argpartition(-z, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(v), (n, v))
    vals = np.take_along_axis(z, part, axis=1)
    order = np.lexsort((part, -vals), axis=1)  # value descending, then id ascending
    ids = np.take_along_axis(part, order, axis=1).astype(np.int64)
    vals = np.take_along_axis(vals, order, axis=1)
    top = z.max(axis=1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(z - top).sum(axis=1))
    return vals, ids, lse


def topk_exit_scores(
    values: np.ndarray, lse: np.ndarray, vocab_size: int, calibrator: Mapping[str, Any], score: str
) -> np.ndarray:
    """The exit score (n,) float64 of one exit from its top-k ``values`` (n, k) and ``lse`` (n,).

    ``calibrator`` is the policy document's calibrator (identity, temperature or Platt; Platt's
    features are computed at T = 1 from the same top-k). See the module docstring for the
    tail model.
    """
    values = np.asarray(values)
    lse = np.asarray(lse)
    n, k = values.shape
    if lse.shape != (n,):
        raise ValueError(f"lse must have shape ({n},), got {lse.shape}")
    if not 1 <= k <= vocab_size:
        raise ValueError(f"top-k width {k} must be in 1..{vocab_size}")
    out = np.empty(n, dtype=np.float64)
    step = max(1, _CHUNK_ELEMENTS // max(k, 1))
    for start in range(0, n, step):
        sl = slice(start, min(n, start + step))
        out[sl] = _chunk(values[sl], lse[sl], int(vocab_size), calibrator, score)
    return out


def _chunk(values: np.ndarray, lse: np.ndarray, vocab: int, calibrator: Mapping[str, Any], score: str) -> np.ndarray:
    kind = calibrator.get("type")
    if kind not in ("identity", "temperature", "platt"):
        raise ValueError(f"unknown calibrator type {kind!r}")
    if score not in ("max_prob", "margin", "entropy"):
        raise ValueError(f"unknown score {score!r}")
    t = float(calibrator["temperature"]) if kind == "temperature" else 1.0
    top, second, conf = _parts(np.asarray(values, dtype=np.float64), np.asarray(lse, dtype=np.float64), vocab, t,
                               need_conf=score == "entropy" or kind == "platt")
    if kind == "platt":
        top_c = np.clip(top, 1e-12, 1.0 - 1e-12)
        phi = np.stack([np.log(top_c) - np.log1p(-top_c), top - second, conf], axis=1)
        w = np.asarray(calibrator["coef"], dtype=np.float64)
        p1 = 1.0 / (1.0 + np.exp(-(phi @ w + float(calibrator["intercept"]))))
        if score == "max_prob":
            return p1
        # the calibrated answer takes p1; the rest is shared in proportion to the raw probabilities
        rest = np.where(top < 1.0, (1.0 - p1) / np.maximum(1.0 - top, 1e-300), 0.0)
        if score == "margin":
            return p1 - second * rest
        t_raw = _parts(np.asarray(values, dtype=np.float64), np.asarray(lse, dtype=np.float64), vocab, 1.0,
                       need_conf=True, raw=True)
        return _platt_entropy(p1, rest, t_raw, vocab)
    if score == "max_prob":
        return top
    if score == "margin":
        return top - second
    return conf


def _parts(v: np.ndarray, lse: np.ndarray, vocab: int, t: float, *, need_conf: bool,
           raw: bool = False) -> Any:
    """p_1, p_2 and 1 - H/log V at temperature ``t`` under the tail model (or, with ``raw``, the
    top-k probabilities, the tail token probability and the tail size at ``t``)."""
    n, k = v.shape
    tail_n = vocab - k
    head = np.exp(v - lse[:, None]).sum(axis=1)
    mass = np.clip(1.0 - head, 0.0, 1.0) if tail_n > 0 else np.zeros(n)
    has_tail = mass > 0.0
    with np.errstate(divide="ignore"):
        u = np.where(has_tail, lse + np.log(np.where(has_tail, mass, 1.0)) - np.log(max(tail_n, 1)), -np.inf)
    zt = v / t
    zmax = zt[:, :1]
    head_t = np.exp(zt - zmax).sum(axis=1)
    tail_t = np.where(has_tail, tail_n * np.exp(np.where(has_tail, u / t, 0.0) - zmax[:, 0]), 0.0)
    log_z = zmax[:, 0] + np.log(head_t + tail_t)
    probs = np.exp(zt - log_z[:, None])
    q = np.where(has_tail, np.exp(np.where(has_tail, u / t, 0.0) - log_z), 0.0)
    if raw:
        return probs, q, tail_n
    top = probs[:, 0]
    second = probs[:, 1] if k > 1 else q
    if not need_conf:
        return top, second, None
    return top, second, _confidence(probs, q, tail_n, vocab)


def _confidence(probs: np.ndarray, q: np.ndarray, tail_n: int, vocab: int) -> np.ndarray:
    """1 - H / log V for the top-k probabilities and ``tail_n`` tail tokens of probability q."""
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(probs > 0, probs * np.log(probs), 0.0).sum(axis=1)
        tail = np.where(q > 0, tail_n * q * np.log(q), 0.0)
    return 1.0 + (plogp + tail) / np.log(vocab)


def _platt_entropy(p1: np.ndarray, rest: np.ndarray, raw: Any, vocab: int) -> np.ndarray:
    probs, q, tail_n = raw
    scaled = probs * rest[:, None]
    scaled[:, 0] = p1
    return _confidence(scaled, q * rest, tail_n, vocab)
