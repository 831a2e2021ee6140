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
    - each endpoint's result, by the subjects selecting it and its named ports, dropped
      when a rule of one of those subjects gets other peers (or when the named ports that
      egress rules resolve against change)."""

    def __init__(self) -> None:
        self._subjects: dict[int, tuple[Policy, list[tuple[int, Subject]]]] = {}
        self._serial = 0
        self.results: dict[tuple, EndpointPolicy] = {}
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
            for subject in policy_subjects(policy):
                self._serial += 1
                numbered.append((self._serial, subject))
            cached = (policy, numbered)
            self._subjects[id(policy)] = cached
        return cached[1]

    def start(self, policies: list[Policy], universe: Universe) -> None:
        live = {id(p) for p in policies}
        for key in [k for k in self._subjects if k not in live]:
            for _, subject in self._subjects.pop(key)[1]:
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
        elif dirty:
            self.results = {k: v for k, v in self.results.items() if dirty.isdisjoint(k[0])}

    def _update_identities(self, identities: Mapping[int, frozenset]) -> set[int]:
        """Bring the identity index and every cached rule's peers up to date; returns the
        serials of the subjects whose rules got other peers."""
        old = self._labels
        if old == identities:
            return set()
        changed = [i for i in old.keys() | identities.keys() if old.get(i) != identities.get(i)]
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
    cache = cache or CompileCache()
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
    cache.results = results
    return result


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
        enforce_ingress = enforce_egress = False
        table: dict[_Key, _Verdict] = {}
        for serial, subject in subjects:
            enforce_ingress |= subject.enforce_ingress
            enforce_egress |= subject.enforce_egress
            for rule in subject.rules:
                rule_id = self.rules.id_for(rule.ref)
                direction = Direction[rule.ref.direction.upper()]
                for identity in self.cache.peers(rule, serial):
                    for proto, port, bits in self.port_keys(rule, ep, identity):
                        key = (direction, identity, proto, port, bits)
                        _add(table, key, rule.ref.deny, rule_id)
        if self.allow_localhost:
            for direction, enforced in (
                (Direction.INGRESS, enforce_ingress),
                (Direction.EGRESS, enforce_egress),
            ):
                if enforced:
                    self.allow_host(table, direction)
        return EndpointPolicy(enforce_ingress, enforce_egress, _minimal_entries(table))

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
