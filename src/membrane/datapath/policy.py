"""Policy into the datapath: compiled entries become `policy` LPM keys of the endpoint's
live generation, changed in place and in two phases so that no moment lets traffic pass that
neither the old nor the new policy allows.

Why two phases are enough: the datapath looks up the peer's identity and IDENTITY_ANY, each
a longest-prefix match, and a deny from either wins over an allow from either, which wins
over the direction's default. Ordering a single lookup's result deny < no entry < allow,
the verdict only grows with it. So every single key change either can only tighten
(removing an allow, adding a deny, allow -> deny, turning default deny on) or can only
loosen (the opposite ones; a changed rule id alone changes no verdict), whatever else the
map holds. The writer applies every tightening change of every endpoint first, then every
loosening one: before the turn each moment allows a subset of the old policy, after it a
subset of the new, and a packet crossing two endpoints of the node sees both in the same
phase. Then each changed endpoint's policy_rev is bumped, so connections the new policy
denies are checked again (conntrack caches verdicts per revision). The cost is the size of
the change, not the size of the policy.

The datapath also enforces two generations at once ({old, new} in endpoint_state: a packet
must pass both); an earlier writer switched policies that way. A switch it left half done is
finished here by writing in place into the generation it was moving to, then dropping the
old one. The writer learns what exists by reading the maps, so a restarted agent (or one
that died halfway) picks up exactly where the maps are. One writer per node maps: it caches
the policy map's keys after its first read, and so knows how many entries the map holds:
`peak` tells, before anything is written, how many a change needs at its fullest moment.
"""

from __future__ import annotations

import itertools
import secrets
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from membrane.abi import POLICY_KEY_FIXED_BITS, POLICY_KEY_PROTO_BITS, Direction
from membrane.bpf.btf import ctype_dtype
from membrane.datapath.conntrack import flush_endpoint
from membrane.datapath.nodemaps import NodeMaps
from membrane.datapath.policy_entries import PORT_MASKS, EndpointPolicy, PolicyEntry

_DIRECTIONS = frozenset(Direction)


def enforce_bits(policy: EndpointPolicy) -> int:
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


def slot_of(entry: PolicyEntry) -> Slot:
    """The LPM key an entry occupies: every protocol (64 bits), every port of a protocol
    (80), or a port prefix (80 + port_bits). Port bits below the prefix are cleared, so
    equal prefixes give equal keys."""
    direction, proto, port, bits = entry.direction, entry.proto, entry.port, entry.port_bits
    if direction not in _DIRECTIONS:
        raise ValueError(f"direction {direction!r} is neither ingress nor egress")
    if not 0 <= proto <= 255:
        raise ValueError(f"protocol {proto} is not an IP protocol number")
    if not 0 <= port <= 0xFFFF or not 0 <= bits <= 16:
        raise ValueError(f"port {port}/{bits} is not a 16-bit port prefix")
    if proto == 0:
        if bits:
            raise ValueError("an entry for every protocol cannot name a port")
        return Slot(POLICY_KEY_FIXED_BITS, direction, entry.identity, 0, 0)
    mask = PORT_MASKS[bits]
    return Slot(POLICY_KEY_PROTO_BITS + bits, direction, entry.identity, proto, port & mask)


def compile_entries(entries: Iterable[PolicyEntry]) -> Entries:
    """Slots and verdicts of an endpoint's entries. Two entries on one slot: a deny wins,
    else the first rule is kept."""
    out: Entries = {}
    for entry in entries:
        slot, verdict = slot_of(entry), Verdict(entry.rule_id, entry.deny)
        if slot not in out or (verdict.deny and not out[slot].deny):
            out[slot] = verdict
    return out


def updated_entries(base: Entries, old: EndpointPolicy, new: EndpointPolicy) -> Entries | None:
    """`compile_entries(new.entries)` from `base` (which is `compile_entries(old.entries)`)
    and only the entries that differ, or None when that is not cheaper or cannot be exact
    (two entries on one slot, which only a full compile resolves)."""
    old_entries, new_entries = frozenset(old.entries), frozenset(new.entries)
    if len(base) != len(old_entries):
        return None
    removed, added = old_entries - new_entries, new_entries - old_entries
    if len(removed) + len(added) > len(new_entries) // 4:
        return None
    out = dict(base)
    for entry in removed:
        del out[slot_of(entry)]
    for entry in added:
        slot = slot_of(entry)
        if slot in out:
            return None
        out[slot] = Verdict(entry.rule_id, entry.deny)
    return out


class PolicyCodec:
    """Many policy keys and values at once, laid out as the map stores them (a numpy
    array per batch: building a ctypes key per slot costs more than the syscall)."""

    def __init__(self, maps: NodeMaps) -> None:
        self.key_dtype = ctype_dtype(maps.policy.key_type)
        self.value_dtype = ctype_dtype(maps.policy.value_type)

    def keys(self, ep_id: int, gen: int, slots: Sequence[Slot]) -> bytes:
        return self.key_array(ep_id, gen, slots).tobytes()

    def key_array(self, ep_id: int, gen: int, slots: Sequence[Slot]) -> np.ndarray:
        keys = np.zeros(len(slots), self.key_dtype)
        if slots:
            prefixlen, direction, identity, proto, port = _columns(slots, len(Slot._fields))
            keys["prefixlen"], keys["ep_id"], keys["gen"] = prefixlen, ep_id, gen
            keys["dir"], keys["identity"], keys["proto"] = direction, identity, proto
            keys["dport"] = ((port & 0xFF) << 8) | (port >> 8)  # network byte order
        return keys

    def values(self, verdicts: Sequence[Verdict]) -> bytes:
        values = np.zeros(len(verdicts), self.value_dtype)
        if verdicts:
            rule_id, deny = _columns(verdicts, len(Verdict._fields))
            values["rule_id"], values["deny"] = rule_id, deny
        return values.tobytes()


def _columns(rows: Sequence[tuple[int, ...]], width: int) -> np.ndarray:
    """Equal-length tuples as columns (fromiter: several times faster than np.array)."""
    flat = np.fromiter(itertools.chain.from_iterable(rows), np.int64, count=width * len(rows))
    return flat.reshape(-1, width).T


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


Op = tuple[Slot, Verdict | None]  # None: delete the key

# Policies kept compiled after their last endpoint left (each up to a few MiB at 10,000
# rules): enough for pods being replaced one at a time.
RETAINED_POLICIES = 4


def split_changes(current: Entries, wanted: Entries) -> tuple[list[Op], list[Op]]:
    """The key changes from `current` to `wanted`, as (tightening, loosening): each
    tightening change can only deny more, each loosening one only allow more (see the
    module docstring)."""
    tighten: list[Op] = []
    loosen: list[Op] = []
    for slot, was in current.items():
        if slot not in wanted:
            (loosen if was.deny else tighten).append((slot, None))
    for slot, verdict in wanted.items():
        was = current.get(slot)
        if was == verdict:
            continue
        denies_more = verdict.deny and (was is None or not was.deny)
        (tighten if denies_more else loosen).append((slot, verdict))
    return tighten, loosen


class _Delta(NamedTuple):
    """How many slots a change adds and removes, and how many of those are tightening
    (`split_changes`: an added deny, a removed allow)."""

    added: int
    removed: int
    denies_added: int
    allows_removed: int

    @classmethod
    def of(cls, current: Entries, wanted: Entries) -> _Delta:
        if not current:  # a new endpoint's: everything is added
            return cls(len(wanted), 0, sum(1 for v in wanted.values() if v.deny), 0)
        changed = current.keys() ^ wanted.keys()  # one pass over both; then the change only
        added = [slot for slot in changed if slot in wanted]
        removed = len(changed) - len(added)
        denies = sum(1 for slot in added if wanted[slot].deny)
        allows = sum(1 for slot in changed if slot in current and not current[slot].deny)
        return cls(len(added), removed, denies, allows)


@dataclass
class _Change:
    """One endpoint's policy change in progress."""

    ep_id: int
    state: Any  # endpoint_state as read before the change
    gen: int  # the generation written in place
    enforce: int
    identity: int
    tighten: list[Op]
    loosen: list[Op]


class PolicyWriter:
    """Writes endpoint policies into the node maps (see the module docstring)."""

    def __init__(self, maps: NodeMaps) -> None:
        self.maps = maps
        self.codec = PolicyCodec(maps)
        self._written: dict[tuple[int, int], Entries] | None = None
        self._count = 0  # entries in the policy map (valid while `_written` is)
        # ep_id -> (policy object, identity) last installed: the agent hands back the very
        # same object for an endpoint whose policy did not change, which then costs nothing.
        self._installed: dict[int, tuple[EndpointPolicy, int | None]] = {}
        # id(policy) -> (policy, its slots) for the installed policies (and the last few
        # no endpoint holds any more: a pod that is replaced gets the same policy back); a
        # new policy is converted from the one it replaces by what differs.
        self._entries: dict[int, tuple[EndpointPolicy, Entries]] = {}
        # id(entries) -> (entries, keys with ep_id and gen 0, values) of those policies
        self._encoded: dict[int, tuple[Entries, np.ndarray, bytes]] = {}

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
            self._count = sum(map(len, self._written.values()))
        return self._written

    def refresh(self) -> None:
        """Forget the cached keys (if something else wrote the policy map, or a write
        failed part of the way through a batch: the next change reads what is there)."""
        self._written = None
        self._installed.clear()
        self._entries.clear()
        self._encoded.clear()

    def _is_installed(
        self, ep_id: int, policy: EndpointPolicy, identities: Mapping[int, int]
    ) -> bool:
        installed = self._installed.get(ep_id)
        return (
            installed is not None
            and installed[0] is policy
            and installed[1] == identities.get(ep_id)
        )

    def _put(self, ep_id: int, gen: int, ops: Sequence[Op]) -> None:
        """Apply key changes to generation `gen` of `ep_id`, in the map and in the cache."""
        if not ops:
            return
        writes = [(slot, verdict) for slot, verdict in ops if verdict is not None]
        if writes:
            slots, verdicts = zip(*writes, strict=True)
            self.maps.policy.update_batch_raw(
                self.codec.keys(ep_id, gen, slots), self.codec.values(verdicts)
            )
        deletes = [slot for slot, verdict in ops if verdict is None]
        if deletes:
            self.maps.policy.delete_batch_raw(self.codec.keys(ep_id, gen, deletes))
        group = self.written().setdefault((ep_id, gen), {})
        self._count -= len(group)
        for slot, verdict in ops:
            if verdict is None:
                group.pop(slot, None)
            else:
                group[slot] = verdict
        self._count += len(group)
        if not group:
            del self.written()[(ep_id, gen)]

    def _put_all(self, ep_id: int, gen: int, entries: Entries) -> None:
        """_put of every slot of `entries` into a generation that holds nothing. Replicas
        and replaced pods share `entries`: it is encoded once, then only the endpoint and
        generation columns change."""
        if not entries:
            return
        encoded = self._encoded.get(id(entries))
        if encoded is None or encoded[0] is not entries:
            keys = self.codec.key_array(0, 0, list(entries))
            encoded = (entries, keys, self.codec.values(list(entries.values())))
            self._encoded[id(entries)] = encoded
        keys = encoded[1].copy()
        keys["ep_id"], keys["gen"] = ep_id, gen
        self.maps.policy.update_batch_raw(keys.tobytes(), encoded[2])
        self.written()[(ep_id, gen)] = dict(entries)
        self._count += len(entries)

    def _write(self, ep_id: int, gen: int, entries: Entries) -> None:
        """Make generation `gen` of `ep_id` hold exactly `entries`, in any order: only for
        generations no endpoint state points at."""
        current = self.written().get((ep_id, gen))
        if not current:  # every slot is new (a new endpoint): nothing to compare
            self._put_all(ep_id, gen, entries)
            return
        tighten, loosen = split_changes(current, entries)
        self._put(ep_id, gen, tighten + loosen)

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

    # ---- capacity --------------------------------------------------------------------
    def peak(self, steps: Sequence[tuple[Mapping[int, EndpointPolicy], Mapping[int, int]]]) -> int:
        """The most entries the policy map holds while `apply` runs each step (changes,
        identities) in turn, from what it holds now: `apply`'s order replayed on counts
        (new endpoints and idle generations in turn, then every endpoint's tightening,
        then every endpoint's loosening; within one batch writes before deletes). Nothing
        is written. Replicas cost one diff: an endpoint holds what `apply` installed for
        it (after a failed write, `refresh` first)."""
        self.written()
        count = peak = self._count
        groups: dict[tuple[int, int], Entries] = {}  # contents after the earlier steps
        gens: dict[int, int] = {}  # live generation after the earlier steps
        installed: dict[int, tuple[EndpointPolicy, int | None]] = {}  # by the earlier steps
        deltas: dict[tuple[int, int], _Delta] = {}  # (id(installed), id(new policy))
        for changes, identities in steps:
            phases: list[tuple[_Delta, int]] = []  # changing endpoints, idle entries
            for ep_id, policy in changes.items():
                previous = installed.get(ep_id) or self._installed.get(ep_id)
                identity = identities.get(ep_id)
                if previous is not None and previous[0] is policy and previous[1] == identity:
                    continue
                installed[ep_id] = (policy, identity)
                entries = self._entries_of(ep_id, policy)
                gen = gens.get(ep_id)
                new = False
                if gen is None:
                    state = self.maps.endpoints.lookup(ep_id)
                    new = state is None
                    gen = 0 if new else int(state.gen[1]) & 1
                gens[ep_id] = gen
                live, idle = ((ep_id, gen), (ep_id, 1 - gen))
                current = groups.get(live, self.written().get(live, {}))
                stale = len(groups.get(idle, self.written().get(idle, {})))
                groups[live], groups[idle] = entries, {}
                if previous is None or new:
                    delta = _Delta.of(current, entries)
                else:
                    key = (id(previous[0]), id(policy))
                    if key not in deltas:
                        deltas[key] = _Delta.of(current, entries)
                    delta = deltas[key]
                if new:  # idle generation cleared, then one batch
                    count -= stale
                    peak = max(peak, count + delta.added)
                    count += delta.added - delta.removed
                elif not delta.added and not delta.removed:  # only the idle one is cleared
                    count -= stale
                else:
                    phases.append((delta, stale))
            for delta, _ in phases:
                peak = max(peak, count + delta.denies_added)
                count += delta.denies_added - delta.allows_removed
            for delta, _ in phases:
                peak = max(peak, count + delta.added - delta.denies_added)
                count += delta.added - delta.denies_added - delta.removed + delta.allows_removed
            count -= sum(stale for _, stale in phases)
        return peak

    # ---- the protocol ----------------------------------------------------------------
    def apply(self, changes: Mapping[int, EndpointPolicy], identities: Mapping[int, int]) -> None:
        """Install the policies of the endpoints in `changes` (ep_id -> policy);
        `identities` gives each endpoint's own identity (required for endpoints the
        datapath does not know yet; an identity change alone is written as it is).
        Every entry is checked before anything is written, and applying what is already
        installed changes nothing."""
        changes = {ep: p for ep, p in changes.items() if not self._is_installed(ep, p, identities)}
        compiled = {ep: (self._entries_of(ep, p), enforce_bits(p)) for ep, p in changes.items()}
        states = {ep: self.maps.endpoints.lookup(ep) for ep in changes}
        unknown = sorted(ep for ep, st in states.items() if st is None and ep not in identities)
        if unknown:
            raise ValueError(
                f"endpoints {unknown} are new to the datapath: their identity is needed"
            )
        changing: list[_Change] = []
        for ep_id, (entries, enforce) in compiled.items():
            state = states[ep_id]
            if state is None:
                self._create(ep_id, entries, enforce, int(identities[ep_id]))
                continue
            identity = int(identities.get(ep_id, state.identity))
            gen = int(state.gen[1]) & 1  # mid-switch (an older writer died there): its target
            unchanged = (
                int(state.gen[0]) & 1 == gen
                and int(state.enforce[gen]) == enforce
                and self.written().get((ep_id, gen), {}) == entries
            )
            if unchanged:
                self._settle(ep_id, state, gen, identity)
                continue
            tighten, loosen = split_changes(self.written().get((ep_id, gen), {}), entries)
            changing.append(_Change(ep_id, state, gen, enforce, identity, tighten, loosen))
        self._update_identities({ep: i for ep, i in identities.items() if ep not in changes})
        if changing:
            self._change(changing)
        for ep_id, policy in changes.items():
            self._installed[ep_id] = (policy, identities.get(ep_id))
        installed = {id(policy) for policy, _ in self._installed.values()}
        # Unused ones first, so the ones that leave next are kept over older ones.
        unused = [key for key in self._entries if key not in installed]  # oldest first
        kept = unused[-RETAINED_POLICIES:] + [key for key in self._entries if key in installed]
        self._entries = {key: self._entries[key] for key in kept}
        known = {id(entries) for _, entries in self._entries.values()}
        self._encoded = {k: v for k, v in self._encoded.items() if k in known}

    def _entries_of(self, ep_id: int, policy: EndpointPolicy) -> Entries:
        """The policy's slots: known when another endpoint has it (replicas share one
        object), else derived from what this endpoint had, else compiled."""
        known = self._entries.get(id(policy))
        if known is not None and known[0] is policy:
            return known[1]
        entries = None
        previous = self._installed.get(ep_id)
        if previous is not None:
            base = self._entries.get(id(previous[0]))
            if base is not None and base[0] is previous[0]:
                entries = updated_entries(base[1], previous[0], policy)
        if entries is None:
            entries = compile_entries(policy.entries)
        self._entries[id(policy)] = (policy, entries)
        return entries

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

    def _change(self, changes: list[_Change]) -> None:
        """Every endpoint's tightening first, then every endpoint's loosening; the final
        state bumps the revision (conntrack checks established connections again)."""
        tightened = []
        for c in changes:
            self._put(c.ep_id, c.gen, c.tighten)
            enforce = [int(c.state.enforce[0]), int(c.state.enforce[1])]
            if enforce[c.gen] | c.enforce != enforce[c.gen]:
                enforce[c.gen] |= c.enforce
                gens = (int(c.state.gen[0]) & 1, c.gen)
                tightened.append(
                    (c.ep_id, self._state(c.identity, c.state.policy_rev, gens, tuple(enforce)))
                )
        self._set_states(tightened)
        for c in changes:
            self._put(c.ep_id, c.gen, c.loosen)
        self._set_states(
            (
                c.ep_id,
                self._state(
                    c.identity,
                    (int(c.state.policy_rev) + 1) & 0xFFFFFFFF,
                    (c.gen, c.gen),
                    (c.enforce, c.enforce),
                ),
            )
            for c in changes
        )
        for c in changes:
            self._write(c.ep_id, 1 - c.gen, {})  # what a half-done switch left behind

    def _update_identities(self, identities: Mapping[int, int]) -> None:
        updates = []
        for ep_id, identity in identities.items():
            state = self.maps.endpoints.lookup(ep_id)
            if state is not None and int(state.identity) != int(identity):
                state.identity = int(identity)
                updates.append((ep_id, state))
        self._set_states(updates)

    def revalidate(self, ep_ids: Iterable[int]) -> None:
        """Make the endpoints check their established connections again (bump policy_rev):
        after the ipcache moved addresses to other identities, a cached verdict may be for
        a peer identity that no longer applies. Called after the ipcache write, so a packet
        verified before it is checked once more."""
        updates = []
        for ep_id in ep_ids:
            state = self.maps.endpoints.lookup(ep_id)
            if state is not None:
                state.policy_rev = (int(state.policy_rev) + 1) & 0xFFFFFFFF
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
