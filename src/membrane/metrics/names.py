"""Cilium's and Hubble's label values for what our datapath reports, so dashboards and
alerts written for Cilium match ours."""

from __future__ import annotations

from membrane.abi import Direction, DropReason, IpProto

# cilium_drop_count_total{reason}: Cilium's text for the reason (pkg/monitor/api/drop.go).
# Keyed by our numbers; where ours differ from Cilium's for the same meaning (155, 160),
# the text is Cilium's for that meaning.
DROP_REASON_TEXTS = {
    DropReason.INVALID_SOURCE_IP: "Invalid source ip",
    DropReason.POLICY_DENIED: "Policy denied",
    DropReason.INVALID_PACKET: "Invalid packet",
    DropReason.CT_TRUNCATED_OR_INVALID_HEADER: "CT: Truncated or invalid header",
    DropReason.UNSUPPORTED_L3_PROTOCOL: "Unsupported L3 protocol",
    DropReason.FRAG_NOT_FOUND: "First logical datagram fragment not found",
    DropReason.SERVICE_BACKEND_NOT_FOUND: "Service backend not found",
    DropReason.NO_ENDPOINT_STATE: "No configuration available to perform policy decision",
    DropReason.POLICY_DENY: "Policy denied by denylist",
}
# hubble_drop_total{reason}: flow.DropReason's name for what our datapath means.
HUBBLE_DROP_REASONS = {
    DropReason.INVALID_SOURCE_IP: "INVALID_SOURCE_IP",
    DropReason.POLICY_DENIED: "POLICY_DENIED",
    DropReason.INVALID_PACKET: "INVALID_PACKET_DROPPED",
    DropReason.CT_TRUNCATED_OR_INVALID_HEADER: "CT_TRUNCATED_OR_INVALID_HEADER",
    DropReason.UNSUPPORTED_L3_PROTOCOL: "UNSUPPORTED_L3_PROTOCOL",
    DropReason.FRAG_NOT_FOUND: "FIRST_LOGICAL_DATAGRAM_FRAGMENT_NOT_FOUND",
    DropReason.SERVICE_BACKEND_NOT_FOUND: "SERVICE_BACKEND_NOT_FOUND",
    DropReason.NO_ENDPOINT_STATE: "NO_CONFIGURATION_AVAILABLE_TO_PERFORM_POLICY_DECISION",
    DropReason.POLICY_DENY: "POLICY_DENY",
}
HUBBLE_UNKNOWN_DROP = "DROP_REASON_UNKNOWN"
POLICY_DROPS = frozenset({DropReason.POLICY_DENIED, DropReason.POLICY_DENY})


def drop_reason_text(reason: int) -> str:
    """Cilium prints the number of a reason it has no text for."""
    return DROP_REASON_TEXTS.get(reason, str(reason))


# cilium_*{direction}: the metrics map's direction names.
DIRECTIONS = {Direction.INGRESS: "INGRESS", Direction.EGRESS: "EGRESS"}
UNKNOWN_DIRECTION = "UNKNOWN"

# hubble_*{protocol}: Hubble's FlowProtocol() for L3/L4 flows.
PROTOCOLS = {IpProto.TCP: "TCP", IpProto.UDP: "UDP", IpProto.SCTP: "SCTP"}
ICMP_PROTOCOLS = {IpProto.ICMP: "ICMPv4", IpProto.ICMPV6: "ICMPv6"}
UNKNOWN_L4 = "Unknown L4"

# hubble_flows_processed_total{type}: the monitor message types we emit.
TYPE_DROP = "Drop"
TYPE_POLICY_VERDICT = "PolicyVerdict"
TYPE_TRACE = "Trace"
# ...{subtype} of a trace: the observation point's name (monitor API), by "from the pod".
TRACE_POINTS = {False: "to-endpoint", True: "from-endpoint"}

# hubble_lost_events_total{source}: flow.LostEventSource names, lower case.
LOST_PERF_EVENT_RING_BUFFER = "perf_event_ring_buffer"  # the datapath's ring was full
LOST_OBSERVER_EVENTS_QUEUE = "observer_events_queue"  # the reader fell behind the drain
LOST_SOURCES = (LOST_PERF_EVENT_RING_BUFFER, LOST_OBSERVER_EVENTS_QUEUE)

# hubble_policy_verdicts_total{match}: monitor API PolicyMatchType names, lower case, by
# the deciding rule's shape (its entries name peers, they name protocols or ports).
POLICY_MATCH_BY_SHAPE = {
    (True, True): "l3-l4",
    (True, False): "l3-only",
    (False, True): "l4-only",
    (False, False): "all",
}
POLICY_MATCH_NONE = "none"  # no rule decided: default deny, or no policy
