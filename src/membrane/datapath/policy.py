"""Policy into the datapath: compiled entries become `policy` LPM keys, and endpoint
policies are switched with the generation protocol of bpf/abi/endpoint.h.

A switch never has a moment where traffic passes that neither the old nor the new policy
allows: the new generation is written beside the live one, then every affected endpoint
requires both ({old, new}), then only the new one ({new, new}), and only then is the old
generation deleted. Which generation is live is always read from the `endpoints` map,
and the writer learns which entries exist by reading the `policy` map, so a restarted
agent (or one that died halfway through a switch) picks up exactly where the maps are.
One writer per node maps: it caches the policy map's keys after its first read.
"""

from __future__ import annotations

import secrets
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, NamedTuple, Protocol

from membrane.datapath.abi import (
    POLICY_KEY_FIXED_BITS,
    POLICY_KEY_PROTO_BITS,
    Direction,
)
from membrane.datapath.conntrack import flush_endpoint
from membrane.datapath.nodemaps import NodeMaps


class PolicyEntryLike(Protocol):
    """What the compiler (membrane.policy.compile.PolicyEntry) hands over. proto 0 means
    every protocol (then port_bits must be 0); port_bits is the length of the port prefix
    (16: exactly `port`, 0: every port). ICMP rules carry the ICMP type as the port."""

    direction: Any  # Direction, 0/1, "ingress"/"egress" or an enum of those
    identity: int
    proto: int
    port: int
    port_bits: int
    deny: bool
    rule_id: int


class EndpointPolicyLike(Protocol):
    """One endpoint's policy as the compiler hands it over (membrane.policy.entries)."""

    enforce_ingress: bool
    enforce_egress: bool
    entries: Iterable[PolicyEntryLike]


@dataclass(frozen=True)
class EndpointPolicy:
    """Everything the datapath needs to enforce one endpoint's policy."""

    enforce_ingress: bool  # default deny for traffic to the endpoint
    enforce_egress: bool
    entries: Sequence[PolicyEntryLike] = ()


def enforce_bits(policy: EndpointPolicyLike) -> int:
    """endpoint_state.enforce: bit (1 << dir) set = default deny in that direction."""
    return (int(policy.enforce_ingress) << Direction.INGRESS) | (
        int(policy.enforce_egress) << Direction.EGRESS
    )


class Slot(NamedTuple):
    """A policy key without endpoint and generation (dport in host order)."""

    prefixlen: int
    direction: int
    identity: int
    proto: int
    port: int


class Verdict(NamedTuple):
    rule_id: int
    deny: bool


Entries = dict[Slot, Verdict]


_DIRECTIONS = {0: Direction.INGRESS, 1: Direction.EGRESS}


def direction_of(value: Any) -> Direction:
    if type(value) is int and value in _DIRECTIONS:
        return _DIRECTIONS[value]  # the common case, without an Enum call per entry
    if isinstance(value, Enum) and not isinstance(value, int | str):
        value = value.value
    if isinstance(value, str):
        try:
            return Direction[value.upper()]
        except KeyError:
            raise ValueError(f"direction must be ingress or egress, not {value!r}") from None
    return Direction(int(value))


def slot_of(entry: PolicyEntryLike) -> Slot:
    """The LPM key an entry occupies: every protocol (64 bits), every port of a protocol
    (80), or a port prefix (80 + port_bits). Port bits below the prefix are cleared, so
    equal prefixes give equal keys."""
    direction = direction_of(entry.direction)
    proto, port, bits = int(entry.proto), int(entry.port), int(entry.port_bits)
    if not 0 <= proto <= 255:
        raise ValueError(f"protocol {proto} is not an IP protocol number")
    if not 0 <= port <= 0xFFFF or not 0 <= bits <= 16:
        raise ValueError(f"port {port}/{bits} is not a 16-bit port prefix")
    if proto == 0:
        if bits:
            raise ValueError("an entry for every protocol cannot name a port")
        return Slot(POLICY_KEY_FIXED_BITS, direction, int(entry.identity), 0, 0)
    mask = (0xFFFF << (16 - bits)) & 0xFFFF
    return Slot(POLICY_KEY_PROTO_BITS + bits, direction, int(entry.identity), proto, port & mask)


def compile_entries(entries: Iterable[PolicyEntryLike]) -> Entries:
    """Slots and verdicts of an endpoint's entries. Two entries on one slot: a deny wins,
    else the first rule is kept."""
    out: Entries = {}
    for entry in entries:
        slot, verdict = slot_of(entry), Verdict(int(entry.rule_id), bool(entry.deny))
        if slot not in out or (verdict.deny and not out[slot].deny):
            out[slot] = verdict
    return out


def policy_key(maps: NodeMaps, ep_id: int, gen: int, slot: Slot) -> Any:
    return maps.policy.key_type(
        prefixlen=slot.prefixlen,
        ep_id=ep_id,
        gen=gen,
        dir=slot.direction,
        identity=slot.identity,
        proto=slot.proto,
        dport=socket.htons(slot.port),
    )


def policy_value(maps: NodeMaps, verdict: Verdict) -> Any:
    return maps.policy.value_type(rule_id=verdict.rule_id, deny=int(verdict.deny))


@dataclass
class _Switch:
    """One endpoint's policy switch in progress."""

    ep_id: int
    state: Any  # endpoint_state as read before the switch
    old: int
    new: int
    entries: Entries
    enforce: int
    identity: int


class PolicyWriter:
    """Writes endpoint policies into the node maps (see the module docstring)."""

    def __init__(self, maps: NodeMaps) -> None:
        self.maps = maps
        self._written: dict[tuple[int, int], Entries] | None = None
        # ep_id -> (policy object, identity) last installed: the agent hands back the very
        # same object for an endpoint whose policy did not change, which then costs nothing.
        self._installed: dict[int, tuple[Any, int]] = {}

    # ---- what the policy map holds ---------------------------------------------------
    def written(self) -> dict[tuple[int, int], Entries]:
        """(ep_id, gen) -> entries in the policy map; read from the map once."""
        if self._written is None:
            self._written = {}
            for k, v in self.maps.policy.lookup_batch():
                slot = Slot(
                    int(k.prefixlen),
                    int(k.dir),
                    int(k.identity),
                    int(k.proto),
                    socket.ntohs(k.dport),
                )
                group = self._written.setdefault((int(k.ep_id), int(k.gen)), {})
                group[slot] = Verdict(int(v.rule_id), bool(v.deny))
        return self._written

    def refresh(self) -> None:
        """Forget the cached keys (if something else wrote the policy map)."""
        self._written = None
        self._installed.clear()

    def _is_installed(self, ep_id: int, policy: Any, identities: Mapping[int, int]) -> bool:
        installed = self._installed.get(ep_id)
        return (
            installed is not None
            and installed[0] is policy
            and installed[1] == identities.get(ep_id)
        )

    def _write(self, ep_id: int, gen: int, entries: Entries) -> None:
        """Make generation `gen` of `ep_id` hold exactly `entries`."""
        current = self.written().get((ep_id, gen), {})
        changed = [(s, v) for s, v in entries.items() if current.get(s) != v]
        self.maps.policy.update_batch(
            (policy_key(self.maps, ep_id, gen, s), policy_value(self.maps, v)) for s, v in changed
        )
        self.maps.policy.delete_batch(
            policy_key(self.maps, ep_id, gen, s) for s in current if s not in entries
        )
        if entries:
            self.written()[(ep_id, gen)] = dict(entries)
        else:
            self.written().pop((ep_id, gen), None)

    # ---- endpoint state --------------------------------------------------------------
    def _state(
        self, identity: int, rev: int, gen: tuple[int, int], enforce: tuple[int, int]
    ) -> Any:
        value = self.maps.endpoints.value_type(identity=identity, policy_rev=rev)
        value.gen[0], value.gen[1] = gen
        value.enforce[0], value.enforce[1] = enforce
        return value

    def _set_states(self, states: Iterable[tuple[int, Any]]) -> None:
        self.maps.endpoints.update_batch(states)

    # ---- the protocol ----------------------------------------------------------------
    def apply(
        self, changes: Mapping[int, EndpointPolicyLike], identities: Mapping[int, int]
    ) -> None:
        """Install the policies of the endpoints in `changes` (ep_id -> policy);
        `identities` gives each endpoint's own identity (required for endpoints the
        datapath does not know yet; an identity change alone is written as it is).
        Every entry is checked before anything is written, and applying what is already
        installed changes nothing."""
        changes = {ep: p for ep, p in changes.items() if not self._is_installed(ep, p, identities)}
        compiled = {ep: (compile_entries(p.entries), enforce_bits(p)) for ep, p in changes.items()}
        states = {ep: self.maps.endpoints.lookup(ep) for ep in changes}
        unknown = sorted(ep for ep, st in states.items() if st is None and ep not in identities)
        if unknown:
            raise ValueError(
                f"endpoints {unknown} are new to the datapath: their identity is needed"
            )
        switches: list[_Switch] = []
        for ep_id, (entries, enforce) in compiled.items():
            state = states[ep_id]
            if state is None:
                self._create(ep_id, entries, enforce, int(identities[ep_id]))
                continue
            identity = int(identities.get(ep_id, state.identity))
            old = int(state.gen[0]) & 1
            unchanged = (
                int(state.gen[1]) & 1 == old
                and int(state.enforce[old]) == enforce
                and self.written().get((ep_id, old), {}) == entries
            )
            if unchanged:
                self._settle(ep_id, state, old, identity)
                continue
            # Mid-switch (an agent died there) the switch resumes towards gen[1].
            switches.append(_Switch(ep_id, state, old, 1 - old, entries, enforce, identity))
        self._update_identities({ep: i for ep, i in identities.items() if ep not in changes})
        if switches:
            self._switch(switches)
        for ep_id, policy in changes.items():
            self._installed[ep_id] = (policy, identities.get(ep_id))

    def _settle(self, ep_id: int, state: Any, live: int, identity: int) -> None:
        """Nothing to switch: write a changed identity, and clear what an interrupted
        switch may have left in the idle generation."""
        if identity != state.identity:
            state.identity = identity
            self._set_states([(ep_id, state)])
        self._write(ep_id, 1 - live, {})

    def _create(self, ep_id: int, entries: Entries, enforce: int, identity: int) -> None:
        """A new endpoint: generation 0, then its state (until then it drops everything
        as NO_ENDPOINT_STATE). The first policy_rev is random, so that no conntrack entry
        of an earlier endpoint with this id can pass as verified."""
        self._write(ep_id, 1, {})
        self._write(ep_id, 0, entries)
        rev = secrets.randbits(32) or 1
        self._set_states([(ep_id, self._state(identity, rev, (0, 0), (enforce, enforce)))])

    def _switch(self, switches: list[_Switch]) -> None:
        for s in switches:
            self._write(s.ep_id, s.new, s.entries)
        # Both generations must allow; established connections are checked again too.
        both = []
        for s in switches:
            enforce = [0, 0]
            enforce[s.old], enforce[s.new] = int(s.state.enforce[s.old]), s.enforce
            rev = (int(s.state.policy_rev) + 1) & 0xFFFFFFFF
            both.append((s.ep_id, self._state(s.identity, rev, (s.old, s.new), tuple(enforce))))
        self._set_states(both)
        self._set_states(
            (
                s.ep_id,
                self._state(
                    s.identity,
                    (int(s.state.policy_rev) + 2) & 0xFFFFFFFF,
                    (s.new, s.new),
                    (s.enforce, s.enforce),
                ),
            )
            for s in switches
        )
        for s in switches:
            self._write(s.ep_id, s.old, {})

    def _update_identities(self, identities: Mapping[int, int]) -> None:
        updates = []
        for ep_id, identity in identities.items():
            state = self.maps.endpoints.lookup(ep_id)
            if state is not None and int(state.identity) != int(identity):
                state.identity = int(identity)
                updates.append((ep_id, state))
        self._set_states(updates)

    def remove_endpoint(self, ep_id: int) -> None:
        """Forget an endpoint: its state first (its traffic then drops as
        NO_ENDPOINT_STATE), then its policy entries and its conntrack entries, so a later
        endpoint with the same id starts clean."""
        self.maps.endpoints.delete(ep_id)
        self._installed.pop(ep_id, None)
        for gen in (0, 1):
            self._write(ep_id, gen, {})
        flush_endpoint(self.maps, ep_id)
