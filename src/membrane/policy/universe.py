"""What the compiler and the reference evaluator know about the node: its endpoints and
every identity a peer can have."""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Network

from membrane.identity.labels import Label


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
    """Every known identity (reserved 1..6, endpoint and CIDR ones) with its labels. CIDR
    identities' labels come from `cidr_identity_labels` over the policies' prefixes."""

    identities: dict[int, frozenset[Label]]
    endpoints: dict[int, EndpointInfo]  # by ep_id
    cidr_identities: dict[int, IPv4Network]  # identity -> prefix
