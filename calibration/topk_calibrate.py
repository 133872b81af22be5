"""Calibrators fitted on token-level (top-k) logs.

The dense estimators (:mod:`exitwise.calibration.calibrators`) need every logit. With the top-k
and the full log-sum-exp of an exit (:mod:`exitwise.calibration.topk`):

* **temperature**: T minimises the *coarsened* negative log-likelihood of the targets under the
  tail model: a target inside the exit's top-k contributes -log p_T(target), one outside it
  -log P_T(tail) (it is somewhere in the tail; which token is not known). At T = 1 this is the
  exact likelihood of "which top-k token, or the tail"; the tail model enters only at T != 1.
  The search is a bounded 1-D minimisation over log T (the NLL is smooth in T).
* **platt**: the logistic regression of "the answer is the target" on the same three features
  the rule computes from the top-k (logit of p_1, p_1 - p_2, the entropy confidence).

Both return the same calibrator objects as the dense fits, so policies, the rule and the
report do not need to know which logs a calibrator came from.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar

from exitwise.calibration.calibrators import Calibrator, _fit_logistic, calibrator_from_dict
from exitwise.calibration.exceptions import InputError
from exitwise.calibration.metrics import ExitMetrics, _summarise
from exitwise.calibration.tokens import TokenLogs
from exitwise.calibration.topk import tail_model, topk_exit_scores

__all__ = ["fit_topk_calibrators", "topk_exit_metrics", "topk_nll", "topk_targets"]

_BOUNDS = (0.05, 20.0)
_MAX_FIT_ROWS = 200_000  # a seeded subsample above this: a handful of parameters need far fewer rows


def topk_targets(logs: TokenLogs, target: str) -> np.ndarray:
    """Token ids the calibrators learn to predict: the labels, or the final exit's answers."""
    if target == "labels":
        if logs.labels is None:
            raise InputError(f"{logs.source}: the logs have no labels; use the final exit's answers")
        return logs.labels
    return logs.indices[:, -1, 0].astype(np.int64)


def topk_nll(values: np.ndarray, indices: np.ndarray, lse: np.ndarray, vocab: int, y: np.ndarray,
             temperature: float) -> float:
    """Mean coarsened NLL of targets ``y`` at ``temperature`` (see the module docstring)."""
    return _nll_terms(values, indices, lse, vocab, y)(float(temperature))


def _nll_terms(values: np.ndarray, indices: np.ndarray, lse: np.ndarray, vocab: int,
               y: np.ndarray) -> Callable[[float], float]:
    """The coarsened NLL as a function of T, with everything that does not depend on T computed once."""
    v = np.asarray(values, dtype=np.float64)
    lse = np.asarray(lse, dtype=np.float64)
    n, k = v.shape
    hit = indices == y[:, None]
    inside = hit.any(axis=1)
    z_y = np.where(inside, v[np.arange(n), np.argmax(hit, axis=1)], 0.0)
    has_tail = vocab > k
    mass = np.clip(1.0 - np.exp(v - lse[:, None]).sum(axis=1), 1e-300, 1.0) if has_tail else np.full(n, 1e-300)
    tail_n = max(vocab - k, 1)
    u = lse + np.log(mass) - np.log(tail_n)
    log_n = np.log(tail_n)

    def nll(t: float) -> float:
        zt = v / t
        log_tail = log_n + u / t
        top = np.maximum(zt[:, 0], log_tail)
        log_z = top + np.log(np.exp(zt - top[:, None]).sum(axis=1) + np.exp(log_tail - top))
        log_p = np.where(inside, z_y / t, log_tail) - log_z
        return float(-log_p.mean())

    return nll


def fit_topk_calibrators(
    logs: TokenLogs, method: str, *, target: str = "final", index: np.ndarray | None = None,
    progress: Callable[[int], None] | None = None, seed: int = 0,
) -> list[Calibrator]:
    """One calibrator per exit fitted on the top-k logs (rows ``index``); the last exit keeps the
    identity when it learns its own answers (as the dense fit does)."""
    if method not in ("identity", "temperature", "platt"):
        raise InputError(f"unknown calibration method {method!r}; expected identity, temperature or platt")
    rows = np.arange(logs.n) if index is None else np.asarray(index)
    if rows.size > _MAX_FIT_ROWS:
        rows = np.sort(np.random.default_rng(seed).choice(rows, _MAX_FIT_ROWS, replace=False))
    y = topk_targets(logs, target)[rows]
    vocab = logs.vocab_size
    out: list[Calibrator] = []
    for k in range(logs.n_exits):
        if method == "identity" or (target == "final" and k == logs.n_exits - 1) or rows.size == 0:
            out.append(calibrator_from_dict({"type": "identity"}, vocab))
        else:
            values, ids, lse = logs.values[rows, k], logs.indices[rows, k], logs.lse[rows, k]
            if method == "temperature":
                out.append(_fit_temperature(values, ids, lse, vocab, y))
            else:
                out.append(_fit_platt(values, ids, lse, vocab, y))
        if progress is not None:
            progress(k)
    return out


def _fit_temperature(values: np.ndarray, ids: np.ndarray, lse: np.ndarray, vocab: int, y: np.ndarray) -> Calibrator:
    lo, hi = np.log(_BOUNDS[0]), np.log(_BOUNDS[1])
    nll = _nll_terms(values, ids, lse, vocab, y)
    res = minimize_scalar(lambda log_t: nll(float(np.exp(log_t))),
                          bounds=(lo, hi), method="bounded", options={"xatol": 1e-5})
    t = float(np.exp(res.x))
    return calibrator_from_dict({"type": "temperature", "temperature": t}, vocab)


def _fit_platt(values: np.ndarray, ids: np.ndarray, lse: np.ndarray, vocab: int, y: np.ndarray) -> Calibrator:
    ident = {"type": "identity"}
    top = topk_exit_scores(values, lse, vocab, ident, "max_prob")
    margin = topk_exit_scores(values, lse, vocab, ident, "margin")
    conf = topk_exit_scores(values, lse, vocab, ident, "entropy")
    top_c = np.clip(top, 1e-12, 1.0 - 1e-12)
    phi = np.stack([np.log(top_c) - np.log1p(-top_c), margin, conf], axis=1)
    coef, intercept, _ = _fit_logistic(phi, ids[:, 0] == y, 1e-6, 1e-10, 1000)
    return calibrator_from_dict({"type": "platt", "coef": [float(c) for c in coef], "intercept": float(intercept)},
                                vocab)


def topk_exit_metrics(values: np.ndarray, ids: np.ndarray, lse: np.ndarray, vocab: int, y: np.ndarray,
                      calibrators: Sequence[Mapping[str, Any]], n_bins: int = 15) -> tuple[ExitMetrics, ...]:
    """:func:`~exitwise.calibration.metrics.exit_metrics_multi` for one exit of top-k logs.

    Confidence is the rule's ``max_prob`` score; NLL and Brier use the coarsened distribution
    (the top-k tokens, and the tail as one outcome shared equally by its tokens, see
    :mod:`exitwise.calibration.topk`).
    """
    ok = ids[:, 0] == y
    out = []
    for cal in calibrators:
        conf = topk_exit_scores(values, lse, vocab, cal, "max_prob")
        t = float(cal["temperature"]) if cal.get("type") == "temperature" else 1.0
        probs, q, tail_n = tail_model(values, lse, vocab, t)
        if cal.get("type") == "platt":  # the answer takes the calibrated confidence, the rest shares 1 - it
            rest = np.where(probs[:, 0] < 1.0, (1.0 - conf) / np.maximum(1.0 - probs[:, 0], 1e-300), 0.0)
            probs = probs * rest[:, None]
            probs[:, 0] = conf
            q = q * rest
        hit = ids == y[:, None]
        p_y = np.where(hit.any(axis=1), (probs * hit).sum(axis=1), q)
        nll = -float(np.log(np.maximum(p_y, 1e-300)).sum())
        brier = float(((probs ** 2).sum(axis=1) + tail_n * q ** 2 - 2.0 * p_y + 1.0).sum())
        out.append(_summarise(np.clip(conf, 0.0, 1.0), ok, nll, brier, n_bins))
    return tuple(out)
