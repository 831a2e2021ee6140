"""IPv4 fragments in endpoint.bpf.o: a first fragment that passed records its L4 key, later
fragments take it from there, so a later fragment gets exactly its first fragment's
conntrack and policy treatment and can never slip past a port rule. Records live in maps
of each endpoint and direction, written only after the verdict: a denied first fragment
changes nothing, and a flood of first fragments evicts only records of the endpoint and
direction it is aimed at."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from endpoint_harness import EP_ID, EP_IP, EndpointDatapath, allow, assert_dropped, assert_passed
from packets import ether, first_fragment, later_fragment
from scapy.layers.inet import ICMP, IP
from scapy.packet import Raw

from membrane.bpf import test_run
from membrane.datapath import Direction, DropReason
from membrane.datapath.abi import PROG_TO_CONTAINER

pytestmark = pytest.mark.root

PEER = "198.18.0.20"
PEER_ID = 1001
FRAG_ID = 4242  # the IP id packets.py gives every fragment
EGRESS, INGRESS = Direction.EGRESS, Direction.INGRESS
OTHER_EP, OTHER_EP_IP = 8, "198.18.0.11"
FLOOD = 20_000  # first fragments: more than any fragment map ever held (8,192 shared before)
IP_ID_OFFSET = 14 + 4  # Ethernet header, then the IPv4 header's identification field


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
                allow(INGRESS, PEER_ID, proto=17, port=443),
            ],
            ingress=True,
            egress=True,
        )
        yield datapath


def recorded(dp: EndpointDatapath, ep_id: int = EP_ID) -> dict[tuple, tuple[int, int]]:
    """The endpoint's fragment records, both directions: (direction, saddr, daddr, id,
    proto) -> (sport, dport), in readable form."""

    def address(raw: int) -> str:
        return socket.inet_ntoa(int(raw).to_bytes(4, "little"))

    return {
        (d, address(k.saddr), address(k.daddr), socket.ntohs(k.id), int(k.proto)): (
            int(v.sport),
            int(v.dport),
        )
        for d in (EGRESS, INGRESS)
        for k, v in dp.frags(d, ep_id).lookup_batch()
    }


def flood_first_fragments(dp: EndpointDatapath, ep_id: int, src: str, dst: str) -> int:
    """FLOOD allowed first fragments from `src` into endpoint `ep_id`, each of another
    datagram (IP ids 0, 1, ...; ports stay, so only the first is a new flow). Straight
    through test-run: the harness's per-run bookkeeping would take minutes. Returns how
    many passed."""
    frame = bytearray(bytes(first_fragment(dst, "udp", src=src, sport=5353, dport=443)))
    prog = dp.objects[ep_id].program(PROG_TO_CONTAINER)
    passed = 0
    for ip_id in range(FLOOD):
        frame[IP_ID_OFFSET : IP_ID_OFFSET + 2] = (ip_id % 65536).to_bytes(2, "big")
        passed += test_run(prog, bytes(frame)).retval == 0  # TC_ACT_OK
    dp.ring.drain()
    return passed


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_first_fragment_records_its_ports(dp: EndpointDatapath, proto: str) -> None:
    out = dp.egress(first_fragment(PEER, proto, src=EP_IP, sport=40000, dport=443))
    assert_passed(out, new_flow=True)
    number = 6 if proto == "tcp" else 17
    assert recorded(dp) == {(EGRESS, EP_IP, PEER, FRAG_ID, number): (40000, 443)}


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


def test_a_denied_first_fragment_records_nothing(dp: EndpointDatapath) -> None:
    # The later fragment's payload starts with bytes that read as ports 53 -> 443.
    first = dp.egress(first_fragment(PEER, "tcp", src=EP_IP, sport=40000, dport=80))
    assert_dropped(first, DropReason.POLICY_DENIED, EGRESS)
    assert recorded(dp) == {}
    later = dp.egress(later_fragment(PEER, "tcp", src=EP_IP))
    assert_dropped(later, DropReason.FRAG_NOT_FOUND, EGRESS)
    assert dp.ct() == []


@pytest.mark.parametrize("direction", [EGRESS, INGRESS])
def test_a_denied_first_fragment_does_not_overwrite_an_allowed_record(
    dp: EndpointDatapath, direction: Direction
) -> None:
    """A second offset-0 fragment with the same IP id, to a denied port: before, it took
    the record over and the allowed datagram's later fragments were dropped with it."""
    src, dst = (EP_IP, PEER) if direction == EGRESS else (PEER, EP_IP)
    run = dp.egress if direction == EGRESS else dp.ingress
    assert_passed(run(first_fragment(dst, "udp", src=src, dport=443)), new_flow=True)
    denied = run(first_fragment(dst, "udp", src=src, dport=22))
    assert_dropped(denied, DropReason.POLICY_DENIED, direction)
    assert list(recorded(dp).values()) == [(40000, 443)]
    assert_passed(run(later_fragment(dst, "udp", src=src)), new_flow=False)
    (e,) = dp.ct()
    assert (e.dport, e.packets_orig) == (443, 2)


def test_a_flood_into_one_endpoint_leaves_other_endpoints_records(dp: EndpointDatapath) -> None:
    """One source floods endpoint 8 with allowed first fragments; a datagram to endpoint 7
    whose first fragment came before the flood still gets its later fragment through."""
    dp.add_endpoint(OTHER_EP, OTHER_EP_IP)
    dp.set_policy(ep_id=OTHER_EP, identity=2000)  # no policy: every first fragment passes
    assert_passed(dp.ingress(first_fragment(EP_IP, "tcp", src=PEER, sport=50000)), new_flow=True)
    assert flood_first_fragments(dp, OTHER_EP, PEER, OTHER_EP_IP) == FLOOD
    assert len(recorded(dp, OTHER_EP)) > 0  # the flood did fill the other endpoint's map
    assert_passed(dp.ingress(later_fragment(EP_IP, "tcp", src=PEER)), new_flow=False)


def test_a_flood_into_one_direction_leaves_the_other_directions_records(
    dp: EndpointDatapath,
) -> None:
    """An endpoint that lets a source flood its ingress still gets its own fragmented
    datagrams out."""
    assert_passed(dp.egress(first_fragment(PEER, "udp", src=EP_IP)), new_flow=True)
    assert flood_first_fragments(dp, EP_ID, PEER, EP_IP) == FLOOD
    assert_passed(dp.egress(later_fragment(PEER, "udp", src=EP_IP)), new_flow=False)


def test_fragments_to_the_pod(dp: EndpointDatapath) -> None:
    first = first_fragment(EP_IP, "tcp", src=PEER, sport=50000, dport=443)
    assert_passed(dp.ingress(first), new_flow=True)
    assert_passed(dp.ingress(later_fragment(EP_IP, "tcp", src=PEER)), new_flow=False)
    denied = first_fragment(EP_IP, "tcp", src=PEER, sport=50000, dport=22)
    denied[IP].id = 7
    assert_dropped(dp.ingress(denied), DropReason.POLICY_DENIED, INGRESS)
    later = later_fragment(EP_IP, "tcp", src=PEER)
    later[IP].id = 7
    assert_dropped(dp.ingress(later), DropReason.FRAG_NOT_FOUND, INGRESS)


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
