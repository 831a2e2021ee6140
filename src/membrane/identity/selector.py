"""Label selectors with Kubernetes semantics, over Cilium's sourced labels.

A selector key may carry a source prefix (`k8s:app`, `reserved:host`, `any:app`); without
one it matches labels of every source.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
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

    _requirements: tuple[Requirement, ...] = field(init=False, repr=False, compare=False)
    _checks: tuple[_Check, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Callers pass plain dicts, lists and list values; keep immutable copies, and the
        # requirements ready for matching (the compiler matches them against every identity).
        object.__setattr__(self, "match_labels", dict(self.match_labels))
        exprs = tuple(Requirement(k, op, tuple(vals)) for k, op, vals in self.match_expressions)
        object.__setattr__(self, "match_expressions", exprs)
        pairs = sorted(self.match_labels.items())
        reqs = tuple(Requirement(k, IN, (v,)) for k, v in pairs) + exprs
        object.__setattr__(self, "_requirements", reqs)
        checks = tuple(_Check(*split_key(r.key), r.operator, frozenset(r.values)) for r in reqs)
        object.__setattr__(self, "_checks", checks)

    def __hash__(self) -> int:
        return hash(self._requirements)

    def requirements(self) -> tuple[Requirement, ...]:
        """matchLabels as `In` requirements, then matchExpressions."""
        return self._requirements

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
        by_key = _by_key(labels if isinstance(labels, frozenset) else frozenset(labels))
        return all(check.holds(by_key.get(check.key, ())) for check in self._checks)


class _Check(NamedTuple):
    """A requirement with its key split, ready to test."""

    source: str
    key: str
    operator: str
    values: frozenset[str]

    def holds(self, same_key: tuple[Label, ...]) -> bool:
        """`same_key`: the labels with this key, of any source."""
        present = [label.value for label in same_key if self.source in (SOURCE_ANY, label.source)]
        if self.operator == IN:
            return any(v in self.values for v in present)
        if self.operator == NOT_IN:  # as in Kubernetes: true when the key is absent
            return not any(v in self.values for v in present)
        if self.operator == EXISTS:
            return bool(present)
        if self.operator == DOES_NOT_EXIST:
            return not present
        raise ValueError(f"unknown selector operator {self.operator!r}")


@lru_cache(maxsize=65536)
def _by_key(labels: frozenset[Label]) -> dict[str, tuple[Label, ...]]:
    """Labels by key; cached, since the same identities are matched by every selector."""
    index: dict[str, list[Label]] = {}
    for label in labels:
        index.setdefault(label.key, []).append(label)
    return {key: tuple(group) for key, group in index.items()}


_NONE: frozenset[int] = frozenset()


class LabelIndex:
    """Numbered label sets (identities, endpoints), indexed so that a selector finds its
    matches without testing every set: the compiler selects among thousands of identities
    for thousands of rules. Candidates come from the selector's In and Exists requirements
    (any source), then each candidate is matched in full."""

    def __init__(self, label_sets: Mapping[int, frozenset[Label]]) -> None:
        self._sets: dict[int, frozenset[Label]] = {}
        self._by_pair: dict[tuple[str, str], set[int]] = {}
        self._by_key: dict[str, set[int]] = {}
        for number, labels in label_sets.items():
            self.add(number, labels)

    def add(self, number: int, labels: frozenset[Label]) -> None:
        self.remove(number)
        self._sets[number] = labels
        for label in labels:
            self._by_pair.setdefault((label.key, label.value), set()).add(number)
            self._by_key.setdefault(label.key, set()).add(number)

    def remove(self, number: int) -> None:
        for label in self._sets.pop(number, ()):
            self._by_pair[(label.key, label.value)].discard(number)
            self._by_key[label.key].discard(number)

    def select(self, selector: LabelSelector) -> set[int]:
        postings: list[set[int]] = []
        for check in selector._checks:
            if check.operator == IN:
                if len(check.values) == 1:  # no copy of what may be a large set
                    found = self._by_pair.get((check.key, next(iter(check.values))), _NONE)
                else:
                    found = set().union(
                        *(self._by_pair.get((check.key, v), ()) for v in check.values)
                    )
            elif check.operator == EXISTS:
                found = self._by_key.get(check.key, _NONE)
            else:
                continue
            if not found:
                return set()
            postings.append(found)
        if not postings:
            return {n for n, labels in self._sets.items() if selector.matches(labels)}
        # From the smallest list: `a & b` walks the smaller set, so a rule's one CIDR label
        # is not intersected with the thousands of identities sharing `reserved:world`.
        postings.sort(key=len)
        candidates = postings[0]
        for other in postings[1:]:
            candidates = candidates & other
            if not candidates:
                return set()
        return {n for n in candidates if selector.matches(self._sets[n])}


class SelectorIndex:
    """The reverse of LabelIndex: numbered groups of selectors (a rule's peers), indexed so
    that a label set finds the groups that may match it without testing every group. Each
    selector is filed under one of its In or Exists requirements (a label set lacking that
    label cannot match it); selectors without one are candidates for every label set."""

    def __init__(self) -> None:
        self._by_pair: dict[tuple[str, str], set[int]] = {}
        self._by_key: dict[str, set[int]] = {}
        self._everywhere: set[int] = set()
        self._filed: dict[int, list[set[int]]] = {}

    def add(self, number: int, selectors: Iterable[LabelSelector]) -> None:
        self.remove(number)
        filed = []
        for selector in selectors:
            narrowest = next((c for c in selector._checks if c.operator in (IN, EXISTS)), None)
            if narrowest is None:
                places = [self._everywhere]
            elif narrowest.operator == EXISTS:
                places = [self._by_key.setdefault(narrowest.key, set())]
            else:
                places = [self._by_pair.setdefault((narrowest.key, v), set())
                          for v in narrowest.values]  # fmt: skip
            for place in places:
                place.add(number)
            filed += places
        self._filed[number] = filed

    def remove(self, number: int) -> None:
        for place in self._filed.pop(number, ()):
            place.discard(number)

    def candidates(self, labels: Iterable[Label]) -> set[int]:
        """Every group with a selector that may match `labels` (a superset)."""
        found = set(self._everywhere)
        for label in labels:
            found |= self._by_pair.get((label.key, label.value), set())
            found |= self._by_key.get(label.key, set())
        return found
