"""Pod plumbing without BPF: pods reach each other, the node and the outside world through
the node namespace; deleting leaves nothing behind; an agent restart's re-setup changes
nothing and breaks no connection; a restarted agent can tell an intact pod from a broken one.

Every test builds its own node namespace (never the machine's own networking) and registers
every cleanup with the Topology, so a failing test leaves nothing behind either."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network, IPv6Address

import pytest
from pyroute2 import IPRoute

from membrane import netns
from membrane.endpoint import (
    HOST_DEVICE,
    NodeInfo,
    PodLink,
    add_external_host,
    create_pod,
    delete_node_link,
    delete_pod,
    inspect_pod,
    make_warm_pair,
    pod_exists,
    pod_problem,
    remove_external_host,
    setup_node,
)
from membrane.netns import Topology

pytestmark = pytest.mark.root

A = IPv4Address
NODE_IP = A("198.19.0.1")


@pytest.fixture
def node(topology: Topology) -> NodeInfo:
    name = f"{topology.tag}-node"
    topology.callback(netns.delete, name)
    return setup_node(name, NODE_IP)


def _pod(topology: Topology, node: NodeInfo, n: int) -> PodLink:
    """Pod number `n`: namespace <tag>-pod<n>, host veth mbr<n>, address 198.18.0.<n>."""
    name, ifname = f"{topology.tag}-pod{n}", f"mbr{n}"
    topology.callback(delete_pod, node, name, ifname)
    return create_pod(node, name, ifname, A(f"198.18.0.{n}"))


def _connect(
    server_ns: str, server_ip: IPv4Address, client_ns: str, source: IPv4Address | None = None
) -> tuple[socket.socket, socket.socket, str]:
    """A TCP connection from `client_ns` (from `source`, if given) to a listener in
    `server_ns`; returns both ends and the client address as the server sees it."""
    with netns.inside(server_ns):
        listener = socket.create_server((str(server_ip), 0))
    with listener, netns.inside(client_ns):
        client = socket.socket()
        client.settimeout(5)
        if source is not None:
            client.bind((str(source), 0))
        client.connect(listener.getsockname())
        listener.settimeout(5)
        server, (peer, _) = listener.accept()
    server.settimeout(5)
    return client, server, peer


def _exchange(a: socket.socket, b: socket.socket) -> None:
    a.sendall(b"ping")
    assert b.recv(4) == b"ping"
    b.sendall(b"pong")
    assert a.recv(4) == b"pong"


def _ip_json(ns: str, *args: str) -> list[dict]:
    """`ip -j ARGS` through `ip netns exec`, which must work on every namespace we make."""
    argv = ["ip", "netns", "exec", ns, "ip", "-j", *args]
    return json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)


def test_pods_reach_each_other_and_the_node(topology: Topology, node: NodeInfo) -> None:
    a, b = _pod(topology, node, 10), _pod(topology, node, 11)
    netns.wait_ping(a.netns, str(b.ipv4), timeout=5)
    netns.wait_ping(b.netns, str(a.ipv4), timeout=5)
    netns.wait_ping(a.netns, str(NODE_IP), timeout=5)
    netns.wait_ping(node.node_netns, str(b.ipv4), timeout=5)

    client, server, peer = _connect(b.netns, b.ipv4, a.netns)
    with client, server:
        assert peer == str(a.ipv4)  # routed, not masqueraded
        _exchange(client, server)
    client, server, peer = _connect(node.node_netns, NODE_IP, a.netns)
    with client, server:
        assert peer == str(a.ipv4)
        _exchange(client, server)


def test_pod_is_laid_out_as_promised_and_works_with_ip_netns_exec(
    topology: Topology, node: NodeInfo
) -> None:
    pod = _pod(topology, node, 12)
    assert len(pod.host_ifname) <= 15 and pod.netns in netns.names()

    (eth0,) = _ip_json(pod.netns, "addr", "show", "eth0")
    assert eth0["address"] == pod.pod_mac and "UP" in eth0["flags"]
    assert [(a["family"], a["local"], a["prefixlen"]) for a in eth0["addr_info"]] == [
        ("inet", str(pod.ipv4), 32)
    ]
    routes = {(r["dst"], r.get("gateway"), r["dev"]) for r in _ip_json(pod.netns, "route")}
    assert routes == {("default", str(NODE_IP), "eth0"), (str(NODE_IP), None, "eth0")}
    assert _ip_json(pod.netns, "-6", "addr") == []  # no IPv6 anywhere in the pod

    (host,) = _ip_json(node.node_netns, "addr", "show", pod.host_ifname)
    assert host["ifindex"] == pod.host_ifindex and host["address"] == pod.host_mac
    assert host["addr_info"] == []  # no IPv6 link-local on the node's end either
    (route,) = _ip_json(node.node_netns, "route", "show", f"{pod.ipv4}/32")
    assert (route["dev"], route["prefsrc"]) == (pod.host_ifname, str(NODE_IP))


def test_external_host_reaches_pods_from_every_source(topology: Topology, node: NodeInfo) -> None:
    pod = _pod(topology, node, 20)
    extras = (A("198.19.2.10"), A("198.19.3.10"))
    ext = add_external_host(
        node, f"{topology.tag}-ext", A("198.19.1.2"), IPv4Network("198.19.1.0/30"), extras
    )
    topology.callback(remove_external_host, node, ext)
    assert ext.node_side_ip == A("198.19.1.1") and ext.source_ips == (ext.ip, *extras)

    netns.wait_ping(pod.netns, str(ext.ip), timeout=5)
    netns.wait_ping(ext.netns, str(NODE_IP), timeout=5)
    for source in ext.source_ips:
        client, server, peer = _connect(pod.netns, pod.ipv4, ext.netns, source)
        with client, server:
            assert peer == str(source)
            _exchange(client, server)
        client, server, peer = _connect(ext.netns, source, pod.netns)  # and the other way
        with client, server:
            assert peer == str(pod.ipv4)
            _exchange(client, server)

    with pytest.raises(ValueError, match="host address"):
        add_external_host(node, f"{topology.tag}-x", A("198.19.5.2"), IPv4Network("198.19.1.0/30"))
    assert not netns.exists(f"{topology.tag}-x")

    remove_external_host(node, ext)
    assert not netns.exists(ext.netns)
    with node.inside(), IPRoute() as ipr:
        assert not ipr.link_lookup(ifname=ext.node_ifname)


def test_delete_leaves_nothing_behind(topology: Topology, node: NodeInfo) -> None:
    with node.inside(), IPRoute() as ipr:
        links_before = {link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
    pod = _pod(topology, node, 30)
    netns.wait_ping(pod.netns, str(NODE_IP), timeout=5)

    delete_pod(node, pod.netns, pod.host_ifname)
    assert not netns.exists(pod.netns) and pod.netns not in netns.names()
    with node.inside(), IPRoute() as ipr:
        assert {link.get_attr("IFLA_IFNAME") for link in ipr.get_links()} == links_before
        assert str(pod.ipv4) not in {r.get_attr("RTA_DST") for r in ipr.get_routes()}
    delete_pod(node, pod.netns, pod.host_ifname)  # a second delete is a no-op

    netns.create(pod.netns)  # half-created: only the namespace exists
    delete_pod(node, pod.netns, pod.host_ifname)
    assert not netns.exists(pod.netns)


def test_failed_create_rolls_back_and_leaves_other_pods_alone(
    topology: Topology, node: NodeInfo
) -> None:
    first = _pod(topology, node, 40)
    other_ns = f"{topology.tag}-other"
    topology.callback(netns.delete, other_ns)

    with pytest.raises(ValueError, match="invalid host interface name"):
        create_pod(node, other_ns, "mbr-much-too-long", A("198.18.0.41"))
    assert not netns.exists(other_ns)

    with pytest.raises(FileExistsError, match=first.host_ifname):  # device name taken
        create_pod(node, other_ns, first.host_ifname, A("198.18.0.41"))
    assert not netns.exists(other_ns)

    with pytest.raises(FileExistsError, match=str(first.ipv4)):  # fails half-way: address taken
        create_pod(node, other_ns, "mbr41", first.ipv4)
    assert not netns.exists(other_ns)
    with node.inside(), IPRoute() as ipr:
        assert not ipr.link_lookup(ifname="mbr41")

    with pytest.raises(FileExistsError):  # namespace name taken: the pod keeps it
        create_pod(node, first.netns, "mbr42", A("198.18.0.42"))
    assert pod_exists(node, first)
    netns.wait_ping(first.netns, str(NODE_IP), timeout=5)


def test_setup_node_again_changes_nothing_and_keeps_connections(
    topology: Topology, node: NodeInfo
) -> None:
    a, b = _pod(topology, node, 50), _pod(topology, node, 51)
    client, server, _ = _connect(b.netns, b.ipv4, a.netns)
    with client, server:
        _exchange(client, server)
        before = [_ip_json(node.node_netns, *what) for what in (("addr",), ("route",))]

        again = setup_node(node.node_netns, NODE_IP)  # what a restarted agent does

        assert again == node
        assert [_ip_json(node.node_netns, *what) for what in (("addr",), ("route",))] == before
        assert pod_exists(node, a) and pod_exists(node, b)
        _exchange(client, server)

    with node.inside():
        assert netns.read_sysctl("net.ipv4.ip_forward") == "1"
        assert netns.read_sysctl("net.ipv4.conf.all.rp_filter") == "0"
        assert netns.read_sysctl("net.ipv4.conf.default.rp_filter") == "0"
    assert node.host_addresses() == [A("127.0.0.1"), NODE_IP]
    (host,) = _ip_json(node.node_netns, "addr", "show", HOST_DEVICE)
    assert [(x["local"], x["prefixlen"]) for x in host["addr_info"]] == [(str(NODE_IP), 32)]


def test_inspect_tells_an_intact_pod_from_a_broken_one(topology: Topology, node: NodeInfo) -> None:
    pod = _pod(topology, node, 60)
    where = (node, pod.netns, pod.host_ifname)
    assert inspect_pod(*where) == pod == inspect_pod(*where, pod.ipv4)
    assert pod_exists(node, pod) and pod_problem(*where) is None
    assert inspect_pod(*where, A("198.18.0.61")) is None
    assert "lacks 198.18.0.61" in pod_problem(*where, A("198.18.0.61"))
    assert not pod_exists(node, replace(pod, host_ifindex=pod.host_ifindex + 100))

    with node.inside(), IPRoute() as ipr:
        ipr.route("del", dst=f"{pod.ipv4}/32", oif=pod.host_ifindex, scope=253)
    assert "does not route" in pod_problem(*where) and not pod_exists(node, pod)

    with netns.inside(pod.netns), IPRoute() as ipr:
        eth0 = ipr.link_lookup(ifname="eth0")[0]
        ipr.addr("del", index=eth0, address=str(pod.ipv4), prefixlen=32)
    assert "lacks a /32 address" in pod_problem(*where)

    netns.delete_link(node.node_netns, pod.host_ifname)
    assert pod_problem(*where) == f"host veth {pod.host_ifname} is gone"

    netns.delete(pod.netns)
    assert pod_problem(*where) == f"network namespace {pod.netns} is gone"
    assert inspect_pod(*where) is None


def test_node_in_the_current_namespace_is_only_read() -> None:
    """The real-node case (no node namespace) is not set up on this machine: only check
    that a NodeInfo for the current namespace reads it and leaves the thread where it is."""
    home = os.stat("/proc/thread-self/ns/net").st_ino
    addresses = NodeInfo(None, NODE_IP).host_addresses()
    assert A("127.0.0.1") in addresses
    assert os.stat("/proc/thread-self/ns/net").st_ino == home


_IPV6_SYSCTLS = ("disable_ipv6", "accept_ra", "autoconf", "accept_dad")


def _eth0_ipv6_sysctls(pod_ns: str) -> dict[str, str]:
    with netns.inside(pod_ns):
        return {k: netns.read_sysctl(f"net.ipv6.conf.eth0.{k}") for k in _IPV6_SYSCTLS}


@pytest.mark.parametrize("dual_stack", [False, True], ids=["ipv4", "dual-stack"])
def test_a_veth_made_ahead_is_moved_into_the_pod_with_the_pods_settings(
    topology: Topology, dual_stack: bool
) -> None:
    """make_warm_pair makes both ends in the node namespace (where the kernel gives them
    the node's `default` devconf); moved into the pod, eth0 registers anew there and has
    the pod namespace's settings, as an eth0 born in the pod does."""
    name = f"{topology.tag}-node"
    topology.callback(netns.delete, name)
    node6 = IPv6Address("2001:db8:ff::1") if dual_stack else None
    node = setup_node(name, NODE_IP, node6)
    with node.inside():  # the opposite of what a pod gets: a move must not keep these
        for key, value in {"disable_ipv6": 0, "accept_ra": 1, "autoconf": 1}.items():
            netns.write_sysctl(f"net.ipv6.conf.default.{key}", value)
    ip6 = IPv6Address("2001:db8:1::51") if dual_stack else None
    pair = make_warm_pair(node, "mbr51", "mbrw51", ipv6=dual_stack)
    topology.callback(delete_node_link, node, "mbr51")
    with node.inside():
        assert netns.read_sysctl("net.ipv6.conf.mbrw51.accept_ra") == "1"

    pod_ns = f"{topology.tag}-pod51"
    topology.callback(delete_pod, node, pod_ns, "mbr51")
    pod = create_pod(node, pod_ns, "mbr51", A("198.18.0.51"), ip6, warm=pair)
    assert (pod.host_ifindex, pod.host_mac, pod.pod_mac) == (
        pair.host_ifindex,
        pair.host_mac,
        pair.pod_mac,
    )
    assert inspect_pod(node, pod_ns, "mbr51", pod.ipv4, ip6) == pod
    with node.inside(), IPRoute() as ipr:
        assert not ipr.link_lookup(ifname="mbrw51")  # moved, under its pod name

    ns52 = f"{topology.tag}-pod52"
    topology.callback(delete_pod, node, ns52, "mbr52")
    ip6_52 = IPv6Address("2001:db8:1::52") if dual_stack else None
    born_there = create_pod(node, ns52, "mbr52", A("198.18.0.52"), ip6_52)
    expected = {"disable_ipv6": "1"} if not dual_stack else dict.fromkeys(_IPV6_SYSCTLS, "0")
    moved = _eth0_ipv6_sysctls(pod_ns)
    assert moved == _eth0_ipv6_sysctls(born_there.netns)
    assert {k: moved[k] for k in expected} == expected
    if not dual_stack:
        assert _ip_json(pod_ns, "-6", "addr") == []  # no link-local: it came up without IPv6
    netns.wait_ping(pod_ns, str(born_there.ipv4), timeout=5)


def test_a_veth_made_ahead_is_deleted_when_its_pod_cannot_be_made(
    topology: Topology, node: NodeInfo
) -> None:
    first = _pod(topology, node, 60)
    pair = make_warm_pair(node, "mbr61", "mbrw61", ipv6=False)
    topology.callback(delete_node_link, node, "mbr61")
    other_ns = f"{topology.tag}-other"
    topology.callback(netns.delete, other_ns)
    with pytest.raises(FileExistsError, match=str(first.ipv4)):  # the address is taken
        create_pod(node, other_ns, "mbr61", first.ipv4, warm=pair)
    assert not netns.exists(other_ns)
    with node.inside(), IPRoute() as ipr:
        assert not ipr.link_lookup(ifname="mbr61") and not ipr.link_lookup(ifname="mbrw61")
