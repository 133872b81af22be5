"""The MLflow model of a large-vocabulary policy: dense logits in, routing through the rule out; a small payload.

Against the embedded MLflow store (SQLite tracking store, local artifacts) in a temporary data
directory: the policy is stored and approved through the lifecycle, mirrored by ``sync_model``,
loaded back by its alias and asked to predict. V = 5000 for the bit-for-bit check (MLflow's
schema enforcement costs time per value); the 150k policy is registered and predicts too.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
from sqlalchemy import Engine
from vocab_policy_docs import QWEN_VOCAB, token_stream, vocabulary_doc

from exitwise.calibration.exceptions import InputError
from exitwise.calibration.rule import CompiledPolicy, route
from exitwise.policies import lifecycle
from exitwise.policies.canonical import with_content_hash
from exitwise.policies.db import unit_of_work
from exitwise.policies.mlflow.config import MlflowConfig, client_for, mlflow_config, model_uri, registered_model_name
from exitwise.policies.mlflow.payload import run_params
from exitwise.policies.mlflow.publish import model_versions
from exitwise.policies.mlflow.pyfunc import ExitPolicyModel, input_example, signature
from exitwise.policies.mlflow.sync import sync_model

SMALL_V = 5000
SEGMENTS = np.array(["studio", "phone", "street"])
MAX_MODEL_BYTES = 100 * 1024  # the logged model: the policy JSON, the entry file, MLflow's metadata


def _named(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return with_content_hash({**{k: v for k, v in doc.items() if k != "content_hash"}, "model": {"name": name}})


def _logits(doc: dict[str, Any], n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Dense (n, K, V) float32 logits whose answers are mostly frequent tokens, and a segment per row."""
    rng = np.random.default_rng(seed)
    k, v = len(doc["exits"]), doc["vocabulary"]["size"]
    logits = rng.normal(size=(n, k, v)).astype(np.float32)
    answers = token_stream(v, n=n, seed=0)
    margin = np.linspace(2.0, 30.0, k, dtype=np.float32)[None, :] * rng.uniform(0.2, 1.0, size=(n, 1))
    logits[np.arange(n)[:, None], np.arange(k)[None, :], answers[:, None]] += margin.astype(np.float32)
    return logits, rng.choice(SEGMENTS, size=n)


def _frame(logits: np.ndarray, capture: np.ndarray) -> pd.DataFrame:
    cols: dict[str, Any] = {f"exit_{k}": list(logits[:, k, :]) for k in range(logits.shape[1])}
    cols["capture"] = list(capture)
    return pd.DataFrame(cols)


def _bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float64).view(np.uint64)


@pytest.fixture(scope="module")
def small_doc(make_doc: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    return vocabulary_doc(make_doc(), vocab_size=SMALL_V)


def test_pyfunc_routes_dense_vocabulary_logits_through_the_rule(small_doc: dict[str, Any]) -> None:
    model = ExitPolicyModel()
    model.use_document(small_doc)
    logits, capture = _logits(small_doc, 300, seed=1)
    out = model.predict(None, _frame(logits, capture))
    policy = CompiledPolicy.from_document(small_doc)
    ref = route(policy, logits, capture)
    assert list(out.columns) == ["exit", "exit_name", "answer", "answer_name", "confidence", "bucket"]
    assert np.array_equal(out["exit"].to_numpy(), ref.exit) and np.array_equal(out["answer"].to_numpy(), ref.answer)
    assert np.array_equal(_bits(out["confidence"].to_numpy()), _bits(ref.confidence))
    assert len(np.unique(ref.exit)) >= 3, "the logits should exercise several exits"
    assert list(out["answer_name"]) == [str(a) for a in ref.answer]
    assert list(out["bucket"]) == [small_doc["classes"][b] for b in policy.class_bucket[ref.answer]]
    assert (out.loc[out["bucket"] == "rest", "exit"] == 11).all()  # the forced bucket runs at full depth

    frame = _frame(logits[:5], capture[:5])
    cells = list(frame["exit_3"])
    cells[2] = cells[2][:32]  # someone sent the top-k instead of the dense logits
    frame["exit_3"] = pd.Series(cells, dtype=object)
    with pytest.raises(InputError, match=rf"column 'exit_3', row 2: expected a list of {SMALL_V} floats"):
        model.predict(None, frame)


def test_the_model_metadata_stays_small(small_doc: dict[str, Any]) -> None:
    assert input_example(small_doc) is None  # one row would be K x V floats
    outputs = [c["name"] for c in signature(small_doc).outputs.to_dict()]
    assert outputs == ["exit", "exit_name", "answer", "answer_name", "confidence", "bucket"]
    params = run_params(small_doc)
    assert (params["vocabulary.size"], params["vocabulary.top_k"], params["vocabulary.buckets.method"]) == (
        str(SMALL_V), "32", "frequency")
    assert params["vocabulary.bucket_of.sha256"] == small_doc["vocabulary"]["bucket_of"]["sha256"]
    assert params["n_classes"] == "4"


# ---------------------------------------------------------------- a real local MLflow store


@pytest.fixture
def tracking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[MlflowConfig]:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # nothing may land in ./mlruns
    yield mlflow_config(tmp_path / "data")


def _store_and_sync(engine: Engine, actors: Any, doc: dict[str, Any], config: MlflowConfig, reports: bool) -> None:
    with unit_of_work(engine) as s:
        v = lifecycle.create_version(doc, author=actors.author, session=s)
        lifecycle.approve(v.model, v.number, approver=actors.approver, reason="reviewed", session=s)
        lifecycle.activate(v.model, v.number, "production", actor=actors.approver, reason="go", session=s)
    outcome = sync_model(engine, doc["model"]["name"], config=config, reports=reports)
    assert outcome.ok, outcome.error


def _artifact_bytes(client: Any, run_id: str, path: str | None = None) -> dict[str, int]:
    out: dict[str, int] = {}
    for a in client.list_artifacts(run_id, path):
        out.update(_artifact_bytes(client, run_id, a.path) if a.is_dir else {a.path: int(a.file_size or 0)})
    return out


def _load(config: MlflowConfig, model: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", config.tracking_uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", config.registry_uri)
    return mlflow.pyfunc.load_model(model_uri(model, "production"))


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_registered_vocabulary_policy_predicts_bit_for_bit(
    tracking: MlflowConfig, fresh_engine: Engine, committed_actors: Any, small_doc: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    name = "lm-small"
    doc = _named(small_doc, name)
    _store_and_sync(fresh_engine, committed_actors, doc, tracking, reports=False)
    loaded = _load(tracking, name, monkeypatch)
    logits, capture = _logits(doc, 24, seed=2)
    got = loaded.predict(_frame(logits, capture))
    ref = route(CompiledPolicy.from_document(doc), logits, capture)
    assert np.array_equal(got["exit"].to_numpy(), ref.exit) and np.array_equal(got["answer"].to_numpy(), ref.answer)
    assert np.array_equal(_bits(got["confidence"].to_numpy()), _bits(ref.confidence))
    assert len(np.unique(ref.exit)) >= 2

    client = client_for(tracking)
    mv = model_versions(client, registered_model_name(name))[0]
    stored = json.loads(Path(client.download_artifacts(mv.run_id, "policy.json", str(tmp_path))).read_text())
    assert stored == doc
    sizes = _artifact_bytes(client, mv.run_id)
    model_files = {p: n for p, n in sizes.items() if not p.startswith(("plots/", "report/"))}
    assert sum(model_files.values()) < MAX_MODEL_BYTES, model_files
    assert not [p for p in sizes if "input_example" in p]


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_the_150k_vocabulary_policy_registers_with_its_report(
    tracking: MlflowConfig, fresh_engine: Engine, committed_actors: Any, make_doc: Callable[..., dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    name = "lm-qwen"
    doc = _named(vocabulary_doc(make_doc()), name)
    _store_and_sync(fresh_engine, committed_actors, doc, tracking, reports=True)
    client = client_for(tracking)
    mv = model_versions(client, registered_model_name(name))[0]
    sizes = _artifact_bytes(client, mv.run_id)
    assert sizes["policy.json"] < 64 * 1024
    assert 0 < sizes["report/audit_report.html"] < 300 * 1024
    assert client.get_run(mv.run_id).data.params["vocabulary.size"] == str(QWEN_VOCAB)

    loaded = _load(tracking, name, monkeypatch)
    assert mlflow.models.get_model_info(model_uri(name, "production")).saved_input_example_info is None
    logits, capture = _logits(doc, 3, seed=4)
    got = loaded.predict(_frame(logits, capture))
    ref = route(CompiledPolicy.from_document(doc), logits, capture)
    assert np.array_equal(got["exit"].to_numpy(), ref.exit) and np.array_equal(got["answer"].to_numpy(), ref.answer)
