"""Benchmark: the policy read path while readers download PDF audit reports (issue 15).

    .venv/bin/python benchmarks/report_load.py [--duration 15] [--readers 4] [--code REF] [--json]

All on 127.0.0.1 in a temporary directory, one ``exitwise serve --workers 1`` (uvicorn) per phase:

1. a fresh SQLite store with a reader and ``--readers`` + 1 realistic policy versions (4 exits,
   10 classes, 3 segments; the document of ``serve_load.py``), v1 active in production;
2. phase ``alone``: two pollers (closed loop, 10 ms pause) GET the production policy;
3. phase ``same``: the pollers, and ``--readers`` clients each asking for the PDF report of v1
   again and again (a reader answered 503 waits its ``Retry-After``);
4. phase ``distinct``: the same with each reader on its own version, on a server started with
   the report caches off (``EXITWISE_REPORT_CACHE_BYTES=0``, ``..._DISK_BYTES=0``), so every
   request renders: what the poll path sees while renders run back to back.

Each phase lasts ``--duration`` s; then the readers finish their request in progress (at most
180 s) and the server is stopped. Printed per phase: poll p50/p99/max, reports answered 200 and
503 and their latency, the ``X-Report-Cache`` sources; at the end the wall time and the peak
RSS of the server, its render processes and this script. ``--code REF`` serves the code of git
ref REF of this repository instead of the installed one (e.g. ``--code main`` for "before"); the
cache settings are then ignored by code that has none.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_load import MODEL, free_port, realistic_document

from exitwise.policies import lifecycle
from exitwise.policies.canonical import with_content_hash
from exitwise.policies.db import make_engine, unit_of_work, upgrade
from exitwise.policies.principals import add_principal

ROOT = Path(__file__).resolve().parents[1]
DRAIN_S = 180.0


def seed(url: str, versions: int) -> str:
    """A store with ``versions`` approved versions of MODEL (v1 active in production); the reader's token."""
    engine = make_engine(url)
    upgrade(engine)
    with unit_of_work(engine) as s:
        admin = add_principal("bench-admin", "admin", actor=None, session=s)
        author = add_principal("bench-author", "author", actor=admin.principal, session=s).principal
        approver = add_principal("bench-approver", "approver", actor=admin.principal, session=s).principal
        reader = add_principal("bench-reader", "reader", actor=admin.principal, session=s).token
        for n in range(1, versions + 1):
            doc = realistic_document()
            doc["solver"]["seed"] = n  # distinct content, same size
            lifecycle.create_version(with_content_hash(doc), author=author, session=s)
            lifecycle.approve(MODEL, n, approver=approver, reason="bench", session=s)
        lifecycle.activate(MODEL, 1, "production", actor=approver, reason="bench", session=s)
    engine.dispose()
    return reader


def code_checkout(ref: str, tmp: Path) -> Path:
    """``git archive REF`` as an importable ``exitwise`` namespace under ``tmp``; the PYTHONPATH entry."""
    target = tmp / "code"
    (target / "exitwise").mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(target / "exitwise")], input=archive, check=True)
    return target


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    """Wait until ``url`` answers; RuntimeError if ``proc`` exits or ``timeout`` passes first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer (exit code {proc.poll()})")


def _rss_peak_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


class Server:
    """``exitwise serve`` on a free loopback port; tracks the peak RSS of it and its children."""

    def __init__(self, tmp: Path, url: str, extra_env: dict[str, str], pythonpath: Path | None) -> None:
        self.port = free_port()
        env = {**os.environ, "EXITWISE_DATABASE_URL": url, "EXITWISE_DATA_DIR": str(tmp / "data"),
               "EXITWISE_STORE_HOOKS": "false", "MLFLOW_DISABLE_TELEMETRY": "true", **extra_env}
        if pythonpath is not None:
            env["PYTHONPATH"] = str(pythonpath)
        exitwise = Path(sys.executable).with_name("exitwise")
        self.log = (tmp / f"server-{self.port}.log").open("wb")
        self.proc = subprocess.Popen([str(exitwise), "serve", "--host", "127.0.0.1", "--port", str(self.port),
                                      "--workers", "1", "--log-level", "warning"], env=env, cwd=tmp,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        self.base = f"http://127.0.0.1:{self.port}"
        self.peak_kb = {"server": 0, "render": 0}
        self._stop = threading.Event()
        self._watch = threading.Thread(target=self._sample, daemon=True)
        self.log_path = tmp / f"server-{self.port}.log"
        try:
            wait_http(self.base + "/healthz", self.proc)
        except RuntimeError:
            self.stop()
            raise RuntimeError(f"server did not start: {self.log_path.read_text()[-2000:]}") from None
        self._watch.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            self.peak_kb["server"] = max(self.peak_kb["server"], _rss_peak_kb(self.proc.pid))
            renders = sum(_rss_peak_kb(c) for c in _children(self.proc.pid))
            self.peak_kb["render"] = max(self.peak_kb["render"], renders)

    def stop(self) -> None:
        self._stop.set()
        if self._watch.is_alive():
            self._watch.join()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_phase(server: Server, token: str, *, duration: float, readers: list[int]) -> dict[str, Any]:
    """Poll (2 clients) for ``duration`` s while one reader per entry of ``readers`` asks for that version's PDF."""
    auth = {"Authorization": f"Bearer {token}"}
    start = time.monotonic()
    end = start + duration
    polls: list[float] = []
    slow: list[tuple[float, float]] = []  # (seconds into the phase, ms) of polls over 250 ms
    poll_errors = Counter[int]()
    reports: list[tuple[int, float, str]] = []
    lock = threading.Lock()

    def poller() -> None:
        with httpx.Client(base_url=server.base, headers=auth, timeout=30) as client:
            while time.monotonic() < end:
                t0 = time.perf_counter()
                r = client.get(f"/v1/models/{MODEL}/policy", params={"env": "production"})
                dt = time.perf_counter() - t0
                with lock:
                    if r.status_code == 200:
                        polls.append(dt * 1e3)
                        if dt > 0.25:
                            slow.append((round(time.monotonic() - start, 1), round(dt * 1e3)))
                    else:
                        poll_errors.update([r.status_code])
                time.sleep(0.01)

    def reader(version: int) -> None:
        with httpx.Client(base_url=server.base, headers=auth, timeout=DRAIN_S) as client:
            while time.monotonic() < end:
                t0 = time.perf_counter()
                try:
                    r = client.get(f"/v1/models/{MODEL}/versions/{version}/report", params={"format": "pdf"})
                except httpx.TimeoutException:
                    with lock:
                        reports.append((0, time.perf_counter() - t0, "timeout"))
                    continue
                with lock:
                    reports.append((r.status_code, time.perf_counter() - t0, r.headers.get("x-report-cache", "-")))
                if r.status_code == 503:
                    time.sleep(min(float(r.headers.get("retry-after", "1")), max(0.0, end - time.monotonic())))

    threads = [threading.Thread(target=poller) for _ in range(2)] + [
        threading.Thread(target=reader, args=(v,)) for v in readers]
    t_start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=duration + DRAIN_S)
    ok = [s for code, s, _ in reports if code == 200]
    return {
        "polls": len(polls), "poll_p50_ms": _pct(polls, 0.50), "poll_p99_ms": _pct(polls, 0.99),
        "poll_max_ms": max(polls, default=float("nan")), "poll_errors": dict(poll_errors),
        "slow_polls": sorted(slow),
        "reports_200": len(ok), "reports_503": sum(1 for code, _, _ in reports if code == 503),
        "reports_other": sum(1 for code, _, _ in reports if code not in (200, 503)),
        "report_median_s": statistics.median(ok) if ok else float("nan"), "report_max_s": max(ok, default=float("nan")),
        "sources": dict(Counter(src for code, _, src in reports if code == 200)),
        "seconds": time.perf_counter() - t_start,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=15.0, help="seconds of load per phase")
    ap.add_argument("--readers", type=int, default=4, help="clients asking for PDF reports")
    ap.add_argument("--code", default=None, help="serve the code of this git ref (e.g. main) instead of the installed")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    wall0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="exitwise-report-load-"))
    results: dict[str, Any] = {}
    peaks: dict[str, int] = {"server": 0, "render": 0}
    try:
        pythonpath = code_checkout(args.code, tmp) if args.code else None
        url = f"sqlite:///{tmp / 'store.db'}"
        token = seed(url, args.readers + 1)
        no_cache = {"EXITWISE_REPORT_CACHE_BYTES": "0", "EXITWISE_REPORT_CACHE_DISK_BYTES": "0"}
        phases = [("alone", {}, []), ("same", {}, [1] * args.readers),
                  ("distinct", no_cache, list(range(2, args.readers + 2)))]
        for name, env, readers in phases:
            server = Server(tmp, url, env, pythonpath)
            try:
                httpx.get(f"{server.base}/v1/models/{MODEL}/policy", params={"env": "production"},
                          headers={"Authorization": f"Bearer {token}"}, timeout=10).raise_for_status()
                results[name] = run_phase(server, token, duration=args.duration, readers=readers)
            finally:
                server.stop()
            for k in peaks:
                peaks[k] = max(peaks[k], server.peak_kb[k])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary = {"code": args.code or "installed", "readers": args.readers, "duration_s": args.duration,
               "cpus": os.cpu_count(), "load_average": os.getloadavg(), "phases": results,
               "wall_s": time.perf_counter() - wall0, "peak_rss_mb": {
                   "server": peaks["server"] / 1024, "render_processes": peaks["render"] / 1024,
                   "benchmark": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"code {summary['code']}; {args.readers} PDF readers; {args.duration:.0f} s per phase; "
          f"{summary['cpus']} cpus; load average {', '.join(f'{x:.1f}' for x in summary['load_average'])}")
    print(f"{'phase':9} {'polls':>6} {'p50 ms':>7} {'p99 ms':>8} {'max ms':>8} {'PDF 200':>8} {'503':>4} "
          f"{'PDF median s':>12}  sources")
    for name, r in results.items():
        print(f"{name:9} {r['polls']:6d} {r['poll_p50_ms']:7.1f} {r['poll_p99_ms']:8.1f} {r['poll_max_ms']:8.1f} "
              f"{r['reports_200']:8d} {r['reports_503']:4d} {r['report_median_s']:12.2f}  "
              f"{', '.join(f'{k} {v}' for k, v in sorted(r['sources'].items())) or '-'}")
    for name, r in results.items():
        if r["slow_polls"]:
            print(f"{name}: polls over 250 ms (s into the phase, ms): "
                  + ", ".join(f"{t:.1f} s {ms:.0f}" for t, ms in r["slow_polls"][:12]))
    mem = summary["peak_rss_mb"]
    print(f"wall {summary['wall_s']:.1f} s; peak RSS: server {mem['server']:.0f} MB, render processes "
          f"{mem['render_processes']:.0f} MB, benchmark {mem['benchmark']:.0f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
