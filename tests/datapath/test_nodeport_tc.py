"""The per-packet service path (bpf/nodeport.bpf.c) through BPF_PROG_TEST_RUN: the packets
it writes, byte for byte and checksums included (real traffic over veths would not notice
a wrong checksum: the kernel trusts its own), in a namespace whose routes make one backend
local and one remote (membrane.testing.nodeport)."""

from __future__ import annotations

from collections.abc import Iterator
from ipaddress import IPv4Address

import pytest
from nodeport_harness import (
    LOCAL_PORT,
    REMOTE_PORT,
    TC_ACT_OK,
    TC_ACT_REDIRECT,
    TC_ACT_SHOT,
    checksums_valid,
    flow_of,
    nodeport_bed,  # noqa: F401  (fixture `bed`)
    run,
    translated,
)
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from membrane.bpf.fs import temporary_pin_dir
from membrane.service.kubernetes import hand_written
from membrane.service.maps import ServiceIds
from membrane.service.nodeport import NodePortPath
from membrane.service.plan import NodeView, plan
from membrane.service.socklb import SocketLb
from membrane.testing.nodeport import (
    CLIENT_IP,
    FIRST_NODE_PORT,
    LOCAL_POD,
    NODE_IP,
    REMOTE_POD,
    TARGET,
    Bed,
    load_nodeport,
)

pytestmark = pytest.mark.root


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


def test_local_backend_dnat_and_its_reply(bed: Bed, snat: NodePortPath) -> None:
    request = frame(CLIENT_IP, NODE_IP, 40001, LOCAL_PORT)
    out = translated(bed, snat, "nodeport_ingress", request, TC_ACT_OK)
    assert flow_of(out) == (CLIENT_IP, 40001, LOCAL_POD, TARGET)
    reply = frame(LOCAL_POD, CLIENT_IP, TARGET, 40001)
    back = translated(bed, snat, "nodeport_egress", reply, TC_ACT_OK)
    assert flow_of(back) == (NODE_IP, LOCAL_PORT, CLIENT_IP, 40001)


def test_remote_backend_snat_keeps_the_flow_and_reverses_the_reply(
    bed: Bed, snat: NodePortPath
) -> None:
    first = frame(CLIENT_IP, NODE_IP, 40002, REMOTE_PORT, flags="S")
    out = translated(bed, snat, "nodeport_ingress", first, TC_ACT_REDIRECT)
    src, nat_port, dst, dport = flow_of(out)
    assert (src, dst, dport) == (NODE_IP, REMOTE_POD, TARGET) and nat_port >= 32768
    # the flow's next packet leaves from the same NAT port
    _, again = run(bed, snat, "nodeport_ingress", frame(CLIENT_IP, NODE_IP, 40002, REMOTE_PORT))
    assert again[TCP].sport == nat_port
    reply = frame(REMOTE_POD, NODE_IP, TARGET, nat_port)
    back = translated(bed, snat, "nodeport_ingress", reply, TC_ACT_REDIRECT)
    assert flow_of(back) == (NODE_IP, REMOTE_PORT, CLIENT_IP, 40002)


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


def one_service_path(bed: Bed, bpf_dir: str, backends: list[tuple[str, str, int]]) -> NodePortPath:
    """NodePort FIRST_NODE_PORT to `backends` (address, state, weight), random picks."""
    socket_lb = SocketLb.start(bpf_dir, "", (4,))  # maps only: nothing attaches
    path = NodePortPath.start(bpf_dir, "snat", IPv4Address(NODE_IP))
    spec = {"type": "NodePort", "clusterIP": "198.19.128.1",
            "ports": [{"port": 80, "targetPort": TARGET, "nodePort": FIRST_NODE_PORT}]}  # fmt: skip
    given = [{"address": a, "port": None, "state": s, "weight": w} for a, s, w in backends]
    svc, eps = hand_written("shop", "web", spec, {}, given)
    assert eps is not None
    node = NodeView((), {4: (NODE_IP,)}, 16381)
    socket_lb.maps.apply(
        plan([svc.with_ips(("198.19.128.1",))], [eps], node), ServiceIds.from_json(None)
    )
    socket_lb.close()
    path.obj.map("np_devices").update(bed.ext, 1)
    return path


def picks(bed: Bed, path: NodePortPath, flows: int, first_port: int) -> dict[str, int]:
    """The backend each of `flows` new flows (one SYN each) was sent to."""
    seen: dict[str, int] = {}
    for sport in range(first_port, first_port + flows):
        data = frame(CLIENT_IP, NODE_IP, sport, FIRST_NODE_PORT, flags="S")
        verdict, out = run(bed, path, "nodeport_ingress", data)
        assert verdict in (TC_ACT_OK, TC_ACT_REDIRECT)
        seen[out[IP].dst] = seen.get(out[IP].dst, 0) + 1
    return seen


def test_random_picks_follow_the_backends_weights(bed: Bed, pins: str) -> None:
    path = one_service_path(
        bed, f"{pins}/weights", [(LOCAL_POD, "active", 1), (REMOTE_POD, "active", 3)]
    )
    try:
        seen = picks(bed, path, 400, 41000)
    finally:
        path.close()
    # 1:3 expects 100 and 300 (binomial sd ~8.7): 60 is beyond 4.5 sd either way
    assert sum(seen.values()) == 400 and 60 < seen.get(LOCAL_POD, 0) < 140, seen


def test_terminating_backends_serve_while_no_backend_is_active(bed: Bed, pins: str) -> None:
    """As Cilium: with every backend terminating, new flows still reach them (graceful
    termination); with one active, only the active one is picked."""
    path = one_service_path(
        bed, f"{pins}/terminating", [(LOCAL_POD, "terminating", 1), (REMOTE_POD, "terminating", 1)]
    )
    try:
        seen = picks(bed, path, 40, 42000)
        assert set(seen) == {LOCAL_POD, REMOTE_POD} and path.counters()["no_backend"] == 0
    finally:
        path.close()
    path = one_service_path(
        bed, f"{pins}/one-active", [(LOCAL_POD, "terminating", 1), (REMOTE_POD, "active", 1)]
    )
    try:
        assert picks(bed, path, 20, 43000) == {REMOTE_POD: 20}
    finally:
        path.close()
