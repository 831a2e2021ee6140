"""The per-packet service path (bpf/nodeport.bpf.c) through BPF_PROG_TEST_RUN: the packets
it writes, byte for byte and checksums included (real traffic over veths would not notice
a wrong checksum: the kernel trusts its own), in a namespace whose routes make one backend
local and one remote (membrane.testing.nodeport)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from membrane.bpf.fs import temporary_pin_dir
from membrane.netns import Topology
from membrane.service.nodeport import NodePortPath
from membrane.testing.nodeport import (
    CLIENT_IP,
    FIRST_NODE_PORT,
    LOCAL_POD,
    NODE_IP,
    REMOTE_POD,
    TARGET,
    Bed,
    load_nodeport,
    nodeport_testbed,
)

pytestmark = pytest.mark.root

TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = 0, 2, 7
LOCAL_PORT, REMOTE_PORT = FIRST_NODE_PORT, FIRST_NODE_PORT + 1  # service 0's two NodePorts


@pytest.fixture(scope="module")
def bed() -> Iterator[Bed]:
    with Topology("mnd") as topo:
        yield nodeport_testbed(topo)


@pytest.fixture(scope="module")
def pins() -> Iterator[str]:
    with temporary_pin_dir() as pin_dir:
        yield pin_dir


@pytest.fixture(scope="module")
def snat(bed: Bed, pins: str) -> Iterator[NodePortPath]:
    path = load_nodeport(bed, f"{pins}/snat", "snat", 1)
    yield path
    path.close()


@pytest.fixture(scope="module")
def dsr(bed: Bed, pins: str) -> Iterator[NodePortPath]:
    path = load_nodeport(bed, f"{pins}/dsr", "dsr", 1)
    yield path
    path.close()


def frame(src: str, dst: str, sport: int, dport: int, udp: bool = False, **tcp: object) -> bytes:
    l4 = UDP(sport=sport, dport=dport) if udp else TCP(sport=sport, dport=dport, **tcp)
    return bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(src=src, dst=dst)
                 / l4 / (b"x" * 40))  # fmt: skip


def run(bed: Bed, path: NodePortPath, prog: str, data: bytes) -> tuple[int, Ether]:
    result = bed.run(path.obj.program(prog), data, bed.ext)
    return result.retval, Ether(result.data)


def checksums_valid(ip: IP) -> bool:
    """The IPv4 and L4 checksums as written equal what scapy computes afresh."""
    fresh = IP(bytes(ip))
    del fresh.chksum
    del fresh.payload.chksum
    rebuilt = IP(bytes(fresh))
    return rebuilt.chksum == ip.chksum and rebuilt.payload.chksum == ip.payload.chksum


def test_local_backend_dnat_and_its_reply(bed: Bed, snat: NodePortPath) -> None:
    verdict, out = run(bed, snat, "nodeport_ingress", frame(CLIENT_IP, NODE_IP, 40001, LOCAL_PORT))
    assert verdict == TC_ACT_OK
    assert (out[IP].src, out[IP].dst, out[TCP].sport, out[TCP].dport) == (
        CLIENT_IP, LOCAL_POD, 40001, TARGET)  # fmt: skip
    assert checksums_valid(out[IP])
    reply = frame(LOCAL_POD, CLIENT_IP, TARGET, 40001)
    verdict, back = run(bed, snat, "nodeport_egress", reply)
    assert verdict == TC_ACT_OK
    assert (back[IP].src, back[TCP].sport, back[IP].dst, back[TCP].dport) == (
        NODE_IP, LOCAL_PORT, CLIENT_IP, 40001)  # fmt: skip
    assert checksums_valid(back[IP])


def test_remote_backend_snat_keeps_the_flow_and_reverses_the_reply(
    bed: Bed, snat: NodePortPath
) -> None:
    first = frame(CLIENT_IP, NODE_IP, 40002, REMOTE_PORT, flags="S")
    verdict, out = run(bed, snat, "nodeport_ingress", first)
    assert verdict == TC_ACT_REDIRECT
    assert (out[IP].src, out[IP].dst, out[TCP].dport) == (NODE_IP, REMOTE_POD, TARGET)
    nat_port = out[TCP].sport
    assert nat_port >= 32768 and checksums_valid(out[IP])
    # the flow's next packet leaves from the same NAT port
    _, again = run(bed, snat, "nodeport_ingress", frame(CLIENT_IP, NODE_IP, 40002, REMOTE_PORT))
    assert again[TCP].sport == nat_port
    verdict, back = run(bed, snat, "nodeport_ingress", frame(REMOTE_POD, NODE_IP, TARGET, nat_port))
    assert verdict == TC_ACT_REDIRECT
    assert (back[IP].src, back[TCP].sport, back[IP].dst, back[TCP].dport) == (
        NODE_IP, REMOTE_PORT, CLIENT_IP, 40002)  # fmt: skip
    assert checksums_valid(back[IP])


@pytest.fixture(scope="module")
def udp(bed: Bed, pins: str) -> Iterator[NodePortPath]:
    path = load_nodeport(bed, f"{pins}/udp", "snat", 1, protocol="UDP")
    yield path
    path.close()


@pytest.mark.parametrize("checksum", ["computed", "none"])
def test_udp_checksums(bed: Bed, udp: NodePortPath, checksum: str) -> None:
    """UDP goes through the same rewrite; a checksum of 0 (none) stays 0."""
    data = frame(CLIENT_IP, NODE_IP, 40003, LOCAL_PORT, udp=True)
    if checksum == "none":
        packet = Ether(data)
        packet[UDP].chksum = 0
        data = bytes(packet)
    verdict, out = run(bed, udp, "nodeport_ingress", data)
    assert verdict == TC_ACT_OK and out[IP].dst == LOCAL_POD and out[UDP].dport == TARGET
    if checksum == "none":
        assert out[UDP].chksum == 0
    else:
        assert checksums_valid(out[IP])


def test_dsr_encapsulates_unchanged_and_clamps_the_syn_mss(bed: Bed, dsr: NodePortPath) -> None:
    syn = frame(CLIENT_IP, NODE_IP, 40004, REMOTE_PORT, flags="S", options=[("MSS", 1460)])
    verdict, out = run(bed, dsr, "nodeport_ingress", syn)
    assert verdict == TC_ACT_REDIRECT
    outer = out[IP]
    assert (outer.src, outer.dst, outer.proto) == (NODE_IP, REMOTE_POD, 4)  # IPv4-in-IPv4
    assert outer.chksum == IP(bytes(IP(bytes(outer)[:20]))).chksum  # as scapy computes it
    inner = outer.payload
    assert (inner.src, inner.dst, inner[TCP].dport) == (CLIENT_IP, NODE_IP, REMOTE_PORT)
    assert dict(inner[TCP].options)["MSS"] == 1500 - 60  # ext0's MTU less both headers
    assert checksums_valid(inner)
    assert dsr.counters()["mss_clamped"] == 1


def test_a_frontend_without_a_backend_drops(bed: Bed, pins: str) -> None:
    """externalTrafficPolicy Local, no backend on this node: the set is empty."""
    path = load_nodeport(bed, f"{pins}/local", "snat", 1, local_only=True)
    try:
        data = frame(CLIENT_IP, NODE_IP, 40005, REMOTE_PORT)
        assert bed.run(path.obj.program("nodeport_ingress"), data, bed.ext).retval == TC_ACT_SHOT
        assert path.counters()["no_backend"] == 1
    finally:
        path.close()


def test_packets_for_no_frontend_pass_untouched(bed: Bed, snat: NodePortPath) -> None:
    data = frame(CLIENT_IP, NODE_IP, 40006, 22)
    verdict, out = run(bed, snat, "nodeport_ingress", data)
    assert verdict == TC_ACT_OK and bytes(out) == data
