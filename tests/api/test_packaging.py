"""What a user installs: the runtime alone (numpy and httpx), and the service beside a host's packages.

Both build the project's wheel (non-editable) and install it into a fresh virtual environment,
then talk to a real ``exitwise serve`` over loopback:

- the base install must give a working ``PolicyClient`` and ``decide()`` without any of the
  service's dependencies (listed by ``pip list`` in that environment);
- the full install must live entirely under ``exitwise.*``: a host application's own top-level
  ``calibration`` and ``api`` packages keep working beside it, and ``exitwise --help`` works.

The runtime environment resolves numpy and httpx from the package index (pip's cache makes
that fast after the first run); the full one borrows the test environment's dependencies
through a ``.pth`` file instead of installing 100 distributions again.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import venv
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
World = LiveServer = Any  # fixtures of tests/api/conftest.py


pytestmark = pytest.mark.slow
SQLITE = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)  # the store is not what is tested

SERVICE_ONLY = ("fastapi", "starlette", "sqlalchemy", "alembic", "mlflow", "pandas", "scipy", "matplotlib",
                "weasyprint", "typer", "pydantic", "pyarrow", "uvicorn", "jinja2", "scikit-learn",
                "prometheus-client")


def _run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    kwargs.setdefault("cwd", Path(cmd[0]).parent)  # never this checkout: `python -c` puts the cwd on sys.path
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**env, **kwargs.pop("env", {})},
                          timeout=kwargs.pop("timeout", 600), **kwargs)
    assert proc.returncode == 0, f"{cmd}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built without build isolation (offline) from a copy of this checkout
    (setuptools writes build/ and *.egg-info next to the sources)."""
    out = tmp_path_factory.mktemp("wheel")
    src = out / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".exitwise", ".hypothesis", ".pytest_cache", "site", "build", "*.egg-info", "__pycache__"))
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(out),
          str(src)])
    (whl,) = out.glob("exitwise-*.whl")
    return whl


def _new_venv(path: Path) -> Path:
    venv.EnvBuilder(with_pip=True, clear=True).create(path)
    return path / "bin" / "python"


def _seeded_policy(world: World, make_doc: Callable[..., dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    model = world.model("pkg")
    (doc,) = world.seed(make_doc, model, approve=1, activate={"production": 1})
    return model, doc


FETCH = textwrap.dedent("""
    import json, sys
    import numpy as np
    from exitwise.policies.runtime import PolicyClient

    base_url, model, token, cache = sys.argv[1:5]
    client = PolicyClient(base_url, model, "production", token, cache_dir=cache)
    result = client.refresh()
    policy = client.policy
    logits = np.array([[9.0] + [0.0] * (policy.compiled.n_classes - 1),
                       [0.1] * policy.compiled.n_classes])
    mask = policy.decide(0, logits)
    print(json.dumps({"outcome": result.outcome, "source": policy.source, "mask": mask.tolist(),
                      "modules": sorted(m for m in sys.modules if "." not in m)}))
""")


@SQLITE
def test_runtime_alone_installs_with_numpy_and_httpx_only(
        wheel: Path, tmp_path: Path, world: World, live_server: LiveServer,
        make_doc: Callable[..., dict[str, Any]]) -> None:
    python = _new_venv(tmp_path / "runtime")
    _run([str(python), "-m", "pip", "install", "--quiet", str(wheel)])
    listed = json.loads(_run([str(python), "-m", "pip", "list", "--format", "json"]).stdout)
    names = {d["name"].lower().replace("_", "-") for d in listed}
    assert {"exitwise", "numpy", "httpx"} <= names
    assert sorted(names & set(SERVICE_ONLY)) == []

    model, _ = _seeded_policy(world, make_doc)
    out = _run([str(python), "-c", FETCH, live_server.base_url, model, world.tokens["rita"], str(tmp_path / "c")])
    got = json.loads(out.stdout)
    assert (got["outcome"], got["source"]) == ("updated", "server")
    assert got["mask"] == [True, False]  # a confident row exits at exit 0, a flat one goes on
    assert not set(got["modules"]) & {"scipy", "pandas", "sqlalchemy", "fastapi", "mlflow"}


def test_base_install_command_line_names_the_extra(wheel: Path, tmp_path: Path) -> None:
    python = _new_venv(tmp_path / "runtime")
    _run([str(python), "-m", "pip", "install", "--quiet", str(wheel)])
    proc = subprocess.run([str(python.with_name("exitwise")), "--help"], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path)
    assert proc.returncode == 1
    assert "pip install 'exitwise[server]'" in proc.stderr and "Traceback" not in proc.stderr


HOST = textwrap.dedent("""
    import json, sys
    import numpy as np
    import calibration, api                   # the host application's own packages
    from exitwise.policies.runtime import PolicyClient
    import exitwise.calibration, exitwise.api.app
    base_url, model, token, cache = sys.argv[1:5]
    client = PolicyClient(base_url, model, "production", token, cache_dir=cache)
    print(json.dumps({"host": [calibration.OWNER, api.OWNER], "outcome": client.refresh().outcome,
                      "exitwise_file": exitwise.calibration.__file__}))
""")


@SQLITE
def test_installed_service_lives_under_exitwise_beside_host_packages(
        wheel: Path, tmp_path: Path, world: World, live_server: LiveServer,
        make_doc: Callable[..., dict[str, Any]]) -> None:
    python = _new_venv(tmp_path / "host")
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    # the service's dependencies, borrowed from the test environment (appended after the venv's own packages)
    (site / "borrowed-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    for name in ("calibration", "api"):  # a host application's packages with the same names as our folders
        (site / name).mkdir()
        (site / name / "__init__.py").write_text(f"OWNER = 'host-{name}'\n")
    _run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", str(wheel)])

    help_out = _run([str(python.with_name("exitwise")), "--help"]).stdout
    assert "policy" in help_out and "solve" in help_out

    model, _ = _seeded_policy(world, make_doc)
    got = json.loads(_run([str(python), "-c", HOST, live_server.base_url, model, world.tokens["rita"],
                           str(tmp_path / "c")]).stdout)
    assert got["host"] == ["host-calibration", "host-api"]
    assert got["outcome"] == "updated"
    assert Path(got["exitwise_file"]).is_relative_to(site)  # the installed copy, not this checkout
