"""Reads the datapath's flow events on a thread of its own and turns them into Hubble's
GetFlowsResponse messages: flows, and lost-events notices when the ring buffer overflowed.

The reader sees the agent only through `AgentResolver`, which answers each batch from one
published snapshot (membrane.agent.snapshot), so it needs no lock.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from membrane.bpf.btf import Btf
from membrane.bpf.ktime import ktime_to_unix
from membrane.bpf.object import object_path
from membrane.bpf.ringbuf import RingBuffer
from membrane.hubble.flow import flow_pb2
from membrane.observe.record import (
    EndpointView,
    FlowEvent,
    RuleView,
    UnsupportedEvent,
    event_response,
    flow_events,
    lost_response,
)

if TYPE_CHECKING:
    from membrane.agent.agent import Agent
    from membrane.agent.snapshot import Snapshot
    from membrane.agent.state import EndpointRecord

log = logging.getLogger("membrane.agent")
POLL_MS = 100


class AgentResolver:
    """Names for the numbers in flow events, from one snapshot."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

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
        return self._view(self.snapshot.endpoints.get(ep_id))

    def endpoint_by_ip(self, ip: str) -> EndpointView | None:
        return self._view(self.snapshot.endpoints_by_ip.get(ip))

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

    def ktime_to_wall(self, ts_ns: int) -> float:
        return ktime_to_unix(ts_ns)


class FlowReader:
    """`observe`, when given, also sees every batch of decoded events with the snapshot
    that names them (metrics count there, on this thread)."""

    def __init__(
        self,
        agent: Agent,
        deliver: Callable[[list[Any]], Any],  # observer.GetFlowsResponse messages
        observe: Callable[[list[FlowEvent], Snapshot], Any] | None = None,
    ) -> None:
        self.agent = agent
        self.deliver = deliver
        self.observe = observe
        dtype = Btf.from_file(object_path("endpoint")).dtype("flow_event")
        self._ring = RingBuffer(agent.maps.events, dtype=dtype, lost_map=agent.maps.events_lost)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flows", daemon=True)
        self.unsupported = 0

    @property
    def lost(self) -> int:
        return self._ring.lost

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._ring.close()

    def _run(self) -> None:
        node = self.agent.config.node_name
        reported_lost = self._ring.lost
        while not self._stop.is_set():
            try:
                batch = self._ring.poll(POLL_MS)
                records = []
                if (lost := self._ring.lost) > reported_lost:  # where they are missing
                    source = flow_pb2.PERF_EVENT_RING_BUFFER
                    records.append(lost_response(source, lost - reported_lost, node))
                    reported_lost = lost
                if len(batch):
                    snapshot = self.agent.snapshot
                    resolver = AgentResolver(snapshot)
                    events = flow_events(batch)
                    if self.observe is not None:
                        self.observe(events, snapshot)
                    for event in events:
                        try:
                            records.append(event_response(event, resolver, node))
                        except UnsupportedEvent:
                            self.unsupported += 1
                if records:
                    self.deliver(records)
            except Exception:
                log.exception("flow reader failed; going on")
