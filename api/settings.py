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
"""

from __future__ import annotations

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
