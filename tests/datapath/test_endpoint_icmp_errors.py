"""ICMP errors in endpoint.bpf.o: an error (destination unreachable, fragmentation needed
among them; time exceeded; parameter problem) that quotes a packet of a connection the
endpoint tracks passes as a reply would, whatever the policy says of ICMP or of the
router that sent it, and is reported as a verdict "related". Any other error is checked
by policy like other ICMP, so an error cannot carry traffic past a policy by naming a
connection it does not belong to."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from endpoint_harness import EP_IP, EndpointDatapath, allow, assert_dropped, assert_passed
from packets import icmp_error, icmp_message, packet, tcp_segment
from scapy.layers.inet import IP

from membrane.abi import FlowEventType, FlowMatch, Identity
from membrane.datapath import Direction, DropReason

pytestmark = pytest.mark.root

PEER = "198.18.0.20"
PEER_ID = 1001
ROUTER = "198.19.44.1"  # on the path, not in the ipcache: world
OTHER = "198.18.0.21"
EGRESS, INGRESS = Direction.EGRESS, Direction.INGRESS
ERRORS = {
    "fragmentation-needed": (3, 4),
    "host-unreachable": (3, 1),
    "ttl-exceeded": (11, 0),
    "parameter-problem": (12, 0),
}


@pytest.fixture
def dp() -> Iterator[EndpointDatapath]:
    with EndpointDatapath.temporary() as datapath:
        datapath.set_ipcache({f"{PEER}/32": PEER_ID, f"{OTHER}/32": PEER_ID})
        # TCP out to the peer's port 80, UDP in on port 53; no ICMP either way
        datapath.set_policy(
            [allow(EGRESS, PEER_ID, port=80), allow(INGRESS, PEER_ID, proto=17, port=53)],
            ingress=True,
            egress=True,
        )
        yield datapath


def assert_related(out: object) -> None:
    """Passed and reported once as a verdict that a tracked connection explains."""
    assert_passed(out, new_flow=True)  # type: ignore[arg-type]
    event = out.event  # type: ignore[attr-defined]
    assert int(event["h"]["type"]) == FlowEventType.POLICY_VERDICT
    assert int(event["match"]) == FlowMatch.RELATED


@pytest.mark.parametrize("kind", ERRORS)
def test_an_error_about_a_connection_out_reaches_the_pod(dp: EndpointDatapath, kind: str) -> None:
    type_, code = ERRORS[kind]
    syn = tcp_segment(EP_IP, PEER, 40000, 80, "S")
    error = icmp_error(ROUTER, EP_IP, syn, type_=type_, code=code)
    assert_dropped(dp.ingress(error), DropReason.POLICY_DENIED, INGRESS)  # nothing tracked yet
    assert_passed(dp.egress(syn), new_flow=True)
    out = dp.ingress(error)
    assert_related(out)
    assert (int(out.event["sport"]), int(out.event["dport"])) == (type_, code)
    assert int(out.event["peer_identity"]) == Identity.WORLD  # the router's
    (e,) = dp.ct()
    assert (e.packets_orig, e.packets_reply) == (1, 0)  # the connection's counters stay


def test_an_error_about_a_reply_reaches_the_pod(dp: EndpointDatapath) -> None:
    """The quoted packet is the pod's answer on a connection the peer opened."""
    query = packet(EP_IP, "udp", src=PEER, sport=5300, dport=53)
    assert_passed(dp.ingress(query), new_flow=True)
    answer = packet(PEER, "udp", src=EP_IP, sport=53, dport=5300)
    assert_passed(dp.egress(answer), new_flow=False)
    assert_related(dp.ingress(icmp_error(ROUTER, EP_IP, answer)))


def test_the_pods_own_error_about_a_connection_in_leaves(dp: EndpointDatapath) -> None:
    """Port unreachable from the pod, about the peer's datagram: egress allows no ICMP."""
    query = packet(EP_IP, "udp", src=PEER, sport=5300, dport=53)
    unreachable = icmp_error(EP_IP, PEER, query, type_=3, code=3)
    assert_dropped(dp.egress(unreachable), DropReason.POLICY_DENIED, EGRESS)
    assert_passed(dp.ingress(query), new_flow=True)
    assert_related(dp.egress(unreachable))


def test_an_error_about_an_echo_request_reaches_the_pod(dp: EndpointDatapath) -> None:
    dp.set_policy([allow(EGRESS, PEER_ID, proto=1, port=8)], ingress=True, egress=True)
    ping = icmp_message(EP_IP, PEER, type_=8, ident=77)
    assert_passed(dp.egress(ping), new_flow=True)
    assert_related(dp.ingress(icmp_error(ROUTER, EP_IP, ping, type_=11, code=0)))
    other_id = icmp_message(EP_IP, PEER, type_=8, ident=78)
    error = icmp_error(ROUTER, EP_IP, other_id, type_=11, code=0)
    assert_dropped(dp.ingress(error), DropReason.POLICY_DENIED, INGRESS)


def test_errors_about_other_packets_are_checked_by_policy(dp: EndpointDatapath) -> None:
    assert_passed(dp.egress(tcp_segment(EP_IP, PEER, 40000, 80, "S")), new_flow=True)
    unknown = [
        tcp_segment(EP_IP, PEER, 40001, 80, "S"),  # another source port
        tcp_segment(EP_IP, OTHER, 40000, 80, "S"),  # another peer
        tcp_segment(OTHER, PEER, 40000, 80, "S"),  # not the pod's packet
    ]
    for quoted in unknown:
        error = icmp_error(ROUTER, EP_IP, quoted)
        assert_dropped(dp.ingress(error), DropReason.POLICY_DENIED, INGRESS)


def test_an_error_must_go_back_to_the_quoted_sender(dp: EndpointDatapath) -> None:
    """The pod cannot reach a third address by quoting one of its connections."""
    query = packet(EP_IP, "udp", src=PEER, sport=5300, dport=53)
    assert_passed(dp.ingress(query), new_flow=True)
    elsewhere = icmp_error(EP_IP, OTHER, query, type_=3, code=3)
    assert_dropped(dp.egress(elsewhere), DropReason.POLICY_DENIED, EGRESS)


def test_errors_about_errors_and_later_fragments_are_not_related(dp: EndpointDatapath) -> None:
    syn = tcp_segment(EP_IP, PEER, 40000, 80, "S")
    assert_passed(dp.egress(syn), new_flow=True)
    about_error = icmp_error(ROUTER, EP_IP, icmp_error(EP_IP, PEER, syn))
    assert_dropped(dp.ingress(about_error), DropReason.POLICY_DENIED, INGRESS)
    later = syn.copy()
    later[IP].frag = 185
    error = icmp_error(ROUTER, EP_IP, later)
    assert_dropped(dp.ingress(error), DropReason.POLICY_DENIED, INGRESS)


def test_an_allowed_error_type_still_passes_without_a_connection(dp: EndpointDatapath) -> None:
    """A policy that allows the type keeps working for errors nothing explains."""
    dp.set_policy([allow(INGRESS, Identity.WORLD, proto=1, port=3)], ingress=True)
    error = icmp_error(ROUTER, EP_IP, tcp_segment(EP_IP, PEER, 40000, 80, "S"))
    out = dp.ingress(error)
    assert_passed(out, new_flow=True)
    assert int(out.event["match"]) == FlowMatch.RULE
