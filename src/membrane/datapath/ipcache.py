"""ipcache: the prefixes the datapath maps to peer identities (LPM trie `ipcache`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from membrane.datapath.abi import Identity
from membrane.datapath.nodemaps import NodeMaps

WORLD_PREFIX = IPv4Network("0.0.0.0/0")


@dataclass(frozen=True)
class IpcacheSync:
    """What a sync changed."""

    added: int
    updated: int
    removed: int


def ipcache_key(maps: NodeMaps, net: IPv4Network) -> Any:
    return maps.ipcache.key_type(
        prefixlen=net.prefixlen, addr=int.from_bytes(net.network_address.packed, "little")
    )


def network_of(key: Any) -> IPv4Network:
    address = IPv4Address(int(key.addr).to_bytes(4, "little"))
    return IPv4Network((address, int(key.prefixlen)))


def read_ipcache(maps: NodeMaps) -> dict[IPv4Network, tuple[int, int]]:
    """prefix -> (identity, ep_id) as the map holds it."""
    return {network_of(k): (int(v.identity), int(v.ep_id)) for k, v in maps.ipcache.lookup_batch()}


def _raw(net: IPv4Network) -> tuple[int, int]:
    """(prefixlen, addr as the map stores it): comparing these is far cheaper than
    building an IPv4Network per map entry (10,000 entries: ~1 s -> ~30 ms)."""
    return (net.prefixlen, int.from_bytes(net.network_address.packed, "little"))


def sync_ipcache(maps: NodeMaps, desired: Mapping[IPv4Network, tuple[int, int]]) -> IpcacheSync:
    """Make the ipcache hold exactly `desired` (prefix -> (identity, ep_id)) plus
    0.0.0.0/0 -> world, writing only what differs. Additions and changes go first and
    removals last, so an address never falls back to a shorter prefix (or to world) while
    its own entry is being replaced."""
    want = {_raw(net): (int(i), int(e)) for net, (i, e) in desired.items()}
    world = (int(Identity.WORLD), 0)
    if want.setdefault(_raw(WORLD_PREFIX), world) != world:
        raise ValueError(f"{WORLD_PREFIX} must map to the world identity, not {desired}")
    have = {
        (int(k.prefixlen), int(k.addr)): (int(v.identity), int(v.ep_id), int(v.flags))
        for k, v in maps.ipcache.lookup_batch()
    }
    key_type, value_type = maps.ipcache.key_type, maps.ipcache.value_type
    writes = [
        (key_type(prefixlen=plen, addr=addr), value_type(identity=identity, ep_id=ep_id))
        for (plen, addr), (identity, ep_id) in want.items()
        if have.get((plen, addr)) != (identity, ep_id, 0)
    ]
    stale = [key_type(prefixlen=plen, addr=addr) for plen, addr in have if (plen, addr) not in want]
    maps.ipcache.update_batch(writes)
    maps.ipcache.delete_batch(stale)
    added = sum(1 for key in want if key not in have)
    return IpcacheSync(added=added, updated=len(writes) - added, removed=len(stale))
