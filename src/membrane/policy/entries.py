"""The datapath's policy map as Python sees it, and its lookup.

Each PolicyEntry is one key of the per-endpoint LPM trie (bpf/abi/endpoint.h, struct
policy_key). `lookup` is the datapath's decision, step for step, so tests and `policy trace`
can ask what the kernel will do with a packet.
"""

from __future__ import annotations

from dataclasses import dataclass

from membrane.identity.labels import IDENTITY_ANY
from membrane.policy.ports import port_mask

EP_DIR_INGRESS = 0
EP_DIR_EGRESS = 1
DIRECTIONS = {"ingress": EP_DIR_INGRESS, "egress": EP_DIR_EGRESS}


@dataclass(frozen=True, order=True)
class PolicyEntry:
    direction: int  # EP_DIR_*
    identity: int  # IDENTITY_ANY (0) = any peer
    proto: int  # 0 = every protocol (then port = port_bits = 0)
    port: int  # host order; ICMP: the type
    port_bits: int  # 0..16: how many top bits of the port must match
    deny: bool
    rule_id: int

    @property
    def prefix(self) -> tuple[int, int, int, int, int]:
        """The trie key without the verdict."""
        return (self.direction, self.identity, self.proto, self.port, self.port_bits)

    def covers(self, proto: int, port: int) -> bool:
        if self.proto == 0:
            return True
        return self.proto == proto and (port ^ self.port) & port_mask(self.port_bits) == 0

    @property
    def length(self) -> int:
        """Orders matches like the trie's prefix length does."""
        return 0 if self.proto == 0 else 1 + self.port_bits


@dataclass(frozen=True)
class EndpointPolicy:
    enforce_ingress: bool  # default deny in the direction
    enforce_egress: bool
    entries: frozenset[PolicyEntry]

    def enforces(self, direction: int) -> bool:
        return self.enforce_ingress if direction == EP_DIR_INGRESS else self.enforce_egress


def _longest(
    policy: EndpointPolicy, direction: int, identity: int, proto: int, port: int
) -> PolicyEntry | None:
    best: PolicyEntry | None = None
    for entry in policy.entries:
        if (
            entry.direction == direction
            and entry.identity == identity
            and entry.covers(proto, port)
            and (best is None or entry.length > best.length)
        ):
            best = entry
    return best


def lookup(
    policy: EndpointPolicy, direction: int, peer_identity: int, proto: int, port: int
) -> tuple[bool, int]:
    """(allowed, rule_id) as the datapath decides: the longest match for the peer's
    identity and the longest for any peer; a deny in either wins, else an allow in either
    (the peer's own first), else the direction's default (rule 0)."""
    matches = [
        m
        for m in (
            _longest(policy, direction, peer_identity, proto, port),
            _longest(policy, direction, IDENTITY_ANY, proto, port),
        )
        if m is not None
    ]
    for match in matches:
        if match.deny:
            return False, match.rule_id
    if matches:
        return True, matches[0].rule_id
    return not policy.enforces(direction), 0
