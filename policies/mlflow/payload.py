"""What one MLflow run holds for a stored policy version: params, metrics, tags, the policy JSON, plots.

Pure functions of the policy document (no MLflow, no database): the write path
(:mod:`exitwise.policies.mlflow.publish`) logs what they return.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from exitwise.calibration.optional import require
from exitwise.policies.canonical import GOVERNANCE_FIELDS, canonical_json
from exitwise.policies.mlflow.config import TAG_AUTHOR, TAG_CONTENT_HASH, TAG_FINGERPRINT, TAG_MODEL, TAG_STORE_VERSION

log = logging.getLogger(__name__)

_MAX_PARAM = 6000


@dataclass(frozen=True)
class VersionRecord:
    """What MLflow must know about one stored policy version (built from the store)."""

    model: str
    number: int
    content_hash: str
    author: str
    state: str
    data_fingerprint: str | None = None
    document: Mapping[str, Any] | None = None  # None: loaded only if MLflow lacks the version



def policy_json(doc: Mapping[str, Any]) -> bytes:
    """The hash-verifiable policy document: canonical JSON without governance fields but the hash."""
    body = {k: v for k, v in doc.items() if k not in GOVERNANCE_FIELDS or k == "content_hash"}
    return canonical_json(body)


def _key(text: str) -> str:
    """A valid MLflow param/metric name part (alphanumerics, ``_ - . :`` and spaces); ``*`` reads ``all``."""
    out = re.sub(r"[^\w.\- :]", "_", str(text).replace("*", "all")).strip() or "_"
    return re.sub(r"\.{2,}", "_", out)


def _finite(x: Any) -> bool:
    """A real, finite number (not a bool): what MLflow accepts as a metric value."""
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(float(x))


def _param_value(v: Any) -> str:
    """A param value as MLflow stores it: strings as they are, the rest as compact JSON, cut to 6000 chars."""
    s = v if isinstance(v, str) else json.dumps(v, sort_keys=True, separators=(",", ":"))
    return s if len(s) <= _MAX_PARAM else s[: _MAX_PARAM - 1] + "…"


def run_params(doc: Mapping[str, Any]) -> dict[str, str]:
    """Params: the guarantee asked for, the rule's settings, the solver's settings (flattened)."""
    g = doc.get("guarantee") or {}
    forced = doc.get("forced_full_depth") or {}
    p: dict[str, Any] = {
        "risk": g.get("risk"), "eps": g.get("eps"), "delta": g.get("delta"), "method": g.get("method"),
        "score": doc.get("score", "max_prob"), "segment_keys": ",".join(doc.get("segment_keys") or []),
        "n_exits": len(doc.get("exits") or []), "n_classes": len(doc.get("classes") or []),
        "exits": ",".join(str(e.get("name")) for e in doc.get("exits") or []),
        "max_exit": doc.get("max_exit"), "shadow_rate": doc.get("shadow_rate"),
        "forced_full_depth.classes": ",".join(forced.get("classes") or []),
        "forced_full_depth.segments": ",".join(forced.get("segments") or []),
        "model_version": (doc.get("model") or {}).get("version"), "parent": doc.get("parent"),
    }
    vocab = doc.get("vocabulary")
    if isinstance(vocab, Mapping):  # a language model's policy: the classes are token buckets
        p |= {"vocabulary.size": vocab.get("size"), "vocabulary.top_k": vocab.get("top_k"),
              "vocabulary.buckets.method": (vocab.get("buckets") or {}).get("method"),
              "vocabulary.bucket_of.sha256": (vocab.get("bucket_of") or {}).get("sha256")}
    for e in doc.get("exits") or []:
        cal = e.get("calibrator") or {"type": "identity"}
        p[f"calibrator.{_key(e.get('name'))}"] = cal.get("type")
    for k, v in _flatten(doc.get("solver") or {}, "solver").items():
        p[k] = v
    return {_key(k): _param_value(v) for k, v in p.items() if v is not None and v != ""}


def _flatten(obj: Mapping[str, Any], prefix: str, depth: int = 0) -> dict[str, Any]:
    """``{"a": {"b": 1}}`` as ``{"<prefix>.a.b": 1}``, three levels deep at most."""
    out: dict[str, Any] = {}
    for k, v in obj.items():
        key = f"{prefix}.{_key(k)}"
        if isinstance(v, Mapping) and depth < 2:
            out.update(_flatten(v, key, depth + 1))
        else:
            out[key] = v
    return out


def run_metrics(doc: Mapping[str, Any]) -> dict[str, float]:
    """Metrics: compute fraction overall/per segment, held-out risks, certified bounds, calibration."""
    m: dict[str, Any] = {}
    exp = doc.get("expected") or {}
    for name in ("compute_fraction", "risk", "disagreement", "induced_error", "accuracy", "full_depth_accuracy"):
        m[f"heldout.{name}" if name != "compute_fraction" else "compute_fraction"] = exp.get(name)
    exits = [str(e.get("name")) for e in doc.get("exits") or []]
    for name, rate in zip(exits, exp.get("exit_rate") or [], strict=False):
        m[f"exit_rate.{name}"] = rate
    for b, frac in (exp.get("batch_compute_fraction") or {}).items():
        m[f"batch_compute_fraction.b{b}"] = frac
    for seg, vals in (exp.get("segments") or {}).items():
        if not isinstance(vals, Mapping):
            continue
        nested = {k: v for k, v in vals.items() if isinstance(v, Mapping)}  # {column: {value: {...}}} form
        for label, stats in ({f"{seg}.{k}": v for k, v in nested.items()} if nested else {seg: vals}).items():
            for name in ("compute_fraction", "risk", "n"):
                m[f"segment.{label}.{name}"] = stats.get(name)
    for base, vals in (exp.get("baselines") or {}).items():
        if isinstance(vals, Mapping):
            for name in ("compute_fraction", "risk"):
                m[f"baseline.{base}.{name}"] = vals.get(name)
    g = doc.get("guarantee") or {}
    m["certified"] = 1.0 if g.get("certified") else 0.0
    m["certify.n"] = g.get("n")
    for seg, vals in (g.get("segments") or {}).items():
        if isinstance(vals, Mapping):
            label = "overall" if seg == "__all__" else seg
            m[f"bound.{label}.upper_bound"] = vals.get("upper_bound")
            m[f"bound.{label}.certified"] = 1.0 if vals.get("certified") else 0.0
    for entry in (doc.get("calibration") or {}).get("exits") or []:
        name = entry.get("name")
        for when in ("before", "after"):
            for metric, value in (entry.get(when) or {}).items():
                if _finite(value):
                    m[f"calibration.{name}.{when}.{metric}"] = value
    return {_key(k): float(v) for k, v in m.items() if _finite(v)}


def curve_png(doc: Mapping[str, Any]) -> bytes | None:
    """PNG of the compute-vs-risk figure (``expected.curve``, the chosen point, the baselines, eps)."""
    figures = require("exitwise.policies.figures", "reports", "the plots of the MLflow mirror")
    return figures.curve_png(doc)


def reliability_pngs(doc: Mapping[str, Any]) -> dict[str, bytes]:
    """Reliability diagram (before/after calibration) per exit that records bin data, as PNG bytes."""
    figures = require("exitwise.policies.figures", "reports", "the plots of the MLflow mirror")
    out: dict[str, bytes] = {}
    for entry in (doc.get("calibration") or {}).get("exits") or []:
        try:
            png = figures.exit_reliability_png(entry)
        except Exception as exc:  # a plot must never block a registration
            log.warning("reliability diagram of exit %s not drawn: %s", entry.get("name"), exc)
            continue
        if png is not None:
            out[_key(entry.get("name"))] = png
    return out


def description(rec: VersionRecord, doc: Mapping[str, Any]) -> str:
    """One line for the run and the model version: the guarantee, compute fraction, content hash."""
    g = doc.get("guarantee") or {}
    exp = doc.get("expected") or {}
    cf = exp.get("compute_fraction")
    return (
        f"exitwise policy v{rec.number} of {rec.model}: {g.get('risk')} <= {g.get('eps')} "
        f"with confidence {1 - float(g.get('delta', 0) or 0):g}"
        + (f", compute fraction {cf:.4f}" if _finite(cf) else "")
        + f"; certified={g.get('certified')}; content {rec.content_hash[:12]}"
    )


def identity_tags(rec: VersionRecord, doc: Mapping[str, Any]) -> dict[str, str]:
    """The tags that identify a version in MLflow: model, store number, content hash, author, data."""
    tags = {
        TAG_MODEL: rec.model,
        TAG_STORE_VERSION: str(rec.number),
        TAG_CONTENT_HASH: rec.content_hash,
        TAG_AUTHOR: rec.author,
    }
    fingerprint = rec.data_fingerprint or (doc.get("data") or {}).get("fingerprint")
    if fingerprint:
        tags[TAG_FINGERPRINT] = str(fingerprint)
    return tags
