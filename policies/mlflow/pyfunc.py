"""The MLflow pyfunc flavour of an exit policy: per-exit logits in, routing out.

``mlflow.pyfunc.load_model("models:/exit-policy-<model>@production").predict(df)`` takes one
row per sample with columns ``exit_0`` .. ``exit_{K-1}`` (each a list or array of C floats)
and one string column per segment key, and answers per sample the exit taken, the answer
(class index and name) and the confidence (the score at the exit taken). The routing is
:func:`exitwise.calibration.rule.route` on the policy JSON stored with the model, so the MLflow model,
the evaluator and the runtime client give the same bits on the same logits.

A large-vocabulary policy (``vocabulary`` in the document) takes the exits' dense logits over
the whole vocabulary (V floats per cell) and scores them from their top-k and log-sum-exp, as
the solver did; the answer is the token id (``answer_name`` its decimal text) and the extra
output column ``bucket`` names the token's bucket. The model stores only the policy document
(tens of KB at V = 150k) and logs no input example (one would hold K x V floats per row).

The model is saved as "models from code" (MLflow's recommended form, no pickle): the entry
file only imports :class:`ExitPolicyModel`, so loading needs ``exitwise`` importable
(``pip install exitwise``) next to mlflow, numpy and pandas. This module imports mlflow and
changes nothing at import (a host process that loads a model keeps its own settings);
exitwise's own processes reach it through
:func:`exitwise.policies.mlflow.config.load_pyfunc`, which turns MLflow's telemetry off first.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types.schema import Array, ColSpec, DataType, ParamSchema, ParamSpec, Schema

from exitwise.calibration.exceptions import InputError
from exitwise.calibration.rule import SEGMENT_SEPARATOR, CompiledPolicy, route

POLICY_ARTIFACT = "policy"  # key of the policy JSON in the model's artifacts
OUTPUT_COLUMNS = ("exit", "exit_name", "answer", "answer_name", "confidence")
ENTRY_POINT = '''"""MLflow models-from-code entry point of an exitwise exit policy (written by exitwise)."""
from mlflow.models import set_model

from exitwise.policies.mlflow.pyfunc import ExitPolicyModel

set_model(ExitPolicyModel())
'''


class ExitPolicyModel(mlflow.pyfunc.PythonModel):
    """A stored exit policy as an MLflow pyfunc model.

    ``predict(df, params={"killed": True})`` routes as the kill switch does (full depth for
    everyone); the registry shows the live kill state as the tag ``exitwise.killed.<env>``.
    """

    def load_context(self, context: Any) -> None:
        with open(context.artifacts[POLICY_ARTIFACT], encoding="utf-8") as fh:
            self.use_document(json.load(fh))

    def use_document(self, doc: Mapping[str, Any]) -> None:
        """Compile ``doc`` (a parsed policy document); also used to predict without MLflow."""
        self.document = dict(doc)
        self.policy = CompiledPolicy.from_document(doc)
        self.exit_names = tuple(str(e["name"]) for e in doc["exits"])
        self.classes = tuple(str(c) for c in doc["classes"])  # the token buckets of a vocabulary policy

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        killed = bool((params or {}).get("killed", False))
        policy = replace(self.policy, killed=True) if killed and not self.policy.killed else self.policy
        return predict_frame(policy, self.exit_names, self.classes, model_input)


def frame_logits(frame: pd.DataFrame, n_exits: int, n_classes: int) -> np.ndarray:
    """Stack the ``exit_k`` columns of ``frame`` into float64 logits (n, K, C), checked.

    ``n_classes`` is the logits per cell: the classes, or the vocabulary size of a vocabulary policy.
    """
    n = len(frame)
    out = np.empty((n, n_exits, n_classes), dtype=np.float64)
    for k in range(n_exits):
        col = f"exit_{k}"
        if col not in frame.columns:
            raise InputError(f"input: missing column {col!r} (expected exit_0..exit_{n_exits - 1})")
        cells = frame[col].tolist()
        for i, cell in enumerate(cells):
            if np.ndim(cell) != 1 or len(cell) != n_classes:
                raise InputError(
                    f"input: column {col!r}, row {i}: expected a list of {n_classes} floats, "
                    f"got {np.shape(cell) if np.ndim(cell) else type(cell).__name__}"
                )
        block = np.asarray(cells, dtype=np.float64).reshape(n, n_classes)  # float32 -> float64 is exact
        bad = ~np.isfinite(block)
        if bad.any():
            i = int(np.flatnonzero(bad.any(axis=1))[0])
            raise InputError(f"input: column {col!r}, row {i}: logits must be finite (found NaN or Inf)")
        out[:, k, :] = block
    return out


def frame_segments(frame: pd.DataFrame, keys: Sequence[str]) -> np.ndarray | None:
    """Composite segment value per row (``a|b`` for two keys), as in ``ExitLogs.segment_values``."""
    if not keys:
        return None
    parts = []
    for key in keys:
        if key not in frame.columns:
            raise InputError(f"input: missing segment column {key!r} (the policy segments by {list(keys)})")
        values = frame[key].tolist()
        for i, v in enumerate(values):
            if not isinstance(v, str):
                raise InputError(f"input: segment column {key!r}, row {i}: expected a string, got {v!r}")
        parts.append(values)
    joined = [SEGMENT_SEPARATOR.join(row) for row in zip(*parts, strict=True)]
    return np.asarray(joined, dtype=object)


def predict_frame(
    policy: CompiledPolicy, exit_names: Sequence[str], classes: Sequence[str], frame: pd.DataFrame
) -> pd.DataFrame:
    """Route every row of ``frame`` with :func:`exitwise.calibration.rule.route`; one output row per input row."""
    if isinstance(frame, Mapping):
        frame = pd.DataFrame(frame)
    if not isinstance(frame, pd.DataFrame):
        raise InputError(f"input: expected a pandas DataFrame, got {type(frame).__name__}")
    logits = frame_logits(frame, policy.n_exits, policy.n_outputs)
    routing = route(policy, logits, frame_segments(frame, policy.segment_keys))
    names = np.asarray(exit_names, dtype=object)
    labels = np.asarray(classes, dtype=object)
    out = {
        "exit": routing.exit,
        "exit_name": names[routing.exit],
        "answer": routing.answer,
        "answer_name": labels[routing.answer] if policy.class_bucket is None
        else np.asarray([str(t) for t in routing.answer.tolist()], dtype=object),
        "confidence": routing.confidence,
    }
    if policy.class_bucket is not None:
        out["bucket"] = labels[policy.columns(routing.answer)]
    return pd.DataFrame(out, index=frame.index)


def pip_requirements() -> list[str]:
    """What a loaded model needs next to ``exitwise``: mlflow, numpy and pandas, pinned to the versions here."""
    return [f"mlflow=={mlflow.__version__}", f"numpy=={np.__version__}", f"pandas=={pd.__version__}"]


def signature(doc: Mapping[str, Any]) -> ModelSignature:
    """Inputs: ``exit_k`` arrays of doubles and the segment columns; outputs: the routing; param ``killed``."""
    inputs = [ColSpec(Array(DataType.double), f"exit_{k}") for k in range(len(doc["exits"]))]
    inputs += [ColSpec(DataType.string, key) for key in doc.get("segment_keys") or ()]
    outputs = [
        ColSpec(DataType.long, "exit"),
        ColSpec(DataType.string, "exit_name"),
        ColSpec(DataType.long, "answer"),
        ColSpec(DataType.string, "answer_name"),
        ColSpec(DataType.double, "confidence"),
    ]
    if doc.get("vocabulary") is not None:
        outputs.append(ColSpec(DataType.string, "bucket"))
    params = ParamSchema([ParamSpec("killed", DataType.boolean, False)])
    return ModelSignature(inputs=Schema(inputs), outputs=Schema(outputs), params=params)


def input_example(doc: Mapping[str, Any]) -> pd.DataFrame | None:
    """Two rows: one sure of class 0 at every exit (likely exits early), one undecided (full depth).

    None for a vocabulary policy: a row holds K x V logits (megabytes at V = 150k), which the
    model's payload must not carry; the signature documents the input instead.
    """
    if doc.get("vocabulary") is not None:
        return None
    k, c = len(doc["exits"]), len(doc["classes"])
    sure = [8.0] + [0.0] * (c - 1)
    flat = [0.0] * c
    rows: dict[str, list[Any]] = {f"exit_{j}": [list(sure), list(flat)] for j in range(k)}
    keys = list(doc.get("segment_keys") or ())
    if keys:
        known = [s for s in (doc.get("thresholds") or {}) if s != "default"]
        parts = known[0].split(SEGMENT_SEPARATOR) if known else []
        values = parts if len(parts) == len(keys) else ["other"] * len(keys)
        for key, value in zip(keys, values, strict=True):
            rows[key] = [value, value]
    return pd.DataFrame(rows)
