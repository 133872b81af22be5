"""Benchmark: what an inference server installs to embed the runtime, against the whole service.

    .venv/bin/python benchmarks/install_size.py [--json]

Builds this checkout's wheel, then installs it into two fresh virtual environments from the
package index (pip's cache makes reruns fast): the base install (``exitwise``: the runtime
client, numpy and httpx) and the service (``exitwise[all]``). Prints, per environment, the
number of installed distributions (pip itself excluded), the size of site-packages and the
wall time of the install.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BOOTSTRAP = {"pip", "setuptools", "wheel"}


def _run(cmd: list[str], cwd: Path) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=cwd).stdout


def _size_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) / 2**20


def measure(tmp: Path, wheel: Path, extras: str) -> dict[str, float | int | str]:
    env = tmp / (extras or "base")
    venv.EnvBuilder(with_pip=True, clear=True).create(env)
    python = env / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp).strip())
    before = _size_mib(site)
    t0 = time.perf_counter()
    _run([str(python), "-m", "pip", "install", "--quiet", f"{wheel}{extras and f'[{extras}]'}"], tmp)
    seconds = time.perf_counter() - t0
    listed = json.loads(_run([str(python), "-m", "pip", "list", "--format", "json"], tmp))
    names = sorted(d["name"] for d in listed if d["name"].lower() not in BOOTSTRAP)
    return {"install": f"exitwise{extras and f'[{extras}]'}", "distributions": len(names),
            "site_packages_mib": round(_size_mib(site) - before, 1), "install_s": round(seconds, 1),
            "names": " ".join(names) if len(names) <= 12 else f"{len(names)} names"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        src = tmp / "src"  # setuptools writes build/ and *.egg-info next to the sources: build a copy
        shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
            ".git", ".venv", ".exitwise", ".hypothesis", ".pytest_cache", "site", "build", "*.egg-info", "__pycache__"))
        _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(tmp),
              str(src)], tmp)
        (wheel,) = tmp.glob("exitwise-*.whl")
        rows = [measure(tmp, wheel, ""), measure(tmp, wheel, "all")]
    if args.json:
        print(json.dumps({"environments": rows}))
        return
    print(f"{'install':<16} {'distributions':>13} {'site-packages':>14} {'install time':>13}  distributions")
    for r in rows:
        print(f"{r['install']:<16} {r['distributions']:>13} {r['site_packages_mib']:>10.1f} MiB "
              f"{r['install_s']:>11.1f} s  {r['names']}")


if __name__ == "__main__":
    main()
