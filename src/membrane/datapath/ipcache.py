"""ipcache: the prefixes the datapath maps to peer identities (LPM tries `ipcache` for
IPv4 and `ipcache6` for IPv6; one writer per family)."""

from __future__ import annotations

import ctypes
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_network
from typing import Any

from membrane.abi import Identity
from membrane.datapath.nodemaps import NodeMaps

WORLD_PREFIX = IPv4Network("0.0.0.0/0")
WORLD_PREFIX6 = IPv6Network("::/0")
Network = IPv4Network | IPv6Network
Address = IPv4Address | IPv6Address


@dataclass(frozen=True)
class IpcacheSync:
    """What a sync changed."""

    added: int
    updated: int
    removed: int


def ipcache_key(maps: NodeMaps, net: Network) -> Any:
    plen, addr = raw_key(net)
    return _map_of(maps, net.version).key_type(prefixlen=plen, addr=_key_addr(net.version, addr))


def network_of(key: Any) -> Network:
    if isinstance(key.addr, int):
        return IPv4Network((IPv4Address(int(key.addr).to_bytes(4, "little")), int(key.prefixlen)))
    return IPv6Network((IPv6Address(bytes(key.addr)), int(key.prefixlen)))


def read_ipcache(maps: NodeMaps) -> dict[Network, tuple[int, int]]:
    """prefix -> (identity, ep_id) as the maps hold it, both families."""
    return {
        network_of(k): (int(v.identity), int(v.ep_id))
        for m in (maps.ipcache, maps.ipcache6)
        for k, v in m.lookup_batch()
    }


RawKey = tuple[int, int]  # (prefixlen, addr as an int; see raw_key), one family per dict
RawValue = tuple[int, int, int]  # (identity, ep_id, addr_identity)


def raw_key(net: Network) -> RawKey:
    """(prefixlen, addr): comparing these is far cheaper than building a network object per
    map entry (10,000 entries: ~1 s -> ~30 ms). IPv4: the u32 as the map stores it;
    IPv6: the 128-bit address. The two families never share a dict."""
    order = "little" if net.version == 4 else "big"
    return (net.prefixlen, int.from_bytes(net.network_address.packed, order))


def host_key(addr: Address) -> RawKey:
    """`raw_key` of the address's host prefix (/32 or /128), without building it."""
    if addr.version == 4:
        return (32, int.from_bytes(addr.packed, "little"))
    return (128, int.from_bytes(addr.packed, "big"))


def world_prefix(family: int) -> Network:
    return WORLD_PREFIX if family == 4 else WORLD_PREFIX6


def _map_of(maps: NodeMaps, family: int) -> Any:
    return maps.ipcache if family == 4 else maps.ipcache6


_Words = ctypes.c_uint32 * 4


def _key_addr(family: int, addr: int) -> Any:
    """A RawKey's address as the key struct's field takes it."""
    return addr if family == 4 else _Words.from_buffer_copy(addr.to_bytes(16, "big"))


def _raw_addr(key: Any) -> int:
    if isinstance(key.addr, int):
        return int(key.addr)
    return int.from_bytes(bytes(key.addr), "big")


class IpcacheWriter:
    """Keeps one family's ipcache equal to what the agent wants, writing only what
    differs. It reads the map once and then remembers what it wrote (one writer per node
    maps and family), so a sync costs the size of the change, not of the map. The
    family's world prefix always maps to `world` (IPv4: IDENTITY_WORLD, or WORLD_IPV4 on
    a dual-stack node; IPv6: WORLD_IPV6)."""

    def __init__(self, maps: NodeMaps, family: int = 4, world: int | None = None) -> None:
        self.maps = maps
        self.family = family
        self.map = _map_of(maps, family)
        if world is None:
            world = Identity.WORLD if family == 4 else Identity.WORLD_IPV6
        self.world_key = raw_key(world_prefix(family))
        self.world: RawValue = (int(world), 0, 0)
        self._have: dict[RawKey, RawValue] | None = None
        # sync_layers: the last base layer written and the overlay written over it
        self._base: Mapping[RawKey, RawValue] | None = None
        self._overlay: dict[RawKey, RawValue] = {}

    def sync(self, desired: Mapping[Network, tuple[int, ...]]) -> IpcacheSync:
        """Make the ipcache hold exactly `desired` (prefix -> (identity, ep_id) or
        (identity, ep_id, addr_identity)) plus the world prefix -> world. Additions and
        changes go first and removals last, so an address never falls back to a shorter
        prefix (or to world) while its own entry is being replaced."""
        want = {raw_key(net): _raw_value(v) for net, v in desired.items()}
        self._base = None
        return self._syncraw_key(want)

    def sync_layers(
        self, base: Mapping[RawKey, RawValue], overlay: Mapping[RawKey, RawValue]
    ) -> IpcacheSync:
        """Like `sync` of `base` with `overlay` written over it, in map key form. `base` is
        large and rarely changes (the policies' CIDR prefixes), `overlay` is small and
        changes often (the node's and the endpoints' addresses): while the caller passes
        the same `base` object as last time, only the overlay is compared, so the cost
        follows the endpoints, not the prefixes. `base` must not change after it is passed."""
        if self._base is not base or self._have is None:
            want = {**base, **overlay}
            self._base = None
            result = self._syncraw_key(want)
            self._base, self._overlay = base, dict(overlay)
            return result
        old = self._overlay
        changed = [(k, v) for k, v in overlay.items() if old.get(k) != v]
        uncovered = [k for k in old if k not in overlay]  # back to the base value, or gone
        changed += [(k, base[k]) for k in uncovered if k in base]
        stale = [k for k in uncovered if k not in base]
        self._overlay = dict(overlay)
        return self._write(changed, stale)

    def peak(self, base: Mapping[RawKey, RawValue], overlay: Mapping[RawKey, RawValue]) -> int:
        """The most entries the ipcache holds while `sync_layers(base, overlay)` runs (its
        writes go before its deletes); costs what `sync_layers` compares."""
        have = self._read()
        if self._base is base:
            return len(have) + sum(1 for key in overlay if key not in have)
        added = (base.keys() | overlay.keys() | {self.world_key}) - have.keys()
        return len(have) + len(added)

    def refresh(self) -> None:
        """Forget what was written (a write failed part of the way through a batch): the
        next sync reads the map and compares everything."""
        self._have = None
        self._base = None
        self._overlay = {}

    def _syncraw_key(self, want: dict[RawKey, RawValue]) -> IpcacheSync:
        if want.setdefault(self.world_key, self.world) != self.world:
            raise ValueError(f"{world_prefix(self.family)} must map to the world identity")
        have = self._read()
        changed = list(want.items() - have.items())
        stale = list(have.keys() - want.keys())
        return self._write(changed, stale)

    def _read(self) -> dict[RawKey, RawValue]:
        if self._have is None:
            self._have = {
                # flags we never write: an entry carrying some is rewritten
                (int(k.prefixlen), _raw_addr(k)): (
                    int(v.identity),
                    int(v.ep_id),
                    int(v.addr_identity),
                )
                if not int(v.flags)
                else (-1, -1, -1)
                for k, v in self.map.lookup_batch()
            }
        return self._have

    def _write(self, changed: list[tuple[RawKey, RawValue]], stale: list[RawKey]) -> IpcacheSync:
        have = self._read()
        key_type, value_type, family = self.map.key_type, self.map.value_type, self.family
        self.map.update_batch(
            (
                key_type(prefixlen=plen, addr=_key_addr(family, addr)),
                value_type(identity=ident, ep_id=ep, addr_identity=addr_ident),
            )
            for (plen, addr), (ident, ep, addr_ident) in changed
        )
        self.map.delete_batch(
            key_type(prefixlen=plen, addr=_key_addr(family, addr)) for plen, addr in stale
        )
        added = sum(1 for key, _ in changed if key not in have)
        have.update(changed)
        for key in stale:
            have.pop(key, None)
        return IpcacheSync(added=added, updated=len(changed) - added, removed=len(stale))


def _raw_value(value: tuple[int, ...]) -> RawValue:
    ident, ep, *rest = value
    return (int(ident), int(ep), int(rest[0]) if rest else 0)


def sync_ipcache(maps: NodeMaps, desired: Mapping[Network | str, tuple[int, ...]]) -> IpcacheSync:
    """One sync of both families by fresh writers (they read the maps first), with the
    world identities of an IPv4-only node; returns the sum of what they changed."""
    nets = {ip_network(net): value for net, value in desired.items()}
    results = [
        IpcacheWriter(maps, family).sync({n: v for n, v in nets.items() if n.version == family})
        for family in (4, 6)
    ]
    return IpcacheSync(
        *(sum(getattr(r, f) for r in results) for f in ("added", "updated", "removed"))
    )
