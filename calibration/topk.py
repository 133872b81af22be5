"""Exit scores from the top-k of a large vocabulary (token-level logs of a language model).

A language model's exit has V = 32k..150k logits per token; logs keep the k largest
(``values``, descending) and the log-sum-exp of all V at temperature 1 (``lse``). The top-k
probabilities exp(v_i - lse) are then exact, and the mass the other V - k tokens share, the
*tail* m = 1 - sum_i exp(v_i - lse), is known; how it is shared is not.

**The tail model.** The tail tokens share m equally: each has logit u = lse + log m - log(V - k).
At temperature T the log-partition is LSE_T = logaddexp(logsumexp(v / T), log(V - k) + u / T);
at T = 1 this is exactly ``lse``. Scores (with p_i = exp(v_i / T - LSE_T)):

* ``max_prob`` = p_1 and ``margin`` = p_1 - p_2: exact at T = 1 (the margin for k >= 2; with
  k = 1 the runner-up is not logged and the tail token q stands in for it, which can only
  overstate the margin); at T != 1 the tail's share of the partition is modelled (a tail of
  equal logits is the most spread one, so at T > 1 it is the largest and at T < 1 the smallest
  the true tail can be). m is known to ~1e-16 (float64 lse; ~1e-7 for a float32 lse), and a
  smaller tail counts as none: at large T its amplified share is then missed and p_1 overstated;
* ``entropy`` = 1 - H / log V with H = -sum_i p_i log p_i - (V - k) q log q, q = exp(u / T - LSE_T):
  at T = 1 the equal tail has the largest entropy any tail of mass m can have, so this
  confidence is a lower bound of the true one (a token exits no earlier than with the exact
  entropy); at T != 1 it is an estimate, not a bound.

The solver scores logs with this function and the runtime scores a dense exit head's logits
with the same function after taking their top-k and log-sum-exp (:func:`dense_topk`), so both
compute the same numbers: what was certified is what runs. The formulas are written once against a
:class:`~exitwise.calibration.arrays.Namespace`, so they run on numpy arrays or on torch tensors on
their device. numpy and the standard library only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from exitwise.calibration.arrays import Namespace, namespace

__all__ = ["dense_topk", "tail_model", "topk_exit_scores"]

_CHUNK_ELEMENTS = 1 << 21


def dense_topk(logits: Any, k: int) -> tuple[Any, Any, Any]:
    """The k largest logits of each row (descending), their ids and the row's log-sum-exp.

    ``logits`` (n, V), a numpy array or another library's (torch: on its device); returns values
    (n, k) float64, ids (n, k) int64 and lse (n,) float64 of that library. Ties are broken by
    the lower id (as ``argmax`` does): of equal values the lower ids come first and are the ones
    kept, so the first id is the argmax.
    """
    o = namespace(logits)
    return _dense_topk(o, o.prepare(logits), k, ids=True)


def _dense_topk(o: Namespace, logits: Any, k: int, *, ids: bool) -> tuple[Any, Any, Any]:
    """:func:`dense_topk` in namespace ``o``; without ``ids`` only the values and lse (ids None)."""
    k = min(int(k), logits.shape[1])
    # selected in the input's dtype (float32: half the memory): widening is exact and keeps the order
    vals, top_ids = o.topk(logits, k) if ids else (o.topk_values(logits, k), None)
    vals = o.to_float(vals)
    z = o.to_float(logits)
    top = o.amax(z, axis=1, keepdims=True)
    lse = top[:, 0] + o.log(o.sum(o.iexp(z - top), axis=1))  # in place: one (n, V) temporary less
    return vals, top_ids, lse


def dense_exit_scores(o: Namespace, logits: Any, top_k: int, calibrator: Mapping[str, Any], score: str
                      ) -> tuple[Any, Any]:
    """Scores and predictions of a dense exit head's logits (n, V) under a vocabulary policy:
    :func:`topk_exit_scores` of their top-k and log-sum-exp, and the argmax (for the rule)."""
    vals, _, lse = _dense_topk(o, logits, top_k, ids=False)
    return _chunk(o, vals, lse, logits.shape[1], calibrator, score), o.argmax(logits, axis=1)


def topk_exit_scores(
    values: Any, lse: Any, vocab_size: int, calibrator: Mapping[str, Any], score: str
) -> Any:
    """The exit score (n,) float64 of one exit from its top-k ``values`` (n, k) and ``lse`` (n,).

    ``calibrator`` is the policy document's calibrator (identity, temperature or Platt; Platt's
    features are computed at T = 1 from the same top-k). See the module docstring for the
    tail model. numpy in, numpy out; a torch tensor in, a tensor on its device out.
    """
    o = namespace(values)
    values, lse = o.prepare(values), o.prepare(lse)
    n, k = values.shape
    if tuple(lse.shape) != (n,):
        raise ValueError(f"lse must have shape ({n},), got {tuple(lse.shape)}")
    if not 1 <= k <= vocab_size:
        raise ValueError(f"top-k width {k} must be in 1..{vocab_size}")
    out = o.empty_float(n, values)
    step = max(1, _CHUNK_ELEMENTS // max(k, 1))
    for start in range(0, n, step):
        sl = slice(start, min(n, start + step))
        out[sl] = _chunk(o, values[sl], lse[sl], int(vocab_size), calibrator, score)
    return out


def _chunk(o: Namespace, values: Any, lse: Any, vocab: int, calibrator: Mapping[str, Any], score: str) -> Any:
    kind = calibrator.get("type")
    if kind not in ("identity", "temperature", "platt"):
        raise ValueError(f"unknown calibrator type {kind!r}")
    if score not in ("max_prob", "margin", "entropy"):
        raise ValueError(f"unknown score {score!r}")
    t = float(calibrator["temperature"]) if kind == "temperature" else 1.0
    v64, lse64 = o.to_float(values), o.to_float(lse)
    top, second, conf = _parts(o, v64, lse64, vocab, t, need_conf=score == "entropy" or kind == "platt")
    if kind == "platt":
        top_c = o.clip(top, 1e-12, 1.0 - 1e-12)
        phi = o.stack([o.log(top_c) - o.log1p(-top_c), top - second, conf], axis=1)
        p1 = 1.0 / (1.0 + o.exp(-(o.lincomb(phi, calibrator["coef"]) + float(calibrator["intercept"]))))
        if score == "max_prob":
            return p1
        # the calibrated answer takes p1; the rest is shared in proportion to the raw probabilities
        rest = o.where(top < 1.0, (1.0 - p1) / o.maximum(1.0 - top, 1e-300), 0.0)
        if score == "margin":
            return p1 - second * rest
        t_raw = _parts(o, v64, lse64, vocab, 1.0, need_conf=True, raw=True)
        return _platt_entropy(o, p1, rest, t_raw, vocab)
    if score == "max_prob":
        return top
    if score == "margin":
        return top - second
    return conf


def tail_model(values: np.ndarray, lse: np.ndarray, vocab: int, temperature: float = 1.0
               ) -> tuple[np.ndarray, np.ndarray, int]:
    """The distribution at ``temperature`` under the tail model (numpy): the top-k probabilities
    (n, k), the probability of each tail token (n,) and the number of tail tokens V - k."""
    v, s = np.asarray(values, dtype=np.float64), np.asarray(lse, dtype=np.float64)
    return _parts(namespace(v), v, s, int(vocab), float(temperature), need_conf=False, raw=True)


def _parts(o: Namespace, v: Any, lse: Any, vocab: int, t: float, *, need_conf: bool, raw: bool = False) -> Any:
    """p_1, p_2 and 1 - H/log V at temperature ``t`` under the tail model (or, with ``raw``, the
    top-k probabilities, the tail token probability and the tail size at ``t``)."""
    n, k = v.shape
    tail_n = vocab - k
    head = o.sum(o.exp(v - lse[:, None]), axis=1)
    mass = o.clip(1.0 - head, 0.0, 1.0) if tail_n > 0 else o.zeros(n, like=head)
    has_tail = mass > 0.0
    with o.errstate(divide="ignore"):
        u = o.where(has_tail, lse + o.log(o.where(has_tail, mass, 1.0)) - float(np.log(max(tail_n, 1))), -math.inf)
    zt = v / t
    zmax = zt[:, :1]
    head_t = o.sum(o.exp(zt - zmax), axis=1)
    tail_t = o.where(has_tail, tail_n * o.exp(o.where(has_tail, u / t, 0.0) - zmax[:, 0]), 0.0)
    log_z = zmax[:, 0] + o.log(head_t + tail_t)
    probs = o.exp(zt - log_z[:, None])
    q = o.where(has_tail, o.exp(o.where(has_tail, u / t, 0.0) - log_z), 0.0)
    if raw:
        return probs, q, tail_n
    top = probs[:, 0]
    second = probs[:, 1] if k > 1 else q
    if not need_conf:
        return top, second, None
    return top, second, _confidence(o, probs, q, tail_n, vocab)


def _confidence(o: Namespace, probs: Any, q: Any, tail_n: int, vocab: int) -> Any:
    """1 - H / log V for the top-k probabilities and ``tail_n`` tail tokens of probability q."""
    with o.errstate(divide="ignore", invalid="ignore"):
        plogp = o.sum(o.where(probs > 0, probs * o.log(probs), 0.0), axis=1)
        tail = o.where(q > 0, tail_n * q * o.log(q), 0.0)
    return 1.0 + (plogp + tail) / float(np.log(vocab))


def _platt_entropy(o: Namespace, p1: Any, rest: Any, raw: Any, vocab: int) -> Any:
    probs, q, tail_n = raw
    scaled = probs * rest[:, None]
    scaled[:, 0] = p1
    return _confidence(o, scaled, q * rest, tail_n, vocab)
