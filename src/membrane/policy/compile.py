"""Policies -> each endpoint's policy map entries.

Every rule of every policy selecting an endpoint becomes entries (peer identity, protocol,
port prefix) -> allow/deny. The entries are then made such that the datapath's
longest-prefix lookup (membrane.datapath.policy_entries.lookup) gives the rules' meaning:
within one identity the longest match must be a deny wherever any deny of that identity
applies, so an allow lying inside a broader deny is dropped (the deny is then the longest
match there). Allows inside broader allows, and denies inside broader denies, add nothing
and are dropped too. Denies of one identity against allows of another (or of "any peer")
need nothing: the lookup consults both and lets a deny win.

With `--allow-localhost=always` (Universe.allow_localhost) every endpoint in default deny in a
direction gets one more allow there: the host identity, every protocol and port. Denies of
the host (an entity `host` or `all`, a deny of any peer on some ports) still win, as in
Cilium, where the allow-localhost entry never replaces a deny.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from ipaddress import IPv4Network
from typing import NamedTuple

from membrane.abi import Direction, Identity
from membrane.datapath.policy_entries import PORT_MASKS, EndpointPolicy, PolicyEntry
from membrane.identity.selector import LabelIndex, SelectorIndex
from membrane.policy.model import Policy
from membrane.policy.ports import port_blocks
from membrane.policy.rules import FlatRule, PortRange, Subject, policy_subjects
from membrane.policy.ruletable import RuleRef, RuleTable, allow_localhost_rule
from membrane.policy.universe import AllowLocalhost, EndpointInfo, Universe

__all__ = [
    "CompileCache",
    "EndpointInfo",
    "RuleRef",
    "RuleTable",
    "Universe",
    "compile_policies",
    "policy_cidrs",
]

_Key = tuple[Direction, int, int, int, int]  # direction, identity, proto, port, port_bits
_Verdict = tuple[bool, int]  # deny, rule_id
_ANY_PEER = Identity.ANY  # bound once: used per rule and per endpoint
# Endpoint policies kept after their last endpoint left: enough for pods being replaced
# one at a time.
RETAINED_RESULTS = 4
_HOST = Identity.HOST


def policy_cidrs(policies: Iterable[Policy]) -> set[IPv4Network]:
    """Every prefix that needs a CIDR identity (cidrs and excepts). 0.0.0.0/0 needs none:
    the world identity, which the ipcache gives every address no other prefix covers,
    stands for it."""
    return {prefix for p in policies for prefix in p.prefixes() if prefix.prefixlen > 0}


class CompileCache:
    """What a long-lived caller (the agent) keeps between compiles, so that a change costs
    what it changes:

    - each policy's subjects, known by serial numbers never reused (an object id may be);
    - each rule's peer identities, updated for the identities that changed (an index of
      the rules' selectors finds the rules that may match one), not searched again;
    - each subject's part of an endpoint's entries, by the subject and the endpoint's
      named ports, so a new policy compiles only itself and is merged with the others'
      parts (a one-rule policy beside 10,000 rules costs one rule, not 10,001);
    - each endpoint's result, by the subjects selecting it and its named ports.
    Parts and results are dropped when a rule of their subjects gets other peers (all of
    them when the named ports that egress rules resolve against change)."""

    def __init__(self, cidr_match_mode: str = "world") -> None:
        self.cidr_match_mode = cidr_match_mode  # see policy_subjects
        self._subjects: dict[int, tuple[Policy, list[tuple[int, Subject]]]] = {}
        self._serial = 0
        self.results: dict[tuple, EndpointPolicy] = {}
        self.parts: dict[tuple[int, tuple], _Part] = {}  # (serial, named ports) -> part
        self.identities = LabelIndex({})
        self._labels: dict[int, frozenset] = {}  # the identities `identities` holds
        # id(rule) -> (rule, its subject's serial, peer identities, the same sorted)
        self._peers: dict[int, tuple[FlatRule, int, set[int], tuple[int, ...]]] = {}
        self._rule_selectors = SelectorIndex()
        self._port_owners: tuple | None = None
        self._allow_localhost: AllowLocalhost | None = None

    def subjects_of(self, policy: Policy) -> list[tuple[int, Subject]]:
        cached = self._subjects.get(id(policy))
        if cached is None or cached[0] is not policy:
            numbered = []
            for subject in policy_subjects(policy, cidr_match_mode=self.cidr_match_mode):
                self._serial += 1
                numbered.append((self._serial, subject))
            cached = (policy, numbered)
            self._subjects[id(policy)] = cached
        return cached[1]

    def start(self, policies: list[Policy], universe: Universe) -> None:
        live = {id(p) for p in policies}
        gone: set[int] = set()
        for key in [k for k in self._subjects if k not in live]:
            for serial, subject in self._subjects.pop(key)[1]:
                gone.add(serial)
                for rule in subject.rules:
                    self._forget(rule)
        dirty = self._update_identities(universe.identities)
        port_owners = tuple(
            (ep.ep_id, ep.identity, tuple(sorted(ep.named_ports.items())))
            for ep in universe.endpoints.values()
            if ep.named_ports
        )
        if (port_owners, universe.allow_localhost) != (self._port_owners, self._allow_localhost):
            self._port_owners, self._allow_localhost = port_owners, universe.allow_localhost
            self.results.clear()
            self.parts.clear()
            return
        if dirty or gone:
            stale = dirty | gone
            self.results = {k: v for k, v in self.results.items() if stale.isdisjoint(k[0])}
            self.parts = {k: v for k, v in self.parts.items() if k[0] not in stale}

    def _update_identities(self, identities: Mapping[int, frozenset]) -> set[int]:
        """Bring the identity index and every cached rule's peers up to date; returns the
        serials of the subjects whose rules got other peers."""
        old = self._labels
        if old == identities:
            return set()
        # Set operations on the items run in C (label sets cache their hashes).
        changed = {ident for ident, _ in old.items() ^ identities.items()}
        dirty: set[int] = set()
        for ident in changed:
            labels = identities.get(ident)
            if labels is None:
                self.identities.remove(ident)
            else:
                self.identities.add(ident, labels)
            affected = self._rule_selectors.candidates(old.get(ident, ()))
            affected |= self._rule_selectors.candidates(labels or ())
            for rule_key in affected:
                rule, serial, members, _ = self._peers[rule_key]
                matches = labels is not None and any(s.matches(labels) for s in rule.peers)
                if matches != (ident in members):
                    (members.add if matches else members.discard)(ident)
                    self._peers[rule_key] = (rule, serial, members, tuple(sorted(members)))
                    dirty.add(serial)
        self._labels = dict(identities)
        return dirty

    def peers(self, rule: FlatRule, serial: int) -> tuple[int, ...]:
        """The identities a rule's peers select (Identity.ANY alone for any peer)."""
        cached = self._peers.get(id(rule))
        if cached is None or cached[0] is not rule:
            if rule.any_peer:
                found: set[int] = {_ANY_PEER}
            else:
                found = set().union(*(self.identities.select(s) for s in rule.peers))
                self._rule_selectors.add(id(rule), rule.peers)
            cached = (rule, serial, found, tuple(sorted(found)))
            self._peers[id(rule)] = cached
        return cached[3]

    def _forget(self, rule: FlatRule) -> None:
        cached = self._peers.get(id(rule))
        if cached is not None and cached[0] is rule:
            del self._peers[id(rule)]
            self._rule_selectors.remove(id(rule))


def compile_policies(
    policies: Iterable[Policy],
    universe: Universe,
    rules: RuleTable,
    cache: CompileCache | None = None,
) -> dict[int, EndpointPolicy]:
    """The policy of every endpoint in the universe, by ep_id."""
    policies = list(policies)
    cache = cache or CompileCache(universe.cidr_match_mode)
    cache.start(policies, universe)
    numbered = [n for p in policies for n in cache.subjects_of(p)]
    endpoints = LabelIndex({ep_id: ep.labels for ep_id, ep in universe.endpoints.items()})
    selecting: dict[int, list[tuple[int, Subject]]] = {ep_id: [] for ep_id in universe.endpoints}
    for serial, subject in numbered:
        for ep_id in endpoints.select(subject.selector):
            selecting[ep_id].append((serial, subject))
    compilation: _Compilation | None = None
    result: dict[int, EndpointPolicy] = {}
    results: dict[tuple, EndpointPolicy] = {}
    for ep_id, ep in universe.endpoints.items():
        # Endpoints selected by the same specs, with the same named ports, get the same
        # policy (replicas of one workload): compile it once.
        key = (tuple(n for n, _ in selecting[ep_id]), tuple(sorted(ep.named_ports.items())))
        found = results.get(key) or cache.results.get(key)
        if found is None:
            compilation = compilation or _Compilation(universe, rules, cache)
            found = compilation.endpoint(ep, selecting[ep_id])
        results[key] = result[ep_id] = found
    # The last few results no endpoint has now stay: a replaced pod gets the very same
    # policy object back, which the datapath writer has compiled already.
    # (Unused ones first, so the ones that leave next are kept over older ones.)
    unused = [k for k in cache.results if k not in results]  # oldest first
    cache.results = {k: cache.results[k] for k in unused[-RETAINED_RESULTS:]} | results
    return result


class _Part(NamedTuple):
    """One subject's share of an endpoint's policy."""

    enforce_ingress: bool
    enforce_egress: bool
    table: dict[_Key, _Verdict]
    groups: frozenset[tuple[int, int]]  # (direction, peer identity) of its keys
    entries: frozenset[PolicyEntry]  # the table made minimal


class _Compilation:
    """What one compile shares between endpoints: the endpoints holding each identity's
    named ports (rules' peers come from the cache)."""

    def __init__(self, universe: Universe, rules: RuleTable, cache: CompileCache) -> None:
        self.rules = rules
        self.cache = cache
        self.allow_localhost = universe.allow_localhost == AllowLocalhost.ALWAYS
        self.port_owners: dict[int, list[EndpointInfo]] = {_ANY_PEER: []}
        for ep in universe.endpoints.values():
            self.port_owners.setdefault(ep.identity, []).append(ep)
            self.port_owners[_ANY_PEER].append(ep)  # an any-peer rule: every endpoint

    def endpoint(self, ep: EndpointInfo, subjects: list[tuple[int, Subject]]) -> EndpointPolicy:
        """The subjects' parts, merged: a (direction, peer identity) group that one part
        alone holds keeps that part's entries; groups several parts hold (and the host's,
        under allow-localhost) are merged and made minimal again (the minimal form only
        looks within a group)."""
        ports = tuple(sorted(ep.named_ports.items()))
        parts = [self.part(serial, subject, ep, ports) for serial, subject in subjects]
        enforce_ingress = any(p.enforce_ingress for p in parts)
        enforce_egress = any(p.enforce_egress for p in parts)
        hosts = []
        if self.allow_localhost:
            hosts = [
                direction
                for direction, enforced in (
                    (Direction.INGRESS, enforce_ingress),
                    (Direction.EGRESS, enforce_egress),
                )
                if enforced
            ]
        if len(parts) == 1 and not hosts:
            return EndpointPolicy(enforce_ingress, enforce_egress, parts[0].entries)
        seen: set[tuple[int, int]] = set()
        shared = {(direction, _HOST) for direction in hosts}
        for part in parts:
            shared |= seen & part.groups
            seen |= part.groups
        entries = set().union(*(p.entries for p in parts))
        if shared:
            merged: dict[_Key, _Verdict] = {}
            for part in parts:
                if part.groups.isdisjoint(shared):
                    continue
                entries.difference_update([e for e in part.entries if e[:2] in shared])
                for key, (deny, rule_id) in part.table.items():
                    if key[:2] in shared:
                        _add(merged, key, deny, rule_id)
            for direction in hosts:
                self.allow_host(merged, direction)
            entries.update(_minimal_entries(merged))
        return EndpointPolicy(enforce_ingress, enforce_egress, frozenset(entries))

    def part(self, serial: int, subject: Subject, ep: EndpointInfo, ports: tuple) -> _Part:
        """One subject's entries for an endpoint with these named ports, cached."""
        found = self.cache.parts.get((serial, ports))
        if found is not None:
            return found
        table: dict[_Key, _Verdict] = {}
        for rule in subject.rules:
            rule_id = self.rules.id_for(rule.ref)
            direction = Direction[rule.ref.direction.upper()]
            for identity in self.cache.peers(rule, serial):
                for proto, port, bits in self.port_keys(rule, ep, identity):
                    _add(table, (direction, identity, proto, port, bits), rule.ref.deny, rule_id)
        found = _Part(
            subject.enforce_ingress,
            subject.enforce_egress,
            table,
            frozenset(key[:2] for key in table),
            _minimal_entries(table),
        )
        self.cache.parts[(serial, ports)] = found
        return found

    def allow_host(self, table: dict[_Key, _Verdict], direction: Direction) -> None:
        """The host on every protocol and port, unless a deny holds that key. It takes the
        key from a policy's allow of the host, so flows name allow-localhost as what let
        the node through."""
        key = (direction, _HOST, 0, 0, 0)
        old = table.get(key)
        if old is None or not old[0]:
            rule = allow_localhost_rule(direction.name.lower())
            table[key] = (False, self.rules.id_for(rule))

    def port_keys(
        self, rule: FlatRule, ep: EndpointInfo, identity: int
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
            # Named ports: the subject's own on ingress, the peer's on egress.
            owners = [ep] if rule.ref.direction == "ingress" else self.port_owners.get(identity, [])
            for owner in owners:
                found = owner.named_ports.get(match.name)
                if found is not None and found[1] == match.proto:
                    yield (match.proto, found[0], 16)


def _add(table: dict[_Key, _Verdict], key: _Key, deny: bool, rule_id: int) -> None:
    """One key, one verdict: a deny beats an allow, then the lower rule id."""
    old = table.get(key)
    if old is None or (deny, -rule_id) > (old[0], -old[1]):
        table[key] = (deny, rule_id)


def _minimal_entries(table: dict[_Key, _Verdict]) -> frozenset[PolicyEntry]:
    """The entries that decide something: a key lying inside a broader key of the same
    identity is dropped when that broader key is a deny (it decides every packet there) or
    when both are allows. Only prefix lengths that occur are tried as broader keys."""
    lengths: dict[tuple[int, int, int], set[int]] = {}
    for direction, identity, proto, _, bits in table:
        lengths.setdefault((direction, identity, proto), set()).add(bits)
    ordered = {group: sorted(found) for group, found in lengths.items()}
    kept = []
    for key, (deny, rule_id) in table.items():
        direction, identity, proto, port, bits = key
        if proto:
            broader = [(direction, identity, 0, 0, 0)]
            for shorter in ordered[(direction, identity, proto)]:
                if shorter >= bits:
                    break
                broader.append((direction, identity, proto, port & PORT_MASKS[shorter], shorter))
            if any(_overrides(table.get(other), deny) for other in broader):
                continue
        kept.append(PolicyEntry(*key, deny, rule_id))
    return frozenset(kept)


def _overrides(broader: _Verdict | None, deny: bool) -> bool:
    """Whether a broader entry decides every packet of a narrower one: a deny always does,
    an allow does for an allow."""
    return broader is not None and (broader[0] or not deny)
