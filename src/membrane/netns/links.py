"""Devices, addresses and routes inside a namespace, through pyroute2 (netlink).

Every function enters the namespace on the calling thread only (`inside`), so nothing is
ever created in, or moved through, the namespace the program itself runs in.
"""

from __future__ import annotations

from ipaddress import IPv4Interface, IPv4Network, ip_interface, ip_network

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

from membrane.netns.namespace import inside, path

_ENODEV = 19


def _index(ipr: IPRoute, ns: str, dev: str) -> int:
    found = ipr.link_lookup(ifname=dev)
    if not found:
        raise LookupError(f"no device {dev!r} in network namespace {ns}")
    return found[0]


def find_link(ipr: IPRoute, dev: str) -> ifinfmsg | None:
    """`dev` in the namespace `ipr` was opened in, or None: for callers holding a socket."""
    try:
        return ipr.link("get", ifname=dev)[0]
    except NetlinkError as e:
        if e.code == _ENODEV:
            return None
        raise


def add_veth(ns: str, dev: str, peer_ns: str, peer_dev: str) -> None:
    """Create a veth pair with `dev` in `ns` and `peer_dev` in `peer_ns`, both down.
    The peer is born in its namespace (IFLA_NET_NS_FD), never in ours."""
    with inside(ns), IPRoute() as ipr:
        ipr.link(
            "add", ifname=dev, kind="veth", peer={"ifname": peer_dev, "net_ns_fd": path(peer_ns)}
        )


def delete_link(ns: str, dev: str) -> None:
    """Delete `dev` (a veth takes its peer along); a device already gone is not an error,
    so cleanup can always call this."""
    with inside(ns), IPRoute() as ipr:
        found = ipr.link_lookup(ifname=dev)
        if not found:
            return
        try:
            ipr.link("del", index=found[0])
        except NetlinkError as e:
            if e.code != _ENODEV:
                raise


def set_up(ns: str, dev: str) -> None:
    with inside(ns), IPRoute() as ipr:
        ipr.link("set", index=_index(ipr, ns, dev), state="up")


def add_address(ns: str, dev: str, address: str | IPv4Interface) -> None:
    """Add `address` in CIDR form ("198.18.7.1/24") to `dev`."""
    iface = ip_interface(address)
    with inside(ns), IPRoute() as ipr:
        ipr.addr(
            "add",
            index=_index(ipr, ns, dev),
            address=str(iface.ip),
            prefixlen=iface.network.prefixlen,
        )


def add_route(
    ns: str, dst: str | IPv4Network, *, via: str | None = None, dev: str | None = None
) -> None:
    """Route `dst` ("198.18.9.0/24", or "default") via a gateway and/or out of a device."""
    if via is None and dev is None:
        raise ValueError("a route needs a gateway (via) or a device (dev)")
    spec: dict[str, object] = {"dst": "default" if dst == "default" else str(ip_network(dst))}
    with inside(ns), IPRoute() as ipr:
        if via is not None:
            spec["gateway"] = via
        if dev is not None:
            spec["oif"] = _index(ipr, ns, dev)
        ipr.route("add", **spec)


def kind_here(ifindex: int) -> str:
    """The link kind (veth, vxlan, ...; "" for plain NICs) of a device in the namespace the
    calling thread is in: callers that already entered one use this."""
    with IPRoute() as ipr:
        links = ipr.get_links(ifindex)
    info = links[0].get_attr("IFLA_LINKINFO") if links else None
    return (info.get_attr("IFLA_INFO_KIND") or "") if info else ""
