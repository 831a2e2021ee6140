"""Policies of every kind, flattened into one shape for the compiler: who a rule applies
to (a subject selector over endpoint labels), which peers it matches (selectors over
identity labels, or any peer) and which protocols and ports.

The Kubernetes and Cilium semantics live here, translated into Cilium's label model:

- A NetworkPolicy's podSelector, and a CiliumNetworkPolicy's endpointSelector, select
  endpoints of the policy's own namespace only.
- NetworkPolicy peers: podSelector alone = pods of the policy's namespace; namespaceSelector
  alone = every pod of the matching namespaces (it matches the namespace labels an endpoint
  carries as `io.cilium.k8s.namespace.labels.<key>`); both in one peer = both must hold.
  A rule without `from`/`to` matches every peer, one without `ports` every port.
- ipBlock, fromCIDR/toCIDR and CIDR sets select CIDR identities (and world for 0.0.0.0/0),
  never cluster endpoints or the host, whose addresses the ipcache maps to their own
  identities. This is Cilium's reading of ipBlock; Kubernetes leaves it open.
- CiliumNetworkPolicy peer selectors are scoped to the policy's namespace unless they name
  `io.kubernetes.pod.namespace` or select reserved labels; a clusterwide policy's are
  limited to pods of any namespace, so `fromEndpoints: [{}]` there means every pod.
- Cilium peer fields in one rule are alternatives. A rule with ports but no peer field
  applies to every peer; a rule with neither (`ingress: [{}]`) allows nothing but, as any
  rule in the section, still puts its endpoints into default deny (the Cilium docs' way of
  writing "deny all ingress").
- Protocol ANY (Cilium's default) means TCP, UDP and SCTP; ICMP types are ports of proto 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network

from membrane.abi import IpProto
from membrane.identity.labels import (
    CLUSTER_KEY,
    NAMESPACE_LABELS_PREFIX,
    POD_NAMESPACE_KEY,
    SOURCE_CIDR,
    SOURCE_K8S,
    SOURCE_RESERVED,
)
from membrane.identity.selector import DOES_NOT_EXIST, EXISTS, IN, LabelSelector, Requirement
from membrane.policy.model import (
    KIND_CCNP,
    CiliumPeerRule,
    K8sPeer,
    K8sPortSpec,
    Policy,
    PortProtocol,
)
from membrane.policy.ruletable import RuleRef
from membrane.policy.validate import ANY_PROTOCOL, PROTOCOL_NUMBERS

ALL_PORTS = (0, 0xFFFF)
ANY_PROTOCOLS = tuple(PROTOCOL_NUMBERS.values())  # Cilium's ANY: TCP, UDP and SCTP


@dataclass(frozen=True)
class PortRange:
    proto: int
    first: int
    last: int


@dataclass(frozen=True)
class NamedPort:
    """Resolved per endpoint: against the subject's own ports on ingress, the peer's on
    egress."""

    proto: int
    name: str


PortMatch = PortRange | NamedPort


@dataclass(frozen=True)
class FlatRule:
    ref: RuleRef
    any_peer: bool  # every identity, including unknown ones
    peers: tuple[LabelSelector, ...]  # or any identity whose labels one of these matches
    ports: tuple[PortMatch, ...] | None  # None: every protocol and port


@dataclass(frozen=True)
class Subject:
    """The endpoints one policy spec applies to, with its rules."""

    selector: LabelSelector  # over endpoint labels, namespace scoping included
    enforce_ingress: bool
    enforce_egress: bool
    rules: tuple[FlatRule, ...]


def _namespace_is(namespace: str) -> Requirement:
    return Requirement(f"{SOURCE_K8S}:{POD_NAMESPACE_KEY}", IN, (namespace,))


def _is_endpoint() -> Requirement:
    return Requirement(f"{SOURCE_K8S}:{POD_NAMESPACE_KEY}", EXISTS)


def _reserved(name: str) -> LabelSelector:
    return LabelSelector({f"{SOURCE_RESERVED}:{name}": ""})


def cidr_selector(cidr: IPv4Network, excepts: Sequence[IPv4Network] = ()) -> LabelSelector:
    """CIDR identities inside `cidr` and not inside an except (see cidr_identity_labels)."""
    base = (
        _reserved("world") if cidr.prefixlen == 0 else LabelSelector({f"{SOURCE_CIDR}:{cidr}": ""})
    )
    return base.with_requirements(
        *(Requirement(f"{SOURCE_CIDR}:{e}", DOES_NOT_EXIST) for e in excepts)
    )


_CLUSTER = (
    *(_reserved(n) for n in ("host", "remote-node", "health", "init", "unmanaged")),
    LabelSelector({}, [Requirement(f"{SOURCE_K8S}:{CLUSTER_KEY}", EXISTS)]),
)
ENTITY_SELECTORS: dict[str, tuple[LabelSelector, ...]] = {
    "world": (_reserved("world"),),
    "world-ipv4": (_reserved("world"),),
    "host": (_reserved("host"),),
    "remote-node": (_reserved("remote-node"),),
    "health": (_reserved("health"),),
    "init": (_reserved("init"),),
    "unmanaged": (_reserved("unmanaged"),),
    "cluster": _CLUSTER,
}


def policy_subjects(policy: Policy) -> list[Subject]:
    if policy.k8s_spec is not None:
        return [_k8s_subject(policy)]
    return [_cilium_subject(policy, i) for i in range(len(policy.cilium_specs))]


# ---- NetworkPolicy -------------------------------------------------------------------------


def _k8s_subject(policy: Policy) -> Subject:
    spec = policy.k8s_spec
    assert spec is not None and policy.namespace is not None
    namespace = policy.namespace
    selector = spec.pod_selector.to_selector() if spec.pod_selector else LabelSelector()
    types = spec.effective_types()
    rules: list[FlatRule] = []
    if "Ingress" in types:
        for i, rule in enumerate(spec.ingress or ()):
            ref = RuleRef(policy.kind, namespace, policy.name, "ingress", False, i)
            rules.append(_k8s_rule(ref, rule.peers, rule.ports, namespace))
    if "Egress" in types:
        for i, rule in enumerate(spec.egress or ()):
            ref = RuleRef(policy.kind, namespace, policy.name, "egress", False, i)
            rules.append(_k8s_rule(ref, rule.peers, rule.ports, namespace))
    return Subject(
        selector.with_requirements(_namespace_is(namespace)),
        "Ingress" in types,
        "Egress" in types,
        tuple(rules),
    )


def _k8s_rule(
    ref: RuleRef, peers: list[K8sPeer], ports: list[K8sPortSpec] | None, namespace: str
) -> FlatRule:
    port_matches = tuple(_k8s_port(p) for p in ports) if ports else None
    if not peers:
        return FlatRule(ref, True, (), port_matches)
    return FlatRule(ref, False, tuple(_k8s_peer(p, namespace) for p in peers), port_matches)


def _k8s_peer(peer: K8sPeer, namespace: str) -> LabelSelector:
    if peer.ip_block is not None:
        return cidr_selector(peer.ip_block.cidr, peer.ip_block.except_ or ())
    selector = peer.pod_selector.to_selector() if peer.pod_selector else LabelSelector()
    if peer.namespace_selector is None:
        return selector.with_requirements(_namespace_is(namespace))
    ns_prefix = f"{SOURCE_K8S}:{NAMESPACE_LABELS_PREFIX}"
    ns_selector = peer.namespace_selector.to_selector(key_prefix=ns_prefix)
    return selector.with_requirements(*ns_selector.requirements(), _is_endpoint())


def _k8s_port(spec: K8sPortSpec) -> PortMatch:
    return _port_match(PROTOCOL_NUMBERS[spec.protocol or "TCP"], spec.port, spec.end_port)


def _port_match(proto: int, port: int | str | None, end_port: int | None) -> PortMatch:
    if isinstance(port, str):
        return NamedPort(proto, port)
    if not port:
        return PortRange(proto, *ALL_PORTS)
    return PortRange(proto, port, end_port or port)


# ---- CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy ----------------------------------


def _cilium_subject(policy: Policy, position: int) -> Subject:
    spec_index, spec = policy.cilium_specs[position]
    scope = None if policy.kind == KIND_CCNP else policy.namespace
    selector = spec.endpoint_selector.to_selector()
    if scope is not None:
        selector = selector.with_requirements(_namespace_is(scope))
    rules = []
    for direction in ("ingress", "egress"):
        for deny, section in zip((False, True), spec.sections(direction), strict=True):
            for i, rule in enumerate(section):
                ref = RuleRef(
                    policy.kind, policy.namespace, policy.name, direction, deny, i, spec_index
                )
                rules.append(_cilium_rule(ref, rule, scope))
    return Subject(
        selector, spec.default_deny("ingress"), spec.default_deny("egress"), tuple(rules)
    )


def _cilium_rule(ref: RuleRef, rule: CiliumPeerRule, scope: str | None) -> FlatRule:
    ports = _cilium_ports(rule) if rule.has_l4() else None
    if not rule.has_peers():
        # Ports alone: every peer on those ports. Nothing at all: matches nothing.
        return FlatRule(ref, rule.has_l4(), (), ports)
    if "all" in rule.peer_entities:
        return FlatRule(ref, True, (), ports)
    peers: list[LabelSelector] = []
    for endpoint_selector in rule.peer_endpoints:
        selector = endpoint_selector.to_selector()
        if not endpoint_selector.escapes_namespace():
            # Namespaced: that namespace's pods. Clusterwide: pods of any namespace, as in
            # Cilium, so `{}` there is every pod, never the host or world.
            scoped = _namespace_is(scope) if scope is not None else _is_endpoint()
            selector = selector.with_requirements(scoped)
        peers.append(selector)
    peers += [cidr_selector(cidr) for cidr in rule.peer_cidrs]
    peers += [cidr_selector(s.cidr, s.except_ or ()) for s in rule.peer_cidr_sets]
    for entity in rule.peer_entities:
        peers += ENTITY_SELECTORS[entity]
    return FlatRule(ref, False, tuple(peers), ports)


def _cilium_ports(rule: CiliumPeerRule) -> tuple[PortMatch, ...] | None:
    matches: list[PortMatch] = []
    for port_rule in rule.to_ports or ():
        if not port_rule.ports:
            return None  # a toPorts item without ports: every port
        for spec in port_rule.ports:
            matches += _cilium_port(spec)
    for icmp in rule.icmps or ():
        matches += [PortRange(IpProto.ICMP, f.icmp_type, f.icmp_type) for f in icmp.fields]
    return tuple(matches)


def _cilium_port(spec: PortProtocol) -> list[PortMatch]:
    protocol = spec.protocol or ANY_PROTOCOL
    protos = ANY_PROTOCOLS if protocol == ANY_PROTOCOL else (PROTOCOL_NUMBERS[protocol],)
    return [_port_match(proto, spec.port, spec.end_port) for proto in protos]
