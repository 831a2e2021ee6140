"""The service maps (bpf/abi/service.h) brought to a `Plan`, in an order under which the
socket LB never fails a connect that the old or the new services would take:

  1. backends that are new, or active again, are written (before any slot names them);
  2. each set's Maglev table is swapped whole, its slots filled, and its count raised after
     the slots it covers (or lowered before the slots it no longer covers are dropped);
  3. backends that became terminating or maintenance are marked (they left every slot in 2);
  4. rev-NAT entries and frontends are written, stale frontends and sets removed;
  5. backends no longer in any set are deleted, with the affinities that named them.

Everything the kernel would refuse for lack of room is refused first, nothing written.
"""

from __future__ import annotations

import ctypes
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from membrane.abi import (
    SVC_MAX_BACKENDS,
    SVC_MAX_FRONTENDS,
    SVC_MAX_REVNAT,
    SVC_MAX_SETS,
    SVC_MAX_SLOTS,
    BackendState,
    SvcSockDir,
)
from membrane.bpf import Map
from membrane.errors import UserError
from membrane.lb.maglev import build_table
from membrane.lb.tables import new_table
from membrane.service.plan import (
    BackendKey,
    FrontendKey,
    IdTable,
    Plan,
    RevNatKey,
    SetPlan,
    key_text,
)

MAP_NAMES = (
    "svc_frontends",
    "svc_sets",
    "svc_slots",
    "svc_backends",
    "svc_maglev",
    "svc_revnat",
    "svc_affinity",
    "svc_sock",
    "svc_xlate",
)
STATES = {
    "active": BackendState.ACTIVE,
    "terminating": BackendState.TERMINATING,
    "maintenance": BackendState.MAINTENANCE,
}
STATE_NAMES = {int(v): k for k, v in STATES.items()}


@dataclass
class ServiceIds:
    """The numbers the maps know sets, backends and frontends (rev-NAT) by."""

    sets: IdTable
    backends: IdTable
    revnat: IdTable

    @classmethod
    def from_json(cls, data: dict[str, dict[str, int]] | None) -> ServiceIds:
        data = data or {}
        return cls(
            IdTable(SVC_MAX_SETS, data.get("sets")),
            IdTable(SVC_MAX_BACKENDS, data.get("backends")),
            IdTable(SVC_MAX_REVNAT, data.get("revnat")),
        )

    def to_json(self) -> dict[str, dict[str, int]]:
        return {
            "sets": self.sets.to_json(),
            "backends": self.backends.to_json(),
            "revnat": self.revnat.to_json(),
        }

    def copy(self) -> ServiceIds:
        return ServiceIds(self.sets.copy(), self.backends.copy(), self.revnat.copy())


def address16(address: str) -> ctypes.Array:
    """An address as the maps keep it: 16 bytes, IPv4 in the first 4."""
    packed = ipaddress.ip_address(address).packed
    return (ctypes.c_uint8 * 16)(*packed.ljust(16, b"\0"))


def _address_of(raw: bytes, family: int) -> str:
    return str(ipaddress.ip_address(bytes(raw[: 4 if family == 4 else 16])))


def capacity_problem(plan: Plan, slots_before: int = 0) -> str | None:
    """Why the plan does not fit the maps (None: it fits). `slots_before`: the slots in
    force, which a change holds beside the new ones at its peak."""
    slots = sum(len(s.slots()) for s in plan.sets.values())
    for what, needed, size in (
        ("svc_frontends", len(plan.frontends), SVC_MAX_FRONTENDS),
        ("svc_sets", len(plan.sets), SVC_MAX_SETS - 1),
        ("svc_backends", len(plan.backends()), SVC_MAX_BACKENDS - 1),
        ("svc_revnat", len(plan.revnats()), SVC_MAX_REVNAT - 1),
        ("svc_slots", max(slots, slots_before), SVC_MAX_SLOTS),
    ):
        if needed > size:
            return (
                f"needs {needed:,} {what} map entries, the map holds {size:,}; nothing was changed"
            )
    return None


@dataclass
class _SetWrites:
    """The sets' writes of one change, made map by map in this order."""

    lowered: list[tuple[int, Any]] = field(default_factory=list)  # counts going down
    slots: list[tuple[Any, int]] = field(default_factory=list)
    sets: list[tuple[int, Any]] = field(default_factory=list)
    dropped: list[Any] = field(default_factory=list)  # slot keys beyond the new counts


class ServiceMaps:
    """The pinned service maps, opened by name through `open_map`."""

    def __init__(self, open_map: Callable[[str], Map]) -> None:
        for name in MAP_NAMES:
            setattr(self, name.removeprefix("svc_"), open_map(name))
        self.frontends: Map
        self.sets: Map
        self.slots: Map
        self.backends: Map
        self.maglev: Map
        self.revnat: Map
        self.affinity: Map
        self.sock: Map
        self.xlate: Map
        # the weights each set's Maglev table was built with (this run): a weight change
        # alone rebuilds the table; after a restart every Maglev table is rebuilt once
        self._maglev_weights: dict[int, list[int]] = {}

    def close(self) -> None:
        for name in MAP_NAMES:
            getattr(self, name.removeprefix("svc_")).close()

    def maps(self) -> dict[str, Map]:
        return {name: getattr(self, name.removeprefix("svc_")) for name in MAP_NAMES}

    # ---- reading ---------------------------------------------------------------------
    def _frontends_now(self) -> dict[FrontendKey, tuple[int, int, int]]:
        return {
            (
                _address_of(bytes(k.addr), k.family),
                k.port,
                k.protocol,
                k.family,
                k.scope,
            ): (v.set, v.revnat, v.flags)
            for k, v in self.frontends.lookup_batch()
        }

    def _slots_now(self) -> dict[tuple[int, int], int]:
        return {(k.set, k.slot): int(v) for k, v in self.slots.lookup_batch()}

    def _backends_now(self) -> dict[int, tuple[BackendKey, int]]:
        return {
            int(k): ((_address_of(bytes(v.addr), v.family), v.port, v.protocol), v.state)
            for k, v in self.backends.lookup_batch()
        }

    def translated_sockets(self, backends: set[tuple[str, int]]) -> dict[tuple[str, int], set[int]]:
        """Cookies of the sockets the socket LB sent to each of `backends` (address, port)."""
        found: dict[tuple[str, int], set[int]] = {}
        for k, _ in self.sock.lookup_batch():
            if k.dir != SvcSockDir.REV:
                continue
            backend = (_address_of(bytes(k.addr), k.family), k.port)
            if backend in backends:
                found.setdefault(backend, set()).add(int(k.cookie))
        return found

    def slot_count(self) -> int:
        return len(self._slots_now())

    # ---- writing ---------------------------------------------------------------------
    def apply(self, plan: Plan, ids: ServiceIds) -> ServiceIds:
        """Bring the maps to `plan`; returns the ids the maps now use (`ids` updated)."""
        problem = capacity_problem(plan, self.slot_count())
        if problem:
            raise UserError("services", problem)
        before = ids
        ids = ids.copy()
        backends = plan.backends()
        for key in sorted(backends):
            ids.backends.assign(key_text(key))
        for key in sorted(plan.sets):
            ids.sets.assign(key_text(key))
        for key in sorted(plan.revnats()):
            ids.revnat.assign(key_text(key))
        ids.backends.keep_only(key_text(k) for k in backends)
        ids.sets.keep_only(key_text(k) for k in plan.sets)
        ids.revnat.keep_only(key_text(k) for k in plan.revnats())

        backends_now = self._backends_now()
        slots_now = self._slots_now()
        frontends_now = self._frontends_now()
        backend_id = {key: ids.backends.ids[key_text(key)] for key in backends}

        # Writes go in batches (one syscall per map and step, bpf_map_update_batch), in
        # the order the module's docstring gives.
        # 1. new backends, and backends active again
        self.backends.update_batch(
            (bid, self._backend_value(key, state))
            for key, state in backends.items()
            if (known := backends_now.get(bid := backend_id[key])) is None
            or known[0] != key
            or (state == "active" and known[1] != 0)
        )
        # 2. sets: lowered counts, then the slots, then the sets' values, then dropped slots
        slots_by_set: dict[int, dict[int, int]] = {}  # set id -> slot -> backend id
        for (s, slot), b in slots_now.items():
            slots_by_set.setdefault(s, {})[slot] = b
        left: dict[int, set[int]] = {}  # set id -> backend ids that left it
        writes = _SetWrites()
        for key, set_plan in plan.sets.items():
            sid = ids.sets.ids[key_text(key)]
            had = slots_by_set.get(sid, {})
            active = [backend_id[b.key] for b in set_plan.slots()]
            left[sid] = set(had.values()) - set(active)
            self._plan_set(sid, set_plan, active, had, writes)
        self.sets.update_batch(writes.lowered)  # first stop reading the slots that go
        self.slots.update_batch(writes.slots)
        self.sets.update_batch(writes.sets)
        self.slots.delete_batch(writes.dropped)
        # 3. backends leaving service
        self.backends.update_batch(
            (backend_id[key], self._backend_value(key, state))
            for key, state in backends.items()
            if state != "active"
        )
        # 4. rev-NAT, frontends, stale frontends and sets
        self.revnat.update_batch(
            (rid, self._revnat_value(key))
            for key in plan.revnats()
            # a rev-NAT entry never changes: written when its id is new
            if before.revnat.get(key_text(key)) != (rid := ids.revnat.ids[key_text(key)])
        )
        frontend_writes = []
        for key, fe in plan.frontends.items():
            value = (
                ids.sets.ids[key_text(fe.set)],
                ids.revnat.ids[key_text((key[0], key[1], key[3]))],
                fe.flags,
            )
            if frontends_now.get(key) != value:
                frontend_writes.append((self._frontend_key(key), self._frontend_value(value)))
        self.frontends.update_batch(frontend_writes)
        for key in set(frontends_now) - set(plan.frontends):
            self.frontends.delete(self._frontend_key(key))
        live_sets = set(ids.sets.ids.values())
        for sid in (set(slots_by_set) | set(before.sets.ids.values())) - live_sets:
            self.sets.update(sid, bytes(self.sets.value_size))
            self.maglev.delete(sid)
            for slot in slots_by_set.get(sid, {}):
                self.slots.delete(self.slots.key_type(set=sid, slot=slot))
        # 5. backends gone, affinities that name what left a set
        live_backends = set(backend_id.values())
        for bid in set(backends_now) - live_backends:
            self.backends.delete(bid)
        self._forget_affinities(left)
        for rid in set(before.revnat.ids.values()) - set(ids.revnat.ids.values()):
            self.revnat.update(rid, bytes(self.revnat.value_size))
        return ids

    def _backend_value(self, key: BackendKey, state: str) -> ctypes.Structure:
        address, port, protocol = key
        family = ipaddress.ip_address(address).version
        return self.backends.value_type(
            addr=address16(address),
            port=port,
            protocol=protocol,
            family=family,
            state=STATES[state],
        )

    def _plan_set(
        self,
        sid: int,
        set_plan: SetPlan,
        active: list[int],
        had: dict[int, int],
        writes: _SetWrites,
    ) -> None:
        """One set's writes into `writes` (its Maglev table is published at once): `had`
        its slots in force (slot -> backend id). A set whose slots and value are as
        planned is left alone (and its Maglev table not rebuilt)."""
        current = self.sets.lookup(sid)
        count_before = current.count if current is not None else 0
        value = self.sets.value_type(
            count=len(active),
            flags=set_plan.flags,
            affinity_timeout=set_plan.affinity_timeout,
            maglev_size=set_plan.maglev_size,
        )
        weights = [b.weight for b in set_plan.serving]
        unchanged = (
            current is not None
            and bytes(current) == bytes(value)
            and had == dict(enumerate(active, start=1))
            and self._maglev_weights.get(sid) == weights
        )
        if unchanged:
            return
        if set_plan.maglev_size:
            self._publish_maglev(sid, set_plan, list(dict.fromkeys(active)))
        self._maglev_weights[sid] = weights
        if len(active) < count_before:
            writes.lowered.append((sid, value))
        for slot, bid in enumerate(active, start=1):
            if had.get(slot) != bid:
                writes.slots.append((self.slots.key_type(set=sid, slot=slot), bid))
        writes.sets.append((sid, value))
        writes.dropped += [
            self.slots.key_type(set=sid, slot=slot) for slot in had if slot > len(active)
        ]

    def _publish_maglev(self, sid: int, set_plan: SetPlan, active: list[int]) -> None:
        """`active`: the ids of the set's serving backends, in their order."""
        serving = set_plan.serving
        names = [f"{b.key[0]}:{b.key[1]}" for b in serving]
        owners = build_table(names, set_plan.maglev_size, [b.weight for b in serving])
        entries = np.array([*active, 0], dtype=np.uint32)[owners]  # -1 (none) -> 0
        with new_table(entries) as table:
            self.maglev.update(sid, table.fd)

    def maglev_table(self, sid: int) -> np.ndarray:
        from membrane.lb.tables import map_by_id

        map_id = self.maglev.lookup(sid)
        if map_id is None:
            return np.zeros(0, dtype=np.uint32)
        if isinstance(map_id, bytes):  # an array of maps' value has no BTF type
            map_id = int.from_bytes(map_id, "little")
        with map_by_id(int(map_id)) as t:
            _, raw = t.lookup_batch_raw(chunk=t.max_entries)
        return np.frombuffer(raw, dtype=np.uint32)

    def _revnat_value(self, key: RevNatKey) -> ctypes.Structure:
        address, port, family = key
        return self.revnat.value_type(addr=address16(address), port=port, family=family)

    def _frontend_key(self, key: FrontendKey) -> ctypes.Structure:
        address, port, protocol, family, scope = key
        return self.frontends.key_type(
            addr=address16(address), port=port, protocol=protocol, family=family, scope=scope
        )

    def _frontend_value(self, value: tuple[int, int, int]) -> ctypes.Structure:
        sid, rid, flags = value
        return self.frontends.value_type(set=sid, revnat=rid, flags=flags)

    def _forget_affinities(self, left: dict[int, set[int]]) -> None:
        if not any(left.values()):
            return
        stale = [
            k for k, v in self.affinity.lookup_batch() if int(v.backend) in left.get(k.set, ())
        ]
        for k in stale:
            self.affinity.delete(k)

    def clear(self) -> None:
        """Remove every service (agent reset of services)."""
        self.apply(Plan(), ServiceIds.from_json(None))
