"""Store settings from the environment (pydantic-settings), read when asked, never at import.

``EXITWISE_DATA_DIR`` (default ``./.exitwise``) holds the embedded SQLite database;
``EXITWISE_DATABASE_URL`` selects any other database (PostgreSQL in production, e.g.
``postgresql+psycopg://user@host/db``). The data directory is created only when the
default SQLite URL is actually resolved.

Audit anchor (``exitwise.policies.anchor``), all optional: ``EXITWISE_ANCHOR_KEY`` (the Ed25519
private key file that signs checkpoints; keep it away from the database's owner),
``EXITWISE_ANCHOR_FILE`` (the append-only JSONL file of checkpoints), ``EXITWISE_ANCHOR_URL``
(also POST each checkpoint there, best effort, ``EXITWISE_ANCHOR_TIMEOUT_S``, default 2),
``EXITWISE_ANCHOR_STORE`` (a name for this store, signed into each checkpoint) and
``EXITWISE_ANCHOR_PUBLIC_KEY`` (what ``audit verify`` checks signatures with when no private
key is at hand).

Monitoring (``exitwise.policies.monitoring``): ``EXITWISE_SHADOW_MAX_ROWS`` (default 200,000 rows
per upload) and ``EXITWISE_MONITOR_WINDOW_ROWS`` (default 5,000: drift is measured on the newest
batches holding at least this many rows).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from exitwise.calibration.monitor import DriftRules

SQLITE_FILE = "exitwise.db"


@dataclass(frozen=True)
class GovernanceRules:
    """Optional lifecycle rules on top of the fixed ones (four eyes, approved-only activation)."""

    require_staging_before_production: bool = False
    staging_env: str = "staging"
    production_env: str = "production"


@dataclass(frozen=True)
class MonitorSettings:
    """How much shadow data one upload may hold and how recent rows are weighed for drift."""

    max_rows: int = 200_000     # rows per upload
    window_rows: int = 5_000    # drift is measured on the newest batches holding at least this many rows
    rules: DriftRules = field(default_factory=DriftRules)


class StoreSettings(BaseSettings):
    """Where the policy store lives and which optional governance rules apply."""

    model_config = SettingsConfigDict(env_prefix="EXITWISE_", extra="ignore")

    data_dir: Path = Path(".exitwise")
    database_url: str | None = None
    require_staging_before_production: bool = False
    staging_env: str = "staging"
    production_env: str = "production"
    anchor_key: Path | None = None
    anchor_file: Path | None = None
    anchor_url: str | None = None
    anchor_store: str | None = None
    anchor_public_key: Path | None = None
    anchor_timeout_s: float = Field(2.0, gt=0, le=60)
    shadow_max_rows: int = Field(200_000, ge=1, le=10_000_000)
    monitor_window_rows: int = Field(5_000, ge=100, le=10_000_000)

    def resolved_database_url(self) -> str:
        """``database_url`` or the SQLite file under ``data_dir`` (directory created on demand)."""
        if self.database_url:
            return normalise_url(self.database_url)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{(self.data_dir / SQLITE_FILE).resolve()}"

    def monitor_settings(self) -> MonitorSettings:
        """The monitoring service's limits from these settings."""
        return MonitorSettings(max_rows=self.shadow_max_rows, window_rows=self.monitor_window_rows)

    def rules(self) -> GovernanceRules:
        return GovernanceRules(
            require_staging_before_production=self.require_staging_before_production,
            staging_env=self.staging_env,
            production_env=self.production_env,
        )


def normalise_url(url: str) -> str:
    """Pick the psycopg 3 driver for bare ``postgresql://`` / ``postgres://`` URLs."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def get_settings(**overrides: object) -> StoreSettings:
    """Fresh settings from the environment (plus explicit overrides)."""
    return StoreSettings(**overrides)  # type: ignore[arg-type]
