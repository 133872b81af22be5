"""MLflow mirror of the policy store (issue 6): runs, registered model versions, aliases, tags.

Every stored policy version becomes one MLflow run (params, metrics, the policy JSON, plots,
the audit report) and one version of the registered model ``exit-policy-<model>`` with the
pyfunc flavour of :mod:`exitwise.policies.mlflow_model`. Aliases mirror the lifecycle: the version
active in environment ``production`` carries alias ``production``; the kill switch shows as
the tag ``exitwise.killed.<env>`` on the registered model (and ``exitwise.killed_in`` on the
version).

The policy database is the source of truth; MLflow is a mirror brought up to date by
:func:`reconcile` (desired state from the database -> MLflow), which is idempotent: versions
are found by their ``exitwise.store_version`` / ``exitwise.content_hash`` tags before anything
is created, a half-logged run is reused, duplicates from a race are removed. The database
side (pending syncs, ``sync_model``/``sync_all``) is further down.

Tracking store: ``MLFLOW_TRACKING_URI`` when set (any MLflow server), else the embedded
``sqlite:///<EXITWISE_DATA_DIR>/mlflow.db`` with artifacts under ``<data dir>/mlartifacts``
(never ``./mlruns``). mlflow is imported lazily (it is slow), through
:mod:`exitwise.policies.mlflow_model`, which turns its telemetry off before the import.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import BigInteger, Engine, Integer, String, Text, func, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from exitwise.calibration.optional import require
from exitwise.policies.canonical import GOVERNANCE_FIELDS, canonical_json
from exitwise.policies.db import translate_errors, unit_of_work
from exitwise.policies.errors import NotFound, PolicyError
from exitwise.policies.models import AuditEvent, Base, KillSwitch, Model, UTCDateTime, utcnow

log = logging.getLogger(__name__)

REGISTERED_MODEL_PREFIX = "exit-policy-"
MODEL_NAME = "policy"  # ``name=`` of the logged pyfunc model inside each run
REPORT_ARTIFACT = "report/audit_report.html"
TAG_MODEL = "exitwise.model"
TAG_STORE_VERSION = "exitwise.store_version"
TAG_CONTENT_HASH = "exitwise.content_hash"
TAG_AUTHOR = "exitwise.author"
TAG_FINGERPRINT = "exitwise.data_fingerprint"
TAG_STATE = "exitwise.state"
TAG_ACTIVE_IN = "exitwise.active_in"
TAG_KILLED_IN = "exitwise.killed_in"
TAG_KILLED_PREFIX = "exitwise.killed."
TAG_STALE = "exitwise.stale"
TAG_LOGGED = "exitwise.logged"
TAG_MODEL_ID = "exitwise.model_id"
TAG_REPORT = "exitwise.report"
TAG_REPORT_STATE = "exitwise.report_state"  # the version state the attached report was rendered in
_ALIAS_RE = re.compile(r"^[\w\-]+$")
_RESERVED_ALIAS_RE = re.compile(r"^([vV]\d+|latest)$", re.IGNORECASE)
_MAX_PARAM = 6000
# Fail fast when a server is down (MLflow's defaults retry for minutes); explicit settings win.
_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}
_FLUENT_LOCK = threading.RLock()  # mlflow's fluent API (log_model) uses process-global URIs


class RegistryError(PolicyError):
    """MLflow refused or failed an operation (the message quotes MLflow's)."""

    http_status = 502
    title = "MLflow registry error"


class RegistryUnavailable(RegistryError):
    """The MLflow tracking server or store cannot be reached; the sync stays pending."""

    http_status = 503
    title = "MLflow unavailable"


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class MlflowConfig:
    """Where exitwise mirrors policies: tracking and registry URIs, local artifact root."""

    tracking_uri: str
    registry_uri: str
    artifact_root: str | None  # file URI for local stores; None lets the server decide

    @property
    def is_remote(self) -> bool:
        return self.artifact_root is None


def mlflow_config(data_dir: str | os.PathLike[str] | None = None) -> MlflowConfig:
    """``MLFLOW_TRACKING_URI`` (and ``MLFLOW_REGISTRY_URI``) or the embedded SQLite store.

    Local stores (sqlite/file/other databases) get their artifacts under
    ``<data dir>/mlartifacts``; an http(s)/databricks server decides its own artifact store.
    """
    if data_dir is None:
        from exitwise.policies.settings import get_settings

        data_dir = get_settings().data_dir
    data = Path(data_dir).absolute()
    tracking = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{data / 'mlflow.db'}"
    registry = os.environ.get("MLFLOW_REGISTRY_URI") or tracking
    scheme = tracking.split(":", 1)[0].lower()
    remote = scheme in ("http", "https") or scheme.startswith("databricks")
    return MlflowConfig(tracking, registry, None if remote else (data / "mlartifacts").as_uri())


def registered_model_name(model: str) -> str:
    """``exit-policy-<model>``: the registered model that mirrors ``model``'s policies."""
    return f"{REGISTERED_MODEL_PREFIX}{model}"


def model_uri(model: str, environment: str | None = None, *, version: int | str | None = None) -> str:
    """``models:/exit-policy-<model>@<environment>`` (or ``/<mlflow version>``) for ``load_model``."""
    name = registered_model_name(model)
    if environment is not None:
        return f"models:/{name}@{environment}"
    if version is not None:
        return f"models:/{name}/{version}"
    raise ValueError("model_uri needs an environment or a version")


def _mlflow() -> Any:
    """Import mlflow with telemetry off (via policies.mlflow_model) and fail-fast HTTP defaults."""
    for key, value in _HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    from exitwise.policies import mlflow_model  # sets MLFLOW_DISABLE_TELEMETRY / DO_NOT_TRACK, then imports mlflow

    return mlflow_model.mlflow


def quiet_mlflow_logs() -> None:
    """Import mlflow and lower its INFO chatter (table creation, example validation) to warnings.

    For exitwise's own processes (CLI, API server); mlflow configures its loggers on import,
    so this must run after it.
    """
    _mlflow()
    for name in ("mlflow", "alembic"):
        logger = logging.getLogger(name)
        if logger.getEffectiveLevel() < logging.WARNING:
            logger.setLevel(logging.WARNING)


def client_for(config: MlflowConfig) -> Any:
    """An ``MlflowClient`` on ``config``'s URIs; creates the local data directory if needed."""
    if config.artifact_root is not None and config.tracking_uri.startswith("sqlite:///"):
        Path(config.tracking_uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    mlflow = _mlflow()
    return mlflow.MlflowClient(tracking_uri=config.tracking_uri, registry_uri=config.registry_uri)


def _is_unreachable(exc: BaseException) -> bool:
    """True for connection failures (server down, refused, timed out), not for MLflow's refusals."""
    import requests

    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, requests.exceptions.ConnectionError | requests.exceptions.Timeout | ConnectionError):
            return True
        text = str(e)
        if "Max retries exceeded" in text or "Connection refused" in text or "Failed to establish" in text:
            return True
        e = e.__cause__ or e.__context__
    return False


def translate(exc: BaseException, what: str, config: MlflowConfig | None = None) -> RegistryError:
    """An MLflow/transport failure as :class:`RegistryUnavailable` or :class:`RegistryError`."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    where = f" at {redact_uri(config.tracking_uri)}" if config is not None else ""
    if _is_unreachable(exc):
        low = message.lower()
        cause = ("connection refused" if "refused" in low else "timed out" if "timed out" in low or "timeout" in low
                 else message[:200])
        return RegistryUnavailable(f"MLflow unreachable{where} while {what}: {cause}")
    return RegistryError(f"MLflow failed{where} while {what}: {message[:300]}")


def _error_code(exc: BaseException) -> str | None:
    return getattr(exc, "error_code", None)


# --------------------------------------------------------------------------- desired state


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

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model, "registered_model": self.registered_model,
            "versions": {str(k): v for k, v in sorted(self.versions.items())},
            "registered": list(self.registered), "aliases": dict(sorted(self.aliases.items())),
            "aliases_set": list(self.aliases_set), "aliases_removed": list(self.aliases_removed),
            "duplicates_removed": list(self.duplicates_removed), "stale": list(self.stale),
        }


# --------------------------------------------------------------------------- run contents


def policy_json(doc: Mapping[str, Any]) -> bytes:
    """The hash-verifiable policy document: canonical JSON without governance fields but the hash."""
    body = {k: v for k, v in doc.items() if k not in GOVERNANCE_FIELDS or k == "content_hash"}
    return canonical_json(body)


def _key(text: str) -> str:
    """A valid MLflow param/metric name part (alphanumerics, ``_ - . :`` and spaces); ``*`` reads ``all``."""
    out = re.sub(r"[^\w.\- :]", "_", str(text).replace("*", "all")).strip() or "_"
    return re.sub(r"\.{2,}", "_", out)


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(float(x))


def _param_value(v: Any) -> str:
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
    for e in doc.get("exits") or []:
        cal = e.get("calibrator") or {"type": "identity"}
        p[f"calibrator.{_key(e.get('name'))}"] = cal.get("type")
    for k, v in _flatten(doc.get("solver") or {}, "solver").items():
        p[k] = v
    return {_key(k): _param_value(v) for k, v in p.items() if v is not None and v != ""}


def _flatten(obj: Mapping[str, Any], prefix: str, depth: int = 0) -> dict[str, Any]:
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


def _description(rec: VersionRecord, doc: Mapping[str, Any]) -> str:
    g = doc.get("guarantee") or {}
    exp = doc.get("expected") or {}
    cf = exp.get("compute_fraction")
    return (
        f"exitwise policy v{rec.number} of {rec.model}: {g.get('risk')} <= {g.get('eps')} "
        f"with confidence {1 - float(g.get('delta', 0) or 0):g}"
        + (f", compute fraction {cf:.4f}" if _finite(cf) else "")
        + f"; certified={g.get('certified')}; content {rec.content_hash[:12]}"
    )


def _identity_tags(rec: VersionRecord, doc: Mapping[str, Any]) -> dict[str, str]:
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


def _pip_requirements() -> list[str]:
    import mlflow
    import numpy
    import pandas

    return [f"mlflow=={mlflow.__version__}", f"numpy=={numpy.__version__}", f"pandas=={pandas.__version__}"]


# --------------------------------------------------------------------------- MLflow operations


def _ensure_registered_model(client: Any, name: str, model: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if _error_code(exc) != "RESOURCE_DOES_NOT_EXIST":
            raise
    try:
        client.create_registered_model(
            name, tags={TAG_MODEL: model},
            description=f"Exit policies of {model}, mirrored from the exitwise policy store. "
            "Aliases are the environments a version is active in; managed by exitwise.",
        )
    except MlflowException as exc:
        if _error_code(exc) not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    return client.get_registered_model(name)


def _experiment_id(client: Any, config: MlflowConfig, name: str, model: str) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    location = f"{config.artifact_root}/{name}" if config.artifact_root else None
    try:
        return client.create_experiment(name, artifact_location=location, tags={TAG_MODEL: model})
    except MlflowException as exc:
        if _error_code(exc) not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
        return client.get_experiment_by_name(name).experiment_id


def _model_versions(client: Any, name: str) -> list[Any]:
    out: list[Any] = []
    token = None
    while True:
        page = client.search_model_versions(f"name = '{name}'", max_results=1000, page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


def _logged_run(client: Any, experiment_id: str, rec: VersionRecord) -> tuple[str, str] | None:
    """A finished earlier run that logged this very version (a registration cut short), if any."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=(
            f"tags.`{TAG_STORE_VERSION}` = '{rec.number}' and tags.`{TAG_CONTENT_HASH}` = '{rec.content_hash}' "
            f"and tags.`{TAG_LOGGED}` = 'true'"
        ),
        max_results=10,
        order_by=["attributes.start_time ASC"],
    )
    for run in runs:
        model_id = run.data.tags.get(TAG_MODEL_ID)
        if model_id:
            return run.info.run_id, model_id
    return None


def _log_run(
    client: Any, config: MlflowConfig, experiment_id: str, rec: VersionRecord, doc: Mapping[str, Any],
    report: bytes | None,
) -> tuple[str, str]:
    """Log one version as a run with its pyfunc model; returns (run id, logged model id)."""
    mlflow = _mlflow()
    from exitwise.policies import mlflow_model as mm

    tags = _identity_tags(rec, doc) | {"mlflow.note.content": _description(rec, doc)}
    run = client.create_run(experiment_id, run_name=f"{rec.model}-v{rec.number}", tags=tags)
    run_id = run.info.run_id
    try:
        with tempfile.TemporaryDirectory(prefix="exitwise-mlflow-") as tmp:
            tmpdir = Path(tmp)
            doc_path = tmpdir / "policy.json"
            doc_path.write_bytes(policy_json(doc))
            entry = tmpdir / "exit_policy_model.py"
            entry.write_text(mm.ENTRY_POINT, encoding="utf-8")
            plots = tmpdir / "plots"
            plots.mkdir()
            curve = curve_png(doc)
            if curve is not None:
                (plots / "compute_vs_risk.png").write_bytes(curve)
            for name, png in reliability_pngs(doc).items():
                (plots / f"reliability_{name}.png").write_bytes(png)
            with _fluent_uris(config), mlflow.start_run(run_id=run_id):
                info = mlflow.pyfunc.log_model(
                    name=MODEL_NAME,
                    python_model=str(entry),
                    artifacts={mm.POLICY_ARTIFACT: str(doc_path)},
                    signature=mm.signature(doc),
                    input_example=mm.input_example(doc),
                    pip_requirements=_pip_requirements(),
                    metadata={"exitwise": _identity_tags(rec, doc)},
                )
                _log_contents(client, run_id, doc, doc_path, plots, report)
                client.set_tag(run_id, TAG_MODEL_ID, info.model_id)
                client.set_tag(run_id, TAG_LOGGED, "true")
    except BaseException:
        with contextlib.suppress(Exception):  # the server may be the reason we are here
            client.set_terminated(run_id, "FAILED")
        raise
    return run_id, info.model_id


@contextlib.contextmanager
def _fluent_uris(config: MlflowConfig) -> Iterator[None]:
    """Point mlflow's fluent API (``log_model`` needs it) at ``config``, then restore everything.

    ``mlflow.set_tracking_uri``/``set_registry_uri`` also write ``MLFLOW_TRACKING_URI`` /
    ``MLFLOW_REGISTRY_URI`` into the process environment; both the module state and the
    environment are put back, so exitwise never changes where a host process logs.
    """
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    keys = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    with _FLUENT_LOCK:
        env = {k: os.environ.get(k) for k in keys}
        saved = (getattr(tracking_utils, "_tracking_uri", None), getattr(registry_utils, "_registry_uri", None))
        try:
            mlflow.set_tracking_uri(config.tracking_uri)
            mlflow.set_registry_uri(config.registry_uri)
            yield
        finally:
            if hasattr(tracking_utils, "_tracking_uri"):
                tracking_utils._tracking_uri = saved[0]
            if hasattr(registry_utils, "_registry_uri"):
                registry_utils._registry_uri = saved[1]
            for key, value in env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            with contextlib.suppress(Exception):  # the tracer provider caches the URI
                from mlflow.tracing.provider import reset

                reset()


def _log_contents(
    client: Any, run_id: str, doc: Mapping[str, Any], doc_path: Path, plots: Path, report: bytes | None
) -> None:
    from mlflow.entities import Metric, Param

    now = int(time.time() * 1000)
    params = [Param(k, v) for k, v in sorted(run_params(doc).items())]
    metrics = [Metric(k, v, now, 0) for k, v in sorted(run_metrics(doc).items())]
    for i in range(0, max(len(params), len(metrics)), 100):
        client.log_batch(run_id, metrics=metrics[i: i + 100], params=params[i: i + 100])
    client.log_artifact(run_id, str(doc_path))
    if any(plots.iterdir()):
        client.log_artifacts(run_id, str(plots), "plots")
    if report is not None:
        _log_report(client, run_id, report)


def _log_report(client: Any, run_id: str, report: bytes) -> None:
    with tempfile.TemporaryDirectory(prefix="exitwise-report-") as tmp:
        path = Path(tmp) / Path(REPORT_ARTIFACT).name
        path.write_bytes(report)
        client.log_artifact(run_id, str(path), str(Path(REPORT_ARTIFACT).parent))
    client.set_tag(run_id, TAG_REPORT, REPORT_ARTIFACT)


def _register(
    client: Any, config: MlflowConfig, name: str, rec: VersionRecord, doc: Mapping[str, Any],
    report_for: Callable[[int], bytes | None] | None,
) -> Any:
    experiment_id = _experiment_id(client, config, name, rec.model)
    found = _logged_run(client, experiment_id, rec)
    report = None
    if found is None:
        report = _report(report_for, rec.number)
        found = _log_run(client, config, experiment_id, rec, doc, report)
    run_id, model_id = found
    tags = _identity_tags(rec, doc) | {TAG_STATE: rec.state}
    if report is not None:
        tags |= {TAG_REPORT: REPORT_ARTIFACT, TAG_REPORT_STATE: rec.state}
    with _fluent_uris(config):  # a local registry store resolves models:/<id> through the global tracking URI
        return client.create_model_version(
            name=name, source=f"models:/{model_id}", run_id=run_id, tags=tags,
            description=_description(rec, doc), model_id=model_id,
        )


def _alias_ok(env: str) -> bool:
    return bool(_ALIAS_RE.match(env)) and not _RESERVED_ALIAS_RE.match(env) and len(env) <= 255


def reconcile(
    client: Any,
    config: MlflowConfig,
    desired: DesiredState,
    *,
    document_for: Callable[[int], Mapping[str, Any]] | None = None,
    report_for: Callable[[int], bytes | None] | None = None,
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
    except PolicyError:
        raise
    except Exception as exc:
        raise translate(exc, f"syncing {name}", config) from exc


def _reconcile(
    client: Any, config: MlflowConfig, name: str, desired: DesiredState,
    document_for: Callable[[int], Mapping[str, Any]] | None,
    report_for: Callable[[int], bytes | None] | None,
) -> SyncResult:
    _ensure_registered_model(client, name, desired.model)
    by_number: dict[int, list[Any]] = {}
    listed = _model_versions(client, name)
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
            created = _register(client, config, name, rec, doc, report_for)
            registered.append(number)
            # a concurrent sync may have registered the same version: keep the oldest
            same = _same_versions(_model_versions(client, name), rec) or [created]
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
    )


def _document(document_for: Callable[[int], Mapping[str, Any]] | None, rec: VersionRecord) -> Mapping[str, Any]:
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


def _report(report_for: Callable[[int], bytes | None] | None, number: int) -> bytes | None:
    if report_for is None:
        return None
    try:
        return report_for(number)
    except Exception as exc:  # the report is an attachment: never block the mirror on it
        log.warning("audit report of version %s not attached: %s", number, exc)
        return None


def _update_version_tags(
    client: Any, name: str, desired: DesiredState, kept: Mapping[int, Any],
    report_for: Callable[[int], bytes | None] | None,
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
            report = _report(report_for, number)
            if report is not None:
                _log_report(client, mv.run_id, report)
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


def alias_version(model: str, environment: str, *, config: MlflowConfig | None = None, client: Any = None) -> str:
    """The MLflow version behind ``exit-policy-<model>@<environment>``; ``NotFound`` when unset."""
    from mlflow.exceptions import MlflowException

    config = config or mlflow_config()
    name = registered_model_name(model)
    try:
        client = client or client_for(config)
        return str(client.get_model_version_by_alias(name, environment).version)
    except MlflowException as exc:
        if _error_code(exc) in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            raise NotFound(f"MLflow has no alias {environment!r} on {name} (run 'exitwise mlflow sync {model}'; "
                           f"is a version active in {environment!r}?)") from None
        raise translate(exc, f"reading {name}@{environment}", config) from exc
    except Exception as exc:
        raise translate(exc, f"reading {name}@{environment}", config) from exc


def find_version(model: str, number: int, *, config: MlflowConfig | None = None, client: Any = None) -> str:
    """The MLflow version registered for store version ``number``; ``NotFound`` when not mirrored."""
    config = config or mlflow_config()
    name = registered_model_name(model)
    try:
        client = client or client_for(config)
        found = [mv for mv in _model_versions(client, name)
                 if (mv.tags or {}).get(TAG_STORE_VERSION) == str(number) and (mv.tags or {}).get(TAG_STALE) != "true"]
    except Exception as exc:
        raise translate(exc, f"listing {name}", config) from exc
    if not found:
        raise NotFound(f"{model} v{number} is not registered in MLflow (run 'exitwise mlflow sync {model}')")
    return str(min(int(mv.version) for mv in found))


# --------------------------------------------------------------------------- the store side


class MlflowSync(Base):
    """How far the MLflow mirror of one model has caught up (migration ``0002``).

    The audit trail is the outbox: a model needs a sync while it has audit events with
    ``seq > synced_seq`` or when it was last synced to another tracking URI.
    """

    __tablename__ = "mlflow_sync"

    model: Mapped[str] = mapped_column(String(200), primary_key=True)
    synced_seq: Mapped[int] = mapped_column(BigInteger, default=0)
    tracking_uri: Mapped[str | None] = mapped_column(String(1000))
    synced_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    attempted_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    failures: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)


@dataclass(frozen=True)
class SyncStatus:
    """One model's mirror state as the policy database records it (no MLflow call)."""

    model: str
    audit_seq: int
    synced_seq: int
    pending: bool
    tracking_uri: str | None
    synced_at: datetime | None
    attempted_at: datetime | None
    failures: int
    last_error: str | None

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("synced_at", "attempted_at"):
            out[key] = out[key].isoformat() if out[key] is not None else None
        return out


@dataclass(frozen=True)
class SyncOutcome:
    """The result of syncing one model: ``result`` when MLflow was updated, else ``error``."""

    model: str
    ok: bool
    synced_seq: int
    audit_seq: int = 0  # the model's audit head when the attempt read the store
    result: SyncResult | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "ok": self.ok, "synced_seq": self.synced_seq, "audit_seq": self.audit_seq,
                "error": self.error,
                "result": self.result.to_json() if self.result is not None else None}


def redact_uri(uri: str) -> str:
    """``uri`` without user/password (tracking URIs may carry credentials)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))


def _audit_heads(session: Session, model: str | None = None) -> dict[str, int]:
    q = select(AuditEvent.model, func.max(AuditEvent.seq)).where(AuditEvent.model.is_not(None))
    if model is not None:
        q = q.where(AuditEvent.model == model)
    return {m: int(seq) for m, seq in session.execute(q.group_by(AuditEvent.model))}


def sync_status(*, session: Session, config: MlflowConfig | None = None) -> list[SyncStatus]:
    """Every model's mirror state; ``pending`` when MLflow is behind the audit trail (or elsewhere)."""
    config = config or mlflow_config()
    uri = redact_uri(config.tracking_uri)
    with translate_errors():
        heads = _audit_heads(session)
        rows = {r.model: r for r in session.scalars(select(MlflowSync))}
        names = sorted(set(session.scalars(select(Model.name))) | set(heads))
    out = []
    for name in names:
        r = rows.get(name)
        head = heads.get(name, 0)
        synced = r.synced_seq if r is not None else 0
        pending = head > synced or (r is not None and r.tracking_uri != uri) or r is None
        out.append(SyncStatus(
            model=name, audit_seq=head, synced_seq=synced, pending=pending,
            tracking_uri=r.tracking_uri if r else None, synced_at=r.synced_at if r else None,
            attempted_at=r.attempted_at if r else None, failures=r.failures if r else 0,
            last_error=r.last_error if r else None,
        ))
    return out


def pending_models(*, session: Session, config: MlflowConfig | None = None) -> list[str]:
    """Models whose MLflow mirror is behind the policy database."""
    return [s.model for s in sync_status(session=session, config=config) if s.pending]


def desired_state(model: str, *, session: Session) -> tuple[DesiredState, int]:
    """The store's view of ``model`` (no documents) and its audit head, read in one transaction."""
    from exitwise.policies import store

    with translate_errors():
        head = _audit_heads(session, model).get(model, 0)
        info = next((m for m in store.list_models(session=session) if m.name == model), None)
        if info is None:
            raise NotFound(f"no model named {model!r}")
        versions = tuple(
            VersionRecord(model=model, number=v.number, content_hash=v.content_hash, author=v.author,
                          state=v.state, data_fingerprint=v.data_fingerprint)
            for v in store.list_versions(model, session=session)
        )
        envs = set(info.active) | set(info.killed)
        killed = {env: env in info.killed for env in envs}
        for env in session.scalars(select(KillSwitch.environment).join(Model).where(Model.name == model)):
            killed.setdefault(env, False)
    return DesiredState(model=model, versions=versions, active=dict(info.active), killed=killed), head


def _loaders(engine: Engine, model: str, reports: bool) -> tuple[Callable[[int], Mapping[str, Any]],
                                                                  Callable[[int], bytes | None] | None]:
    from exitwise.policies import store

    def document_for(number: int) -> Mapping[str, Any]:
        with unit_of_work(engine, readonly=True) as s:
            return store.get_version(model, number, session=s).document

    def report_for(number: int) -> bytes | None:
        from exitwise.policies import report

        with unit_of_work(engine, readonly=True) as s:
            return report.report_bytes(s, model, number, "html")

    return document_for, (report_for if reports else None)


def _record(engine: Engine, model: str, config: MlflowConfig, *, synced_seq: int | None, error: str | None) -> int:
    """Write the outcome of one attempt; returns the synced seq now recorded."""
    now = utcnow()
    with unit_of_work(engine) as s:
        row = s.get(MlflowSync, model)
        if row is None:
            row = MlflowSync(model=model, synced_seq=0, failures=0)
            s.add(row)
        row.attempted_at = now
        if error is None and synced_seq is not None:
            uri = redact_uri(config.tracking_uri)
            if row.tracking_uri != uri:
                row.synced_seq = 0
            row.synced_seq = max(row.synced_seq, synced_seq)
            row.tracking_uri, row.synced_at, row.failures, row.last_error = uri, now, 0, None
        else:
            row.failures = (row.failures or 0) + 1
            row.last_error = (error or "")[:2000]
        return row.synced_seq


def sync_model(
    engine: Engine,
    model: str,
    *,
    config: MlflowConfig | None = None,
    client: Any = None,
    reports: bool = True,
) -> SyncOutcome:
    """Bring ``model``'s MLflow mirror up to date with the policy database (idempotent).

    Reads the store in a short read-only transaction, talks to MLflow with no transaction
    open, then records the outcome. MLflow failures do not raise: they are recorded (the
    model stays pending) and returned as ``ok=False``; database failures raise.
    """
    config = config or mlflow_config()
    with unit_of_work(engine, readonly=True) as s:
        desired, head = desired_state(model, session=s)
    document_for, report_for = _loaders(engine, model, reports)
    try:
        client = client or client_for(config)
        result = reconcile(client, config, desired, document_for=document_for, report_for=report_for)
    except PolicyError as exc:
        if not isinstance(exc, RegistryError):
            raise
        seq = _record(engine, model, config, synced_seq=None, error=str(exc))
        log.warning("MLflow sync of %s failed (stays pending): %s", model, exc)
        return SyncOutcome(model=model, ok=False, synced_seq=seq, audit_seq=head, error=str(exc))
    except Exception as exc:  # mlflow import/config problems: same treatment, never a crash
        err = translate(exc, f"syncing {registered_model_name(model)}", config)
        seq = _record(engine, model, config, synced_seq=None, error=str(err))
        log.warning("MLflow sync of %s failed (stays pending): %s", model, err)
        return SyncOutcome(model=model, ok=False, synced_seq=seq, audit_seq=head, error=str(err))
    seq = _record(engine, model, config, synced_seq=head, error=None)
    return SyncOutcome(model=model, ok=True, synced_seq=seq, audit_seq=head, result=result)


def sync_all(
    engine: Engine,
    *,
    config: MlflowConfig | None = None,
    client: Any = None,
    only_pending: bool = False,
    reports: bool = True,
) -> list[SyncOutcome]:
    """Sync every model (or only the pending ones); stops talking to MLflow once it is unreachable."""
    config = config or mlflow_config()
    with unit_of_work(engine, readonly=True) as s:
        statuses = sync_status(session=s, config=config)
    models = [st.model for st in statuses if st.pending or not only_pending]
    outcomes: list[SyncOutcome] = []
    for i, model in enumerate(models):
        outcome = sync_model(engine, model, config=config, client=client, reports=reports)
        outcomes.append(outcome)
        if not outcome.ok and outcome.error and outcome.error.startswith("MLflow unreachable"):
            for rest in models[i + 1:]:  # record the outage without waiting on the server again
                seq = _record(engine, rest, config, synced_seq=None, error=outcome.error)
                outcomes.append(SyncOutcome(model=rest, ok=False, synced_seq=seq, error=outcome.error))
            break
    return outcomes


# --------------------------------------------------------------------------- after-commit hook


class SyncHook:
    """``exitwise.policies.events`` callback: after a committed change, sync the changed model to MLflow.

    Inline by default (the CLI: the command returns once MLflow is up to date); with
    ``background=True`` a single worker thread does it (the API: requests never wait on
    MLflow). A failed sync is recorded and stays pending; after a successful one, the hook
    also retries the other pending models, so the next successful operation catches up.
    ``EXITWISE_MLFLOW_SYNC=off`` disables it.
    """

    def __init__(self, engine: Engine | None = None, *, config: MlflowConfig | None = None,
                 background: bool = False, reports: bool = True, quiet: bool = True):
        self.engine = engine
        self.config = config
        self.reports = reports
        self.quiet = quiet
        self.background = background
        self._covered: dict[str, int] = {}
        self._lock = threading.Lock()
        self._queue: list[str] = []
        self._wake = threading.Condition(self._lock)
        self._busy = False
        self._closed = False
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(target=self._worker, name="exitwise-mlflow-sync", daemon=True)
            self._thread.start()

    def __call__(self, event: Any) -> None:
        model = getattr(event, "model", None)
        if model is None or os.environ.get("EXITWISE_MLFLOW_SYNC", "on").lower() in ("0", "off", "false", "no"):
            return
        with self._lock:
            if self._covered.get(model, 0) >= int(getattr(event, "seq", 0)):
                return  # an earlier sync in this process already saw this commit
            if self.background:
                if model not in self._queue:
                    self._queue.append(model)
                self._wake.notify()
                return
        self._sync(model)

    def _engine(self) -> Engine:
        if self.engine is None:
            from exitwise.policies.db import open_store

            self.engine = open_store()
        return self.engine

    def _sync(self, model: str) -> None:
        engine = self._engine()
        config = self.config or mlflow_config()
        if self.quiet:
            quiet_mlflow_logs()
        try:
            outcome = sync_model(engine, model, config=config, reports=self.reports)
        except NotFound:  # the event came from another database in this process (events are global)
            return
        with self._lock:  # the events of this commit were seen (synced, or recorded as pending)
            self._covered[model] = max(self._covered.get(model, 0), outcome.audit_seq)
        if not outcome.ok:
            return
        with unit_of_work(engine, readonly=True) as s:
            others = [m for m in pending_models(session=s, config=config) if m != model]
        for other in others:
            if not sync_model(engine, other, config=config, reports=self.reports).ok:
                break

    def _worker(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closed:
                    self._wake.wait()
                if self._closed and not self._queue:
                    return
                model = self._queue.pop(0)
                self._busy = True
            try:
                self._sync(model)
            except Exception:  # the database may be down too; the audit trail keeps it pending
                log.exception("MLflow sync of %s failed", model)
            finally:
                with self._lock:
                    self._busy = False
                    self._wake.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until the background queue is empty; True when it is."""
        with self._lock:
            return self._wake.wait_for(lambda: not self._queue and not self._busy, timeout)

    def close(self) -> None:
        """Unregister from ``exitwise.policies.events`` and stop the worker after the queued syncs."""
        from exitwise.policies import events

        events.remove(self)
        with self._lock:
            self._closed = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join()


def install_hook(engine: Engine | None = None, *, config: MlflowConfig | None = None,
                 background: bool = False, reports: bool = True, quiet: bool = True) -> SyncHook:
    """Register a :class:`SyncHook` with ``exitwise.policies.events.on_commit`` and return it.

    ``engine=None`` opens the configured store on first use (the CLI); the API passes its
    engine and ``background=True``. ``quiet`` lowers mlflow's INFO logs to warnings.
    """
    from exitwise.policies import events

    hook = SyncHook(engine, config=config, background=background, reports=reports, quiet=quiet)
    events.on_commit(hook)
    return hook
