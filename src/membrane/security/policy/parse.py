"""YAML text -> TracingPolicy models; the first problem is one UserError naming its field
path (`document 1: spec.tracepoints[0].selectors[0].matchArgs[0].operator`)."""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import ValidationError

from membrane.errors import UserError
from membrane.security.policy.model import API_VERSION, KINDS, TracingPolicy

_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def parse_policies(text: str) -> list[tuple[TracingPolicy, dict[str, Any]]]:
    """Every policy in a YAML stream with the document it came from."""
    out: list[tuple[TracingPolicy, dict[str, Any]]] = []
    seen: dict[str, int] = {}
    try:
        documents = list(yaml.load_all(text, Loader=_LOADER))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError("file", f"invalid YAML{where}: {getattr(err, 'problem', err)}") from None
    for number, document in enumerate(documents, 1):
        if document is None:
            continue
        policy = parse_document(document, f"document {number}")
        if policy.key in seen:
            raise UserError(
                f"document {number}: metadata.name",
                f"{policy.key} is defined twice (also in document {seen[policy.key]})",
            )
        seen[policy.key] = number
        out.append((policy, document))
    if not out:
        raise UserError("file", "holds no TracingPolicy documents")
    return out


def parse_document(document: Any, where: str) -> TracingPolicy:
    if not isinstance(document, dict):
        raise UserError(where, "must be a mapping with apiVersion, kind, metadata and spec")
    if document.get("kind") not in KINDS:
        raise UserError(
            f"{where}: kind", f"{document.get('kind')!r} is not one of {', '.join(KINDS)}"
        )
    if document.get("apiVersion") != API_VERSION:
        raise UserError(f"{where}: apiVersion", f"must be {API_VERSION}")
    try:
        return TracingPolicy.model_validate(document)
    except ValidationError as err:
        errors = err.errors()
        # A misspelt field also leaves the right one missing: name the misspelling.
        first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
        path = field_path(first["loc"])
        raise UserError(f"{where}: {path}" if path else where, problem(first)) from None


def field_path(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif not part.startswith(("function-", "literal[")):  # pydantic's own steps
            text += f".{part}" if text else str(part)
    return text


def problem(error: Any) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "missing":
        return "is required"
    if kind == "value_error":
        return str(error["ctx"]["error"])
    if kind == "literal_error":
        return f"{error['input']!r} is not one of {error['ctx']['expected']}"
    return str(error["msg"])
