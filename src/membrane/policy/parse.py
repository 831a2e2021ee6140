"""Multi-document YAML -> validated Policy objects, or one UserError naming the field.

Errors name the document (counted from 1 in the stream) and the field path as the user
wrote it, e.g. `document 2: spec.ingress[0].from[1].ipBlock.cidr`. Fields accepted but not
enforced (model.py: IGNORED) become warnings of the same form, one line each, in
`Policy.warnings`; in a deny rule they are errors.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from membrane.errors import UserError
from membrane.policy import validate
from membrane.policy.model import KIND_CCNP, KIND_CNP, KIND_K8S, CiliumRule, K8sPolicySpec, Policy

API_VERSIONS = {
    KIND_K8S: "networking.k8s.io/v1",
    KIND_CNP: "cilium.io/v2",
    KIND_CCNP: "cilium.io/v2",
}
M = TypeVar("M", bound=BaseModel)

_TOP_LEVEL = {"apiVersion", "kind", "metadata", "spec", "status"}
_CILIUM_TOP_LEVEL = _TOP_LEVEL | {"specs"}

# libyaml's loader when PyYAML has it: the same documents, several times faster.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

_TYPE_PROBLEMS = {
    "string_type": "must be a string",
    "int_type": "must be an integer",
    "bool_type": "must be true or false",
    "list_type": "must be a list",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
}


class _Metadata(BaseModel):
    """metadata: name and namespace are checked; labels, annotations and the rest are
    accepted and ignored, as kubectl output carries them."""

    model_config = ConfigDict(extra="ignore", strict=True)
    name: str
    namespace: str | None = None

    @field_validator("name")
    @classmethod
    def _name_syntax(cls, name: str) -> str:
        return validate.check_name(name)

    @field_validator("namespace")
    @classmethod
    def _namespace_syntax(cls, namespace: str | None) -> str | None:
        return None if namespace is None else validate.check_namespace(namespace)


def parse_documents(text: str) -> list[Policy]:
    """Every policy in a YAML stream; empty documents are skipped. Raises UserError for the
    first problem found, before anything is returned."""
    return [policy for policy, _ in parse_with_documents(text)]


def parse_with_documents(text: str) -> list[tuple[Policy, dict[str, Any]]]:
    """`parse_documents`, each policy with the document it came from (the agent keeps what
    the user wrote), from one YAML load: at 10,000 rules a second load costs seconds."""
    policies: list[tuple[Policy, dict[str, Any]]] = []
    seen: dict[tuple[str, str | None, str], int] = {}
    for number, document in _documents(text):
        if document is None:
            continue
        where = f"document {number}"
        policy = parse_document(document, where)
        if policy.key in seen:
            raise UserError(
                f"{where}: metadata.name",
                f"{policy.describe()} is defined twice (also in document {seen[policy.key]})",
            )
        seen[policy.key] = number
        policies.append((policy, document))
    return policies


def _documents(text: str) -> Iterator[tuple[int, Any]]:
    loader = yaml.load_all(text, Loader=_LOADER)
    number = 0
    while True:
        number += 1
        try:
            document = next(loader)
        except StopIteration:
            return
        except yaml.YAMLError as err:
            raise UserError(f"document {number}", _yaml_problem(err)) from None
        yield number, document


def _yaml_problem(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    if mark is None:
        return f"invalid YAML: {problem}"
    return f"invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {problem}"


def parse_document(document: Any, where: str) -> Policy:
    """One decoded YAML document -> Policy; `where` prefixes every error's field."""
    if not isinstance(document, dict):
        raise UserError(where, "must be a mapping with apiVersion, kind, metadata and spec")
    kind = _kind(document, where)
    allowed = _TOP_LEVEL if kind == KIND_K8S else _CILIUM_TOP_LEVEL
    for key in document:
        if key not in allowed:
            raise UserError(f"{where}: {key}", "unknown field")
    metadata = _validate(_Metadata, document.get("metadata"), f"{where}: metadata")
    namespace = metadata.namespace
    if kind == KIND_CCNP:
        if namespace is not None:
            raise UserError(f"{where}: metadata.namespace", "a clusterwide policy has no namespace")
    elif namespace is None:
        namespace = "default"
    if kind == KIND_K8S:
        if "spec" not in document:
            raise UserError(f"{where}: spec", "is required")
        spec = _validate(K8sPolicySpec, document["spec"], f"{where}: spec")
        return Policy(kind, namespace, metadata.name, k8s_spec=spec)
    specs = _cilium_specs(document, where)
    warnings = [
        line
        for index, rule in specs
        for line in _ignored_fields(
            rule, f"{where}: " + ("spec" if index is None else f"specs[{index}]")
        )
    ]
    return Policy(kind, namespace, metadata.name, cilium_specs=specs, warnings=tuple(warnings))


def _kind(document: dict[str, Any], where: str) -> str:
    for key in ("apiVersion", "kind"):
        if key not in document:
            raise UserError(f"{where}: {key}", "is required")
        if not isinstance(document[key], str):
            raise UserError(f"{where}: {key}", "must be a string")
    kind, api_version = document["kind"], document["apiVersion"]
    if kind not in API_VERSIONS:
        raise UserError(
            f"{where}: kind", f"{kind!r} is not a policy kind (use {', '.join(API_VERSIONS)})"
        )
    if api_version != API_VERSIONS[kind]:
        raise UserError(
            f"{where}: apiVersion",
            f"{kind} needs apiVersion {API_VERSIONS[kind]}, not {api_version!r}",
        )
    return kind


def _cilium_specs(
    document: dict[str, Any], where: str
) -> tuple[tuple[int | None, CiliumRule], ...]:
    specs: list[tuple[int | None, CiliumRule]] = []
    if "spec" not in document and "specs" not in document:
        raise UserError(f"{where}: spec", "is required (or specs)")
    if "spec" in document:
        specs.append((None, _validate(CiliumRule, document["spec"], f"{where}: spec")))
    if "specs" in document:
        items = document["specs"]
        if not isinstance(items, list):
            raise UserError(f"{where}: specs", "must be a list")
        for i, item in enumerate(items):
            specs.append((i, _validate(CiliumRule, item, f"{where}: specs[{i}]")))
    return tuple(specs)


_SECTIONS = (
    ("ingress", "ingress", False),
    ("ingressDeny", "ingress_deny", True),
    ("egress", "egress", False),
    ("egressDeny", "egress_deny", True),
)


def _ignored_fields(rule: CiliumRule, path: str) -> list[str]:
    """A warning line for every ignored field the rule uses; raises UserError for one in a
    deny rule, where selecting no peer would allow what the rule denies."""
    lines = [f"{path}.{name}: ignored: {what}" for name, what in rule.ignored()]
    for section, attribute, deny in _SECTIONS:
        cidr_sets = "fromCIDRSet" if section.startswith("ingress") else "toCIDRSet"
        for i, peer_rule in enumerate(getattr(rule, attribute) or ()):
            at = f"{path}.{section}[{i}]"
            found = [(f"{at}.{name}", what) for name, what in peer_rule.ignored()]
            for j, cidr_set in enumerate(peer_rule.peer_cidr_sets):
                found += [(f"{at}.{cidr_sets}[{j}].{n}", what) for n, what in cidr_set.ignored()]
            for field, what in found:
                if deny:
                    raise UserError(
                        field,
                        f"{what}: a deny rule cannot ignore it (that would allow what it denies)",
                    )
                lines.append(
                    f"{field}: ignored: {what}, so it selects no peer (the rule allows less "
                    "than the policy says)"
                )
    return lines


def _validate(model: type[M], data: Any, path: str) -> M:
    if data is None:
        raise UserError(path, "is required")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        raise UserError(path + _format_loc(first["loc"]), _problem(first)) from None


def _format_loc(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text


def _problem(error: Any) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "missing":
        return "is required"
    if kind == "value_error":
        return str(error["ctx"]["error"])
    if kind == "string_type" and isinstance(error["input"], bool | int | float):
        return "must be a string (quote the value)"
    return _TYPE_PROBLEMS.get(kind, error["msg"])
