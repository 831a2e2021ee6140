"""Fragmented UDP through the real agent: a datagram's later fragments get the treatment
of its first one, which is recorded only once policy let it pass, in maps of the
receiving endpoint and direction alone. So a denied first fragment reusing an allowed
datagram's IP id spoils nothing, and a flood of first fragments aimed at one pod cannot
make the fragmented datagrams of another fail.

Fragments from the outside host are made by hand (scapy) and sent through a raw socket,
so that a test decides what arrives between a datagram's first and last fragment."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
from agent_support import net_fixture, shared_cluster_fixture
from scapy.layers.inet import IP, UDP, fragment

from membrane import netns
from membrane.testing.cluster import Cluster
from membrane.testing.pods import EXTERNAL_IP, Pod
from membrane.testing.traffic import socket_in

pytestmark = pytest.mark.root

cluster = shared_cluster_fixture()
net = net_fixture()

PORT, DENIED_PORT, FLOOD_PORT = 7000, 7001, 7002
PAYLOAD = bytes(range(256)) * 12  # 3,072 bytes: three fragments on a 1,500-byte path
FLOOD = 20_000  # first fragments, more than the 8,192 records all pods once shared
WAIT = 3.0

X_A_FROM_WORLD = f"""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: udp-from-world, namespace: x}}
spec:
  endpointSelector: {{matchLabels: {{pod: a}}}}
  ingress:
  - fromEntities: [world]
    toPorts: [{{ports: [{{port: "{PORT}", protocol: UDP}}]}}]
"""
Y_B_UDP_FROM_X = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: udp-from-x, namespace: y}
spec:
  endpointSelector: {matchLabels: {pod: b}}
  ingress:
  - fromEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: x}}]
    toPorts: [{ports: [{port: "80", protocol: UDP}]}]
"""


@pytest.fixture
def receiver(net: Cluster) -> Iterator[socket.socket]:
    """A UDP socket on x/a's PORT."""
    pod = net.pods["x/a"]
    sock = socket_in(pod.netns, socket.SOCK_DGRAM)
    sock.bind((pod.ip, PORT))
    sock.settimeout(WAIT)
    yield sock
    sock.close()


@pytest.fixture
def outside(net: Cluster) -> Iterator[socket.socket]:
    """A raw IPv4 socket of the outside host ("world"): frames as written, no fragmenting."""
    assert net.external is not None
    with netns.inside(net.external.netns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    yield sock
    sock.close()


def fragments(dst: str, dport: int, ip_id: int, payload: bytes = PAYLOAD) -> list[bytes]:
    """A UDP datagram from the outside host, cut into fragments of 1,480 bytes."""
    datagram = IP(src=EXTERNAL_IP, dst=dst, id=ip_id) / UDP(sport=5000, dport=dport) / payload
    return [bytes(f) for f in fragment(datagram, fragsize=1480)]


def send(sock: socket.socket, dst: str, frames: list[bytes]) -> None:
    for frame in frames:
        sock.sendto(frame, (dst, 0))


def received(sock: socket.socket) -> bytes | None:
    try:
        return sock.recv(65535)
    except TimeoutError:
        return None


def reassembly_requests(ns: str) -> int:
    """Fragments the namespace's IP layer has received (Ip: ReasmReqds)."""
    with netns.inside(ns), open("/proc/thread-self/net/snmp") as f:
        header, values = [line.split() for line in f if line.startswith("Ip:")]
    return int(values[header.index("ReasmReqds")])


def test_datagrams_the_kernel_fragments_pass_both_ways(net: Cluster) -> None:
    """x/a to y/b's echo server: the request's fragments enter y/b as a new flow, the
    echo's leave y/b and enter x/a as replies."""
    net.import_policy(Y_B_UDP_FROM_X)
    a, b = net.pods["x/a"], net.pods["y/b"]
    sock = socket_in(a.netns, socket.SOCK_DGRAM)
    try:
        sock.settimeout(WAIT)
        sock.connect((b.ip, 80))
        sock.send(PAYLOAD)
        assert received(sock) == PAYLOAD
        sock.connect((b.ip, 81))  # a port the policy does not open: no datagram back
        sock.send(PAYLOAD)
        assert received(sock) is None
    finally:
        sock.close()


def test_a_denied_first_fragment_does_not_spoil_an_allowed_datagram(
    net: Cluster, receiver: socket.socket, outside: socket.socket
) -> None:
    """A first fragment to a denied port with the allowed datagram's IP id, between its
    first and last fragments: it used to take over the datagram's record."""
    net.import_policy(X_A_FROM_WORLD)
    a = net.pods["x/a"]
    first, *rest = fragments(a.ip, PORT, ip_id=4100)
    denied_first = fragments(a.ip, DENIED_PORT, ip_id=4100)[0]
    send(outside, a.ip, [first, denied_first, *rest])
    assert received(receiver) == PAYLOAD


def test_a_flood_of_first_fragments_at_one_pod_spares_another(
    net: Cluster, receiver: socket.socket, outside: socket.socket
) -> None:
    """The outside host floods a fresh pod with first fragments of datagrams it never
    finishes, between the first and the last fragments of a datagram to x/a."""
    net.import_policy(X_A_FROM_WORLD)
    a = net.pods["x/a"]
    target: Pod = net.add_pod("x", "flooded", serve=False)
    first, *rest = fragments(a.ip, PORT, ip_id=4200)
    send(outside, a.ip, [first])
    before = reassembly_requests(target.netns)
    flood_first = bytearray(fragments(target.ip, FLOOD_PORT, ip_id=0)[0])
    for ip_id in range(FLOOD):
        flood_first[4:6] = ip_id.to_bytes(2, "big")  # the IPv4 identification field
        outside.sendto(bytes(flood_first), (target.ip, 0))
        if ip_id % 500 == 499:
            time.sleep(0.005)  # stay within the veth's backlog: every one must arrive
    send(outside, a.ip, rest)
    assert received(receiver) == PAYLOAD
    arrived = reassembly_requests(target.netns) - before
    assert arrived > 0.9 * FLOOD, f"only {arrived} of {FLOOD} flood fragments arrived"
