"""Flow records: the endpoint datapath's `struct flow_event` (bpf/abi/endpoint.h) as the
flow JSON that `hubble observe -o json` prints, so tools written for Hubble read ours.

A record names both sides of the packet the way Hubble does (`source` is the packet's
sender, `destination` its receiver, each with identity, namespace, pod name and labels),
says what happened (`verdict`, `drop_reason_desc`) and, our addition, which policy rule
decided it (`policy`). The agent supplies what the event only has numbers for through a
`Resolver`.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from membrane.abi import (
    MEMBRANE_EVENT_VERSION,
    Direction,
    DropReason,
    FlowEventType,
    FlowMatch,
    IpProto,
)
from membrane.identity.labels import RESERVED_NAMES

if TYPE_CHECKING:  # the agent's ring-buffer rows; `membrane observe` never has any
    import numpy as np

# ---- numbers of the C side (membrane.abi), bound once: compared for every event ----------
_VERDICT, _DROP = FlowEventType.POLICY_VERDICT, FlowEventType.DROP
_EGRESS, _MATCH_RULE, _MATCH_REPLY = Direction.EGRESS, FlowMatch.RULE, FlowMatch.REPLY
_MATCH_RELATED = FlowMatch.RELATED
_TCP, _UDP, _SCTP, _ICMP = IpProto.TCP, IpProto.UDP, IpProto.SCTP, IpProto.ICMP
_ICMPV6 = IpProto.ICMPV6

# ---- numbers of Hubble's flow API (cilium api/v1/flow, pkg/monitor/api) -------------------
MESSAGE_TYPE_DROP = 1
MESSAGE_TYPE_POLICY_VERDICT = 5
POLICY_MATCH_NONE, POLICY_MATCH_L3_ONLY, POLICY_MATCH_L3_L4 = 0, 1, 2
POLICY_MATCH_L4_ONLY, POLICY_MATCH_ALL = 3, 4
POLICY_MATCH_NAMES = {0: "none", 1: "L3-Only", 2: "L3-L4", 3: "L4-Only", 4: "all"}
NAMESPACE_LABEL = "io.kubernetes.pod.namespace="

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
    text: str  # for people


# Keyed by our datapath's numbers. Where a number differs from Hubble's for the same
# meaning (155, 160), the name still says what our datapath means.
DROP_REASONS = {
    r.number: r
    for r in (
        DropDescription(DropReason.INVALID_SOURCE_IP, "INVALID_SOURCE_IP", "Invalid source IP"),
        DropDescription(
            DropReason.POLICY_DENIED, "POLICY_DENIED", "Policy denied (no rule allows it)"
        ),
        DropDescription(DropReason.INVALID_PACKET, "INVALID_PACKET_DROPPED", "Invalid packet"),
        DropDescription(
            DropReason.CT_TRUNCATED_OR_INVALID_HEADER,
            "CT_TRUNCATED_OR_INVALID_HEADER",
            "Truncated or invalid header",
        ),
        DropDescription(
            DropReason.UNSUPPORTED_L3_PROTOCOL, "UNSUPPORTED_L3_PROTOCOL", "Unsupported L3 protocol"
        ),
        DropDescription(
            DropReason.FRAG_NOT_FOUND,
            "FIRST_LOGICAL_DATAGRAM_FRAGMENT_NOT_FOUND",
            "Fragment without its first fragment",
        ),
        DropDescription(
            DropReason.NO_ENDPOINT_STATE,
            "NO_CONFIGURATION_AVAILABLE_TO_PERFORM_POLICY_DECISION",
            "No endpoint state (the agent has not configured this endpoint)",
        ),
        DropDescription(DropReason.POLICY_DENY, "POLICY_DENY", "Policy denied by a deny rule"),
    )
}
DROP_TEXTS = {r.desc: r.text for r in DROP_REASONS.values()}
UNKNOWN_DROP_DESC = "DROP_REASON_UNKNOWN"


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
    """Every row of a RingBuffer batch; one `tolist()` for the batch is much cheaper than
    reading each field of each numpy row."""
    return [FlowEvent.decode(_record_fields(row, batch.dtype)) for row in batch.tolist()]


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
    packed = b"".join(int(w).to_bytes(4, sys.byteorder) for w in words)
    if family == 6:
        return socket.inet_ntop(socket.AF_INET6, packed)
    return socket.inet_ntoa(packed[:4])


# ---- the record -------------------------------------------------------------------------
def flow_record(
    event: FlowEvent | Mapping[str, Any] | np.void, resolver: Resolver, node_name: str
) -> dict[str, Any]:
    """The Hubble-shaped flow record of one event. Raises UnsupportedEvent for events of
    another layout version or type (count them; they are not flows we can describe)."""
    ev = event if isinstance(event, FlowEvent) else FlowEvent.decode(event)
    if ev.version != MEMBRANE_EVENT_VERSION:
        raise UnsupportedEvent(
            f"flow event version {ev.version}, expected {MEMBRANE_EVENT_VERSION}"
        )
    if ev.type != _VERDICT and ev.type != _DROP:
        raise UnsupportedEvent(f"flow event type {ev.type}")
    dropped = ev.type == _DROP
    egress = ev.dir == _EGRESS
    local = _local_endpoint(ev, resolver)
    peer = _peer_endpoint(ev.daddr if egress else ev.saddr, ev.peer_identity, resolver)
    rule = resolver.rule(ev.rule_id) if ev.rule_id else None
    record: dict[str, Any] = {"time": _rfc3339(resolver.ktime_to_wall(ev.ts_ns))}
    record["verdict"] = "DROPPED" if dropped else "FORWARDED"
    if dropped:
        record["drop_reason"] = ev.drop_reason
    record["IP"] = {
        "source": ev.saddr,
        "destination": ev.daddr,
        "ipVersion": "IPv6" if ev.family == 6 else "IPv4",
    }
    if l4 := _layer4(ev):
        record["l4"] = l4
    record["source"], record["destination"] = (local, peer) if egress else (peer, local)
    record["Type"] = "L3_L4"
    record["node_name"] = node_name
    record["event_type"] = (
        {"type": MESSAGE_TYPE_DROP, "sub_type": ev.drop_reason}
        if dropped
        else {"type": MESSAGE_TYPE_POLICY_VERDICT, "sub_type": 0}
    )
    record["traffic_direction"] = "EGRESS" if egress else "INGRESS"
    record["policy_match_type"] = _policy_match_type(ev, rule)
    if dropped:
        reason = DROP_REASONS.get(ev.drop_reason)
        record["drop_reason_desc"] = reason.desc if reason else UNKNOWN_DROP_DESC
    record["is_reply"] = ev.match == _MATCH_REPLY
    if ev.match == _MATCH_RELATED:  # an ICMP error about a tracked connection
        record["trace_reason"] = "RELATED"  # Hubble's name (flow.TraceReason)
    record["Summary"] = _summary(ev)
    record["policy"] = _policy(ev, rule)
    return record


def _rfc3339(wall: float) -> str:
    """Hubble's time format: UTC with nanoseconds. A float of unix time resolves about
    0.2 us, so the last digits are the conversion's, not the kernel's."""
    ns = round(wall * 1e9)
    seconds, nanos = divmod(ns, 1_000_000_000)
    return f"{datetime.fromtimestamp(seconds, UTC):%Y-%m-%dT%H:%M:%S}.{nanos:09d}Z"


def _endpoint(ep: EndpointView, identity: int) -> dict[str, Any]:
    return {
        "ID": ep.id,
        "identity": identity,
        "namespace": ep.namespace,
        "labels": list(ep.labels),
        "pod_name": ep.name,
    }


def _local_endpoint(ev: FlowEvent, resolver: Resolver) -> dict[str, Any]:
    ep = resolver.endpoint_by_id(ev.ep_id)
    if ep is None:  # deleted since the packet passed: the id is all we know
        return {"ID": ev.ep_id, "identity": 0, "labels": []}
    return _endpoint(ep, ep.identity)


def _peer_endpoint(ip: str, identity: int, resolver: Resolver) -> dict[str, Any]:
    # The identity is the datapath's, from the event: it is what policy was checked against.
    ep = resolver.endpoint_by_ip(ip)
    if ep is not None:
        return _endpoint(ep, identity)
    labels = resolver.identity_labels(identity)
    if not labels and identity in RESERVED_NAMES:
        labels = [f"reserved:{RESERVED_NAMES[identity]}"]
    peer: dict[str, Any] = {"identity": identity, "labels": list(labels)}
    if namespace := _namespace_of(labels):
        peer["namespace"] = namespace
    return peer


def _namespace_of(labels: list[str]) -> str | None:
    """A pod on another node: its labels name its namespace, as in Hubble."""
    for label in labels:
        key_value = label.split(":", 1)[-1]  # without the source ("k8s:")
        if key_value.startswith(NAMESPACE_LABEL):
            return key_value[len(NAMESPACE_LABEL) :]
    return None


def _layer4(ev: FlowEvent) -> dict[str, Any] | None:
    ports = {"source_port": ev.sport, "destination_port": ev.dport}
    if ev.proto == _TCP:
        flags = {name: True for name, bit in TCP_FLAGS if ev.tcp_flags & bit}
        return {"TCP": {**ports, "flags": flags}}
    if ev.proto == _UDP:
        return {"UDP": ports}
    if ev.proto == _SCTP:
        return {"SCTP": ports}
    if ev.proto == _ICMP:  # the datapath puts type and code in the port fields
        return {"ICMPv4": {"type": ev.sport, "code": ev.dport}}
    if ev.proto == _ICMPV6:
        return {"ICMPv6": {"type": ev.sport, "code": ev.dport}}
    return None


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


def _policy(ev: FlowEvent, rule: RuleView | None) -> dict[str, Any] | None:
    """The rule that decided, or None when none did (no policy in this direction, or
    default deny: the endpoint is selected and no rule allows the flow)."""
    if ev.match != _MATCH_RULE or not ev.rule_id:
        return None
    if rule is None:  # the policy was removed after the packet passed
        return {
            "rule_id": ev.rule_id,
            "kind": None,
            "namespace": None,
            "name": None,
            "rule": None,
            "deny": ev.drop_reason == DropReason.POLICY_DENY,
            "description": None,
        }
    return {
        "rule_id": ev.rule_id,
        "kind": rule.kind,
        "namespace": rule.namespace,
        "name": rule.name,
        "rule": rule.index,
        "deny": rule.deny,
        "description": rule.description,
    }
