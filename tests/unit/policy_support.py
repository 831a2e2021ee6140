"""A node's identities as the agent labels them (IPv4-only or dual-stack), and the
datapath's verdict for a pod peer that has a pod-address identity beside its own.

The label conventions (policy/rules.py):
- world identities: 2 {reserved:world} on an IPv4-only node; 9 {reserved:world-ipv4} and
  10 {reserved:world-ipv6} on a dual-stack one;
- a CIDR identity per policy prefix (not /0): {reserved:world, reserved:world-ipv4 or -ipv6,
  cidr:Q for every policy prefix Q containing it};
- a pod-address identity per pod or node address inside an address prefix
  (`address_prefixes`): {cidr:Q for every such prefix containing it}, nothing reserved.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network

from membrane.abi import Direction, Identity
from membrane.identity.labels import (
    RESERVED_LABELS,
    SOURCE_CIDR,
    Label,
    endpoint_labels,
    reserved_label,
)
from membrane.policy import (
    AllowLocalhost,
    EndpointInfo,
    EndpointPolicy,
    Universe,
    address_prefixes,
    lookup,
    policy_cidrs,
)
from membrane.policy.validate import Network

Address = IPv4Address | IPv6Address
# A pod-address identity is numbered from here (any free number does).
FIRST_ADDRESS_IDENTITY = Identity.FIRST_CIDR + 100_000
HOST_ADDRESSES = ("198.19.0.1", "2001:db8::1")  # the node's IPv4 and IPv6 addresses


def world_cidr_labels(prefix: Network, prefixes: Iterable[Network]) -> frozenset[Label]:
    family = "world-ipv4" if prefix.version == 4 else "world-ipv6"
    containing = [
        q
        for q in prefixes
        if q.version == prefix.version and prefix.subnet_of(q)  # type: ignore[arg-type]
    ]
    return frozenset(
        {
            reserved_label("world"),
            reserved_label(family),
            *(Label(SOURCE_CIDR, str(q)) for q in containing if q.prefixlen > 0),
        }
    )


def address_labels(address: Address, prefixes: Iterable[Network]) -> frozenset[Label]:
    return frozenset(
        Label(SOURCE_CIDR, str(q))
        for q in prefixes
        if q.version == address.version and address in q
    )


@dataclass(frozen=True)
class Pod:
    namespace: str
    name: str
    labels: Mapping[str, str]
    addresses: tuple[str, ...] = ()  # IPv4 and, on a dual-stack node, IPv6
    ports: Mapping[str, tuple[int, int]] | None = None


@dataclass(frozen=True)
class Peer:
    """Whom a flow is with: an identity, and for a pod its address and the pod-address
    identity of that address (None when no address prefix contains it)."""

    identity: int
    address: Address | None = None
    address_identity: int | None = None


@dataclass
class Node:
    universe: Universe
    pods: dict[str, EndpointInfo]  # "ns/name" -> endpoint
    peers: dict[str, Peer]  # "ns/name@address", a prefix, world names -> peer
    dual_stack: bool


def build_node(
    pods: Iterable[Pod],
    namespaces: Mapping[str, Mapping[str, str]],
    policies: list,
    *,
    dual_stack: bool,
    cidr_match_mode: str = "world",
    extra_cidrs: Iterable[str] = (),
    allow_localhost: AllowLocalhost = AllowLocalhost.POLICY,
) -> Node:
    world_prefixes = policy_cidrs(policies) | {ip_network(c) for c in extra_cidrs}
    by_address = address_prefixes(policies, cidr_match_mode)
    identities = dict(RESERVED_LABELS)
    endpoints: dict[str, EndpointInfo] = {}
    peers: dict[str, Peer] = {}
    by_labels: dict[frozenset[Label], int] = {}
    address_ids: dict[frozenset[Label], int] = {}
    for ep_id, pod in enumerate(pods, start=1):
        labels = endpoint_labels(pod.namespace, pod.labels, namespaces.get(pod.namespace, {}))
        identity = by_labels.setdefault(labels, Identity.FIRST_ENDPOINT + len(by_labels))
        identities[identity] = labels
        key = f"{pod.namespace}/{pod.name}"
        endpoints[key] = EndpointInfo(
            ep_id, pod.namespace, pod.name, identity, labels, dict(pod.ports or {})
        )
        peers[key] = Peer(identity)
        for text in pod.addresses:
            address = ip_address(text)
            if address.version == 6 and not dual_stack:
                continue
            found = address_labels(address, by_address)
            address_id = None
            if found:
                address_id = address_ids.setdefault(
                    found, FIRST_ADDRESS_IDENTITY + len(address_ids)
                )
                identities[address_id] = found
            peers[f"{key}@{address}"] = Peer(identity, address, address_id)
    cidr_identities = {}
    for n, prefix in enumerate(sorted(world_prefixes, key=lambda p: (p.version, p))):
        if prefix.prefixlen == 0:
            continue
        identity = Identity.FIRST_CIDR + n
        cidr_identities[identity] = prefix
        identities[identity] = world_cidr_labels(prefix, world_prefixes)
        peers[str(prefix)] = Peer(identity)
    if dual_stack:
        del identities[Identity.WORLD]  # unused: 9 and 10 stand for world
        peers.update(world4=Peer(Identity.WORLD_IPV4), world6=Peer(Identity.WORLD_IPV6))
    else:
        del identities[Identity.WORLD_IPV4], identities[Identity.WORLD_IPV6]
        peers.update(world4=Peer(Identity.WORLD))
    for text in HOST_ADDRESSES[: 2 if dual_stack else 1]:  # the node's, as the agent has them
        address = ip_address(text)
        found = address_labels(address, by_address)
        address_id = None
        if found:
            address_id = address_ids.setdefault(found, FIRST_ADDRESS_IDENTITY + len(address_ids))
            identities[address_id] = found
        peers[f"host@{address}"] = Peer(Identity.HOST, address, address_id)
    for identity, name in (
        (Identity.HOST, "host"),
        (Identity.REMOTE_NODE, "remote-node"),
        (Identity.KUBE_APISERVER, "kube-apiserver"),
        (Identity.INGRESS, "ingress"),
        (Identity.HEALTH, "health"),
        (Identity.INIT, "init"),
        (Identity.UNMANAGED, "unmanaged"),
    ):
        peers[name] = Peer(identity)
    universe = Universe(
        identities,
        {e.ep_id: e for e in endpoints.values()},
        cidr_identities,
        allow_localhost,
        cidr_match_mode,
    )
    return Node(universe, endpoints, peers, dual_stack)


def datapath_verdict(
    policy: EndpointPolicy, direction: Direction, peer: Peer, proto: int, port: int
) -> tuple[bool, int]:
    """(allowed, rule_id) as the datapath decides for a peer, with its pod-address
    identity when it has one (membrane.datapath.policy_entries.lookup, the model of
    bpf/lib/policy.h)."""
    return lookup(policy, direction, peer.identity, proto, port, peer.address_identity or 0)
