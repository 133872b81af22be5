"""Issue 15, rollout guardrails: labelled held-out figures, evaluate refuses another model's logs,
errors under --json and usage errors on one line, and writes that never wait for MLflow."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from exitwise.calibration.logfiles.cards import write_card
from exitwise.calibration.logfiles.writers import write_logs
from exitwise.calibration.synthetic import synthetic_logs


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("guardrails")
    logs = synthetic_logs(4000, n_exits=3, n_classes=4, seed=1)
    write_logs(logs, d / "logs.parquet")
    write_logs(synthetic_logs(2500, n_exits=3, n_classes=4, seed=2), d / "test.parquet")
    write_card(logs.card, d / "card.json")
    card = json.loads((d / "card.json").read_text())
    (d / "other_model.json").write_text(json.dumps({**card, "model": "resnet-50"}))
    (d / "other_classes.json").write_text(json.dumps({**card, "classes": ["cat", "dog", "cow", "owl"]}))
    return {"dir": d, "logs": d / "logs.parquet", "test": d / "test.parquet", "card": d / "card.json",
            "other_model": d / "other_model.json", "other_classes": d / "other_classes.json"}


@pytest.fixture
def tokens(cli: Any, store_env: str) -> dict[str, str]:
    out = {"admin": cli("principal", "add", "admin", "--role", "admin", "--quiet").out.strip()}
    for name, role in (("alice", "author"), ("bob", "approver")):
        out[name] = cli("principal", "add", name, "--role", role, "--token", out["admin"], "--json").json()["token"]
    return out


def _flat(text: str) -> str:
    """Rich output as one line of words: table borders dropped, wrapped lines joined."""
    return " ".join(text.translate({ord(c): " " for c in "│┃"}).split())


# ---------------------------------------------------------------- 1. held-out figures, recorded and labelled

def test_held_out_results_are_recorded_with_their_source_and_labelled_everywhere(
        cli: Any, files: dict[str, Path], tokens: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "policy.json"
    solve = ("solve", files["logs"], "--card", files["card"], "--eps", "0.03", "--no-baselines",
             "--family", "shared", "--out", out)
    r = cli(*solve, "--test", files["test"], "--json")
    assert r.code == 0, r.err
    summary = r.json()
    doc = json.loads(out.read_text())
    held = doc["expected"]["held_out"]
    assert (held["source"], held["rows"]) == ("test.parquet", 2500) and held["fingerprint"].startswith("sha256:")
    assert held["compute_fraction"] == pytest.approx(summary["solution"]["compute_fraction"])
    assert held["risk"] == pytest.approx(summary["solution"]["risk"])
    assert summary["figures_from"] == {"split": "test", "source": "test.parquet", "rows": 2500}
    assert summary["certify_split"]["compute_fraction"] == pytest.approx(doc["expected"]["compute_fraction"])

    # the document names the file, not where it sat: the same test file elsewhere gives the same bytes
    elsewhere = tmp_path / "copy"
    elsewhere.mkdir()
    shutil.copy(files["test"], elsewhere / "test.parquet")
    assert cli(*solve[:-1], tmp_path / "again.json", "--test", elsewhere / "test.parquet", "--json").code == 0
    assert json.loads((tmp_path / "again.json").read_text())["content_hash"] == doc["content_hash"]

    r = cli(*solve, "--test", files["test"])  # human summary: both splits named, percentages
    text = _flat(r.out)
    assert r.code == 0 and "held out: test file test.parquet (2,500 rows)" in text
    assert f"on the certify split ({summary['certify_split']['rows']:,} rows): compute " in text

    assert cli("policy", "create", out, "--token", tokens["alice"]).code == 0
    listed = cli("policy", "list", "--json").json()["versions"][0]
    assert listed["figures_from"] == "certify split"
    assert listed["compute_fraction"] == pytest.approx(doc["expected"]["compute_fraction"])  # a fraction
    assert listed["held_out"] == {k: held[k] for k in ("source", "rows", "fingerprint", "compute_fraction", "risk")}
    table = _flat(cli("policy", "list").out)
    assert "certify: on the certify split of the calibration logs" in table and "held out: on the test file" in table
    assert f"{100 * doc['expected']['compute_fraction']:.1f}%" in table  # percent, not 0.4123
    assert f"{100 * held['compute_fraction']:.1f}% / {100 * held['risk']:.3f}% (test.parquet, 2,500 rows)" in table
    shown = _flat(cli("policy", "show", "synthetic", "1").out)
    assert f"compute (held-out file test.parquet, 2500 rows) {100 * held['compute_fraction']:.1f}%" in shown
    assert f"compute (certify split, {doc['guarantee']['n']} rows)" in shown


# ---------------------------------------------------------------- 2. evaluate refuses another model's logs

@pytest.mark.parametrize(("card", "needles"), [
    ("other_model", ("names model 'resnet-50'", "the policy is for 'synthetic'")),
    ("other_classes", ("classes [cat, dog, cow, owl] differ from the policy's [class0",)),
])
def test_evaluate_refuses_logs_of_another_model(cli: Any, files: dict[str, Path], tmp_path: Path, card: str,
                                                needles: tuple[str, ...]) -> None:
    out = tmp_path / "p.json"
    assert cli("solve", files["logs"], "--card", files["card"], "--no-baselines", "--family", "shared",
               "--out", out, "--json").code == 0
    r = cli("evaluate", out, files["test"], "--card", files[card])
    assert r.code == 2 and r.out == "" and r.err.startswith("error: ") and r.err.count("\n") == 1, r
    for n in needles:
        assert n in r.err, r.err
    r = cli("evaluate", out, files["test"], "--card", files[card], "--json")
    assert r.code == 2 and r.json()["error"]["type"] == "InputError" and needles[0] in r.json()["error"]["message"]


# ---------------------------------------------------------------- 3. errors under --json; usage errors on one line

def test_usage_errors_are_one_line_and_json_under_json(cli: Any, files: dict[str, Path], tmp_path: Path) -> None:
    args = ("solve", files["logs"], "--card", files["card"], "--out", tmp_path / "p.json", "--eps", "1%")
    r = cli(*args)
    assert r.code == 2 and r.out == "" and r.err.count("\n") == 1, r
    assert r.err.startswith("error: exitwise solve: Invalid value for '--eps'") and "'exitwise solve --help'" in r.err
    assert "╭" not in r.err and "Usage:" not in r.err  # no framed box
    r = cli(*args, "--json")
    assert r.code == 2 and r.err == ""
    err = r.json()["error"]
    assert (err["type"], err["exit_code"]) == ("BadParameter", 2) and "--eps" in err["message"]
    r = cli("policy", "show", "--json")  # a missing argument
    assert r.code == 2 and r.json()["error"]["type"] == "MissingParameter"
    r = cli("no-such-command")
    assert r.code == 2 and r.err == "error: exitwise: No such command 'no-such-command'. (see 'exitwise --help')\n"


def test_domain_errors_under_json_are_one_object_with_the_same_exit_code(cli: Any, tokens: dict[str, str],
                                                                         tmp_path: Path) -> None:
    for args, code, kind in [
        (("policy", "show", "nope", "1"), 1, "NotFound"),
        (("policy", "create", tmp_path / "missing.json", "--token", tokens["alice"]), 2, "InputError"),
        (("policy", "create", tmp_path / "missing.json"), 2, "InputError"),
        (("policy", "kill", "nope", "--env", "production", "-r", "x"), 1, "AuthError"),
    ]:
        plain, as_json = cli(*args), cli(*args, "--json")
        assert plain.code == as_json.code == code, (args, plain, as_json)
        assert as_json.err == "" and len(as_json.out.splitlines()) == 1, as_json
        err = as_json.json()["error"]
        assert err["type"].endswith(kind) or kind in err["type"], err
        assert err["exit_code"] == code and err["message"] in plain.err


# ---------------------------------------------------------------- 4. writes never wait for MLflow

@pytest.fixture
def blackhole() -> Iterator[str]:
    """An MLflow "server" on loopback that accepts connections and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


def _exitwise(env: dict[str, str], *args: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    t0 = time.perf_counter()
    out = subprocess.run([str(Path(sys.executable).with_name("exitwise")), *args], env=env, capture_output=True,
                         text=True, timeout=300, check=False)
    return time.perf_counter() - t0, out


def _end_mirror(data: Path, limit: float = 30.0) -> None:
    """End the detached mirror child, found by the pid it writes into its lock file first."""
    lock, t0 = data / "mlflow-sync.lock", time.perf_counter()
    while time.perf_counter() - t0 < limit:
        text = lock.read_text() if lock.exists() else ""
        if text.strip():
            pid = int(text)
            break
        time.sleep(0.05)
    else:
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    for _ in range(200):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


@pytest.fixture
def active_model(cli: Any, tokens: dict[str, str], make_doc: Any, tmp_path: Path) -> dict[str, str]:
    """fashion-cnn v1 active in production, written with the mirror off (all of it pending for MLflow)."""
    path = tmp_path / "p.json"
    path.write_text(json.dumps(make_doc()), encoding="utf-8")
    assert cli("policy", "create", path, "--token", tokens["alice"]).code == 0
    assert cli("policy", "approve", "fashion-cnn", "1", "-r", "ok", "--token", tokens["bob"]).code == 0
    assert cli("policy", "activate", "fashion-cnn", "1", "--env", "production", "-r", "go",
               "--token", tokens["bob"]).code == 0
    return tokens


@pytest.mark.skipif(os.name != "posix", reason="the mirror child is found through its POSIX lock file")
@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_kill_returns_without_waiting_for_an_unresponsive_mlflow(
        cli: Any, active_model: dict[str, str], blackhole: str, store_env: str) -> None:
    data = Path(os.environ["EXITWISE_DATA_DIR"])
    env = {**os.environ, "MLFLOW_TRACKING_URI": blackhole, "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}
    env.pop("EXITWISE_MLFLOW_SYNC")  # the default: mirror on
    try:
        elapsed, out = _exitwise(env, "policy", "kill", "fashion-cnn", "--env", "production", "-r", "incident",
                                 "--token", active_model["alice"])
        assert out.returncode == 0 and "kill switch ON" in out.stdout, out.stderr
        assert elapsed < 15, f"policy kill took {elapsed:.1f} s with MLflow unresponsive (timeout 60 s)"
        assert cli("policy", "active", "fashion-cnn", "--env", "production", "--json").json()["killed"] is True
        with_uri = {**env, "EXITWISE_MLFLOW_SYNC": "off"}
        status = json.loads(_exitwise(with_uri, "mlflow", "status", "--json")[1].stdout)
        assert status["pending"] == ["fashion-cnn"]  # recorded for the mirror (and 'exitwise mlflow sync')
        assert (data / "mlflow-sync.log").exists()  # the detached child's stderr goes there
    finally:
        _end_mirror(data)


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_mlflow_catches_up_after_the_write_returns(cli: Any, active_model: dict[str, str], store_env: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("EXITWISE_MLFLOW_SYNC", "MLFLOW_TRACKING_URI")}
    _, out = _exitwise(env, "policy", "kill", "fashion-cnn", "--env", "production", "-r", "incident",
                       "--token", active_model["alice"])
    assert out.returncode == 0, out.stderr
    t0, status = time.perf_counter(), {}
    while time.perf_counter() - t0 < 180:
        status = cli("mlflow", "status", "--json").json()
        if not status["pending"]:
            break
        time.sleep(0.5)
    assert status["pending"] == [], status
    (model,) = status["models"]
    assert model["synced_seq"] == model["audit_seq"] and model["failures"] == 0
    r = cli("mlflow", "uri", "fashion-cnn", "--env", "production", "--json")  # asks MLflow: the alias exists
    assert r.code == 0 and r.json()["uri"] == "models:/exit-policy-fashion-cnn@production", r
