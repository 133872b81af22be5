"""Reconciliation: make MLflow mirror the store's desired state of one model (idempotent).

Versions are found by their ``exitwise.store_version`` / ``exitwise.content_hash`` tags
before anything is created, a half-logged run is reused (see
:mod:`exitwise.policies.mlflow.publish`), duplicates from a race are removed, and MLflow
versions the store does not know are tagged stale. Aliases and kill-switch tags then follow
the store. Safe to repeat after any partial failure.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from exitwise.calibration.exceptions import MissingDependency
from exitwise.policies.errors import PolicyError
from exitwise.policies.mlflow.config import (
    REPORT_ARTIFACT,
    TAG_ACTIVE_IN,
    TAG_CONTENT_HASH,
    TAG_KILLED_IN,
    TAG_KILLED_PREFIX,
    TAG_REPORT,
    TAG_REPORT_STATE,
    TAG_STALE,
    TAG_STATE,
    TAG_STORE_VERSION,
    MlflowConfig,
    model_uri,
    registered_model_name,
)
from exitwise.policies.mlflow.errors import RegistryError, translate
from exitwise.policies.mlflow.payload import VersionRecord
from exitwise.policies.mlflow.publish import (
    ReportSource,
    attached_report,
    ensure_registered_model,
    log_report,
    model_versions,
    register_version,
)

log = logging.getLogger(__name__)

DocumentSource = Callable[[int], Mapping[str, Any]]  # store version number -> its policy document
_ALIAS_RE = re.compile(r"^[\w\-]+$")
_RESERVED_ALIAS_RE = re.compile(r"^([vV]\d+|latest)$", re.IGNORECASE)


@dataclass(frozen=True)
class DesiredState:
    """The store's view of one model: its versions, the active version per env, kill switches."""

    model: str
    versions: tuple[VersionRecord, ...]
    active: Mapping[str, int] = field(default_factory=dict)  # environment -> store version number
    killed: Mapping[str, bool] = field(default_factory=dict)  # environment -> kill switch on


@dataclass(frozen=True)
class SyncResult:
    """What one reconciliation did; ``versions`` maps store version -> MLflow version."""

    model: str
    registered_model: str
    versions: Mapping[int, str]
    registered: tuple[int, ...]
    aliases: Mapping[str, str]  # alias -> MLflow version after the sync
    aliases_set: tuple[str, ...]
    aliases_removed: tuple[str, ...]
    duplicates_removed: tuple[str, ...]
    stale: tuple[str, ...]
    runs: Mapping[int, str] = field(default_factory=dict)  # store version -> the run of its MLflow version
    monitor: Mapping[int, int] = field(default_factory=dict)  # store version -> monitoring metrics logged now

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model, "registered_model": self.registered_model,
            "versions": {str(k): v for k, v in sorted(self.versions.items())},
            "registered": list(self.registered), "aliases": dict(sorted(self.aliases.items())),
            "aliases_set": list(self.aliases_set), "aliases_removed": list(self.aliases_removed),
            "duplicates_removed": list(self.duplicates_removed), "stale": list(self.stale),
            "runs": {str(k): v for k, v in sorted(self.runs.items())},
            "monitor_metrics": {str(k): v for k, v in sorted(self.monitor.items())},
        }

    def uris(self) -> dict[str, str]:
        """alias -> the ``models:/exit-policy-<model>@<alias>`` URI that ``mlflow.pyfunc.load_model`` takes."""
        return {alias: model_uri(self.model, alias) for alias in self.aliases}


def reconcile(
    client: Any,
    config: MlflowConfig,
    desired: DesiredState,
    *,
    document_for: DocumentSource | None = None,
    report_for: ReportSource | None = None,
) -> SyncResult:
    """Make MLflow mirror ``desired``; idempotent, safe to repeat after any partial failure.

    - every stored version has exactly one MLflow version tagged with its number and hash
      (registered in store order when missing; duplicates from concurrent syncs deleted);
    - MLflow versions whose number/hash the store does not have are tagged ``exitwise.stale``;
    - the alias of each environment points at the version active there; other aliases go;
    - the kill switch, state and environments show as tags.

    Documents are read through ``document_for(number)`` only for versions MLflow lacks
    (when the record carries none); ``report_for(number)`` gives the audit report to attach.
    """
    name = registered_model_name(desired.model)
    try:
        return _reconcile(client, config, name, desired, document_for, report_for)
    except (PolicyError, MissingDependency):
        raise
    except Exception as exc:
        raise translate(exc, f"syncing {name}", config) from exc


def _reconcile(
    client: Any, config: MlflowConfig, name: str, desired: DesiredState,
    document_for: DocumentSource | None,
    report_for: ReportSource | None,
) -> SyncResult:
    ensure_registered_model(client, name, desired.model)
    by_number: dict[int, list[Any]] = {}
    listed = model_versions(client, name)
    for mv in listed:
        tag = (mv.tags or {}).get(TAG_STORE_VERSION)
        if tag is not None and tag.isdigit():
            by_number.setdefault(int(tag), []).append(mv)
    wanted = {rec.number: rec for rec in desired.versions}
    kept: dict[int, Any] = {}
    registered: list[int] = []
    removed: list[str] = []
    for number in sorted(wanted):
        rec = wanted[number]
        same = _same_versions(by_number.get(number, []), rec)
        if not same:
            doc = rec.document if rec.document is not None else _document(document_for, rec)
            created = register_version(client, config, name, rec, doc, report_for)
            registered.append(number)
            # a concurrent sync may have registered the same version: keep the oldest
            same = _same_versions(model_versions(client, name), rec) or [created]
        for dup in same[1:]:
            client.delete_model_version(name, str(dup.version))
            removed.append(str(dup.version))
        kept[number] = same[0]
    stale: list[str] = []
    keep_versions = {str(mv.version) for mv in kept.values()}
    for mv in listed:
        if str(mv.version) in keep_versions or str(mv.version) in removed:
            continue
        if (mv.tags or {}).get(TAG_STALE) != "true":
            client.set_model_version_tag(name, str(mv.version), TAG_STALE, "true")
        stale.append(str(mv.version))
    _update_version_tags(client, name, desired, kept, report_for)
    aliases, set_, gone = _update_aliases(client, name, desired, kept)
    _update_kill_tags(client, name, desired)
    return SyncResult(
        model=desired.model, registered_model=name,
        versions={n: str(mv.version) for n, mv in kept.items()}, registered=tuple(registered),
        aliases=aliases, aliases_set=tuple(set_), aliases_removed=tuple(gone),
        duplicates_removed=tuple(removed), stale=tuple(stale),
        runs={n: str(mv.run_id) for n, mv in kept.items() if mv.run_id},
    )


def _document(document_for: DocumentSource | None, rec: VersionRecord) -> Mapping[str, Any]:
    """``rec``'s stored document, checked against the content hash the record carries."""
    if document_for is None:
        raise ValueError(f"version {rec.number} of {rec.model} has no document and no document_for was given")
    doc = document_for(rec.number)
    if doc.get("content_hash") != rec.content_hash:
        raise RegistryError(f"{rec.model} v{rec.number}: stored document hash does not match its record")
    return doc


def _same_versions(versions: list[Any], rec: VersionRecord) -> list[Any]:
    """MLflow versions tagged with ``rec``'s store number and content hash, oldest first."""
    want = (str(rec.number), rec.content_hash)
    found = [mv for mv in versions
             if ((mv.tags or {}).get(TAG_STORE_VERSION), (mv.tags or {}).get(TAG_CONTENT_HASH)) == want]
    return sorted(found, key=lambda mv: int(mv.version))


def _update_version_tags(
    client: Any, name: str, desired: DesiredState, kept: Mapping[int, Any],
    report_for: ReportSource | None,
) -> None:
    states = {rec.number: rec.state for rec in desired.versions}
    for number, mv in kept.items():
        tags = mv.tags or {}
        envs = sorted(env for env, n in desired.active.items() if n == number)
        killed = [env for env in envs if desired.killed.get(env)]
        want = {TAG_STATE: states[number], TAG_ACTIVE_IN: ",".join(envs), TAG_KILLED_IN: ",".join(killed)}
        for key, value in want.items():
            if value == "" and key in (TAG_ACTIVE_IN, TAG_KILLED_IN):
                if key in tags:
                    client.delete_model_version_tag(name, str(mv.version), key)
            elif tags.get(key) != value:
                client.set_model_version_tag(name, str(mv.version), key, value)
        # the report shows approvals and where the version serves: refresh it when the state moved
        stale_report = TAG_REPORT not in tags or tags.get(TAG_REPORT_STATE) != states[number]
        if stale_report and report_for is not None and mv.run_id:
            report = attached_report(report_for, number)
            if report is not None:
                log_report(client, mv.run_id, report)
                client.set_model_version_tag(name, str(mv.version), TAG_REPORT, REPORT_ARTIFACT)
                client.set_model_version_tag(name, str(mv.version), TAG_REPORT_STATE, states[number])


def _update_aliases(
    client: Any, name: str, desired: DesiredState, kept: Mapping[int, Any]
) -> tuple[dict[str, str], list[str], list[str]]:
    current = dict(client.get_registered_model(name).aliases or {})
    want: dict[str, str] = {}
    for env, number in desired.active.items():
        if not _alias_ok(env):
            log.warning("environment %r is not a valid MLflow alias; not mirrored", env)
            continue
        if number in kept:
            want[env] = str(kept[number].version)
    set_, gone = [], []
    for alias, version in sorted(want.items()):
        if str(current.get(alias)) != str(version):
            client.set_registered_model_alias(name, alias, version)
            set_.append(alias)
    for alias in sorted(set(current) - set(want)):
        client.delete_registered_model_alias(name, alias)
        gone.append(alias)
    return want, set_, gone


def _update_kill_tags(client: Any, name: str, desired: DesiredState) -> None:
    tags = dict(client.get_registered_model(name).tags or {})
    envs = set(desired.killed) | set(desired.active)
    for env in sorted(envs):
        value = "true" if desired.killed.get(env) else "false"
        if tags.get(TAG_KILLED_PREFIX + env) != value:
            client.set_registered_model_tag(name, TAG_KILLED_PREFIX + env, value)
    for key in sorted(tags):
        if key.startswith(TAG_KILLED_PREFIX) and key[len(TAG_KILLED_PREFIX):] not in envs:
            client.delete_registered_model_tag(name, key)


def _alias_ok(env: str) -> bool:
    """A name MLflow accepts as an alias (``v3`` and ``latest`` are reserved)."""
    return bool(_ALIAS_RE.match(env)) and not _RESERVED_ALIAS_RE.match(env) and len(env) <= 255
