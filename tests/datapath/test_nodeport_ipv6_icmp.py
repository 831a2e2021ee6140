"""The per-packet service path (bpf/nodeport.bpf.c) for IPv6, and ICMP errors about its
translated flows in both families, through BPF_PROG_TEST_RUN: the packets it writes byte
for byte, every checksum recomputed by scapy and compared (the quoted header's IP and L4
checksums included), in the namespace of membrane.testing.nodeport (one local and one
remote backend per family)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from ipaddress import IPv4Address, IPv6Address

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
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6PacketTooBig,
    IPv6,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.l2 import Ether
from scapy.packet import Packet

from membrane.bpf.fs import temporary_pin_dir
from membrane.service.kubernetes import hand_written
from membrane.service.maps import ServiceIds
from membrane.service.nodeport import NodePortPath
from membrane.service.plan import NodeView, plan
from membrane.service.socklb import SocketLb
from membrane.testing.nodeport import (
    ADDRESSES,
    FIRST_NODE_PORT,
    TARGET,
    Bed,
    load_nodeport,
)

pytestmark = pytest.mark.root

ROUTER = {4: "198.19.8.200", 6: "2001:db8:8::200"}  # a hop that reports an error
IP_OF = {4: IP, 6: IPv6}


Loaded = Callable[[str, str, int], NodePortPath]


@pytest.fixture(scope="module")
def paths(bed: Bed) -> Iterator[Loaded]:
    """The programs for (mode, protocol, family), loaded on first use, one service."""
    loaded: dict[tuple[str, str, int], NodePortPath] = {}

    def path(mode: str, protocol: str, family: int) -> NodePortPath:
        key = (mode, protocol, family)
        if key not in loaded:
            where = f"{pin_dir}/{mode}-{protocol}-{family}"
            loaded[key] = load_nodeport(bed, where, mode, 1, protocol=protocol, family=family)
        return loaded[key]

    with temporary_pin_dir() as pin_dir:
        try:
            yield path
        finally:
            for made in loaded.values():
                made.close()


def frame(family: int, src: str, dst: str, sport: int, dport: int, udp: bool = False,
          ext: Packet | None = None, **tcp: object) -> bytes:  # fmt: skip
    l3 = IP_OF[family](src=src, dst=dst)
    if ext is not None:
        l3 = l3 / ext
    l4 = UDP(sport=sport, dport=dport) if udp else TCP(sport=sport, dport=dport, **tcp)
    return bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / l3 / l4 / (b"x" * 40))


def icmp_checksum_valid(ip: Packet) -> bool:
    """The ICMP (ICMPv6: over its pseudo-header too) and outer IPv4 checksums."""
    v4 = isinstance(ip, IP)
    field = "chksum" if v4 else "cksum"
    fresh = type(ip)(bytes(ip))
    written = getattr(fresh.payload, field)
    delattr(fresh.payload, field)
    if v4:
        del fresh.chksum
    rebuilt = type(ip)(bytes(fresh))
    same_ip = not v4 or rebuilt.chksum == ip.chksum
    return same_ip and getattr(rebuilt.payload, field) == written


def quote_of(ip: Packet) -> Packet:
    """The packet an ICMP error quotes, parsed as a packet of its own."""
    icmp = ip.payload
    return IP_OF[4 if isinstance(ip, IP) else 6](bytes(icmp.payload))


def icmp_error(family: int, src: str, dst: str, quoted: bytes, kind: str) -> bytes:
    """An ICMP error from `src` to `dst` quoting the IP packet `quoted` whole."""
    if family == 4:
        code = {"too_big": 4, "port": 3}[kind]
        icmp = ICMP(type=3, code=code, nexthopmtu=1400 if kind == "too_big" else 0)
        packet = IP(src=src, dst=dst) / icmp / quoted
    else:
        icmp6 = ICMPv6PacketTooBig(mtu=1400) if kind == "too_big" else ICMPv6DestUnreach(code=4)
        packet = IPv6(src=src, dst=dst) / icmp6 / quoted
    return bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / packet)


# ---- IPv6 translation ----------------------------------------------------------------------
def test_ipv6_local_backend_dnat_and_its_reply(bed: Bed, paths: Loaded) -> None:
    node, client, _, local_pod, _, _ = ADDRESSES[6]
    path = paths("snat", "TCP", 6)
    request = frame(6, client, node, 40001, LOCAL_PORT)
    out = translated(bed, path, "nodeport_ingress", request, TC_ACT_OK)
    assert flow_of(out) == (client, 40001, local_pod, TARGET)
    reply = frame(6, local_pod, client, TARGET, 40001)
    back = translated(bed, path, "nodeport_egress", reply, TC_ACT_OK)
    assert flow_of(back) == (node, LOCAL_PORT, client, 40001)


def test_ipv6_remote_backend_snat_and_its_reply(bed: Bed, paths: Loaded) -> None:
    node, client, _, _, remote_pod, _ = ADDRESSES[6]
    path = paths("snat", "TCP", 6)
    first = frame(6, client, node, 40002, REMOTE_PORT, flags="S")
    out = translated(bed, path, "nodeport_ingress", first, TC_ACT_REDIRECT)
    src, nat_port, dst, dport = flow_of(out)
    assert (src, dst, dport) == (node, remote_pod, TARGET) and nat_port >= 32768
    reply = frame(6, remote_pod, node, TARGET, nat_port)
    back = translated(bed, path, "nodeport_ingress", reply, TC_ACT_REDIRECT)
    assert flow_of(back) == (node, REMOTE_PORT, client, 40002)


def test_ipv6_udp_is_translated_with_its_checksum(bed: Bed, paths: Loaded) -> None:
    node, client, _, local_pod, _, _ = ADDRESSES[6]
    data = frame(6, client, node, 40003, LOCAL_PORT, udp=True)
    verdict, out = run(bed, paths("snat", "UDP", 6), "nodeport_ingress", data)
    assert verdict == TC_ACT_OK and out[IPv6].dst == local_pod and out[UDP].dport == TARGET
    assert checksums_valid(out[IPv6])


def test_ipv6_dsr_encapsulates_in_ipv6_and_clamps_the_syn_mss(bed: Bed, paths: Loaded) -> None:
    node, client, _, _, remote_pod, _ = ADDRESSES[6]
    path = paths("dsr", "TCP", 6)
    syn = frame(6, client, node, 40004, REMOTE_PORT, flags="S", options=[("MSS", 1440)])
    verdict, out = run(bed, path, "nodeport_ingress", syn)
    assert verdict == TC_ACT_REDIRECT
    outer = out[IPv6]
    assert (outer.src, outer.dst, outer.nh) == (node, remote_pod, 41)  # IPv6-in-IPv6
    inner = IPv6(bytes(outer.payload))
    assert outer.plen == len(bytes(inner))
    assert (inner.src, inner.dst, inner[TCP].dport) == (client, node, REMOTE_PORT)
    assert dict(inner[TCP].options)["MSS"] == 1500 - 100  # ext0's MTU less 2 x IPv6 + TCP
    assert checksums_valid(inner)
    assert path.counters()["mss_clamped"] == 1


def test_ipv6_local_policy_without_a_local_backend_drops(bed: Bed) -> None:
    node, client, *_ = ADDRESSES[6]
    with temporary_pin_dir() as pin_dir:
        path = load_nodeport(bed, pin_dir, "snat", 1, local_only=True, family=6)
        try:
            data = frame(6, client, node, 40005, REMOTE_PORT)
            verdict = bed.run(path.obj.program("nodeport_ingress"), data, bed.ext).retval
            assert verdict == TC_ACT_SHOT and path.counters()["no_backend"] == 1
        finally:
            path.close()


def test_ipv6_options_headers_are_kept_and_a_routing_header_drops(bed: Bed, paths: Loaded) -> None:
    """Hop-by-hop options are walked past and kept; a routing header names another final
    destination than the one rewritten: dropped, counted."""
    node, client, _, local_pod, _, _ = ADDRESSES[6]
    path = paths("snat", "TCP", 6)
    with_options = frame(6, client, node, 40006, LOCAL_PORT, ext=IPv6ExtHdrHopByHop())
    verdict, out = run(bed, path, "nodeport_ingress", with_options)
    assert verdict == TC_ACT_OK and IPv6ExtHdrHopByHop in out
    assert (out[IPv6].dst, out[TCP].dport) == (local_pod, TARGET) and checksums_valid(out[IPv6])
    before = path.counters()["exthdr"]
    routed = frame(6, client, node, 40007, LOCAL_PORT, ext=IPv6ExtHdrRouting(addresses=[node]))
    verdict, _ = run(bed, path, "nodeport_ingress", routed)
    assert verdict == TC_ACT_SHOT and path.counters()["exthdr"] == before + 1


# ---- ICMP errors, both families --------------------------------------------------------------
@pytest.mark.parametrize("family", [4, 6])
def test_port_unreachable_from_a_local_backend_speaks_as_the_frontend(
    bed: Bed, paths: Loaded, family: int
) -> None:
    """The backend pod has no UDP socket: its error leaves by ext0 from the frontend,
    quoting the datagram the client sent (to the frontend), so a connected UDP socket of
    the client gets ECONNREFUSED."""
    node, client, _, local_pod, _, _ = ADDRESSES[family]
    path = paths("snat", "UDP", family)
    verdict, dnat = run(
        bed, path, "nodeport_ingress", frame(family, client, node, 40100, LOCAL_PORT, udp=True)
    )
    assert verdict == TC_ACT_OK
    delivered = bytes(dnat[IP_OF[family]])  # what reached the pod, and what it quotes
    before = path.counters()["icmp_error"]
    error = icmp_error(family, local_pod, client, delivered, "port")
    verdict, out = run(bed, path, "nodeport_egress", error)
    assert verdict == TC_ACT_OK
    ip = out[IP_OF[family]]
    assert (ip.src, ip.dst) == (node, client)
    quote = quote_of(ip)
    assert (quote.src, quote[UDP].sport, quote.dst, quote[UDP].dport) == (
        client, 40100, node, LOCAL_PORT)  # fmt: skip
    assert checksums_valid(quote) and icmp_checksum_valid(ip)
    assert path.counters()["icmp_error"] == before + 1


@pytest.mark.parametrize("family", [4, 6])
def test_too_big_on_the_path_to_a_snat_backend_reaches_the_client(
    bed: Bed, paths: Loaded, family: int
) -> None:
    """A hop towards the remote backend reports that the node's SNAT'd segment is too
    big: the error goes to the client about the segment it sent (to the frontend)."""
    node, client, _, _, _, _ = ADDRESSES[family]
    path = paths("snat", "TCP", family)
    syn = frame(family, client, node, 40101, REMOTE_PORT, flags="S")
    verdict, out = run(bed, path, "nodeport_ingress", syn)
    assert verdict == TC_ACT_REDIRECT
    sent = bytes(out[IP_OF[family]])
    error = icmp_error(family, ROUTER[family], node, sent, "too_big")
    verdict, back = run(bed, path, "nodeport_ingress", error)
    assert verdict == TC_ACT_REDIRECT
    ip = back[IP_OF[family]]
    assert (ip.src, ip.dst) == (ROUTER[family], client)
    quote = quote_of(ip)
    assert (quote.src, quote[TCP].sport, quote.dst, quote[TCP].dport) == (
        client, 40101, node, REMOTE_PORT)  # fmt: skip
    assert checksums_valid(quote) and icmp_checksum_valid(ip)
    assert (ip.payload.nexthopmtu if family == 4 else ip.payload.mtu) == 1400


@pytest.mark.parametrize("family", [4, 6])
def test_too_big_about_a_reply_reaches_the_local_backend(
    bed: Bed, paths: Loaded, family: int
) -> None:
    """A hop towards the client reports the reply (from the frontend) too big: the error
    goes to the backend pod about the segment it sent."""
    node, client, _, local_pod, _, _ = ADDRESSES[family]
    path = paths("snat", "TCP", family)
    run(bed, path, "nodeport_ingress", frame(family, client, node, 40102, LOCAL_PORT, flags="S"))
    _, reply = run(bed, path, "nodeport_egress", frame(family, local_pod, client, TARGET, 40102))
    error = icmp_error(family, ROUTER[family], node, bytes(reply[IP_OF[family]]), "too_big")
    verdict, out = run(bed, path, "nodeport_ingress", error)
    assert verdict == TC_ACT_OK
    ip = out[IP_OF[family]]
    assert (ip.src, ip.dst) == (ROUTER[family], local_pod)
    quote = quote_of(ip)
    assert (quote.src, quote[TCP].sport, quote.dst, quote[TCP].dport) == (
        local_pod, TARGET, client, 40102)  # fmt: skip
    assert checksums_valid(quote) and icmp_checksum_valid(ip)


@pytest.mark.parametrize("family", [4, 6])
def test_errors_about_other_flows_pass_untouched(bed: Bed, paths: Loaded, family: int) -> None:
    node, client, *_ = ADDRESSES[family]
    path = paths("snat", "TCP", family)
    stranger = bytes(IP_OF[family](src=node, dst=client) / TCP(sport=22, dport=40999))
    error = icmp_error(family, ROUTER[family], node, stranger, "too_big")
    verdict, out = run(bed, path, "nodeport_ingress", error)
    assert verdict == TC_ACT_OK and bytes(out) == error


# ---- IPv6 backend picks: weights, Maglev, ClientIP affinity, as IPv4's -------------------------
def ipv6_service_path(
    bed: Bed, bpf_dir: str, weights: tuple[int, int], algorithm: str = "random", **spec: object
) -> NodePortPath:
    """An IPv6 NodePort FIRST_NODE_PORT to the local and the remote pod with `weights`."""
    node, _, _, local_pod, remote_pod, cluster_ip = ADDRESSES[6]
    socket_lb = SocketLb.start(bpf_dir, "", (4, 6))  # maps only: nothing attaches
    path = NodePortPath.start(bpf_dir, "snat", IPv4Address(ADDRESSES[4][0]), IPv6Address(node))
    full = {"type": "NodePort", "clusterIP": cluster_ip, **spec,
            "ports": [{"port": 80, "targetPort": TARGET, "nodePort": FIRST_NODE_PORT}]}  # fmt: skip
    given = [
        {"address": a, "port": None, "state": "active", "weight": w}
        for a, w in zip((local_pod, remote_pod), weights, strict=True)
    ]
    annotations = {"service.cilium.io/lb-algorithm": algorithm}
    svc, eps = hand_written("shop", "web6", full, annotations, given)
    assert eps is not None
    node_view = NodeView((), {6: (node,)}, 16381)
    socket_lb.maps.apply(
        plan([svc.with_ips((cluster_ip,))], [eps], node_view), ServiceIds.from_json(None)
    )
    socket_lb.close()
    path.obj.map("np_devices").update(bed.ext, 1)
    return path


def ipv6_picks(bed: Bed, path: NodePortPath, sports: range, client: str | None = None) -> list[str]:
    """The backend each new flow (one SYN per source port) was sent to."""
    node, default_client, *_ = ADDRESSES[6]
    seen = []
    for sport in sports:
        data = frame(6, client or default_client, node, sport, FIRST_NODE_PORT, flags="S")
        verdict, out = run(bed, path, "nodeport_ingress", data)
        assert verdict in (TC_ACT_OK, TC_ACT_REDIRECT)
        seen.append(out[IPv6].dst)
    return seen


def test_ipv6_random_picks_follow_the_weights(bed: Bed) -> None:
    _, _, _, local_pod, _, _ = ADDRESSES[6]
    with temporary_pin_dir() as pin_dir:
        path = ipv6_service_path(bed, pin_dir, (1, 3))
        try:
            seen = ipv6_picks(bed, path, range(41000, 41400))
        finally:
            path.close()
    # 1:3 expects 100 local of 400 (binomial sd ~8.7): 60 and 140 are beyond 4.5 sd
    assert 60 < seen.count(local_pod) < 140, seen.count(local_pod)


def test_ipv6_maglev_picks_by_the_tuple(bed: Bed) -> None:
    with temporary_pin_dir() as pin_dir:
        path = ipv6_service_path(bed, pin_dir, (1, 1), "maglev")
        try:
            first = ipv6_picks(bed, path, range(42000, 42040))
            path.obj.map("np6_flows").clear()  # forget the flows: each is picked again
            again = ipv6_picks(bed, path, range(42000, 42040))
        finally:
            path.close()
    assert len(set(first)) == 2 and again == first  # by the table, not at random


def test_ipv6_client_ip_affinity_keeps_a_client_on_its_backend(bed: Bed) -> None:
    with temporary_pin_dir() as pin_dir:
        affinity = {"sessionAffinity": "ClientIP"}
        path = ipv6_service_path(bed, pin_dir, (1, 1), **affinity)
        try:
            one = ipv6_picks(bed, path, range(43000, 43030))
            other = ipv6_picks(bed, path, range(43000, 43030), client="2001:db8:8::3")
        finally:
            path.close()
    assert len(set(one)) == 1 and len(set(other)) == 1, (set(one), set(other))
