"""The policy semantics evaluated directly on the documents, one flow at a time.

This is the second, independent reading of the semantics that `rules.py` and `compile.py`
implement: it works on the parsed documents (which policies select the endpoint, which
rules match the peer and the port), decides CIDR peers by prefix containment rather than
by CIDR labels, entities by identity number rather than by reserved labels, and never
builds policy entries. Property tests compare it with the compiled datapath entries.
`policy trace` uses it to explain a verdict, since it knows every rule that matched.

Pod addresses (rules.py): where the datapath looks up a peer's pod-address identity beside
its own (a pod's, or the node's: the agent gives every address of the cluster that an
address prefix holds one), the evaluator is given the peer's address (`peer_address`) and
matches ipBlocks (and, with `cidr_match_mode="all"`, Cilium CIDR peers) against it by
containment. A named port of an egress rule is the peer pod's, known by its identity: a
rule that matches a pod by its address only resolves no named port of it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address

from membrane.abi import Identity
from membrane.identity.labels import (
    NAMESPACE_LABELS_PREFIX,
    POD_NAMESPACE_KEY,
    SOURCE_K8S,
    Label,
)
from membrane.policy.model import (
    KIND_CNP,
    CiliumPeerRule,
    CiliumSelector,
    K8sPeer,
    K8sPortSpec,
    Policy,
    PortProtocol,
)
from membrane.policy.ruletable import RuleRef, allow_localhost_rule
from membrane.policy.universe import AllowLocalhost, EndpointInfo, Universe
from membrane.policy.validate import (
    ANY_PROTOCOL,
    CILIUM_PROTOCOL_NUMBERS,
    PORTLESS_PROTOCOLS,
    PROTOCOL_NUMBERS,
    Network,
)

_ENTITY_IDENTITY = {
    "host": Identity.HOST,
    "remote-node": Identity.REMOTE_NODE,
    "kube-apiserver": Identity.KUBE_APISERVER,
    "ingress": Identity.INGRESS,
    "health": Identity.HEALTH,
    "init": Identity.INIT,
    "unmanaged": Identity.UNMANAGED,
}
_CLUSTER_RESERVED = set(_ENTITY_IDENTITY.values())
# The world identities of each family: 2 stands for IPv4 world on an IPv4-only node (and
# is not used on a dual-stack one, where 9 and 10 are).
_WORLD_OF_FAMILY = {4: {Identity.WORLD, Identity.WORLD_IPV4}, 6: {Identity.WORLD_IPV6}}
# How a rule's peers matched a flow's peer: by its identity, or only by its pod address.
_BY_IDENTITY, _BY_ADDRESS = "identity", "address"


@dataclass
class Decision:
    allowed: bool
    enforced: bool  # the endpoint is in default deny in this direction
    deciding: RuleRef | None  # the rule that decided; None when the default did
    allowed_by: list[RuleRef]  # every matching allow rule
    denied_by: list[RuleRef]  # every matching deny rule
    selected_by: list[str]  # every policy selecting the endpoint (any direction)
    enforced_by: list[str] = field(default_factory=list)  # those making it default deny here
    direction: str = "ingress"


@dataclass(frozen=True)
class _Flow:
    """One connection attempt, from the endpoint's point of view."""

    universe: Universe
    endpoint: EndpointInfo
    direction: str
    peer_identity: int
    peer_labels: frozenset[Label]
    proto: int
    port: int
    peer_address: IPv4Address | IPv6Address | None = None
    cidr_match_mode: str = "world"

    def peer_namespace(self) -> str | None:
        """The peer pod's namespace; None when the peer is not a pod."""
        for label in self.peer_labels:
            if label.source == SOURCE_K8S and label.key == POD_NAMESPACE_KEY:
                return label.value
        return None

    def peer_namespace_labels(self) -> frozenset[Label]:
        """The labels of the peer pod's namespace, as the namespace itself carries them."""
        cut = len(NAMESPACE_LABELS_PREFIX)
        return frozenset(
            Label(SOURCE_K8S, label.key[cut:], label.value)
            for label in self.peer_labels
            if label.source == SOURCE_K8S and label.key.startswith(NAMESPACE_LABELS_PREFIX)
        )

    def world_family(self) -> int | None:
        """4 or 6 for a world peer (a world or CIDR identity the node knows), None for any
        other."""
        if self.peer_identity not in self.universe.identities:
            return None
        for family, identities in _WORLD_OF_FAMILY.items():
            if self.peer_identity in identities:
                return family
        prefix = self.universe.cidr_identities.get(self.peer_identity)
        return None if prefix is None else prefix.version

    def peer_in_cidr(
        self, cidr: Network, excepts: Sequence[Network], by_address: bool
    ) -> str | None:
        """_BY_IDENTITY for a world peer inside: world is what no policy prefix covers, so
        only its family's /0 contains it. With `by_address`, _BY_ADDRESS for a peer of the
        cluster (a pod, the node) whose address is inside."""
        world = self.world_family()
        if by_address and self.peer_address is not None and world is None:
            address = self.peer_address
            if address.version == cidr.version and address in cidr:
                return None if any(address in e for e in excepts) else _BY_ADDRESS
        if world != cidr.version:
            return None
        if self.peer_identity in _WORLD_OF_FAMILY[world]:
            return _BY_IDENTITY if cidr.prefixlen == 0 else None
        prefix = self.universe.cidr_identities[self.peer_identity]
        inside = prefix.subnet_of(cidr)  # type: ignore[arg-type]
        if inside and not any(prefix.subnet_of(e) for e in excepts):  # type: ignore[arg-type]
            return _BY_IDENTITY
        return None

    def named_port_is_ours(self, name: str, any_peer: bool | str) -> bool:
        """Whether the flow's port is the named port: the endpoint's own on ingress, the
        peer's on egress (any endpoint's, for a rule matching any peer; none, for a rule
        matching the peer by its address only)."""
        if self.direction == "ingress":
            owners = [self.endpoint]
        elif any_peer == _BY_ADDRESS:
            owners = []
        elif any_peer is True:
            owners = list(self.universe.endpoints.values())
        else:
            owners = [
                e for e in self.universe.endpoints.values() if e.identity == self.peer_identity
            ]
        return any(o.named_ports.get(name) == (self.port, self.proto) for o in owners)

    def port_matches(
        self, port: int | str | None, end_port: int | None, any_peer: bool | str
    ) -> bool:
        """`any_peer`: True for a rule matching any peer, else how the rule matched."""
        if not port:
            return True
        if isinstance(port, str):
            return self.named_port_is_ours(port, any_peer)
        return port <= self.port <= (end_port or port)


@dataclass
class _Findings:
    selected_by: list[str] = field(default_factory=list)
    enforced_by: list[str] = field(default_factory=list)
    allowed_by: list[RuleRef] = field(default_factory=list)
    denied_by: list[RuleRef] = field(default_factory=list)

    def note(self, names: list[str], policy: Policy) -> None:
        if policy.describe() not in names:
            names.append(policy.describe())


def evaluate(
    policies: Sequence[Policy],
    universe: Universe,
    *,
    endpoint: EndpointInfo,
    direction: str,
    peer_identity: int,
    proto: int,
    port: int,
    peer_address: IPv4Address | IPv6Address | None = None,
    cidr_match_mode: str = "world",
) -> Decision:
    """The verdict for a connection of `endpoint` with a peer of `peer_identity`
    (`direction` "ingress": the peer connects to the endpoint's `port`; "egress": the
    endpoint connects to the peer's `port`). `peer_address`: the peer's address, when the
    peer is a pod or the node (it is ignored for a world peer, which its CIDR identity
    places), which ipBlocks, and Cilium CIDR peers with `cidr_match_mode` "all", match by
    containment."""
    if direction not in ("ingress", "egress"):
        raise ValueError(f"direction must be ingress or egress, not {direction!r}")
    flow = _Flow(
        universe,
        endpoint,
        direction,
        peer_identity,
        universe.identities.get(peer_identity, frozenset()),
        proto,
        port,
        peer_address,
        cidr_match_mode,
    )
    found = _Findings()
    for policy in policies:
        if policy.k8s_spec is not None:
            _k8s_policy(policy, flow, found)
        else:
            _cilium_policy(policy, flow, found)
    enforced = bool(found.enforced_by)
    if (
        enforced
        and peer_identity == Identity.HOST
        and universe.allow_localhost == AllowLocalhost.ALWAYS
    ):
        # The agent lets the node through default deny; deny rules still win over it.
        found.allowed_by.insert(0, allow_localhost_rule(direction))
    if found.denied_by:
        allowed, deciding = False, found.denied_by[0]
    elif found.allowed_by:
        allowed, deciding = True, found.allowed_by[0]
    else:
        allowed, deciding = not enforced, None
    return Decision(
        allowed,
        enforced,
        deciding,
        found.allowed_by,
        found.denied_by,
        found.selected_by,
        found.enforced_by,
        direction,
    )


# ---- NetworkPolicy -------------------------------------------------------------------------


def _k8s_policy(policy: Policy, flow: _Flow, found: _Findings) -> None:
    spec = policy.k8s_spec
    assert spec is not None
    if flow.endpoint.namespace != policy.namespace:
        return
    if spec.pod_selector and not spec.pod_selector.to_selector().matches(flow.endpoint.labels):
        return
    found.note(found.selected_by, policy)
    if flow.direction.capitalize() not in spec.effective_types():
        return  # the policy does not isolate this direction, and its rules here are inert
    found.note(found.enforced_by, policy)
    rules = spec.ingress if flow.direction == "ingress" else spec.egress
    for i, rule in enumerate(rules or ()):
        peers = rule.peers
        how = _strongest(_k8s_peer_matches(p, policy, flow) for p in peers)
        if peers and how is None:
            continue
        if rule.ports and not any(_k8s_port_matches(p, flow, how or True) for p in rule.ports):
            continue
        found.allowed_by.append(
            RuleRef(policy.kind, policy.namespace, policy.name, flow.direction, False, i)
        )


def _strongest(matches: Iterable[str | None]) -> str | None:
    """How a rule matched, given how each of its peers did: by identity if any did so."""
    found = set(matches)
    return next((how for how in (_BY_IDENTITY, _BY_ADDRESS) if how in found), None)


def _k8s_peer_matches(peer: K8sPeer, policy: Policy, flow: _Flow) -> str | None:
    if peer.ip_block is not None:
        return flow.peer_in_cidr(peer.ip_block.cidr, peer.ip_block.except_ or (), by_address=True)
    peer_namespace = flow.peer_namespace()
    if peer_namespace is None:
        return None  # pod and namespace selectors select pods only
    if peer.namespace_selector is None:
        namespace_ok = peer_namespace == policy.namespace
    else:
        namespace_ok = peer.namespace_selector.to_selector().matches(flow.peer_namespace_labels())
    pod_ok = peer.pod_selector is None or peer.pod_selector.to_selector().matches(flow.peer_labels)
    return _BY_IDENTITY if namespace_ok and pod_ok else None


def _k8s_port_matches(spec: K8sPortSpec, flow: _Flow, any_peer: bool | str) -> bool:
    if flow.proto != PROTOCOL_NUMBERS[spec.protocol or "TCP"]:
        return False
    return flow.port_matches(spec.port, spec.end_port, any_peer)


# ---- CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy ----------------------------------


def _cilium_policy(policy: Policy, flow: _Flow, found: _Findings) -> None:
    if policy.kind == KIND_CNP and flow.endpoint.namespace != policy.namespace:
        return
    for spec_index, spec in policy.cilium_specs:
        if not spec.endpoint_selector.to_selector().matches(flow.endpoint.labels):
            continue
        found.note(found.selected_by, policy)
        if spec.default_deny(flow.direction):
            found.note(found.enforced_by, policy)
        for deny, section in zip((False, True), spec.sections(flow.direction), strict=True):
            for i, rule in enumerate(section):
                if _cilium_rule_matches(rule, policy, flow):
                    ref = RuleRef(
                        policy.kind,
                        policy.namespace,
                        policy.name,
                        flow.direction,
                        deny,
                        i,
                        spec_index,
                    )
                    (found.denied_by if deny else found.allowed_by).append(ref)


def _cilium_rule_matches(rule: CiliumPeerRule, policy: Policy, flow: _Flow) -> bool:
    any_peer: bool | str
    if rule.has_peers():
        any_peer = _matches_any_peer(rule, policy) or _cilium_peer_matches(rule, policy, flow)
        if not any_peer:
            return False
    elif rule.has_l4():
        any_peer = True  # only ports: every peer on those ports
    else:
        return False  # an empty rule allows (or denies) nothing
    if not rule.has_l4():
        return True
    for port_rule in rule.to_ports or ():
        if not port_rule.ports or any(
            _cilium_port_matches(p, flow, any_peer) for p in port_rule.ports
        ):
            return True
    return any(
        f.proto == flow.proto and f.icmp_type == flow.port
        for icmp in rule.icmps or ()
        for f in icmp.fields
    )


def _scoped(selector: CiliumSelector, policy: Policy) -> bool:
    """A namespaced policy sees only its own namespace, unless the selector says otherwise."""
    return policy.kind == KIND_CNP and not selector.escapes_namespace()


def _matches_any_peer(rule: CiliumPeerRule, policy: Policy) -> bool:
    """Entity `all`: a wildcard over every identity, known or not."""
    return "all" in rule.peer_entities


def _pods_only(selector: CiliumSelector, policy: Policy) -> bool:
    """A clusterwide policy's selector that names neither a namespace nor reserved labels
    selects pods of every namespace, never the host or world: `{}` there is every pod."""
    return policy.kind != KIND_CNP and not selector.escapes_namespace()


def _cilium_peer_matches(rule: CiliumPeerRule, policy: Policy, flow: _Flow) -> str | None:
    """How the rule's peers match the flow's peer (_BY_IDENTITY, _BY_ADDRESS), or None."""
    known = flow.peer_identity in flow.universe.identities
    for selector in rule.peer_endpoints:
        if _scoped(selector, policy) and flow.peer_namespace() != policy.namespace:
            continue
        if _pods_only(selector, policy) and flow.peer_namespace() is None:
            continue
        if known and selector.to_selector().matches(flow.peer_labels):
            return _BY_IDENTITY
    if any(_entity_matches(entity, flow) for entity in rule.peer_entities):
        return _BY_IDENTITY
    by_address = flow.cidr_match_mode == "all"
    return _strongest(flow.peer_in_cidr(c, e, by_address) for c, e in rule.cidr_blocks())


def _entity_matches(entity: str, flow: _Flow) -> bool:
    """By identity number. Identities the node does not know are matched by `all` only."""
    identity = flow.peer_identity
    known = identity in flow.universe.identities
    if not known:
        return entity == "all"
    if entity == "world":
        return flow.world_family() is not None
    if entity == "world-ipv4":
        return flow.world_family() == 4
    if entity == "world-ipv6":
        return flow.world_family() == 6
    if entity == "cluster":
        endpoint = Identity.FIRST_ENDPOINT <= identity < Identity.FIRST_CIDR
        return identity in _CLUSTER_RESERVED or endpoint
    if entity == "all":
        return True
    return identity == _ENTITY_IDENTITY[entity]


def _cilium_port_matches(spec: PortProtocol, flow: _Flow, any_peer: bool | str) -> bool:
    protocol = spec.protocol or ANY_PROTOCOL
    if protocol in PORTLESS_PROTOCOLS:
        return flow.proto == PORTLESS_PROTOCOLS[protocol]  # every packet: it has no ports
    if protocol == ANY_PROTOCOL:
        protocol_ok = flow.proto in PROTOCOL_NUMBERS.values()
    else:
        protocol_ok = flow.proto == CILIUM_PROTOCOL_NUMBERS[protocol]
    return protocol_ok and flow.port_matches(spec.port, spec.end_port, any_peer)


# ---- explaining -----------------------------------------------------------------------------


def explain(decision: Decision) -> list[str]:
    """The decision as lines for people, most general first, the verdict last."""
    lines = []
    if decision.selected_by:
        lines.append(f"selected by {', '.join(decision.selected_by)}")
    else:
        lines.append("no policy selects the endpoint")
    if decision.enforced:
        lines.append(
            f"{decision.direction} is default deny (set by {', '.join(decision.enforced_by)})"
        )
    else:
        lines.append(f"{decision.direction} is not default deny: what no rule denies is allowed")
    lines += [f"denied by {ref.describe()}" for ref in decision.denied_by]
    lines += [f"allowed by {ref.describe()}" for ref in decision.allowed_by]
    if decision.denied_by:
        lines.append(
            f"DENIED by {decision.denied_by[0].describe()} (deny rules win over allow rules)"
        )
    elif decision.allowed_by:
        lines.append(f"ALLOWED by {decision.allowed_by[0].describe()}")
    elif decision.enforced:
        lines.append("DENIED: no rule allows it (default deny)")
    else:
        lines.append(f"ALLOWED: no policy restricts {decision.direction}")
    return lines
