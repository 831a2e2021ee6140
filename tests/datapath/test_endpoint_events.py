"""What endpoint.bpf.o reports: a per-CPU drop counter per (endpoint, direction, reason),
one FLOW_EVENT_DROP per dropped packet and one FLOW_EVENT_POLICY_VERDICT per new allowed
flow, every field filled; established and reply traffic is silent."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from endpoint_harness import (
    EP_ID,
    EP_IP,
    EndpointDatapath,
    Outcome,
    allow,
    deny,
)
from packets import tcp_segment

from membrane.bpf.maps import possible_cpus
from membrane.datapath import Direction, DropReason, FlowEventType, FlowMatch

pytestmark = pytest.mark.root

PEER = "198.18.0.20"
PEER_ID = 1001
EGRESS, INGRESS = Direction.EGRESS, Direction.INGRESS


@pytest.fixture
def dp() -> Iterator[EndpointDatapath]:
    with EndpointDatapath.temporary() as datapath:
        datapath.set_ipcache({f"{PEER}/32": PEER_ID})
        datapath.set_policy(
            [
                allow(EGRESS, PEER_ID, port=80, rule_id=21),
                deny(EGRESS, PEER_ID, port=23, rule_id=22),
            ],
            ingress=True,
            egress=True,
        )
        yield datapath


def fields(out: Outcome) -> dict[str, object]:
    ev = out.event
    return {
        "version": int(ev["h"]["version"]),
        "type": FlowEventType(int(ev["h"]["type"])),
        "ts_in_run": out.started_ns <= int(ev["h"]["ts_ns"]) <= out.ended_ns,
        "cpu_possible": 0 <= int(ev["h"]["cpu"]) < possible_cpus(),
        "saddr": socket.inet_ntoa(ev["saddr"].tobytes()[:4]),
        "daddr": socket.inet_ntoa(ev["daddr"].tobytes()[:4]),
        "ports": (int(ev["sport"]), int(ev["dport"])),
        "proto": int(ev["proto"]),
        "dir": int(ev["dir"]),
        "tcp_flags": int(ev["tcp_flags"]),
        "match": FlowMatch(int(ev["match"])),
        "ep_id": int(ev["ep_id"]),
        "drop_reason": DropReason(int(ev["drop_reason"])),
        "peer_identity": int(ev["peer_identity"]),
        "rule_id": int(ev["rule_id"]),
        "policy_rev": int(ev["policy_rev"]),
        "len": int(ev["len"]),
    }


def expected(out: Outcome, dp: EndpointDatapath, **overrides: object) -> dict[str, object]:
    base = {
        "version": 1,
        "ts_in_run": True,
        "cpu_possible": True,
        "proto": 6,
        "tcp_flags": 0x02,
        "ep_id": EP_ID,
        "policy_rev": dp.state().policy_rev,
        "len": out.length,
    }
    return {**base, **overrides}


def test_verdict_event_of_a_new_flow(dp: EndpointDatapath) -> None:
    out = dp.egress(tcp_segment(EP_IP, PEER, 40000, 80))
    assert out.verdict == "pass"
    assert fields(out) == expected(
        out,
        dp,
        type=FlowEventType.POLICY_VERDICT,
        saddr=EP_IP,
        daddr=PEER,
        ports=(40000, 80),
        dir=EGRESS,
        match=FlowMatch.RULE,
        drop_reason=DropReason.NONE,
        peer_identity=PEER_ID,
        rule_id=21,
    )


def test_drop_event_of_a_deny(dp: EndpointDatapath) -> None:
    out = dp.egress(tcp_segment(EP_IP, PEER, 40000, 23))
    assert fields(out) == expected(
        out,
        dp,
        type=FlowEventType.DROP,
        saddr=EP_IP,
        daddr=PEER,
        ports=(40000, 23),
        dir=EGRESS,
        match=FlowMatch.RULE,
        drop_reason=DropReason.POLICY_DENY,
        peer_identity=PEER_ID,
        rule_id=22,
    )


def test_drop_event_of_the_default_deny_to_the_pod(dp: EndpointDatapath) -> None:
    out = dp.ingress(tcp_segment(PEER, EP_IP, 50000, 22, "SE"))
    assert fields(out) == expected(
        out,
        dp,
        type=FlowEventType.DROP,
        saddr=PEER,
        daddr=EP_IP,
        ports=(50000, 22),
        dir=INGRESS,
        tcp_flags=0x42,
        match=FlowMatch.DEFAULT,
        drop_reason=DropReason.POLICY_DENIED,
        peer_identity=PEER_ID,
        rule_id=0,
    )


def test_drop_event_of_a_spoofed_source(dp: EndpointDatapath) -> None:
    out = dp.egress(tcp_segment("198.18.0.99", PEER, 40000, 80))
    assert fields(out) == expected(
        out,
        dp,
        type=FlowEventType.DROP,
        saddr="198.18.0.99",
        daddr=PEER,
        ports=(0, 0),  # dropped before the ports are read
        tcp_flags=0,
        dir=EGRESS,
        match=FlowMatch.NONE,
        drop_reason=DropReason.INVALID_SOURCE_IP,
        peer_identity=PEER_ID,
        rule_id=0,
        policy_rev=0,  # nor the endpoint's state
    )


def test_established_and_reply_traffic_is_silent(dp: EndpointDatapath) -> None:
    assert len(dp.egress(tcp_segment(EP_IP, PEER, 40000, 80, "S")).events) == 1
    for _ in range(3):
        assert dp.ingress(tcp_segment(PEER, EP_IP, 80, 40000, "SA")).events == []
        assert dp.egress(tcp_segment(EP_IP, PEER, 40000, 80, "A")).events == []
    assert dp.ring.lost == 0


def test_drop_counters_per_endpoint_direction_and_reason(dp: EndpointDatapath) -> None:
    dp.add_endpoint(9, "198.18.0.11")
    dp.set_policy(ep_id=9, ingress=True)
    denied_out = tcp_segment(EP_IP, PEER, 40000, 23)
    denied_in = tcp_segment(PEER, EP_IP, 50000, 22)
    out = dp.egress(denied_out, repeat=3)
    assert out.drops == {(EP_ID, EGRESS, int(DropReason.POLICY_DENY)): (3, 3 * out.length)}
    assert len(out.events) == 3
    dp.ingress(denied_in)
    dp.ingress(tcp_segment(PEER, "198.18.0.11", 50000, 22), ep_id=9)
    dp.egress(tcp_segment("198.18.0.98", PEER, 1, 2), ep_id=9)
    n = len(bytes(denied_out))
    assert dp.drop_counters() == {
        (EP_ID, EGRESS, int(DropReason.POLICY_DENY)): (3, 3 * n),
        (EP_ID, INGRESS, int(DropReason.POLICY_DENIED)): (1, n),
        (9, INGRESS, int(DropReason.POLICY_DENIED)): (1, n),
        (9, EGRESS, int(DropReason.INVALID_SOURCE_IP)): (1, n),
    }
