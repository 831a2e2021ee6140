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
- fromCIDR/toCIDR and CIDR sets select world addresses only (Cilium's documented reading):
  the CIDR identities of policy prefixes (labels `reserved:world`, `reserved:world-ipv4` or
  `-ipv6`, and `cidr:Q` for every policy prefix Q containing theirs), and for a /0 the
  world identities of its family. Pods and the node have identities of their own.
- A NetworkPolicy ipBlock selects those and also pods whose address is in the block (as the
  Kubernetes e2e tests expect): the agent gives such a pod address (and a node address) a
  second, pod-address identity labelled `cidr:Q` for every address prefix Q containing it
  (`address_prefixes`, /0 included) and nothing reserved; the datapath applies the entries
  of both identities (a deny of either wins). `cidr_match_mode="all"` makes Cilium CIDR
  peers match pod addresses the same way. Endpoint selectors never select pod-address identities.
- Entities: `world` is every world identity (2 on an IPv4-only node, 9 and 10 on a
  dual-stack one) and CIDR identity; `world-ipv4`/`world-ipv6` their family's; `cluster`
  the reserved identities of the cluster (host, remote-node, health, init, unmanaged,
  ingress, kube-apiserver) and every pod; `all` every identity, known or not.
- CiliumNetworkPolicy peer selectors are scoped to the policy's namespace unless they name
  `io.kubernetes.pod.namespace` or select reserved labels; a clusterwide policy's are
  limited to pods of any namespace, so `fromEndpoints: [{}]` there means every pod.
- Cilium peer fields in one rule are alternatives. A rule with ports but no peer field
  applies to every peer; a rule with neither (`ingress: [{}]`) allows nothing but, as any
  rule in the section, still puts its endpoints into default deny (the Cilium docs' way of
  writing "deny all ingress").
- Protocol ANY (Cilium's default) means TCP, UDP and SCTP; ICMP types are ports of proto 1,
  ICMPv6 types (`family: IPv6`) ports of proto 58; a protocol without ports (GRE, ESP, ...)
  matches all its packets, whatever port the rule gives.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from membrane.identity.labels import (
    CLUSTER_KEY,
    NAMESPACE_LABELS_PREFIX,
    POD_NAMESPACE_KEY,
    RESERVED_NAMES,
    SOURCE_ANY,
    SOURCE_CIDR,
    SOURCE_K8S,
    SOURCE_RESERVED,
)
from membrane.identity.selector import (
    DOES_NOT_EXIST,
    EXISTS,
    IN,
    LabelSelector,
    Requirement,
    split_key,
)
from membrane.policy.model import (
    CIDR_MATCH_MODES,
    KIND_CCNP,
    CiliumPeerRule,
    K8sPeer,
    K8sPortSpec,
    Policy,
    PortProtocol,
)
from membrane.policy.ruletable import RuleRef
from membrane.policy.validate import (
    ANY_PROTOCOL,
    CILIUM_PROTOCOL_NUMBERS,
    PORTLESS_PROTOCOLS,
    PROTOCOL_NUMBERS,
    Network,
    parse_cidr,
)

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


def _cidr_key(prefix: Network) -> str:
    return f"{SOURCE_CIDR}:{prefix}"


_WORLD = f"{SOURCE_RESERVED}:world"
# world-ipv4: identity 9 on a dual-stack node; identity 2 on an IPv4-only one and the IPv4
# CIDR identities (world without the IPv6 label).
_WORLD_IPV4 = (
    _reserved("world-ipv4"),
    LabelSelector({_WORLD: ""}, [Requirement(f"{SOURCE_RESERVED}:world-ipv6", DOES_NOT_EXIST)]),
)
_WORLD_IPV6 = (_reserved("world-ipv6"),)
_CLUSTER = (
    *(
        _reserved(n)
        for n in (
            "host",
            "remote-node",
            "health",
            "init",
            "unmanaged",
            "ingress",
            "kube-apiserver",
        )
    ),
    LabelSelector({}, [Requirement(f"{SOURCE_K8S}:{CLUSTER_KEY}", EXISTS)]),
)
# Every entity but `all`, which is any peer (FlatRule.any_peer), known or not.
ENTITY_SELECTORS: dict[str, tuple[LabelSelector, ...]] = {
    "world": (_reserved("world"), _reserved("world-ipv4"), _reserved("world-ipv6")),
    "world-ipv4": _WORLD_IPV4,
    "world-ipv6": _WORLD_IPV6,
    "cluster": _CLUSTER,
    **{
        name: (_reserved(name),)
        for name in (
            "host",
            "remote-node",
            "kube-apiserver",
            "ingress",
            "health",
            "init",
            "unmanaged",
        )
    },
}


def world_cidr_selectors(
    cidr: Network, excepts: Sequence[Network] = ()
) -> tuple[LabelSelector, ...]:
    """World addresses inside `cidr` and not inside an except: the CIDR identities labelled
    with it (see the module's docstring), or for a /0 its family's world identities."""
    excluded = [Requirement(_cidr_key(e), DOES_NOT_EXIST) for e in excepts]
    if cidr.prefixlen == 0:
        base = _WORLD_IPV4 if cidr.version == 4 else _WORLD_IPV6
    else:
        base = (LabelSelector({_cidr_key(cidr): "", _WORLD: ""}),)
    return tuple(s.with_requirements(*excluded) for s in base)


def address_cidr_selector(cidr: Network, excepts: Sequence[Network] = ()) -> LabelSelector:
    """Pod addresses inside `cidr` and not inside an except: the pod-address identities
    labelled with it (never world ones). A /0 is a label like any other here."""
    return LabelSelector(
        {_cidr_key(cidr): ""},
        [
            *(Requirement(_cidr_key(e), DOES_NOT_EXIST) for e in excepts),
            Requirement(_WORLD, DOES_NOT_EXIST),
        ],
    )


def cidr_selectors(
    cidr: Network, excepts: Sequence[Network], by_address: bool
) -> tuple[LabelSelector, ...]:
    world = world_cidr_selectors(cidr, excepts)
    return (*world, address_cidr_selector(cidr, excepts)) if by_address else world


def address_prefixes(policies: Iterable[Policy], cidr_match_mode: str = "world") -> set[Network]:
    """The prefixes (IPv4 and IPv6, /0 included) a pod address inside which needs a
    pod-address identity, labelled `cidr:Q` for each of them containing it."""
    _check_mode(cidr_match_mode)
    return {prefix for p in policies for prefix in p.address_prefixes(cidr_match_mode)}


def _check_mode(cidr_match_mode: str) -> None:
    if cidr_match_mode not in CIDR_MATCH_MODES:
        raise ValueError(
            f"cidr_match_mode must be one of {', '.join(CIDR_MATCH_MODES)}, not {cidr_match_mode!r}"
        )


def _never_address_identity(selector: LabelSelector) -> tuple[LabelSelector, ...]:
    """`selector`, kept from selecting pod-address identities (their labels are `cidr:`
    ones only). A selector needing a label no such identity has (a reserved one, a
    namespace, any non-`cidr:` key) is kept as it is; any other is split into one copy per
    label every other identity carries: a pod's namespace or a reserved name."""
    for req in selector.requirements():
        if req.operator not in (IN, EXISTS):
            continue
        source, key = split_key(req.key)
        if source not in (SOURCE_CIDR, SOURCE_ANY) or not _is_prefix(key):
            return (selector,)
        if req.operator == IN and "" not in req.values:
            return (selector,)
    namespace = f"{SOURCE_K8S}:{POD_NAMESPACE_KEY}"
    return (
        selector.with_requirements(Requirement(namespace, EXISTS)),
        *(
            selector.with_requirements(
                Requirement(namespace, DOES_NOT_EXIST),
                Requirement(f"{SOURCE_RESERVED}:{name}", EXISTS),
            )
            for name in RESERVED_NAMES.values()
        ),
    )


def _is_prefix(key: str) -> bool:
    try:
        parse_cidr(key)
    except ValueError:
        return False
    return True


def policy_subjects(policy: Policy, cidr_match_mode: str = "world") -> list[Subject]:
    """The policy's subjects. `cidr_match_mode` (`membrane agent run
    --policy-cidr-match-mode`): "world" (Cilium's reading: CiliumNetworkPolicy CIDR peers
    select world addresses only) or "all" (they also select pod addresses, as a
    NetworkPolicy ipBlock always does)."""
    _check_mode(cidr_match_mode)
    if policy.k8s_spec is not None:
        return [_k8s_subject(policy)]
    by_address = cidr_match_mode == "all"
    return [_cilium_subject(policy, i, by_address) for i in range(len(policy.cilium_specs))]


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
    selectors = tuple(s for p in peers for s in _k8s_peer(p, namespace))
    return FlatRule(ref, False, selectors, port_matches)


def _k8s_peer(peer: K8sPeer, namespace: str) -> tuple[LabelSelector, ...]:
    if peer.ip_block is not None:
        return cidr_selectors(peer.ip_block.cidr, peer.ip_block.except_ or (), by_address=True)
    selector = peer.pod_selector.to_selector() if peer.pod_selector else LabelSelector()
    if peer.namespace_selector is None:
        return (selector.with_requirements(_namespace_is(namespace)),)
    ns_prefix = f"{SOURCE_K8S}:{NAMESPACE_LABELS_PREFIX}"
    ns_selector = peer.namespace_selector.to_selector(key_prefix=ns_prefix)
    return (selector.with_requirements(*ns_selector.requirements(), _is_endpoint()),)


def _k8s_port(spec: K8sPortSpec) -> PortMatch:
    return _port_match(PROTOCOL_NUMBERS[spec.protocol or "TCP"], spec.port, spec.end_port)


def _port_match(proto: int, port: int | str | None, end_port: int | None) -> PortMatch:
    if isinstance(port, str):
        return NamedPort(proto, port)
    if not port:
        return PortRange(proto, *ALL_PORTS)
    return PortRange(proto, port, end_port or port)


# ---- CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy ----------------------------------


def _cilium_subject(policy: Policy, position: int, by_address: bool) -> Subject:
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
                rules.append(_cilium_rule(ref, rule, scope, by_address))
    return Subject(
        selector, spec.default_deny("ingress"), spec.default_deny("egress"), tuple(rules)
    )


def _cilium_rule(
    ref: RuleRef, rule: CiliumPeerRule, scope: str | None, by_address: bool
) -> FlatRule:
    ports = _cilium_ports(rule) if rule.has_l4() else None
    if not rule.has_peers():
        # Ports alone: every peer on those ports. Nothing at all: matches nothing. (A rule
        # naming only ignored peer fields has peers, none of which selects anything.)
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
        peers += _never_address_identity(selector)
    for cidr, excepts in rule.cidr_blocks():
        peers += cidr_selectors(cidr, excepts, by_address)
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
        matches += [PortRange(f.proto, f.icmp_type, f.icmp_type) for f in icmp.fields]
    return tuple(matches)


def _cilium_port(spec: PortProtocol) -> list[PortMatch]:
    protocol = spec.protocol or ANY_PROTOCOL
    if protocol in PORTLESS_PROTOCOLS:
        return [PortRange(PORTLESS_PROTOCOLS[protocol], *ALL_PORTS)]  # no ports to match
    protos = ANY_PROTOCOLS if protocol == ANY_PROTOCOL else (CILIUM_PROTOCOL_NUMBERS[protocol],)
    return [_port_match(proto, spec.port, spec.end_port) for proto in protos]
