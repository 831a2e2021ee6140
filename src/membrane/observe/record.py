"""Flow records: the endpoint datapath's `struct flow_event` (bpf/abi/endpoint.h) as
Hubble's flow.Flow message (membrane.hubble), so tools written for Hubble read ours.

A flow names both sides of the packet the way Hubble does (`source` is the packet's
sender, `destination` its receiver, each with identity, namespace, pod name and labels),
says what happened (`verdict`, `drop_reason_desc` with Cilium's numbers) and which policy
decided it (`ingress_allowed_by`, `egress_denied_by`, ...). Trace events (forwarded packets
the datapath samples per connection, membrane.datapath.monitor) become Hubble's trace flows
(event type 4) at to-endpoint or from-endpoint. The agent supplies what the event only has
numbers for through a `Resolver`.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from membrane.abi import (
    MEMBRANE_EVENT_VERSION,
    Direction,
    DropReason,
    FlowEventType,
    FlowMatch,
    IpProto,
)
from membrane.hubble.flow import flow_pb2
from membrane.hubble.observer import observer_pb2
from membrane.identity.labels import RESERVED_NAMES

if TYPE_CHECKING:  # the agent's ring-buffer rows; `membrane observe` never has any
    import numpy as np

# ---- numbers of the C side (membrane.abi), bound once: compared for every event ----------
_VERDICT, _DROP, _TRACE = FlowEventType.POLICY_VERDICT, FlowEventType.DROP, FlowEventType.TRACE
_EGRESS, _MATCH_RULE, _MATCH_REPLY = Direction.EGRESS, FlowMatch.RULE, FlowMatch.REPLY
_MATCH_RELATED = FlowMatch.RELATED
_TCP, _UDP, _SCTP, _ICMP = IpProto.TCP, IpProto.UDP, IpProto.SCTP, IpProto.ICMP
_ICMPV6 = IpProto.ICMPV6

# ---- numbers of Hubble's flow API (cilium api/v1/flow, pkg/monitor/api) -------------------
MESSAGE_TYPE_DROP = 1
MESSAGE_TYPE_TRACE = 4
MESSAGE_TYPE_POLICY_VERDICT = 5
# Trace sub-types: the observation point as the monitor API numbers it (TraceToLxc,
# TraceFromLxc); flow.trace_observation_point names the same point in flow.proto's numbers.
TRACE_TO_ENDPOINT, TRACE_FROM_ENDPOINT = 0, 5
# A trace event's `match` is what conntrack found: Hubble's trace_reason for it.
TRACE_REASONS = {
    FlowMatch.ESTABLISHED: flow_pb2.ESTABLISHED,
    FlowMatch.REPLY: flow_pb2.REPLY,
    FlowMatch.RELATED: flow_pb2.RELATED,
}
POLICY_MATCH_NONE, POLICY_MATCH_L3_ONLY, POLICY_MATCH_L3_L4 = 0, 1, 2
POLICY_MATCH_L4_ONLY, POLICY_MATCH_ALL = 3, 4
NAMESPACE_LABEL = "io.kubernetes.pod.namespace="
POLICY_LABEL_PREFIX = "io.cilium.k8s.policy."

# Bit order of the TCP header; listed in the order people read them ("SYN, ACK").
TCP_FLAGS = (
    ("SYN", 0x02),
    ("ACK", 0x10),
    ("FIN", 0x01),
    ("RST", 0x04),
    ("PSH", 0x08),
    ("URG", 0x20),
    ("ECE", 0x40),
    ("CWR", 0x80),
)
ICMP_TYPES = {
    0: "EchoReply",
    3: "DestinationUnreachable",
    4: "SourceQuench",
    5: "Redirect",
    8: "EchoRequest",
    11: "TimeExceeded",
    12: "ParameterProblem",
    13: "TimestampRequest",
    14: "TimestampReply",
}
ICMPV6_TYPES = {
    1: "DestinationUnreachable",
    2: "PacketTooBig",
    3: "TimeExceeded",
    4: "ParameterProblem",
    128: "EchoRequest",
    129: "EchoReply",
}


@dataclass(frozen=True)
class DropDescription:
    number: DropReason
    desc: str  # Hubble's DropReason name for what the datapath means: `drop_reason_desc`
    text: str  # Cilium's text for it, as `hubble observe` prints it


# Keyed by our datapath's numbers. Where a number differs from Cilium's for the same
# meaning (155, 160), the name says what our datapath means, and a flow carries Cilium's
# number of that name (cilium_drop_reason): clients know reasons by Cilium's numbers.
DROP_REASONS = {
    r.number: r
    for r in (
        DropDescription(DropReason.INVALID_SOURCE_IP, "INVALID_SOURCE_IP", "Invalid source ip"),
        DropDescription(DropReason.POLICY_DENIED, "POLICY_DENIED", "Policy denied"),
        DropDescription(DropReason.INVALID_PACKET, "INVALID_PACKET_DROPPED", "Invalid packet"),
        DropDescription(
            DropReason.CT_TRUNCATED_OR_INVALID_HEADER,
            "CT_TRUNCATED_OR_INVALID_HEADER",
            "CT: Truncated or invalid header",
        ),
        DropDescription(
            DropReason.UNSUPPORTED_L3_PROTOCOL, "UNSUPPORTED_L3_PROTOCOL", "Unsupported L3 protocol"
        ),
        DropDescription(
            DropReason.FRAG_NOT_FOUND,
            "FIRST_LOGICAL_DATAGRAM_FRAGMENT_NOT_FOUND",
            "First logical datagram fragment not found",
        ),
        DropDescription(
            DropReason.SERVICE_BACKEND_NOT_FOUND,
            "SERVICE_BACKEND_NOT_FOUND",
            "Service backend not found",
        ),
        DropDescription(
            DropReason.NO_ENDPOINT_STATE,
            "NO_CONFIGURATION_AVAILABLE_TO_PERFORM_POLICY_DECISION",
            "No configuration available to perform policy decision",
        ),
        DropDescription(DropReason.POLICY_DENY, "POLICY_DENY", "Policy denied by denylist"),
    )
}
DROP_TEXTS = {r.desc: r.text for r in DROP_REASONS.values()}


class UnsupportedEvent(ValueError):
    """An event this agent cannot read: another layout version or an unknown type."""


# ---- what the agent tells us ------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class EndpointView:
    id: int
    namespace: str
    name: str
    ipv4: str
    identity: int
    labels: list[str]


@dataclass(frozen=True, kw_only=True)
class RuleView:
    """One rule of a policy, as the agent's rule table (policy_value.rule_id) knows it."""

    kind: str  # e.g. CiliumNetworkPolicy, NetworkPolicy
    namespace: str | None  # None for clusterwide policies
    name: str
    direction: str  # "ingress" | "egress"
    deny: bool
    index: int  # position of the rule in the policy's ingress/egress(Deny) list
    description: str
    # Hubble's policy_match_type comes from the matched entry's shape: do the rule's
    # entries name peer identities (not Identity.ANY), and protocols or ports?
    l3: bool
    l4: bool


class Resolver(Protocol):
    def endpoint_by_id(self, ep_id: int) -> EndpointView | None: ...
    def endpoint_by_ip(self, ip: str) -> EndpointView | None: ...
    def identity_labels(self, identity: int) -> list[str]: ...
    def rule(self, rule_id: int) -> RuleView | None: ...
    def ktime_to_wall(self, ts_ns: int) -> float: ...


# ---- one event --------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class FlowEvent:
    """A `struct flow_event` with plain Python values; addresses as text (dotted IPv4,
    or IPv6)."""

    ts_ns: int
    version: int
    type: int
    cpu: int
    saddr: str
    daddr: str
    sport: int
    dport: int
    proto: int
    dir: int
    tcp_flags: int
    match: int
    ep_id: int
    drop_reason: int
    peer_identity: int
    rule_id: int
    policy_rev: int
    len: int
    family: int = 4

    @classmethod
    def decode(cls, rec: Mapping[str, Any] | np.void) -> FlowEvent:
        """From a row of a RingBuffer batch, or a dict shaped like the struct (the header
        under "h"). Addresses are the struct's four u32 as read on this host (network
        byte order in memory; IPv4 in the first) or, in a dict, text."""
        fields = rec if isinstance(rec, Mapping) else _record_fields(rec.item(), rec.dtype)
        h = fields["h"]
        family = int(fields.get("family", 4)) or 4  # 0: dropped before its IP header
        return cls(
            ts_ns=int(h["ts_ns"]),
            version=int(h["version"]),
            type=int(h["type"]),
            cpu=int(h["cpu"]),
            saddr=_address(fields["saddr"], family),
            daddr=_address(fields["daddr"], family),
            family=family,
            **{name: int(fields[name]) for name in _INT_FIELDS},
        )


_INT_FIELDS = (
    "sport",
    "dport",
    "proto",
    "dir",
    "tcp_flags",
    "match",
    "ep_id",
    "drop_reason",
    "peer_identity",
    "rule_id",
    "policy_rev",
    "len",
)


def flow_events(batch: np.ndarray) -> list[FlowEvent]:
    """Every row of a RingBuffer batch, a column at a time: one `tolist()` per field and
    one copy of the addresses for the batch (about a third of the cost of reading the
    rows one by one through numpy scalars)."""
    import numpy as np  # the agent's side only: `membrane observe` never imports numpy

    n = len(batch)
    header = batch["h"]
    names = batch.dtype.names or ()
    family = batch["family"].tolist() if "family" in names else [4] * n
    ints = [batch[name].tolist() for name in _INT_FIELDS]
    # The four u32 of each address as they are in memory: network byte order.
    saddr = np.ascontiguousarray(batch["saddr"], dtype=np.uint32).tobytes()
    daddr = np.ascontiguousarray(batch["daddr"], dtype=np.uint32).tobytes()
    events = []
    for i, (ts_ns, version, kind, cpu, fam, *rest) in enumerate(
        zip(
            header["ts_ns"].tolist(),
            header["version"].tolist(),
            header["type"].tolist(),
            header["cpu"].tolist(),
            family,
            *ints,
            strict=True,
        )
    ):
        fam = fam or 4  # 0: dropped before its IP header
        events.append(
            FlowEvent(
                ts_ns,
                version,
                kind,
                cpu,
                _packed_address(saddr[16 * i : 16 * i + 16], fam),
                _packed_address(daddr[16 * i : 16 * i + 16], fam),
                *rest,
                family=fam,
            )
        )
    return events


def supported_rows(batch: np.ndarray) -> np.ndarray:
    """Which rows of a RingBuffer batch are events this agent reads (its layout version,
    a known type): a boolean mask, a few numpy passes for the batch."""
    header = batch["h"]
    kind = header["type"]
    known = (kind == _VERDICT) | (kind == _DROP) | (kind == _TRACE)
    return known & (header["version"] == MEMBRANE_EVENT_VERSION)


def sequence_uuid(prefix: int, seq: int) -> str:
    """A flow's uuid from a random 64-bit prefix (one per agent) and its sequence number:
    unique, and the same however often the flow is built. Shaped as a version-4 UUID."""
    return str(uuid.UUID(int=(prefix << 64) | (seq & ((1 << 62) - 1)), version=4))


def _record_fields(values: tuple, dtype: np.dtype) -> dict[str, Any]:
    out = {}
    for name, value in zip(dtype.names, values, strict=True):
        sub = dtype.fields[name][0]
        out[name] = _record_fields(value, sub) if sub.names else value
    return out


def _address(value: Any, family: int) -> str:
    if isinstance(value, str):
        return str(ipaddress.ip_address(value))
    words = [value] if isinstance(value, int) else list(value)
    return _packed_address(b"".join(int(w).to_bytes(4, sys.byteorder) for w in words), family)


def _packed_address(packed: bytes, family: int) -> str:
    if family == 6:
        return socket.inet_ntop(socket.AF_INET6, packed)
    return socket.inet_ntoa(packed[:4])


# ---- the record -------------------------------------------------------------------------
def flow_record(
    event: FlowEvent | Mapping[str, Any] | np.void,
    resolver: Resolver,
    node_name: str,
    out: flow_pb2.Flow | None = None,
    flow_uuid: str | None = None,
) -> flow_pb2.Flow:
    """The Hubble flow (flow.Flow) of one event, written into `out` when given (a
    response's flow: a copy costs as much as the rest), with `flow_uuid` (default: a
    random one). Raises UnsupportedEvent for events
    of another layout version or type (count them; they are not flows we can describe).

    A flow is its time and uuid and four parts that each read a few of the event's
    fields (fill_addresses, fill_ports, fill_decision, fill_service): observe.encode builds
    each part once per distinct value of those fields and joins them as bytes."""
    ev = event if isinstance(event, FlowEvent) else FlowEvent.decode(event)
    check_supported(ev)
    flow = flow_pb2.Flow() if out is None else out
    flow.uuid = flow_uuid or str(uuid.uuid4())
    at = flow.time  # seconds and nanos set directly: FromNanoseconds costs twice as much
    at.seconds, at.nanos = divmod(wall_offset_ns(resolver) + ev.ts_ns, 1_000_000_000)
    fill_addresses(flow, ev)
    fill_ports(flow, ev)
    fill_decision(flow, ev, resolver, node_name)
    fill_service(flow, ev, resolver)
    return flow


def check_supported(ev: FlowEvent) -> None:
    """UnsupportedEvent unless this agent can describe the event."""
    if ev.version != MEMBRANE_EVENT_VERSION:
        raise UnsupportedEvent(
            f"flow event version {ev.version}, expected {MEMBRANE_EVENT_VERSION}"
        )
    if ev.type != _VERDICT and ev.type != _DROP and ev.type != _TRACE:
        raise UnsupportedEvent(f"flow event type {ev.type}")


def wall_offset_ns(resolver: Resolver) -> int:
    """Unix nanoseconds at ktime 0: a flow's time is this plus its event's ts_ns (one
    clock reading serves a whole batch, and integers keep every nanosecond)."""
    return round(resolver.ktime_to_wall(0) * 1e9)


def fill_addresses(flow: flow_pb2.Flow, ev: FlowEvent) -> None:
    """IP: reads saddr, daddr, family."""
    flow.IP.source, flow.IP.destination = ev.saddr, ev.daddr
    flow.IP.ipVersion = flow_pb2.IPv6 if ev.family == 6 else flow_pb2.IPv4


def fill_ports(flow: flow_pb2.Flow, ev: FlowEvent) -> None:
    """l4 and Summary: read proto, sport, dport, tcp_flags, family."""
    _fill_layer4(flow.l4, ev)
    flow.Summary = _summary(ev)


def fill_decision(flow: flow_pb2.Flow, ev: FlowEvent, resolver: Resolver, node_name: str) -> None:
    """Everything else (who sent it to whom, what happened and which policy decided):
    reads type, dir, match, rule_id, policy_rev, ep_id, peer_identity, drop_reason and
    the peer's address (saddr or daddr, family)."""
    dropped = ev.type == _DROP
    egress = ev.dir == _EGRESS
    reply = ev.match == _MATCH_REPLY
    rule = resolver.rule(ev.rule_id) if ev.rule_id else None
    flow.verdict = flow_pb2.DROPPED if dropped else flow_pb2.FORWARDED
    flow.Type = flow_pb2.L3_L4
    flow.node_name = node_name
    flow.traffic_direction = flow_pb2.EGRESS if egress else flow_pb2.INGRESS
    flow.policy_match_type = _policy_match_type(ev, rule)
    local, peer = (flow.source, flow.destination) if egress else (flow.destination, flow.source)
    _local_endpoint(local, ev, resolver)
    _peer_endpoint(peer, ev.daddr if egress else ev.saddr, ev.peer_identity, resolver)
    if dropped:
        reason = cilium_drop_reason(ev.drop_reason)
        flow.drop_reason = reason
        flow.drop_reason_desc = reason
        flow.event_type.type, flow.event_type.sub_type = MESSAGE_TYPE_DROP, reason
    elif ev.type == _TRACE:
        _trace_point(flow, ev, egress, reply)
    else:
        flow.event_type.type = MESSAGE_TYPE_POLICY_VERDICT
    flow.is_reply.value = reply
    if ev.match == _MATCH_RELATED:  # an ICMP error about a tracked connection
        flow.trace_reason = flow_pb2.RELATED
    if rule is not None and ev.match == _MATCH_RULE:
        _attribute(flow, rule, ev.policy_rev, egress)


def fill_service(flow: flow_pb2.Flow, ev: FlowEvent, resolver: Resolver) -> None:
    """destination_service (source_service on the backend's replies): the Service whose
    frontend the connection went through, where the resolver can tell (the agent's socket
    LB records it; `connection_service(client, backend, port, protocol)`). Reads saddr,
    daddr, sport, dport, proto. Asked when the event is read: the record may name
    another Service later, or none (the agent's flow reader resolves at ingest)."""
    write_service(flow, connection_service_of(ev, resolver))


ServiceTag = tuple[bool, str, str]  # (on the backend's reply, namespace, name)


def connection_service_of(ev: FlowEvent, resolver: Resolver) -> ServiceTag | None:
    """The Service of the event's connection, and whether the event is the backend's
    reply (source_service) rather than the client's (destination_service)."""
    service_of = getattr(resolver, "connection_service", None)
    if service_of is None:
        return None
    found = service_of(ev.saddr, ev.daddr, ev.dport, ev.proto)
    if found is not None:
        return (False, *found)
    found = service_of(ev.daddr, ev.saddr, ev.sport, ev.proto)
    return None if found is None else (True, *found)


def write_service(flow: flow_pb2.Flow, tag: ServiceTag | None) -> None:
    """destination_service, or source_service on a reply, from a resolved tag."""
    if tag is None:
        return
    reply, namespace, name = tag
    service = flow.source_service if reply else flow.destination_service
    service.namespace, service.name = namespace, name


def _trace_point(flow: flow_pb2.Flow, ev: FlowEvent, egress: bool, reply: bool) -> None:
    """Where a trace saw the packet: leaving the pod (from-endpoint) or delivered to it
    (to-endpoint), and why it passed (a new connection, or what conntrack found). Its
    traffic direction is the connection's, as Hubble reads traces: a reply's is the
    opposite of the packet's."""
    if reply:
        flow.traffic_direction = flow_pb2.INGRESS if egress else flow_pb2.EGRESS
    flow.event_type.type = MESSAGE_TYPE_TRACE
    if egress:
        flow.event_type.sub_type = TRACE_FROM_ENDPOINT
        flow.trace_observation_point = flow_pb2.FROM_ENDPOINT
    else:
        flow.event_type.sub_type = TRACE_TO_ENDPOINT
        flow.trace_observation_point = flow_pb2.TO_ENDPOINT
    flow.trace_reason = TRACE_REASONS.get(ev.match, flow_pb2.NEW)


def event_response(
    event: FlowEvent | Mapping[str, Any] | np.void,
    resolver: Resolver,
    node_name: str,
    flow_uuid: str | None = None,
) -> observer_pb2.GetFlowsResponse:
    """`flow_response(flow_record(...))` without copying the flow."""
    response = observer_pb2.GetFlowsResponse(node_name=node_name)
    flow_record(event, resolver, node_name, out=response.flow, flow_uuid=flow_uuid)
    response.time.CopyFrom(response.flow.time)
    return response


def flow_response(flow: flow_pb2.Flow) -> observer_pb2.GetFlowsResponse:
    """A flow as Hubble's GetFlows streams it: with the node and time beside it."""
    response = observer_pb2.GetFlowsResponse(flow=flow, node_name=flow.node_name)
    response.time.CopyFrom(flow.time)
    return response


def response_dict(response: observer_pb2.GetFlowsResponse) -> dict[str, Any]:
    """Protobuf JSON with proto field names (enums by name, uint64 as strings, RFC 3339
    times, zero values left out): what `hubble observe -o json` prints, line by line."""
    from membrane.hubble.json_codec import encode  # here: compact output does without it

    return encode(response)


def lost_response(
    source: int, count: int, node_name: str, wall_ns: int | None = None
) -> observer_pb2.GetFlowsResponse:
    """The notice Hubble sends in place of `count` events lost at `source`
    (flow_pb2.PERF_EVENT_RING_BUFFER, OBSERVER_EVENTS_QUEUE, HUBBLE_RING_BUFFER)."""
    response = observer_pb2.GetFlowsResponse(node_name=node_name)
    response.lost_events.source = source
    response.lost_events.num_events_lost = count
    response.time.FromNanoseconds(time.time_ns() if wall_ns is None else wall_ns)
    return response


def cilium_drop_reason(number: int) -> int:
    """Cilium's DropReason number for what a datapath drop reason means (0: unknown)."""
    reason = DROP_REASONS.get(number)
    return flow_pb2.DropReason.Value(reason.desc) if reason else flow_pb2.DROP_REASON_UNKNOWN


def _fill_endpoint(out: flow_pb2.Endpoint, ep: EndpointView, identity: int) -> None:
    out.ID, out.identity, out.namespace, out.pod_name = ep.id, identity, ep.namespace, ep.name
    out.labels.extend(ep.labels)


def _local_endpoint(out: flow_pb2.Endpoint, ev: FlowEvent, resolver: Resolver) -> None:
    ep = resolver.endpoint_by_id(ev.ep_id)
    if ep is None:  # deleted since the packet passed: the id is all we know
        out.ID = ev.ep_id
        return
    _fill_endpoint(out, ep, ep.identity)


def _peer_endpoint(out: flow_pb2.Endpoint, ip: str, identity: int, resolver: Resolver) -> None:
    # The identity is the datapath's, from the event: it is what policy was checked against.
    ep = resolver.endpoint_by_ip(ip)
    if ep is not None:
        _fill_endpoint(out, ep, identity)
        return
    labels = resolver.identity_labels(identity)
    if not labels and identity in RESERVED_NAMES:
        labels = [f"reserved:{RESERVED_NAMES[identity]}"]
    out.identity = identity
    out.labels.extend(labels)
    if namespace := _namespace_of(labels):
        out.namespace = namespace


def _namespace_of(labels: list[str]) -> str | None:
    """A pod on another node: its labels name its namespace, as in Hubble."""
    for label in labels:
        key_value = label.split(":", 1)[-1]  # without the source ("k8s:")
        if key_value.startswith(NAMESPACE_LABEL):
            return key_value[len(NAMESPACE_LABEL) :]
    return None


def _fill_layer4(l4: flow_pb2.Layer4, ev: FlowEvent) -> None:
    if ev.proto == _TCP:
        l4.TCP.source_port, l4.TCP.destination_port = ev.sport, ev.dport
        for name, bit in TCP_FLAGS:
            if ev.tcp_flags & bit:
                setattr(l4.TCP.flags, name, True)
    elif ev.proto == _UDP:
        l4.UDP.source_port, l4.UDP.destination_port = ev.sport, ev.dport
    elif ev.proto == _SCTP:
        l4.SCTP.source_port, l4.SCTP.destination_port = ev.sport, ev.dport
    elif ev.proto == _ICMP:  # the datapath puts type and code in the port fields
        l4.ICMPv4.type, l4.ICMPv4.code = ev.sport, ev.dport
    elif ev.proto == _ICMPV6:
        l4.ICMPv6.type, l4.ICMPv6.code = ev.sport, ev.dport


def _summary(ev: FlowEvent) -> str:
    if ev.proto == _TCP:
        flags = [name for name, bit in TCP_FLAGS if ev.tcp_flags & bit]
        return f"TCP Flags: {', '.join(flags)}" if flags else "TCP"
    if ev.proto == _UDP:
        return "UDP"
    if ev.proto == _SCTP:
        return "SCTP"
    if ev.proto == _ICMP:
        name = ICMP_TYPES.get(ev.sport, f"type {ev.sport}")
        return f"ICMPv4 {name}" + (f" code {ev.dport}" if ev.dport else "")
    if ev.proto == _ICMPV6:
        name = ICMPV6_TYPES.get(ev.sport, f"type {ev.sport}")
        return f"ICMPv6 {name}" + (f" code {ev.dport}" if ev.dport else "")
    return f"IPv{ev.family} protocol {ev.proto}"


def _policy_match_type(ev: FlowEvent, rule: RuleView | None) -> int:
    if ev.match != _MATCH_RULE or rule is None:
        return POLICY_MATCH_NONE
    return {
        (True, True): POLICY_MATCH_L3_L4,
        (True, False): POLICY_MATCH_L3_ONLY,
        (False, True): POLICY_MATCH_L4_ONLY,
        (False, False): POLICY_MATCH_ALL,
    }[(rule.l3, rule.l4)]


def _attribute(flow: flow_pb2.Flow, rule: RuleView, revision: int, egress: bool) -> None:
    """The policy whose rule decided, in the list Hubble keeps for that direction and
    verdict (a rule removed since the packet passed is no longer named)."""
    if rule.deny:
        into = flow.egress_denied_by if egress else flow.ingress_denied_by
    else:
        into = flow.egress_allowed_by if egress else flow.ingress_allowed_by
    into.add(
        name=rule.name,
        namespace=rule.namespace or "",
        labels=policy_labels(rule),
        revision=revision,
        kind=rule.kind,
    )


def policy_labels(rule: RuleView) -> list[str]:
    """The labels Cilium gives a policy's rules (the policy's origin, name, namespace)."""
    labels = [
        f"k8s:{POLICY_LABEL_PREFIX}derived-from={rule.kind}",
        f"k8s:{POLICY_LABEL_PREFIX}name={rule.name}",
    ]
    if rule.namespace:
        labels.append(f"k8s:{POLICY_LABEL_PREFIX}namespace={rule.namespace}")
    return labels
