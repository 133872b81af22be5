"""MLflow failures as exitwise errors: unreachable (the sync stays pending) or refused."""

from __future__ import annotations

import sys

from exitwise.policies.errors import PolicyError
from exitwise.policies.mlflow.config import MlflowConfig, redact_uri


class RegistryError(PolicyError):
    """MLflow refused or failed an operation (the message quotes MLflow's)."""

    http_status = 502
    title = "MLflow registry error"


class RegistryUnavailable(RegistryError):
    """The MLflow tracking server or store cannot be reached; the sync stays pending."""

    http_status = 503
    title = "MLflow unavailable"


def error_code(exc: BaseException) -> str | None:
    """The ``error_code`` of an ``MlflowException`` (``RESOURCE_DOES_NOT_EXIST`` ...); None for other errors."""
    return getattr(exc, "error_code", None)


def _is_unreachable(exc: BaseException) -> bool:
    """True for connection failures (server down, refused, timed out), not for MLflow's refusals."""
    # requests is mlflow's HTTP client: if no one imported it, no error can come from it.
    requests = sys.modules.get("requests")
    transport: tuple[type[BaseException], ...] = (ConnectionError,)
    if requests is not None:
        transport += (requests.exceptions.ConnectionError, requests.exceptions.Timeout)
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, transport):
            return True
        text = str(e)
        if "Max retries exceeded" in text or "Connection refused" in text or "Failed to establish" in text:
            return True
        e = e.__cause__ or e.__context__
    return False


def translate(exc: BaseException, what: str, config: MlflowConfig | None = None) -> RegistryError:
    """An MLflow/transport failure as :class:`RegistryUnavailable` or :class:`RegistryError`."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    where = f" at {redact_uri(config.tracking_uri)}" if config is not None else ""
    if _is_unreachable(exc):
        low = message.lower()
        cause = ("connection refused" if "refused" in low else "timed out" if "timed out" in low or "timeout" in low
                 else message[:200])
        return RegistryUnavailable(f"MLflow unreachable{where} while {what}: {cause}")
    return RegistryError(f"MLflow failed{where} while {what}: {message[:300]}")
