"""The console script's MLflow mirror: after a committed write, one detached ``exitwise mlflow sync --pending``.

A write command (``policy kill`` above all) must not wait for MLflow: mirroring a change
imports mlflow, talks to the tracking server and may render the audit report, seconds to
minutes when MLflow is slow or down. So after the commit the command starts one detached
child process (this module, ``python -m exitwise.api.cli.mirror``) and returns. The child
syncs every model the store marks pending (the ``mlflow_sync`` bookkeeping: a model is
pending while its audit trail is past its ``synced_seq``), so nothing is lost if it fails,
is killed or never starts: the next write's child, ``exitwise mlflow sync`` or the API
server's worker picks the model up. Children take ``<data dir>/mlflow-sync.lock`` in turn
(POSIX ``flock``), so two never register the same version twice; each writes its stderr to
``<data dir>/mlflow-sync.log``.

``EXITWISE_MLFLOW_SYNC``: ``on`` (default) as above, ``wait`` mirrors inline (the command
returns once MLflow is up to date), ``off`` leaves every change pending.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from exitwise.calibration.exceptions import ExitwiseError
from exitwise.policies.db import open_store, unit_of_work
from exitwise.policies.mlflow.config import mlflow_config, quiet_mlflow_logs
from exitwise.policies.mlflow.sync import pending_models, sync_all
from exitwise.policies.settings import get_settings

try:
    import fcntl
except ImportError:  # not POSIX: children are not serialised
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_FILE", "LOG_FILE", "DetachedSync", "run_pending", "sync_lock", "sync_mode"]

log = logging.getLogger(__name__)

LOCK_FILE = "mlflow-sync.lock"
LOG_FILE = "mlflow-sync.log"
MODES = ("on", "wait", "off")


def sync_mode() -> str:
    """``EXITWISE_MLFLOW_SYNC`` as one of ``on`` (detached), ``wait`` (inline) or ``off``."""
    raw = os.environ.get("EXITWISE_MLFLOW_SYNC", "on").strip().lower()
    if raw in ("0", "off", "false", "no"):
        return "off"
    return "wait" if raw == "wait" else "on"


class DetachedSync:
    """``exitwise.policies.events`` callback: after the first committed change of a model, start the child.

    One child per process: it syncs every pending model, so later events of the same command
    add nothing. Starting it takes milliseconds; the command never waits for it.
    """

    def __init__(self) -> None:
        self.child: subprocess.Popen[bytes] | None = None

    def __call__(self, event: Any) -> None:
        if getattr(event, "model", None) is None or self.child is not None:
            return
        self.child = spawn()


def spawn() -> subprocess.Popen[bytes] | None:
    """Start ``python -m exitwise.api.cli.mirror`` detached from this process (own session, no terminal)."""
    if not sys.executable:
        log.warning("MLflow mirror not started (no Python executable); run 'exitwise mlflow sync'")
        return None
    data = Path(get_settings().data_dir)
    data.mkdir(parents=True, exist_ok=True)
    detach: dict[str, Any] = ({"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.DETACHED_PROCESS}
                              if os.name == "nt" else {"start_new_session": True})
    with open(data / LOG_FILE, "ab") as err:
        return subprocess.Popen([sys.executable, "-m", "exitwise.api.cli.mirror"], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err, close_fds=True, **detach)


@contextmanager
def sync_lock(data_dir: Path) -> Iterator[IO[str]]:
    """Hold ``<data dir>/mlflow-sync.lock`` (waiting for the holder); it names the holder's pid."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / LOCK_FILE, "a+", encoding="utf-8") as f:
        if fcntl is not None:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        try:
            yield f
        finally:
            f.seek(0)
            f.truncate()
            f.flush()  # closing the file releases the lock


def run_pending() -> int:
    """The child: sync every pending model under the lock; 0 when MLflow is up to date, else 1."""
    if hasattr(os, "nice"):
        os.nice(10)  # background work: the operator's next command comes first on a busy machine
    logging.basicConfig(format="%(asctime)s exitwise mlflow mirror [%(process)d] %(levelname)s %(message)s",
                        level=logging.WARNING)
    with sync_lock(Path(get_settings().data_dir)):
        engine = open_store()
        try:
            config = mlflow_config()
            with unit_of_work(engine, readonly=True) as s:
                if not pending_models(session=s, config=config):
                    return 0  # an earlier child already caught up
            quiet_mlflow_logs()
            outcomes = sync_all(engine, config=config, only_pending=True)
        except ExitwiseError as exc:  # e.g. no mlflow extra, store down: the changes stay pending
            log.warning("MLflow mirror not run (changes stay pending for 'exitwise mlflow sync'): %s", exc)
            return 1
        finally:
            engine.dispose()
    return 0 if all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(run_pending())
