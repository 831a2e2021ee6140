"""Map keys of the filter programs, and the drop-dst tables changed as one. The one place
that knows the layouts of bpf/abi/filter.h on the Python side (types themselves come from
BTF; the DIR-24-8 tables are dir24.py's): the manager, the benchmarks and the tests use it.
"""

from __future__ import annotations

import ctypes
import ipaddress
import struct
from collections.abc import Callable, Iterable
from typing import Any

from membrane.abi import DIR24_TOP_LENGTH
from membrane.bpf import Map
from membrane.filter.dir24 import Dir24
from membrane.filter.dir24 import entry as dir24_entry
from membrane.filter.rules import AllowedFlow, IPNetwork, address_bytes


def lpm_key(m: Map, net: IPNetwork) -> Any:
    """`struct lpm_v4_key` or `lpm_v6_key` (whichever `m` holds) for `net`."""
    key = m.key_type()
    key.prefixlen = net.prefixlen
    packed = net.network_address.packed
    ctypes.memmove(key.addr, packed, len(packed))
    return key


def network_of(key: Any) -> IPNetwork:
    size = len(bytes(key.addr))
    return ipaddress.ip_network((ipaddress.ip_address(bytes(key.addr)[:size]), key.prefixlen))


def flow_key(m: Map, flow: AllowedFlow) -> Any:
    key = m.key_type()
    ctypes.memmove(key.src, address_bytes(flow.src), 16)
    ctypes.memmove(key.dst, address_bytes(flow.dst), 16)
    key.port, key.protocol, key.family = flow.port, flow.protocol, flow.src.version
    return key


def guard_key(m: Map, protocol: int, port: int) -> Any:
    return m.key_type(protocol=protocol, port=port)


# The maps of a deny list in filter_xdp.bpf.o, in DropDstTables' order, by the address it
# judges: `drop_dst` or `drop_src` + one of these.
PREFIX_LIST_MAPS = ("_v4", "_v6", "_tbl24", "_groups", "_top")
DIRECTIONS = ("dst", "src")


def prefix_list_maps(direction: str) -> tuple[str, ...]:
    """The map names of the drop-dst (`dst`) or drop-src (`src`) list."""
    return tuple(f"drop_{direction}{suffix}" for suffix in PREFIX_LIST_MAPS)


class DropDstTables:
    """One deny list of a filter (drop-dst, or drop-src with the drop_src_* maps), changed
    as one: drop_dst_v4 (the IPv4 prefixes as written, which the program does not read),
    the tables the program reads for IPv4 (drop_dst_tbl24, drop_dst_groups, drop_dst_top)
    and the LPM trie it reads for IPv6 (drop_dst_v6).

    An added IPv4 prefix is recorded before it goes into force and a removed one leaves
    force before its record goes, so whatever is enforced is listed (and removable)."""

    def __init__(self, v4: Map, v6: Map, tbl24: Map, tbl8: Map, top: Map) -> None:
        self.v4, self.v6 = v4, v6
        self.dir24 = Dir24.from_maps(tbl24, tbl8, top)

    @classmethod
    def of(cls, map_named: Callable[[str], Map], direction: str = "dst") -> DropDstTables:
        """The tables of a filter_xdp object or pin directory (`map_named` opens a map) for
        the list of destination (`dst`) or source (`src`) prefixes."""
        return cls(*(map_named(name) for name in prefix_list_maps(direction)))

    def table(self, net: IPNetwork) -> Map:
        return self.v4 if net.version == 4 else self.v6

    def add(self, rules: Iterable[tuple[IPNetwork, int]]) -> int:
        """Insert (prefix, rule id) pairs; returns how many were written."""
        rules = list(rules)
        for version, table in ((4, self.v4), (6, self.v6)):
            table.update_batch((lpm_key(table, n), rid) for n, rid in rules if n.version == version)
        for net, rule_id in rules:
            if isinstance(net, ipaddress.IPv4Network):
                self.dir24.add(net, rule_id)
        return len(rules)

    def lookup(self, net: IPNetwork) -> int | None:
        """The rule id of `net` (IPv4: exactly this prefix; IPv6: the trie's longest match
        no longer than it)."""
        table = self.table(net)
        return table.lookup(lpm_key(table, net))

    def remove(self, nets: Iterable[IPNetwork]) -> list[int]:
        """Delete prefixes; returns the rule ids they had."""
        freed = []
        for net in nets:
            table = self.table(net)
            key = lpm_key(table, net)
            rule_id = table.lookup(key)
            if rule_id is None:
                continue
            if isinstance(net, ipaddress.IPv4Network):
                self.dir24.remove(net, rule_id, self._parent(net))
            if table.delete(key):
                freed.append(rule_id)
        return freed

    def _parent(self, net: ipaddress.IPv4Network) -> int:
        """The dir24 entry of the longest listed prefix shorter than `net` holding it, as far
        as Dir24.remove needs it: one record lookup per shorter length, except that the
        tables know the longest of /9 to /24 holding a prefix longer than /24 (its group's
        `covering`), and that for a prefix of /9 or longer one of /8 or shorter counts as
        none (it is in the other table), so the search stops at /9 (0: none there)."""
        address = int(net.network_address)
        last = DIR24_TOP_LENGTH + 1 if net.prefixlen > DIR24_TOP_LENGTH else 0
        for length in range(net.prefixlen - 1, last - 1, -1):
            if length == 24 and (covering := self.dir24.covering(net)) is not None:
                return covering
            masked = address & ~((1 << (32 - length)) - 1) & 0xFFFFFFFF
            rule_id = self.v4.lookup(struct.pack("<I", length) + masked.to_bytes(4, "big"))
            if rule_id is not None:
                return dir24_entry(rule_id, length)
        return 0

    def items(self, version: int | None = None) -> list[tuple[IPNetwork, int]]:
        tables = [t for v, t in ((4, self.v4), (6, self.v6)) if version in (None, v)]
        return [(network_of(k), rid) for t in tables for k, rid in t.lookup_batch()]
