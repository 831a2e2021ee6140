"""Trace events (FLOW_EVENT_TRACE) and forward counters of endpoint.bpf.o.

At the agent's default monitor aggregation (medium) a forwarded packet is traced only when
it is news about its connection: the first packet, the first reply, the first packet of a
direction to carry SYN, FIN or RST, and untracked packets; a plain established or reply
segment never is. The other levels trace every packet (none), every packet to the pod
(low), or nothing (maximum). Every packet that passes is counted per CPU and direction,
whatever the level; drops are not."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest
from endpoint_harness import (
    EP_ID,
    EP_IP,
    EP_IP6,
    EndpointDatapath,
    Outcome,
    allow,
    temporary_pin_dir,
)
from packets import icmp_error, icmp_message, packet, tcp_segment

from membrane.abi import TraceMode
from membrane.datapath import Direction, FlowEventType, FlowMatch, NodeMaps
from membrane.datapath.monitor import forward_counts, set_monitor_aggregation, trace_mode
from membrane.datapath.upgrade import changed_node_maps

pytestmark = pytest.mark.root

PEER, PEER6 = "198.18.0.20", "2001:db8:1::14"
PEER_ID = 1001
EGRESS, INGRESS = Direction.EGRESS, Direction.INGRESS
VERDICT, TRACE = FlowEventType.POLICY_VERDICT, FlowEventType.TRACE


@pytest.fixture
def dp() -> Iterator[EndpointDatapath]:
    with EndpointDatapath.temporary() as datapath:
        datapath.set_ipcache({f"{PEER}/32": PEER_ID, f"{PEER6}/128": PEER_ID})
        datapath.set_policy(
            [
                allow(EGRESS, PEER_ID, port=80, rule_id=21),
                allow(EGRESS, PEER_ID, proto=17, port=53, rule_id=22),
                allow(EGRESS, PEER_ID, proto=1, port=8, rule_id=23),
            ],
            ingress=True,
            egress=True,
        )
        set_monitor_aggregation(datapath.maps.monitor_config, "medium")
        yield datapath


def kinds(out: Outcome) -> list[tuple[FlowEventType, FlowMatch]]:
    """(type, match) of each event of the run, in order."""
    return [(FlowEventType(int(e["h"]["type"])), FlowMatch(int(e["match"]))) for e in out.events]


def traces(out: Outcome) -> list[dict[str, object]]:
    """The run's trace events, with the fields a flow is made of."""
    return [
        {
            "match": FlowMatch(int(e["match"])),
            "dir": Direction(int(e["dir"])),
            "ports": (int(e["sport"]), int(e["dport"])),
            "tcp_flags": int(e["tcp_flags"]),
            "peer_identity": int(e["peer_identity"]),
            "rule_id": int(e["rule_id"]),
            "drop_reason": int(e["drop_reason"]),
            "len": int(e["len"]),
        }
        for e in out.events
        if int(e["h"]["type"]) == TRACE
    ]


def out_seg(flags: str, sport: int = 40000) -> object:
    return tcp_segment(EP_IP, PEER, sport, 80, flags)


def in_seg(flags: str, dport: int = 40000) -> object:
    return tcp_segment(PEER, EP_IP, 80, dport, flags)


def test_a_tcp_connection_is_traced_at_its_news_only(dp: EndpointDatapath) -> None:
    """The client's handshake, data both ways and close, in the order a real one goes."""
    steps = [
        (dp.egress, out_seg("S"), [(VERDICT, FlowMatch.RULE), (TRACE, FlowMatch.NONE)]),
        (dp.ingress, in_seg("SA"), [(TRACE, FlowMatch.REPLY)]),  # first reply, SYN
        (dp.egress, out_seg("A"), []),
        (dp.egress, out_seg("PA"), []),
        (dp.ingress, in_seg("PA"), []),
        (dp.ingress, in_seg("SA"), []),  # retransmitted: nothing new for its direction
        (dp.egress, out_seg("S"), []),  # a retransmitted SYN
        (dp.egress, out_seg("FA"), [(TRACE, FlowMatch.ESTABLISHED)]),
        (dp.egress, out_seg("FA"), []),  # retransmitted
        (dp.ingress, in_seg("FA"), [(TRACE, FlowMatch.REPLY)]),
        (dp.egress, out_seg("A"), []),
    ]
    for i, (run, frame, want) in enumerate(steps):
        out = run(frame)
        assert out.verdict == "pass", i
        assert kinds(out) == want, (i, kinds(out))
    assert dp.ring.lost == 0


def test_trace_fields_of_a_new_flow_and_its_reply(dp: EndpointDatapath) -> None:
    out = dp.egress(out_seg("S"))
    (first,) = traces(out)
    assert first == {
        "match": FlowMatch.NONE,
        "dir": EGRESS,
        "ports": (40000, 80),
        "tcp_flags": 0x02,
        "peer_identity": PEER_ID,
        "rule_id": 0,  # a trace names no rule: the verdict before it does
        "drop_reason": 0,
        "len": out.length,
    }
    verdict, trace = out.events
    for name in ("saddr", "daddr", "ep_id", "policy_rev", "family"):
        assert bytes(verdict[name]) == bytes(trace[name]), name
    assert socket.inet_ntoa(trace["saddr"].tobytes()[:4]) == EP_IP
    assert int(trace["ep_id"]) == EP_ID
    reply = dp.ingress(in_seg("SA"))
    assert traces(reply) == [
        {
            "match": FlowMatch.REPLY,
            "dir": INGRESS,
            "ports": (80, 40000),
            "tcp_flags": 0x12,
            "peer_identity": PEER_ID,  # from conntrack: no ipcache lookup on this path
            "rule_id": 0,
            "drop_reason": 0,
            "len": reply.length,
        }
    ]


def test_rst_closes_with_a_trace(dp: EndpointDatapath) -> None:
    dp.egress(out_seg("S"))
    dp.ingress(in_seg("SA"))
    assert kinds(dp.ingress(in_seg("R"))) == [(TRACE, FlowMatch.REPLY)]
    assert kinds(dp.ingress(in_seg("R"))) == []


def test_a_busy_established_connection_emits_nothing(dp: EndpointDatapath) -> None:
    dp.egress(out_seg("S"))
    dp.ingress(in_seg("SA"))
    dp.egress(out_seg("A"))
    assert dp.egress(out_seg("PA"), repeat=1000).events == []
    assert dp.ingress(in_seg("A"), repeat=1000).events == []
    assert dp.ring.lost == 0


def test_udp_first_packet_and_first_reply(dp: EndpointDatapath) -> None:
    query = packet(PEER, "udp", src=EP_IP, sport=5353, dport=53)
    answer = packet(EP_IP, "udp", src=PEER, sport=53, dport=5353)
    assert kinds(dp.egress(query)) == [(VERDICT, FlowMatch.RULE), (TRACE, FlowMatch.NONE)]
    assert kinds(dp.egress(query)) == []
    assert kinds(dp.ingress(answer)) == [(TRACE, FlowMatch.REPLY)]
    assert kinds(dp.ingress(answer)) == []


def test_related_icmp_error_is_traced_as_related(dp: EndpointDatapath) -> None:
    dp.egress(out_seg("S"))
    error = icmp_error("198.19.0.77", EP_IP, out_seg("S")["IP"])  # type: ignore[index]
    assert kinds(dp.ingress(error)) == [(VERDICT, FlowMatch.RELATED), (TRACE, FlowMatch.RELATED)]


def test_ipv6_is_traced_alike(dp: EndpointDatapath) -> None:
    syn = tcp_segment(EP_IP6, PEER6, 40000, 80, "S")
    out = dp.egress(syn)
    assert kinds(out) == [(VERDICT, FlowMatch.RULE), (TRACE, FlowMatch.NONE)]
    assert int(out.events[1]["family"]) == 6
    assert kinds(dp.ingress(tcp_segment(PEER6, EP_IP6, 80, 40000, "SA"))) == [
        (TRACE, FlowMatch.REPLY)
    ]
    assert kinds(dp.egress(tcp_segment(EP_IP6, PEER6, 40000, 80, "A"))) == []


@pytest.mark.parametrize(
    ("level", "out_traced", "in_traced"),
    [("maximum", False, False), ("low", False, True), ("none", True, True)],
)
def test_other_levels(dp: EndpointDatapath, level: str, out_traced: bool, in_traced: bool) -> None:
    set_monitor_aggregation(dp.maps.monitor_config, level)
    syn = dp.egress(out_seg("S"))
    assert [k for k, _ in kinds(syn)] == [VERDICT] + [TRACE] * out_traced
    dp.ingress(in_seg("SA"))
    for _ in range(2):  # plain established traffic: traced only where every packet is
        assert len(traces(dp.egress(out_seg("A")))) == out_traced
        assert len(traces(dp.ingress(in_seg("A")))) == in_traced


def test_an_unconfigured_node_traces_nothing(dp: EndpointDatapath) -> None:
    """A zeroed monitor_config (no agent wrote it) is maximum: no traces, verdicts still."""
    dp.maps.monitor_config.update(0, dp.maps.monitor_config.value_type())
    assert kinds(dp.egress(out_seg("S"))) == [(VERDICT, FlowMatch.RULE)]
    assert kinds(dp.ingress(in_seg("SA"))) == []


def test_forward_counters_count_every_passed_packet_per_direction(dp: EndpointDatapath) -> None:
    set_monitor_aggregation(dp.maps.monitor_config, "maximum")  # counted without any event
    syn, synack, ack = out_seg("S"), in_seg("SA"), out_seg("A")
    dp.egress(syn)
    dp.ingress(synack)
    dp.egress(ack, repeat=5)
    dropped = dp.egress(tcp_segment(EP_IP, PEER, 40001, 23))  # no rule for port 23
    assert dropped.verdict == "drop"
    dp.ingress(in_seg("S", dport=40002))  # ingress default deny: dropped
    ping = icmp_message(EP_IP, PEER)
    dp.egress(ping)
    n = len(bytes(syn))
    assert len(bytes(ack)) == n and len(bytes(synack)) == n
    assert forward_counts(dp.maps.forwards) == {
        EGRESS: (1 + 5 + 1, 6 * n + len(bytes(ping))),
        INGRESS: (1, n),
    }


def test_pins_of_a_build_without_the_new_maps_are_completed_and_keep_conntrack() -> None:
    """An agent of the build before trace events pinned no `forwards` nor `monitor_config`:
    opening its pins adds them and leaves conntrack (same ct_entry layout) as it was, so
    an upgrade carries established connections over without a migration."""
    with temporary_pin_dir() as pin_dir:
        with NodeMaps.open(pin_dir) as maps:
            key = maps.ct.key_type(saddr=1, daddr=2, sport=3, dport=4, proto=6, ep_id=EP_ID)
            maps.ct.update(key, maps.ct.value_type(expires_ns=1 << 62, tcp_flags_orig=0x12))
        for name in ("forwards", "monitor_config"):  # as the older build left the node
            os.unlink(os.path.join(pin_dir, name))
        assert changed_node_maps(pin_dir) == []
        with NodeMaps.open(pin_dir) as maps:
            assert set(os.listdir(pin_dir)) >= {"forwards", "monitor_config"}
            ((k, v),) = maps.ct.items()
            assert (k.sport, v.tcp_flags_orig) == (3, 0x12)
            assert trace_mode(maps.monitor_config) == TraceMode.OFF  # until the agent sets it
            assert forward_counts(maps.forwards) == {EGRESS: (0, 0), INGRESS: (0, 0)}
