"""Benchmark: the runtime read path under load on loopback, beside nginx serving the same bytes (issue 5, (b)).

    apt-get install -y wrk nginx          # Debian packages
    .venv/bin/python benchmarks/serve_load.py [--duration 10] [--connections 32] [--threads 2] [--json]

What it does, all on 127.0.0.1 and in a temporary directory:

1. a fresh SQLite store (or ``EXITWISE_DATABASE_URL``) with a reader and one realistic policy
   (4 exits, 10 classes, 3 segments, curve and baselines; ~8 KB) active in production;
2. ``exitwise serve --workers 1`` (uvicorn, one worker process);
3. nginx (one worker process, same as uvicorn) serving the very same body as a static file,
   with its own ETag, from a temporary config; stopped at the end;
4. ``wrk -t2 -c32 -d10s --latency`` four times: API 200, API 304 (``If-None-Match``), nginx
   200, nginx 304. Requests/s and p50/p99 latency are parsed from wrk's output.

Targets (issue 5): p99 < 20 ms, and at least 20% of nginx's requests/s, for 200 and for 304.
On a machine shared with other work the numbers are noisy; wrk, nginx and uvicorn share the
same cores, so the absolute numbers understate a dedicated server.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]

from exitwise.policies import lifecycle  # noqa: E402
from exitwise.policies.canonical import with_content_hash  # noqa: E402
from exitwise.policies.db import make_engine, unit_of_work, upgrade  # noqa: E402
from exitwise.policies.principals import add_principal  # noqa: E402

MODEL = "bench-cnn"


def realistic_document(k: int = 4, c: int = 10, segments: tuple[str, ...] = ("studio", "phone", "scan")) -> dict:
    """A policy document of the size a real solve produces (thresholds, curve, baselines, calibration)."""
    classes = ["T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot"][:c]

    def rows(shift: float) -> list[list[float | None] | None]:
        return [[round(0.8 + shift + 0.011 * j + 0.02 * i, 6) if (i + j) % 7 else None for j in range(c)]
                for i in range(k - 1)]

    metrics = {"accuracy": 0.91, "nll": 0.27, "brier": 0.13, "ece": 0.012, "ece_mass": 0.011, "mce": 0.05}
    doc: dict[str, Any] = {
        "schema": "exitwise.policy/v1",
        "model": {"name": MODEL, "version": "7"},
        "exits": [{"name": f"stage{i + 1}", "cost": 1.9e6 * (i + 1) ** 1.5,
                   "calibrator": {"type": "temperature", "temperature": round(1.1 + 0.1 * i, 4)}} for i in range(k)],
        "classes": classes,
        "score": "max_prob",
        "segment_keys": ["capture"],
        "thresholds": {"default": rows(0.0), **{s: rows(0.01 * (n + 1)) for n, s in enumerate(segments)}},
        "forced_full_depth": {"classes": ["Shirt"], "segments": []},
        "max_exit": None,
        "shadow_rate": 0.01,
        "guarantee": {"risk": "disagreement", "eps": 0.02, "delta": 0.05,
                      "method": "learn-then-test (fixed-sequence, exact binomial)", "n": 20000, "certified": True,
                      "segments": {s: {"eps": 0.02, "n": 6000, "upper_bound": 0.0187, "certified": True}
                                   for s in ("__all__", *segments)},
                      "uncertified_segments": [],
                      "split": {"choose": 40000, "certify": 20000, "seed": 0}},
        "expected": {"compute_fraction": 0.58, "exit_rate": [0.5, 0.2, 0.1, 0.2], "risk": 0.011,
                     "disagreement": 0.011, "induced_error": 0.004,
                     "segments": {s: {"compute_fraction": 0.6, "risk": 0.012, "n": 6000} for s in segments},
                     "batch_compute_fraction": {"1": 0.58, "8": 0.83, "32": 0.97},
                     "baselines": {b: {"compute_fraction": 0.7, "risk": 0.013} for b in
                                   ("full_depth", "global_threshold", "calm", "per_exit")},
                     "curve": [{"eps": round(0.005 * i, 4), "compute_fraction": round(1 - 0.03 * i, 4),
                                "risk": round(0.004 * i, 4)} for i in range(1, 21)]},
        "calibration": {"exits": [{"name": f"stage{i + 1}", "before": metrics, "after": metrics} for i in range(k)]},
        "data": {"fingerprint": "sha256:" + "cd" * 32, "rows": {"choose": 40000, "certify": 20000},
                 "time_window": ["2025-01-01T00:00:00Z", "2025-01-31T23:59:59Z"],
                 "segment_counts": {s: 20000 for s in segments}, "source": "fashion_logs.parquet"},
        "solver": {"grid": 200, "seed": 0},
        "parent": None,
    }
    return with_content_hash(doc)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text.strip())
    if not m:
        raise ValueError(f"unparsable wrk latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def run_wrk(url: str, headers: dict[str, str], *, threads: int, connections: int, duration: int,
            expect: int) -> dict[str, Any]:
    """Run wrk once; requests/s, p50/p99 (ms) and a check that the answers had the expected status."""
    status = httpx.get(url, headers=headers, timeout=5).status_code
    if status != expect:
        raise RuntimeError(f"{url} answered {status}, expected {expect} before the load run")
    cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency"]
    for k, v in headers.items():
        cmd += ["-H", f"{k}: {v}"]
    out = subprocess.run([*cmd, url], capture_output=True, text=True, check=True, timeout=duration + 60).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    pct = {p: _ms(v) for p, v in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)", out, flags=re.M)}
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    return {"requests_per_s": rps, "p50_ms": pct["50"], "p99_ms": pct["99"], "requests": total,
            "non_2xx_3xx": int(errors.group(1)) if errors else 0,
            "socket_errors": socket_errors.group(1) if socket_errors else None}


NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
{user}
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    types {{ application/json json; }}
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location / {{ etag on; }}
    }}
}}
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    for tool in ("wrk", "nginx"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            print(f"error: {tool} not found (apt-get install -y wrk nginx)", file=sys.stderr)
            return 2
    nginx_bin = shutil.which("nginx") or "/usr/sbin/nginx"

    tmp = Path(tempfile.mkdtemp(prefix="exitwise-load-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        url = os.environ.get("EXITWISE_DATABASE_URL") or f"sqlite:///{tmp / 'store.db'}"
        engine = make_engine(url)
        upgrade(engine)
        doc = realistic_document()
        with unit_of_work(engine) as s:
            admin = add_principal("bench-admin", "admin", actor=None, session=s)
            author = add_principal("bench-author", "author", actor=admin.principal, session=s).principal
            approver = add_principal("bench-approver", "approver", actor=admin.principal, session=s).principal
            reader = add_principal("bench-runtime", "reader", actor=admin.principal, session=s).token
            lifecycle.create_version(doc, author=author, session=s)
            lifecycle.approve(MODEL, 1, approver=approver, reason="bench", session=s)
            lifecycle.activate(MODEL, 1, "production", actor=approver, reason="bench", session=s)
        engine.dispose()

        api_port, nginx_port = free_port(), free_port()
        env = {**os.environ, "EXITWISE_DATABASE_URL": url, "EXITWISE_DATA_DIR": str(tmp / "data")}
        exitwise = Path(sys.executable).with_name("exitwise")
        api = subprocess.Popen([str(exitwise), "serve", "--host", "127.0.0.1", "--port", str(api_port),
                                "--workers", "1", "--log-level", "warning"], env=env,
                               stdout=subprocess.DEVNULL, stderr=(tmp / "api.log").open("wb"))
        procs.append(api)
        api_url = f"http://127.0.0.1:{api_port}/v1/models/{MODEL}/policy?env=production"
        wait_http(f"http://127.0.0.1:{api_port}/healthz")
        auth = {"Authorization": f"Bearer {reader}"}
        first = httpx.get(api_url, headers=auth, timeout=5)
        first.raise_for_status()

        root = tmp / "www"
        (root / "v1").mkdir(parents=True)
        (root / "v1" / "policy.json").write_bytes(first.content)  # the very same bytes
        for path in (tmp, root, root / "v1"):
            path.chmod(0o755)
        (root / "v1" / "policy.json").chmod(0o644)
        conf = tmp / "nginx.conf"
        conf.write_text(NGINX_CONF.format(tmp=tmp, port=nginx_port, root=root,
                                          user="user root;" if os.geteuid() == 0 else ""))
        nginx = subprocess.Popen([nginx_bin, "-c", str(conf), "-p", str(tmp)], stdout=subprocess.DEVNULL,
                                 stderr=(tmp / "nginx.log").open("wb"))
        procs.append(nginx)
        nginx_url = f"http://127.0.0.1:{nginx_port}/v1/policy.json"
        wait_http(nginx_url)
        static = httpx.get(nginx_url, timeout=5)
        assert static.content == first.content

        kw = {"threads": args.threads, "connections": args.connections, "duration": args.duration}
        results = {
            "api_200": run_wrk(api_url, auth, expect=200, **kw),
            "api_304": run_wrk(api_url, {**auth, "If-None-Match": first.headers["etag"]}, expect=304, **kw),
            "nginx_200": run_wrk(nginx_url, {}, expect=200, **kw),
            "nginx_304": run_wrk(nginx_url, {"If-None-Match": static.headers["etag"]}, expect=304, **kw),
        }
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)

    summary = {
        "body_bytes": len(first.content), "cpus": os.cpu_count(), "load_average": os.getloadavg(),
        "wrk": f"-t{args.threads} -c{args.connections} -d{args.duration}s", "results": results,
        "ratio_200": results["api_200"]["requests_per_s"] / results["nginx_200"]["requests_per_s"],
        "ratio_304": results["api_304"]["requests_per_s"] / results["nginx_304"]["requests_per_s"],
    }
    summary["targets_met"] = bool(
        results["api_200"]["p99_ms"] < 20 and results["api_304"]["p99_ms"] < 20
        and summary["ratio_200"] >= 0.2 and summary["ratio_304"] >= 0.2)
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"policy body {summary['body_bytes']} bytes; wrk {summary['wrk']}; {summary['cpus']} cpus; "
          f"load average {', '.join(f'{x:.1f}' for x in summary['load_average'])}")
    print(f"{'target':12} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'requests':>9} {'bad':>5}")
    for name, r in results.items():
        print(f"{name:12} {r['requests_per_s']:10.0f} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} {r['requests']:9d} "
              f"{r['non_2xx_3xx']:5d}")
    print(f"API / nginx requests/s: 200 {summary['ratio_200']:.0%}, 304 {summary['ratio_304']:.0%}; "
          f"targets (p99 < 20 ms, >= 20% of nginx) {'met' if summary['targets_met'] else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
