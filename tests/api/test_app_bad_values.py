"""Values an attacker or an unlucky client sends: every one is a 4xx problem, and nothing is stored.

NaN and Infinity, integers no JSON reader keeps, version numbers past the database's range,
NUL bytes, JSON nested hundreds deep, thresholds outside [0, 1] or of the wrong type, absurd
temperatures — through the REST API (in-process and a real server, SQLite and PostgreSQL)
and through the CLI.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from exitwise.policies.canonical import with_content_hash


def _raw(doc: dict[str, Any], **replace: str) -> bytes:
    """``doc`` as JSON text with placeholder strings swapped for raw JSON tokens (NaN, 1e400...)."""
    text = json.dumps(doc)
    for placeholder, token in replace.items():
        text = text.replace(json.dumps(placeholder), token)
    return text.encode()


def _post(api: httpx.Client, world: Any, body: bytes) -> httpx.Response:
    return api.post("/v1/policies", content=body,
                    headers={**world.auth("alice"), "Content-Type": "application/json"})


def _assert_refused(resp: httpx.Response, api: httpx.Client, world: Any, model: str, *needles: str) -> None:
    assert 400 <= resp.status_code < 500, (resp.status_code, resp.text)
    assert resp.headers["content-type"].startswith("application/problem+json")
    text = json.dumps(resp.json())
    for needle in needles:
        assert needle in text, (needle, text)
    assert api.get(f"/v1/models/{model}/versions", headers=world.auth("rita")).status_code == 404  # nothing stored


def _nested(depth: int) -> str:
    """JSON text of a list nested ``depth`` deep (built as text: encoding it would exhaust the stack)."""
    return "[" * depth + "1" + "]" * depth


@pytest.mark.parametrize(("token", "needle"), [
    ("NaN", "non-finite"), ("Infinity", "non-finite"), ("-Infinity", "non-finite"),
    ("1" + "0" * 400, "integer out of range"),
])
def test_non_finite_and_huge_numbers_are_refused(api: httpx.Client, world: Any, make_doc: Callable[..., dict],
                                                 token: str, needle: str) -> None:
    m = world.model("nan")
    doc = make_doc(model=m)
    doc["expected"]["compute_fraction"] = "@@X@@"
    resp = _post(api, world, _raw(doc, **{"@@X@@": token}))
    _assert_refused(resp, api, world, m, needle, "expected.compute_fraction")


@pytest.mark.parametrize("depth", [300, 990])
def test_deeply_nested_json_is_refused(api: httpx.Client, world: Any, make_doc: Callable[..., dict],
                                       depth: int) -> None:
    m = world.model("deep")
    doc = make_doc(model=m)
    doc["data"]["nested"] = "@@X@@"  # the hash is not even computed: the depth refuses it first
    resp = _post(api, world, _raw(doc, **{"@@X@@": _nested(depth)}))
    # 300 deep parses and the document check names the depth; 990 deep is refused by the JSON parser (400)
    _assert_refused(resp, api, world, m, *(["nested deeper than"] if resp.status_code == 422 else []))


def test_parent_beyond_the_version_range_is_refused(api: httpx.Client, world: Any,
                                                    make_doc: Callable[..., dict]) -> None:
    m = world.model("parent")
    doc = make_doc(model=m, parent=2**63)
    _assert_refused(_post(api, world, json.dumps(doc).encode()), api, world, m, "parent")


@pytest.mark.parametrize(("where", "value", "needle"), [
    ("threshold", -5, "greater than or equal to 0"),
    ("threshold", 7, "less than or equal to 1"),
    ("threshold", 1e308, "less than or equal to 1"),
    ("threshold", "0.5", "valid number"),
    ("threshold", True, "valid number"),
    ("temperature", 1e-320, "temperature"),
    ("temperature", 0, "temperature"),
    ("temperature", "1.3", "temperature"),
    ("certified", "yes", "certified"),
    ("classes", ["a", "a", "b", "c"], "unique"),
    ("text", "lab\x00el", "control character U+0000"),
])
def test_values_are_checked_against_their_meaning(api: httpx.Client, world: Any, make_doc: Callable[..., dict],
                                                  where: str, value: Any, needle: str) -> None:
    """Each document carries a valid content hash: only the value's meaning refuses it."""
    m = world.model("meaning")
    doc = {k: v for k, v in make_doc(model=m).items() if k != "content_hash"}
    if where == "threshold":
        doc["thresholds"]["default"][0][1] = value
    elif where == "temperature":
        doc["exits"][0]["calibrator"]["temperature"] = value
    elif where == "certified":
        doc["guarantee"]["certified"] = value
    elif where == "text":
        doc["data"]["source"] = value
    else:
        doc[where] = value
    resp = _post(api, world, json.dumps(with_content_hash(doc)).encode())
    _assert_refused(resp, api, world, m, needle)
    assert resp.status_code == 422


def test_nul_bytes_and_huge_cursors_are_4xx(api: httpx.Client, world: Any, make_doc: Callable[..., dict]) -> None:
    m = world.model("nul")
    world.seed(make_doc, m, versions=1)
    for reason in ("ok\x00", "a\x1bb"):
        resp = api.post(f"/v1/models/{m}/versions/1/approve", json={"reason": reason}, headers=world.auth("bob"))
        assert resp.status_code == 422, resp.text
    assert api.get(f"/v1/models/{m}/versions/1", headers=world.auth("rita")).json()["state"] == "draft"
    for params in ({"model": "a\x00b"}, {"actor": "x\x00"}, {"action": "version.\x00"}):
        assert api.get("/v1/audit", params=params, headers=world.auth("rita")).status_code == 422, params
    huge = base64.urlsafe_b64encode(b"seq:" + b"9" * 30).decode().rstrip("=")
    assert api.get("/v1/audit", params={"cursor": huge}, headers=world.auth("rita")).status_code == 422
    ok = api.post(f"/v1/models/{m}/versions/1/approve", json={"reason": "multi\nline\treason"},
                  headers=world.auth("bob"))
    assert ok.status_code == 200, ok.text


def test_cli_refuses_bad_values_with_exit_2_and_stores_nothing(tmp_path: Path, store_env: str,
                                                                make_doc: Callable[..., dict],
                                                                cli: Callable[..., Any]) -> None:
    run = cli
    token = run("principal", "add", "admin", "--role", "admin", "--quiet")[1].strip()
    cases = {
        "nan": _raw({**make_doc(model="cli-bad"), "expected": {"compute_fraction": "@@X@@"}}, **{"@@X@@": "NaN"}),
        "huge": _raw({**make_doc(model="cli-bad"), "expected": {"compute_fraction": "@@X@@"}},
                     **{"@@X@@": "1" + "0" * 400}),
        "deep": _raw({**make_doc(model="cli-bad"), "data": {"nested": "@@X@@"}}, **{"@@X@@": _nested(500)}),
    }
    for name, body in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_bytes(body)
        code, out, err = run("policy", "create", str(path), "--token", token)
        assert code == 2, (name, code, out, err)
        assert err.startswith("error: ") and err.count("\n") == 1 and "internal error" not in err, err
    code, out, _ = run("policy", "list", "--json")
    assert code == 0 and "cli-bad" not in out
