"""Flow events (rows of `struct flow_event`) as serialized GetFlowsResponse messages, a batch
at a time: what the agent streams to followers and answers queries with, without building a
flow.Flow message per event (~15 us each in Python, 70 us and more on a busy machine).

A flow is the concatenation of its parts (protobuf merges the fields of concatenated
messages, and each field here is in exactly one part):

    time | uuid | IP | l4 and Summary | the rest (who to whom, what happened, which policy)
    | the Service the connection went through (empty for most)

The last four are built by observe.record's own code (fill_addresses, fill_ports,
fill_decision, write_service), once per distinct value of the event fields each reads, and
kept as bytes. The Service is not read from the rows: it is resolved when the rows are
read from the ring (`connection_services`, kept beside them as one code a row) because the
socket LB's record may name another Service, or none, by the time a flow is encoded.
Events equal in everything but their time share one "template" of all three: one numpy
pass over a batch finds them. Per event, only the time, the uuid (both computed for the
whole batch with numpy) and the joining are left.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import numpy as np

from membrane.hubble.flow import flow_pb2
from membrane.observe.record import (
    FlowEvent,
    Resolver,
    ServiceTag,
    fill_addresses,
    fill_decision,
    fill_ports,
    flow_events,
    sequence_uuid,
    write_service,
)

CACHE_LIMIT = 1 << 15  # entries a cache keeps; a full one starts over
# Row fields no part of a flow reads: left out of a template's key. The time (h.ts_ns) is
# per event; anything else (a field added to the struct later) is part of the key.
NOT_IN_TEMPLATE = frozenset({"h.ts_ns", "h.cpu", "len", "pad"})
_NANOS = 1_000_000_000
_SERVICE_CODE = np.uint32  # a row's Service: 0 none, else a ServiceTags code
_UUID_LOW_MASK = (1 << 62) - 1  # sequence_uuid's: the rest is the variant bits
_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def varint(value: int) -> bytes:
    """Protobuf's base-128 varint of a non-negative integer."""
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _tag(number: int) -> bytes:
    return varint(number << 3 | 2)  # wire type 2: length-delimited


_VARINTS = [varint(n) for n in range(1 << 14)]  # lengths of messages, looked up
_FLOW_TIME = _tag(1)  # Flow.time
_FLOW_UUID = _tag(34) + varint(36)  # Flow.uuid, always 36 characters
_RESPONSE_FLOW = _tag(1)  # GetFlowsResponse.flow
_RESPONSE_NODE = _tag(1000)  # GetFlowsResponse.node_name
_RESPONSE_TIME = _tag(1001)  # GetFlowsResponse.time


def _varint_length(value: int) -> bytes:
    return _VARINTS[value] if value < len(_VARINTS) else varint(value)


class ServiceTags:
    """Codes for the Services flows name ((reply, namespace, name) -> 1, 2, ...), the same
    for every encoder and never reused: rows carry the code of their Service from ingest,
    and an encoder's caches may key on it. Grows by the Services the agent ever named.
    Codes are taken on the reader's thread, read on others: a code is handed out only
    after its tag is in place."""

    def __init__(self) -> None:
        self._tags: list[ServiceTag | None] = [None]
        self._codes: dict[ServiceTag, int] = {}

    def code(self, tag: ServiceTag | None) -> int:
        if tag is None:
            return 0
        code = self._codes.get(tag)
        if code is None:
            self._tags.append(tag)
            code = self._codes[tag] = len(self._tags) - 1
        return code

    def tag(self, code: int) -> ServiceTag | None:
        return self._tags[code]


SERVICE_TAGS = ServiceTags()


class FlowEncoder:
    """Encodes batches of rows named by one resolver (the agent's snapshot of the time),
    for one node. Its caches are its own: a new snapshot gets a new encoder. Batches may be
    encoded from two threads at once (the event loop and the flow log's): the caches hold
    pure functions of their keys, so a race at worst builds a part twice."""

    def __init__(self, resolver: Resolver, node_name: str) -> None:
        self.resolver = resolver
        self.node_name = node_name
        self._node_field = _RESPONSE_NODE + varint(len(node_name.encode())) + node_name.encode()
        self._templates: dict[bytes, bytes] = {}
        self._addresses: dict[Hashable, bytes] = {}
        self._ports: dict[Hashable, bytes] = {}
        self._decisions: dict[Hashable, bytes] = {}
        self._services: dict[Hashable, bytes] = {}  # by ServiceTags code
        self._key_bytes: dict[np.dtype, np.ndarray] = {}
        self.parts_built = 0  # parts built with record.py (a cache miss each)

    def connection_services(self, rows: np.ndarray) -> np.ndarray | None:
        """Each row's Service code (ServiceTags; 0: none), or None when no row has one:
        asked when the rows are read, and kept with them for `encode`. A Service is named
        by (client, backend, backend's port, protocol) (`connection_service`): the client's
        requests are looked up first, then the backend's replies among the rest; only rows
        whose port there is a known backend's (the resolver's `backend_ports`, when it has
        one) are looked at, each distinct key once (the client's port is not in it: a flood
        of connections to one backend is one lookup)."""
        service_of = getattr(self.resolver, "connection_service", None)
        if service_of is None or not len(rows):
            return None
        backend_ports = getattr(self.resolver, "backend_ports", None)
        known = None
        if backend_ports is not None:
            ports = backend_ports()
            if not ports:
                return None
            known = np.fromiter(ports, dtype=np.int64, count=len(ports))
        codes = np.zeros(len(rows), dtype=_SERVICE_CODE)
        for reply in (False, True):
            _resolve_side(service_of, codes, rows, known, reply)
        return codes if codes.any() else None

    def encode(
        self,
        rows: np.ndarray,
        first_seq: int,
        uuid_prefix: int,
        wall_offset_ns: int,
        services: np.ndarray | None = None,
    ) -> list[bytes]:
        """Each row's GetFlowsResponse, serialized; row i is item `first_seq + i` of the
        store (its uuid), happened at `wall_offset_ns + ts_ns` (Unix ns) and went through
        the Service of code `services[i]` (connection_services; None: no row did)."""
        n = len(rows)
        if not n:
            return []
        flat = np.ascontiguousarray(rows)
        matrix = flat.view(np.uint8).reshape(n, flat.dtype.itemsize)
        width = int(self._template_bytes(flat.dtype).size)
        keys = np.ascontiguousarray(matrix[:, self._template_bytes(flat.dtype)])
        if services is not None:  # the Service is part of the template
            codes = np.ascontiguousarray(services, dtype=_SERVICE_CODE)
            keys = np.hstack((keys, codes.view(np.uint8).reshape(n, codes.itemsize)))
            width += codes.itemsize
        distinct, first, inverse = np.unique(
            keys.view(f"V{width}").ravel(), return_index=True, return_inverse=True
        )
        firsts = (
            [0] * len(first)
            if services is None
            else np.asarray(services, dtype=_SERVICE_CODE)[first].tolist()
        )
        templates = self._templates_of(distinct, flat[first], firsts)
        times, time_ends = _timestamps(flat["h"]["ts_ns"], wall_offset_ns)
        uuids = _uuid_fields(uuid_prefix, first_seq, n)
        node = self._node_field
        out = []
        start = 0
        for i, (end, template) in enumerate(zip(time_ends.tolist(), inverse.tolist(), strict=True)):
            stamp = times[start:end]  # the Timestamp, with its length in front
            body = b"".join((_FLOW_TIME, stamp, uuids[i * 39 : i * 39 + 39], templates[template]))
            out.append(
                b"".join(
                    (_RESPONSE_FLOW, _varint_length(len(body)), body, node, _RESPONSE_TIME, stamp)
                )
            )
            start = end
        return out

    def _template_bytes(self, dtype: np.dtype) -> np.ndarray:
        """The byte positions of a row that a template's key is made of."""
        positions = self._key_bytes.get(dtype)
        if positions is None:
            positions = np.flatnonzero(_key_mask(dtype))
            self._key_bytes[dtype] = positions
        return positions

    def _templates_of(self, keys: np.ndarray, rows: np.ndarray, services: list[int]) -> list[bytes]:
        """The template of each distinct key (`rows`: a row with that key each, and its
        Service's code); the rows of those not yet known are decoded together."""
        names = [key.tobytes() for key in keys]
        templates = [self._templates.get(name) for name in names]
        missing = [j for j, template in enumerate(templates) if template is None]
        if missing:
            for j, ev in zip(missing, flow_events(rows[missing]), strict=True):
                templates[j] = self._template(ev, services[j])
                _remember(self._templates, names[j], templates[j])
        return templates  # type: ignore[return-value]

    def _template(self, ev: FlowEvent, service: int) -> bytes:
        return b"".join(
            (
                self._part(self._addresses, (ev.saddr, ev.daddr, ev.family), fill_addresses, ev),
                self._part(
                    self._ports,
                    (ev.proto, ev.sport, ev.dport, ev.tcp_flags, ev.family),
                    fill_ports,
                    ev,
                ),
                self._part(self._decisions, _decision_key(ev), self._fill_decision, ev),
                self._service_part(service),
            )
        )

    def _service_part(self, code: int) -> bytes:
        if not code:
            return b""
        part = self._services.get(code)
        if part is None:
            flow = flow_pb2.Flow()
            write_service(flow, SERVICE_TAGS.tag(code))
            part = flow.SerializeToString()
            self.parts_built += 1
            _remember(self._services, code, part)
        return part

    def _fill_decision(self, flow: flow_pb2.Flow, ev: FlowEvent) -> None:
        fill_decision(flow, ev, self.resolver, self.node_name)

    def _part(
        self,
        cache: dict[Hashable, bytes],
        key: Hashable,
        fill: Callable[[flow_pb2.Flow, FlowEvent], None],
        ev: FlowEvent,
    ) -> bytes:
        part = cache.get(key)
        if part is None:
            flow = flow_pb2.Flow()
            fill(flow, ev)
            part = flow.SerializeToString()
            self.parts_built += 1
            _remember(cache, key, part)
        return part


def _resolve_side(
    service_of: Callable[..., tuple[str, str] | None],
    codes: np.ndarray,
    rows: np.ndarray,
    known: np.ndarray | None,
    reply: bool,
) -> None:
    """Codes of the rows still without one, as the client's requests (reply False:
    saddr to daddr:dport) or the backend's replies (daddr to saddr:sport)."""
    port = rows["sport" if reply else "dport"]
    pick = codes == 0
    if known is not None:
        pick &= np.isin(port, known)
    at = np.flatnonzero(pick)
    if not len(at):
        return
    family = rows["family"][at] if "family" in (rows.dtype.names or ()) else 0
    keys = np.column_stack(
        (
            np.asarray(rows["saddr"][at], dtype=np.uint32).reshape(len(at), -1),
            np.asarray(rows["daddr"][at], dtype=np.uint32).reshape(len(at), -1),
            port[at],
            rows["proto"][at],
            np.broadcast_to(family, len(at)),
        )
    ).astype(np.uint32)
    first, inverse = _distinct_rows(keys)
    found = []
    for ev in flow_events(rows[at[first]]):
        if reply:
            named = service_of(ev.daddr, ev.saddr, ev.sport, ev.proto)
        else:
            named = service_of(ev.saddr, ev.daddr, ev.dport, ev.proto)
        found.append(SERVICE_TAGS.code(None if named is None else (reply, *named)))
    codes[at] = np.array(found, dtype=_SERVICE_CODE)[inverse]


def _distinct_rows(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """np.unique's first index and inverse for the rows of an unsigned matrix: on a 64-bit
    hash of each row (a sort of numbers, where one of wide void rows costs ~10 times as
    much), checked; rows that collide are told apart the slow way."""
    mixed = np.zeros(len(keys), dtype=np.uint64)
    for column in keys.T.astype(np.uint64):
        mixed = (mixed ^ column) * np.uint64(0x100000001B3)
    _, first, inverse = np.unique(mixed, return_index=True, return_inverse=True)
    inverse = inverse.ravel()
    if not (keys[first][inverse] == keys).all():  # a collision
        wide = np.ascontiguousarray(keys)
        _, first, inverse = np.unique(
            wide.view(f"V{wide.shape[1] * wide.itemsize}").ravel(),
            return_index=True,
            return_inverse=True,
        )
        inverse = inverse.ravel()
    return first, inverse


def _decision_key(ev: FlowEvent) -> Hashable:
    """The fields fill_decision reads (both addresses: the peer's is one of them)."""
    return (
        ev.version,
        ev.type,
        ev.dir,
        ev.match,
        ev.rule_id,
        ev.policy_rev,
        ev.ep_id,
        ev.peer_identity,
        ev.drop_reason,
        ev.saddr,
        ev.daddr,
        ev.family,
    )


def _remember(cache: dict, key: Hashable, value: bytes) -> None:
    if len(cache) >= CACHE_LIMIT:
        cache.clear()
    cache[key] = value


def _key_mask(dtype: np.dtype, prefix: str = "") -> np.ndarray:
    """True for the bytes of the fields that are in a template's key."""
    mask = np.zeros(dtype.itemsize, dtype=bool)
    for name in dtype.names or ():
        sub, offset = dtype.fields[name][:2]
        path = prefix + name
        if path in NOT_IN_TEMPLATE:
            continue
        if sub.names:
            mask[offset : offset + sub.itemsize] = _key_mask(sub, path + ".")
        else:
            mask[offset : offset + sub.itemsize] = True
    return mask


def _varint_matrix(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each (non-negative) value's varint as a row of 10 bytes, and its length."""
    v = values.astype(np.uint64)
    groups = np.empty((len(v), 10), dtype=np.uint8)
    length = np.ones(len(v), dtype=np.int64)
    for k in range(10):
        groups[:, k] = (v >> np.uint64(7 * k)) & np.uint64(0x7F)
        if k:
            length += v >= np.uint64(1 << (7 * k))
    more = np.arange(10) < (length - 1)[:, None]  # every byte but the last goes on
    groups |= more.astype(np.uint8) << 7
    return groups, length


def _timestamps(ts_ns: np.ndarray, wall_offset_ns: int) -> tuple[bytes, np.ndarray]:
    """The rows' Timestamps (seconds, and nanos when not 0), each after its one-byte
    length, back to back; and where each ends."""
    seconds, nanos = np.divmod(ts_ns.astype(np.int64) + wall_offset_ns, _NANOS)
    n = len(ts_ns)
    sec_bytes, sec_len = _varint_matrix(seconds)
    nano_bytes, nano_len = _varint_matrix(nanos)
    has_nanos = nanos != 0
    body_len = 1 + sec_len + has_nanos * (1 + nano_len)
    matrix = np.zeros((n, 23), dtype=np.uint8)
    matrix[:, 0] = body_len  # < 128: one byte
    matrix[:, 1] = 0x08  # seconds = 1, varint
    matrix[:, 2:12] = sec_bytes
    matrix[:, 12] = 0x10  # nanos = 2, varint
    matrix[:, 13:23] = nano_bytes
    column = np.arange(23)
    keep = (column < 2) | ((column >= 2) & (column < 12) & (column - 2 < sec_len[:, None]))
    keep |= has_nanos[:, None] & (
        (column == 12) | ((column >= 13) & (column - 13 < nano_len[:, None]))
    )
    return matrix[keep].tobytes(), np.cumsum(body_len + 1)


def _uuid_fields(prefix: int, first_seq: int, n: int) -> bytes:
    """Flow.uuid fields (tag, length, 36 characters: 39 bytes each) of items first_seq..
    first_seq+n-1: sequence_uuid's, its low 64 bits (variant and sequence number) in hex
    computed for the whole batch."""
    head = _FLOW_UUID + sequence_uuid(prefix, first_seq)[:19].encode()
    low = (np.arange(first_seq, first_seq + n, dtype=np.uint64) & np.uint64(_UUID_LOW_MASK)) | (
        np.uint64(1 << 63)
    )
    shifts = np.arange(60, -4, -4, dtype=np.uint64)
    digits = _HEX[((low[:, None] >> shifts) & np.uint64(0xF)).astype(np.intp)]
    matrix = np.empty((n, 39), dtype=np.uint8)
    matrix[:, :22] = np.frombuffer(head, dtype=np.uint8)
    matrix[:, 22:26] = digits[:, :4]
    matrix[:, 26] = ord("-")
    matrix[:, 27:] = digits[:, 4:]
    return matrix.tobytes()
