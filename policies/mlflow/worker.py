"""The after-commit hook that keeps MLflow in step with the store: inline, or on one worker thread.

Registered through :func:`exitwise.policies.events.on_commit`; a committed store change is
never undone or blocked by MLflow: a failed sync stays pending (see
:mod:`exitwise.policies.mlflow.sync`), and without the ``mlflow`` extra the hook logs one
warning and does nothing.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from sqlalchemy import Engine

from exitwise.calibration.exceptions import MissingDependency
from exitwise.policies import events
from exitwise.policies.db import open_store, unit_of_work
from exitwise.policies.errors import NotFound
from exitwise.policies.mlflow.config import MlflowConfig, load_mlflow, mlflow_config, quiet_mlflow_logs, redact_uri
from exitwise.policies.mlflow.sync import pending_models, sync_model

log = logging.getLogger(__name__)


class SyncHook:
    """``exitwise.policies.events`` callback: after a committed change, sync the changed model to MLflow.

    Inline by default (the CLI with ``EXITWISE_MLFLOW_SYNC=wait``: the command returns once
    MLflow is up to date; by default the CLI mirrors in a detached process instead, see
    ``exitwise.api.cli.mirror``); with ``background=True`` a single worker thread does it
    (the API: requests never wait on MLflow). A failed sync is recorded and stays pending;
    after a successful one, the hook also retries the other pending models, so the next
    successful operation catches up.
    ``EXITWISE_MLFLOW_SYNC=off`` disables it; so does a missing ``mlflow`` extra (one warning).
    """

    def __init__(self, engine: Engine | None = None, *, config: MlflowConfig | None = None,
                 background: bool = False, reports: bool = True, quiet: bool = True):
        self.engine = engine
        self._owns_engine = engine is None  # opened on first use, disposed by close()
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
        self._missing = False  # the mlflow extra is not installed (warned once)
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
            self.engine = open_store()
        return self.engine

    def _mlflow_ready(self) -> bool:
        """Load mlflow (quietly); False, after one warning, when the ``mlflow`` extra is not installed."""
        if self._missing:
            return False
        try:
            if self.quiet:
                quiet_mlflow_logs()
            else:
                load_mlflow()
        except MissingDependency as exc:
            with self._lock:
                first, self._missing = not self._missing, True
            if first:
                uri = redact_uri((self.config or mlflow_config()).tracking_uri)
                log.warning("MLflow mirror to %s skipped (changes stay pending for 'exitwise mlflow sync'): %s",
                            uri, exc)
            return False
        return True

    def _sync(self, model: str) -> None:
        if not self._mlflow_ready():
            return
        engine = self._engine()
        config = self.config or mlflow_config()
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
        """Unregister from ``exitwise.policies.events``, stop the worker after the queued syncs, and
        dispose of the store engine the hook opened itself."""
        events.remove(self)
        with self._lock:
            self._closed = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join()
        if self._owns_engine and self.engine is not None:
            self.engine.dispose()
            self.engine = None


def install_hook(engine: Engine | None = None, *, config: MlflowConfig | None = None,
                 background: bool = False, reports: bool = True, quiet: bool = True) -> SyncHook:
    """Register a :class:`SyncHook` with ``exitwise.policies.events.on_commit`` and return it.

    ``engine=None`` opens the configured store on first use (the CLI); the API passes its
    engine and ``background=True``. ``quiet`` lowers mlflow's INFO logs to warnings.
    """
    hook = SyncHook(engine, config=config, background=background, reports=reports, quiet=quiet)
    events.on_commit(hook)
    return hook
