"""What the compiler and the reference evaluator know about the node: its endpoints, every
identity a peer can have, and whether the node itself passes policy."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from ipaddress import IPv4Network, IPv6Network

from membrane.identity.labels import Label


class AllowLocalhost(StrEnum):
    """Whether the node's own traffic with its pods is subject to their policy
    (`membrane agent run --allow-localhost`)."""

    # Kubernetes: traffic to and from the node where a pod runs is always allowed (kubelet
    # probes). Default deny never applies to the host; deny rules still do, as in Cilium.
    ALWAYS = "always"
    POLICY = "policy"  # the host is a peer like any other


@dataclass(frozen=True)
class EndpointInfo:
    """An endpoint on this node."""

    ep_id: int
    namespace: str
    name: str
    identity: int
    labels: frozenset[Label]  # its identity's labels
    named_ports: dict[str, tuple[int, int]]  # name -> (port, ipproto)


@dataclass(frozen=True)
class Universe:
    """Every known identity (reserved ones, endpoint, pod-address and CIDR ones) with its
    labels. CIDR identities' labels come from `cidr_identity_labels` over the policies'
    prefixes, pod-address ones from membrane.agent.addresses."""

    identities: dict[int, frozenset[Label]]
    endpoints: dict[int, EndpointInfo]  # by ep_id
    cidr_identities: dict[int, IPv4Network | IPv6Network]  # identity -> prefix
    allow_localhost: AllowLocalhost = AllowLocalhost.ALWAYS
    # What CiliumNetworkPolicy CIDR peers select: "world" addresses, or "all" (pod
    # addresses too; `membrane agent run --policy-cidr-match-mode`)
    cidr_match_mode: str = "world"
