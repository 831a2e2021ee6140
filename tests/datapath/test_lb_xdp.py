"""The `membrane lb` XDP program through BPF_PROG_TEST_RUN: encapsulation headers, the
backend the kernel picks against the Python Maglev/jhash reference, conntrack stickiness
across table changes, packets that are not for a VIP, and the counters.

The program asks the kernel's FIB for the next hop, so runs happen inside a namespace the
module creates (membrane.testing.lb): one veth (forwarding on) whose subnet holds the
backends, with permanent neighbour entries giving each backend a known MAC.
"""

from __future__ import annotations

import ipaddress
import random
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6PacketTooBig, IPv6
from scapy.layers.l2 import ARP, Ether

from membrane.abi import LbStat
from membrane.bpf import BpfObject
from membrane.lb.flowhash import flow_hash
from membrane.lb.frontend import Vip
from membrane.lb.maglev import build_table
from membrane.lb.tables import LbTables
from membrane.netns import Topology
from membrane.testing.lb import LB_MAC, LbTestbed, backend_mac, lb_testbed

pytestmark = pytest.mark.root

XDP_DROP, XDP_PASS, XDP_TX = 1, 2, 3
LB4, LB6 = ipaddress.ip_address("198.18.250.1"), ipaddress.ip_address("2001:db8:250::1")
VIP4 = Vip.parse("198.19.0.10:80/tcp")
VIP6 = Vip.parse("[2001:db8:ffff::10]:443/tcp")
VIP_EMPTY = Vip.parse("198.19.0.11:80/udp")
BACKENDS4 = [f"198.18.250.{i}" for i in range(10, 14)]
BACKENDS6 = [f"2001:db8:250::{i:x}" for i in range(10, 13)]
UNRESOLVED4 = "198.18.250.99"  # in the subnet, no neighbour entry
CLIENT_MAC = "02:00:00:00:01:01"


def internet_checksum(data: bytes) -> int:
    """RFC 1071 over `data`: 0 when `data` includes a correct checksum."""
    data += b"\0" * (len(data) % 2)
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


@dataclass
class Lb:
    bed: LbTestbed
    obj: BpfObject
    tables: LbTables

    def run(self, frame: bytes) -> tuple[int, bytes]:
        result = self.bed.run(self.obj.program("lb_xdp"), frame)
        return result.retval, result.data

    def stat(self, stat: LbStat) -> tuple[int, int]:
        per_cpu = self.tables.stats.lookup(int(stat))
        return sum(c.packets for c in per_cpu), sum(c.bytes for c in per_cpu)

    def backend_counter(self, backend_id: int) -> tuple[int, int]:
        per_cpu = self.tables.backend_stats.lookup(backend_id)
        return sum(c.packets for c in per_cpu), sum(c.bytes for c in per_cpu)

    def backend_id(self, vip: Vip, addr: str) -> int:
        svc = self.tables.service(vip)
        return next(b.id for b in svc.backends if str(b.addr) == addr)


@pytest.fixture(scope="module")
def lb() -> Iterator[Lb]:
    with Topology("mlbdp") as topo:
        bed = lb_testbed(topo, [f"{LB4}/24", f"{LB6}/64"], BACKENDS4 + BACKENDS6)
        obj = BpfObject.open("lb_xdp").load()
        topo.callback(obj.close)
        tables = LbTables(obj.map)
        tables.set_sources(LB4, LB6, ifindex=bed.ifindex)
        tables.add_vip(VIP4, 16381)
        for addr in BACKENDS4[:3]:
            tables.set_backend(VIP4, ipaddress.ip_address(addr), 1)
        tables.add_vip(VIP6, 251)
        for addr in BACKENDS6:
            tables.set_backend(VIP6, ipaddress.ip_address(addr), 1)
        tables.add_vip(VIP_EMPTY, 13)
        yield Lb(bed, obj, tables)


def tcp4(src: str, sport: int, dst: str = str(VIP4.addr), dport: int = VIP4.port) -> Ether:
    return (
        Ether(src=CLIENT_MAC, dst=LB_MAC)
        / IP(src=src, dst=dst, tos=0x10)
        / TCP(sport=sport, dport=dport, flags="S")
        / b"hello"
    )


def tcp6(src: str, sport: int) -> Ether:
    return (
        Ether(src=CLIENT_MAC, dst=LB_MAC)
        / IPv6(src=src, dst=str(VIP6.addr), tc=0x20, fl=0x12345)
        / TCP(sport=sport, dport=VIP6.port, flags="S")
        / b"hello6"
    )


def reference_backend(vip: Vip, names: list[str], size: int, frame: Ether) -> str:
    """The backend the Python reference picks for a frame's 5-tuple."""
    ip = frame[IP] if IP in frame else frame[IPv6]
    l4 = ip.payload
    hashed = flow_hash(
        [ipaddress.ip_address(ip.src)],
        [ipaddress.ip_address(ip.dst)],
        [l4.sport],
        [l4.dport],
        [6],
    )
    return names[build_table(names, size)[int(hashed[0] % np.uint32(size))]]


def test_ipv4_in_ipv4_headers(lb: Lb) -> None:
    frame = tcp4("198.18.7.7", 40000)
    verdict, out = lb.run(bytes(frame))
    assert verdict == XDP_TX
    pkt = Ether(out)
    outer = pkt[IP]
    assert pkt.src == LB_MAC and pkt.dst == backend_mac(outer.dst)
    assert outer.dst in BACKENDS4[:3]
    assert (outer.src, outer.proto, outer.ttl, outer.ihl) == (str(LB4), 4, 64, 5)
    assert outer.len == len(frame[IP]) + 20
    assert outer.tos == 0x10
    assert bytes(out[14 + 20 :]) == bytes(frame[IP])  # the client's packet, untouched
    check = IP(bytes(out[14 : 14 + 20]))
    del check.chksum
    assert IP(bytes(check)).chksum == outer.chksum


def test_ipv6_in_ipv6_headers(lb: Lb) -> None:
    frame = tcp6("2001:db8:7::7", 40001)
    verdict, out = lb.run(bytes(frame))
    assert verdict == XDP_TX
    pkt = Ether(out)
    outer = pkt[IPv6]
    assert pkt.type == 0x86DD and pkt.dst == backend_mac(outer.dst)
    assert outer.dst in BACKENDS6
    assert (outer.src, outer.nh, outer.hlim) == (str(LB6), 41, 64)
    assert outer.plen == len(frame[IPv6])
    assert (outer.tc, outer.fl) == (0x20, 0x12345)
    assert bytes(out[14 + 40 :]) == bytes(frame[IPv6])


def test_backend_choice_matches_the_python_reference(lb: Lb) -> None:
    rng = random.Random(12)
    names4 = BACKENDS4[:3]
    for _ in range(150):
        src = str(ipaddress.IPv4Address(rng.randrange(0xC6120000, 0xC6140000)))
        frame = tcp4(src, rng.randrange(1024, 65536))
        verdict, out = lb.run(bytes(frame))
        assert verdict == XDP_TX
        assert Ether(out)[IP].dst == reference_backend(VIP4, names4, 16381, frame)
    for _ in range(50):
        src = f"2001:db8:{rng.randrange(1 << 16):x}::{rng.randrange(1 << 16):x}"
        frame = tcp6(src, rng.randrange(1024, 65536))
        verdict, out = lb.run(bytes(frame))
        assert verdict == XDP_TX
        assert Ether(out)[IPv6].dst == reference_backend(VIP6, BACKENDS6, 251, frame)


def test_established_flows_keep_their_backend_across_table_changes(lb: Lb) -> None:
    rng = random.Random(99)
    frames = [
        tcp4(f"198.18.{rng.randrange(1, 250)}.{rng.randrange(1, 250)}", 20000 + i)
        for i in range(300)
    ]
    first = {i: Ether(lb.run(bytes(f))[1])[IP].dst for i, f in enumerate(frames)}
    names4 = BACKENDS4[:4]
    added = ipaddress.ip_address(BACKENDS4[3])
    lb.tables.set_backend(VIP4, added, 1)
    try:
        # the new table sends some of these flows elsewhere; conntrack keeps them
        would_move = [
            i for i, f in enumerate(frames) if reference_backend(VIP4, names4, 16381, f) != first[i]
        ]
        assert would_move, "the table change moves none of the sample: the test proves nothing"
        for i, f in enumerate(frames):
            assert Ether(lb.run(bytes(f))[1])[IP].dst == first[i]
        # new flows follow the new table, the added backend included
        fresh = [tcp4("198.18.222.1", 50000 + i) for i in range(100)]
        got = [Ether(lb.run(bytes(f))[1])[IP].dst for f in fresh]
        assert got == [reference_backend(VIP4, names4, 16381, f) for f in fresh]
        assert str(added) in got
    finally:
        lb.tables.remove_backend(VIP4, added)
    # none of these flows was on the backend that went: all stay where they were
    for i, f in enumerate(frames):
        assert Ether(lb.run(bytes(f))[1])[IP].dst == first[i]


def test_removed_backend_flows_move_others_stay(lb: Lb) -> None:
    rng = random.Random(5)
    frames = [
        tcp4(f"198.18.{rng.randrange(1, 250)}.{rng.randrange(1, 250)}", 30000 + i)
        for i in range(200)
    ]
    first = [Ether(lb.run(bytes(f))[1])[IP].dst for f in frames]
    victim = BACKENDS4[1]
    assert victim in first
    lb.tables.remove_backend(VIP4, ipaddress.ip_address(victim))
    try:
        rest = [BACKENDS4[0], BACKENDS4[2]]
        for f, before in zip(frames, first, strict=True):
            now = Ether(lb.run(bytes(f))[1])[IP].dst
            if before == victim:
                assert now == reference_backend(VIP4, rest, 16381, f)
            else:
                assert now == before
    finally:
        lb.tables.set_backend(VIP4, ipaddress.ip_address(victim), 1)


@pytest.mark.parametrize(
    "frame",
    [
        tcp4("198.18.7.7", 40000, dst="198.19.0.99"),  # another address
        tcp4("198.18.7.7", 40000, dport=81),  # the VIP's address, another port
        Ether(src=CLIENT_MAC, dst=LB_MAC)
        / IP(src="198.18.7.7", dst=str(VIP4.addr))
        / UDP(dport=80),
        Ether(src=CLIENT_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(pdst=str(VIP4.addr)),
    ],
    ids=["other-address", "other-port", "other-protocol", "arp"],
)
def test_what_is_not_for_a_vip_passes_untouched(lb: Lb, frame: Ether) -> None:
    before = lb.stat(LbStat.PASSED)
    verdict, out = lb.run(bytes(frame))
    assert verdict == XDP_PASS
    assert out == bytes(frame)
    assert lb.stat(LbStat.PASSED) == (before[0] + 1, before[1] + len(frame))


def test_counters(lb: Lb) -> None:
    frame = tcp4("198.18.9.9", 41000)
    _, out = lb.run(bytes(frame))
    backend = lb.backend_id(VIP4, Ether(out)[IP].dst)
    before, fwd = lb.backend_counter(backend), lb.stat(LbStat.FORWARDED)
    new = lb.stat(LbStat.CT_NEW)
    for _ in range(3):
        assert lb.run(bytes(frame))[0] == XDP_TX
    assert lb.backend_counter(backend) == (before[0] + 3, before[1] + 3 * len(frame))
    assert lb.stat(LbStat.FORWARDED) == (fwd[0] + 3, fwd[1] + 3 * len(frame))
    assert lb.stat(LbStat.CT_NEW) == new  # the flow was known: no new conntrack entry


def test_vip_without_backends_drops(lb: Lb) -> None:
    frame = (
        Ether(src=CLIENT_MAC, dst=LB_MAC)
        / IP(src="198.18.7.7", dst=str(VIP_EMPTY.addr))
        / UDP(sport=5000, dport=VIP_EMPTY.port)
    )
    before = lb.stat(LbStat.NO_BACKEND)
    assert lb.run(bytes(frame))[0] == XDP_DROP
    assert lb.stat(LbStat.NO_BACKEND)[0] == before[0] + 1


def test_unknown_next_hop_mac_is_left_to_the_kernel(lb: Lb) -> None:
    vip = Vip.parse("198.19.0.12:80/tcp")
    lb.tables.add_vip(vip, 13)
    try:
        lb.tables.set_backend(vip, ipaddress.ip_address(UNRESOLVED4), 1)
        frame = tcp4("198.18.7.8", 40000, dst=str(vip.addr))
        before = lb.stat(LbStat.NEIGH_PASS)
        verdict, out = lb.run(bytes(frame))
        assert verdict == XDP_PASS
        pkt = Ether(out)
        # encapsulated, the Ethernet header as received: the kernel routes it on
        assert (pkt[IP].dst, pkt[IP].proto, pkt.dst) == (UNRESOLVED4, 4, LB_MAC)
        assert lb.stat(LbStat.NEIGH_PASS)[0] == before[0] + 1
    finally:
        lb.tables.delete_vip(vip)


def test_too_big_once_encapsulated_answers_icmp_fragmentation_needed(lb: Lb) -> None:
    """eth0's MTU is 1500: a 1500-byte packet cannot grow by 20 bytes on that route. The
    client is told to send at most 1480 (as Katran does), and learns it by PMTU discovery."""
    frame = tcp4("198.18.7.9", 40000) / (b"x" * (1500 - 45))
    assert len(frame[IP]) == 1500
    before = lb.stat(LbStat.TOO_BIG)
    verdict, out = lb.run(bytes(frame))
    assert verdict == XDP_TX
    assert lb.stat(LbStat.TOO_BIG)[0] == before[0] + 1
    reply = Ether(out)
    assert (reply.src, reply.dst) == (LB_MAC, CLIENT_MAC)
    icmp = reply[ICMP]
    assert (reply[IP].src, reply[IP].dst, icmp.type, icmp.code) == (str(LB4), "198.18.7.9", 3, 4)
    assert icmp.nexthopmtu == 1480
    assert bytes(icmp.payload)[:28] == bytes(frame[IP])[:28]  # what it is about
    assert len(out) == 14 + 20 + 8 + 28
    assert internet_checksum(out[14 : 14 + 20]) == 0  # valid IPv4 header checksum
    assert internet_checksum(out[14 + 20 :]) == 0  # valid ICMP checksum
    fits = tcp4("198.18.7.9", 40001) / (b"x" * (1480 - 45))
    assert lb.run(bytes(fits))[0] == XDP_TX
    assert Ether(lb.run(bytes(fits))[1])[IP].proto == 4


def test_too_big_ipv6_answers_packet_too_big(lb: Lb) -> None:
    frame = tcp6("2001:db8:7::9", 40000) / (b"x" * (1500 - 40 - 20 - 6))
    assert len(frame[IPv6]) == 1500
    verdict, out = lb.run(bytes(frame))
    assert verdict == XDP_TX
    reply = Ether(out)
    ptb = reply[ICMPv6PacketTooBig]
    assert (reply[IPv6].src, reply[IPv6].dst, ptb.mtu) == (str(LB6), "2001:db8:7::9", 1460)
    assert bytes(ptb.payload)[:48] == bytes(frame[IPv6])[:48]
    icmp6 = out[14 + 40 :]
    pseudo = socket.inet_pton(socket.AF_INET6, str(LB6)) + socket.inet_pton(
        socket.AF_INET6, "2001:db8:7::9"
    )
    pseudo += struct.pack("!IxxxB", len(icmp6), 58)
    assert internet_checksum(pseudo + icmp6) == 0  # a valid checksum sums to zero


def test_gso_super_frames_are_forwarded(lb: Lb) -> None:
    """Longer than the MTU before encapsulation: a GSO frame that generic XDP sees whole
    (a device with TSO/GRO), which the device segments after us."""
    frame = tcp4("198.18.7.10", 40000) / (b"x" * 3000)
    verdict, out = lb.run(bytes(frame))
    assert verdict == XDP_TX
    assert bytes(out[14 + 20 :]) == bytes(frame[IP])


def test_a_reused_backend_id_does_not_inherit_a_cached_next_hop(lb: Lb) -> None:
    vip = Vip.parse("198.19.0.13:80/tcp")
    first, second = BACKENDS4[3], BACKENDS4[2]
    lb.tables.add_vip(vip, 13)
    try:
        lb.tables.set_backend(vip, ipaddress.ip_address(first), 1)
        reused = lb.backend_id(vip, first)
        out = Ether(lb.run(bytes(tcp4("198.18.7.11", 40000, dst=str(vip.addr))))[1])
        assert (out[IP].dst, out.dst) == (first, backend_mac(first))  # now cached
        lb.tables.remove_backend(vip, ipaddress.ip_address(first))
        lb.tables.set_backend(vip, ipaddress.ip_address(second), 1)
        assert lb.backend_id(vip, second) == reused
        out = Ether(lb.run(bytes(tcp4("198.18.7.11", 40001, dst=str(vip.addr))))[1])
        assert (out[IP].dst, out.dst) == (second, backend_mac(second))
    finally:
        lb.tables.delete_vip(vip)
