"""`membrane lb` with real TCP: client -> LB (XDP, IP-in-IP) -> backends that answer the
client directly (DSR), in namespaces the test creates, over IPv4 and IPv6.

    client ─┐
    lb ─────┼── br0 (fabric namespace)      one L2 segment: 198.18.N.0/24 or 2001:db8:N::/64
    b1..b3 ─┘
The client routes the VIP via the LB; the LB encapsulates to a backend and sends it back
out of the same device (XDP_TX); each backend holds the VIP on loopback, strips the outer
header (an ipip device where the kernel makes them, or `membrane lb decap`), and answers
from the VIP straight to the client.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv6Network

import pytest
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from membrane import netns
from membrane.netns import Topology, links, next_subnet
from membrane.netns.namespace import inside
from membrane.netns.sysctl import disable_ipv6, enable_ipv6, write_sysctl
from membrane.testing import cli
from membrane.testing.pods import start_echo_server
from membrane.testing.traffic import echoed_while_sent

pytestmark = pytest.mark.root

MEMBRANE = [sys.executable, "-m", "membrane", "lb"]
VIPS = {4: "198.19.0.10", 6: "2001:db8:ffff::10"}
PORT = 80
BACKENDS = 3
TIMEOUT = 5.0
LB_ROOT = "/sys/fs/bpf/membrane/lb"


def lb_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [*MEMBRANE, *args], capture_output=True, text=True, timeout=60, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(f"membrane lb {' '.join(args)}: {result.stderr}")
    return result


def lb_state() -> dict:
    return json.loads(lb_cli("stats", "-o", "json").stdout)


def vip_arg(family: int) -> str:
    host = VIPS[family] if family == 4 else f"[{VIPS[family]}]"
    return f"{host}:{PORT}/tcp"


@dataclass
class Dsr:
    topo: Topology
    family: int
    decap: str
    fabric: str
    client: str
    lb: str
    backends: list[tuple[str, str]]  # (namespace, address)
    hosts: list[str]  # addresses of the segment: [0] client, [1] LB, [10:] backends
    prefix: int

    @property
    def vip(self) -> str:
        return VIPS[self.family]

    @property
    def vip_arg(self) -> str:
        return vip_arg(self.family)

    @property
    def spare_ip(self) -> str:
        """An address of the segment for a backend added later."""
        return self.hosts[10 + BACKENDS]


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


def _quiet_namespace(topo: Topology, role: str, family: int) -> str:
    ns = topo.namespace(role)
    with inside(ns):
        if family == 6:
            enable_ipv6("all", "default")
        else:
            disable_ipv6("all", "default")
    return ns


def add_backend(dsr: Dsr, name: str, address: str) -> str:
    """A backend namespace on the segment: the VIP on lo, decapsulation, an echo server."""
    ns = _quiet_namespace(dsr.topo, name, dsr.family)
    dsr.topo.veth(ns, dsr.fabric, names=("eth0", f"p-{name}"))
    links.add_address(ns, "eth0", f"{address}/{dsr.prefix}")
    with inside(ns), IPRoute() as ipr:
        if dsr.decap == "ipip":  # decapsulates what is sent to this address, from any LB
            ipr.link("add", ifname="ipip0", kind="ipip", ipip_local=address)
            ipr.link("set", index=ipr.link_lookup(ifname="ipip0")[0], state="up")
        lo = ipr.link_lookup(ifname="lo")[0]
        ipr.addr("add", index=lo, address=dsr.vip, prefixlen=32 if dsr.family == 4 else 128)
        if dsr.family == 4:
            for dev in ("all", "default", "eth0", *(["ipip0"] if dsr.decap == "ipip" else [])):
                write_sysctl(f"net.ipv4.conf.{dev}.rp_filter", 0)  # inner source: eth0's side
            write_sysctl("net.ipv4.conf.all.arp_ignore", 1)  # no ARP answers for the VIP
            write_sysctl("net.ipv4.conf.all.arp_announce", 2)
    with inside(dsr.fabric), IPRoute() as ipr:
        port = ipr.link_lookup(ifname=f"p-{name}")[0]
        ipr.link("set", index=port, master=ipr.link_lookup(ifname="br0")[0])
    if dsr.decap == "xdp":
        lb_cli("decap", "attach", "eth0", "--netns", ns)
        dsr.topo.callback(lambda: lb_cli("decap", "detach", "eth0", "--netns", ns, check=False))
    proc = start_echo_server(ns, [PORT])
    dsr.topo.callback(netns.stop, proc)
    netns.wait_ping(dsr.lb, address)  # the LB's neighbour table knows it from here
    return ns


@pytest.fixture
def dsr(request: pytest.FixtureRequest) -> Iterator[Dsr]:
    """The topology for (family, decap); decap is `ipip` (a device), `xdp` (membrane lb
    decap), or `auto`: ipip where the kernel makes such devices (the default, IPv4)."""
    family, decap = getattr(request, "param", (4, "auto"))
    if decap == "auto":
        decap = "ipip" if _ipip_possible() else "xdp"
    elif decap == "ipip" and not _ipip_possible():
        pytest.skip("this kernel makes no ipip devices (CONFIG_NET_IPIP unset)")
    with Topology("mlb") as topo:
        if family == 4:
            subnet = next_subnet()
            hosts, prefix = [str(h) for h in subnet], subnet.prefixlen
        else:
            subnet6 = IPv6Network(f"2001:db8:{secrets.randbits(16):x}::/64")
            hosts, prefix = [str(subnet6[i]) for i in range(20)], 64
        fabric = topo.namespace("fabric")
        with inside(fabric), IPRoute() as ipr:
            disable_ipv6("all", "default")  # the bridge itself takes no part
            ipr.link("add", ifname="br0", kind="bridge")
            ipr.link("set", index=ipr.link_lookup(ifname="br0")[0], state="up")
        client = _quiet_namespace(topo, "client", family)
        lb = _quiet_namespace(topo, "lb", family)
        topo.veth(client, fabric, names=("eth0", "p-client"))
        topo.veth(lb, fabric, names=("eth0", "p-lb"))
        with inside(fabric), IPRoute() as ipr:
            bridge = ipr.link_lookup(ifname="br0")[0]
            for port in ("p-client", "p-lb"):
                ipr.link("set", index=ipr.link_lookup(ifname=port)[0], master=bridge)
        links.add_address(client, "eth0", f"{hosts[1]}/{prefix}")
        links.add_address(lb, "eth0", f"{hosts[2]}/{prefix}")
        links.add_route(client, f"{VIPS[family]}/{32 if family == 4 else 128}", via=hosts[2])
        with inside(lb):  # the program's FIB lookup is a router's
            write_sysctl(f"net.ipv{family}.conf.all.forwarding", 1)
        topo.callback(lambda: lb_cli("detach", check=False))
        lb_cli("attach", "eth0", "--netns", lb)
        lb_cli("vip", "add", vip_arg(family))
        state = Dsr(topo, family, decap, fabric, client, lb, [], hosts[1:], prefix)
        for i in range(BACKENDS):
            address = hosts[11 + i]
            state.backends.append((add_backend(state, f"b{i + 1}", address), address))
            lb_cli("backend", "add", vip_arg(family), address)
        netns.wait_ping(client, hosts[2])
        yield state


def _open(dsr: Dsr, count: int) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        with inside(dsr.client):
            sock = socket.create_connection((dsr.vip, PORT), timeout=TIMEOUT)
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


def _packets(state: dict) -> dict[str, int]:
    return {b["address"]: b["packets"] for b in state["vips"][0]["backends"]}


@pytest.mark.parametrize(
    "dsr",
    [(4, "ipip"), (4, "xdp"), (6, "xdp")],
    indirect=True,
    ids=["ipv4-ipip", "ipv4-xdp", "ipv6-xdp"],
)
def test_tcp_through_the_lb_spreads_over_backends_and_replies_bypass_it(dsr: Dsr) -> None:
    before_rx_lb, before_rx_client = _rx_packets(dsr.lb), _rx_packets(dsr.client)
    before = lb_state()
    connections = 30
    socks = _open(dsr, connections)
    try:
        for i, sock in enumerate(socks):
            _echo(sock, f"hello {i}".encode())
    finally:
        for sock in socks:
            sock.close()
    after = lb_state()
    rx_lb = _rx_packets(dsr.lb) - before_rx_lb
    rx_client = _rx_packets(dsr.client) - before_rx_client

    earlier = _packets(before)
    moved = {addr: n - earlier.get(addr, 0) for addr, n in _packets(after).items()}
    assert all(n > 0 for n in moved.values()), f"some backend got no flow: {moved}"
    forwarded = after["totals"]["forwarded"]["packets"] - before["totals"]["forwarded"]["packets"]
    assert forwarded == sum(moved.values())
    assert forwarded >= 3 * connections  # SYN, ACK and data at least, per connection
    # Direct server return: the client got SYN-ACKs and echoes (>= 2 per connection) from
    # the VIP, yet the LB's device received little beyond what it forwarded (ARP/ND).
    assert rx_client >= 2 * connections
    assert rx_lb - forwarded < connections // 2, (rx_lb, forwarded, rx_client)
    if dsr.decap == "xdp":  # every packet the LB sent was decapsulated by a backend
        decapsulated = sum(
            json.loads(lb_cli("decap", "stats", "eth0", "--netns", ns, "-o", "json").stdout)[
                "decapsulated"
            ]
            for ns, _ in dsr.backends
        )
        assert decapsulated == after["totals"]["forwarded"]["packets"]


def test_established_connections_survive_backend_changes(dsr: Dsr) -> None:
    socks = _open(dsr, 24)
    try:
        for sock in socks:
            _echo(sock, b"before")
        # A fourth backend: the new table sends ~1/4 of these flows elsewhere, where they
        # would be reset; conntrack keeps them on their backend.
        add_backend(dsr, "b4", dsr.spare_ip)
        lb_cli("backend", "add", dsr.vip_arg, dsr.spare_ip)
        for sock in socks:
            _echo(sock, b"after add")
        fresh = _open(dsr, 24)  # new connections use all four
        for sock in fresh:
            _echo(sock, b"new")
            sock.close()
        assert _packets(lb_state())[dsr.spare_ip] > 0, "no new flow went to the added backend"
        # Removing a backend moves only its own flows: the others keep echoing.
        gone = dsr.backends[0][1]
        lb_cli("backend", "delete", dsr.vip_arg, gone)
        survivors = [s for s in socks if _backend_of(dsr, s) != gone]
        assert 0 < len(survivors) < len(socks)
        for sock in survivors:
            _echo(sock, b"after delete")
    finally:
        for sock in socks:
            sock.close()


def _backend_of(dsr: Dsr, sock: socket.socket) -> str:
    """The backend that serves a connection, by the Python reference of the datapath's
    choice when the connection was opened (three backends, M = 16381)."""
    from ipaddress import ip_address

    from membrane.lb.flowhash import flow_hash
    from membrane.lb.maglev import DEFAULT_SIZE, build_table

    names = [address for _, address in dsr.backends]
    src, sport = sock.getsockname()[:2]
    hashed = flow_hash([ip_address(src)], [ip_address(dsr.vip)], [sport], [PORT], [6])
    return names[build_table(names, DEFAULT_SIZE)[int(hashed[0]) % DEFAULT_SIZE]]


def test_bad_input_exits_2_naming_the_field_and_changes_nothing(dsr: Dsr) -> None:
    before = lb_cli("list", "-o", "json").stdout
    cli.user_error(lb_cli("vip", "add", "198.19.0.10:80/icmp", check=False), "VIP")
    cli.user_error(lb_cli("vip", "add", dsr.vip_arg, check=False), "VIP", "exists")
    cli.user_error(lb_cli("backend", "add", dsr.vip_arg, "2001:db8::1", check=False), "ADDR")
    cli.user_error(
        lb_cli("backend", "add", dsr.vip_arg, dsr.backends[0][1], "--weight", "0", check=False),
        "--weight",
    )
    cli.user_error(lb_cli("backend", "delete", dsr.vip_arg, "198.18.0.250", check=False), "ADDR")
    cli.user_error(
        lb_cli("vip", "add", "198.19.0.11:80/tcp", "--maglev-size", "16384", check=False),
        "--maglev-size",
    )
    cli.user_error(lb_cli("attach", "eth0", "--netns", dsr.lb, check=False), "DEV")
    cli.user_error(lb_cli("vip", "add", "nonsense", check=False), "VIP")
    assert lb_cli("list", "-o", "json").stdout == before
    unprivileged = subprocess.run(
        [*cli.WITHOUT_CAPABILITIES, *MEMBRANE, "list"], capture_output=True, text=True, check=False
    )
    cli.user_error(unprivileged, "root")


def test_detach_removes_program_and_pins(dsr: Dsr) -> None:
    lb_cli("detach")
    with inside(dsr.lb), IPRoute() as ipr:
        link = ipr.get_links(ipr.link_lookup(ifname="eth0")[0])[0]
    xdp = link.get_attr("IFLA_XDP")
    assert xdp is None or not xdp.get_attr("IFLA_XDP_PROG_ID")
    assert not os.path.exists(LB_ROOT)
    cli.user_error(lb_cli("list", check=False), "no load balancer")
    # the VIP is no longer balanced: nothing answers for it now
    with inside(dsr.client):
        sock = socket.socket(socket.AF_INET if dsr.family == 4 else socket.AF_INET6)
        sock.settimeout(0.5)
        with pytest.raises(OSError):
            sock.connect((dsr.vip, PORT))
        sock.close()


def test_bulk_transfer_through_the_lb(dsr: Dsr) -> None:
    """Megabytes each way: the client's TSO frames reach the LB whole (generic XDP on a
    veth), are forwarded as such, and are segmented further on; a full-sized segment that
    encapsulation makes too big for the path is answered with ICMP fragmentation needed,
    which the client's PMTU discovery follows. The echo must come back byte for byte."""
    (sock,) = _open(dsr, 1)
    sock.settimeout(TIMEOUT)
    data = bytes(range(256)) * (4 * 4096)  # 4 MiB
    with sock:
        assert echoed_while_sent(sock, data, timeout=4 * TIMEOUT) == data
