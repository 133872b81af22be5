"""``exitwise serve``: run the REST API under uvicorn."""

from __future__ import annotations

from typing import Annotated

import typer
import uvicorn

from exitwise.api.settings import ApiSettings
from exitwise.calibration.exceptions import InputError
from exitwise.policies.db import open_store
from exitwise.policies.errors import SchemaOutOfDate, StoreUnavailable


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)


def serve(
    host: Annotated[str, typer.Option(help="Interface to bind (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (0 picks a free one).", min=0, max=65535)] = 8000,
    workers: Annotated[int, typer.Option(help="Worker processes (each keeps its own policy cache).", min=1)] = 1,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
    access_log: Annotated[bool, typer.Option(help="Log every request.")] = False,
) -> None:
    """Serve the policy API (runtime read path, management, audit) with uvicorn.

    Settings come from the environment: EXITWISE_DATABASE_URL / EXITWISE_DATA_DIR (the store),
    EXITWISE_CACHE_TTL_MS (how stale a replica may be), EXITWISE_MAX_BODY_BYTES.
    An empty embedded SQLite store is created; a database whose schema is not at head is
    refused ('exitwise db upgrade'). A database that is unreachable at start is waited for:
    /readyz answers 503 until it answers.
    """
    try:
        settings = ApiSettings()  # fail fast, with a one-line error, on bad settings
    except ValueError as exc:
        raise InputError(f"invalid EXITWISE_* settings: {exc}") from None
    try:  # once, before the workers: creates an empty embedded SQLite store, refuses an old schema
        open_store(settings).dispose()
    except SchemaOutOfDate:
        raise
    except StoreUnavailable as exc:  # a database that is down now may be up later: /readyz tells
        typer.echo(f"warning: policy store not reachable yet ({exc}); /readyz answers 503 until it is", err=True)
    uvicorn.run(
        "exitwise.api.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=log_level,
        access_log=access_log,
        proxy_headers=False,
        server_header=False,
    )
