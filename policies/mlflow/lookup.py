"""Which MLflow model version an environment's alias, or a store version number, points at.

Read-only questions to MLflow, asked by ``exitwise mlflow uri`` before it prints a ``models:/`` URI.
"""

from __future__ import annotations

from typing import Any

from exitwise.calibration.exceptions import MissingDependency
from exitwise.policies.errors import NotFound
from exitwise.policies.mlflow.config import (
    TAG_STALE,
    TAG_STORE_VERSION,
    MlflowConfig,
    client_for,
    mlflow_config,
    registered_model_name,
)
from exitwise.policies.mlflow.errors import error_code, translate
from exitwise.policies.mlflow.publish import model_versions

_NO_ALIAS = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")  # per store type


def alias_version(model: str, environment: str, *, config: MlflowConfig | None = None, client: Any = None) -> str:
    """The MLflow version behind ``exit-policy-<model>@<environment>``; ``NotFound`` when unset."""
    config = config or mlflow_config()
    name = registered_model_name(model)
    try:
        client = client or client_for(config)
        return str(client.get_model_version_by_alias(name, environment).version)
    except MissingDependency:
        raise
    except Exception as exc:
        if error_code(exc) in _NO_ALIAS:
            raise NotFound(f"MLflow has no alias {environment!r} on {name} (run 'exitwise mlflow sync {model}'; "
                           f"is a version active in {environment!r}?)") from None
        raise translate(exc, f"reading {name}@{environment}", config) from exc


def find_version(model: str, number: int, *, config: MlflowConfig | None = None, client: Any = None) -> str:
    """The MLflow version registered for store version ``number``; ``NotFound`` when not mirrored."""
    config = config or mlflow_config()
    name = registered_model_name(model)
    try:
        client = client or client_for(config)
        found = [mv for mv in model_versions(client, name)
                 if (mv.tags or {}).get(TAG_STORE_VERSION) == str(number) and (mv.tags or {}).get(TAG_STALE) != "true"]
    except MissingDependency:
        raise
    except Exception as exc:
        raise translate(exc, f"listing {name}", config) from exc
    if not found:
        raise NotFound(f"{model} v{number} is not registered in MLflow (run 'exitwise mlflow sync {model}')")
    return str(min(int(mv.version) for mv in found))
