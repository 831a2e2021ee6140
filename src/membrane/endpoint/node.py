"""The node side of the pod network: the namespace that routes between pods, the node and
the outside world.

Pods use the node IP as their gateway. It lives on a device of its own, `membrane_host`,
rather than on any pod's veth, so that it exists before the first pod and does not depend
on any one pod; it is also the address the "host" identity stands for. `membrane_host` is
one end of a veth pair (the other is `membrane_net`), as Cilium's cilium_host/cilium_net:
a dummy device would do, but our kernels are built without CONFIG_DUMMY.
"""

from __future__ import annotations

import errno
import re
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from socket import AF_INET, AF_INET6

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.ifinfmsg import IFF_UP, ifinfmsg

from membrane import netns
from membrane.netns.addresses import AddressDump

HOST_DEVICE = "membrane_host"
HOST_PEER = "membrane_net"
DEFAULT_NODE_IP = IPv4Address("198.19.0.1")
_IFA_F_NODAD = 0x02

# Forward between pods and the outside; no reverse-path filter, which drops packets that
# arrive on another device than the route back to their source uses (asymmetric paths are
# normal once the datapath redirects packets).
_NODE_SYSCTLS = {
    "net.ipv4.ip_forward": 1,
    "net.ipv4.conf.all.rp_filter": 0,
    "net.ipv4.conf.default.rp_filter": 0,
}
_NODE_SYSCTLS_V6 = {"net.ipv6.conf.all.forwarding": 1}


@dataclass(frozen=True)
class NodeInfo:
    """Where the node side lives (a named namespace, or None for the namespace we run in:
    a real node) and the node IPs pods route through (node_ip6 None: IPv4 only)."""

    node_netns: str | None
    node_ip: IPv4Address
    node_ip6: IPv6Address | None = None

    def inside(self) -> AbstractContextManager[None]:
        """Run the body with this thread in the node namespace (sockets opened there stay
        there)."""
        return nullcontext() if self.node_netns is None else netns.inside(self.node_netns)

    def host_addresses(self, dump: AddressDump | None = None) -> list[IPv4Address | IPv6Address]:
        """Every address of the node namespace (IPv6 too on a dual-stack node, link-local
        ones left out: they name a link, not the node): what the ipcache maps to the host
        identity. `dump`: an AddressDump opened in the node namespace, for a caller that
        asks often (every pod's veth adds a link-local address to read past)."""
        families = (AF_INET, AF_INET6) if self.node_ip6 is not None else (AF_INET,)
        if dump is None:
            with self.inside(), AddressDump() as own:
                return self.host_addresses(own)
        found = {
            addr for family in families for addr in dump.addresses(family) if not addr.is_link_local
        }
        return sorted(found, key=lambda a: (a.version, a))

    def address_dump(self) -> AddressDump:
        """An AddressDump of the node namespace (the caller closes it)."""
        with self.inside():
            return AddressDump()


def setup_node(
    node_netns: str | None,
    node_ip: IPv4Address = DEFAULT_NODE_IP,
    node_ip6: IPv6Address | None = None,
) -> NodeInfo:
    """Prepare the node side (dual-stack when `node_ip6` is given); safe to call again on
    a prepared node (an agent restart): it only adds what is missing and never removes or
    re-creates anything."""
    if node_netns is not None and not netns.exists(node_netns):
        netns.create(node_netns)
    node = NodeInfo(node_netns, IPv4Address(node_ip), node_ip6 and IPv6Address(node_ip6))
    with node.inside(), IPRoute() as ipr:
        _ensure_up(ipr, ipr.link("get", ifname="lo")[0])
        _ensure_host_device(ipr, node.node_ip, node.node_ip6)
        sysctls = {**_NODE_SYSCTLS, **(_NODE_SYSCTLS_V6 if node.node_ip6 else {})}
        for key, value in sysctls.items():
            netns.write_sysctl(key, value)
    return node


def delete_node_link(node: NodeInfo, ifname: str, ifindex: int | None = None) -> bool:
    """Delete device `ifname` of the node namespace (a veth takes its peer along); False
    when it was already gone, so cleanup paths can always call this. `ifindex`: only if
    `ifname` is still that device (not another one made under its name since)."""
    with node.inside(), IPRoute() as ipr:
        link = netns.find_link(ipr, ifname)
        if link is None or (ifindex is not None and link["index"] != ifindex):
            return False
        return _delete_link(ipr, link["index"])


def delete_node_links_named(node: NodeInfo, names: re.Pattern[str]) -> list[str]:
    """Delete every device of the node namespace whose whole name matches `names` (a veth
    takes its peer along); returns the names deleted."""
    deleted = []
    with node.inside(), IPRoute() as ipr:
        for link in ipr.get_links():
            name = link.get_attr("IFLA_IFNAME")
            if names.fullmatch(name or "") and _delete_link(ipr, link["index"]):
                deleted.append(name)
    return deleted


def _delete_link(ipr: IPRoute, index: int) -> bool:
    """Delete device `index`; False when it is gone already (with a veth peer deleted
    meanwhile, say)."""
    try:
        ipr.link("del", index=index)
    except NetlinkError as e:
        if e.code != errno.ENODEV:
            raise
        return False
    return True


def _ensure_up(ipr: IPRoute, link: ifinfmsg) -> None:
    if not link["flags"] & IFF_UP:
        ipr.link("set", index=link["index"], state="up")


def _ensure_host_device(ipr: IPRoute, node_ip: IPv4Address, node_ip6: IPv6Address | None) -> None:
    host = netns.find_link(ipr, HOST_DEVICE)
    if host is None:
        ipr.link("add", ifname=HOST_DEVICE, kind="veth", peer={"ifname": HOST_PEER})
        netns.disable_ipv6(HOST_DEVICE, HOST_PEER)  # while down: never gets an address
        host = ipr.link("get", ifname=HOST_DEVICE)[0]
    if node_ip6 is not None:
        netns.enable_ipv6(HOST_DEVICE)  # an agent restart may turn it on for a node IPv6
        present6 = {
            a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=host["index"], family=AF_INET6)
        }
        if str(node_ip6) not in present6:
            ipr.addr(
                "add", index=host["index"], address=str(node_ip6), prefixlen=128,
                flags=_IFA_F_NODAD,
            )  # fmt: skip
    peer = netns.find_link(ipr, HOST_PEER)
    if peer is None or peer["index"] != host.get_attr("IFLA_LINK"):
        raise RuntimeError(f"{HOST_DEVICE} exists but is not a veth paired with {HOST_PEER}")
    present = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=host["index"], family=AF_INET)}
    if str(node_ip) not in present:
        ipr.addr("add", index=host["index"], address=str(node_ip), prefixlen=32)
    _ensure_up(ipr, host)
    _ensure_up(ipr, peer)
