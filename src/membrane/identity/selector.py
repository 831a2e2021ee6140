"""Label selectors with Kubernetes semantics, over Cilium's sourced labels.

A selector key may carry a source prefix (`k8s:app`, `reserved:host`, `any:app`); without
one it matches labels of every source.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from membrane.identity.labels import SOURCE_ANY, SOURCES, Label

IN, NOT_IN, EXISTS, DOES_NOT_EXIST = "In", "NotIn", "Exists", "DoesNotExist"
OPERATORS = (IN, NOT_IN, EXISTS, DOES_NOT_EXIST)


class Requirement(NamedTuple):
    key: str
    operator: str
    values: tuple[str, ...] = ()


def split_key(key: str) -> tuple[str, str]:
    """`k8s:app` -> ("k8s", "app"); `app` -> ("any", "app")."""
    source, sep, rest = key.partition(":")
    if sep and source in SOURCES:
        return source, rest
    return SOURCE_ANY, key


@dataclass(frozen=True)
class LabelSelector:
    """matchLabels and matchExpressions, all of which must hold (an empty selector
    matches every label set)."""

    match_labels: Mapping[str, str] = field(default_factory=dict)
    match_expressions: Sequence[Requirement] = ()

    def __post_init__(self) -> None:
        # Callers pass plain dicts, lists and list values; keep immutable copies.
        object.__setattr__(self, "match_labels", dict(self.match_labels))
        exprs = tuple(Requirement(k, op, tuple(vals)) for k, op, vals in self.match_expressions)
        object.__setattr__(self, "match_expressions", exprs)

    def __hash__(self) -> int:
        return hash((tuple(sorted(self.match_labels.items())), self.match_expressions))

    def requirements(self) -> list[Requirement]:
        """matchLabels as `In` requirements, then matchExpressions."""
        pairs = sorted(self.match_labels.items())
        return [Requirement(k, IN, (v,)) for k, v in pairs] + list(self.match_expressions)

    def with_requirements(self, *extra: Requirement) -> LabelSelector:
        return LabelSelector(self.match_labels, (*self.match_expressions, *extra))

    def mentions(self, source: str, key: str) -> bool:
        """Whether any requirement is about `key` of `source` (written with or without a
        source prefix)."""
        for req in self.requirements():
            req_source, req_key = split_key(req.key)
            if req_key == key and req_source in (source, SOURCE_ANY):
                return True
        return False

    def mentions_source(self, source: str) -> bool:
        return any(split_key(req.key)[0] == source for req in self.requirements())

    def matches(self, labels: Iterable[Label]) -> bool:
        labels = tuple(labels)
        return all(_holds(req, labels) for req in self.requirements())

    def __str__(self) -> str:
        parts = [f"{k}={v}" for k, v in sorted(self.match_labels.items())]
        for key, op, values in self.match_expressions:
            parts.append(f"{key} {op} ({','.join(values)})" if values else f"{op} {key}")
        return "{" + ", ".join(parts) + "}"


def _holds(req: Requirement, labels: tuple[Label, ...]) -> bool:
    source, key = split_key(req.key)
    values = [
        label.value for label in labels if label.key == key and source in (SOURCE_ANY, label.source)
    ]
    if req.operator == IN:
        return any(v in req.values for v in values)
    if req.operator == NOT_IN:  # as in Kubernetes: true when the key is absent
        return not any(v in req.values for v in values)
    if req.operator == EXISTS:
        return bool(values)
    if req.operator == DOES_NOT_EXIST:
        return not values
    raise ValueError(f"unknown selector operator {req.operator!r}")
