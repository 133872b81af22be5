"""Build the policy document of a solved policy (see the design contract, "The policy document").

The document is assembled from the solver's :class:`~exitwise.calibration.pipeline.Solution` (thresholds,
calibrators, guarantee), its evaluation on the held-out certify split (``expected``; with
``solve --test FILE`` also on that file, ``expected.held_out``, named by file name, rows and
fingerprint), the baselines, calibration metrics per exit and a description of the logs (fingerprint, rows,
time window). Thresholds are JSON floats, ``null`` for "never exit". The content hash is set
with :func:`exitwise.policies.canonical.with_content_hash` and the result is validated with
:func:`exitwise.policies.schema.validate_document` before anyone sees it. Documents are
deterministic: the same logs and options give the same bytes and the same hash.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from exitwise.calibration.buckets import encode_bucket_map
from exitwise.calibration.certify import BOUND_BINOMIAL, BOUND_HB, METHOD, guarantee_segments
from exitwise.calibration.evaluate import ScoredLogs
from exitwise.calibration.exceptions import InputError
from exitwise.calibration.groups import GROUP_RISKS, group_method
from exitwise.calibration.metrics import exit_metrics
from exitwise.calibration.monitor import score_reference
from exitwise.calibration.rule import score_all_exits
from exitwise.calibration.summaries import fingerprint, segment_counts, time_window
from exitwise.calibration.tokens import TokenLogs
from exitwise.calibration.topk_calibrate import topk_exit_metrics
from exitwise.policies.canonical import SCHEMA, with_content_hash
from exitwise.policies.schema import validate_document

__all__ = ["build_document", "calibration_section", "data_section", "held_out_section", "threshold_table"]


def _num(v: Any, digits: int | None = None) -> float | None:
    """A finite JSON float (None for NaN/inf/None), optionally rounded for readability."""
    if v is None:
        return None
    x = float(v)
    if not math.isfinite(x):
        return None
    return round(x, digits) if digits is not None else x


def _rows(tau: np.ndarray) -> list[list[float | None] | None] | None:
    """K-1 rows of C thresholds; a row that never exits is null, a table that never exits is null."""
    if np.isnan(tau).all():
        return None
    out: list[list[float | None] | None] = []
    for row in tau:
        out.append(None if np.isnan(row).all() else [None if np.isnan(v) else float(v) for v in row])
    return out


def threshold_table(
    tau: np.ndarray, segment_levels: Sequence[str], segment_keys: Sequence[str], forced_segments: np.ndarray
) -> dict[str, Any]:
    """``thresholds`` of the document from the solver's (S, K-1, C) array.

    Without segment keys the one segment is ``default``. With segment keys every segment
    value has its own entry and ``default`` (values never seen in calibration) is null, i.e.
    unseen segments run at full depth; forced segments are null too.
    """
    if not segment_keys:
        return {"default": _rows(tau[0])}
    table: dict[str, Any] = {"default": None}
    for s, name in enumerate(segment_levels):
        table[str(name)] = None if forced_segments[s] else _rows(tau[s])
    return table


def _evaluation_json(ev: Any, segment_column: str | None) -> dict[str, Any]:
    segs = ev.segment_summary(segment_column) if segment_column else {}
    return {
        "compute_fraction": _num(ev.compute_fraction), "exit_rate": [_num(r) for r in ev.exit_rate],
        "risk": _num(ev.risk), "disagreement": _num(ev.disagreement), "induced_error": _num(ev.induced_error),
        "accuracy": _num(ev.accuracy), "full_depth_accuracy": _num(ev.full_depth_accuracy),
        "segments": {k: {"compute_fraction": _num(v["compute_fraction"]), "risk": _num(v["risk"]), "n": v["n"]}
                     for k, v in segs.items()},
        "batch_compute_fraction": {str(b): _num(v) for b, v in ev.batch_compute_fraction.items()},
    }


def held_out_section(logs: Any, evaluation: Any, baselines: Mapping[str, Mapping[str, Any]] | None,
                     segment_column: str | None) -> dict[str, Any]:
    """``expected.held_out``: the policy measured on test logs other than the calibration logs.

    Names its source by file name (not path: the document is content-hashed and must not
    depend on where the file sat), its row count and its fingerprint, so every figure quoted
    from it can say where it comes from. Fractions, like the rest of the document.
    """
    out = {"source": Path(str(logs.source)).name, "rows": int(logs.n), "fingerprint": fingerprint(logs),
           **_evaluation_json(evaluation, segment_column)}
    out["baselines"] = {k: {kk: (_num(vv) if isinstance(vv, float) else vv) for kk, vv in v.items()}
                        for k, v in (baselines or {}).items()}
    return out


def calibration_section(logs: Any, calibrators: Sequence[Mapping[str, Any]], rows: np.ndarray, target: str,
                        *, score: str | None = None, max_rows: int = 100_000, n_bins: int = 15) -> dict[str, Any]:
    """Per-exit calibration metrics before (identity) and after the fitted calibrator.

    Measured on ``rows`` (data not used to fit the calibrators), at most ``max_rows`` of them
    (evenly spaced), against ``target``: the labels or the final exit's answers. With ``score``,
    also ``reference``: the quantile bins of each exit's score on those rows, which monitoring
    compares shadow traffic with (:func:`exitwise.calibration.monitor.score_reference`).
    """
    rows = np.asarray(rows)
    if rows.size > max_rows:
        rows = rows[np.linspace(0, rows.size - 1, max_rows).astype(np.int64)]
    tokens = isinstance(logs, TokenLogs)
    if target == "labels":
        y = logs.labels[rows]
    else:
        y = logs.indices[rows, -1, 0].astype(np.int64) if tokens else np.argmax(logs.logits[rows, -1, :], axis=1)
    exits = []
    for k, spec in enumerate(logs.card.exits):
        if tokens:
            before, after = topk_exit_metrics(logs.values[rows, k], logs.indices[rows, k], logs.lse[rows, k],
                                              logs.vocab_size, y, [{"type": "identity"}, calibrators[k]], n_bins)
        else:
            z = logs.logits[rows, k, :]
            before = exit_metrics(z, y, {"type": "identity"}, n_bins=n_bins)
            after = exit_metrics(z, y, calibrators[k], n_bins=n_bins)
        exits.append({
            "name": spec.name,
            "before": {k2: _num(v) for k2, v in before.to_dict().items()},
            "after": {k2: _num(v) for k2, v in after.to_dict().items()},
            "reliability": {"before": before.reliability.to_dict(), "after": after.reliability.to_dict()},
        })
    out = {"target": target, "rows": int(rows.size), "split": "certify", "exits": exits}
    if score is not None:
        if tokens:
            scores, _ = ScoredLogs.from_logs(logs.take(rows), calibrators, score).scores, None
        else:
            scores, _ = score_all_exits(logs.logits[rows], calibrators, score)
        out["reference"] = score_reference(scores)
    return out


def data_section(logs: Any, splits: Any, evidence: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``data``: fingerprint, row counts per split, time window, segment counts, source file name.

    ``evidence`` (``{"logs": path or URI, "card": ...}``) says where the calibration logs are,
    so the service can re-verify the certificate at approval (:mod:`exitwise.policies.reverify`).
    """
    window = time_window(logs)
    extra = {"evidence": dict(evidence)} if evidence else {}
    return {**extra,
        "fingerprint": fingerprint(logs),
        "rows": {"total": int(logs.n), "labelled": int(logs.n) if logs.labels is not None else 0,
                 "skipped": 0, **{k: v for k, v in splits.to_json().items() if k != "seed"}},
        "time_window": list(window) if window else None,
        "segment_counts": segment_counts(logs),
        "source": Path(str(logs.source)).name,
    }


def vocabulary_section(vocab: Any) -> dict[str, Any]:
    """``vocabulary``: the size, the top-k width the scores use and the token-to-bucket map."""
    return {"size": int(vocab.size), "top_k": int(vocab.top_k), "bucket_of": encode_bucket_map(vocab.bucket_of),
            "buckets": {"method": vocab.method, "tokens": [int(t) for t in vocab.tokens]},
            "tail_model": "equal"}


def _unit(prep: Any) -> dict[str, Any]:
    """What one certified unit is: a row, or a group of rows (with the group counts of the split)."""
    if prep.groups is None:
        return {"unit": "row"}
    counts = getattr(prep.splits, "group_counts", None)  # a split at scale counted its groups in a stream
    if counts is None:
        gi, cert = prep.groups, prep.cert_groups
        counts = {"total": int(gi.n_groups), "certify": int(cert.n_groups), "choose": int(gi.n_groups - cert.n_groups)}
    return {"unit": "group", "group_column": prep.spec.group_column or prep.logs.card.group_column,
            "groups": dict(counts)}


def build_document(
    solution: Any,
    *,
    expected: Any,
    baselines: Mapping[str, Mapping[str, Any]] | None = None,
    calibration: Mapping[str, Any] | None = None,
    data: Mapping[str, Any] | None = None,
    shadow_rate: float = 0.01,
    parent: int | None = None,
    model_version: str | None = None,
    held_out: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The policy document of a solved and certified policy, with its content hash, validated.

    ``expected`` is the chosen policy's :class:`~calibration.evaluate.Evaluation` on the
    held-out certify split; ``baselines`` maps a baseline name to ``{compute_fraction,
    risk, certified, ...}`` measured on the same split. ``held_out`` (see
    :func:`held_out_section`) is recorded as ``expected.held_out`` when the policy was also
    measured on test logs.
    """
    prep = solution.prepared
    spec = prep.spec
    logs = prep.logs
    card = logs.card
    if not 0.0 <= float(shadow_rate) <= 1.0:
        raise InputError(f"shadow rate must be in [0, 1], got {shadow_rate}")
    cert = solution.certification
    seg_col = "|".join(spec.segment_keys) if spec.segment_keys else None
    forced_segs = [prep.seg_levels[s] for s in np.flatnonzero(solution.forced_segments)] if spec.segment_keys else []
    exp = _evaluation_json(expected, seg_col)
    exp["evaluated_on"] = f"certify split ({expected.n} rows)"
    exp["baselines"] = {k: {kk: (_num(vv) if isinstance(vv, float) else vv) for kk, vv in v.items()}
                        for k, v in (baselines or {}).items()}
    exp["curve"] = [{k: (_num(v, 6) if isinstance(v, float) else v) for k, v in p.items()} for p in solution.curve]
    if held_out is not None:
        exp["held_out"] = dict(held_out)
    chosen = cert.chosen
    path = solution.path
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "model": {"name": card.model, "version": model_version if model_version is not None else card.version},
        "exits": [{"name": e.name, "cost": float(e.cost), "calibrator": dict(prep.calibrators[k])}
                  for k, e in enumerate(card.exits)],
        "classes": list(prep.column_names),
        "score": spec.score,
        "segment_keys": list(spec.segment_keys),
        "thresholds": threshold_table(solution.tau, prep.seg_levels, spec.segment_keys, solution.forced_segments),
        "forced_full_depth": {"classes": list(spec.forbid_classes), "segments": forced_segs},
        "max_exit": spec.max_exit,
        "shadow_rate": float(shadow_rate),
        "guarantee": {
            "risk": spec.risk, "eps": spec.eps, "delta": spec.delta,
            "method": METHOD if prep.groups is None else group_method(spec.risk),
            "n": int(solution.constraints[0].n), "certified": bool(cert.certified),
            **_unit(prep),
            "segments": guarantee_segments(cert, solution.constraints, solution.uncertified, bound=BOUND_HB if (
                prep.groups is not None and GROUP_RISKS[spec.risk] == "mean") else BOUND_BINOMIAL),
            "uncertified_segments": sorted(solution.uncertified),
            "split": prep.splits.to_json(),
        },
        "expected": exp,
        "data": dict(data) if data is not None else {},
        "solver": {
            **spec.to_json(),
            "path_length": len(path.points), "tested": len(cert.steps), "chosen_step": chosen,
            "family": solution.family,
            "knob": path.knob,
            path.knob: None if chosen is None else _num(path.points[chosen].lam),
            "selection": None if solution.selection is None else solution.selection.to_json(),
            "segment_floors": {prep.seg_levels[s]: _num(path.floors[s]) for s in path.aims},
        },
        "parent": parent,
    }
    if prep.vocabulary is not None:
        doc["vocabulary"] = vocabulary_section(prep.vocabulary)
    if calibration is not None:
        doc["calibration"] = dict(calibration)
    doc = with_content_hash(doc)
    validate_document(doc)
    return doc
