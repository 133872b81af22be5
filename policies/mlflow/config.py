"""Where exitwise mirrors policies in MLflow, what it names things there, and how mlflow is loaded.

Tracking store: ``MLFLOW_TRACKING_URI`` when set (any MLflow server), else the embedded
``sqlite:///<EXITWISE_DATA_DIR>/mlflow.db`` with artifacts under ``<data dir>/mlartifacts``
(never ``./mlruns``). mlflow is an optional extra (``exitwise[mlflow]``) and slow to import
(1.3 s, three times ``exitwise --help``), so no module of this package but ``pyfunc`` imports
it at the top: everything gets
it from :func:`load_mlflow`, which turns MLflow's telemetry off and sets fail-fast HTTP
defaults first, and raises :class:`~exitwise.calibration.exceptions.MissingDependency` when
the extra is not installed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from exitwise.calibration.optional import require
from exitwise.policies.settings import get_settings

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

FEATURE = "the MLflow mirror"  # what MissingDependency names when mlflow is not installed
# exitwise never lets MLflow phone home: MLflow reads these when it creates its telemetry client.
TELEMETRY_OFF = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
# Fail fast when a server is down (MLflow's defaults retry for minutes); explicit settings win.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}
_FLUENT_LOCK = threading.RLock()  # mlflow's fluent API (log_model) uses process-global URIs


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
    data = Path(get_settings().data_dir if data_dir is None else data_dir).absolute()
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


def redact_uri(uri: str) -> str:
    """``uri`` without user/password (tracking URIs may carry credentials)."""
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))


def load_mlflow() -> ModuleType:
    """The ``mlflow`` module, with telemetry off and fail-fast HTTP defaults; the one way in.

    Sets the telemetry switches before mlflow is first imported, and drops a telemetry client
    that a host process created by importing mlflow earlier. Raises ``MissingDependency``
    (naming ``exitwise[mlflow]``) when mlflow is not installed.
    """
    os.environ.update(TELEMETRY_OFF)
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    mlflow = require("mlflow", "mlflow", FEATURE)  # here, not at the top: an optional extra, 1.3 s to import
    telemetry = require("mlflow.telemetry", "mlflow", FEATURE)
    if telemetry.get_telemetry_client() is not None:
        telemetry.set_telemetry_client()  # re-reads MLFLOW_DISABLE_TELEMETRY and installs no client
    return mlflow


def load_pyfunc() -> ModuleType:
    """:mod:`exitwise.policies.mlflow.pyfunc` (it imports mlflow at the top), after :func:`load_mlflow`."""
    load_mlflow()
    return require("exitwise.policies.mlflow.pyfunc", "mlflow", FEATURE)


def quiet_mlflow_logs() -> None:
    """Load mlflow and lower its INFO chatter (table creation, example validation) to warnings.

    For exitwise's own processes (CLI, API server); mlflow configures its loggers on import,
    so this must run after it.
    """
    load_mlflow()
    for name in ("mlflow", "alembic"):
        logger = logging.getLogger(name)
        if logger.getEffectiveLevel() < logging.WARNING:
            logger.setLevel(logging.WARNING)


def client_for(config: MlflowConfig) -> Any:
    """An ``MlflowClient`` on ``config``'s URIs; creates the local data directory if needed."""
    if config.artifact_root is not None and config.tracking_uri.startswith("sqlite:///"):
        Path(config.tracking_uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return load_mlflow().MlflowClient(tracking_uri=config.tracking_uri, registry_uri=config.registry_uri)


@contextlib.contextmanager
def fluent_uris(config: MlflowConfig) -> Iterator[None]:
    """Point mlflow's fluent API (``log_model`` needs it) at ``config``, then restore everything.

    ``mlflow.set_tracking_uri``/``set_registry_uri`` also write ``MLFLOW_TRACKING_URI`` /
    ``MLFLOW_REGISTRY_URI`` into the process environment; both the module state and the
    environment are put back, so exitwise never changes where a host process logs.
    """
    mlflow = load_mlflow()
    tracking_utils = require("mlflow.tracking._tracking_service.utils", "mlflow", FEATURE)
    registry_utils = require("mlflow.tracking._model_registry.utils", "mlflow", FEATURE)
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
                require("mlflow.tracing.provider", "mlflow", FEATURE).reset()
