"""MkDocs hook: the REST API reference, generated at build time from the app's OpenAPI document.

The document comes from the application factory itself, ``exitwise.api.app.create_app``, on an
in-memory SQLite URL that is never connected to (no server, no database, no files): the
routes, models and problem answers the page shows are exactly those the service serves at
``/openapi.json``. The page is plain Markdown (no JavaScript, no CDN), and the raw document
is shipped next to it as ``rest-api/openapi.json``.
"""

from __future__ import annotations

import json
import re
from typing import Any

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files

PAGE = "rest-api/index.md"
DOCUMENT = "rest-api/openapi.json"
METHODS = ("get", "put", "post", "delete", "patch", "head", "options")


def openapi_document() -> dict[str, Any]:
    """The service's OpenAPI document, built by the app factory without touching a database."""
    from exitwise.api.app import create_app  # the server extra: imported when the docs are built
    from exitwise.api.settings import ApiSettings

    app = create_app(ApiSettings(database_url="sqlite://", store_hooks=False))
    try:
        return app.openapi()
    finally:
        app.state.engine.dispose()


def render(doc: dict[str, Any], document_link: str = "openapi.json") -> str:
    """The whole reference page for an OpenAPI 3 document."""
    info = doc.get("info", {})
    out = [
        "# REST API",
        "",
        f"Generated from the service's own OpenAPI {doc.get('openapi', '')} document "
        f"(API version {info.get('version', '?')}) on every build of this site: "
        f"[download openapi.json]({document_link}). A running server serves the same document at "
        "`/openapi.json`, with Swagger UI at `/docs`.",
        "",
        info.get("description", "").strip(),
        "",
    ]
    out += _security(doc)
    operations = list(_operations(doc))
    out += ["## Endpoints", "", "| method | path | summary |", "|---|---|---|"]
    out += [f"| `{method.upper()}` | [`{path}`](#{_op_anchor(op, method, path)}) | {_cell(op.get('summary', ''))} |"
            for method, path, op in operations]
    out.append("")
    tags = [t["name"] for t in doc.get("tags", [])]
    tags += sorted({t for _, _, op in operations for t in op.get("tags", [])} - set(tags))
    descriptions = {t["name"]: t.get("description", "") for t in doc.get("tags", [])}
    for tag in [*tags, None]:
        ops = [(m, p, op) for m, p, op in operations if (op.get("tags") or [None])[0] == tag]
        if not ops:
            continue
        out += [f"## {tag.capitalize() if tag else 'Other'}", ""]
        if tag and descriptions.get(tag):
            out += [descriptions[tag] + ".", ""]
        for method, path, op in ops:
            out += _operation(method, path, op)
    out += _schemas(doc.get("components", {}).get("schemas", {}))
    return "\n".join(out).rstrip() + "\n"


def _operations(doc: dict[str, Any]) -> Any:
    for path, item in doc.get("paths", {}).items():
        for method in METHODS:
            if method in item:
                yield method, path, item[method]


def _security(doc: dict[str, Any]) -> list[str]:
    schemes = doc.get("components", {}).get("securitySchemes", {})
    if not schemes:
        return []
    out = ["## Authentication", "", "| scheme | type | details |", "|---|---|---|"]
    for name, scheme in schemes.items():
        details = " ".join(str(scheme.get(k, "")) for k in ("scheme", "bearerFormat", "in", "name")).strip()
        out.append(f"| `{name}` | {scheme.get('type', '')} | {_cell(details or scheme.get('description', ''))} |")
    return [*out, ""]


def _operation(method: str, path: str, op: dict[str, Any]) -> list[str]:
    out = [f"### `{method.upper()} {path}` {{#{_op_anchor(op, method, path)}}}", ""]
    if op.get("summary"):
        out += [f"**{op['summary']}**", ""]
    if op.get("description"):
        out += [op["description"].strip(), ""]
    if op.get("security"):
        names = sorted({name for requirement in op["security"] for name in requirement})
        out += ["Authentication: " + ", ".join(f"`{n}`" for n in names) + ".", ""]
    else:
        out += ["No authentication.", ""]
    params = op.get("parameters", [])
    if params:
        out += ["| parameter | in | type | required | description |", "|---|---|---|---|---|"]
        for p in params:
            schema = p.get("schema", {})
            desc = p.get("description") or schema.get("description", "")
            out.append(f"| `{p['name']}` | {p.get('in', '')} | {type_of(schema)} | "
                       f"{'yes' if p.get('required') else 'no'} | {_cell(_join(desc, constraints(schema)))} |")
        out.append("")
    body = op.get("requestBody")
    if body:
        kinds = ", ".join(f"`{media}`: {type_of(c.get('schema', {}))}" for media, c in body.get("content", {}).items())
        out += [f"Request body{' (required)' if body.get('required') else ''}: {kinds}.", ""]
    out += ["| status | description | content | headers |", "|---|---|---|---|"]
    for status, response in op.get("responses", {}).items():
        content = ", ".join(f"`{media}`: {type_of(c.get('schema', {}))}" if c.get("schema") else f"`{media}`"
                            for media, c in response.get("content", {}).items())
        headers = ", ".join(f"`{h}`" for h in response.get("headers", {}))
        out.append(f"| {status} | {_cell(response.get('description', ''))} | {content} | {headers} |")
    return [*out, ""]


def _schemas(schemas: dict[str, Any]) -> list[str]:
    if not schemas:
        return []
    out = ["## Schemas", ""]
    for name in sorted(schemas, key=str.lower):
        schema = schemas[name]
        out += [f"### {name} {{#{schema_anchor(name)}}}", ""]
        if schema.get("description"):
            out += [schema["description"].strip(), ""]
        props = schema.get("properties", {})
        required = set(schema.get("required", []))
        if props:
            out += ["| field | type | required | description |", "|---|---|---|---|"]
            for field, sub in props.items():
                out.append(f"| `{field}` | {type_of(sub)} | {'yes' if field in required else 'no'} | "
                           f"{_cell(_join(sub.get('description', ''), constraints(sub)))} |")
            out.append("")
            extra = schema.get("additionalProperties")
            if extra is False:
                out += ["No other fields are accepted.", ""]
            elif isinstance(extra, dict) and extra:
                out += [f"Other fields: {type_of(extra)}.", ""]
        else:
            out += [f"Type: {type_of(schema)}.", ""]
    return out


def type_of(schema: dict[str, Any]) -> str:
    """A schema's type in words, with links to the named schemas."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return f"[{name}](#{schema_anchor(name)})"
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return " or ".join(dict.fromkeys(type_of(s) for s in schema[key]))
    if "allOf" in schema:
        return " and ".join(type_of(s) for s in schema["allOf"])
    if "enum" in schema:
        return " \\| ".join(f"`{json.dumps(v)}`" for v in schema["enum"])
    if "const" in schema:
        return f"`{json.dumps(schema['const'])}`"
    kind = schema.get("type")
    if isinstance(kind, list):
        return " or ".join(kind)
    if kind == "array":
        return f"array of {type_of(schema.get('items', {}))}"
    if kind == "object":
        extra = schema.get("additionalProperties")
        return f"object of {type_of(extra)}" if isinstance(extra, dict) and extra else "object"
    if kind:
        return f"{kind} ({schema['format']})" if "format" in schema else kind
    return "any"


def constraints(schema: dict[str, Any]) -> str:
    """Defaults, bounds and patterns in a few words."""
    words = []
    if "default" in schema:
        words.append(f"default `{json.dumps(schema['default'])}`")
    for key, text in (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<"),
                      ("minLength", "length >="), ("maxLength", "length <="), ("minItems", "items >="),
                      ("maxItems", "items <=")):
        if key in schema:
            words.append(f"{text} {schema[key]}")
    if "pattern" in schema:
        words.append(f"pattern `{schema['pattern']}`")
    return "; ".join(words)


def schema_anchor(name: str) -> str:
    return "schema-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _op_anchor(op: dict[str, Any], method: str, path: str) -> str:
    base = op.get("operationId") or f"{method}-{path}"
    return "op-" + re.sub(r"[^a-z0-9]+", "-", base.lower()).strip("-")


def _join(*parts: str) -> str:
    return " — ".join(p.strip() for p in parts if p and p.strip())


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def on_files(files: Files, config: MkDocsConfig) -> Files:
    doc = openapi_document()
    files.append(File.generated(config, DOCUMENT, content=json.dumps(doc, indent=2, ensure_ascii=False) + "\n"))
    files.append(File.generated(config, PAGE, content=render(doc)))
    return files
