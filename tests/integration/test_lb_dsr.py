"""`membrane lb` with real TCP: client -> LB (XDP, IP-in-IP) -> backends that answer the
client directly (DSR), in namespaces the test creates.

    client ─┐
    lb ─────┼── br0 (fabric namespace)      one L2 segment, 198.18.N.0/24
    b1..b3 ─┘
The client routes the VIP via the LB; the LB encapsulates to a backend and sends it back
out of the same device (XDP_TX); each backend has an ipip device for its own address and
the VIP on loopback, and answers from the VIP straight to the client.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from membrane import netns
from membrane.netns import Topology, links, next_subnet
from membrane.netns.namespace import inside
from membrane.netns.sysctl import disable_ipv6, write_sysctl
from membrane.testing import cli
from membrane.testing.pods import start_echo_server

pytestmark = pytest.mark.root

MEMBRANE = [sys.executable, "-m", "membrane", "lb"]
VIP, PORT = "198.19.0.10", 80
VIP_ARG = f"{VIP}:{PORT}/tcp"
BACKENDS = 3
TIMEOUT = 5.0


def lb_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [*MEMBRANE, *args], capture_output=True, text=True, timeout=60, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(f"membrane lb {' '.join(args)}: {result.stderr}")
    return result


def lb_state() -> dict:
    return json.loads(lb_cli("stats", "-o", "json").stdout)


@dataclass
class Dsr:
    topo: Topology
    decap: str
    fabric: str
    client: str
    lb: str
    backends: list[tuple[str, str]]  # (namespace, address)
    client_ip: str
    lb_ip: str
    spare_ip: str  # in the subnet, for a backend added later


def _rx_packets(ns: str, dev: str = "eth0") -> int:
    with inside(ns), IPRoute() as ipr:
        link = ipr.get_links(ipr.link_lookup(ifname=dev)[0])[0]
    return link.get_attr("IFLA_STATS64")["rx_packets"]


def _ipip_possible() -> bool:
    """Whether this kernel makes ipip devices (CONFIG_NET_IPIP; a module on stock kernels)."""
    with Topology("mlbprobe") as topo:
        ns = topo.namespace("probe")
        with inside(ns), IPRoute() as ipr:
            try:
                ipr.link("add", ifname="ipip0", kind="ipip", ipip_local="198.18.0.1")
            except NetlinkError:
                return False
    return True


def _backend(topo: Topology, fabric: str, name: str, address: str, prefix: int, decap: str) -> str:
    ns = topo.namespace(name)
    with inside(ns):
        disable_ipv6("all", "default")
    topo.veth(ns, fabric, names=("eth0", f"p-{name}"))
    links.add_address(ns, "eth0", f"{address}/{prefix}")
    with inside(ns), IPRoute() as ipr:
        if decap == "ipip":  # decapsulates what is sent to this address, from any LB
            ipr.link("add", ifname="ipip0", kind="ipip", ipip_local=address)
            ipr.link("set", index=ipr.link_lookup(ifname="ipip0")[0], state="up")
        ipr.addr("add", index=ipr.link_lookup(ifname="lo")[0], address=VIP, prefixlen=32)
        for dev in ("all", "default", "eth0", *(["ipip0"] if decap == "ipip" else [])):
            write_sysctl(f"net.ipv4.conf.{dev}.rp_filter", 0)  # inner source is on eth0's side
        write_sysctl("net.ipv4.conf.all.arp_ignore", 1)  # the VIP is not answered for on eth0
        write_sysctl("net.ipv4.conf.all.arp_announce", 2)
    if decap == "xdp":
        lb_cli("decap", "attach", "eth0", "--netns", ns)
        topo.callback(lambda: lb_cli("decap", "detach", "eth0", "--netns", ns, check=False))
    proc = start_echo_server(ns, [PORT])
    topo.callback(netns.stop, proc)
    return ns


@pytest.fixture
def dsr(request: pytest.FixtureRequest) -> Iterator[Dsr]:
    """The topology, with backends decapsulating by an ipip device (`ipip`), by membrane's
    XDP decap program (`xdp`), or the former where the kernel has ipip (the default)."""
    decap = getattr(request, "param", "auto")
    if decap == "auto":
        decap = "ipip" if _ipip_possible() else "xdp"
    elif decap == "ipip" and not _ipip_possible():
        pytest.skip("this kernel makes no ipip devices (CONFIG_NET_IPIP unset)")
    with Topology("mlb") as topo:
        subnet = next_subnet()
        hosts = [str(h) for h in subnet.hosts()]
        fabric = topo.namespace("fabric")
        with inside(fabric), IPRoute() as ipr:
            ipr.link("add", ifname="br0", kind="bridge")
            ipr.link("set", index=ipr.link_lookup(ifname="br0")[0], state="up")
        client, lb = topo.namespace("client"), topo.namespace("lb")
        for ns in (client, lb):
            with inside(ns):
                disable_ipv6("all", "default")
        topo.veth(client, fabric, names=("eth0", "p-client"))
        topo.veth(lb, fabric, names=("eth0", "p-lb"))
        links.add_address(client, "eth0", f"{hosts[0]}/{subnet.prefixlen}")
        links.add_address(lb, "eth0", f"{hosts[1]}/{subnet.prefixlen}")
        backends = []
        for i in range(BACKENDS):
            address = hosts[10 + i]
            backends.append(
                (_backend(topo, fabric, f"b{i + 1}", address, subnet.prefixlen, decap), address)
            )
        with inside(fabric), IPRoute() as ipr:
            bridge = ipr.link_lookup(ifname="br0")[0]
            for port in ("p-client", "p-lb", *(f"p-b{i + 1}" for i in range(BACKENDS))):
                ipr.link("set", index=ipr.link_lookup(ifname=port)[0], master=bridge)
        links.add_route(client, f"{VIP}/32", via=hosts[1])
        with inside(lb):
            write_sysctl("net.ipv4.conf.all.forwarding", 1)  # the FIB lookup is a router's
        for _, address in backends:
            netns.wait_ping(lb, address)
        netns.wait_ping(client, hosts[1])

        topo.callback(lambda: lb_cli("detach", check=False))
        lb_cli("attach", "eth0", "--netns", lb)
        lb_cli("vip", "add", VIP_ARG)
        for _, address in backends:
            lb_cli("backend", "add", VIP_ARG, address)
        yield Dsr(
            topo, decap, fabric, client, lb, backends, hosts[0], hosts[1], hosts[10 + BACKENDS]
        )


def _open(ns: str, count: int) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        with inside(ns):
            sock = socket.create_connection((VIP, PORT), timeout=TIMEOUT)
        socks.append(sock)
    return socks


def _echo(sock: socket.socket, message: bytes) -> None:
    sock.sendall(message)
    got = b""
    while len(got) < len(message):
        chunk = sock.recv(len(message) - len(got))
        assert chunk, "the connection was closed (reset by a backend that did not know it?)"
        got += chunk
    assert got == message


@pytest.mark.parametrize("dsr", ["ipip", "xdp"], indirect=True)
def test_tcp_through_the_lb_spreads_over_backends_and_replies_bypass_it(dsr: Dsr) -> None:
    before_rx_lb, before_rx_client = _rx_packets(dsr.lb), _rx_packets(dsr.client)
    before = lb_state()
    connections = 30
    socks = _open(dsr.client, connections)
    try:
        for i, sock in enumerate(socks):
            _echo(sock, f"hello {i}".encode())
    finally:
        for sock in socks:
            sock.close()
    after = lb_state()
    rx_lb = _rx_packets(dsr.lb) - before_rx_lb
    rx_client = _rx_packets(dsr.client) - before_rx_client

    per_backend = {b["address"]: b["packets"] for b in after["vips"][0]["backends"]}
    earlier = {b["address"]: b["packets"] for b in before["vips"][0]["backends"]}
    moved = {addr: per_backend[addr] - earlier.get(addr, 0) for addr in per_backend}
    assert all(n > 0 for n in moved.values()), f"some backend got no flow: {moved}"
    forwarded = after["totals"]["forwarded"]["packets"] - before["totals"]["forwarded"]["packets"]
    assert forwarded == sum(moved.values())
    assert forwarded >= 3 * connections  # SYN, ACK and data at least, per connection
    # Direct server return: the client got SYN-ACKs and echoes (>= 2 per connection) from
    # the VIP, yet the LB's device received little beyond what it forwarded.
    assert rx_client >= 2 * connections
    assert rx_lb - forwarded < connections // 2, (rx_lb, forwarded, rx_client)


def test_established_connections_survive_backend_changes(dsr: Dsr) -> None:
    socks = _open(dsr.client, 24)
    try:
        for sock in socks:
            _echo(sock, b"before")
        # A fourth backend: a new table sends ~1/4 of these flows elsewhere, where they
        # would be reset; conntrack keeps them on their backend.
        _backend(dsr.topo, dsr.fabric, "b4", dsr.spare_ip, 24, dsr.decap)
        with inside(dsr.fabric), IPRoute() as ipr:
            ipr.link(
                "set",
                index=ipr.link_lookup(ifname="p-b4")[0],
                master=ipr.link_lookup(ifname="br0")[0],
            )
        netns.wait_ping(dsr.lb, dsr.spare_ip)
        lb_cli("backend", "add", VIP_ARG, dsr.spare_ip)
        for sock in socks:
            _echo(sock, b"after add")
        fresh = _open(dsr.client, 24)  # new connections use all four
        for sock in fresh:
            _echo(sock, b"new")
            sock.close()
        state = lb_state()
        served = {b["address"]: b["packets"] for b in state["vips"][0]["backends"]}
        assert served[dsr.spare_ip] > 0, "no new flow went to the added backend"
    finally:
        for sock in socks:
            sock.close()


def test_bad_input_exits_2_naming_the_field_and_changes_nothing(dsr: Dsr) -> None:
    before = lb_cli("list", "-o", "json").stdout
    cli.user_error(lb_cli("vip", "add", "198.19.0.10:80/icmp", check=False), "VIP")
    cli.user_error(lb_cli("vip", "add", VIP_ARG, check=False), "VIP", "exists")
    cli.user_error(lb_cli("backend", "add", VIP_ARG, "2001:db8::1", check=False), "ADDR")
    cli.user_error(
        lb_cli("backend", "add", VIP_ARG, dsr.backends[0][1], "--weight", "0", check=False),
        "--weight",
    )
    cli.user_error(lb_cli("backend", "delete", VIP_ARG, "198.18.0.250", check=False), "ADDR")
    cli.user_error(
        lb_cli("vip", "add", "198.19.0.11:80/tcp", "--maglev-size", "16384", check=False),
        "--maglev-size",
    )
    cli.user_error(lb_cli("attach", "eth0", "--netns", dsr.lb, check=False), "DEV")
    assert lb_cli("list", "-o", "json").stdout == before
