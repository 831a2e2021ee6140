"""The agent's metrics Cilium serves on `--prometheus-serve-addr` (cilium_*).

Read at scrape time: drops from the datapath's per-CPU `drops` map (packets and bytes per
endpoint, direction and reason; summed over CPUs and endpoints), forwards from its per-CPU
`forwards` array (every packet the endpoint programs let pass, per direction: events are
sampled and can be lost, counters are neither), map pressure from the pinned maps
themselves, endpoint and policy numbers from the agent's published snapshot. Policy
changes are counted and timed by the API server around each change.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from membrane.bpf.maps import HASH, LRU_HASH, Map
from membrane.datapath.monitor import forward_counts
from membrane.metrics import names
from membrane.metrics.flows import FlowCounts

if TYPE_CHECKING:
    from membrane.agent.snapshot import Snapshot

# cilium_bpf_map_pressure: the node maps whose fill matters (ours are node-wide, where
# Cilium has cilium_ct4_global, cilium_policy_<ep>, cilium_ipcache).
PRESSURE_MAPS = ("ct", "ct6", "policy", "ipcache", "ipcache6")
# The service maps (membrane.service, pinned under services/) that fill with services,
# backends and the socket LB's connections (Cilium's cilium_lb4_services_v2 and friends).
SERVICE_PRESSURE_MAPS = ("svc_frontends", "svc_backends", "svc_slots", "svc_affinity", "svc_sock")
# The per-packet service path's flows and reverse-NAT entries (nodeport/, with --devices).
NODEPORT_PRESSURE_MAPS = ("np_flows", "np_rev", "np6_flows", "np6_rev")
# Counting a map's entries walks it (a syscall per 4096 entries of a hash, per entry of an
# LPM trie): done at most this often, scrapes in between get the last count.
PRESSURE_INTERVAL = 5.0
# Cilium's buckets for policy_regeneration_time_stats_seconds.
REGENERATION_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip


class PolicyChanges:
    """cilium_policy_change_total{outcome} and the regeneration time of every change that
    recomputes what endpoints enforce (policies, endpoints, namespace labels)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.changes = Counter(
            "cilium_policy_change_total",
            "Number of policy changes by outcome",
            ("outcome",),
            registry=registry,
        )
        self.regeneration = Histogram(
            "cilium_policy_regeneration_time_stats_seconds",
            "Policy regeneration time stats labeled by the scope",
            ("scope",),
            buckets=REGENERATION_BUCKETS,
            registry=registry,
        )
        for outcome in ("success", "failure"):
            self.changes.labels(outcome)

    @contextlib.contextmanager
    def timed(self, policy_change: bool) -> Iterator[None]:
        """Time a change (the worker's queue included: what the caller waits for); count
        it as a policy change when it imports or deletes policies."""
        start = time.monotonic()
        outcome = "failure"
        try:
            yield
            outcome = "success"
        finally:
            self.regeneration.labels("total").observe(time.monotonic() - start)
            if policy_change:
                self.changes.labels(outcome).inc()


class AgentCollector(Collector):
    """cilium_* gauges and counters read when scraped; yields nothing before `attach`."""

    def __init__(self, counts: FlowCounts) -> None:
        self.counts = counts
        self._snapshot: Callable[[], Snapshot] | None = None
        self._maps: dict[str, Map] = {}
        self._pressure: dict[str, float] = {}
        self._pressure_at = -PRESSURE_INTERVAL
        self._pressure_lock = threading.Lock()  # scrapes only, never the datapath or agent

    def attach(self, snapshot: Callable[[], Snapshot], bpf_dir: str) -> None:
        """Start answering: the agent's snapshot, and handles of our own on its pinned
        maps (read-only use; the agent's handles stay the agent's)."""
        for name in ("drops", "forwards", *PRESSURE_MAPS):
            self._maps[name] = Map.from_pin(os.path.join(bpf_dir, name), name=name)
        for name in SERVICE_PRESSURE_MAPS:
            path = os.path.join(bpf_dir, "services", name)
            if os.path.exists(path):
                self._maps[name] = Map.from_pin(path, name=name)
        for name in (*NODEPORT_PRESSURE_MAPS, "np_stats"):
            path = os.path.join(bpf_dir, "nodeport", name)
            if os.path.exists(path):
                self._maps[name] = Map.from_pin(path, name=name)
        self._snapshot = snapshot

    def close(self) -> None:
        self._snapshot = None
        maps, self._maps = self._maps, {}
        for m in maps.values():
            m.close()

    def collect(self) -> Iterator[Metric]:
        snapshot_of = self._snapshot
        if snapshot_of is None:
            return
        snapshot = snapshot_of()
        yield from self._drops()
        yield from self._forwards()
        yield GaugeMetricFamily(
            "cilium_endpoint", "Number of endpoints managed by this agent",
            value=len(snapshot.endpoints),
        )  # fmt: skip
        yield GaugeMetricFamily(
            "cilium_policy", "Number of policies currently loaded",
            value=len(snapshot.policies),
        )  # fmt: skip
        yield GaugeMetricFamily(
            "cilium_policy_max_revision", "Highest policy revision number in the agent",
            value=snapshot.policy_revision,
        )  # fmt: skip
        pressure = GaugeMetricFamily(
            "cilium_bpf_map_pressure",
            "Fill percentage of map, tagged by map name",
            labels=("map_name",),
        )
        for name, ratio in self.map_pressure().items():
            pressure.add_metric((name,), ratio)
        yield pressure
        if "np_stats" in self._maps:
            yield self._nodeport()

    def _drops(self) -> Iterator[Metric]:
        packets: dict[tuple[str, str], int] = {}
        sizes: dict[tuple[str, str], int] = {}
        for key, per_cpu in self._maps["drops"].lookup_batch():
            labels = (
                names.drop_reason_text(key.reason),
                names.DIRECTIONS.get(key.dir, names.UNKNOWN_DIRECTION),
            )
            packets[labels] = packets.get(labels, 0) + sum(v.packets for v in per_cpu)
            sizes[labels] = sizes.get(labels, 0) + sum(v.bytes for v in per_cpu)
        for name, help_text, values in (
            ("cilium_drop_count_total", "Total dropped packets, tagged by drop reason and "
             "ingress/egress direction", packets),
            ("cilium_drop_bytes_total", "Total dropped bytes, tagged by drop reason and "
             "ingress/egress direction", sizes),
        ):  # fmt: skip
            family = CounterMetricFamily(name, help_text, labels=("reason", "direction"))
            for labels, n in sorted(values.items()):
                family.add_metric(labels, n)
            yield family

    def _forwards(self) -> Iterator[Metric]:
        counted = forward_counts(self._maps["forwards"])
        for name, help_text, index in (
            ("cilium_forward_count_total", "Total forwarded packets, tagged by ingress/egress "
             "direction", 0),
            ("cilium_forward_bytes_total", "Total forwarded bytes, tagged by ingress/egress "
             "direction", 1),
        ):  # fmt: skip
            family = CounterMetricFamily(name, help_text, labels=("direction",))
            for direction, values in sorted(counted.items()):
                family.add_metric((names.DIRECTIONS[direction],), values[index])
            yield family

    def _nodeport(self) -> Metric:
        from membrane.service.nodeport import read_counters

        family = CounterMetricFamily(
            "membrane_nodeport_packets_total",
            "Packets from outside the node to NodePorts and externalIPs (and their replies), "
            "tagged by what the per-packet service path did",
            labels=("event",),
        )
        for event, n in read_counters(self._maps["np_stats"]).items():
            family.add_metric((event,), n)
        return family

    def map_pressure(self) -> dict[str, float]:
        """Entries / max_entries of each map, counted at most every PRESSURE_INTERVAL."""
        with self._pressure_lock:
            now = time.monotonic()
            if now - self._pressure_at >= PRESSURE_INTERVAL:
                self._pressure = {
                    name: count_entries(self._maps[name]) / self._maps[name].max_entries
                    for name in (*PRESSURE_MAPS, *SERVICE_PRESSURE_MAPS, *NODEPORT_PRESSURE_MAPS)
                    if name in self._maps
                }
                self._pressure_at = now
            return dict(self._pressure)


def count_entries(m: Map) -> int:
    """Entries in the kernel's map now: batched reads where the map type has them (hash
    maps: conntrack), one key at a time where not (LPM tries: policy, ipcache)."""
    if m.type in (HASH, LRU_HASH):
        keys, _ = m.lookup_batch_raw()
        return len(keys) // m.key_size
    return len(m)
