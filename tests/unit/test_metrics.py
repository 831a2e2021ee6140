"""Metrics exposition: the names, types, labels and label values Cilium and Hubble use,
parsed back with prometheus_client's own parser; flow counting by event; listen
addresses."""

from __future__ import annotations

import socket
import urllib.request
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from membrane.abi import (
    MEMBRANE_EVENT_VERSION,
    Direction,
    DropReason,
    FlowEventType,
    FlowMatch,
    Identity,
    IpProto,
)
from membrane.bpf.maps import LPM_TRIE, LRU_HASH
from membrane.errors import UserError
from membrane.metrics.address import parse_listen_address
from membrane.metrics.agent import PRESSURE_MAPS, AgentCollector, PolicyChanges
from membrane.metrics.flows import FlowCounts
from membrane.metrics.hubble import HubbleCollector
from membrane.observe.record import FlowEvent

SYN, ACK, FIN, RST = 0x02, 0x10, 0x01, 0x04
RULE_L3_L4, RULE_L3 = 7, 8


def event(**kw: Any) -> FlowEvent:
    fields: dict[str, Any] = {
        "ts_ns": 1, "version": MEMBRANE_EVENT_VERSION, "type": FlowEventType.POLICY_VERDICT,
        "cpu": 0, "saddr": "198.18.0.2", "daddr": "198.18.0.3", "sport": 40000, "dport": 80,
        "proto": IpProto.TCP, "dir": Direction.EGRESS, "tcp_flags": SYN,
        "match": FlowMatch.NONE, "ep_id": 1, "drop_reason": 0, "peer_identity": 300,
        "rule_id": 0, "policy_rev": 1, "len": 60, "family": 4,
    }  # fmt: skip
    fields.update(kw)
    return FlowEvent(**fields)


def snapshot() -> Any:
    return SimpleNamespace(
        rules={RULE_L3_L4: object(), RULE_L3: object()},
        rule_shapes={RULE_L3_L4: (True, True), RULE_L3: (True, False)},
        endpoints={1: object(), 2: object(), 3: object()},
        policies=("p1", "p2"),
        policy_revision=5,
    )


def scrape(registry: CollectorRegistry) -> dict[str, Any]:
    text = generate_latest(registry).decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def samples(family: Any, suffix: str = "_total") -> dict[tuple[tuple[str, str], ...], float]:
    return {
        tuple(sorted(s.labels.items())): s.value
        for s in family.samples
        if s.name == family.name + suffix
    }


def mixed_events() -> list[FlowEvent]:
    return [
        event(),  # allowed egress SYN, no policy
        event(),
        event(tcp_flags=SYN | ACK, dir=Direction.INGRESS, match=FlowMatch.RULE, rule_id=RULE_L3_L4),
        event(dir=Direction.INGRESS, peer_identity=Identity.HOST),  # host: no verdict
        event(
            type=FlowEventType.DROP,
            drop_reason=DropReason.POLICY_DENIED,
            proto=IpProto.UDP,
            dir=Direction.INGRESS,
            match=FlowMatch.DEFAULT,
        ),
        event(
            type=FlowEventType.DROP,
            drop_reason=DropReason.POLICY_DENY,
            proto=IpProto.ICMPV6,
            family=6,
            match=FlowMatch.RULE,
            rule_id=RULE_L3,
        ),
        event(type=FlowEventType.DROP, drop_reason=DropReason.INVALID_SOURCE_IP),
        event(tcp_flags=FIN | RST, family=6),
        event(proto=IpProto.ICMP, tcp_flags=0),
        event(version=MEMBRANE_EVENT_VERSION + 1),  # not ours to read
        # traces of one connection's handshake at both points: flows and flags, no verdicts
        event(type=FlowEventType.TRACE),
        event(type=FlowEventType.TRACE, dir=Direction.INGRESS, match=FlowMatch.REPLY,
              tcp_flags=SYN | ACK),
        event(type=FlowEventType.TRACE, dir=Direction.INGRESS, peer_identity=Identity.HOST,
              proto=IpProto.UDP, tcp_flags=0),
    ]  # fmt: skip


def test_hubble_metrics_names_types_labels_and_values() -> None:
    counts = FlowCounts()
    counts.observe(mixed_events(), snapshot())
    assert counts.unsupported == 1
    registry = CollectorRegistry()
    registry.register(HubbleCollector(counts, lost=lambda: {"perf_event_ring_buffer": 3}))
    found = scrape(registry)
    assert set(found) == {
        "hubble_flows_processed", "hubble_drop", "hubble_policy_verdicts",
        "hubble_tcp_flags", "hubble_lost_events",
    }  # fmt: skip
    assert all(f.type == "counter" for f in found.values())

    flows = samples(found["hubble_flows_processed"])
    fwd = (("subtype", ""), ("type", "PolicyVerdict"), ("verdict", "FORWARDED"))
    drop = (("subtype", ""), ("type", "Drop"), ("verdict", "DROPPED"))
    trace_from = (("subtype", "from-endpoint"), ("type", "Trace"), ("verdict", "FORWARDED"))
    trace_to = (("subtype", "to-endpoint"), ("type", "Trace"), ("verdict", "FORWARDED"))
    assert flows == {
        (("protocol", "TCP"), *fwd): 5,
        (("protocol", "ICMPv4"), *fwd): 1,
        (("protocol", "UDP"), *drop): 1,
        (("protocol", "ICMPv6"), *drop): 1,
        (("protocol", "TCP"), *drop): 1,
        (("protocol", "TCP"), *trace_from): 1,
        (("protocol", "TCP"), *trace_to): 1,
        (("protocol", "UDP"), *trace_to): 1,
    }
    assert samples(found["hubble_drop"]) == {
        (("protocol", "UDP"), ("reason", "POLICY_DENIED")): 1,
        (("protocol", "ICMPv6"), ("reason", "POLICY_DENY")): 1,
        (("protocol", "TCP"), ("reason", "INVALID_SOURCE_IP")): 1,
    }
    assert samples(found["hubble_policy_verdicts"]) == {
        (("action", "forwarded"), ("direction", "egress"), ("match", "none")): 4,
        (("action", "forwarded"), ("direction", "ingress"), ("match", "l3-l4")): 1,
        (("action", "dropped"), ("direction", "ingress"), ("match", "none")): 1,
        (("action", "dropped"), ("direction", "egress"), ("match", "l3-only")): 1,
    }
    # Hubble counts the flags of every forwarded flow: verdicts and traces alike
    assert samples(found["hubble_tcp_flags"]) == {
        (("family", "IPv4"), ("flag", "SYN")): 4,
        (("family", "IPv4"), ("flag", "SYN-ACK")): 2,
        (("family", "IPv6"), ("flag", "FIN")): 1,
        (("family", "IPv6"), ("flag", "RST")): 1,
    }
    assert samples(found["hubble_lost_events"]) == {
        (("source", "perf_event_ring_buffer"),): 3,
        (("source", "observer_events_queue"),): 0,
    }


def test_ring_buffer_rows_count_exactly_as_decoded_events() -> None:
    """The flow reader hands the metrics numpy rows (no Python object per event): every
    count must be what the decoded events give."""
    from membrane.bpf.btf import Btf
    from membrane.bpf.object import objects_dir

    obj = objects_dir() / "endpoint.bpf.o"
    if not obj.exists():
        pytest.skip("endpoint.bpf.o is not built (make bpf)")
    dtype = Btf.from_file(obj).dtype("flow_event")
    base = mixed_events() * 3 + [event(family=0, type=FlowEventType.DROP, drop_reason=1)]
    # a rule id too wide for one packed key: the two-key way must count the same
    wide = [*base, event(dir=Direction.INGRESS, match=FlowMatch.RULE, rule_id=1 << 20)]
    for events in (base, wide):
        rows = np.zeros(len(events), dtype=dtype)
        for row, ev in zip(rows, events, strict=True):
            row["h"]["ts_ns"], row["h"]["version"] = ev.ts_ns, ev.version
            row["h"]["type"] = ev.type
            for name in ("sport", "dport", "proto", "dir", "tcp_flags", "match", "ep_id",
                         "drop_reason", "peer_identity", "rule_id", "policy_rev", "len",
                         "family"):  # fmt: skip
                row[name] = getattr(ev, name)
        from_events, from_rows = FlowCounts(), FlowCounts()
        from_events.observe(events, snapshot())
        from_rows.observe(rows, snapshot())
        assert from_rows.unsupported == from_events.unsupported == 3
        for name in ("flows", "drops", "policy_verdicts", "tcp_flags"):
            assert getattr(from_rows, name) == getattr(from_events, name), name
        assert from_rows.flows


@dataclass
class FakeMap:
    type: int
    max_entries: int
    entries: int = 0
    key_size: int = 8
    rows: list[tuple[Any, list[Any]]] = field(default_factory=list)

    def __len__(self) -> int:
        return self.entries

    def lookup_batch(self) -> list[tuple[Any, list[Any]]]:
        return self.rows

    def items(self) -> list[tuple[Any, list[Any]]]:
        return self.rows

    def lookup_batch_raw(self) -> tuple[bytes, bytes]:
        return bytes(self.key_size * self.entries), b""

    def close(self) -> None:
        pass


def drop_row(ep: int, direction: int, reason: int, per_cpu: list[tuple[int, int]]) -> Any:
    key = SimpleNamespace(ep_id=ep, dir=direction, reason=reason)
    return key, [SimpleNamespace(packets=p, bytes=b) for p, b in per_cpu]


def forward_row(direction: int, per_cpu: list[tuple[int, int]]) -> Any:
    return direction, [SimpleNamespace(packets=p, bytes=b) for p, b in per_cpu]


def test_agent_metrics_names_types_labels_and_values() -> None:
    counts = FlowCounts()
    # events do not count forwards (they are sampled, and can be lost): the counters do
    counts.observe([event(), event(dir=Direction.INGRESS)], snapshot())
    collector = AgentCollector(counts)
    registry = CollectorRegistry()
    assert not list(collector.collect())  # not attached yet: nothing to say
    registry.register(collector)
    changes = PolicyChanges(registry)
    collector._maps = {
        "drops": FakeMap(5, 16384, rows=[
            drop_row(1, Direction.INGRESS, DropReason.POLICY_DENIED, [(2, 120), (1, 60)]),
            drop_row(2, Direction.INGRESS, DropReason.POLICY_DENIED, [(1, 60), (0, 0)]),
            drop_row(2, Direction.EGRESS, DropReason.POLICY_DENY, [(4, 400), (0, 0)]),
            drop_row(2, Direction.EGRESS, 250, [(1, 50), (0, 0)]),
        ]),
        "forwards": FakeMap(6, 2, rows=[
            forward_row(Direction.INGRESS, [(10, 1000), (5, 600)]),
            forward_row(Direction.EGRESS, [(0, 0), (7, 420)]),
        ]),
        "ct": FakeMap(LRU_HASH, 1000, entries=250),
        "ct6": FakeMap(LRU_HASH, 1000, entries=0),
        "policy": FakeMap(LPM_TRIE, 1 << 20, entries=1 << 18),
        "ipcache": FakeMap(LPM_TRIE, 100, entries=10),
        "ipcache6": FakeMap(LPM_TRIE, 100, entries=1),
    }  # fmt: skip
    collector._snapshot = snapshot
    with changes.timed(policy_change=True):
        pass
    with pytest.raises(UserError), changes.timed(policy_change=True):
        raise UserError("yaml", "bad")
    with changes.timed(policy_change=False):
        pass
    found = scrape(registry)

    assert samples(found["cilium_drop_count"]) == {
        (("direction", "INGRESS"), ("reason", "Policy denied")): 4,
        (("direction", "EGRESS"), ("reason", "Policy denied by denylist")): 4,
        (("direction", "EGRESS"), ("reason", "250")): 1,
    }
    assert samples(found["cilium_drop_bytes"]) == {
        (("direction", "INGRESS"), ("reason", "Policy denied")): 240,
        (("direction", "EGRESS"), ("reason", "Policy denied by denylist")): 400,
        (("direction", "EGRESS"), ("reason", "250")): 50,
    }
    assert samples(found["cilium_forward_count"]) == {
        (("direction", "EGRESS"),): 7,
        (("direction", "INGRESS"),): 15,
    }
    assert samples(found["cilium_forward_bytes"]) == {
        (("direction", "EGRESS"),): 420,
        (("direction", "INGRESS"),): 1600,
    }
    assert samples(found["cilium_policy_change"]) == {
        (("outcome", "success"),): 1,
        (("outcome", "failure"),): 1,
    }
    for name in ("cilium_endpoint", "cilium_policy", "cilium_policy_max_revision"):
        assert found[name].type == "gauge"
    assert samples(found["cilium_endpoint"], "") == {(): 3}
    assert samples(found["cilium_policy"], "") == {(): 2}
    assert samples(found["cilium_policy_max_revision"], "") == {(): 5}
    pressure = found["cilium_bpf_map_pressure"]
    assert pressure.type == "gauge"
    assert samples(pressure, "") == {
        (("map_name", "ct"),): 0.25,
        (("map_name", "ct6"),): 0.0,
        (("map_name", "policy"),): 0.25,
        (("map_name", "ipcache"),): 0.1,
        (("map_name", "ipcache6"),): 0.01,
    }
    assert set(PRESSURE_MAPS) == {"ct", "ct6", "policy", "ipcache", "ipcache6"}
    regen = found["cilium_policy_regeneration_time_stats_seconds"]
    assert regen.type == "histogram"
    count = samples(regen, "_count")
    assert count == {(("scope", "total"),): 3}
    buckets = [s for s in regen.samples if s.name.endswith("_bucket")]
    assert {s.labels["le"] for s in buckets} >= {"0.005", "1.0", "+Inf"}
    for family in (
        "cilium_drop_count", "cilium_drop_bytes", "cilium_forward_count", "cilium_forward_bytes"
    ):  # fmt: skip
        assert found[family].type == "counter"


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("", None),
        (":9962", ("", 9962)),
        ("127.0.0.1:9965", ("127.0.0.1", 9965)),
        ("[::1]:9965", ("::1", 9965)),
    ],
)
def test_listen_addresses(text: str, want: tuple[str, int] | None) -> None:
    assert parse_listen_address(text, "prometheus-serve-addr") == want


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("9962", "HOST:PORT"),
        ("::1:9962", "brackets"),
        ("localhost:9962", "not an IP address"),
        (":0", "not a port"),
        (":70000", "not a port"),
        ("127.0.0.1:http", "not a port"),
    ],
)
def test_bad_listen_addresses_name_the_option(text: str, problem: str) -> None:
    with pytest.raises(UserError) as err:
        parse_listen_address(text, "hubble-metrics-server")
    assert err.value.field == "hubble-metrics-server"
    assert problem in err.value.problem


def test_servers_listen_before_the_agent_and_a_taken_port_names_the_option() -> None:
    from membrane.metrics.server import MetricsServers

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UserError) as err:
            MetricsServers("", f"127.0.0.1:{port}")
        assert err.value.field == "hubble-metrics-server"
        assert f"cannot listen on 127.0.0.1:{port}" in err.value.problem
    servers = MetricsServers(f"127.0.0.1:{port}", "")
    try:
        assert servers.ports == [port]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        found = {f.name for f in text_string_to_metric_families(text)}
        # before the agent runs: the process and policy-change families, no agent state
        assert "cilium_policy_change" in found
        assert "cilium_endpoint" not in found
        assert not any(name.endswith("_created") for name in text.split())
    finally:
        servers.stop()
