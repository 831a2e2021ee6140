"""One endpoint's policy as the datapath holds it, and the datapath's lookup in Python.

Each PolicyEntry is one key of the `policy` LPM trie (bpf/abi/endpoint.h, struct
policy_key) with its verdict. `lookup` decides a packet step for step as bpf/lib/policy.h
does, so the compiler, tests and `policy trace` can ask what the kernel will do. Pure
Python, nothing of the kernel side: the policy compiler builds these without loading BPF.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import NamedTuple

from membrane.abi import Direction, Identity

PORT_BITS = 16
_ANY_PEER = Identity.ANY.value  # a plain int: compared with every entry of a lookup
# The mask of the top n bits of a port, by n (an entry's port_bits).
PORT_MASKS = tuple((0xFFFF << (PORT_BITS - bits)) & 0xFFFF for bits in range(PORT_BITS + 1))


class PolicyEntry(NamedTuple):
    """One policy key and its verdict. A NamedTuple: the compiler makes and the writer
    converts tens of thousands per change, and tuples are the cheapest to build and hash.

    proto 0 means every protocol (then port and port_bits are 0); port_bits is the length
    of the port prefix (16: exactly `port`, 0: every port). ICMP entries carry the ICMP
    type as the port."""

    direction: Direction
    identity: int  # Identity.ANY (0): any peer
    proto: int  # IP protocol number, 0 = every protocol
    port: int  # host order
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
        return self.proto == proto and (port ^ self.port) & PORT_MASKS[self.port_bits] == 0

    @property
    def length(self) -> int:
        """Orders matches like the trie's prefix length does."""
        return 0 if self.proto == 0 else 1 + self.port_bits


@dataclass(frozen=True, slots=True)
class EndpointPolicy:
    """Everything the datapath needs to enforce one endpoint's policy."""

    enforce_ingress: bool  # default deny for traffic to the endpoint
    enforce_egress: bool
    entries: Collection[PolicyEntry] = frozenset()

    def enforces(self, direction: Direction) -> bool:
        return self.enforce_ingress if direction == Direction.INGRESS else self.enforce_egress


def lookup(
    policy: EndpointPolicy,
    direction: Direction,
    peer_identity: int,
    proto: int,
    port: int,
    addr_identity: int = 0,
) -> tuple[bool, int]:
    """(allowed, rule_id) as the datapath decides: the longest match for the peer's
    identity, for its address's own identity (`addr_identity`, 0: none) and for any peer;
    a deny in any wins, else an allow in any (in that order), else the direction's default
    (rule 0)."""
    wanted = (peer_identity, addr_identity or None, _ANY_PEER)
    best: list[PolicyEntry | None] = [None, None, None]
    for entry in policy.entries:  # one pass for every lookup; the identity rules most out
        identity = entry.identity
        if identity not in wanted:
            continue
        if entry.direction != direction or not entry.covers(proto, port):
            continue
        for i, ident in enumerate(wanted):
            if identity == ident and (best[i] is None or entry.length > best[i].length):
                best[i] = entry
    matches = [m for m in best if m is not None]
    for match in matches:
        if match.deny:
            return False, match.rule_id
    if matches:
        return True, matches[0].rule_id
    return not policy.enforces(direction), 0
