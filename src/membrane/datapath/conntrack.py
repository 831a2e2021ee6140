"""Conntrack housekeeping: list entries, delete expired ones, flush an endpoint's.

The datapath treats an expired entry as absent and LRU eviction reclaims space under
pressure; deleting expired entries keeps the table small, so eviction never has to pick
a live connection. Times are CLOCK_MONOTONIC nanoseconds: the datapath reads them with
bpf_ktime_get_coarse_ns(), which trails the precise clock by at most a tick.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any

from membrane.abi import CtFlag, Direction
from membrane.datapath.nodemaps import NodeMaps


def ktime_now_ns() -> int:
    """The conntrack clock (bpf_ktime_get_ns() and its coarse variant count the same)."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


@dataclass(frozen=True)
class CtEntry:
    """One tracked connection, keyed by the packet that opened it as its endpoint's
    program saw it (see struct ct_key)."""

    ep_id: int
    direction: Direction
    proto: int
    src: IPv4Address
    dst: IPv4Address
    sport: int
    dport: int
    expires_ns: int
    created_ns: int
    policy_rev: int
    rule_id: int
    peer_identity: int
    tcp_flags_orig: int
    tcp_flags_reply: int
    flags: CtFlag
    packets_orig: int
    packets_reply: int

    @classmethod
    def from_map(cls, key: Any, value: Any) -> CtEntry:
        return cls(
            ep_id=int(key.ep_id),
            direction=Direction(key.dir),
            proto=int(key.proto),
            src=_address(key.saddr),
            dst=_address(key.daddr),
            sport=int(key.sport),
            dport=int(key.dport),
            expires_ns=int(value.expires_ns),
            created_ns=int(value.created_ns),
            policy_rev=int(value.policy_rev),
            rule_id=int(value.rule_id),
            peer_identity=int(value.peer_identity),
            tcp_flags_orig=int(value.tcp_flags_orig),
            tcp_flags_reply=int(value.tcp_flags_reply),
            flags=CtFlag(value.flags),
            packets_orig=int(value.packets_orig),
            packets_reply=int(value.packets_reply),
        )

    def expired(self, now_ns: int) -> bool:
        return now_ns > self.expires_ns


def _address(raw: int) -> IPv4Address:
    """A network-order __u32 read as a host (little-endian) integer."""
    return IPv4Address(int(raw).to_bytes(4, "little"))


def entries(maps: NodeMaps, ep_id: int | None = None) -> list[CtEntry]:
    """The conntrack table (one endpoint's part of it with `ep_id`), expired entries
    included."""
    out = [CtEntry.from_map(k, v) for k, v in maps.ct.lookup_batch()]
    return out if ep_id is None else [e for e in out if e.ep_id == ep_id]


def gc_expired(maps: NodeMaps, now_ns: int | None = None) -> int:
    """Delete the entries that expired before `now_ns` (default: now); returns how many."""
    now = ktime_now_ns() if now_ns is None else now_ns
    deleted = 0
    for key, value in maps.ct.lookup_batch():
        if now <= value.expires_ns:
            continue
        # Read it again just before deleting: the datapath may have refreshed it since.
        current = maps.ct.lookup(key)
        if current is not None and now > current.expires_ns and maps.ct.delete(key):
            deleted += 1
    return deleted


def flush_endpoint(maps: NodeMaps, ep_id: int) -> int:
    """Delete every entry of endpoint `ep_id`; returns how many."""
    deleted = 0
    for key, _ in maps.ct.lookup_batch():
        if key.ep_id == ep_id and maps.ct.delete(key):
            deleted += 1
    return deleted
