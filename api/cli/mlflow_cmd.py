"""``exitwise mlflow``: mirror the policy store into MLflow and find the models to load.

- ``exitwise mlflow sync [MODEL]`` — reconcile MLflow with the policy database (register
  missing versions, move aliases to the active versions, kill-switch tags); idempotent. Write
  commands start the same sync of pending models in a detached child (``exitwise.api.cli.mirror``);
  both hold ``<data dir>/mlflow-sync.lock`` while they talk to MLflow.
- ``exitwise mlflow status`` — what the database records: which models are pending and why.
- ``exitwise mlflow uri MODEL --env production`` — the ``models:/`` URI to load.

MLflow goes to ``MLFLOW_TRACKING_URI`` when set, else to the embedded
``sqlite:///<EXITWISE_DATA_DIR>/mlflow.db`` (artifacts under ``<data dir>/mlartifacts``).
``sync`` and ``uri`` (with its default ``--check``) need the ``exitwise[mlflow]`` extra and say
so when it is missing; ``status`` (the policy database only) and ``uri --tracking`` do not.
Importing this module does not import mlflow: the commands that need it load it when they run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from exitwise.api.cli.mirror import sync_lock
from exitwise.api.cli.session import store_engine
from exitwise.calibration.exceptions import InputError
from exitwise.policies.db import unit_of_work
from exitwise.policies.mlflow.config import TAG_STALE, mlflow_config, model_uri, quiet_mlflow_logs, redact_uri
from exitwise.policies.mlflow.lookup import alias_version, find_version
from exitwise.policies.mlflow.sync import SyncOutcome, sync_all, sync_model, sync_status
from exitwise.policies.settings import get_settings

mlflow_app = typer.Typer(
    name="mlflow",
    help="Mirror policies into MLflow (runs, registered versions, aliases per environment).",
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    app.add_typer(mlflow_app, name="mlflow")


@mlflow_app.command("sync")
def sync(
    model: Annotated[str | None, typer.Argument(help="Model to sync (default: every model).",
                                                show_default=False)] = None,
    pending_only: Annotated[bool, typer.Option("--pending", help="Only models the database marks pending.")] = False,
    reports: Annotated[bool, typer.Option("--reports/--no-reports",
                                          help="Attach the audit report to newly registered versions.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Bring MLflow up to date with the policy database; exit 1 if MLflow could not be reached."""
    quiet_mlflow_logs()  # loads mlflow (MissingDependency without the extra), keeps its INFO logs off stderr
    config = mlflow_config()
    # in turn with the mirror children that write commands start (never two registrations of a version)
    with sync_lock(Path(get_settings().data_dir)), store_engine() as engine:
        if model is not None:
            if pending_only:
                raise InputError("--pending applies when syncing every model, not one MODEL")
            outcomes = [sync_model(engine, model, config=config, reports=reports)]
        else:
            outcomes = sync_all(engine, config=config, only_pending=pending_only, reports=reports)
    failed = [o for o in outcomes if not o.ok]
    if as_json:
        typer.echo(json.dumps({
            "tracking_uri": redact_uri(config.tracking_uri),
            "ok": not failed,
            "models": [_outcome_json(o) for o in outcomes],
        }, sort_keys=True))
    else:
        if not outcomes:
            typer.echo("nothing to sync")
        for o in outcomes:
            typer.echo(_outcome_text(o))
    if failed:
        raise typer.Exit(1)


def _outcome_json(o: SyncOutcome) -> dict[str, Any]:
    out = o.to_json()
    if o.result is not None:
        out["uris"] = o.result.uris()
    return out


def _outcome_text(o: SyncOutcome) -> str:
    if not o.ok or o.result is None:
        return f"{o.model}: NOT synced, stays pending — {o.error}"
    r = o.result
    lines = [
        f"{o.model}: {r.registered_model} has {len(r.versions)} version(s)"
        + (f", registered now: {', '.join(f'v{n}' for n in r.registered)}" if r.registered else ", all registered")
    ]
    if r.aliases_removed:
        lines.append(f"  aliases removed: {', '.join(r.aliases_removed)}")
    if r.stale:
        lines.append(f"  MLflow versions not in the store (tagged {TAG_STALE}): {', '.join(r.stale)}")
    by_mlflow = {v: n for n, v in r.versions.items()}
    uris = r.uris()
    for alias, version in sorted(r.aliases.items()):
        lines.append(f"  {uris[alias]}  (policy v{by_mlflow.get(version)}, MLflow version {version})")
    return "\n".join(lines)


@mlflow_app.command("status")
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Show, per model, whether MLflow is behind the policy database (no MLflow call)."""
    config = mlflow_config()
    with store_engine() as engine, unit_of_work(engine, readonly=True) as session:
        statuses = sync_status(session=session, config=config)
    pending = [s.model for s in statuses if s.pending]
    if as_json:
        typer.echo(json.dumps({
            "tracking_uri": redact_uri(config.tracking_uri),
            "pending": pending,
            "models": [s.to_json() for s in statuses],
        }, sort_keys=True))
        return
    typer.echo(f"tracking URI: {redact_uri(config.tracking_uri)}")
    if not statuses:
        typer.echo("no models in the policy store")
    for s in statuses:
        state = "PENDING" if s.pending else "in sync"
        when = s.synced_at.isoformat(timespec="seconds") if s.synced_at else "never"
        line = f"{s.model}: {state} (audit seq {s.audit_seq}, synced up to {s.synced_seq}, last synced {when})"
        if s.failures:
            line += f"\n  {s.failures} failed attempt(s); last error: {s.last_error}"
        typer.echo(line)


@mlflow_app.command("uri")
def uri(
    model: Annotated[str | None, typer.Argument(help="Model name (as stored).", show_default=False)] = None,
    env: Annotated[str | None, typer.Option("--env", "-e", help="Environment (the alias).")] = None,
    version: Annotated[int | None, typer.Option("--version", "-v", min=1,
                                                help="Policy (store) version instead of an environment.")] = None,
    tracking: Annotated[bool, typer.Option("--tracking", help="Print the tracking URI to use (credentials "
                                                              "removed) instead of a model URI.")] = False,
    check: Annotated[bool, typer.Option("--check/--no-check",
                                        help="Ask MLflow that the alias/version exists.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Print the models:/ URI that mlflow.pyfunc.load_model takes for MODEL in --env (or --version)."""
    config = mlflow_config()
    if tracking:
        if model is not None or env is not None or version is not None:
            raise InputError("--tracking takes no MODEL, --env or --version")
        shown = redact_uri(config.tracking_uri)
        typer.echo(json.dumps({"tracking_uri": shown}) if as_json else shown)
        return
    if model is None:
        raise InputError("give MODEL (or --tracking)")
    if (env is None) == (version is None):
        raise InputError("give exactly one of --env ENV or --version N")
    if check:
        quiet_mlflow_logs()
    if env is not None:
        target = model_uri(model, env)
        mlflow_version = alias_version(model, env, config=config) if check else None
    else:
        mlflow_version = find_version(model, version, config=config) if check else None
        target = model_uri(model, version=mlflow_version) if mlflow_version else None
        if target is None:
            raise InputError(f"--version without --check cannot name the MLflow version of {model} v{version}")
    if as_json:
        typer.echo(json.dumps({"model": model, "environment": env, "version": version, "uri": target,
                               "mlflow_version": mlflow_version,
                               "tracking_uri": redact_uri(config.tracking_uri)}, sort_keys=True))
    else:
        typer.echo(target)
