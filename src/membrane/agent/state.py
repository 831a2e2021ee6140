"""What the agent must remember across restarts, kept as one JSON file in --state-dir.

The kernel holds the enforcing state (pinned maps and links); this file holds what the
kernel cannot tell us back: names, labels, policies as the user wrote them, and the
numbers we handed out (endpoint ids, identities, rule ids), so that a restarted agent
adopts everything without renumbering.

The files change at different rates, so each is written only when it changes: one file per
policy (`policy-<n>.json`, the document as written, written once), the rule table as a
journal (`rules.jsonl`: rule ids only grow, so new rules are appended), the CIDR identities
(`cidr-identities.json`: tens of thousands with large CIDR policies, rewritten only when they
change), and `state.json` (endpoints, namespaces, endpoint identities, counters, and the
names of the policy files in force), replaced on every change (write, fsync, rename).
Replacing state.json is the moment a change becomes durable: a crash before it leaves the
previous state.json and the files it names.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STATE_VERSION = 1


@dataclass(frozen=True)
class PortSpec:
    name: str
    port: int
    protocol: str  # TCP, UDP or SCTP

    def __str__(self) -> str:
        return f"{self.name}={self.port}/{self.protocol}"


@dataclass(frozen=True)
class EndpointRecord:
    """One endpoint as the agent records it. Immutable: a change replaces the record, so a
    published snapshot can hand it to readers on other threads as it is."""

    id: int
    namespace: str
    name: str
    netns: str
    host_ifname: str
    ipv4: str
    labels: dict[str, str]
    ports: tuple[PortSpec, ...] = ()
    identity: int = 0
    created: float = 0.0
    attach_mode: str = ""  # "tcx" or "clsact": how its programs are attached
    ipv6: str | None = None  # dual-stack nodes; None on IPv4-only ones (and for endpoints
    # an older agent made)
    container_id: str | None = None  # made through CNI: `netns` is then the runtime's own
    container_name: str | None = None  # the runtime's name for it (runtime-security events)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def to_json(self) -> dict[str, Any]:
        # Shallow: json.dumps reads it at once (asdict() deep-copies, 20 us a record).
        return {**vars(self), "ports": [vars(p) for p in self.ports]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EndpointRecord:
        data = dict(data)
        data["ports"] = tuple(PortSpec(**p) for p in data.get("ports", []))
        return cls(**data)


@dataclass
class StoredPolicy:
    kind: str
    namespace: str | None
    name: str
    document: dict[str, Any]  # as the user wrote it

    @property
    def key(self) -> tuple[str, str | None, str]:
        return (self.kind, self.namespace, self.name)

    def ref(self) -> dict[str, Any]:
        """How responses and logs name it."""
        return {"kind": self.kind, "namespace": self.namespace, "name": self.name}

    def to_json(self) -> dict[str, Any]:
        # Not asdict(): that deep-copies the document, 10,000 rules of it.
        return {"kind": self.kind, "namespace": self.namespace, "name": self.name,
                "document": self.document}  # fmt: skip


@dataclass
class AgentState:
    endpoints: dict[int, EndpointRecord] = field(default_factory=dict)
    namespaces: dict[str, dict[str, str]] = field(default_factory=dict)
    policies: list[StoredPolicy] = field(default_factory=list)
    identities: dict[str, Any] = field(default_factory=dict)  # IdentityAllocator.to_json()
    rules: dict[str, Any] = field(default_factory=dict)  # RuleTable.to_json()
    policy_revision: int = 0
    next_endpoint_id: int = 1

    def to_json(self) -> dict[str, Any]:
        return {
            **self.node_json(),
            "policies": [p.to_json() for p in self.policies],
            "rules": self.rules,
        }

    def node_json(self) -> dict[str, Any]:
        """Everything but the policies and rules (kept in files of their own)."""
        return {
            "version": STATE_VERSION,
            "endpoints": [ep.to_json() for ep in self.endpoints.values()],
            "namespaces": self.namespaces,
            "identities": self.identities,
            "policy_revision": self.policy_revision,
            "next_endpoint_id": self.next_endpoint_id,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AgentState:
        if data.get("version") != STATE_VERSION:
            raise ValueError(f"unknown state version {data.get('version')!r}")
        endpoints = [EndpointRecord.from_json(e) for e in data.get("endpoints", [])]
        return cls(
            endpoints={ep.id: ep for ep in endpoints},
            namespaces=data.get("namespaces", {}),
            policies=[StoredPolicy(**p) for p in data.get("policies", [])],
            identities=data.get("identities", {}),
            rules=data.get("rules", {}),
            policy_revision=data.get("policy_revision", 0),
            next_endpoint_id=data.get("next_endpoint_id", 1),
        )


class StateFile:
    def __init__(self, state_dir: str | Path) -> None:
        self.dir = Path(state_dir)
        self.path = self.dir / "state.json"
        self.rules_path = self.dir / "rules.jsonl"
        self.cidr_path = self.dir / "cidr-identities.json"
        self._cidr_saved: dict[str, int] | None = None  # what cidr_path holds
        self.rules_saved = 0  # how many rules (ids 1..n) the journal holds
        # id(StoredPolicy) -> (that policy, its file): a policy is never changed in place.
        self._policy_files: dict[int, tuple[StoredPolicy, str]] = {}
        self._next_file = 1

    def load(self) -> AgentState:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return AgentState()
        names = data.pop("policy_files", None)
        identities = data.get("identities", {})
        if "cidr" not in identities and self.cidr_path.exists():
            cidr = json.loads(self.cidr_path.read_text())
            identities["cidr"] = cidr
            self._cidr_saved = dict(cidr)
            # Written before state.json: after a crash in between it may hold numbers that
            # state.json's counter has not passed yet. Never hand those out twice.
            top = max(cidr.values(), default=None)
            if top is not None and identities.get("next_cidr", 0) <= top:
                identities["next_cidr"] = top + 1
        if names is not None:  # else an older state.json that held everything itself
            data["policies"] = [json.loads((self.dir / n).read_text()) for n in names]
            rules = self._read_rules()
            data["rules"] = {"rules": rules} if rules else {}
        state = AgentState.from_json(data)
        if names is not None:
            self._policy_files = {id(p): (p, n) for p, n in zip(state.policies, names, strict=True)}
            self._next_file = 1 + max((_file_number(n) for n in names), default=0)
            self.rules_saved = len(state.rules.get("rules", ()))
        return state

    def _read_rules(self) -> list[dict[str, Any]]:
        try:
            lines = self.rules_path.read_text().splitlines()
        except FileNotFoundError:
            return []
        rules = []
        for line in lines:
            try:
                rules.append(json.loads(line))
            except ValueError:
                break  # a line torn by a crash: nothing after it was acknowledged
        return rules

    def save(self, state: AgentState, new_rules: Sequence[dict[str, Any]] = ()) -> None:
        """Write what changed; `new_rules` are the rules numbered since the last save."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if new_rules:
            with open(self.rules_path, "a") as f:
                f.write("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in new_rules))
                f.flush()
                os.fsync(f.fileno())
            self.rules_saved += len(new_rules)
        files, wrote = [], False
        for policy in state.policies:
            known = self._policy_files.get(id(policy))
            if known is None or known[0] is not policy:
                name = f"policy-{self._next_file}.json"
                self._next_file += 1
                _write_atomically(self.dir / name, policy.to_json())
                known, wrote = (policy, name), True
            files.append(known)
        removed = len(files) != len(self._policy_files)
        self._policy_files = {id(p): (p, n) for p, n in files}
        node = state.node_json()
        identities = dict(node["identities"])
        cidr = identities.pop("cidr", None)
        if cidr is not None and cidr != self._cidr_saved:  # compared in C: 10,000 in ~0.2 ms
            _write_atomically(self.cidr_path, cidr)
            self._cidr_saved = dict(cidr)
        node["identities"] = identities
        _write_atomically(self.path, {**node, "policy_files": [n for _, n in files]})
        if wrote or removed:
            keep = {n for _, n in files}
            for path in self.dir.glob("policy-*.json"):
                if path.name not in keep:
                    path.unlink(missing_ok=True)

    def remove(self) -> None:
        """Forget everything (agent reset)."""
        for path in [self.path, self.rules_path, self.cidr_path, *self.dir.glob("policy-*.json")]:
            path.unlink(missing_ok=True)


def _file_number(name: str) -> int:
    return int(name.removeprefix("policy-").removesuffix(".json"))


def _write_atomically(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(data, separators=(",", ":")))  # dumps: the C encoder; dump is not
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
