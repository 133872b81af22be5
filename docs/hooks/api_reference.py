"""MkDocs hook: the Python API reference, one page per public module, generated at build time.

Nothing in ``docs/`` names a module: the pages, their navigation and the overview are derived
on every build from the code, so a module that is added, renamed, split or removed needs no
documentation edit.

- The packages and their folders come from ``[tool.setuptools] package-dir`` in
  ``pyproject.toml`` (the repository keeps ``calibration/``, ``policies/``, ``api/`` at its
  root; installed, they are ``exitwise.calibration`` and so on).
- Every module below them gets a page with a mkdocstrings ``:::`` directive, except private
  ones (a name starting with ``_``) and the packages in ``SKIPPED``.
- mkdocstrings reads the code with griffe, statically (nothing is imported). griffe cannot
  follow the editable install's renaming of folders, so the build lays out a throw-away
  ``exitwise/`` tree of symbolic links to the package folders in a temporary directory and
  gives it to the Python handler as its search path. Nothing is written to the repository.
- The navigation entry ``reference/index.md`` in ``mkdocs.yml`` is replaced by the generated
  section (an overview page, then one section per package).
"""

from __future__ import annotations

import ast
import importlib.util
import logging
import posixpath
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

log = logging.getLogger("mkdocs.hooks.api_reference")

ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = "exitwise"
FOLDER = "reference"
PLACEHOLDER = f"{FOLDER}/index.md"
# Packages that are installed but are no Python API: Alembic's migration scripts.
SKIPPED = frozenset({"exitwise.migrations"})


def _sibling(name: str) -> Any:
    """Another file of ``docs/hooks`` (hooks are loaded by path, not as a package)."""
    spec = importlib.util.spec_from_file_location(f"exitwise_docs_{name}", Path(__file__).with_name(f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Summaries are read with ast, not griffe: give them the same Markdown reading as the docstrings.
_rest = _sibling("griffe_rest_roles")


@dataclass(frozen=True)
class ModuleDoc:
    """One documented module: its dotted name, source file and one-line summary."""

    name: str
    source: Path
    is_package: bool
    summary: str

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(self.name.split(".")[1:])  # without the namespace

    @property
    def page(self) -> str:
        """Site path of the module's page: ``reference/calibration/io.md``, packages ``.../index.md``."""
        tail = "/".join(self.parts)
        return f"{FOLDER}/{tail}/index.md" if self.is_package else f"{FOLDER}/{tail}.md"


def package_dirs(root: Path = ROOT) -> dict[str, Path]:
    """The top-level ``exitwise.*`` packages and their folders, as ``pyproject.toml`` maps them."""
    with (root / "pyproject.toml").open("rb") as fh:
        mapping = tomllib.load(fh)["tool"]["setuptools"]["package-dir"]
    return {name: root / folder for name, folder in sorted(mapping.items())
            if name.count(".") == 1 and name.startswith(NAMESPACE + ".")}


def discover_modules(root: Path = ROOT) -> list[ModuleDoc]:
    """Every public module of the documented packages, packages before their modules."""
    found: list[ModuleDoc] = []
    for package, folder in package_dirs(root).items():
        if package not in SKIPPED:
            found.extend(_walk(package, folder))
    return found


def _walk(package: str, folder: Path) -> list[ModuleDoc]:
    init = folder / "__init__.py"
    if not init.is_file():
        return []
    found = [ModuleDoc(package, init, True, _summary(init))]
    for path in sorted(folder.iterdir()):
        if path.name.startswith(("_", ".")):
            continue
        if path.is_dir():
            found.extend(_walk(f"{package}.{path.name}", path))
        elif path.suffix == ".py" and path.stem.isidentifier():
            found.append(ModuleDoc(f"{package}.{path.stem}", path, False, _summary(path)))
    return found


def _summary(path: Path) -> str:
    """The first sentence-line of the module docstring (its first paragraph, joined)."""
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    first = doc.split("\n\n", 1)[0]
    return " ".join(_rest.rewrite(first).split())


def page_markdown(module: ModuleDoc, modules: list[ModuleDoc]) -> str:
    """A module's page: a title and the mkdocstrings directive (a package also lists its modules)."""
    lines = [f"::: {module.name}", ""]  # the module's own heading is the page's title (h1)
    children = [m for m in modules if m.name.rpartition(".")[0] == module.name]
    if module.is_package and children:
        lines += ["## Modules", "", "| module | summary |", "|---|---|"]
        lines += [f"| [`{m.name}`]({_relative(module.page, m.page)}) | {_cell(m.summary)} |" for m in children]
        lines.append("")
    return "\n".join(lines)


def overview_markdown(modules: list[ModuleDoc]) -> str:
    """The reference's landing page: every documented module with its summary."""
    lines = [
        "# API reference",
        "",
        "Generated from the docstrings on every build of this site, one page per public module",
        "(modules whose name starts with `_` are private and not listed). The layers import only",
        "downward: `exitwise.calibration` ← `exitwise.policies` ← `exitwise.api`; the runtime",
        "client `exitwise.policies.runtime` needs numpy and httpx only.",
        "",
        "| module | summary |",
        "|---|---|",
    ]
    lines += [f"| [`{m.name}`]({_relative(PLACEHOLDER, m.page)}) | {_cell(m.summary)} |" for m in modules]
    lines.append("")
    return "\n".join(lines)


def nav_section(modules: list[ModuleDoc]) -> list[Any]:
    """The navigation of the reference: the overview, then nested sections per package."""
    def children_of(parent: str) -> list[Any]:
        entries: list[Any] = []
        for m in modules:
            if m.name.rpartition(".")[0] != parent:
                continue
            if m.is_package:
                entries.append({m.name if parent == NAMESPACE else m.parts[-1]: [m.page, *children_of(m.name)]})
            else:
                entries.append({m.parts[-1]: m.page})
        return entries

    return [PLACEHOLDER, *children_of(NAMESPACE)]


def _relative(from_page: str, to_page: str) -> str:
    return posixpath.relpath(to_page, posixpath.dirname(from_page))


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _replace_placeholder(nav: Any, section: list[Any]) -> bool:
    """Swap the ``reference/index.md`` entry of ``nav`` (nested anywhere) for ``section``."""
    if isinstance(nav, list):
        for i, entry in enumerate(nav):
            if entry == PLACEHOLDER:
                nav[i] = {"API reference": section}
                return True
            if _replace_placeholder(entry, section):
                return True
    elif isinstance(nav, dict):
        for key, value in nav.items():
            if value == PLACEHOLDER:
                nav[key] = section
                return True
            if _replace_placeholder(value, section):
                return True
    return False


class _State:
    """What one build computed in ``on_config`` and uses later (hooks are plain modules)."""

    modules: ClassVar[list[ModuleDoc]] = []
    search_root: ClassVar[tempfile.TemporaryDirectory[str] | None] = None


def _link_tree(root: Path) -> Path:
    """A temporary ``<tmp>/exitwise/<package>`` tree of symbolic links for griffe."""
    _cleanup()
    _State.search_root = tempfile.TemporaryDirectory(prefix="exitwise-docs-")
    namespace = Path(_State.search_root.name) / NAMESPACE
    namespace.mkdir()
    # A regular package, not a namespace one: a namespace portion loses to any module named
    # `exitwise` on a later search path, such as the console script next to the mkdocs script.
    (namespace / "__init__.py").write_text('"""The exitwise namespace, as the documentation build lays it out."""\n')
    for package, folder in package_dirs(root).items():
        (namespace / package.split(".", 1)[1]).symlink_to(folder, target_is_directory=True)
    return Path(_State.search_root.name)


def _cleanup() -> None:
    if _State.search_root is not None:
        _State.search_root.cleanup()
        _State.search_root = None


@event_priority(100)  # before mkdocstrings' own on_config, which already creates the Python handler
def on_config(config: MkDocsConfig) -> MkDocsConfig:
    _State.modules = discover_modules()
    search_root = _link_tree(ROOT)
    handlers = config.plugins["mkdocstrings"].config["handlers"]
    handlers.setdefault("python", {})["paths"] = [str(search_root)]
    if config.nav is None or not _replace_placeholder(config.nav, nav_section(_State.modules)):
        raise ValueError(f"mkdocs.yml: the nav must list {PLACEHOLDER!r} where the API reference goes")
    log.debug("API reference: %d modules", len(_State.modules))
    return config


def on_files(files: Files, config: MkDocsConfig) -> Files:
    files.append(File.generated(config, PLACEHOLDER, content=overview_markdown(_State.modules)))
    for module in _State.modules:
        files.append(File.generated(config, module.page, content=page_markdown(module, _State.modules)))
    return files


def on_shutdown() -> None:
    _cleanup()
