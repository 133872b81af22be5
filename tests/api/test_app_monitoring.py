"""Monitoring through the API, in-process and on a real server, on SQLite and PostgreSQL.

Every verdict path (unknown, ok, watch, breach), the automatic kill switch and every refusal:
a refused upload answers a problem naming what is wrong and stores nothing.
"""

from __future__ import annotations

import io
from typing import Any

import httpx
import numpy as np
import pytest

from exitwise.calibration.monitor import score_reference
from exitwise.policies import audit
from exitwise.policies.db import unit_of_work

NPZ = {"Content-Type": "application/x-npz"}


def _upload(api: httpx.Client, world: Any, model: str, body: bytes, *, who: str = "alice", env: str = "production",
            headers: dict[str, str] | None = None, **params: Any) -> httpx.Response:
    return api.post(f"/v1/models/{model}/shadow", params={"env": env, **params}, content=body,
                    headers={**NPZ, **world.auth(who), **(headers or {})})


def _health(api: httpx.Client, world: Any, model: str, env: str = "production") -> dict[str, Any]:
    r = api.get(f"/v1/models/{model}/health", params={"env": env}, headers=world.auth("rita"))
    assert r.status_code == 200, r.text
    return r.json()


def _events(world: Any, model: str, action: str) -> list[Any]:
    with unit_of_work(world.engine, readonly=True) as s:
        return sorted((e for e in audit.log(session=s, model=model, limit=None) if e.action == action),
                      key=lambda e: e.seq)


@pytest.fixture
def active(world: Any, make_doc: Any) -> str:
    """A model whose v1 is active in production (thresholds of make_doc: exits at stage1 when confident)."""
    model = world.model("mon")
    world.seed(make_doc, model, versions=1, approve=1, activate={"production": 1})
    return model


def test_unknown_before_any_shadow_rows(api: httpx.Client, world: Any, active: str) -> None:
    h = _health(api, world, active)
    assert (h["verdict"], h["version"], h["batches"], h["rows"], h["assessment"]) == ("unknown", 1, 0, 0, None)


def test_ok_path_records_the_verdict_and_audits_the_change(api: httpx.Client, world: Any, active: str,
                                                           shadow_body: Any) -> None:
    r = _upload(api, world, active, shadow_body(600))
    assert r.status_code == 200, r.text
    out = r.json()
    assert (out["rows"], out["version"], out["verdict"], out["previous_verdict"], out["duplicate"]) == \
        (600, 1, "ok", "unknown", False)
    h = _health(api, world, active)
    assert h["verdict"] == "ok" and h["recorded"] and h["rows"] == 600 and h["batches"] == 1
    seg = h["assessment"]["segments"]
    assert set(seg) == {"__all__", "studio"}
    assert seg["__all__"]["losses"] == 0 and seg["__all__"]["upper"] < 0.02 and seg["__all__"]["status"] == "safe"
    assert h["assessment"]["compute_fraction"] == pytest.approx(1.9 / 9.0)  # every row left at stage1
    [event] = _events(world, active, "monitor.verdict")
    assert (event.details["from"], event.details["to"], event.actor, event.environment) == \
        ("unknown", "ok", "alice", "production")
    # a second ok batch changes nothing in the audit trail
    assert _upload(api, world, active, shadow_body(300, seed=1)).json()["verdict"] == "ok"
    assert len(_events(world, active, "monitor.verdict")) == 1


def test_breach_path_names_the_segment_and_its_numbers(api: httpx.Client, world: Any, active: str,
                                                       shadow_body: Any) -> None:
    assert _upload(api, world, active, shadow_body(400)).json()["verdict"] == "ok"
    r = _upload(api, world, active, shadow_body(300, disagree=0.5, seed=2))
    assert r.status_code == 200 and r.json()["verdict"] == "breach" and not r.json()["auto_killed"]
    h = _health(api, world, active)
    seg = h["assessment"]["segments"]["studio"]
    assert seg["status"] == "breach" and seg["lower"] > seg["eps"] == 0.02
    assert seg["n"] == 700 and 100 < seg["losses"] < 200
    assert any("segment studio" in reason and "lower bound" in reason for reason in h["assessment"]["reasons"])
    assert "recalibrate" in h["assessment"]["recommendation"]
    assert h["killed"] is False  # the automatic kill switch is off by default
    policy = api.get(f"/v1/models/{active}/policy", params={"env": "production"}, headers=world.auth("rita"))
    assert policy.json()["killed"] is False
    [_, breach] = _events(world, active, "monitor.verdict")
    assert (breach.details["from"], breach.details["to"]) == ("ok", "breach")
    assert breach.details["segments"]["studio"]["lower"] > 0.02
    series = api.get(f"/v1/models/{active}/monitor/series", params={"env": "production"}, headers=world.auth("rita"))
    studio = [p for p in series.json() if p["segment"] == "studio"]
    assert [p["n"] for p in studio] == [400, 700] and studio[0]["lower"] <= 0.02 < studio[1]["lower"]


def test_watch_path_on_drift_with_the_risk_under_budget(api: httpx.Client, world: Any, make_doc: Any,
                                                        shadow_body: Any) -> None:
    rng = np.random.default_rng(5)
    reference = score_reference(rng.uniform(0.3, 1.0, size=(4000, 3)))
    model = world.model("watch")
    doc = make_doc(model=model, calibration={"exits": [], "reference": reference})
    with unit_of_work(world.engine) as s:
        from exitwise.policies import lifecycle  # lazy: one test stores its own document
        from exitwise.policies.principals import get_principal  # lazy: as above

        lifecycle.create_version(doc, author=get_principal("alice", session=s), session=s)
        bob = get_principal("bob", session=s)
        lifecycle.approve(model, 1, approver=bob, reason="ok", session=s)
        lifecycle.activate(model, 1, "production", actor=bob, reason="go", session=s)
    r = _upload(api, world, model, shadow_body(800))  # every score near 1: far from the reference's spread
    assert r.status_code == 200 and r.json()["verdict"] == "watch"
    h = _health(api, world, model)
    assert h["assessment"]["segments"]["__all__"]["upper"] < 0.02
    drift = h["assessment"]["drift"]
    assert all(d["psi"] > 0.2 and d["p_value"] < 1e-6 for d in drift)
    assert any("input drift at exit stage1" in reason for reason in h["assessment"]["reasons"])


def test_automatic_kill_switch_trips_on_breach_and_is_audited(api: httpx.Client, world: Any, active: str,
                                                              shadow_body: Any) -> None:
    cfg = {"env": "production", "auto_kill": True, "reason": "kill on breach"}
    assert api.put(f"/v1/models/{active}/monitor", json=cfg, headers=world.auth("alice")).status_code == 403
    assert api.put(f"/v1/models/{active}/monitor", json=cfg).status_code == 401
    r = api.put(f"/v1/models/{active}/monitor", json=cfg, headers=world.auth("bob"))
    assert r.status_code == 200 and r.json()["auto_kill"] is True
    assert api.put(f"/v1/models/{active}/monitor", json=cfg, headers=world.auth("bob")).status_code == 409
    [configured] = _events(world, active, "monitor.configure")
    assert configured.actor == "bob" and configured.details == {"auto_kill": True}

    r = _upload(api, world, active, shadow_body(200, disagree=1.0))
    assert r.status_code == 200 and r.json()["verdict"] == "breach" and r.json()["auto_killed"] is True
    assert _health(api, world, active)["killed"] is True
    policy = api.get(f"/v1/models/{active}/policy", params={"env": "production"}, headers=world.auth("rita"))
    assert policy.json()["killed"] is True
    [kill] = _events(world, active, "killswitch.kill")
    assert kill.actor == "alice" and kill.reason.startswith("automatic kill switch")
    assert kill.details["evidence"]["trigger"] == "monitor.breach"
    assert kill.details["evidence"]["segments"]["__all__"]["losses"] == 200
    # another breach batch does not kill twice
    assert _upload(api, world, active, shadow_body(50, disagree=1.0, seed=3)).json()["auto_killed"] is False
    with unit_of_work(world.engine, readonly=True) as s:
        assert audit.verify(session=s).ok


def test_a_late_batch_of_an_earlier_version_is_kept_but_not_assessed(api: httpx.Client, world: Any, make_doc: Any,
                                                                     shadow_body: Any) -> None:
    model = world.model("late")
    world.seed(make_doc, model, versions=2, approve=2, activate={"production": 1})
    world.activate(model, 2, "production")
    r = _upload(api, world, model, shadow_body(100, disagree=1.0), version=1)
    assert r.status_code == 200 and (r.json()["version"], r.json()["verdict"]) == (1, "unknown")
    h = _health(api, world, model)
    assert (h["version"], h["verdict"], h["batches"]) == (2, "unknown", 0)
    series = api.get(f"/v1/models/{model}/monitor/series", params={"env": "production", "version": 1},
                     headers=world.auth("rita")).json()
    assert {p["segment"]: p["losses"] for p in series} == {"__all__": 100, "studio": 100}


def test_the_same_body_twice_is_stored_once(api: httpx.Client, world: Any, active: str, shadow_body: Any) -> None:
    body = shadow_body(120, seed=9)
    first = _upload(api, world, active, body)
    again = _upload(api, world, active, body)
    assert (first.status_code, again.status_code) == (200, 200) and first.json()["duplicate"] is False
    assert again.json()["duplicate"] is True and again.json()["batch"] == first.json()["batch"]
    assert _health(api, world, active)["rows"] == 120


def _refused(r: httpx.Response, status: int, *needles: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    for needle in needles:
        assert needle in r.json()["detail"], (needle, r.json())


def test_refusals_store_nothing(api: httpx.Client, world: Any, active: str, make_doc: Any,
                                shadow_body: Any) -> None:
    _refused(_upload(api, world, active, shadow_body(10), who="rita"), 403, "author")
    _refused(_upload(api, world, active, shadow_body(10), who="dora"), 401)
    _refused(api.post(f"/v1/models/{active}/shadow", params={"env": "production"}, content=shadow_body(10),
                      headers=NPZ), 401)
    _refused(_upload(api, world, active, shadow_body(10, n_exits=2)), 422, "2 exits", "3")
    _refused(_upload(api, world, active, shadow_body(10, n_classes=5)), 422, "5 classes")
    _refused(_upload(api, world, active, shadow_body(10, model="another-model")), 422, "another-model", active)
    _refused(_upload(api, world, active, b"PK\x03\x04 not really a zip"), 422, "NPZ")
    _refused(_upload(api, world, active, b""), 422, "empty")
    _refused(_upload(api, world, active, shadow_body(10), headers={"Content-Type": "text/csv"}), 415, "text/csv")
    _refused(_upload(api, world, active, shadow_body(10), version=9), 404, "no version 9")
    _refused(_upload(api, world, active, shadow_body(10), env="staging"), 404, "staging")
    _refused(_upload(api, world, world.model("nobody"), shadow_body(10)), 404, "no model")
    _refused(_upload(api, world, active, shadow_body(10), env="bad env!"), 422)
    nan = io.BytesIO()
    logits = np.zeros((3, 3, 4), dtype=np.float32)
    logits[1, 2, 3] = np.nan
    np.savez(nan, logits=logits, seg_capture=np.array(["studio"] * 3))
    _refused(_upload(api, world, active, nan.getvalue()), 422, "row 1")
    h = _health(api, world, active)
    assert (h["batches"], h["rows"], h["verdict"]) == (0, 0, "unknown")


def test_a_version_never_active_in_the_environment_is_refused(api: httpx.Client, world: Any, make_doc: Any,
                                                               shadow_body: Any) -> None:
    model = world.model("never")
    world.seed(make_doc, model, versions=2, approve=2, activate={"production": 1})
    _refused(_upload(api, world, model, shadow_body(10), version=2), 409, "never active")


def test_json_rows_are_read_too(api: httpx.Client, world: Any, active: str) -> None:
    rows = [{"exit_0": [9, 0, 0, 0], "exit_1": [9, 0, 0, 0], "exit_2": [0, 9, 0, 0], "capture": "studio"}] * 5
    r = api.post(f"/v1/models/{active}/shadow", params={"env": "production"}, json=rows, headers=world.auth("alice"))
    assert r.status_code == 200 and r.json()["rows"] == 5
    series = api.get(f"/v1/models/{active}/monitor/series", params={"env": "production"},
                     headers=world.auth("rita")).json()
    assert {p["segment"]: p["losses"] for p in series} == {"__all__": 5, "studio": 5}


def test_upload_size_limit(world: Any, make_settings: Any, active: str, shadow_body: Any) -> None:
    from fastapi.testclient import TestClient  # lazy: one test builds its own app

    from exitwise.api.app import create_app  # lazy: as above

    app = create_app(make_settings(shadow_max_bytes=4096), engine=world.engine)
    with TestClient(app, raise_server_exceptions=False) as client:
        r = _upload(client, world, active, shadow_body(200))
        assert r.status_code == 413 and "4096" in r.json()["detail"]
        assert _upload(client, world, active, shadow_body(2)).status_code == 200


def test_policy_client_shadow_traffic_reaches_a_verdict_on_a_real_server(world: Any, active: str,
                                                                        live_client: httpx.Client) -> None:
    """The embedded client against ``exitwise serve``: decide, record the shadow rows, upload, breach."""
    from exitwise.policies.runtime import PolicyClient  # lazy: the runtime client in one test

    client = PolicyClient(str(live_client.base_url), active, "production", world.tokens["alice"], cache_dir=False,
                          n_exits=3, n_classes=4, shadow_flush_interval=0.2)
    with client:
        client.start()
        policy = client.policy
        assert policy.version == 1
        logits = np.zeros((300, 3, 4), dtype=np.float32)
        logits[:, :, 0] = 10.0
        logits[:, -1, :] = [0.0, 10.0, 0.0, 0.0]  # the last exit disagrees on every row
        assert policy.decide(0, logits[:, 0, :], segments=["studio"] * 300).all()
        assert client.record_shadow(logits, policy=policy, segments={"capture": ["studio"] * 300}) == 300
        assert client.flush_shadow(timeout=20)
        counters = client.counters()
    assert counters["shadow"]["uploaded"] == 300 and counters["exited"][0] == 300
    h = _health(live_client, world, active)
    assert h["verdict"] == "breach" and h["rows"] == 300 and h["version"] == 1


def test_the_audit_report_shows_the_monitoring_of_the_version(asgi_client: Any, world: Any, active: str,
                                                               shadow_body: Any) -> None:
    api = asgi_client
    assert _upload(api, world, active, shadow_body(400)).status_code == 200
    assert _upload(api, world, active, shadow_body(300, disagree=0.5, seed=4)).json()["verdict"] == "breach"
    r = api.get(f"/v1/models/{active}/versions/1/report", params={"format": "html"}, headers=world.auth("rita"))
    assert r.status_code == 200, r.text
    section = r.text.split('<section id="monitoring">', 1)[1].split("</section>", 1)[0]
    assert "production:" in section and ">breach<" in section and "(700 shadow rows)" in section
    assert "risk over budget in segment studio" in section and "Recommendation:" in section
    assert section.count("data:image/svg+xml") == 1  # the bounds against eps over the shadow rows
