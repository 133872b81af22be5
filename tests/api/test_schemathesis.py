"""schemathesis against the live OpenAPI document of a real uvicorn process: no 5xx, no schema violation.

Every operation of ``/openapi.json`` is exercised with generated requests (as the admin, so
requests get past authentication), in three passes: valid requests (positive), invalid ones
(negative: they must be refused with a documented 4xx, never a 5xx) and valid requests on a
seeded model (so that version, diff, lifecycle and report paths reach real data). Responses
are checked for: no server error, a documented status code, a documented content type and
headers, and a body that conforms to the documented schema.

Bounded for the suite's budget: ``EXITWISE_SCHEMATHESIS_EXAMPLES`` (default 5 on SQLite, 2 on
PostgreSQL) examples per operation and pass, generation phase only, no example database.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import httpx
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]
SEEDED = "fashion-cnn"


def _has_inputs(operation: Any) -> bool:
    definition = operation.definition.raw
    return bool(definition.get("parameters") or definition.get("requestBody"))


def test_live_openapi_document_holds(world: Any, live_server: Any, live_client: httpx.Client,
                                     make_doc: Callable[..., dict[str, Any]]) -> None:
    if "schemathesis" not in world.shared:
        world.seed(make_doc, SEEDED, versions=3, approve=2, activate={"production": 1})
        world.shared["schemathesis"] = True
    examples = int(os.environ.get("EXITWISE_SCHEMATHESIS_EXAMPLES", 5 if world.backend == "sqlite" else 2))
    schema = schemathesis.openapi.from_url(f"{live_server.base_url}/openapi.json")
    auth = {"Authorization": f"Bearer {world.tokens['admin']}"}
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 19

    for operation in operations:
        passes = [("positive", operation.as_strategy(headers=auth))]
        if _has_inputs(operation):
            passes.append(("negative", operation.as_strategy(schemathesis.GenerationMode.NEGATIVE, headers=auth)))
        if "{model}" in operation.path:
            passes.append(("seeded", operation.as_strategy(headers=auth, path_parameters={"model": SEEDED})))
        for name, strategy in passes:

            @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck), derandomize=True)
            @given(case=strategy)
            def run(case: Any) -> None:
                response = case.call(base_url=live_server.base_url, timeout=30)
                case.validate_response(response, checks=CHECKS)

            try:
                run()
            except Exception as exc:  # collect every operation's failure, report them together
                failures.append(f"{operation.label} [{name}]: {type(exc).__name__}: {str(exc)[:1500]}")

    assert not failures, "\n\n".join(failures)
    assert live_client.get("/readyz").status_code == 200  # the server survived it all
