"""The endpoint programs' per-packet ClusterIP translation (bpf/lib/service_nat.h), through
BPF_PROG_TEST_RUN: a pod's packet to a frontend that no socket LB hook translated goes to a
backend with both checksums right, later packets of the flow to the same backend, replies
come back from the frontend, policy judges the backend, and a frontend without backends
drops. Services are written by the agent's own code (plan -> ServiceMaps) into the service
maps the endpoint object shares."""

from __future__ import annotations

from collections.abc import Iterator
from ipaddress import IPv4Network, IPv6Network

import pytest
from endpoint_harness import EP_ID, EP_IP, EP_IP6, EndpointDatapath, allow
from packets import checksums_valid, ip_of, packet
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from membrane.abi import CtFlag, Direction, DropReason, FlowEventType
from membrane.datapath.service_nat import service_nat_config
from membrane.service.maps import ServiceIds
from membrane.service.model import Endpoint, EndpointPort, EndpointSliceRecord, ServicePort
from membrane.service.model import ServiceRecord as Svc
from membrane.service.plan import NodeView, plan
from membrane.service.socklb import SocketLb

pytestmark = pytest.mark.root

CIDRS = (IPv4Network("198.19.128.0/17"), IPv6Network("2001:db8:f::/112"))
VIP4, VIP6 = "198.19.128.10", "2001:db8:f::10"
BACKENDS4 = ("198.18.0.20", "198.18.0.21")
BACKENDS6 = ("2001:db8:1::20", "2001:db8:1::21")
NODE = NodeView((), {4: ("198.19.0.1",), 6: ("2001:db8::ff",)}, 251)
BACKEND_ID = 2000


def service(algorithm: str = "random") -> Svc:
    return Svc(
        "shop", "web",
        (ServicePort("http", 80, "TCP", 8080), ServicePort("dns", 53, "UDP", 5353)),
        (VIP4, VIP6), algorithm=algorithm,
    )  # fmt: skip


def endpoints(addresses: tuple[str, ...]) -> list[EndpointSliceRecord]:
    ports = (EndpointPort("http", 8080, "TCP"), EndpointPort("dns", 5353, "UDP"))
    return [
        EndpointSliceRecord("shop", f"web-{i}", "web", ports, (Endpoint((ip,), "active", 1),))
        for i, ip in enumerate(addresses)
    ]


class Bed:
    def __init__(self, dp: EndpointDatapath, lb: SocketLb) -> None:
        self.dp, self.lb = dp, lb
        self.ids = ServiceIds.from_json(None)

    def services(self, backends: tuple[str, ...], algorithm: str = "random") -> None:
        self.ids = self.lb.maps.apply(
            plan([service(algorithm)], endpoints(backends), NODE), self.ids
        )


@pytest.fixture
def bed() -> Iterator[Bed]:
    with EndpointDatapath.temporary(**service_nat_config(CIDRS)) as dp:  # type: ignore[arg-type]
        lb = SocketLb.start(dp.pin_dir, "", (4, 6))  # the service maps only: no hooks
        try:
            dp.set_ipcache({f"{ip}/{32 if '.' in ip else 128}": BACKEND_ID
                            for ip in BACKENDS4 + BACKENDS6})  # fmt: skip
            yield Bed(dp, lb)
        finally:
            lb.close()


def tuple_of(frame: Ether) -> tuple[str, str, int, int]:
    ip = ip_of(frame)
    return ip.src, ip.dst, ip.payload.sport, ip.payload.dport


@pytest.mark.parametrize(
    ("vip", "client", "backends", "proto", "port", "target"),
    [
        (VIP4, EP_IP, BACKENDS4, "tcp", 80, 8080),
        (VIP4, EP_IP, BACKENDS4, "udp", 53, 5353),
        (VIP6, EP_IP6, BACKENDS6, "tcp", 80, 8080),
        (VIP6, EP_IP6, BACKENDS6, "udp", 53, 5353),
    ],
)
def test_translation_and_reverse_translation(
    bed: Bed, vip: str, client: str, backends: tuple[str, ...], proto: str, port: int, target: int
) -> None:
    bed.services(backends)
    out = bed.dp.egress(packet(vip, proto, src=client, sport=40000, dport=port))
    assert out.verdict == "pass"
    sent = Ether(out.data)
    src, backend, sport, dport = tuple_of(sent)
    assert (src, sport, dport) == (client, 40000, target) and backend in backends
    assert checksums_valid(ip_of(sent))
    # the flow's verdict names the backend (policy judged the translated packet)
    verdicts = [e for e in out.events if int(e["h"]["type"]) == FlowEventType.POLICY_VERDICT]
    assert verdicts and int(verdicts[0]["dport"]) == target
    for _ in range(5):  # every later packet of the flow: the same backend
        again = bed.dp.egress(packet(vip, proto, src=client, sport=40000, dport=port))
        assert tuple_of(Ether(again.data))[1] == backend
    answer = packet(client, proto, src=backend, sport=target, dport=40000)
    if proto == "tcp":
        answer[TCP].flags = "SA"  # a SYN alone is never a reply
    reply = bed.dp.ingress(answer)
    assert reply.verdict == "pass"
    back = Ether(reply.data)
    assert tuple_of(back) == (vip, client, port, 40000)
    assert checksums_valid(ip_of(back))
    ct = bed.dp.maps.ct6 if ":" in vip else bed.dp.maps.ct
    flags = [int(v.flags) for k, v in ct.items() if k.dport == target]
    assert flags and all(f & CtFlag.SERVICE for f in flags)


def test_a_udp_datagram_without_checksum_keeps_none(bed: Bed) -> None:
    bed.services(BACKENDS4)
    frame = packet(VIP4, "udp", src=EP_IP, dport=53)
    frame[UDP].chksum = 0
    out = Ether(bed.dp.egress(frame).data)
    assert (
        out[IP].dst in BACKENDS4
        and out[UDP].chksum == 0
        and checksums_valid(ip_of(out)) is not None
    )
    fresh = IP(bytes(out[IP]))
    del fresh.chksum
    assert IP(bytes(fresh)).chksum == out[IP].chksum


def test_connections_spread_over_the_backends(bed: Bed) -> None:
    bed.services(BACKENDS4)
    chosen = {
        tuple_of(Ether(bed.dp.egress(packet(VIP4, "tcp", src=EP_IP, sport=p, dport=80)).data))[1]
        for p in range(41000, 41040)
    }
    assert chosen == set(BACKENDS4)


def test_maglev_picks_by_the_tuple(bed: Bed) -> None:
    bed.services(BACKENDS4, "maglev")

    def picks() -> list[str]:
        frames = (packet(VIP4, "tcp", src=EP_IP, sport=p, dport=80) for p in range(42000, 42030))
        return [tuple_of(Ether(bed.dp.egress(f).data))[1] for f in frames]

    first = picks()
    assert set(first) == set(BACKENDS4)
    bed.dp.objects[EP_ID].map("svc_nat").clear()  # forget the flows: they are picked again
    bed.dp.maps.ct.clear()
    assert picks() == first  # by the table, not at random


def test_policy_judges_the_backend(bed: Bed) -> None:
    bed.services(BACKENDS4[:1])
    bed.dp.set_policy([], egress=True)  # default deny: the backend is not allowed
    out = bed.dp.egress(packet(VIP4, "tcp", src=EP_IP, dport=80))
    assert out.verdict == "drop" and out.reason == DropReason.POLICY_DENIED
    assert (int(out.event["dport"]), int(out.event["peer_identity"])) == (8080, BACKEND_ID)
    bed.dp.set_policy([allow(Direction.EGRESS, BACKEND_ID, port=8080)], egress=True)
    assert bed.dp.egress(packet(VIP4, "tcp", src=EP_IP, sport=40001, dport=80)).verdict == "pass"


def test_a_frontend_without_backends_drops(bed: Bed) -> None:
    bed.services(())
    out = bed.dp.egress(packet(VIP4, "tcp", src=EP_IP, dport=80))
    assert out.verdict == "drop" and out.reason == DropReason.SERVICE_BACKEND_NOT_FOUND


def test_other_packets_are_left_alone(bed: Bed) -> None:
    bed.services(BACKENDS4)
    for dst, port in (("198.19.128.99", 80), (VIP4, 81), ("198.18.0.30", 80)):
        frame = packet(dst, "tcp", src=EP_IP, dport=port)
        out = bed.dp.egress(frame)
        assert out.verdict == "pass" and out.data == bytes(frame)


def test_a_removed_backend_makes_the_flow_pick_anew(bed: Bed) -> None:
    bed.services(BACKENDS4[:1])
    frame = packet(VIP4, "udp", src=EP_IP, sport=43000, dport=53)
    assert tuple_of(Ether(bed.dp.egress(frame).data))[1] == BACKENDS4[0]
    bed.services(BACKENDS4[1:])
    assert tuple_of(Ether(bed.dp.egress(frame).data))[1] == BACKENDS4[1]


def test_a_program_loaded_without_service_cidrs_translates_nothing() -> None:
    with EndpointDatapath.temporary() as dp:
        lb = SocketLb.start(dp.pin_dir, "", (4,))
        try:
            Bed(dp, lb).services(BACKENDS4)
            frame = packet(VIP4, "tcp", src=EP_IP, dport=80)
            assert dp.egress(frame).data == bytes(frame)
        finally:
            lb.close()
