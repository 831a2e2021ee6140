"""Reads the datapath's flow events and hands them to the flow store without a Python step
per event: a native thread drains the ring into a staging ring (native/ringdrain.c), and a
reader thread takes batches from there (numpy arrays of `struct flow_event` rows); each
goes to the store as one RawSegment with the encoder of the snapshot that names it; the
metrics count the batch with numpy; rows become Hubble's GetFlowsResponses only when a
query, a follower or the flow log reads them, serialized a chunk at a time (observe.encode:
1.8-14 us a flow, where building each flow.Flow took ~28 us; at a million events a second,
building them all is what lost events before). Lost-events notices go as built items.

The reader sees the agent only through `AgentResolver`, which answers each batch from one
published snapshot (membrane.agent.snapshot), so it needs no lock.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from membrane.bpf import BpfObject
from membrane.bpf.btf import Btf
from membrane.bpf.ktime import ktime_to_unix
from membrane.bpf.object import object_path
from membrane.bpf.ringbuf import RingBuffer
from membrane.hubble.flow import flow_pb2
from membrane.hubble.observer.observer_pb2 import GetFlowsResponse
from membrane.native.ringdrain import RingDrain
from membrane.observe.encode import FlowEncoder
from membrane.observe.record import (
    EndpointView,
    RuleView,
    lost_response,
    supported_rows,
    wall_offset_ns,
)
from membrane.observe.store import Segment

if TYPE_CHECKING:
    from membrane.agent.agent import Agent
    from membrane.agent.snapshot import Snapshot
    from membrane.agent.state import EndpointRecord
    from membrane.service.manager import ServiceManager

log = logging.getLogger("membrane.agent")
POLL_MS = 100
# The node's `events` ring: 100 ms of events at a million a second (100k records of 80
# bytes and an 8-byte header: 8.8 MB).
EVENTS_RING_BYTES = 16 << 20
# The ring is emptied by a native thread that never takes the GIL and runs ahead of every
# ordinary thread (native/ringdrain.c) as the producers wake it (every 16 KiB, ~190 events),
# into this many rows of our memory (40 MiB, touched only as a flood fills them; ~0.5 s of
# a million events a second), where the reader takes them from: a busy interpreter or CPU
# (a follower served, its client, a large query) delays the reader, never the datapath's
# ring. Rows the reader falls this far behind on are dropped there and reported
# (OBSERVER_EVENTS_QUEUE).
STAGING_ROWS = 1 << 19
TAKE_ROWS = 1 << 16  # the most rows one batch takes (5 MiB): more are taken at once after
LOSS_CHECK_S = 0.05  # how often the ring's loss counter (a syscall) is read
# Batching: every batch costs ~0.4 ms however small (numpy calls, the hand-over): batches
# of a few hundred events cost ~2 us an event (bench/RESULTS.md, flow_pipeline). So once
# rows are staged the reader lets more gather for BATCH_WAIT_S (a flow is delivered that
# much later): at a million events a second, batches of ~4,000.
BATCH_WAIT_S = 0.004
# The reader's thread runs ahead of ordinary ones where the agent may (root): a follower's
# client or a flood's senders taking the CPUs delay it less.
READER_NICE = -20


class AgentResolver:
    """Names for the numbers in flow events, from one snapshot."""

    def __init__(self, snapshot: Snapshot, services: ServiceManager | None = None) -> None:
        self.snapshot = snapshot
        self.services = services  # names the Service of a socket LB's connection
        self._host = {str(a) for a in snapshot.host_addresses}
        # Flows of one batch name the same few endpoints over and over.
        self._by_id: dict[int, EndpointView | None] = {}
        self._by_ip: dict[str, EndpointView | None] = {}

    def _view(self, ep: EndpointRecord | None) -> EndpointView | None:
        if ep is None:
            return None
        return EndpointView(
            id=ep.id,
            namespace=ep.namespace,
            name=ep.name,
            ipv4=ep.ipv4,
            identity=ep.identity,
            labels=self.identity_labels(ep.identity),
        )

    def endpoint_by_id(self, ep_id: int) -> EndpointView | None:
        if ep_id not in self._by_id:
            self._by_id[ep_id] = self._view(self.snapshot.endpoints.get(ep_id))
        return self._by_id[ep_id]

    def endpoint_by_ip(self, ip: str) -> EndpointView | None:
        if ip not in self._by_ip:
            self._by_ip[ip] = self._view(self.snapshot.endpoints_by_ip.get(ip))
        return self._by_ip[ip]

    def identity_labels(self, identity: int) -> list[str]:
        return sorted(str(lb) for lb in self.snapshot.identity_labels.get(identity, ()))

    def rule(self, rule_id: int) -> RuleView | None:
        ref = self.snapshot.rules.get(rule_id) if rule_id else None
        if ref is None:
            return None
        l3, l4 = self.snapshot.rule_shapes.get(rule_id, (True, True))
        return RuleView(
            kind=ref.kind,
            namespace=ref.namespace,
            name=ref.name,
            direction=ref.direction,
            deny=ref.deny,
            index=ref.index,
            description=ref.describe(),
            l3=l3,
            l4=l4,
        )

    def connection_service(
        self, client: str, backend: str, port: int, protocol: int
    ) -> tuple[str, str] | None:
        """(namespace, name) of the Service whose frontend `client`'s connection to the
        backend went through (observe.record.fill_service)."""
        if self.services is None:
            return None
        ep = self.snapshot.endpoints_by_ip.get(client)
        if ep is not None:
            # the socket LB's record (by netns) or the endpoint programs' (by id)
            return self.services.connection_service(ep.netns, backend, port, protocol, ep.id)
        if client in self._host:
            return self.services.connection_service(
                self.services.node_netns, backend, port, protocol
            )
        return None

    def backend_ports(self) -> frozenset[int]:
        """The ports of the Services' backends: a flow with neither port is no Service's
        (FlowEncoder.connection_services skips it without a lookup)."""
        if self.services is None:
            return frozenset()
        return self.services.flow_index.backend_ports

    def ktime_to_wall(self, ts_ns: int) -> float:
        return ktime_to_unix(ts_ns)


class RawSegment(Segment):
    """One polled batch in the store: the rows as the ring gave them, the encoder of the
    snapshot they were read with and the Service each row's connection went through,
    resolved here, as the rows are read (the socket LB's record may name another Service,
    or none, when the flows are encoded). Rows become serialized GetFlowsResponses a chunk at
    a time when something reads them (observe.encode), and a built message only when a
    query, a filter or the flow log asks for the item. Reads may come from the event loop
    and the flow log's thread at once: a chunk encoded twice is encoded the same (a
    flow's uuid comes from its sequence number)."""

    _CHUNK = 256  # rows encoded together
    only_flows = True

    def __init__(self, rows: np.ndarray, encoder: FlowEncoder) -> None:
        self.rows = rows
        self.encoder = encoder
        self.services = encoder.connection_services(rows)  # None: no row's
        # Unix time at ktime 0, read once for the batch: every row's time from it.
        self.wall_offset_ns = wall_offset_ns(encoder.resolver)
        self.uuid_prefix = 0
        self._chunks: dict[int, list[bytes]] = {}
        self._built: list[Any] = [None] * len(rows)

    def bind(self, start: int, uuid_prefix: int) -> None:
        self.start, self.uuid_prefix = start, uuid_prefix

    def __len__(self) -> int:
        return len(self.rows)

    def _chunk(self, chunk: int) -> list[bytes]:
        encoded = self._chunks.get(chunk)
        if encoded is None:
            first = chunk * self._CHUNK
            encoded = self.encoder.encode(
                self.rows[first : first + self._CHUNK],
                self.start + first,
                self.uuid_prefix,
                self.wall_offset_ns,
                None if self.services is None else self.services[first : first + self._CHUNK],
            )
            self._chunks[chunk] = encoded
        return encoded

    def messages(self, lo: int, hi: int) -> list[bytes]:
        out: list[bytes] = []
        while lo < hi:
            chunk, at = divmod(lo, self._CHUNK)
            take = min(hi - lo, self._CHUNK - at)
            out += self._chunk(chunk)[at : at + take]
            lo += take
        return out

    def item(self, i: int) -> Any:
        built = self._built[i]
        if built is None:
            chunk, at = divmod(i, self._CHUNK)
            built = GetFlowsResponse.FromString(self._chunk(chunk)[at])
            self._built[i] = built
        return built

    def time_ns(self, i: int) -> int:
        return int(self.rows[i]["h"]["ts_ns"]) + self.wall_offset_ns


class FlowReader:
    """`deliver` gets lists of built items (lost-events notices) and RawSegments, in the
    order they happened. `observe`, when given, also sees every batch of rows (a numpy
    array, the unsupported ones included) with the snapshot that names them (metrics
    count there, on this thread)."""

    def __init__(
        self,
        agent: Agent,
        deliver: Callable[[list[Any] | Segment], Any],
        observe: Callable[[np.ndarray, Snapshot], Any] | None = None,
    ) -> None:
        self.agent = agent
        self.deliver = deliver
        self.observe = observe
        dtype = Btf.from_file(object_path("endpoint")).dtype("flow_event")
        with BpfObject.open("endpoint") as obj:  # the endpoints' wakeup threshold
            self._wakeup_bytes = int(obj.get_config("events_wakeup_bytes"))
        self._ring = RingBuffer(agent.maps.events, dtype=dtype, lost_map=agent.maps.events_lost)
        self._drain: RingDrain | None = None  # started with the thread
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flows", daemon=True)
        self.unsupported = 0
        self._encoder: tuple[Snapshot, FlowEncoder] | None = None

    @property
    def lost(self) -> int:
        """Events the datapath's ring had no room for."""
        return self._ring.lost

    @property
    def dropped(self) -> int:
        """Events the reader fell too far behind on (OBSERVER_EVENTS_QUEUE)."""
        return self._drain.counts().dropped if self._drain is not None else 0

    def backlog(self) -> int:
        """Events drained from the ring, not yet handed over (FlowStore.reader_backlog)."""
        return self._drain.waiting if self._drain is not None else 0

    def _encoder_for(self, snapshot: Snapshot, node: str) -> FlowEncoder:
        """One encoder (and its caches of flow parts) per snapshot: batches read while
        nothing in the agent changed share what was built for the first."""
        if self._encoder is None or self._encoder[0] is not snapshot:
            resolver = AgentResolver(snapshot, self.agent.services)
            self._encoder = snapshot, FlowEncoder(resolver, node)
        return self._encoder[1]

    def start(self) -> None:
        self._drain = RingDrain(
            self._ring, self._ring.dtype, STAGING_ROWS, POLL_MS, self._wakeup_bytes
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._drain is not None:
            self._drain.wake()
        self._thread.join(timeout=2)
        if self._drain is not None:
            self._drain.close()
        self._ring.close()

    def _run(self) -> None:
        with contextlib.suppress(OSError):  # ahead of ordinary threads, where we may
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), READER_NICE)
        node = self.agent.config.node_name
        drain = self._drain
        assert drain is not None
        reported = {flow_pb2.PERF_EVENT_RING_BUFFER: self._ring.lost, _QUEUE: 0}
        behind, loss_check = False, 0.0
        while not self._stop.is_set():
            try:
                if not behind:
                    # Until rows are staged (a quiet stream's within POLL_MS: the drain
                    # thread's longest wait), then a batch's worth of time.
                    drain.wait(POLL_MS / 1000)
                    if self._stop.wait(BATCH_WAIT_S):
                        break
                batch = drain.take(TAKE_ROWS)
                behind = len(batch) == TAKE_ROWS
                if (now := time.monotonic()) >= loss_check:
                    loss_check = now + LOSS_CHECK_S
                    counts = {
                        flow_pb2.PERF_EVENT_RING_BUFFER: self._ring.lost,
                        _QUEUE: drain.counts().dropped,
                    }
                    notices = [
                        lost_response(source, total - reported[source], node)
                        for source, total in counts.items()
                        if total > reported[source]
                    ]
                    if notices:  # where they are missing
                        self.deliver(notices)
                        reported = counts
                if len(batch):
                    snapshot = self.agent.snapshot
                    if self.observe is not None:
                        self.observe(batch, snapshot)
                    readable = supported_rows(batch)
                    if not readable.all():  # another layout version or an unknown type
                        self.unsupported += len(batch) - int(readable.sum())
                        batch = batch[readable]
                    if len(batch):
                        self.deliver(RawSegment(batch, self._encoder_for(snapshot, node)))
            except Exception:
                log.exception("flow reader failed; going on")


_QUEUE = flow_pb2.OBSERVER_EVENTS_QUEUE
