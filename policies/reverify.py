"""Re-verify a policy's certificate from its evidence before it is approved.

A document's ``guarantee`` (``certified``, per-constraint upper bounds) is what its author
claims. When the calibration logs it was solved on are reachable — ``data.evidence`` names
them (recorded by ``exitwise solve``), they lie under a root the service trusts, and they hash
to the document's ``data.fingerprint`` — the service recomputes the certificate itself:

- the certify rows from ``guarantee.split`` (the same seeded split the solver cut),
- the rule applied with the document's own calibrators and thresholds,
- per constraint (``__all__`` and every per-segment budget), the loss count, the exact
  binomial test at ``delta`` and the upper bound, compared with the claim.

What this proves: the policy *as written* passes its risk test on rows that the document
says certified it. What it cannot prove: that those rows were untouched when the path was
chosen (only the solver's own run knows that), nor anything about logs that are no longer
reachable — those are recorded as "as claimed by the author, not re-verified".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlparse

import numpy as np
from sqlalchemy import Engine

from exitwise.calibration.certify import ALL, Constraint, check_constraints
from exitwise.calibration.evaluate import ScoredLogs, route_scored
from exitwise.calibration.exceptions import ExitwiseError
from exitwise.calibration.group_solve import resolve_groups
from exitwise.calibration.groups import GroupIndex, group_losses, split_groups
from exitwise.calibration.logfiles.cards import load_card
from exitwise.calibration.logfiles.readers import load_logs
from exitwise.calibration.rule import CompiledPolicy
from exitwise.calibration.splits import split_rows
from exitwise.calibration.summaries import fingerprint
from exitwise.policies.db import unit_of_work
from exitwise.policies.store import get_version

Status = Literal["reverified", "not_reverified", "failed"]
LABELS: dict[str, str] = {
    "reverified": "certificate re-verified by the service",
    "not_reverified": "certificate as claimed by the author, not re-verified",
    "failed": "certificate re-verification FAILED",
}
BOUND_TOLERANCE = 1e-9


@dataclass(frozen=True)
class Reverification:
    """The outcome: ``status``, a one-line ``detail`` and the recomputed constraints."""

    status: Status
    detail: str
    constraints: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return LABELS[self.status]

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "label": self.label, "detail": self.detail,
                "constraints": {k: dict(v) for k, v in self.constraints.items()}}


def not_reverified(detail: str) -> Reverification:
    return Reverification("not_reverified", detail)


def reverify_version(engine: Engine, model: str, number: int, *,
                     roots: Sequence[Path] | None) -> Reverification:
    """Re-verify stored version ``number`` of ``model`` (read in its own read-only transaction).

    Run before the approval's write transaction: reading logs takes seconds, and a write
    transaction would hold the store's write lock (and the kill switch) that long.
    """
    with unit_of_work(engine, readonly=True) as session:
        version = get_version(model, number, session=session)
    if version.state != "draft":
        return not_reverified(f"{model} v{number} is {version.state}")  # approve refuses it anyway
    return reverify(version.document, roots=roots)


def evidence_path(location: Any, roots: Sequence[Path] | None) -> Path | Reverification:
    """The local path named by ``location`` if the service may read it; else why not.

    ``roots`` None: any local path (the CLI, acting with its user's own rights); a list: only
    paths that resolve inside one of them (the API server: an author must not make it read
    arbitrary files). Only local paths and ``file://`` URIs are read.
    """
    if not isinstance(location, str) or not location:
        return not_reverified("the document names no calibration logs (data.evidence)")
    parsed = urlparse(location)
    if parsed.scheme not in ("", "file"):
        return not_reverified(f"evidence at a {parsed.scheme}:// location is not reachable from the service")
    path = Path(unquote(parsed.path) if parsed.scheme == "file" else location)
    if not path.is_absolute():
        return not_reverified(f"evidence path {location!r} is not absolute")
    resolved = path.resolve()
    if roots is not None and not any(resolved.is_relative_to(Path(r).resolve()) for r in roots):
        return not_reverified("the evidence is outside the directories this service may read "
                              "(EXITWISE_EVIDENCE_ROOTS)")
    if not resolved.is_file():
        return not_reverified(f"evidence file {location} is not reachable")
    return resolved


def reverify(doc: Mapping[str, Any], *, roots: Sequence[Path] | None = None) -> Reverification:
    """Recompute the certificate of ``doc`` from its evidence (see the module docstring)."""
    guarantee = doc.get("guarantee") or {}
    data = doc.get("data") or {}
    if (guarantee.get("split") or {}).get("method") == "hash":
        return not_reverified("solved by the scale engine (split by a hash of the request id): the service "
                              "re-verifies policies solved in memory only")
    evidence = data.get("evidence") or {}
    if not isinstance(evidence, Mapping):
        return not_reverified("data.evidence is not an object")
    logs_path = evidence_path(evidence.get("logs"), roots)
    if isinstance(logs_path, Reverification):
        return logs_path
    card_path = evidence_path(evidence.get("card"), roots)
    if isinstance(card_path, Reverification):
        return card_path
    try:
        logs = load_logs(logs_path, load_card(card_path))
    except ExitwiseError as exc:
        return not_reverified(f"the evidence cannot be read: {exc}")
    model = (doc.get("model") or {}).get("name")
    if logs.card.model != model:
        return not_reverified(f"the evidence's card is for model {logs.card.model!r}, the policy for {model!r}")
    if fingerprint(logs) != data.get("fingerprint"):
        return not_reverified(f"{logs_path.name} no longer matches the document's data fingerprint")
    split = guarantee.get("split") or {}
    choose, certify, seed = split.get("choose"), split.get("certify"), split.get("seed")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (choose, certify, seed)) \
            or choose + certify != logs.n:
        return not_reverified(f"guarantee.split {split} does not describe the {logs.n} logged rows")
    grouped = guarantee.get("unit") == "group"
    try:
        policy = CompiledPolicy.from_document(doc)
        if grouped:
            groups = resolve_groups(logs, guarantee.get("group_column"))
            n_choose = int((guarantee.get("groups") or {}).get("choose", -1))
            if groups is None or not 0 <= n_choose <= groups.n_groups:
                return not_reverified(f"guarantee.groups {guarantee.get('groups')} does not describe the logs' groups")
            rows = split_groups(groups, n_choose, seed)[1]
        else:
            rows = split_rows(logs.n, [choose], seed)[1]
        scored = ScoredLogs.from_logs(logs.take(rows), policy.calibrators, policy.score)
        exits = route_scored(policy, scored)
    except (ExitwiseError, KeyError, TypeError, ValueError) as exc:
        return not_reverified(f"the policy cannot be applied to its evidence: {exc}")
    loss = scored.loss_matrix(str(guarantee.get("risk")))[np.arange(scored.n), exits]
    if grouped:
        if rows.size != certify:
            return not_reverified(f"the group split gives {rows.size} certify rows, guarantee.split says {certify}")
        cert_groups = groups.take(rows)
        loss = group_losses(cert_groups, loss, str(guarantee.get("risk")))
        return _compare(guarantee, loss, _constraint_rows(doc, scored, cert_groups), unit="groups")
    return _compare(guarantee, loss, _constraint_rows(doc, scored))


def _constraint_rows(doc: Mapping[str, Any], scored: ScoredLogs,
                     groups: GroupIndex | None = None) -> dict[str, np.ndarray]:
    """The certify units (rows, or groups by their first row's segment) of every constraint."""
    keys = list(doc.get("segment_keys") or [])
    codes = scored.segment_codes(keys)[0] if keys else np.zeros(scored.n, dtype=np.int64)
    if groups is not None:
        codes = groups.first(codes)
    out = {ALL: np.arange(codes.size)}
    if keys:
        for s, name in enumerate(scored.segment_codes(keys)[1]):
            out[str(name)] = np.flatnonzero(codes == s)
    return out


def _compare(guarantee: Mapping[str, Any], loss: np.ndarray, rows: Mapping[str, np.ndarray],
             unit: str = "rows") -> Reverification:
    delta = float(guarantee["delta"])
    claims = dict(guarantee.get("segments") or {})
    overall = dict(claims.get(ALL) or {})
    problems: list[str] = []
    if overall.get("eps") not in (None, guarantee["eps"]):
        problems.append(f"{ALL}: eps {overall['eps']} contradicts the guarantee's eps {guarantee['eps']}")
    # the headline promise is the guarantee's own eps and certified flag
    claims[ALL] = {**overall, "eps": guarantee["eps"], "certified": guarantee.get("certified")}
    recomputed: dict[str, dict[str, Any]] = {}
    for name, claim in sorted(claims.items()):
        if not claim.get("certified"):
            continue
        index = rows.get(name)
        if index is None:
            problems.append(f"{name}: no certify row has this segment value")
            continue
        eps, n = float(claim["eps"]), int(index.size)
        result = check_constraints(loss, [Constraint(name=name, eps=eps, index=index)], delta).results[0]
        k, bound, passed = result.losses, result.upper_bound, result.passed
        recomputed[name] = {"eps": eps, "n": n, "losses": k, "upper_bound": bound, "certified": passed}
        if not passed:
            problems.append(f"{name}: {k} losses in {n} {unit} do not certify risk <= {eps} at delta {delta}")
        elif claim.get("n") is not None and int(claim["n"]) != n:
            problems.append(f"{name}: the document claims {claim['n']} certify {unit}, the evidence has {n}")
        elif claim.get("upper_bound") is not None and (
                bound is None or not math.isclose(bound, float(claim["upper_bound"]), abs_tol=BOUND_TOLERANCE)):
            problems.append(f"{name}: the document claims an upper bound of {claim['upper_bound']}, "
                            f"the evidence gives {bound}")
    if problems:
        return Reverification("failed", "; ".join(problems), recomputed)
    if not recomputed:
        return Reverification("reverified", "no certificate is claimed (the policy never exits early)")
    return Reverification("reverified", f"{len(recomputed)} constraint(s) recomputed on "
                                        f"{int(rows[ALL].size)} certify {unit}: all pass", recomputed)
