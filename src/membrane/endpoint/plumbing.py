"""A pod's network plumbing: its namespace, the veth pair to the node, addresses and routes.

Layout (what Cilium does in its veth mode): the pod has `eth0` with its address as a /32
(and, dual-stack, its IPv6 address as a /128) and routes everything via the node IP (node
IPv6); the node has a host route per pod address out of the pod's host-side veth and
forwards between pods. No bridge, no shared subnet, so every packet between pods crosses
the node-side veth, where the datapath's tc programs sit. The pod reaches its gateways
through permanent neighbour entries; the node finds a pod's IPv6 address by neighbour
discovery (through the datapath, which lets it pass).

Speed matters (an endpoint add, BPF included, should take < 150 ms): no processes are
forked, each namespace gets one netlink socket, the veth is born with its peer already
in the pod (IFLA_NET_NS_FD), and sysctls are written through /proc/sys after setns().
Faster still, the agent makes the next pod's veth pair ahead (make_warm_pair: both ends
in the node namespace, programs attached to the host end while it idles), and the pod's
plumbing moves the peer into the pod (one netlink op) instead of making a pair.
"""

from __future__ import annotations

import errno
import os
import re
import socket
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from socket import AF_INET, AF_INET6

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.rtmsg import RTNH_F_ONLINK

from membrane import netns
from membrane.endpoint.node import NodeInfo, delete_node_link
from membrane.netns import disable_ipv6, enable_ipv6, find_link

POD_IFNAME = "eth0"
_IFNAME = re.compile(r"[A-Za-z0-9_-]{1,15}")  # IFNAMSIZ - 1, and safe in /proc/sys paths
_SCOPE_LINK = 253
_NUD_PERMANENT = 0x80
_IFA_F_NODAD = 0x02


@dataclass(frozen=True)
class PodLink:
    """What the agent records about a pod's plumbing (and checks after a restart)."""

    netns: str
    host_ifname: str
    host_ifindex: int  # in the node namespace
    pod_mac: str
    host_mac: str
    ipv4: IPv4Address
    ipv6: IPv6Address | None = None


@dataclass(frozen=True)
class WarmPair:
    """A veth pair made ahead of the pod that will use it (see make_warm_pair): both ends
    in the node namespace, down, the pod's end under a temporary name."""

    host_ifname: str
    host_ifindex: int
    peer_ifname: str
    peer_ifindex: int
    host_mac: str
    pod_mac: str
    ipv6: bool  # the host end is set up for a pod with an IPv6 address


class _NotIntact(Exception):
    """A piece of a pod's plumbing is missing; the message says which."""


def create_pod(
    node: NodeInfo,
    netns_name: str,
    host_ifname: str,
    ipv4: IPv4Address,
    ipv6: IPv6Address | None = None,
    *,
    reuse_netns: bool = False,
    warm: WarmPair | None = None,
) -> PodLink:
    """Create namespace `netns_name` (under /run/netns) with `eth0` holding `ipv4` (and
    `ipv6`: then the node must have a node IPv6), joined to the node by `host_ifname`. On
    failure everything created so far is removed again;
    an existing namespace or device of the same name raises FileExistsError untouched.
    `reuse_netns`: plumb a namespace that exists already (its processes keep running), and
    create it only if it does not. `warm`: the veth pair make_warm_pair made for this pod
    (named `host_ifname`, set up for `ipv6` or not); its pod end is moved into the
    namespace as eth0 instead of a new pair being made. On failure it is deleted too."""
    if not _IFNAME.fullmatch(host_ifname):
        raise ValueError(f"invalid host interface name {host_ifname!r}: 1-15 of [A-Za-z0-9_-]")
    ipv4 = IPv4Address(ipv4)
    ipv6 = None if ipv6 is None else IPv6Address(ipv6)
    if ipv6 is not None and node.node_ip6 is None:
        raise ValueError("a pod IPv6 address needs a node IPv6 address")
    if warm is not None and (warm.host_ifname != host_ifname or warm.ipv6 != (ipv6 is not None)):
        raise ValueError(f"the warm veth {warm.host_ifname} was not made for this pod")
    pod_mac, host_mac = (warm.pod_mac, warm.host_mac) if warm else (_random_mac(), _random_mac())
    made_netns = not (reuse_netns and netns.exists(netns_name))
    if made_netns:
        netns.create(netns_name)
    veth_made = warm is not None
    try:
        with netns.inside(netns_name):
            # Before eth0 exists, so it is born that way: without IPv6 (no link-local, no
            # DAD, no RS), or with IPv6 that takes no router advertisements.
            if ipv6 is None:
                disable_ipv6("all", "default")
            else:
                enable_ipv6("all", "default")
            pod_ipr = IPRoute()
        with pod_ipr, node.inside(), IPRoute() as node_ipr:
            try:
                if warm is None:
                    node_ipr.link(
                        "add",
                        ifname=host_ifname,
                        kind="veth",
                        address=host_mac,
                        peer={
                            "ifname": POD_IFNAME,
                            "address": pod_mac,
                            "net_ns_fd": netns.path(netns_name),
                        },
                    )
                else:
                    # One netlink op: into the pod's namespace, renamed there. It registers
                    # anew in that namespace, so it takes the `default` devconf set above.
                    node_ipr.link(
                        "set",
                        index=warm.peer_ifindex,
                        net_ns_fd=netns.path(netns_name),
                        ifname=POD_IFNAME,
                    )
            except NetlinkError as e:
                if e.code == errno.EEXIST:
                    raise FileExistsError(
                        f"device {host_ifname} (or {POD_IFNAME} in {netns_name}) already exists"
                    ) from None
                raise
            veth_made = True
            if warm is None:
                host_ifindex = socket.if_nametoindex(host_ifname)
                _quiet_host_end(host_ifname, ipv6 is not None)
            else:
                host_ifindex = warm.host_ifindex
            _plumb_node_side(node_ipr, node, host_ifindex, ipv4, ipv6)
            _plumb_pod_side(pod_ipr, node, ipv4, ipv6, host_mac)
    except BaseException:
        if veth_made:
            delete_node_link(node, host_ifname)
        if made_netns:
            netns.delete(netns_name)
        raise
    return PodLink(netns_name, host_ifname, host_ifindex, pod_mac, host_mac, ipv4, ipv6)


def make_warm_pair(node: NodeInfo, host_ifname: str, peer_ifname: str, ipv6: bool) -> WarmPair:
    """A veth pair for the next pod, made before it is asked for (what `create_pod` would
    make, minus the namespace it goes to): `host_ifname` and `peer_ifname` in the node
    namespace, both down, the host end set up for a pod with IPv6 (`ipv6`) or without.
    Programs can be attached to the host end now; `create_pod(..., warm=)` then moves the
    peer into the pod. Delete it with delete_node_link(node, host_ifname)."""
    for name in (host_ifname, peer_ifname):
        if not _IFNAME.fullmatch(name):
            raise ValueError(f"invalid interface name {name!r}: 1-15 of [A-Za-z0-9_-]")
    pod_mac, host_mac = _random_mac(), _random_mac()
    with node.inside(), IPRoute() as ipr:
        try:
            ipr.link(
                "add",
                ifname=host_ifname,
                kind="veth",
                address=host_mac,
                peer={"ifname": peer_ifname, "address": pod_mac},
            )
        except NetlinkError as e:
            if e.code == errno.EEXIST:
                raise FileExistsError(f"device {host_ifname} or {peer_ifname} exists") from None
            raise
        try:
            pair = WarmPair(
                host_ifname,
                socket.if_nametoindex(host_ifname),
                peer_ifname,
                socket.if_nametoindex(peer_ifname),
                host_mac,
                pod_mac,
                ipv6,
            )
            _quiet_host_end(host_ifname, ipv6)
        except BaseException:
            delete_node_link(node, host_ifname)
            raise
    return pair


def _quiet_host_end(host_ifname: str, ipv6: bool) -> None:
    """The node-side veth's IPv6, set while it is still down (the thread is in the node
    namespace): off, so it never gets an address, or on for the link-local address that
    speaks neighbour discovery with the pod."""
    if ipv6:
        enable_ipv6(host_ifname)
    else:
        disable_ipv6(host_ifname)


def _plumb_node_side(
    ipr: IPRoute, node: NodeInfo, host_ifindex: int, ipv4: IPv4Address, ipv6: IPv6Address | None
) -> None:
    ipr.link("set", index=host_ifindex, state="up")  # routes need the device up
    routes = [(f"{ipv4}/32", node.node_ip, ipv4)]
    if ipv6 is not None:
        routes.append((f"{ipv6}/128", node.node_ip6, ipv6))
    for dst, source, addr in routes:
        try:
            ipr.route("add", dst=dst, oif=host_ifindex, prefsrc=str(source), scope=_SCOPE_LINK)
        except NetlinkError as e:
            if e.code == errno.EEXIST:
                raise FileExistsError(f"the node already routes {addr} (another pod's?)") from None
            raise


def _plumb_pod_side(
    ipr: IPRoute, node: NodeInfo, ipv4: IPv4Address, ipv6: IPv6Address | None, host_mac: str
) -> None:
    eth0 = ipr.link_lookup(ifname=POD_IFNAME)[0]
    ipr.link("set", index=eth0, state="up")
    ipr.addr("add", index=eth0, address=str(ipv4), prefixlen=32)
    gateways = [(str(node.node_ip), "0.0.0.0/0", 32)]
    if ipv6 is not None:
        ipr.addr("add", index=eth0, address=str(ipv6), prefixlen=128, flags=_IFA_F_NODAD)
        gateways.append((str(node.node_ip6), "::/0", 128))
    for gateway, default, host_len in gateways:
        ipr.route("add", dst=f"{gateway}/{host_len}", oif=eth0, scope=_SCOPE_LINK)
        ipr.route("add", dst=default, gateway=gateway, oif=eth0, flags=RTNH_F_ONLINK)
        # The node IP lives on membrane_host, not on the veth: whether the node answers
        # ARP (or neighbour solicitations) for it on the veth depends on its settings. A
        # permanent entry makes the pod independent of them (and spares the first packet
        # a round trip).
        ipr.neigh("add", dst=gateway, lladdr=host_mac, ifindex=eth0, state=_NUD_PERMANENT)


def delete_pod(node: NodeInfo, netns_name: str, host_ifname: str) -> None:
    """Remove the pod's veth pair (and with it its routes) and its namespace. Pieces that
    are already gone are skipped, so this also clears a half-created or half-deleted pod."""
    delete_node_link(node, host_ifname)
    netns.delete(netns_name)


def inspect_pod(
    node: NodeInfo,
    netns_name: str,
    host_ifname: str,
    ipv4: IPv4Address | None = None,
    ipv6: IPv6Address | None = None,
) -> PodLink | None:
    """The pod's plumbing as it is now, or None when a piece is missing: the namespace, the
    host veth, its peer eth0, a /32 address on it (`ipv4`, if given) and `ipv6` as a /128
    (if given), the node's routes to them out of the host veth. What a restarted agent
    checks before adopting a pod; `pod_problem` says what is missing."""
    try:
        return _inspect(node, netns_name, host_ifname, ipv4, ipv6)
    except _NotIntact:
        return None


def pod_problem(
    node: NodeInfo,
    netns_name: str,
    host_ifname: str,
    ipv4: IPv4Address | None = None,
    ipv6: IPv6Address | None = None,
) -> str | None:
    """Why `inspect_pod` finds no intact pod (for the log), or None when it does."""
    try:
        _inspect(node, netns_name, host_ifname, ipv4, ipv6)
    except _NotIntact as e:
        return str(e)
    return None


def pod_exists(node: NodeInfo, recorded: PodLink) -> bool:
    """Whether the recorded pod is intact and still the same (same host ifindex and MACs:
    not deleted and re-created behind the recorder's back)."""
    found = inspect_pod(node, recorded.netns, recorded.host_ifname, recorded.ipv4, recorded.ipv6)
    return found == recorded


def _inspect(
    node: NodeInfo,
    netns_name: str,
    host_ifname: str,
    ipv4: IPv4Address | None,
    ipv6: IPv6Address | None,
) -> PodLink:
    if not netns.exists(netns_name):
        raise _NotIntact(f"network namespace {netns_name} is gone")
    with node.inside(), IPRoute() as node_ipr:
        host = find_link(node_ipr, host_ifname)
        if host is None:
            raise _NotIntact(f"host veth {host_ifname} is gone")
        try:
            with netns.inside(netns_name), IPRoute() as pod_ipr:
                eth0 = find_link(pod_ipr, POD_IFNAME)
                addrs = pod_ipr.get_addr(index=eth0["index"], family=AF_INET) if eth0 else []
                addrs6 = pod_ipr.get_addr(index=eth0["index"], family=AF_INET6) if eth0 else []
        except OSError as e:  # a stale file under /run/netns that is no namespace any more
            raise _NotIntact(f"network namespace {netns_name} cannot be entered: {e}") from None
        if eth0 is None or not _peers(eth0, host):
            raise _NotIntact(f"{POD_IFNAME} in {netns_name} is not the peer of {host_ifname}")
        pod_ips = [IPv4Address(a.get_attr("IFA_ADDRESS")) for a in addrs if a["prefixlen"] == 32]
        if ipv4 is not None:
            pod_ips = [ip for ip in pod_ips if ip == IPv4Address(ipv4)]
        if not pod_ips:
            raise _NotIntact(f"{POD_IFNAME} in {netns_name} lacks {ipv4 or 'a /32 address'}")
        if not _routes_via(node_ipr, pod_ips[0], host["index"]):
            raise _NotIntact(f"the node does not route {pod_ips[0]} out of {host_ifname}")
        pod_ip6 = None
        if ipv6 is not None:
            found6 = {IPv6Address(a.get_attr("IFA_ADDRESS")) for a in addrs6}
            if IPv6Address(ipv6) not in found6:
                raise _NotIntact(f"{POD_IFNAME} in {netns_name} lacks {ipv6}")
            if not _routes_via(node_ipr, IPv6Address(ipv6), host["index"]):
                raise _NotIntact(f"the node does not route {ipv6} out of {host_ifname}")
            pod_ip6 = IPv6Address(ipv6)
    return PodLink(
        netns_name,
        host_ifname,
        host["index"],
        eth0.get_attr("IFLA_ADDRESS"),
        host.get_attr("IFLA_ADDRESS"),
        pod_ips[0],
        pod_ip6,
    )


def _peers(a: ifinfmsg, b: ifinfmsg) -> bool:
    """Whether two veth ends (in different namespaces) are each other's peer."""
    return a.get_attr("IFLA_LINK") == b["index"] and b.get_attr("IFLA_LINK") == a["index"]


def _routes_via(ipr: IPRoute, dst: IPv4Address | IPv6Address, ifindex: int) -> bool:
    try:
        (route,) = ipr.route("get", dst=str(dst))
    except NetlinkError:  # unreachable: no route at all
        return False
    return route.get_attr("RTA_OIF") == ifindex


def _random_mac() -> str:
    """A locally administered unicast MAC, as the kernel would pick; choosing it here saves
    reading it back."""
    octets = bytearray(os.urandom(6))
    octets[0] = (octets[0] & 0xFC) | 0x02
    return ":".join(f"{b:02x}" for b in octets)
