"""IPv4 fragments in endpoint.bpf.o: the first fragment records its L4 key, later fragments
take it from there, so a later fragment gets exactly its first fragment's conntrack and
policy treatment and can never slip past a port rule."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from endpoint_harness import EP_IP, EndpointDatapath, allow, assert_dropped, assert_passed
from packets import ether, first_fragment, later_fragment
from scapy.layers.inet import ICMP, IP
from scapy.packet import Raw

from membrane.datapath import Direction, DropReason

pytestmark = pytest.mark.root

PEER = "198.18.0.20"
PEER_ID = 1001
FRAG_ID = 4242  # the IP id packets.py gives every fragment
EGRESS, INGRESS = Direction.EGRESS, Direction.INGRESS


@pytest.fixture
def dp() -> Iterator[EndpointDatapath]:
    with EndpointDatapath.temporary() as datapath:
        datapath.set_ipcache({f"{PEER}/32": PEER_ID})
        datapath.set_policy(
            [
                allow(EGRESS, PEER_ID, port=443),
                allow(EGRESS, PEER_ID, proto=17, port=443),
                allow(EGRESS, PEER_ID, proto=1, port=8),
                allow(EGRESS, PEER_ID, proto=47, port_bits=0),
                allow(INGRESS, PEER_ID, port=443),
            ],
            ingress=True,
            egress=True,
        )
        yield datapath


def recorded(dp: EndpointDatapath) -> dict[tuple, tuple[int, int]]:
    """frags: (saddr, daddr, id, proto) -> (sport, dport), in readable form."""

    def address(raw: int) -> str:
        return socket.inet_ntoa(int(raw).to_bytes(4, "little"))

    return {
        (address(k.saddr), address(k.daddr), socket.ntohs(k.id), int(k.proto)): (
            int(v.sport),
            int(v.dport),
        )
        for k, v in dp.maps.frags.lookup_batch()
    }


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_first_fragment_records_its_ports(dp: EndpointDatapath, proto: str) -> None:
    out = dp.egress(first_fragment(PEER, proto, src=EP_IP, sport=40000, dport=443))
    assert_passed(out, new_flow=True)
    number = 6 if proto == "tcp" else 17
    assert recorded(dp) == {(EP_IP, PEER, FRAG_ID, number): (40000, 443)}


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_later_fragment_uses_the_first_ones_ports(dp: EndpointDatapath, proto: str) -> None:
    dp.egress(first_fragment(PEER, proto, src=EP_IP, sport=40000, dport=443))
    assert_passed(dp.egress(later_fragment(PEER, proto, src=EP_IP)), new_flow=False)
    (e,) = dp.ct()
    assert (e.sport, e.dport, e.packets_orig) == (40000, 443, 2)


def test_later_fragment_without_its_first_is_dropped(dp: EndpointDatapath) -> None:
    out = dp.egress(later_fragment(PEER, "tcp", src=EP_IP))
    assert_dropped(out, DropReason.FRAG_NOT_FOUND, EGRESS)
    assert (int(out.event["sport"]), int(out.event["dport"])) == (0, 0)


def test_later_fragment_of_a_denied_flow_is_dropped(dp: EndpointDatapath) -> None:
    # The later fragment's payload starts with bytes that read as ports 53 -> 443.
    first = dp.egress(first_fragment(PEER, "tcp", src=EP_IP, sport=40000, dport=80))
    assert_dropped(first, DropReason.POLICY_DENIED, EGRESS)
    later = dp.egress(later_fragment(PEER, "tcp", src=EP_IP))
    assert_dropped(later, DropReason.POLICY_DENIED, EGRESS)
    assert (int(later.event["sport"]), int(later.event["dport"])) == (40000, 80)


def test_fragments_to_the_pod(dp: EndpointDatapath) -> None:
    first = first_fragment(EP_IP, "tcp", src=PEER, sport=50000, dport=443)
    assert_passed(dp.ingress(first), new_flow=True)
    assert_passed(dp.ingress(later_fragment(EP_IP, "tcp", src=PEER)), new_flow=False)
    denied = first_fragment(EP_IP, "tcp", src=PEER, sport=50000, dport=22)
    denied[IP].id = 7
    assert_dropped(dp.ingress(denied), DropReason.POLICY_DENIED, INGRESS)
    later = later_fragment(EP_IP, "tcp", src=PEER)
    later[IP].id = 7
    assert_dropped(dp.ingress(later), DropReason.POLICY_DENIED, INGRESS)


def test_icmp_echo_fragments(dp: EndpointDatapath) -> None:
    big_ping = ether() / IP(src=EP_IP, dst=PEER, flags=1, id=99) / ICMP(type=8, id=31)
    assert_passed(dp.egress(big_ping / Raw(b"p" * 16)), new_flow=True)
    rest = ether() / IP(src=EP_IP, dst=PEER, proto=1, frag=3, id=99) / Raw(b"p" * 16)
    assert_passed(dp.egress(rest), new_flow=False)
    (e,) = dp.ct()
    assert (e.proto, e.sport, e.dport, e.packets_orig) == (1, 0, 31, 2)


def test_fragments_of_portless_protocols_need_no_record(dp: EndpointDatapath) -> None:
    assert_passed(dp.egress(later_fragment(PEER, "gre", src=EP_IP)), new_flow=True)
    assert recorded(dp) == {}
