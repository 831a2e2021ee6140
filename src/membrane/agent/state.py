"""What the agent must remember across restarts, kept as one JSON file in --state-dir.

The kernel holds the enforcing state (pinned maps and links); this file holds what the
kernel cannot tell us back: names, labels, policies as the user wrote them, and the
numbers we handed out (endpoint ids, identities, rule ids), so that a restarted agent
adopts everything without renumbering. It is replaced atomically (write, fsync, rename).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

STATE_VERSION = 1


@dataclass
class PortSpec:
    name: str
    port: int
    protocol: str  # TCP, UDP or SCTP

    def __str__(self) -> str:
        return f"{self.name}={self.port}/{self.protocol}"


@dataclass
class EndpointRecord:
    id: int
    namespace: str
    name: str
    netns: str
    host_ifname: str
    ipv4: str
    labels: dict[str, str]
    ports: list[PortSpec] = field(default_factory=list)
    identity: int = 0
    created: float = 0.0

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EndpointRecord:
        data = dict(data)
        data["ports"] = [PortSpec(**p) for p in data.get("ports", [])]
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
            "version": STATE_VERSION,
            "endpoints": [asdict(ep) for ep in self.endpoints.values()],
            "namespaces": self.namespaces,
            "policies": [asdict(p) for p in self.policies],
            "identities": self.identities,
            "rules": self.rules,
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

    def load(self) -> AgentState:
        try:
            raw = self.path.read_text()
        except FileNotFoundError:
            return AgentState()
        return AgentState.from_json(json.loads(raw))

    def save(self, state: AgentState) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(state.to_json(), f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
