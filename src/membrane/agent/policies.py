"""The policies in force: as the user wrote them (kept for restarts and `policy get`), as
parsed (what the compiler reads).

A change is staged as a new PolicySet and only becomes `current` once the datapath enforces
it; the agent puts the old set back when it could not be enforced.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from membrane.agent.state import StoredPolicy
from membrane.errors import NotFound, UserError
from membrane.policy import Policy, parse_documents, parse_with_documents

PolicyKey = tuple[str, str | None, str]  # kind, namespace, name

_Dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


@dataclass(frozen=True)
class PolicySet:
    """One version of the policies in force, both forms in policy order. A new version is
    a new object, so `is` tells whether the policies changed."""

    stored: tuple[StoredPolicy, ...]
    parsed: tuple[Policy, ...]

    @property
    def by_key(self) -> dict[PolicyKey, Policy]:
        return {p.key: p for p in self.parsed}


@dataclass(frozen=True)
class PolicyChange:
    """A staged change: the version it makes and the policies it names (for the log and
    the response)."""

    policies: PolicySet
    changed: list[dict[str, Any]]


class PolicyStore:
    def __init__(self, stored: list[StoredPolicy]) -> None:
        self.current = _policy_set({p.key: p for p in stored}, _parse_stored(stored))

    def stage_import(self, text: str) -> PolicyChange:
        """The policies after importing `text` (YAML documents); raises UserError before
        anything changes."""
        parsed = parse_with_documents(text)
        if not parsed:
            raise UserError("file", "holds no policy documents")
        stored = {p.key: p for p in self.current.stored}
        policies = self.current.by_key
        changed = []
        for policy, document in parsed:
            written = StoredPolicy(policy.kind, policy.namespace, policy.name, document)
            stored[policy.key] = written
            policies[policy.key] = policy
            changed.append(written.ref())
        return PolicyChange(_policy_set(stored, policies), changed)

    def stage_delete(
        self, namespace: str | None, name: str | None, kind: str | None, everything: bool
    ) -> PolicyChange:
        current = self.current.stored
        if everything:
            gone = list(current)
        else:
            gone = [
                p
                for p in current
                if p.name == name and p.namespace == namespace and kind in (None, p.kind)
            ]
            if not gone:
                where = f"{namespace}/{name}" if namespace else str(name)
                raise NotFound("policy", f"{where} does not exist")
        gone_keys = {p.key for p in gone}
        stored = {p.key: p for p in current if p.key not in gone_keys}
        policies = {k: v for k, v in self.current.by_key.items() if k not in gone_keys}
        return PolicyChange(_policy_set(stored, policies), [p.ref() for p in gone])


def policy_order(key: PolicyKey) -> tuple[str, str, str]:
    kind, namespace, name = key
    return (kind, namespace or "", name)


def _policy_set(
    stored: dict[PolicyKey, StoredPolicy], parsed: dict[PolicyKey, Policy]
) -> PolicySet:
    order = sorted(stored, key=policy_order)
    return PolicySet(tuple(stored[k] for k in order), tuple(parsed[k] for k in order))


def _parse_stored(stored: list[StoredPolicy]) -> dict[PolicyKey, Policy]:
    if not stored:
        return {}
    parsed = parse_documents(yaml.dump_all([p.document for p in stored], Dumper=_Dumper))
    return {p.key: p for p in parsed}
