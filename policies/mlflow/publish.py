"""The write path: log one stored policy version as an MLflow run and register it as a model version.

Each step finds what an earlier, cut-short attempt left behind before creating anything (the
registered model, the experiment, a run tagged ``exitwise.logged``), so a registration can
be repeated after any failure. Reconciliation (:mod:`exitwise.policies.mlflow.reconcile`)
decides what to register; this module only writes.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from exitwise.policies.mlflow.config import (
    MODEL_NAME,
    REPORT_ARTIFACT,
    TAG_CONTENT_HASH,
    TAG_LOGGED,
    TAG_MODEL,
    TAG_MODEL_ID,
    TAG_REPORT,
    TAG_REPORT_STATE,
    TAG_STATE,
    TAG_STORE_VERSION,
    MlflowConfig,
    fluent_uris,
    load_mlflow,
    load_pyfunc,
)
from exitwise.policies.mlflow.errors import error_code
from exitwise.policies.mlflow.payload import (
    VersionRecord,
    curve_png,
    description,
    identity_tags,
    policy_json,
    reliability_pngs,
    run_metrics,
    run_params,
)

log = logging.getLogger(__name__)

ReportSource = Callable[[int], bytes | None]  # store version number -> the audit report (HTML) to attach
ALREADY_EXISTS = ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS")  # REST and local stores say it differently


def ensure_registered_model(client: Any, name: str, model: str) -> Any:
    """The registered model ``name`` (mirroring ``model``), created when missing; a concurrent create is fine."""
    try:
        return client.get_registered_model(name)
    except Exception as exc:
        if error_code(exc) != "RESOURCE_DOES_NOT_EXIST":
            raise
    try:
        client.create_registered_model(
            name, tags={TAG_MODEL: model},
            description=f"Exit policies of {model}, mirrored from the exitwise policy store. "
            "Aliases are the environments a version is active in; managed by exitwise.",
        )
    except Exception as exc:
        if error_code(exc) not in ALREADY_EXISTS:
            raise
    return client.get_registered_model(name)


def experiment_id(client: Any, config: MlflowConfig, name: str, model: str) -> str:
    """The experiment named ``name`` that holds the runs (restored if deleted, created if missing)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    location = f"{config.artifact_root}/{name}" if config.artifact_root else None
    try:
        return client.create_experiment(name, artifact_location=location, tags={TAG_MODEL: model})
    except Exception as exc:
        if error_code(exc) not in ALREADY_EXISTS:
            raise
        return client.get_experiment_by_name(name).experiment_id


def model_versions(client: Any, name: str) -> list[Any]:
    """Every version of the registered model ``name`` (all pages)."""
    out: list[Any] = []
    token = None
    while True:
        page = client.search_model_versions(f"name = '{name}'", max_results=1000, page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


def attached_report(report_for: ReportSource | None, number: int) -> bytes | None:
    """The audit report of version ``number``, or None (a failing report never blocks the mirror)."""
    if report_for is None:
        return None
    try:
        return report_for(number)
    except Exception as exc:  # the report is an attachment: never block the mirror on it
        log.warning("audit report of version %s not attached: %s", number, exc)
        return None


def log_report(client: Any, run_id: str, report: bytes) -> None:
    """Attach ``report`` to run ``run_id`` as ``report/audit_report.html`` (replacing an earlier one)."""
    with tempfile.TemporaryDirectory(prefix="exitwise-report-") as tmp:
        path = Path(tmp) / Path(REPORT_ARTIFACT).name
        path.write_bytes(report)
        client.log_artifact(run_id, str(path), str(Path(REPORT_ARTIFACT).parent))
    client.set_tag(run_id, TAG_REPORT, REPORT_ARTIFACT)


def register_version(
    client: Any, config: MlflowConfig, name: str, rec: VersionRecord, doc: Mapping[str, Any],
    report_for: ReportSource | None,
) -> Any:
    """Register ``rec`` as a new version of ``name``, logging its run first unless an earlier attempt did."""
    experiment = experiment_id(client, config, name, rec.model)
    found = _logged_run(client, experiment, rec)
    report = None
    if found is None:
        report = attached_report(report_for, rec.number)
        found = log_run(client, config, experiment, rec, doc, report)
    run_id, model_id = found
    tags = identity_tags(rec, doc) | {TAG_STATE: rec.state}
    if report is not None:
        tags |= {TAG_REPORT: REPORT_ARTIFACT, TAG_REPORT_STATE: rec.state}
    with fluent_uris(config):  # a local registry store resolves models:/<id> through the global tracking URI
        return client.create_model_version(
            name=name, source=f"models:/{model_id}", run_id=run_id, tags=tags,
            description=description(rec, doc), model_id=model_id,
        )


def _logged_run(client: Any, experiment: str, rec: VersionRecord) -> tuple[str, str] | None:
    """A finished earlier run that logged this very version (a registration cut short), if any."""
    runs = client.search_runs(
        [experiment],
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


def log_run(
    client: Any, config: MlflowConfig, experiment: str, rec: VersionRecord, doc: Mapping[str, Any],
    report: bytes | None,
) -> tuple[str, str]:
    """Log one version as a run with its pyfunc model; returns (run id, logged model id)."""
    mlflow = load_mlflow()
    pyfunc = load_pyfunc()
    tags = identity_tags(rec, doc) | {"mlflow.note.content": description(rec, doc)}
    run = client.create_run(experiment, run_name=f"{rec.model}-v{rec.number}", tags=tags)
    run_id = run.info.run_id
    try:
        with tempfile.TemporaryDirectory(prefix="exitwise-mlflow-") as tmp:
            tmpdir = Path(tmp)
            doc_path = tmpdir / "policy.json"
            doc_path.write_bytes(policy_json(doc))
            entry = tmpdir / "exit_policy_model.py"
            entry.write_text(pyfunc.ENTRY_POINT, encoding="utf-8")
            plots = tmpdir / "plots"
            plots.mkdir()
            curve = curve_png(doc)
            if curve is not None:
                (plots / "compute_vs_risk.png").write_bytes(curve)
            for name, png in reliability_pngs(doc).items():
                (plots / f"reliability_{name}.png").write_bytes(png)
            example = pyfunc.input_example(doc)
            with fluent_uris(config), mlflow.start_run(run_id=run_id), warnings.catch_warnings():
                if example is None:  # a vocabulary policy: left out on purpose (K x V floats a row)
                    warnings.filterwarnings("ignore", message=".*An input example was not provided")
                info = mlflow.pyfunc.log_model(
                    name=MODEL_NAME,
                    python_model=str(entry),
                    artifacts={pyfunc.POLICY_ARTIFACT: str(doc_path)},
                    signature=pyfunc.signature(doc),
                    input_example=example,
                    pip_requirements=pyfunc.pip_requirements(),
                    metadata={"exitwise": identity_tags(rec, doc)},
                )
                _log_contents(client, run_id, doc, doc_path, plots, report)
                client.set_tag(run_id, TAG_MODEL_ID, info.model_id)
                client.set_tag(run_id, TAG_LOGGED, "true")
    except BaseException:
        with contextlib.suppress(Exception):  # the server may be the reason we are here
            client.set_terminated(run_id, "FAILED")
        raise
    return run_id, info.model_id


def _log_contents(
    client: Any, run_id: str, doc: Mapping[str, Any], doc_path: Path, plots: Path, report: bytes | None
) -> None:
    """Params and metrics (in batches of 100), the policy JSON, the plots and the report."""
    entities = load_mlflow().entities
    now = int(time.time() * 1000)
    params = [entities.Param(k, v) for k, v in sorted(run_params(doc).items())]
    metrics = [entities.Metric(k, v, now, 0) for k, v in sorted(run_metrics(doc).items())]
    for i in range(0, max(len(params), len(metrics)), 100):
        client.log_batch(run_id, metrics=metrics[i: i + 100], params=params[i: i + 100])
    client.log_artifact(run_id, str(doc_path))
    if any(plots.iterdir()):
        client.log_artifacts(run_id, str(plots), "plots")
    if report is not None:
        log_report(client, run_id, report)
