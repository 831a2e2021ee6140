"""The flow metrics Hubble serves on `--hubble-metrics-server` (its flow, drop, policy and
tcp handlers, and lost events), from the flow reader's counts."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from membrane.metrics import names
from membrane.metrics.flows import FlowCounts, Labels


class HubbleCollector(Collector):
    def __init__(
        self, counts: FlowCounts, lost: Callable[[], Mapping[str, int]] | None = None
    ) -> None:
        self.counts = counts
        # events lost before the flow store, by source (names.LOST_*): None until the reader runs
        self.lost = lost

    def collect(self) -> Iterator[Metric]:
        c = self.counts
        yield _counter(
            "hubble_flows_processed_total",
            "Total number of flows processed",
            ("protocol", "type", "subtype", "verdict"),
            c.flows,
        )
        yield _counter("hubble_drop_total", "Number of drops", ("reason", "protocol"), c.drops)
        yield _counter(
            "hubble_policy_verdicts_total",
            "Total number of Cilium network policy verdicts",
            ("direction", "match", "action"),
            c.policy_verdicts,
        )
        yield _counter(
            "hubble_tcp_flags_total", "TCP flag occurrences", ("flag", "family"), c.tcp_flags
        )
        lost = CounterMetricFamily(
            "hubble_lost_events_total", "Number of lost events", labels=("source",)
        )
        by_source = dict(self.lost()) if self.lost else {}
        for source in names.LOST_SOURCES:
            lost.add_metric((source,), by_source.get(source, 0))
        yield lost


def _counter(
    name: str, documentation: str, labels: tuple[str, ...], counts: dict[Labels, int]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=labels)
    for values, n in sorted(dict(counts).items()):  # a copy: the reader thread goes on
        family.add_metric(values, n)
    return family
