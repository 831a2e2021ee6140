"""What a policy in force means on this node beyond what it says: the parser's warnings
(fields accepted but not enforced) and the entities it names that select nothing here,
with the reason. One line each, naming the document and the field, as errors do; shown by
`policy import`, `policy get` and `policy trace`."""

from __future__ import annotations

from collections.abc import Iterator

from membrane.agent.config import AgentConfig
from membrane.policy import Policy

# Entities that stand for components a single Membrane node does not have.
_ABSENT = {
    "remote-node": "this node has no other nodes",
    "ingress": "no Cilium ingress or gateway proxy runs on this node",
    "health": "no health endpoint runs on this node",
    "init": "endpoints get their identity at once: none is ever waiting in init",
    "unmanaged": "every endpoint on this node is managed by the agent",
}
_SECTIONS = (("ingress", "from"), ("ingressDeny", "from"), ("egress", "to"), ("egressDeny", "to"))


def policy_notes(policy: Policy, config: AgentConfig) -> list[str]:
    """The parser's warnings and a line per entity that selects nothing on this node."""
    notes = list(policy.warnings)
    for path, entity in _entities(policy):
        reason = _why_empty(entity, config)
        if reason:
            notes.append(f"{policy.describe()}: {path}: entity {entity} matches nothing ({reason})")
    return notes


def _why_empty(entity: str, config: AgentConfig) -> str | None:
    if entity in _ABSENT:
        return _ABSENT[entity]
    if entity == "kube-apiserver" and not config.kube_apiserver_ips:
        return "no --kube-apiserver-ip given"
    if entity == "world-ipv6" and not config.ipv6:
        return "this node runs IPv4 only (--ipv6=false)"
    return None


def _entities(policy: Policy) -> Iterator[tuple[str, str]]:
    """(field path, entity) of every entity the policy names."""
    for index, spec in policy.cilium_specs:
        root = "spec" if index is None else f"specs[{index}]"
        for section, prefix in _SECTIONS:
            direction, deny = section.removesuffix("Deny"), section.endswith("Deny")
            rules = spec.sections(direction)[1 if deny else 0]
            for i, rule in enumerate(rules):
                for j, entity in enumerate(rule.peer_entities):
                    yield f"{root}.{section}[{i}].{prefix}Entities[{j}]", entity


class PolicyNotes:
    """Notes of the policies in force, each policy's computed once (a changed policy is a
    new object), so a change costs the policies it changes."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self._known: dict[int, tuple[Policy, tuple[str, ...]]] = {}

    def of(
        self, policies: tuple[Policy, ...]
    ) -> dict[tuple[str, str | None, str], tuple[str, ...]]:
        known: dict[int, tuple[Policy, tuple[str, ...]]] = {}
        for policy in policies:
            found = self._known.get(id(policy))
            if found is None or found[0] is not policy:
                found = (policy, tuple(policy_notes(policy, self.config)))
            known[id(policy)] = found
        self._known = known
        return {policy.key: notes for policy, notes in known.values() if notes}
