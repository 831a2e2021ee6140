"""What the service maps must hold for a set of services: pure Python, no kernel.

Each Service port of each family balances over one or two backend *sets*: the cluster set
(every backend) and, when a traffic policy is Local, the local set (the backends that are
this node's endpoints). Frontends point at sets:

    ClusterIP          INTERNAL scope -> local set if internalTrafficPolicy=Local
    NodePort, externalIP  EXTERNAL scope -> local set if externalTrafficPolicy=Local,
                          INTERNAL scope -> cluster set (in-cluster clients, as Cilium)

Backends come from the Service's EndpointSlices (matched to a Service port by port name,
as kube-proxy does); a Service with a selector and no EndpointSlice takes the endpoints of
its namespace whose labels the selector matches, on the targetPort number, or on the
endpoint's port of that name (endpoints without one are left out).

Ids (sets, backends, rev-NAT) are handed out by `IdTable`s that persist with the services,
so an agent restart rewrites nothing.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from membrane.abi import SvcFrontendFlag, SvcScope, SvcSetFlag
from membrane.agent.state import EndpointRecord
from membrane.service.model import (
    PROTOCOLS,
    EndpointSliceRecord,
    ServicePort,
    ServiceRecord,
)

BackendKey = tuple[str, int, int]  # address, port, IP protocol number
SetKey = tuple[str, str, str, int, bool]  # namespace, service, port name, family, local
FrontendKey = tuple[str, int, int, int, int]  # address, port, protocol, family, scope
RevNatKey = tuple[str, int, int]  # address, port, family
WEIGHTED_SLOTS = 1024  # slots of a set whose backends' weights differ, at most


class IdTable:
    """Small numbers for keys, stable for a key's life; freed ids are reused lowest first."""

    def __init__(self, limit: int, ids: Mapping[str, int] | None = None) -> None:
        self.limit = limit  # ids are 1..limit-1
        self.ids: dict[str, int] = dict(ids or {})
        self._next = max(self.ids.values(), default=0) + 1
        self._free = sorted(set(range(1, self._next)) - set(self.ids.values()))

    def get(self, key: str) -> int | None:
        return self.ids.get(key)

    def assign(self, key: str) -> int:
        found = self.ids.get(key)
        if found is not None:
            return found
        if self._free:
            found = self._free.pop(0)
        else:
            found = self._next
            self._next += 1
        self.ids[key] = found
        return found

    def keep_only(self, keys: Iterable[str]) -> None:
        keep = set(keys)
        for key in [k for k in self.ids if k not in keep]:
            self._free.append(self.ids.pop(key))
        self._free.sort()

    def copy(self) -> IdTable:
        return IdTable(self.limit, self.ids)

    def to_json(self) -> dict[str, int]:
        return dict(self.ids)


def key_text(key: tuple[Any, ...]) -> str:
    return "|".join(str(part) for part in key)


@dataclass
class BackendPlan:
    key: BackendKey
    state: str  # active, terminating, maintenance
    weight: int
    local: bool


@dataclass
class SetPlan:
    key: SetKey
    flags: int
    affinity_timeout: int
    maglev_size: int
    backends: list[BackendPlan] = field(default_factory=list)  # every state, sorted

    @property
    def active(self) -> list[BackendPlan]:
        return [b for b in self.backends if b.state == "active"]

    @property
    def serving(self) -> list[BackendPlan]:
        """The backends new connections go to: the active ones or, while none is, the
        terminating ones (as Cilium: a Service whose pods are all shutting down keeps
        being served by them until they are gone, instead of refusing connections)."""
        return self.active or [b for b in self.backends if b.state == "terminating"]

    def slots(self) -> list[BackendPlan]:
        """The set's slots (random picks are uniform over them): each serving backend in
        proportion to its weight, one slot each when the weights are equal, at most
        WEIGHTED_SLOTS in all (a backend keeps at least one)."""
        serving = self.serving
        weights = [b.weight for b in serving]
        if len(set(weights)) <= 1:
            return serving
        divisor = math.gcd(*weights)
        shares = [w // divisor for w in weights]
        total = sum(shares)
        if total > WEIGHTED_SLOTS:
            shares = [max(1, round(s * WEIGHTED_SLOTS / total)) for s in shares]
        return [b for b, n in zip(serving, shares, strict=True) for _ in range(n)]


@dataclass
class FrontendPlan:
    key: FrontendKey
    set: SetKey
    flags: int
    service: tuple[str, str]


@dataclass
class Plan:
    sets: dict[SetKey, SetPlan] = field(default_factory=dict)
    frontends: dict[FrontendKey, FrontendPlan] = field(default_factory=dict)

    def backends(self) -> dict[BackendKey, str]:
        """Every backend and its state (the same address and port has one state)."""
        found: dict[BackendKey, str] = {}
        for s in self.sets.values():
            for b in s.backends:
                found[b.key] = b.state
        return found

    def revnats(self) -> set[RevNatKey]:
        return {(f[0], f[1], f[3]) for f in self.frontends}


@dataclass(frozen=True)
class NodeView:
    """What the plan needs of the node."""

    endpoints: tuple[EndpointRecord, ...]
    node_addresses: Mapping[int, tuple[str, ...]]  # family -> the node's own addresses
    maglev_size: int
    namespace_labels: Mapping[str, Mapping[str, str]] = field(default_factory=dict)


def plan(
    services: Iterable[ServiceRecord], slices: Iterable[EndpointSliceRecord], node: NodeView
) -> Plan:
    by_service: dict[tuple[str, str], list[EndpointSliceRecord]] = {}
    for s in slices:
        by_service.setdefault((s.namespace, s.service), []).append(s)
    local = local_addresses(node)
    return merge(plan_service(svc, by_service.get(svc.key), node, local) for svc in services)


def local_addresses(node: NodeView) -> set[str]:
    """The addresses of this node's endpoints (backends there are `local`)."""
    return {ep.ipv4 for ep in node.endpoints} | {ep.ipv6 for ep in node.endpoints if ep.ipv6}


def plan_service(
    svc: ServiceRecord,
    slices: Iterable[EndpointSliceRecord] | None,
    node: NodeView,
    local: set[str],
) -> Plan:
    """One Service's part of the plan: its sets and frontends only, so a change re-plans
    the Services it touched and keeps the others' parts (`merge`)."""
    slices = None if slices is None else list(slices)
    result = Plan()
    families = sorted({ipaddress.ip_address(ip).version for ip in svc.cluster_ips})
    for port in svc.ports:
        for family in families:
            backends = _backends(svc, port, family, slices, node)
            for b in backends:
                b.local = b.key[0] in local
            _plan_port(result, svc, port, family, backends, node)
    return result


def merge(parts: Iterable[Plan]) -> Plan:
    """The Services' parts as one plan (their keys are disjoint: each names its Service)."""
    result = Plan()
    for part in parts:
        result.sets.update(part.sets)
        result.frontends.update(part.frontends)
    return result


def _plan_port(
    result: Plan,
    svc: ServiceRecord,
    port: ServicePort,
    family: int,
    backends: list[BackendPlan],
    node: NodeView,
) -> None:
    flags = SvcSetFlag(0)
    if svc.algorithm == "maglev":
        flags |= SvcSetFlag.MAGLEV
    if svc.affinity_timeout:
        flags |= SvcSetFlag.AFFINITY

    def backend_set(local: bool) -> SetKey:
        key = (svc.namespace, svc.name, port.name, family, local)
        if key not in result.sets:
            members = [b for b in backends if b.local] if local else backends
            result.sets[key] = SetPlan(
                key,
                int(flags),
                svc.affinity_timeout or 0,
                node.maglev_size if svc.algorithm == "maglev" else 0,
                sorted(members, key=lambda b: b.key),
            )
        return key

    protocol = PROTOCOLS[port.protocol]
    internal_local = svc.internal_traffic_policy == "Local"
    external_local = svc.external_traffic_policy == "Local"

    def frontend(address: str, number: int, scope: int, kind: int, local: bool) -> None:
        key = (address, number, protocol, family, scope)
        flags = kind | (SvcFrontendFlag.LOCAL if local else 0)
        result.frontends[key] = FrontendPlan(key, backend_set(local), int(flags), svc.key)

    for ip in svc.cluster_ips:
        if ipaddress.ip_address(ip).version == family:
            frontend(ip, port.port, SvcScope.INTERNAL, SvcFrontendFlag.CLUSTER_IP, internal_local)
    for ip in svc.external_ips:
        if ipaddress.ip_address(ip).version == family:
            frontend(ip, port.port, SvcScope.EXTERNAL, SvcFrontendFlag.EXTERNAL_IP, external_local)
            frontend(ip, port.port, SvcScope.INTERNAL, SvcFrontendFlag.EXTERNAL_IP, False)
    if port.node_port is not None:
        for address in node.node_addresses.get(family, ()):
            kind = SvcFrontendFlag.NODE_PORT
            frontend(address, port.node_port, SvcScope.EXTERNAL, kind, external_local)
            frontend(address, port.node_port, SvcScope.INTERNAL, kind, False)


def _backends(
    svc: ServiceRecord,
    port: ServicePort,
    family: int,
    slices: list[EndpointSliceRecord] | None,
    node: NodeView,
) -> list[BackendPlan]:
    protocol = PROTOCOLS[port.protocol]
    found: dict[BackendKey, BackendPlan] = {}
    if slices is not None:
        for s in slices:
            ports = [p for p in s.ports if p.name == port.name and p.protocol == port.protocol]
            for ep in s.endpoints:
                for address in ep.addresses:
                    if ipaddress.ip_address(address).version != family:
                        continue
                    for p in ports:
                        key = (address, ep.port or p.port, protocol)
                        found[key] = BackendPlan(key, ep.state, ep.weight, False)
    elif svc.selector is not None:
        for ep in node.endpoints:
            if ep.namespace != svc.namespace or not selector_matches(svc.selector, ep.labels):
                continue
            address = ep.ipv4 if family == 4 else ep.ipv6
            if not address:
                continue
            number = _target_port(port, ep)
            if number is not None:
                key = (address, number, protocol)
                found[key] = BackendPlan(key, "active", 1, False)
    return list(found.values())


def _target_port(port: ServicePort, ep: EndpointRecord) -> int | None:
    if isinstance(port.target_port, int):
        return port.target_port
    for p in ep.ports:
        if p.name == port.target_port and p.protocol == port.protocol:
            return p.port
    return None


def selector_matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """A Service selector (equality on every key) against a pod's labels, which may carry
    Cilium's `k8s:` source prefix."""
    for key, value in selector.items():
        if labels.get(key, labels.get(f"k8s:{key}")) != value:
            return False
    return True
