"""Report rendering under a server (issue 15): cached by content, single-flight, bounded, off the event loop.

Each test runs the real app in a real uvicorn server on loopback (in a thread of the test
process, so the renderer's counters can be read) over the ``world`` store, with its own data
directory (so its own disk cache). Renders run in the renderer's real worker process.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from exitwise.api.app import create_app

pytest.importorskip("weasyprint", reason="the [reports] extra renders the reports")


World = Any  # tests/api/conftest.py's World


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Served:
    """An app served by uvicorn on 127.0.0.1 in a background thread."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True, name="test-uvicorn")
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start within 30 s")
            time.sleep(0.05)
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=120)

    @property
    def renders(self) -> int:
        return self.app.state.reports.renders

    def stop(self) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture
def serve(world: World, make_settings: Callable[..., Any], tmp_path: Path) -> Iterator[Callable[..., Served]]:
    """``serve(**settings)``: the app on ``world``'s database with data dir ``tmp_path`` (shared by restarts)."""
    started: list[Served] = []

    def start(**overrides: Any) -> Served:
        app = create_app(make_settings(data_dir=tmp_path, **overrides), engine=world.engine)
        started.append(Served(app))
        return started[-1]

    yield start
    for served in started:
        served.stop()


def _report(served: Served, world: World, model: str, version: int = 1, fmt: str = "html") -> httpx.Response:
    r = served.client.get(f"/v1/models/{model}/versions/{version}/report", params={"format": fmt},
                          headers=world.auth("rita"))
    assert r.status_code == 200, r.text
    return r


def _cache_files(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "report-cache").glob("*.html"))


def _wait_until_rendering(served: Served) -> None:
    """Until the app has a render in flight (30 s at most; 1 s for an app without a renderer)."""
    reports = getattr(served.app.state, "reports", None)
    if reports is None:
        time.sleep(1)
        return
    deadline = time.monotonic() + 30
    while (reports is None or reports.in_flight == 0) and time.monotonic() < deadline:
        time.sleep(0.01)


def test_a_second_request_is_served_from_the_cache_without_rendering(
        world: World, make_doc: Callable[..., dict[str, Any]], serve: Callable[..., Served], tmp_path: Path) -> None:
    model = world.model("rep")
    world.seed(make_doc, model, versions=1)
    served = serve()
    first = _report(served, world, model)
    time.sleep(1.1)  # a new render would carry a new render time (to the second)
    second = _report(served, world, model)
    assert second.content == first.content  # the same bytes, render time included: not rendered again
    assert (first.headers["x-report-cache"], second.headers["x-report-cache"], served.renders) == (
        "rendered", "memory", 1)
    assert len(_cache_files(tmp_path)) == 1
    served.stop()
    restarted = serve()  # a new process's memory is empty; the disk cache under the data dir is not
    third = _report(restarted, world, model)
    assert (third.headers["x-report-cache"], restarted.renders) == ("disk", 0)
    assert third.content == first.content


def test_a_state_change_renders_again(world: World, make_doc: Callable[..., dict[str, Any]],
                                      serve: Callable[..., Served]) -> None:
    model = world.model("rep")
    world.seed(make_doc, model, versions=1)
    served = serve()
    draft = _report(served, world, model)
    assert "draft" in draft.text
    approved = served.client.post(f"/v1/models/{model}/versions/1/approve", json={"reason": "looks right"},
                                  headers=world.auth("bob"))
    assert approved.status_code == 200, approved.text
    after = _report(served, world, model)
    assert (after.headers["x-report-cache"], served.renders) == ("rendered", 2)
    assert "looks right" in after.text and after.content != draft.content
    killed = served.client.post(f"/v1/models/{model}/kill", json={"env": "production", "reason": "incident"},
                                headers=world.auth("alice"))
    assert killed.status_code == 200, killed.text
    assert _report(served, world, model).headers["x-report-cache"] == "rendered"  # the kill switch is in the report
    assert served.renders == 3
    assert _report(served, world, model).headers["x-report-cache"] == "memory"


@pytest.mark.parametrize("damage", ["flip a body byte", "truncate", "empty"])
def test_a_corrupted_cache_file_is_rendered_again_never_served(
        world: World, make_doc: Callable[..., dict[str, Any]], serve: Callable[..., Served], tmp_path: Path,
        damage: str) -> None:
    model = world.model("rep")
    world.seed(make_doc, model, versions=1)
    good = _report(serve(), world, model).content
    (path,) = _cache_files(tmp_path)
    raw = path.read_bytes()
    if damage == "flip a body byte":
        i = len(raw) - 100
        path.write_bytes(raw[:i] + bytes([raw[i] ^ 0x01]) + raw[i + 1:])
    elif damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    else:
        path.write_bytes(b"")
    restarted = serve()  # empty memory: the next answer has to come from disk or a render
    again = _report(restarted, world, model)
    reports = restarted.app.state.reports
    assert (again.headers["x-report-cache"], restarted.renders, reports.disk.corrupt) == ("rendered", 1, 1)
    assert again.content.rstrip().endswith(b"</html>") and model.encode() in again.content
    assert len(again.content) == len(good)  # a whole report (only its render time may differ)
    assert reports.disk.get(path.stem, "html") == again.content  # the file was rewritten whole, digest and all


def test_renders_are_bounded_and_shared(world: World, make_doc: Callable[..., dict[str, Any]],
                                        serve: Callable[..., Served]) -> None:
    if world.backend != "sqlite":
        pytest.skip("the render bound does not depend on the database backend: checked once, on SQLite")
    model = world.model("rep")
    world.seed(make_doc, model, versions=1)
    served = serve(report_render_workers=1, report_render_queue=0)
    with ThreadPoolExecutor(3) as pool:  # three readers want the PDF at once: one render, shared
        pdfs = [pool.submit(_report, served, world, model, 1, "pdf") for _ in range(3)]
        _wait_until_rendering(served)
        # the single slot is taken and no queue: a different report is refused, not piled up
        busy = served.client.get(f"/v1/models/{model}/versions/1/report", params={"format": "html"},
                                 headers=world.auth("rita"))
        answers = [f.result() for f in pdfs]
    assert busy.status_code == 503, busy.text
    assert busy.headers["content-type"].startswith("application/problem+json")
    assert int(busy.headers["retry-after"]) >= 1
    assert busy.json()["type"] == "urn:exitwise:problem:render-busy"
    assert all(a.content.startswith(b"%PDF") and a.content == answers[0].content for a in answers)
    assert sorted(a.headers["x-report-cache"] for a in answers) in (
        ["joined", "joined", "rendered"], ["joined", "memory", "rendered"], ["memory", "memory", "rendered"])
    assert served.renders == 1 and served.app.state.reports.rejected == 1
    assert _report(served, world, model).headers["x-report-cache"] == "rendered"  # the slot is free again


def test_the_api_process_does_not_render(world: World, make_doc: Callable[..., dict[str, Any]],
                                         serve: Callable[..., Served]) -> None:
    """The server runs in this process: a PDF render must cost it next to no CPU (the GIL stays free for polls)."""
    if world.backend != "sqlite":
        pytest.skip("checked once, on SQLite")
    model = world.model("rep")
    world.seed(make_doc, model, versions=1, approve=1, activate={"production": 1})
    served = serve()
    poll = f"/v1/models/{model}/policy"
    assert served.client.get(poll, params={"env": "production"}, headers=world.auth("rita")).status_code == 200
    cpu0, wall0 = time.process_time(), time.perf_counter()
    with ThreadPoolExecutor(1) as pool:
        pdf = pool.submit(_report, served, world, model, 1, "pdf")
        polls = 0
        while not pdf.done():  # the policy is answered while the PDF renders
            assert served.client.get(poll, params={"env": "production"},
                                     headers=world.auth("rita")).status_code == 200
            polls += 1
            time.sleep(0.5)
        assert pdf.result().content.startswith(b"%PDF")
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    assert polls > 0
    # this process served the polls (a few ms each) and the request; the render (>1 s of CPU) ran elsewhere
    assert cpu < 0.5, f"the API process used {cpu:.2f} s of CPU in {wall:.2f} s while one PDF was rendered"
