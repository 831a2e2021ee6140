"""The per-packet ClusterIP path's edges, through BPF_PROG_TEST_RUN: ICMP errors about a
translated flow are rewritten as the pod saw the flow (quote and outer header, every
checksum right, so its socket finds the error), a new connection on a tuple whose
conntrack entry ended picks its backend afresh (as Cilium), and a pod never gets itself
as the backend (hairpin: another backend, or a drop when it is the only one)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from endpoint_harness import EP_IP, EP_IP6, Outcome
from packets import ether, packet
from scapy.layers.inet import ICMP, IP, TCP
from scapy.layers.inet6 import ICMPv6DestUnreach, ICMPv6PacketTooBig, IPv6
from scapy.layers.l2 import Ether
from test_endpoint_service_nat import (
    BACKENDS4,
    BACKENDS6,
    NODE,
    VIP4,
    VIP6,
    Bed,
    service,
    tuple_of,
)
from test_endpoint_service_nat import bed as shared_bed

from membrane.abi import DropReason
from membrane.service.model import Endpoint, EndpointPort, EndpointSliceRecord
from membrane.service.plan import plan

pytestmark = pytest.mark.root

bed = shared_bed  # the fixture, under the name the tests ask for
ROUTER4, ROUTER6 = "198.19.0.1", "2001:db8::ff"


def error_about(sent: Ether, src: str, dst: str, kind: str) -> Ether:
    """An ICMP error from `src` to `dst` quoting the IP packet of `sent` whole."""
    quoted = bytes(sent[IP] if IP in sent else sent[IPv6])
    if IP in sent:
        icmp = ICMP(type=3, code=3 if kind == "unreach" else 4, nexthopmtu=1280)
        return ether() / IP(src=src, dst=dst) / icmp / quoted
    icmp6 = ICMPv6DestUnreach(code=4) if kind == "unreach" else ICMPv6PacketTooBig(mtu=1280)
    return ether() / IPv6(src=src, dst=dst) / icmp6 / quoted


def rebuilt_same(layer: Any, *fields: str) -> bool:
    """The packet's checksums as written equal what scapy computes afresh."""
    fresh = layer.__class__(bytes(layer))
    for f in fields:
        for sub in fresh.iterpayloads():
            if f in sub.fields:
                del sub.fields[f]
    again = layer.__class__(bytes(fresh))
    return bytes(again) == bytes(layer)


def quote_of(frame: Ether) -> Any:
    """The quoted IP packet of an ICMP error, parsed."""
    if IP in frame:
        return IP(bytes(frame[ICMP].payload))
    return IPv6(bytes(frame[IPv6].payload.payload))


def checksums_valid(frame: Ether) -> bool:
    outer = frame[IP] if IP in frame else frame[IPv6]
    if not rebuilt_same(outer, "chksum", "cksum"):
        return False
    quote = quote_of(frame)
    # the quoted transport checksum covers the whole datagram, which is quoted whole here
    return rebuilt_same(quote, "chksum")


@dataclass(frozen=True)
class Case:
    """A client pod's flow to a ClusterIP frontend (`port`) whose backends serve `target`."""

    vip: str
    client: str
    backends: tuple[str, ...]
    proto: str
    port: int
    target: int

    def __str__(self) -> str:
        return f"{self.proto}{6 if ':' in self.vip else 4}"


CASES = [
    Case(VIP4, EP_IP, BACKENDS4, "udp", 53, 5353),
    Case(VIP6, EP_IP6, BACKENDS6, "udp", 53, 5353),
    Case(VIP4, EP_IP, BACKENDS4, "tcp", 80, 8080),
    Case(VIP6, EP_IP6, BACKENDS6, "tcp", 80, 8080),
]


def sent_to_frontend(bed: Bed, case: Case, sport: int) -> Ether:
    """The client's first packet of the flow as its endpoint program sends it on
    (translated to a backend)."""
    bed.services(case.backends)
    frame = packet(case.vip, case.proto, src=case.client, sport=sport, dport=case.port)
    return Ether(bed.dp.egress(frame).data)


def passed_error(out: Outcome) -> tuple[Ether, Any, Any]:
    """An ICMP error the program let pass: the frame, its outer IP header and its quote."""
    assert out.verdict == "pass"
    got = Ether(out.data)
    return got, got[IP] if IP in got else got[IPv6], quote_of(got)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_a_backends_port_unreachable_comes_from_the_frontend(bed: Bed, case: Case) -> None:
    sent = sent_to_frontend(bed, case, 40000)
    backend = tuple_of(sent)[1]
    got, outer, quote = passed_error(
        bed.dp.ingress(error_about(sent, backend, case.client, "unreach"))
    )
    assert (outer.src, outer.dst) == (case.vip, case.client)
    assert (quote.src, quote.dst, quote.payload.sport, quote.payload.dport) == (
        case.client, case.vip, 40000, case.port)  # fmt: skip
    assert checksums_valid(got)


@pytest.mark.parametrize("case", CASES[2:], ids=str)
def test_a_routers_too_big_keeps_its_source_and_names_the_frontend(bed: Bed, case: Case) -> None:
    sent = sent_to_frontend(bed, case, 40001)
    router = ROUTER4 if IP in sent else ROUTER6
    got, outer, quote = passed_error(
        bed.dp.ingress(error_about(sent, router, case.client, "too-big"))
    )
    assert outer.src == router and (quote.dst, quote.payload.dport) == (case.vip, case.port)
    assert checksums_valid(got)


@pytest.mark.parametrize("case", CASES[:2], ids=str)
def test_the_pods_error_about_a_reply_goes_to_the_backend(bed: Bed, case: Case) -> None:
    sent = sent_to_frontend(bed, case, 40002)
    backend = tuple_of(sent)[1]
    answer = packet(case.client, case.proto, src=backend, sport=case.target, dport=40002)
    reply = Ether(bed.dp.ingress(answer).data)
    assert tuple_of(reply) == (case.vip, case.client, case.port, 40002)
    got, outer, quote = passed_error(
        bed.dp.egress(error_about(reply, case.client, case.vip, "unreach"))
    )
    assert (outer.src, outer.dst) == (case.client, backend)
    assert (quote.src, quote.payload.sport) == (backend, case.target)
    assert checksums_valid(got)


def maglev_sport_picking(bed: Bed, wanted: str, proto: str, port: int) -> int:
    """A source port whose fresh flow Maglev sends to `wanted` (the hash has the tuple)."""
    for sport in range(44000, 44200):
        frame = packet(VIP4, proto, src=EP_IP, sport=sport, dport=port)
        if tuple_of(Ether(bed.dp.egress(frame).data))[1] == wanted:
            return sport
    raise AssertionError(f"no port picks {wanted}")


@pytest.mark.parametrize("proto", ["udp", "tcp"])
def test_a_new_connection_on_an_ended_tuple_picks_afresh(bed: Bed, proto: str) -> None:
    bed.services(BACKENDS4, "maglev")
    port = 53 if proto == "udp" else 80
    sport = maglev_sport_picking(bed, BACKENDS4[1], proto, port)
    bed.dp.objects[next(iter(bed.dp.objects))].map("svc_nat").clear()
    bed.dp.maps.ct.clear()
    bed.services(BACKENDS4[:1], "maglev")  # the tuple's flow goes to backend 0 ...
    frame = packet(VIP4, proto, src=EP_IP, sport=sport, dport=port)
    assert tuple_of(Ether(bed.dp.egress(frame).data))[1] == BACKENDS4[0]
    bed.services(BACKENDS4, "maglev")  # ... which stays while its connection lives
    assert tuple_of(Ether(bed.dp.egress(frame).data))[1] == BACKENDS4[0]
    if proto == "tcp":
        established = packet(VIP4, proto, src=EP_IP, sport=sport, dport=port)
        established[TCP].flags = "A"
        assert tuple_of(Ether(bed.dp.egress(established).data))[1] == BACKENDS4[0]
    bed.dp.maps.ct.clear()  # the connection ended (expired or evicted)
    assert tuple_of(Ether(bed.dp.egress(frame).data))[1] == BACKENDS4[1]


def test_a_pod_is_never_its_own_backend(bed: Bed) -> None:
    bed.services((EP_IP, BACKENDS4[0]))
    for sport in range(45000, 45030):
        frame = packet(VIP4, "udp", src=EP_IP, sport=sport, dport=53)
        assert tuple_of(Ether(bed.dp.egress(frame).data))[1] == BACKENDS4[0]
    bed.services((EP_IP,))
    out = bed.dp.egress(packet(VIP4, "tcp", src=EP_IP, sport=45100, dport=80))
    assert out.verdict == "drop" and out.reason == DropReason.SERVICE_BACKEND_NOT_FOUND


def test_a_heavier_weighted_pod_still_gets_another_backend(bed: Bed) -> None:
    """A weighted backend's slots are consecutive: the walk to another backend strides
    over the set rather than stepping into the pod's own run."""
    ports = (EndpointPort("http", 8080, "TCP"), EndpointPort("dns", 5353, "UDP"))
    slices = [
        EndpointSliceRecord("shop", "web-self", "web", ports, (Endpoint((EP_IP,), "active", 30),)),
        EndpointSliceRecord(
            "shop", "web-other", "web", ports, (Endpoint((BACKENDS4[0],), "active", 1),)
        ),
    ]
    bed.ids = bed.lb.maps.apply(plan([service()], slices, NODE), bed.ids)
    for sport in range(46000, 46040):
        frame = packet(VIP4, "udp", src=EP_IP, sport=sport, dport=53)
        assert tuple_of(Ether(bed.dp.egress(frame).data))[1] == BACKENDS4[0]
