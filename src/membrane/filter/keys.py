"""Map keys of the filter programs, and the drop-dst tables kept consistent with their
summary. The one place that knows the layouts of bpf/abi/filter.h on the Python side
(types themselves come from BTF): the manager, the benchmarks and the tests use it.
"""

from __future__ import annotations

import ctypes
import ipaddress
from collections.abc import Iterable
from typing import Any

from membrane.bpf import Map
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


# ---- IPv4 summary: which /24s any prefix touches ---------------------------------------
_FULL = (1 << 256) - 1


def summary_masks(nets: Iterable[IPNetwork], only: set[int] | None = None) -> dict[int, int]:
    """For IPv4 prefixes: summary index (top 16 bits) -> 256-bit mask of touched /24s,
    limited to the indices in `only` when given."""
    masks: dict[int, int] = {}
    for net in nets:
        if net.version != 4:
            continue
        first = int(net.network_address) >> 8
        last = int(net.broadcast_address) >> 8
        indices = range(first >> 8, (last >> 8) + 1)
        if only is not None:
            indices = [i for i in only if indices.start <= i < indices.stop]  # type: ignore[assignment]
        for index in indices:
            lo = max(first, index << 8) & 0xFF
            hi = min(last, (index << 8) | 0xFF) & 0xFF
            masks[index] = masks.get(index, 0) | (((1 << (hi - lo + 1)) - 1) << lo)
    return masks


def _summary_value(mask: int) -> bytes:
    """struct dst_summary: bits[0] holds /24s 0-63 of the /16, little-endian like the CPU."""
    return mask.to_bytes(32, "little")


def _mask_of(value: Any) -> int:
    return int.from_bytes(bytes(value), "little")


class DropDstTables:
    """drop_dst_v4, drop_dst_v6 and drop_dst_v4_summary of one filter, changed together.

    Order keeps every intermediate state as strict as the old or the new list: an added
    prefix enters the trie before its summary bit (until then it is simply not in force
    yet); a removed one leaves the trie before its bit is recomputed."""

    def __init__(self, v4: Map, v6: Map, summary: Map) -> None:
        self.v4, self.v6, self.summary = v4, v6, summary

    def table(self, net: IPNetwork) -> Map:
        return self.v4 if net.version == 4 else self.v6

    def add(self, rules: Iterable[tuple[IPNetwork, int]]) -> int:
        """Insert (prefix, rule id) pairs; returns how many were written."""
        rules = list(rules)
        for version, table in ((4, self.v4), (6, self.v6)):
            table.update_batch((lpm_key(table, n), rid) for n, rid in rules if n.version == version)
        masks = summary_masks(n for n, _ in rules)
        full = _summary_value(_FULL)
        self.summary.update_batch(  # a fully covered /16 needs no read of what was there
            (i, full if mask == _FULL else _summary_value(mask | _mask_of(self.summary.lookup(i))))
            for i, mask in masks.items()
        )
        return len(rules)

    def lookup(self, net: IPNetwork) -> int | None:
        table = self.table(net)
        return table.lookup(lpm_key(table, net))

    def remove(self, nets: Iterable[IPNetwork]) -> list[int]:
        """Delete prefixes; returns the rule ids they had."""
        nets = list(nets)
        freed = []
        for net in nets:
            table = self.table(net)
            key = lpm_key(table, net)
            rule_id = table.lookup(key)
            if rule_id is not None and table.delete(key):
                freed.append(rule_id)
        touched = set(summary_masks(nets))
        if touched:
            remaining = summary_masks((n for n, _ in self.items(version=4)), only=touched)
            self.summary.update_batch((i, _summary_value(remaining.get(i, 0))) for i in touched)
        return freed

    def items(self, version: int | None = None) -> list[tuple[IPNetwork, int]]:
        tables = [t for v, t in ((4, self.v4), (6, self.v6)) if version in (None, v)]
        return [(network_of(k), rid) for t in tables for k, rid in t.items()]
