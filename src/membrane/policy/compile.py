"""Policies -> each endpoint's policy map entries.

Every rule of every policy selecting an endpoint becomes entries (peer identity, protocol,
port prefix) -> allow/deny. The entries are then made such that the datapath's
longest-prefix lookup (`entries.lookup`) gives the rules' meaning: within one identity the
longest match must be a deny wherever any deny of that identity applies, so an allow lying
inside a broader deny is dropped (the deny is then the longest match there). Allows inside
broader allows, and denies inside broader denies, add nothing and are dropped too. Denies
of one identity against allows of another (or of "any peer") need nothing: the lookup
consults both and lets a deny win.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from ipaddress import IPv4Network

from membrane.identity.labels import IDENTITY_ANY
from membrane.policy.entries import (
    DIRECTIONS,
    EP_DIR_EGRESS,
    EP_DIR_INGRESS,
    EndpointPolicy,
    PolicyEntry,
    lookup,
)
from membrane.policy.model import Policy
from membrane.policy.ports import port_blocks, port_mask
from membrane.policy.rules import FlatRule, PortRange, Subject, policy_subjects
from membrane.policy.ruletable import RuleRef, RuleTable
from membrane.policy.universe import EndpointInfo, Universe

__all__ = [
    "EP_DIR_EGRESS",
    "EP_DIR_INGRESS",
    "EndpointInfo",
    "EndpointPolicy",
    "PolicyEntry",
    "RuleRef",
    "RuleTable",
    "Universe",
    "compile_policies",
    "lookup",
    "policy_cidrs",
]

_Key = tuple[int, int, int, int, int]  # direction, identity, proto, port, port_bits
_Verdict = tuple[bool, int]  # deny, rule_id


def policy_cidrs(policies: Iterable[Policy]) -> set[IPv4Network]:
    """Every prefix that needs a CIDR identity (cidrs and excepts). 0.0.0.0/0 needs none:
    the world identity, which the ipcache gives every address no other prefix covers,
    stands for it."""
    return {prefix for p in policies for prefix in p.prefixes() if prefix.prefixlen > 0}


def compile_policies(
    policies: Iterable[Policy], universe: Universe, rules: RuleTable
) -> dict[int, EndpointPolicy]:
    """The policy of every endpoint in the universe, by ep_id."""
    subjects = [s for p in policies for s in policy_subjects(p)]
    peer_cache: dict[RuleRef, tuple[int, ...]] = {}
    return {
        ep_id: _compile_endpoint(ep, subjects, universe, rules, peer_cache)
        for ep_id, ep in universe.endpoints.items()
    }


def _compile_endpoint(
    ep: EndpointInfo,
    subjects: list[Subject],
    universe: Universe,
    rules: RuleTable,
    peer_cache: dict[RuleRef, tuple[int, ...]],
) -> EndpointPolicy:
    enforce = {EP_DIR_INGRESS: False, EP_DIR_EGRESS: False}
    table: dict[_Key, _Verdict] = {}
    for subject in subjects:
        if not subject.selector.matches(ep.labels):
            continue
        enforce[EP_DIR_INGRESS] |= subject.enforce_ingress
        enforce[EP_DIR_EGRESS] |= subject.enforce_egress
        for rule in subject.rules:
            rule_id = rules.id_for(rule.ref)
            if rule.ref not in peer_cache:
                peer_cache[rule.ref] = _peer_identities(rule, universe)
            direction = DIRECTIONS[rule.ref.direction]
            for identity in peer_cache[rule.ref]:
                for proto, port, bits in _port_keys(rule, ep, identity, universe):
                    _add(table, (direction, identity, proto, port, bits), rule.ref.deny, rule_id)
    entries = frozenset(
        PolicyEntry(*key, deny, rule_id)
        for key, (deny, rule_id) in table.items()
        if not _shadowed(key, deny, table)
    )
    return EndpointPolicy(enforce[EP_DIR_INGRESS], enforce[EP_DIR_EGRESS], entries)


def _peer_identities(rule: FlatRule, universe: Universe) -> tuple[int, ...]:
    if rule.any_peer:
        return (IDENTITY_ANY,)
    return tuple(
        sorted(
            identity
            for identity, labels in universe.identities.items()
            if any(selector.matches(labels) for selector in rule.peers)
        )
    )


def _port_keys(
    rule: FlatRule, ep: EndpointInfo, identity: int, universe: Universe
) -> Iterator[tuple[int, int, int]]:
    """(proto, port, port_bits) prefixes of the rule's ports for one peer identity."""
    if rule.ports is None:
        yield (0, 0, 0)
        return
    for match in rule.ports:
        if isinstance(match, PortRange):
            for port, bits in port_blocks(match.first, match.last):
                yield (match.proto, port, bits)
            continue
        for port in _named_port_numbers(rule, ep, identity, universe, match.name, match.proto):
            yield (match.proto, port, 16)


def _named_port_numbers(
    rule: FlatRule, ep: EndpointInfo, identity: int, universe: Universe, name: str, proto: int
) -> set[int]:
    """Ingress: the subject's own port of that name. Egress: the port of that name on the
    peer's endpoints (every endpoint, for a rule matching any peer)."""
    if rule.ref.direction == "ingress":
        owners: Iterable[EndpointInfo] = [ep]
    elif identity == IDENTITY_ANY:
        owners = universe.endpoints.values()
    else:
        owners = [e for e in universe.endpoints.values() if e.identity == identity]
    ports = set()
    for owner in owners:
        found = owner.named_ports.get(name)
        if found is not None and found[1] == proto:
            ports.add(found[0])
    return ports


def _add(table: dict[_Key, _Verdict], key: _Key, deny: bool, rule_id: int) -> None:
    """One key, one verdict: a deny beats an allow, then the lower rule id."""
    old = table.get(key)
    if old is None or (deny, -rule_id) > (old[0], -old[1]):
        table[key] = (deny, rule_id)


def _broader(key: _Key) -> Iterator[_Key]:
    """The keys of the same identity whose prefix strictly contains `key`'s."""
    direction, identity, proto, port, bits = key
    if proto == 0:
        return
    yield (direction, identity, 0, 0, 0)
    for shorter in range(bits):
        yield (direction, identity, proto, port & port_mask(shorter), shorter)


def _shadowed(key: _Key, deny: bool, table: dict[_Key, _Verdict]) -> bool:
    """Whether a broader entry of the same identity already decides every packet this one
    would: a broader deny always does; a broader allow does for an allow."""
    for broader in _broader(key):
        verdict = table.get(broader)
        if verdict is not None and (verdict[0] or not deny):
            return True
    return False
