"""Settings of the REST service (pydantic-settings, ``EXITWISE_`` prefix), built in the factory.

Extends the store's settings (``EXITWISE_DATA_DIR``, ``EXITWISE_DATABASE_URL``, governance
rules) with the serving knobs:

- ``EXITWISE_CACHE_TTL_MS`` (default 500): how often, at most, a replica reads the store's
  one-row generation counter to learn that the database changed. A change committed through
  any replica or the CLI is served by every replica after at most this delay (plus one
  database round trip); a change made through a replica is served by that replica at once.
- ``EXITWISE_MAX_BODY_BYTES`` (default 1 MiB): largest accepted request body (413 above).
- ``EXITWISE_POLICY_CACHE_CONTROL`` (default ``no-cache``): the ``Cache-Control`` of policy
  answers. ``no-cache`` lets clients and proxies keep the body but makes them revalidate
  with ``If-None-Match`` on every use, so a kill switch is never hidden behind a max-age;
  the revalidation costs a 304 without a body.
- ``EXITWISE_STORE_HOOKS`` (default true): while the app runs, mirror committed changes to
  MLflow (``exitwise.policies.mlflow``, in a background thread; ``EXITWISE_MLFLOW_SYNC=off`` turns the
  mirror off) and write the audit report of every approved version under the data directory
  (``exitwise.policies.report``, in a background thread). Requests never wait for either.
  With ``EXITWISE_ANCHOR_KEY`` set it also appends a signed checkpoint of the audit head
  after every commit (``exitwise.policies.anchor``; settings in ``exitwise.policies.settings``).
- ``EXITWISE_EVIDENCE_ROOTS`` (default: none): directories, separated by ``:``, under which the
  service may read the calibration logs a policy names (``data.evidence``) to re-verify its
  certificate at approval. Outside them (or unset) approvals record "as claimed by the
  author, not re-verified": an author must not make the service read arbitrary files.
- ``EXITWISE_REPORT_RENDER_WORKERS`` (default 1): report render processes per server process;
  ``EXITWISE_REPORT_RENDER_QUEUE`` (default 2): distinct reports that may wait for one; a request
  that would start one more render is answered 503 with ``Retry-After``.
- ``EXITWISE_REPORT_CACHE_BYTES`` (default 64 MiB): rendered reports kept in memory (LRU);
  ``EXITWISE_REPORT_CACHE_DISK_BYTES`` (default 512 MiB, 0 = off): kept under
  ``<data dir>/report-cache`` (oldest removed first). See docs/reports.md.
- ``EXITWISE_SHADOW_MAX_BYTES`` (default 32 MiB): the largest shadow-log upload (413 above);
  rows per upload and the drift window are store settings (``exitwise.policies.settings``).
- ``EXITWISE_METRICS_PUBLIC`` (default false): ``GET /metrics`` (Prometheus) answers without a
  token, for a scraper inside a private network; otherwise it needs a reader's token.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from exitwise.policies.settings import StoreSettings


class ApiSettings(StoreSettings):
    """Store settings plus the service's own."""

    model_config = SettingsConfigDict(env_prefix="EXITWISE_", extra="ignore")

    cache_ttl_ms: int = Field(500, ge=0, le=60_000)
    max_body_bytes: int = Field(1 << 20, ge=1024)
    policy_cache_control: str = "no-cache"
    store_hooks: bool = True
    title: str = "exitwise"
    evidence_roots: str = ""
    report_render_workers: int = Field(1, ge=1, le=16)
    report_render_queue: int = Field(2, ge=0, le=64)
    report_cache_bytes: int = Field(64 << 20, ge=0)
    report_cache_disk_bytes: int = Field(512 << 20, ge=0)
    shadow_max_bytes: int = Field(32 << 20, ge=1024, le=1 << 30)
    metrics_public: bool = False

    def evidence_paths(self) -> list[Path]:
        """``EXITWISE_EVIDENCE_ROOTS`` as absolute directories (empty: re-verify nothing)."""
        return [Path(p).resolve() for p in self.evidence_roots.split(os.pathsep) if p.strip()]
