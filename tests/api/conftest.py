"""API fixtures: one store per backend with principals of every role, served two ways.

- ``world`` (session, per backend): a migrated database (``databases.new()`` from the root
  conftest) with committed principals ``admin``, ``alice`` (author), ``bob`` and ``carol``
  (approvers), ``rita`` (reader) and ``dora`` (a disabled reader); ``world.seed(...)`` stores
  versions through the lifecycle services (what the CLI does). Tests isolate themselves by
  using their own model name (``world.model()``), so they can share the database.
- ``asgi_client``: FastAPI's ``TestClient`` on ``create_app(settings, engine=world.engine)``.
- ``live_server`` / ``live_client``: a real ``exitwise serve`` process (uvicorn) on a free
  loopback port over the same database.
- ``api`` (parametrised ``asgi`` | ``live``): the same test through both.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from exitwise.api.app import create_app
from exitwise.api.cache import policy_etag
from exitwise.api.settings import ApiSettings
from exitwise.policies import lifecycle
from exitwise.policies.db import make_engine, unit_of_work
from exitwise.policies.principals import add_principal, disable_principal, get_principal

ROOT = Path(__file__).resolve().parents[2]
EXITWISE = Path(sys.executable).with_name("exitwise")
CACHE_TTL_MS = 150
ROLES = {"admin": "admin", "alice": "author", "bob": "approver", "carol": "approver", "rita": "reader"}


@dataclass
class World:
    """A committed store on one backend and the plaintext tokens of its principals."""

    backend: str
    url: str
    engine: Engine
    data_dir: Path
    tokens: dict[str, str] = field(default_factory=dict)
    shared: dict[str, Any] = field(default_factory=dict)

    def auth(self, name: str | None) -> dict[str, str]:
        return {} if name is None else {"Authorization": f"Bearer {self.tokens[name]}"}

    def model(self, prefix: str = "m") -> str:
        return f"{prefix}-{uuid.uuid4().hex[:10]}"

    def seed(self, make_doc: Callable[..., dict[str, Any]], model: str, *, versions: int = 1, approve: int = 0,
             activate: dict[str, int] | None = None, kill: tuple[str, ...] = ()) -> list[dict[str, Any]]:
        """Create ``versions`` drafts (by alice), approve the first ``approve`` (bob), activate, kill."""
        docs = [make_doc(model=model, variant=i) for i in range(versions)]
        with unit_of_work(self.engine) as s:
            alice, bob = get_principal("alice", session=s), get_principal("bob", session=s)
            for i, doc in enumerate(docs):
                lifecycle.create_version(doc, author=alice, session=s)
                if i < approve:
                    lifecycle.approve(model, i + 1, approver=bob, reason="reviewed", session=s)
            for env, number in (activate or {}).items():
                lifecycle.activate(model, number, env, actor=bob, reason="seed", session=s)
            for env in kill:
                lifecycle.kill(model, env, actor=alice, reason="seed", session=s)
        return docs

    def activate(self, model: str, number: int, env: str) -> None:
        """Activate ``number`` in ``env`` as bob (what ``exitwise policy activate`` does)."""
        with unit_of_work(self.engine) as s:
            lifecycle.activate(model, number, env, actor=get_principal("bob", session=s), reason="seed", session=s)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LiveServer:
    """A uvicorn process serving the API on loopback."""

    base_url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def start_server(url: str | None, data_dir: Path, log: Path, *, ttl_ms: int = CACHE_TTL_MS, workers: int = 1,
                 port: int | None = None, hooks: bool = False) -> LiveServer:
    """``exitwise serve`` on a free port; waits until /healthz answers (30 s at most).

    ``url`` None: no EXITWISE_DATABASE_URL, i.e. the embedded SQLite store under ``data_dir``.
    ``hooks`` False: no after-commit mirrors (MLflow, approval reports) in the server.
    """
    port = port or free_port()
    env = {**os.environ, "EXITWISE_DATA_DIR": str(data_dir), "EXITWISE_CACHE_TTL_MS": str(ttl_ms),
           "MLFLOW_DISABLE_TELEMETRY": "true", "EXITWISE_STORE_HOOKS": "true" if hooks else "false"}
    env.pop("EXITWISE_DEBUG", None)
    env.pop("EXITWISE_DATABASE_URL", None)
    if url is not None:
        env["EXITWISE_DATABASE_URL"] = url
    with log.open("ab") as fh:
        proc = subprocess.Popen([str(EXITWISE), "serve", "--host", "127.0.0.1", "--port", str(port),
                                 "--workers", str(workers), "--log-level", "warning"],
                                cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    server = LiveServer(f"http://127.0.0.1:{port}", proc, log)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(server.base_url + "/healthz", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"server did not start within 30 s: {log.read_text()[-2000:]}")


@pytest.fixture(scope="session")
def world(databases: Any, backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    url = databases.new()
    engine = make_engine(url)
    w = World(backend, url, engine, tmp_path_factory.mktemp(f"api-data-{backend}"))
    with unit_of_work(engine) as s:
        boot = add_principal("admin", "admin", actor=None, session=s)
        w.tokens["admin"] = boot.token
        for name, role in ROLES.items():
            if name != "admin":
                w.tokens[name] = add_principal(name, role, actor=boot.principal, session=s).token
        w.tokens["dora"] = add_principal("dora", "reader", actor=boot.principal, session=s).token
        disable_principal("dora", actor=boot.principal, session=s, reason="left")
    yield w
    engine.dispose()
    databases.drop(url)


def settings_for(world: World, **overrides: Any) -> ApiSettings:
    values: dict[str, Any] = {"database_url": world.url, "data_dir": world.data_dir, "cache_ttl_ms": CACHE_TTL_MS,
                              "store_hooks": False}
    values.update(overrides)
    return ApiSettings(**values)


@pytest.fixture
def make_settings(world: World) -> Callable[..., ApiSettings]:
    """``make_settings(**overrides)``: ApiSettings on ``world``'s database."""
    return lambda **overrides: settings_for(world, **overrides)


@pytest.fixture(scope="session")
def cache_ttl() -> float:
    """The EXITWISE_CACHE_TTL_MS of the test apps and servers, in seconds."""
    return CACHE_TTL_MS / 1000


@pytest.fixture(scope="session")
def asgi_client(world: World) -> Iterator[TestClient]:
    app = create_app(settings_for(world), engine=world.engine)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


@pytest.fixture(scope="session")
def live_server(world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    log = tmp_path_factory.mktemp(f"server-{world.backend}") / "server.log"
    server = start_server(world.url, world.data_dir, log)
    yield server
    server.stop()


@pytest.fixture
def spawn_server(tmp_path: Path) -> Iterator[Callable[..., LiveServer]]:
    """``spawn_server(url, data_dir, **kw)``: an ``exitwise serve`` process, stopped after the test."""
    servers: list[LiveServer] = []

    def spawn(url: str | None, data_dir: Path, **kwargs: Any) -> LiveServer:
        server = start_server(url, data_dir, tmp_path / f"server{len(servers)}.log", **kwargs)
        servers.append(server)
        return server

    yield spawn
    for server in servers:
        server.stop()


@pytest.fixture
def start_live_server(world: World, spawn_server: Callable[..., LiveServer]) -> Callable[..., LiveServer]:
    """``start_live_server(**kw)``: a dedicated server on ``world``'s database, stopped after the test."""
    return lambda **kwargs: spawn_server(world.url, world.data_dir, **kwargs)


@pytest.fixture(scope="session")
def live_client(live_server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live_server.base_url, timeout=30) as client:
        yield client


@pytest.fixture(params=["asgi", "live"])
def api(request: pytest.FixtureRequest) -> httpx.Client:
    """The API through FastAPI's TestClient and through a real uvicorn process."""
    return request.getfixturevalue(f"{request.param}_client")


# ---------------------------------------------------------------- a policy server the test scripts

@dataclass
class Posted:
    """One POST the stub received: the path with its query, the headers and the body."""

    path: str
    headers: dict[str, str]
    body: bytes


class PolicyStub:
    """A real loopback HTTP server answering every GET with what the test set.

    ``huge(total, declare)``: a 200 whose body is a valid policy padded with spaces to ``total``
    bytes, generated lazily (64 KiB at a time, one reused buffer); ``sent`` counts what got out.

    POSTs are kept in ``posts`` and answered, in order, by ``answer_posts(...)``'s scripted
    answers, then 200 ``{"batch": i}``. ``post_hold`` (an Event): each POST handler waits for it
    (at most 60 s) after setting ``post_entered``, so a test can hang the server.
    """

    def __init__(self) -> None:
        self.status, self.body, self.headers = 200, b"", {"Content-Type": "application/json"}
        self.huge_total: int | None = None
        self.declare_length = True
        self.sent = 0
        self.done = threading.Event()
        self.posts: list[Posted] = []
        self.post_answers: list[tuple[int, bytes, dict[str, str]]] = []
        self.post_hold: threading.Event | None = None
        self.post_entered = threading.Event()
        self.post_lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.done.clear()
                try:
                    if outer.huge_total is None:
                        self.send_response(outer.status)
                        for k, v in outer.headers.items():
                            self.send_header(k, v)
                        self.send_header("Content-Length", str(len(outer.body)))
                        self.end_headers()
                        self.wfile.write(outer.body)
                    else:
                        outer._send_huge(self)
                finally:
                    outer.done.set()

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with outer.post_lock:
                    outer.posts.append(Posted(self.path, dict(self.headers.items()), body))
                    status, answer, headers = (outer.post_answers.pop(0) if outer.post_answers else
                                               (200, json.dumps({"batch": len(outer.posts)}).encode(),
                                                {"Content-Type": "application/json"}))
                outer.post_entered.set()
                if outer.post_hold is not None:
                    outer.post_hold.wait(60)
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(answer)))
                    self.end_headers()
                    self.wfile.write(answer)
                except OSError:  # the client gave up waiting
                    pass

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def serve(self, body: bytes | dict, status: int = 200, content_type: str = "application/json",
              etag: str | None = None) -> None:
        """Answer ``body``; a policy dict gets the exitwise server's ETag unless ``etag`` is given."""
        if isinstance(body, dict) and etag is None and isinstance(body.get("content_hash"), str):
            etag = policy_etag(body["content_hash"], body.get("version", 1), body.get("killed", False))
        self.huge_total = None
        self.body = json.dumps(body).encode() if isinstance(body, dict) else body
        self.status, self.headers = status, {"Content-Type": content_type, **({"ETag": etag} if etag else {})}

    def answer_posts(self, *answers: tuple[int, dict | bytes] | tuple[int, dict | bytes, dict[str, str]]) -> None:
        """Script the next POST answers: (status, problem dict or bytes[, extra headers])."""
        with self.post_lock:
            for status, body, *extra in answers:
                headers = {"Content-Type": "application/problem+json" if status >= 400 else "application/json",
                           **(extra[0] if extra else {})}
                self.post_answers.append((status, json.dumps(body).encode() if isinstance(body, dict) else body,
                                          headers))

    def huge(self, doc: dict, total: int, *, declare: bool) -> None:
        self.serve(doc)
        self.huge_total, self.declare_length, self.sent = total, declare, 0

    def _send_huge(self, handler: BaseHTTPRequestHandler) -> None:
        head = self.body
        total = self.huge_total or 0
        handler.send_response(200)
        for k, v in self.headers.items():
            handler.send_header(k, v)
        if self.declare_length:
            handler.send_header("Content-Length", str(total))
        handler.end_headers()  # HTTP/1.0 without a length: the body ends when the server closes
        pad = b" " * (64 * 1024)
        try:
            handler.wfile.write(head)
            self.sent = len(head)
            while self.sent < total:
                n = min(len(pad), total - self.sent)
                handler.wfile.write(pad if n == len(pad) else pad[:n])
                self.sent += n
        except OSError:  # the client hung up: what we want
            pass

    def close(self) -> None:
        if self.post_hold is not None:
            self.post_hold.set()  # a held POST handler must not outlive the test
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def policy_stub() -> Iterator[PolicyStub]:
    """A :class:`PolicyStub` on a free loopback port, shut down after the test."""
    stub = PolicyStub()
    yield stub
    stub.close()


# ---------------------------------------------------------------- shadow traffic for make_doc's policy

def shadow_npz(n: int, *, disagree: float = 0.0, segment: str = "studio", confidence: float = 10.0,
               n_exits: int = 3, n_classes: int = 4, model: str | None = None, seed: int = 0) -> bytes:
    """An NPZ upload of ``n`` full-depth rows for ``make_doc``'s policy (3 exits, 4 classes, ``capture``).

    Every exit is confident (logit ``confidence`` on one class) so the policy exits at the first
    exit; a share ``disagree`` of the rows has a last exit that answers another class: a loss.
    """
    import io  # lazy: only shadow tests

    import numpy as np  # lazy: only shadow tests

    rng = np.random.default_rng(seed)
    logits = np.zeros((n, n_exits, n_classes), dtype=np.float32)
    logits[:, :, 0] = confidence
    bad = rng.random(n) < disagree
    logits[bad, -1, 0] = 0.0
    logits[bad, -1, 1] = confidence
    arrays: dict[str, Any] = {"logits": logits, "seg_capture": np.array([segment] * n)}
    if model is not None:
        arrays["model"] = np.array([model] * n)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@pytest.fixture(scope="session")
def shadow_body() -> Callable[..., bytes]:
    """``shadow_body(n, disagree=0.0, segment="studio", ...)``: see :func:`shadow_npz`."""
    return shadow_npz
