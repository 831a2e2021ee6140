"""What readers see: the agent's state at the end of one change, published whole.

Only the worker thread changes the agent. At the end of every change it builds one
`Snapshot` and publishes it with a single assignment; API handlers, the flow reader and
metrics read `agent.snapshot` once and use only that object, so each read sees one
consistent state (never an endpoint whose identity has no labels yet, never a half-applied
policy). Nothing in a snapshot is changed after it is published: records are frozen and
every mapping is built for the snapshot (or shared with an older one when unchanged).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from membrane.abi import Identity
from membrane.agent.state import EndpointRecord, StoredPolicy
from membrane.identity.labels import Label
from membrane.policy import EndpointPolicy, Policy, RuleRef, Universe


@dataclass(frozen=True)
class Snapshot:
    node_name: str
    node_ip: IPv4Address
    host_addresses: tuple[IPv4Address | IPv6Address, ...]
    endpoints: Mapping[int, EndpointRecord]  # by endpoint id
    endpoints_by_key: Mapping[str, EndpointRecord]  # "namespace/name"
    endpoints_by_ip: Mapping[str, EndpointRecord]
    namespaces: Mapping[str, Mapping[str, str]]  # every known namespace -> its labels
    identity_labels: Mapping[int, frozenset[Label]]
    policy_revision: int
    stored_policies: tuple[StoredPolicy, ...]  # as the user wrote them, in policy order
    policies: tuple[Policy, ...]  # parsed, in the same order
    rules: Mapping[int, RuleRef]  # rule id -> rule
    universe: Universe
    compiled: Mapping[int, EndpointPolicy]  # endpoint id -> its policy as enforced
    dual_stack: bool = False
    address_identities: Mapping[str, int] = dataclasses.field(default_factory=dict)
    kube_apiserver_addresses: tuple[IPv4Address | IPv6Address, ...] = ()
    # policy (kind, namespace, name) -> its notes (membrane.agent.notes), when it has any
    policy_notes: Mapping[tuple[str, str | None, str], tuple[str, ...]] = dataclasses.field(
        default_factory=dict
    )

    def world_identity(self, version: int) -> int:
        """What the ipcache gives addresses of `version` that no prefix covers."""
        if version == 6:
            return int(Identity.WORLD_IPV6)
        return int(Identity.WORLD_IPV4 if self.dual_stack else Identity.WORLD)

    def endpoint(self, namespace: str, name: str) -> EndpointRecord | None:
        return self.endpoints_by_key.get(f"{namespace}/{name}")

    def identity_of_ip(self, ip: IPv4Address | IPv6Address) -> int:
        """The ipcache's answer for an address: its longest matching prefix."""
        ep = self.endpoints_by_ip.get(str(ip))
        if ep is not None:
            return ep.identity
        if ip in self.host_addresses:
            return int(Identity.HOST)
        if ip in self.kube_apiserver_addresses:
            return int(Identity.KUBE_APISERVER)
        best: tuple[int, int] = (-1, self.world_identity(ip.version))
        for identity, prefix in self.universe.cidr_identities.items():
            if prefix.version == ip.version and ip in prefix and prefix.prefixlen > best[0]:
                best = (prefix.prefixlen, identity)
        return best[1]

    @functools.cached_property
    def rule_shapes(self) -> Mapping[int, tuple[bool, bool]]:
        """rule id -> (its entries name peers, they name protocols or ports), for flow
        records. Computed when a flow first asks, not on every change; endpoints with the
        same policy share one object, so each is read once. Two threads computing it at
        once get equal answers from the same immutable input."""
        shapes: dict[int, tuple[bool, bool]] = {}
        unique = {id(p): p for p in self.compiled.values()}
        for policy in unique.values():
            for e in policy.entries:
                l3, l4 = shapes.get(e.rule_id, (False, False))
                shapes[e.rule_id] = (l3 or e.identity != 0, l4 or e.proto != 0)
        return shapes
