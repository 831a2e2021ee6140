"""Flow counts for hubble_*, kept by the flow reader.

`FlowCounts.observe` runs on the reader's thread for every batch of events. It counts
events by a tuple of their fields first and turns each distinct tuple into label values
after: for the ring buffer's numpy rows the tuples are counted with numpy (np.unique over
the columns the metrics read), so the cost per event is a share of a few array passes; for
decoded events (the kernel drop monitor's) one tuple and one dictionary update each. The counts
are plain dictionaries only that thread writes; a scrape copies them (`dict(d)` is one
step under the GIL), so neither side waits for the other.
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np

from membrane.abi import (
    MEMBRANE_EVENT_VERSION,
    Direction,
    FlowEventType,
    FlowMatch,
    Identity,
    IpProto,
)
from membrane.metrics import names

if TYPE_CHECKING:
    from membrane.agent.snapshot import Snapshot
    from membrane.observe.record import FlowEvent

_DROP, _VERDICT, _TRACE = FlowEventType.DROP, FlowEventType.POLICY_VERDICT, FlowEventType.TRACE
_TCP_FIN, _TCP_SYN, _TCP_RST, _TCP_ACK = 0x01, 0x02, 0x04, 0x10  # TCP header bits

Labels = tuple[str, ...]
# What the metrics read of an event, as one tuple made in C (attrgetter): events with equal
# shapes are counted together.
_shape = operator.attrgetter(
    "type", "version", "proto", "family", "dir", "drop_reason", "tcp_flags", "match",
    "rule_id", "peer_identity",
)  # fmt: skip


class FlowCounts:
    """Counts per label values of each flow metric (names as in Hubble's handlers)."""

    def __init__(self) -> None:
        self.flows: dict[Labels, int] = {}  # (protocol, type, subtype, verdict)
        self.drops: dict[Labels, int] = {}  # (reason, protocol)
        self.policy_verdicts: dict[Labels, int] = {}  # (direction, match, action)
        self.tcp_flags: dict[Labels, int] = {}  # (flag, family)
        self.unsupported = 0

    def observe(self, events: Iterable[FlowEvent] | np.ndarray, snapshot: Snapshot) -> None:
        """Count one batch: decoded events, or a RingBuffer batch of `struct flow_event`
        rows; `snapshot` names the rules that decided (one read per batch)."""
        shapes = (
            _row_shapes(events) if isinstance(events, np.ndarray) else Counter(map(_shape, events))
        )
        for shape, n in shapes.items():
            self._count(shape, n, snapshot)

    def _count(self, shape: tuple, n: int, snapshot: Snapshot) -> None:
        kind, version, proto, family, direction, reason, flags, match, rule_id, peer = shape
        from_host = direction == Direction.INGRESS and peer == Identity.HOST
        if version != MEMBRANE_EVENT_VERSION or kind not in (_DROP, _VERDICT, _TRACE):
            self.unsupported += n
            return
        dropped = kind == _DROP
        protocol = _protocol(proto)
        verdict = "DROPPED" if dropped else "FORWARDED"
        if kind == _TRACE:
            point = names.TRACE_POINTS[direction == Direction.EGRESS]
            _add(self.flows, (protocol, names.TYPE_TRACE, point, verdict), n)
        else:
            flow_type = names.TYPE_DROP if dropped else names.TYPE_POLICY_VERDICT
            _add(self.flows, (protocol, flow_type, "", verdict), n)
        if dropped:
            desc = names.HUBBLE_DROP_REASONS.get(reason, names.HUBBLE_UNKNOWN_DROP)
            _add(self.drops, (desc, protocol), n)
        elif proto == IpProto.TCP:  # every forwarded flow, verdicts and traces, as Hubble
            ip = "IPv6" if family == 6 else "IPv4"
            for flag in _tcp_flag_names(flags):
                _add(self.tcp_flags, (flag, ip), n)
        if kind == _TRACE:
            return
        # Cilium reports a policy verdict for every new flow policy allowed and every
        # packet policy denied; Hubble leaves out those the host sent.
        if (not dropped or reason in names.POLICY_DROPS) and not from_host:
            way = "ingress" if direction == Direction.INGRESS else "egress"
            _add(self.policy_verdicts, (way, _match(match, rule_id, snapshot), verdict.lower()), n)


# The bits each _shape field takes in a packed key: compact widths that fit one 64-bit key
# for the values a node sees (rule ids below 32768), and full widths for two keys.
_COMPACT_BITS = (8, 8, 4, 4, 8, 8, 1, 8, 15)
_FULL_BITS = ((16, 8, 8, 8, 8, 8, 1), (16, 32))


def _row_shapes(rows: np.ndarray) -> dict[tuple, int]:
    """_shape counts of a batch of rows, with numpy: each row's fields packed into one
    integer key (two when a value is too wide), whose distinct values np.unique counts
    (integers sort fast; structured rows cost microseconds each), then unpacked."""
    from membrane.observe.record import supported_rows

    readable = supported_rows(rows)
    shapes: dict[tuple, int] = {}
    if unreadable := len(rows) - int(readable.sum()):
        shapes[(0, -1, 0, 0, 0, 0, 0, 0, 0, 0)] = unreadable  # counted as unsupported
        rows = rows[readable]
    if not len(rows):
        return shapes
    family = rows["family"].copy()
    family[family == 0] = 4  # dropped before its IP header: FlowEvent reads it as 4
    # Only "is it the host" of the peer matters (_count): fewer distinct shapes.
    host = rows["peer_identity"] == Identity.HOST
    columns = (
        rows["h"]["type"], rows["proto"], family, rows["dir"], rows["tcp_flags"],
        rows["match"], host, rows["drop_reason"], rows["rule_id"],
    )  # fmt: skip
    if all(int(c.max()) >> bits == 0 for c, bits in zip(columns, _COMPACT_BITS, strict=True)):
        keys, counts = np.unique(_pack(columns, _COMPACT_BITS), return_counts=True)
        values = [_unpack(key, _COMPACT_BITS) for key in keys.tolist()]
    else:
        low, high = _FULL_BITS
        keys1, inverse1 = np.unique(_pack(columns[:7], low), return_inverse=True)
        keys2, inverse2 = np.unique(_pack(columns[7:], high), return_inverse=True)
        pairs = inverse1.astype(np.int64) * len(keys2) + inverse2
        keys, counts = np.unique(pairs, return_counts=True)
        values = [
            _unpack(int(keys1[p // len(keys2)]), low) + _unpack(int(keys2[p % len(keys2)]), high)
            for p in keys.tolist()
        ]
    for (kind, proto, fam, way, flags, match, is_host, reason, rule), n in zip(
        values, counts.tolist(), strict=True
    ):
        peer = Identity.HOST if is_host else 0
        shape = (kind, MEMBRANE_EVENT_VERSION, proto, fam, way, reason, flags, match, rule, peer)
        shapes[shape] = n
    return shapes


def _pack(columns: tuple, widths: tuple[int, ...]) -> np.ndarray:
    key = np.zeros(len(columns[0]), dtype=np.uint64)
    shift = 0
    for column, bits in zip(columns, widths, strict=True):
        key |= column.astype(np.uint64) << np.uint64(shift)
        shift += bits
    return key


def _unpack(key: int, widths: tuple[int, ...]) -> tuple[int, ...]:
    values = []
    for bits in widths:
        values.append(key & ((1 << bits) - 1))
        key >>= bits
    return tuple(values)


def _add(counts: dict[Labels, int], labels: Labels, n: int) -> None:
    counts[labels] = counts.get(labels, 0) + n


def _protocol(proto: int) -> str:
    return names.PROTOCOLS.get(proto) or names.ICMP_PROTOCOLS.get(proto) or names.UNKNOWN_L4


def _tcp_flag_names(flags: int) -> list[str]:
    """Hubble's tcp handler: FIN, then SYN-ACK or SYN, then RST."""
    found = []
    if flags & _TCP_FIN:
        found.append("FIN")
    if flags & _TCP_SYN:
        found.append("SYN-ACK" if flags & _TCP_ACK else "SYN")
    if flags & _TCP_RST:
        found.append("RST")
    return found


def _match(match: int, rule_id: int, snapshot: Snapshot) -> str:
    if match != FlowMatch.RULE or rule_id not in snapshot.rules:
        return names.POLICY_MATCH_NONE
    return names.POLICY_MATCH_BY_SHAPE[snapshot.rule_shapes.get(rule_id, (True, True))]
