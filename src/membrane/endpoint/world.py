"""The outside world, for tests and the demo: a namespace attached to the node by a veth,
standing for the hosts beyond the node (identity "world" to the datapath).

    node (198.19.1.1/30) ──veth── external (198.19.1.2/30, + extra /32s such as 198.19.2.10)

and, on a dual-stack node, the same in IPv6 (a /64 link such as 2001:db8:ffff:1::/64, the
node ::1, the host ::2, extra /128s).

The external host routes everything via the node, and the node routes each extra address
back via the external host, so a test can send "from" several outside addresses (to check
CIDR rules with exceptions, for example) by binding its socket to one of them.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from pyroute2 import IPRoute

from membrane import netns
from membrane.endpoint.node import NodeInfo, delete_node_link

EXTERNAL_IFNAME = "eth0"


@dataclass(frozen=True)
class ExternalHost:
    netns: str
    ip: IPv4Address  # on the link, in link_net
    extra_ips: tuple[IPv4Address, ...]
    link_net: IPv4Network
    node_ifname: str  # the node's end of the link
    node_side_ip: IPv4Address  # the external host's gateway
    ip6: IPv6Address | None = None  # on link_net6 (dual-stack nodes)
    extra_ips6: tuple[IPv6Address, ...] = ()
    link_net6: IPv6Network | None = None

    @property
    def source_ips(self) -> tuple[IPv4Address | IPv6Address, ...]:
        """Every address traffic from this host can come from."""
        v6 = () if self.ip6 is None else (self.ip6, *self.extra_ips6)
        return (self.ip, *self.extra_ips, *v6)


def add_external_host(
    node: NodeInfo,
    netns_name: str,
    host_ip: IPv4Address,
    link_net: IPv4Network,
    extra_ips: Iterable[IPv4Address] = (),
    node_ifname: str | None = None,
    link_net6: IPv6Network | None = None,
    extra_ips6: Iterable[IPv6Address] = (),
) -> ExternalHost:
    """Create namespace `netns_name` with `host_ip` on a veth to the node, whose end takes
    the first other host address of `link_net`; `node_ifname` defaults to a name derived
    from `netns_name`. With `link_net6` (the node must be dual-stack) the link carries IPv6
    too: the node ::1, the host ::2. Undo with `remove_external_host`; a failure half-way
    removes what was created before it raises."""
    host_ip, link_net = IPv4Address(host_ip), IPv4Network(link_net)
    edges = (link_net.network_address, link_net.broadcast_address)
    if link_net.prefixlen > 30 or host_ip not in link_net or host_ip in edges:
        raise ValueError(f"{host_ip} must be a host address of {link_net} (a /30 or larger)")
    first = link_net.network_address + 1
    ext = ExternalHost(
        netns=netns_name,
        ip=host_ip,
        extra_ips=tuple(IPv4Address(a) for a in extra_ips),
        link_net=link_net,
        node_ifname=node_ifname or f"ext{zlib.crc32(netns_name.encode()):08x}",
        node_side_ip=first if host_ip != first else first + 1,
        ip6=None if link_net6 is None else IPv6Network(link_net6)[2],
        extra_ips6=tuple(IPv6Address(a) for a in extra_ips6),
        link_net6=None if link_net6 is None else IPv6Network(link_net6),
    )
    if ext.link_net6 is not None and node.node_ip6 is None:
        raise ValueError("an IPv6 link to the outside needs a dual-stack node")
    netns.create(netns_name)
    link_made = False
    try:
        with netns.inside(ext.netns):
            if ext.ip6 is None:
                netns.disable_ipv6("all", "default")
            else:
                netns.enable_ipv6("all", "default")
            ext_ipr = IPRoute()
        with ext_ipr, node.inside(), IPRoute() as node_ipr:
            node_ipr.link(
                "add",
                ifname=ext.node_ifname,
                kind="veth",
                peer={"ifname": EXTERNAL_IFNAME, "net_ns_fd": netns.path(ext.netns)},
            )
            link_made = True
            if ext.ip6 is None:
                netns.disable_ipv6(ext.node_ifname)
            else:
                netns.enable_ipv6(ext.node_ifname)
            _plumb(node_ipr, ext_ipr, ext)
            if ext.ip6 is not None:
                _plumb6(node_ipr, ext_ipr, ext)
    except BaseException:
        if link_made:
            delete_node_link(node, ext.node_ifname)
        netns.delete(netns_name)
        raise
    return ext


def _plumb(node_ipr: IPRoute, ext_ipr: IPRoute, ext: ExternalHost) -> None:
    prefixlen = ext.link_net.prefixlen
    index = node_ipr.link_lookup(ifname=ext.node_ifname)[0]
    node_ipr.addr("add", index=index, address=str(ext.node_side_ip), prefixlen=prefixlen)
    node_ipr.link("set", index=index, state="up")
    for extra in ext.extra_ips:
        node_ipr.route("add", dst=f"{extra}/32", gateway=str(ext.ip), oif=index)

    eth0 = ext_ipr.link_lookup(ifname=EXTERNAL_IFNAME)[0]
    ext_ipr.addr("add", index=eth0, address=str(ext.ip), prefixlen=prefixlen)
    ext_ipr.link("set", index=eth0, state="up")
    lo = ext_ipr.link_lookup(ifname="lo")[0]
    for extra in ext.extra_ips:  # on lo: local to the host whichever link a packet uses
        ext_ipr.addr("add", index=lo, address=str(extra), prefixlen=32)
    # Everything beyond the link (pods, the node IP, service addresses) is via the node.
    ext_ipr.route("add", dst="0.0.0.0/0", gateway=str(ext.node_side_ip), oif=eth0)


def _plumb6(node_ipr: IPRoute, ext_ipr: IPRoute, ext: ExternalHost) -> None:
    assert ext.link_net6 is not None and ext.ip6 is not None
    nodad = 0x02  # IFA_F_NODAD: usable at once
    index = node_ipr.link_lookup(ifname=ext.node_ifname)[0]
    gateway = ext.link_net6[1]
    node_ipr.addr("add", index=index, address=str(gateway), prefixlen=64, flags=nodad)
    for extra in ext.extra_ips6:
        node_ipr.route("add", dst=f"{extra}/128", gateway=str(ext.ip6), oif=index)
    eth0 = ext_ipr.link_lookup(ifname=EXTERNAL_IFNAME)[0]
    ext_ipr.addr("add", index=eth0, address=str(ext.ip6), prefixlen=64, flags=nodad)
    lo = ext_ipr.link_lookup(ifname="lo")[0]
    for extra in ext.extra_ips6:
        ext_ipr.addr("add", index=lo, address=str(extra), prefixlen=128)
    ext_ipr.route("add", dst="::/0", gateway=str(gateway), oif=eth0)


def remove_external_host(node: NodeInfo, ext: ExternalHost) -> None:
    """Delete the link (its routes go with it) and the namespace; what is already gone is
    skipped."""
    delete_node_link(node, ext.node_ifname)
    netns.delete(ext.netns)
