"""Cilium's and Hubble's label values for what our datapath reports, so dashboards and
alerts written for Cilium match ours."""

from __future__ import annotations

from membrane.abi import Direction, DropReason, IpProto
from membrane.observe.record import DROP_REASONS

# cilium_drop_count_total{reason}: Cilium's text for the reason (pkg/monitor/api/drop.go);
# hubble_drop_total{reason}: flow.DropReason's name for what our datapath means. Both from
# the table `hubble observe` reads (keyed by our numbers; where ours differ from Cilium's
# for the same meaning, 155 and 160, the text and name are Cilium's for that meaning).
DROP_REASON_TEXTS = {number: reason.text for number, reason in DROP_REASONS.items()}
HUBBLE_DROP_REASONS = {number: reason.desc for number, reason in DROP_REASONS.items()}
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
