"""The README and the documentation site's generators (the site itself is built by ``make docs``).

- README.md stays short, its relative links (and their anchors) resolve, and nothing in the
  repository's prose points outside it or hand-maintains a test count.
- The API-reference hook finds every installed package and module, under the names the
  editable install imports them by, and skips private modules.
- The reST-roles griffe extension turns roles into code and leaves literal blocks alone.
- The REST reference covers every operation and schema of the app's OpenAPI document, and
  every link on it lands on an anchor it defines.
- The runtime-client snippet of the serving page matches PolicyClient's real signature and its
  inference loop runs.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import re
import sys
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from markdown.extensions.toc import slugify

from exitwise.policies.runtime import PolicyClient, RuntimePolicy

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*(?:\{#([^}]+)\})?\s*$", re.MULTILINE)


def load_hook(name: str) -> ModuleType:
    """Import one of docs/hooks/*.py by path (they are MkDocs hooks, not an installed package)."""
    spec = importlib.util.spec_from_file_location(f"docs_hook_{name}", DOCS / "hooks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def anchors_of(markdown_text: str) -> set[str]:
    """The heading anchors a Markdown page gets (explicit ``{#id}`` or the toc extension's slug)."""
    text = re.sub(r"```.*?```", "", markdown_text, flags=re.DOTALL)
    return {explicit or slugify(re.sub(r"[`*]", "", title), "-") for title, explicit in HEADING.findall(text)}


def prose_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


# ---------------------------------------------------------------- README and pages


def test_readme_is_short() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; details belong on a docs/ page"


@pytest.mark.parametrize("page", prose_files(), ids=lambda p: p.name)
def test_relative_links_resolve(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    for target in LINK.findall(re.sub(r"```.*?```", "", text, flags=re.DOTALL)):
        if re.match(r"^[a-z]+:", target):
            continue  # absolute URLs are not checked here (the site build refuses them in docs/)
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        generated = path.startswith(("rest-api/", "reference/")) and page.parent == DOCS
        if generated:
            continue  # written by the hooks at build time; `make docs` checks those links
        assert resolved.exists(), f"{page.name}: link {target!r} points at nothing"
        if anchor and resolved.suffix == ".md":
            assert anchor in anchors_of(resolved.read_text(encoding="utf-8")), \
                f"{page.name}: link {target!r}: {resolved.name} has no heading with that anchor"


@pytest.mark.parametrize("page", prose_files(), ids=lambda p: p.name)
def test_no_pointer_outside_the_repository(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    assert "DESIGN.md" not in text and "shared/" not in text, \
        f"{page.name} points at a file outside the repository; the design contract is docs/design.md"


@pytest.mark.parametrize("page", prose_files(), ids=lambda p: p.name)
def test_no_hand_maintained_test_count(page: Path) -> None:
    counts = re.findall(r"\b\d[\d, ]*\s+(?:tests|test cases)\b", page.read_text(encoding="utf-8"))
    assert not counts, f"{page.name} states a test count ({counts}); pytest reports the count"


# ---------------------------------------------------------------- API reference hook


def test_reference_covers_every_installed_package() -> None:
    hook = load_hook("api_reference")
    documented = {m.name for m in hook.discover_modules(ROOT)}
    with (ROOT / "pyproject.toml").open("rb") as fh:
        packages = tomllib.load(fh)["tool"]["setuptools"]["packages"]
    for package in packages:
        if any(package == s or package.startswith(s + ".") for s in hook.SKIPPED):
            continue
        spec = importlib.util.find_spec(package)
        assert spec is not None, package
        if spec.origin is not None:  # None: a folder of package data (templates), no Python
            assert package in documented, f"installed package {package} has no reference page"


def test_reference_modules_are_the_importable_public_ones() -> None:
    hook = load_hook("api_reference")
    modules = hook.discover_modules(ROOT)
    names = [m.name for m in modules]
    assert len(names) == len(set(names))
    assert "exitwise.policies.runtime" in names and "exitwise.api.cli" in names
    for module in modules:
        assert not any(part.startswith("_") for part in module.name.split(".")), module.name
        assert not module.name.startswith("exitwise.migrations"), module.name
        spec = importlib.util.find_spec(module.name)  # the editable install's mapping
        assert spec is not None and Path(spec.origin or "").resolve() == module.source.resolve(), module.name
    pages = [m.page for m in modules]
    assert len(pages) == len(set(pages))


def test_reference_nav_lists_every_page_once() -> None:
    hook = load_hook("api_reference")
    modules = hook.discover_modules(ROOT)

    def pages(entry: Any) -> list[str]:
        if isinstance(entry, str):
            return [entry]
        if isinstance(entry, dict):
            return [p for value in entry.values() for p in pages(value)]
        return [p for item in entry for p in pages(item)]

    listed = pages(hook.nav_section(modules))
    assert sorted(listed) == sorted([hook.PLACEHOLDER, *(m.page for m in modules)])


# ---------------------------------------------------------------- reST roles extension


def test_roles_become_code_and_literal_blocks_stay() -> None:
    rewrite = load_hook("griffe_rest_roles").rewrite
    text = (
        "Uses :func:`exitwise.calibration.rule.decide` and :class:`~pkg.mod.Thing`\n"
        "and :meth:`the title <exitwise.a.b>` and :mod:`unknown.place`::\n"
        "\n"
        "    tau[s][k] :func:`kept`\n"
        "\n"
        "Back to prose (DESIGN.md): thresholds[s][k][c] but ``a[s][k]`` stays.\n"
        "\n"
        "::\n"
        "\n"
        "    raw\n"
    )
    out = rewrite(text, lambda target: target if target.startswith("exitwise.") else None)
    assert '<autoref identifier="exitwise.calibration.rule.decide" optional>' in out
    assert "<code>exitwise.calibration.rule.decide</code>" in out
    assert "`Thing`" in out and ":class:" not in out
    assert '<autoref identifier="exitwise.a.b" optional><code>the title</code></autoref>' in out
    assert "`unknown.place`:\n" in out  # "::" ends a paragraph as ":"
    assert "    tau[s][k] :func:`kept`" in out  # literal block untouched
    assert "thresholds[s]\\[k]\\[c]" in out  # an index, not a Markdown reference link
    assert "``a[s][k]``" in out
    assert "(the design contract)" in out and "DESIGN.md" not in out
    assert "\n::\n" not in out and "    raw" in out


# ---------------------------------------------------------------- REST reference hook


def test_rest_reference_covers_the_openapi_document() -> None:
    hook = load_hook("rest_api")
    doc = hook.openapi_document()
    page = hook.render(doc)
    for path, item in doc["paths"].items():
        for method in item:
            assert f"### `{method.upper()} {path}`" in page, (method, path)
    for name in doc["components"]["schemas"]:
        assert f"### {name} {{#{hook.schema_anchor(name)}}}" in page, name
    defined = set(re.findall(r"\{#([^}]+)\}", page))
    for anchor in re.findall(r"\]\(#([^)]+)\)", page):
        assert anchor in defined, f"REST page links to #{anchor}, which it does not define"


def test_rest_types_read_as_words() -> None:
    type_of = load_hook("rest_api").type_of
    assert type_of({"$ref": "#/components/schemas/ActiveOut"}) == "[ActiveOut](#schema-activeout)"
    assert type_of({"anyOf": [{"type": "string"}, {"type": "null"}]}) == "string or null"
    assert type_of({"type": "array", "items": {"type": "integer"}}) == "array of integer"
    assert type_of({"type": "object", "additionalProperties": {"type": "number"}}) == "object of number"
    assert type_of({"enum": ["html", "pdf"]}) == '`"html"` \\| `"pdf"`'


# ---------------------------------------------------------------- the runtime-client snippet


def serving_snippet() -> str:
    text = (DOCS / "serving.md").read_text(encoding="utf-8")
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL) if "PolicyClient(" in b]
    assert len(blocks) == 1, "the serving page has exactly one runtime-client snippet"
    return blocks[0]


def test_snippet_calls_policy_client_as_it_is_defined() -> None:
    tree = ast.parse(serving_snippet())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "PolicyClient"]
    assert len(calls) == 1
    call = calls[0]
    args = [object() for _ in call.args]
    kwargs = {kw.arg: object() for kw in call.keywords if kw.arg is not None}
    inspect.signature(PolicyClient).bind(*args, **kwargs)  # raises TypeError on a wrong call
    used = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    for name in used & {"start", "close", "refresh", "policy", "decide", "shadow"}:
        owner = PolicyClient if name in ("start", "close", "refresh", "policy") else RuntimePolicy
        assert hasattr(owner, name), name


def test_snippet_inference_loop_runs_at_full_depth_without_a_policy(tmp_path: Path) -> None:
    tree = ast.parse(serving_snippet())
    keep = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom | ast.FunctionDef)]
    namespace: dict[str, Any] = {}
    exec(compile(ast.Module(body=keep, type_ignores=[]), "serving.md", "exec"), namespace)
    rng = np.random.default_rng(0)
    weights = [rng.normal(size=(6, 3)) for _ in range(3)]
    stages = [lambda h, w=w: (h, h @ w) for w in weights]
    x = rng.normal(size=(8, 6))
    segments = np.array(["a", "b"] * 4)
    # No server was ever reached and nothing is on disk: the client's policy is the full-depth fallback.
    client = PolicyClient("http://127.0.0.1:9", "toy", "production", None, cache_dir=tmp_path, n_exits=3, n_classes=3)
    try:
        answer, exit_at = namespace["infer_batch"](client, stages, x, segments)
    finally:
        client.close()
    assert exit_at.tolist() == [2] * 8
    assert answer.tolist() == (x @ weights[2]).argmax(axis=1).tolist()


CODE_REF = re.compile(r"`(exitwise\.(?:calibration|policies|api|migrations)(?:\.[A-Za-z_][A-Za-z0-9_]*)*)")


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 1, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


@pytest.mark.parametrize("page", prose_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_code_named_in_prose_exists(page: Path) -> None:
    """Every ``exitwise.<layer>...`` name a page cites is a module or attribute that exists today
    (modules move; the API reference follows them by itself, prose does not)."""
    missing = sorted({m.group(1) for m in CODE_REF.finditer(page.read_text(encoding="utf-8"))
                      if not _resolves(m.group(1))})
    assert missing == []
