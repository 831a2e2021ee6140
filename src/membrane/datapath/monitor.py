"""What the endpoint datapath reports beside verdicts and drops: trace events of forwarded
packets (how many is the node's monitor aggregation, set at run time in the `monitor_config`
node map) and the per-CPU counters of forwarded packets (`forwards`).

Aggregation levels carry Cilium's `--monitor-aggregation` names. Our datapath observes a
packet at one point per endpoint program: from-endpoint (the pod sends it; Cilium's FROM_LXC)
and to-endpoint (it is delivered to the pod; TO_LXC):

    none, disabled  every forwarded packet, at both points (costs an event per packet)
    lowest, low     every forwarded packet delivered to a pod (to-endpoint only)
    medium          per connection: its first packet, the first packet of a direction to
                    carry SYN, FIN or RST (SYN, SYN-ACK, closing), untracked packets; at
                    both points (the default, as in Cilium)
    maximum, max    no trace events

(Cilium at low and above leaves out its from-* points because it sees the same packet again
where it leaves, at to-stack or to-endpoint; a packet a pod sends to the node or the world
passes only our from-endpoint point, so medium keeps it.)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from membrane.abi import Direction, TraceMode
from membrane.errors import UserError

if TYPE_CHECKING:  # the agent's options parse levels without loading libbpf
    from membrane.bpf import Map

# Cilium's level names (pkg/option monitorAggregationOption) -> what our datapath does.
MONITOR_AGGREGATION_LEVELS: Mapping[str, TraceMode] = {
    "none": TraceMode.ALL,
    "disabled": TraceMode.ALL,
    "lowest": TraceMode.TO_ENDPOINT,
    "low": TraceMode.TO_ENDPOINT,
    "medium": TraceMode.CONNECTIONS,
    "max": TraceMode.OFF,
    "maximum": TraceMode.OFF,
}
DEFAULT_MONITOR_AGGREGATION = "medium"


def parse_monitor_aggregation(level: str, option: str = "monitor-aggregation") -> str:
    """A level name as Cilium spells it (any case); a UserError naming `option` otherwise."""
    name = level.strip().lower()
    if name not in MONITOR_AGGREGATION_LEVELS:
        names = ", ".join(MONITOR_AGGREGATION_LEVELS)
        raise UserError(option, f"{level!r} is not one of {names}")
    return name


def set_trace_mode(monitor_config: Map, mode: TraceMode) -> None:
    """Make every endpoint program on the node trace as `mode`, from its next packet on."""
    monitor_config.update(0, monitor_config.value_type(trace_mode=int(mode)))


def trace_mode(monitor_config: Map) -> TraceMode:
    value = monitor_config.lookup(0)
    return TraceMode(int(value.trace_mode)) if value is not None else TraceMode.OFF


def set_monitor_aggregation(monitor_config: Map, level: str) -> TraceMode:
    """set_trace_mode by Cilium's level name; returns the mode."""
    mode = MONITOR_AGGREGATION_LEVELS[parse_monitor_aggregation(level)]
    set_trace_mode(monitor_config, mode)
    return mode


def forward_counts(forwards: Map) -> dict[Direction, tuple[int, int]]:
    """direction -> (packets, bytes) forwarded since the map was made, summed over CPUs."""
    out = {}
    for key, per_cpu in forwards.items():
        out[Direction(int(key))] = (
            sum(int(v.packets) for v in per_cpu),
            sum(int(v.bytes) for v in per_cpu),
        )
    return out
