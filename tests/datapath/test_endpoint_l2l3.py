"""What endpoint.bpf.o accepts below the policy: pods speak IPv4 and ARP from their own
address only; IPv6, VLAN tags and other EtherTypes are dropped in both directions, and so
are headers cut short."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from endpoint_harness import EP_IP, EndpointDatapath, assert_dropped, assert_passed
from packets import VLANS, arp, ether, ipv6_headers, packet, tcp_segment
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from membrane.datapath import Direction, DropReason

pytestmark = pytest.mark.root

PEER = "198.18.0.20"
EGRESS, INGRESS = Direction.EGRESS, Direction.INGRESS
BOTH = [pytest.param("egress", id="egress"), pytest.param("ingress", id="ingress")]


@pytest.fixture
def dp() -> Iterator[EndpointDatapath]:
    with EndpointDatapath.temporary() as datapath:
        yield datapath


def run(dp: EndpointDatapath, direction: str, frame: object):
    return dp.egress(frame) if direction == "egress" else dp.ingress(frame)


def test_own_source_address_passes(dp: EndpointDatapath) -> None:
    assert_passed(dp.egress(tcp_segment(EP_IP, PEER)), new_flow=True)


def test_spoofed_source_address_is_dropped(dp: EndpointDatapath) -> None:
    out = dp.egress(tcp_segment("198.18.0.99", PEER))
    assert_dropped(out, DropReason.INVALID_SOURCE_IP, EGRESS)
    assert dp.ct() == []


def test_any_source_address_may_reach_the_pod(dp: EndpointDatapath) -> None:
    assert_passed(dp.ingress(tcp_segment("198.19.1.1", EP_IP)), new_flow=True)


def test_arp_from_the_pod_must_speak_for_its_own_address(dp: EndpointDatapath) -> None:
    assert_passed(dp.egress(arp(psrc=EP_IP, pdst=PEER)), new_flow=False)
    out = dp.egress(arp(psrc="198.18.0.99", pdst=PEER))
    assert_dropped(out, DropReason.INVALID_SOURCE_IP, EGRESS)
    ev = out.event
    assert (ev["saddr"].tobytes()[:4], ev["daddr"].tobytes()[:4]) == (
        bytes([198, 18, 0, 99]),
        bytes([198, 18, 0, 20]),
    )


def test_arp_to_the_pod_passes(dp: EndpointDatapath) -> None:
    assert_passed(dp.ingress(arp(psrc=PEER, pdst=EP_IP)), new_flow=False)
    assert_passed(dp.ingress(arp(psrc="198.19.0.1", pdst="198.19.0.2")), new_flow=False)


def test_arp_cut_short_is_invalid(dp: EndpointDatapath) -> None:
    frame = bytes(arp(psrc=EP_IP))[:30]
    assert_dropped(dp.egress(frame), DropReason.INVALID_PACKET, EGRESS)


def test_arp_passes_without_endpoint_state(dp: EndpointDatapath) -> None:
    dp.writer.remove_endpoint(7)
    assert_passed(dp.egress(arp(psrc=EP_IP)), new_flow=False)


@pytest.mark.parametrize("direction", BOTH)
def test_ipv6_is_dropped_by_an_ipv4_only_endpoint(dp: EndpointDatapath, direction: str) -> None:
    dp.add_endpoint(9, "198.18.0.9")
    frame = ether() / ipv6_headers("2001:db8::2", 6, src="2001:db8::9") / TCP(dport=80)
    out = dp.egress(frame, ep_id=9) if direction == "egress" else dp.ingress(frame, ep_id=9)
    reason = DropReason.UNSUPPORTED_L3_PROTOCOL
    assert_dropped(out, reason, int(Direction[direction.upper()]), ep_id=9)


@pytest.mark.parametrize("direction", BOTH)
@pytest.mark.parametrize("tags", [VLANS["802.1q"], VLANS["qinq"]], ids=["802.1q", "qinq"])
def test_vlan_tagged_frames_are_dropped(dp: EndpointDatapath, direction: str, tags) -> None:
    frame = packet(PEER if direction == "egress" else EP_IP, src=EP_IP, vlans=tags)
    out = run(dp, direction, frame)
    assert_dropped(out, DropReason.UNSUPPORTED_L3_PROTOCOL, int(Direction[direction.upper()]))


def test_other_ethertypes_are_dropped(dp: EndpointDatapath) -> None:
    lldp = Ether(dst="01:80:c2:00:00:0e", type=0x88CC) / Raw(b"\x00" * 32)
    assert_dropped(dp.ingress(lldp), DropReason.UNSUPPORTED_L3_PROTOCOL, INGRESS)


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        pytest.param(
            bytes(ether() / IP(src=EP_IP, dst=PEER, ihl=15, proto=6)),
            DropReason.INVALID_PACKET,
            id="ipv4-options-cut",
        ),
        pytest.param(
            bytes(ether() / IP(src=EP_IP, dst=PEER, ihl=4, proto=6)),
            DropReason.INVALID_PACKET,
            id="ihl-too-small",
        ),
        pytest.param(
            bytes(
                ether() / IP(src=EP_IP, dst=PEER, proto=6) / Raw(b"\x9c\x40\x00\x50" + b"\0" * 8)
            ),
            DropReason.CT_TRUNCATED_OR_INVALID_HEADER,
            id="tcp-cut",
        ),
        pytest.param(
            bytes(ether() / IP(src=EP_IP, dst=PEER) / TCP(dport=80, dataofs=4)),
            DropReason.CT_TRUNCATED_OR_INVALID_HEADER,
            id="tcp-data-offset-too-small",
        ),
        pytest.param(
            bytes(ether() / IP(src=EP_IP, dst=PEER, proto=17) / Raw(b"\x00\x35\x00")),
            DropReason.CT_TRUNCATED_OR_INVALID_HEADER,
            id="udp-cut",
        ),
        pytest.param(
            bytes(ether() / IP(src=EP_IP, dst=PEER, proto=1) / Raw(b"\x08\x00\x00\x00")),
            DropReason.CT_TRUNCATED_OR_INVALID_HEADER,
            id="icmp-cut",
        ),
    ],
)
def test_headers_cut_short(dp: EndpointDatapath, frame: bytes, reason: DropReason) -> None:
    assert_dropped(dp.egress(frame), reason, EGRESS)
