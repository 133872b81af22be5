"""MLflow mirror (issue 6): registration, load by alias, bit-exact predict, aliases, outage + sync.

Runs against the embedded SQLite tracking store and against a real ``mlflow server`` process
started here on loopback (one per session, its own SQLite backend and artifact directory).
The server starts in the background when the module is set up and is waited for only by
the tests that need it, so the embedded tests run while it boots. Nothing may leave the
machine: a guard refuses (and records) any socket connection to a non-loopback address.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
from click.testing import CliRunner as ClickRunner
from sqlalchemy import Engine, select

from exitwise.api.cli import build_app
from exitwise.calibration.evaluate import ScoredLogs, policy_rows, route_scored
from exitwise.calibration.exceptions import InputError
from exitwise.calibration.logs import ExitLogs, ExitSpec, ModelCard, SegmentColumn
from exitwise.calibration.rule import CompiledPolicy, route
from exitwise.calibration.synthetic import synthetic_logs
from exitwise.policies import events, lifecycle, store
from exitwise.policies.canonical import with_content_hash
from exitwise.policies.db import unit_of_work
from exitwise.policies.mlflow.config import (
    TAG_ACTIVE_IN,
    TAG_AUTHOR,
    TAG_CONTENT_HASH,
    TAG_FINGERPRINT,
    TAG_KILLED_IN,
    TAG_KILLED_PREFIX,
    TAG_REPORT,
    TAG_REPORT_STATE,
    TAG_STALE,
    TAG_STATE,
    TAG_STORE_VERSION,
    MlflowConfig,
    client_for,
    fluent_uris,
    mlflow_config,
    model_uri,
    redact_uri,
    registered_model_name,
)
from exitwise.policies.mlflow.payload import VersionRecord, run_metrics, run_params
from exitwise.policies.mlflow.publish import ensure_registered_model, experiment_id, log_run, model_versions
from exitwise.policies.mlflow.pyfunc import ExitPolicyModel
from exitwise.policies.mlflow.sync import pending_models, sync_all, sync_model, sync_status
from exitwise.policies.mlflow.worker import SyncHook, install_hook
from exitwise.policies.models import MlflowSync

SERVER_BOOT_TIMEOUT = 120.0


# ---------------------------------------------------------------- no network

_real_connect = socket.socket.connect
_outbound: list[Any] = []


def _guarded_connect(self: socket.socket, address: Any) -> Any:
    if self.family in (socket.AF_INET, socket.AF_INET6):
        host = address[0]
        if host not in ("127.0.0.1", "::1", "localhost") and not str(host).startswith("127."):
            _outbound.append(address)
            raise ConnectionRefusedError(f"test guard: no connections leave this machine (tried {address})")
    return _real_connect(self, address)


@pytest.fixture(scope="module", autouse=True)
def no_internet() -> Iterator[None]:
    """Every connection from this process must stay on loopback; the module fails if one did not."""
    socket.socket.connect = _guarded_connect  # type: ignore[method-assign]
    try:
        yield
    finally:
        socket.socket.connect = _real_connect  # type: ignore[method-assign]
    assert not _outbound, f"connections to non-loopback addresses were attempted: {_outbound}"


# ---------------------------------------------------------------- MLflow stores

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MlflowServer:
    """A real ``mlflow server`` on loopback in its own process group."""

    def __init__(self, root: Path):
        self.root = root
        self.port = _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log_path = root / "server.log"
        env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true",
                   MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        env.pop("MLFLOW_TRACKING_URI", None)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        mlflow_cli = Path(sys.executable).with_name("mlflow")
        self.proc = subprocess.Popen(
            [str(mlflow_cli), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{root / 'backend.db'}",
             "--artifacts-destination", str(root / "artifacts"), "--serve-artifacts"],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True,
        )
        self._healthy = False

    def wait(self) -> str:
        deadline = time.monotonic() + SERVER_BOOT_TIMEOUT
        while not self._healthy:
            if self.proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {self.proc.returncode}:\n{self._tail()}")
            with contextlib.suppress(requests.RequestException):
                self._healthy = requests.get(f"{self.uri}/health", timeout=2).status_code == 200
            if not self._healthy:
                if time.monotonic() > deadline:
                    pytest.fail(f"mlflow server not healthy after {SERVER_BOOT_TIMEOUT:.0f}s:\n{self._tail()}")
                time.sleep(0.25)
        return self.uri

    def _tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)  # the server and its uvicorn worker
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # stragglers in the group
        self._log.close()


@pytest.fixture(scope="module", autouse=True)
def _server_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """Start the server as soon as the module starts (it boots while the embedded tests run)."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> MlflowConfig:
    """The embedded default: SQLite tracking store and artifacts under one data dir."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("MLFLOW_REGISTRY_URI", raising=False)
        return mlflow_config(tmp_path_factory.mktemp("exitwise-data"))


@pytest.fixture(scope="module")
def server(_server_process: MlflowServer) -> MlflowConfig:
    uri = _server_process.wait()
    return MlflowConfig(tracking_uri=uri, registry_uri=uri, artifact_root=None)


@pytest.fixture(params=["embedded", "server"])
def tracking(request: pytest.FixtureRequest) -> MlflowConfig:
    return request.getfixturevalue(request.param)


@pytest.fixture
def model_name() -> str:
    """A model name of its own: the MLflow stores are shared by the module's tests."""
    return f"net-{uuid.uuid4().hex[:10]}"


def _client(config: MlflowConfig) -> Any:
    return client_for(config)


def _versions(config: MlflowConfig, model: str) -> list[Any]:
    return sorted(model_versions(_client(config), registered_model_name(model)),
                  key=lambda mv: int(mv.version))


def _aliases(config: MlflowConfig, model: str) -> dict[str, str]:
    rm = _client(config).get_registered_model(registered_model_name(model))
    return {a: str(v) for a, v in rm.aliases.items()}


def _store_numbers(config: MlflowConfig, model: str) -> dict[str, int]:
    """alias -> store version number, read back from MLflow's tags."""
    by_version = {str(mv.version): int(mv.tags[TAG_STORE_VERSION]) for mv in _versions(config, model)}
    return {alias: by_version[v] for alias, v in _aliases(config, model).items()}


# ---------------------------------------------------------------- store helpers

def _create(engine: Engine, actors: Any, doc: dict[str, Any], *, approve: bool = True) -> int:
    with unit_of_work(engine) as s:
        v = lifecycle.create_version(doc, author=actors.author, session=s)
        if approve:
            lifecycle.approve(v.model, v.number, approver=actors.approver, reason="reviewed", session=s)
        return v.number


def _activate(engine: Engine, actors: Any, model: str, number: int, env: str = "production") -> None:
    with unit_of_work(engine) as s:
        lifecycle.activate(model, number, env, actor=actors.approver, reason="go", session=s)


def _logs(doc: dict[str, Any], n: int = 3000, seed: int = 7) -> ExitLogs:
    """Synthetic full-depth logs shaped like ``doc`` with its segment values (and one unknown)."""
    k, c = len(doc["exits"]), len(doc["classes"])
    base = synthetic_logs(n, n_exits=k, n_classes=c, segments={}, seed=seed)
    rng = np.random.default_rng(seed)
    capture = rng.choice(np.array(["studio", "phone", "street"]), size=n)
    card = ModelCard(model=doc["model"]["name"], exits=tuple(ExitSpec(e["name"], e["cost"]) for e in doc["exits"]),
                     classes=tuple(doc["classes"]), segment_columns=("capture",))
    return ExitLogs(logits=base.logits, card=card, labels=base.labels,
                    segments={"capture": SegmentColumn.from_values(capture)})


def _frame(logs: ExitLogs) -> pd.DataFrame:
    cols: dict[str, Any] = {f"exit_{k}": list(logs.logits[:, k, :]) for k in range(logs.n_exits)}
    cols["capture"] = list(logs.segments["capture"].values())
    return pd.DataFrame(cols)


def _with_evidence(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` with a compute-vs-risk curve and one exit's calibration record (hash updated)."""
    out = {k: v for k, v in doc.items() if k != "content_hash"}
    out["expected"] = {**doc["expected"], "curve": [
        {"eps": e, "compute_fraction": round(0.9 - 10 * e, 4), "risk": round(0.8 * e, 5)}
        for e in (0.005, 0.01, 0.02, 0.03)]}
    bins = {"confidence": [0.55, 0.65, 0.75, 0.85, 0.95], "accuracy": [0.5, 0.62, 0.74, 0.86, 0.95],
            "count": [10, 20, 40, 80, 160]}
    out["calibration"] = {"exits": [{"name": "stage1", "before": {"nll": 0.61, "ece": 0.08, "reliability": bins},
                                     "after": {"nll": 0.52, "ece": 0.02, "reliability": bins}}]}
    return with_content_hash(out)


def _bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float64).view(np.uint64)


# ---------------------------------------------------------------- configuration (no MLflow calls)

def test_default_store_is_sqlite_under_the_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    cfg = mlflow_config(tmp_path / "data")
    assert cfg.tracking_uri == f"sqlite:///{tmp_path / 'data' / 'mlflow.db'}"
    assert cfg.registry_uri == cfg.tracking_uri
    assert cfg.artifact_root == (tmp_path / "data" / "mlartifacts").as_uri()
    monkeypatch.setenv("EXITWISE_DATA_DIR", str(tmp_path / "env-data"))
    assert mlflow_config().tracking_uri == f"sqlite:///{tmp_path / 'env-data' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://user:secret@mlflow.example:5000")
    remote = mlflow_config(tmp_path)
    assert remote.tracking_uri == "https://user:secret@mlflow.example:5000" and remote.artifact_root is None
    assert redact_uri(remote.tracking_uri) == "https://mlflow.example:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/m.db")
    assert mlflow_config(tmp_path).artifact_root == (tmp_path / "mlartifacts").as_uri()


def test_uri_helpers() -> None:
    assert model_uri("fashion-cnn", "production") == "models:/exit-policy-fashion-cnn@production"
    assert model_uri("fashion-cnn", version=3) == "models:/exit-policy-fashion-cnn/3"
    with pytest.raises(ValueError):
        model_uri("fashion-cnn")


NO_INTERNET = """
import socket
_connect = socket.socket.connect
def _guard(self, address):
    loopback = str(address[0]).startswith(("127.", "::1", "localhost"))
    if self.family in (socket.AF_INET, socket.AF_INET6) and not loopback:
        raise ConnectionRefusedError(f"probe guard: no connections leave this machine (tried {address})")
    return _connect(self, address)
socket.socket.connect = _guard
"""

TELEMETRY_PROBE = NO_INTERNET + """
import sys
from exitwise.api.cli import build_app
import exitwise.policies.mlflow.config, exitwise.policies.mlflow.lookup, exitwise.policies.mlflow.worker
build_app()  # every command module, as `exitwise --help` loads them
assert "mlflow" not in sys.modules, "importing the CLI or the MLflow mirror must not import mlflow"
exitwise.policies.mlflow.config.load_mlflow()
from mlflow.telemetry import get_telemetry_client
from mlflow.telemetry.utils import is_telemetry_disabled
assert is_telemetry_disabled() and get_telemetry_client() is None
print("telemetry off")
"""

HOST_FIRST_PROBE = NO_INTERNET + """
import sys
import mlflow  # the host process imported mlflow before exitwise: MLflow created its telemetry client
from mlflow.telemetry import get_telemetry_client
assert get_telemetry_client() is not None, "precondition: a telemetry client exists"
from exitwise.policies.mlflow.config import client_for, mlflow_config
client_for(mlflow_config(sys.argv[1]))
assert get_telemetry_client() is None
print("telemetry off")
"""

PYFUNC_IMPORT_PROBE = """
import os
import mlflow.pyfunc, numpy, pandas  # what the module imports from outside exitwise
before = dict(os.environ)
import exitwise.policies.mlflow.pyfunc
changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))
assert not changed, f"importing the pyfunc module changed os.environ: {changed}"
print("environment unchanged")
"""


def _clean_env() -> dict[str, str]:
    """No pytest/CI variables (MLflow reads them as 'testing: no telemetry') and no telemetry switches."""
    ci_markers = ("PYTEST_CURRENT_TEST", "CI", "GITHUB_ACTIONS", "MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK")
    return {k: v for k, v in os.environ.items() if k not in ci_markers}


@pytest.mark.parametrize("probe", [TELEMETRY_PROBE, HOST_FIRST_PROBE],
                         ids=["exitwise-imports-mlflow", "host-imported-mlflow-first"])
def test_telemetry_is_off_once_exitwise_uses_mlflow(probe: str, tmp_path: Path) -> None:
    """In a clean process: exitwise turns MLflow's telemetry off, also when the host imported mlflow first."""
    out = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], env=_clean_env(), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "telemetry off", out.stderr[-2000:]


def test_importing_the_pyfunc_module_changes_no_environment_variable() -> None:
    """A process that loads a model keeps its settings: the telemetry switches are set by load_mlflow only."""
    out = subprocess.run([sys.executable, "-c", PYFUNC_IMPORT_PROBE], env=_clean_env(), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "environment unchanged", out.stderr[-2000:]


def test_params_and_metrics_come_from_the_document(make_doc: Callable[..., dict[str, Any]]) -> None:
    doc = make_doc(calibration={"exits": [{"name": "stage1", "before": {"nll": 0.61, "ece": 0.08},
                                           "after": {"nll": 0.52, "ece": 0.02}}]})
    params = run_params(doc)
    assert params["risk"] == "disagreement" and params["eps"] == "0.02" and params["delta"] == "0.05"
    assert params["score"] == "max_prob" and params["segment_keys"] == "capture" and params["solver.seed"] == "0"
    metrics = run_metrics(doc)
    assert metrics["compute_fraction"] == pytest.approx(0.61) and metrics["heldout.risk"] == pytest.approx(0.012)
    assert metrics["segment.studio.compute_fraction"] == pytest.approx(0.58)
    assert metrics["bound.overall.upper_bound"] == pytest.approx(0.0183)
    assert metrics["bound.studio.upper_bound"] == pytest.approx(0.0191)
    assert metrics["calibration.stage1.before.ece"] == pytest.approx(0.08)
    assert metrics["calibration.stage1.after.nll"] == pytest.approx(0.52)
    assert "heldout.induced_error" not in metrics  # null in the document: not a metric


# ---------------------------------------------------------------- the pyfunc model itself

def test_pyfunc_routes_with_the_rule_and_checks_its_input(make_doc: Callable[..., dict[str, Any]]) -> None:
    doc = make_doc()
    model = ExitPolicyModel()
    model.use_document(doc)
    logs = _logs(doc, n=400)
    out = model.predict(None, _frame(logs))
    ref = route(CompiledPolicy.from_document(doc), logs.logits, logs.segment_values(["capture"]))
    assert list(out.columns) == ["exit", "exit_name", "answer", "answer_name", "confidence"]
    assert np.array_equal(out["exit"].to_numpy(), ref.exit) and np.array_equal(out["answer"].to_numpy(), ref.answer)
    assert np.array_equal(_bits(out["confidence"].to_numpy()), _bits(ref.confidence))
    assert set(out["exit_name"]) <= {"stage1", "stage2", "final"} and out["answer_name"][0] in doc["classes"]
    killed = model.predict(None, _frame(logs), params={"killed": True})
    assert (killed["exit"] == 2).all()

    frame = _frame(logs)
    with pytest.raises(InputError, match="missing column 'exit_1'"):
        model.predict(None, frame.drop(columns=["exit_1"]))
    with pytest.raises(InputError, match="missing segment column 'capture'"):
        model.predict(None, frame.drop(columns=["capture"]))
    with pytest.raises(InputError, match=r"column 'exit_0', row 5: expected a list of 4 floats"):
        model.predict(None, _with_cell(frame, "exit_0", 5, [0.1, 0.2]))
    with pytest.raises(InputError, match=r"column 'exit_2', row 3: logits must be finite"):
        model.predict(None, _with_cell(frame, "exit_2", 3, [0.1, float("nan"), 0.0, 0.0]))
    with pytest.raises(InputError, match=r"segment column 'capture', row 2: expected a string"):
        model.predict(None, _with_cell(frame, "capture", 2, None))


def _with_cell(frame: pd.DataFrame, column: str, row: int, value: Any) -> pd.DataFrame:
    cells = list(frame[column])
    cells[row] = value
    out = frame.copy()
    out[column] = pd.Series(cells, index=frame.index, dtype=object)
    return out


# ---------------------------------------------------------------- registration, load by alias, bit-exact predict

@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_register_load_by_alias_predict_bit_for_bit(
    tracking: MlflowConfig, fresh_engine: Engine, committed_actors: Any,
    make_doc: Callable[..., dict[str, Any]], model_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # nothing may land in ./mlruns
    local = tracking.artifact_root is not None
    doc = _with_evidence(make_doc(model=model_name)) if local else make_doc(model=model_name)
    number = _create(fresh_engine, committed_actors, doc)
    _activate(fresh_engine, committed_actors, model_name, number)
    outcome = sync_model(fresh_engine, model_name, config=tracking, reports=False)
    assert outcome.ok, outcome.error
    assert outcome.result is not None and outcome.result.registered == (number,)
    assert _store_numbers(tracking, model_name) == {"production": number}

    assert os.environ.get("MLFLOW_TRACKING_URI") is None  # registering left the process environment alone
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking.tracking_uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", tracking.registry_uri)
    loaded = mlflow.pyfunc.load_model(model_uri(model_name, "production"))
    logs = _logs(doc, n=500 if local else 200)  # MLflow's schema enforcement costs ~1 ms a row
    got = loaded.predict(_frame(logs))

    # the project's own evaluator on the same logs
    policy = CompiledPolicy.from_document(doc)
    scored = ScoredLogs.from_logs(logs, policy.calibrators, policy.score)
    exits = route_scored(policy, scored)
    rows = np.arange(logs.n)
    assert np.array_equal(got["exit"].to_numpy(), exits)
    assert np.array_equal(got["answer"].to_numpy(), scored.preds[rows, exits])
    assert np.array_equal(_bits(got["confidence"].to_numpy()), _bits(scored.scores[rows, exits]))
    assert len(np.unique(exits)) == 3, "the test logs should exercise every exit"
    assert np.array_equal(got["exit_name"].to_numpy(), np.asarray(["stage1", "stage2", "final"], object)[exits])
    ref = route(policy, logs.logits, logs.segment_values(["capture"]))
    assert np.array_equal(policy_rows(policy, logs.segments, logs.n),
                          policy.segment_codes(logs.segment_values(["capture"]), logs.n))
    assert np.array_equal(_bits(got["confidence"].to_numpy()), _bits(ref.confidence))
    assert list(got["answer_name"][:5]) == [doc["classes"][a] for a in ref.answer[:5]]

    # the run: params, metrics, tags, artifacts; the model version: signature and example
    client = _client(tracking)
    mv = _versions(tracking, model_name)[0]
    run = client.get_run(mv.run_id)
    assert run.data.params["eps"] == "0.02" and run.data.params["segment_keys"] == "capture"
    assert run.data.metrics["compute_fraction"] == pytest.approx(0.61)
    assert run.data.metrics["bound.overall.upper_bound"] == pytest.approx(0.0183)
    for tags in (run.data.tags, mv.tags):
        assert tags[TAG_CONTENT_HASH] == doc["content_hash"]
        assert tags[TAG_STORE_VERSION] == str(number)
        assert tags[TAG_AUTHOR] == committed_actors.author.name
        assert tags[TAG_FINGERPRINT] == doc["data"]["fingerprint"]
    assert mv.tags[TAG_STATE] == "active" and mv.tags[TAG_ACTIVE_IN] == "production"
    artifacts = {a.path for a in client.list_artifacts(mv.run_id)}
    assert "policy.json" in artifacts
    if local:  # plots only when the document has a curve and calibration records
        plots = {a.path for a in client.list_artifacts(mv.run_id, "plots")}
        assert plots == {"plots/compute_vs_risk.png", "plots/reliability_stage1.png"}
        assert run.data.metrics["calibration.stage1.after.ece"] == pytest.approx(0.02)
    stored = json.loads(Path(client.download_artifacts(mv.run_id, "policy.json", str(tmp_path))).read_text())
    assert stored == doc  # the hash-verifiable document, byte for byte the stored content
    info = mlflow.models.get_model_info(model_uri(model_name, "production"))
    assert [c["name"] for c in info.signature.inputs.to_dict()] == ["exit_0", "exit_1", "exit_2", "capture"]
    assert [c["name"] for c in info.signature.outputs.to_dict()] == list(
        ("exit", "exit_name", "answer", "answer_name", "confidence"))
    assert info.saved_input_example_info is not None
    assert not (tmp_path / "mlruns").exists()
    if tracking.artifact_root:
        assert Path(tracking.artifact_root.removeprefix("file://")).is_dir()


# ---------------------------------------------------------------- aliases follow the lifecycle (after-commit hook)

@pytest.fixture
def hook(fresh_engine: Engine, embedded: MlflowConfig) -> Iterator[SyncHook]:
    h = install_hook(fresh_engine, config=embedded, reports=False)
    try:
        yield h
    finally:
        h.close()


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)],
                         indirect=True)
def test_aliases_follow_activate_rollback_and_kill(
    hook: SyncHook, embedded: MlflowConfig, fresh_engine: Engine, committed_actors: Any,
    make_doc: Callable[..., dict[str, Any]], model_name: str,
) -> None:
    a = committed_actors
    v1 = _create(fresh_engine, a, make_doc(model=model_name))
    v2 = _create(fresh_engine, a, make_doc(model=model_name, variant=1, parent=1))
    assert [int(mv.tags[TAG_STORE_VERSION]) for mv in _versions(embedded, model_name)] == [v1, v2]
    assert _aliases(embedded, model_name) == {}

    _activate(fresh_engine, a, model_name, v1)
    _activate(fresh_engine, a, model_name, v1, env="staging")
    assert _store_numbers(embedded, model_name) == {"production": v1, "staging": v1}
    _activate(fresh_engine, a, model_name, v2)
    assert _store_numbers(embedded, model_name) == {"production": v2, "staging": v1}
    with unit_of_work(fresh_engine) as s:
        lifecycle.rollback(model_name, "production", actor=a.approver, reason="regression", session=s)
    assert _store_numbers(embedded, model_name) == {"production": v1, "staging": v1}

    with unit_of_work(fresh_engine) as s:
        lifecycle.kill(model_name, "production", actor=a.author, reason="incident", session=s)
    name = registered_model_name(model_name)
    tags = _client(embedded).get_registered_model(name).tags
    assert tags[f"{TAG_KILLED_PREFIX}production"] == "true"
    assert tags[f"{TAG_KILLED_PREFIX}staging"] == "false"
    by_number = {int(mv.tags[TAG_STORE_VERSION]): mv for mv in _versions(embedded, model_name)}
    assert by_number[v1].tags[TAG_KILLED_IN] == "production"
    assert by_number[v1].tags[TAG_ACTIVE_IN] == "production,staging"
    assert by_number[v2].tags[TAG_STATE] == "superseded"
    assert TAG_ACTIVE_IN not in by_number[v2].tags
    with unit_of_work(fresh_engine) as s:
        lifecycle.unkill(model_name, "production", actor=a.approver, reason="fixed", session=s)
    tags = _client(embedded).get_registered_model(name).tags
    assert tags[f"{TAG_KILLED_PREFIX}production"] == "false"

    # the database is the source of truth: a hand-made alias goes, a moved alias comes back
    client = _client(embedded)
    client.set_registered_model_alias(name, "champion", by_number[v2].version)
    client.set_registered_model_alias(name, "production", by_number[v2].version)
    outcome = sync_model(fresh_engine, model_name, config=embedded, reports=False)
    assert outcome.ok and outcome.result is not None
    assert outcome.result.aliases_removed == ("champion",) and outcome.result.registered == ()
    assert _store_numbers(embedded, model_name) == {"production": v1, "staging": v1}
    assert len(_versions(embedded, model_name)) == 2
    with unit_of_work(fresh_engine, readonly=True) as s:
        assert pending_models(session=s, config=embedded) == []


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_background_hook_and_the_off_switch(
    embedded: MlflowConfig, fresh_engine: Engine, committed_actors: Any,
    make_doc: Callable[..., dict[str, Any]], model_name: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    hook = install_hook(fresh_engine, config=embedded, background=True, reports=False)
    try:
        monkeypatch.setenv("EXITWISE_MLFLOW_SYNC", "off")
        v1 = _create(fresh_engine, committed_actors, make_doc(model=model_name))
        assert hook.flush(timeout=5)
        with unit_of_work(fresh_engine, readonly=True) as s:
            assert pending_models(session=s, config=embedded) == [model_name]  # recorded, not synced
        monkeypatch.setenv("EXITWISE_MLFLOW_SYNC", "on")
        _activate(fresh_engine, committed_actors, model_name, v1)  # returns before MLflow is touched
        assert hook.flush(timeout=60)
        assert _store_numbers(embedded, model_name) == {"production": v1}
        with unit_of_work(fresh_engine, readonly=True) as s:
            assert pending_models(session=s, config=embedded) == []
    finally:
        hook.close()
    assert hook not in events.registered()


# ---------------------------------------------------------------- outage, then sync: exactly the missing versions

@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_sync_after_outage_registers_exactly_the_missing_versions(
    server: MlflowConfig, fresh_engine: Engine, committed_actors: Any,
    make_doc: Callable[..., dict[str, Any]], model_name: str,
) -> None:
    a = committed_actors
    hook = install_hook(fresh_engine, config=server, reports=False)
    try:
        v1 = _create(fresh_engine, a, make_doc(model=model_name))
        _activate(fresh_engine, a, model_name, v1)
    finally:
        hook.close()
    assert _store_numbers(server, model_name) == {"production": v1}

    dead_uri = f"http://127.0.0.1:{_free_port()}"  # nothing listens there: connection refused
    dead = MlflowConfig(dead_uri, dead_uri, None)
    hook = install_hook(fresh_engine, config=dead, reports=False)
    try:
        started = time.monotonic()
        v2 = _create(fresh_engine, a, make_doc(model=model_name, variant=1, parent=1))  # store ops still succeed
        v3 = _create(fresh_engine, a, make_doc(model=model_name, variant=2, parent=2))
        _activate(fresh_engine, a, model_name, v3)
        outage_seconds = time.monotonic() - started
    finally:
        hook.close()
    assert outage_seconds < 30, f"store operations waited {outage_seconds:.1f}s on a dead MLflow"
    with unit_of_work(fresh_engine, readonly=True) as s:
        status = {st.model: st for st in sync_status(session=s, config=server)}[model_name]
        assert pending_models(session=s, config=server) == [model_name]
    assert status.pending and status.failures >= 3 and "MLflow unreachable" in (status.last_error or "")
    assert status.synced_seq < status.audit_seq
    assert len(_versions(server, model_name)) == 1  # nothing reached the server during the outage

    outcomes = sync_all(fresh_engine, config=server, only_pending=True, reports=False)
    assert [(o.model, o.ok) for o in outcomes] == [(model_name, True)]
    assert outcomes[0].result is not None and outcomes[0].result.registered == (v2, v3)
    numbers = [int(mv.tags[TAG_STORE_VERSION]) for mv in _versions(server, model_name)]
    assert numbers == [v1, v2, v3]
    assert _store_numbers(server, model_name) == {"production": v3}

    again = sync_model(fresh_engine, model_name, config=server, reports=False)
    assert again.ok and again.result is not None and again.result.registered == ()
    assert again.result.aliases_set == () and again.result.duplicates_removed == ()
    assert len(_versions(server, model_name)) == 3
    with unit_of_work(fresh_engine, readonly=True) as s:
        assert pending_models(session=s, config=server) == []


# ---------------------------------------------------------------- half-done registrations and races

@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_a_cut_short_registration_is_finished_not_repeated(
    embedded: MlflowConfig, fresh_engine: Engine, committed_actors: Any,
    make_doc: Callable[..., dict[str, Any]], model_name: str,
) -> None:
    doc = make_doc(model=model_name)
    number = _create(fresh_engine, committed_actors, doc, approve=False)
    client = _client(embedded)
    name = registered_model_name(model_name)
    rec = VersionRecord(model=model_name, number=number, content_hash=doc["content_hash"],
                                 author=committed_actors.author.name, state="draft")
    # the run was logged, then the process died before create_model_version
    ensure_registered_model(client, name, model_name)
    exp = experiment_id(client, embedded, name, model_name)
    run_id, _ = log_run(client, embedded, exp, rec, doc, None)
    outcome = sync_model(fresh_engine, model_name, config=embedded, reports=False)
    assert outcome.ok and outcome.result is not None and outcome.result.registered == (number,)
    assert [mv.run_id for mv in _versions(embedded, model_name)] == [run_id]
    assert len(client.search_runs([exp])) == 1

    # a concurrent sync registered the same version twice: the younger copy goes
    mv = _versions(embedded, model_name)[0]
    with fluent_uris(embedded):
        client.create_model_version(name=name, source=mv.source, run_id=mv.run_id, tags=mv.tags,
                                    model_id=mv.model_id)
    assert len(_versions(embedded, model_name)) == 2
    outcome = sync_model(fresh_engine, model_name, config=embedded, reports=False)
    assert outcome.result is not None and outcome.result.duplicates_removed == (str(int(mv.version) + 1),)
    assert [str(v.version) for v in _versions(embedded, model_name)] == [str(mv.version)]

    # an MLflow version the store does not know (another database) is tagged stale, never aliased
    other = make_doc(model=model_name, variant=9)
    with fluent_uris(embedded):
        stale = client.create_model_version(name=name, source=mv.source, run_id=mv.run_id, model_id=mv.model_id,
                                            tags={TAG_STORE_VERSION: "7",
                                                  TAG_CONTENT_HASH: other["content_hash"]})
    outcome = sync_model(fresh_engine, model_name, config=embedded, reports=False)
    assert outcome.result is not None and outcome.result.stale == (str(stale.version),)
    assert client.get_model_version(name, stale.version).tags[TAG_STALE] == "true"


# ---------------------------------------------------------------- CLI

@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_cli_sync_status_uri(
    store_env: str, embedded: MlflowConfig, committed_actors: Any, fresh_engine: Engine,
    make_doc: Callable[..., dict[str, Any]], model_name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", embedded.tracking_uri)
    app = build_app()
    runner = ClickRunner()
    doc = make_doc(model=model_name)
    v1 = _create(fresh_engine, committed_actors, doc)
    _activate(fresh_engine, committed_actors, model_name, v1)

    res = runner.invoke(app, ["mlflow", "status", "--json"])
    assert res.exit_code == 0, res.output
    status = json.loads(res.stdout)
    assert status["pending"] == [model_name] and status["tracking_uri"] == embedded.tracking_uri

    res = runner.invoke(app, ["mlflow", "sync", model_name, "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["ok"] and out["models"][0]["result"]["registered"] == [v1]
    assert out["models"][0]["uris"] == {"production": f"models:/exit-policy-{model_name}@production"}
    mv = _versions(embedded, model_name)[0]
    assert mv.tags[TAG_REPORT] == "report/audit_report.html"
    assert mv.tags[TAG_REPORT_STATE] == "active"  # rendered after the approval and activation
    report = Path(_client(embedded).download_artifacts(mv.run_id, "report/audit_report.html", str(tmp_path)))
    html = report.read_text(encoding="utf-8")
    assert doc["content_hash"][:12] in html and committed_actors.approver.name in html  # approvals are in it

    res = runner.invoke(app, ["mlflow", "uri", model_name, "--env", "production"])
    assert res.exit_code == 0 and res.stdout.strip() == f"models:/exit-policy-{model_name}@production"
    res = runner.invoke(app, ["mlflow", "uri", model_name, "--version", str(v1), "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["uri"].startswith(f"models:/exit-policy-{model_name}/")
    res = runner.invoke(app, ["mlflow", "uri", model_name, "--env", "staging"])
    assert res.exit_code != 0 and "no alias 'staging'" in str(res.exception)

    res = runner.invoke(app, ["mlflow", "status"])
    assert res.exit_code == 0 and f"{model_name}: in sync" in res.stdout
    res = runner.invoke(app, ["mlflow", "uri", "--tracking"])
    assert res.exit_code == 0 and res.stdout.strip() == embedded.tracking_uri

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_free_port()}")
    res = runner.invoke(app, ["mlflow", "sync", "--json"])
    assert res.exit_code == 1, res.output
    out = json.loads(res.stdout)
    assert not out["ok"] and "MLflow unreachable at http://127.0.0.1:" in out["models"][0]["error"]
    assert out["models"][0]["error"].endswith("connection refused")
    with unit_of_work(fresh_engine, readonly=True) as s:
        row = s.scalars(select(MlflowSync).where(MlflowSync.model == model_name)).one()
        assert row.failures == 1 and row.tracking_uri == embedded.tracking_uri


# ---------------------------------------------------------------- without the exitwise[mlflow] extra

MISSING_MLFLOW_CLI = """
import sys
sys.modules["mlflow"] = None  # `import mlflow` now fails as if the exitwise[mlflow] extra were not installed
from exitwise.api.cli import main
main(sys.argv[1:])
"""


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_without_the_mlflow_extra_the_cli_names_the_extra(store_env: str) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", MISSING_MLFLOW_CLI, *args], capture_output=True, text=True,
                              timeout=120)

    for args in (["mlflow", "sync"], ["mlflow", "uri", "net", "--env", "production"]):
        out = run(*args)
        assert out.returncode == 1, out.stderr
        assert "pip install 'exitwise[mlflow]'" in out.stderr and "Traceback" not in out.stderr, out.stderr
        assert out.stderr.startswith("error: the MLflow mirror needs 'mlflow'"), out.stderr
    out = run("mlflow", "status", "--json")  # reads the policy database only
    assert out.returncode == 0 and json.loads(out.stdout)["pending"] == [], out.stderr


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_without_the_mlflow_extra_the_hook_warns_once_and_changes_commit(
    embedded: MlflowConfig, fresh_engine: Engine, committed_actors: Any, make_doc: Callable[..., dict[str, Any]],
    model_name: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` fails as without the extra
    hook = install_hook(fresh_engine, config=embedded, reports=False)
    try:
        with caplog.at_level(logging.WARNING):
            v1 = _create(fresh_engine, committed_actors, make_doc(model=model_name))
            _activate(fresh_engine, committed_actors, model_name, v1)
    finally:
        hook.close()
    # events are process-wide: other tests' hooks may see these commits too; count this hook's records
    # (it names its tracking URI) and any hook that raised (the events module reports those)
    records = [r for r in caplog.records if r.levelno >= logging.WARNING
               and (embedded.tracking_uri in r.getMessage() or "SyncHook" in r.getMessage())]
    assert [r.levelno for r in records] == [logging.WARNING], [r.getMessage() for r in records]
    assert "pip install 'exitwise[mlflow]'" in records[0].getMessage()
    with unit_of_work(fresh_engine, readonly=True) as s:
        info = next(m for m in store.list_models(session=s) if m.name == model_name)
        assert dict(info.active) == {"production": v1}  # both changes committed
        assert pending_models(session=s, config=embedded) == [model_name]  # and wait for 'exitwise mlflow sync'
