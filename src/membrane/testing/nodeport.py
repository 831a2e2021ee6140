"""The outside of a node for NodePort tests: one L2 segment (a bridge in a namespace of its
own) joining the node's external device, a client host and other hosts that serve as
backends, so a backend host can answer a client directly (DSR) instead of through the node.

    node netns:   ext0 198.19.8.1/24 ─┐
    client host:  eth0 198.19.8.2/24 ─┼── br0 (fabric namespace)
    backend host: eth0 198.19.8.1x/24 ┘

The hosts route everything else (the node's address, pods) via the node's 198.19.8.1.
A DSR backend host also holds the frontend's address on lo and strips the node's
IPv4-in-IPv4 header with lb_decap (XDP; this kernel makes no ipip devices), as the
backends of `membrane lb` do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Network

from pyroute2 import IPRoute

from membrane import netns
from membrane.lb.decap import attach_decap, decap_counts, detach_decap
from membrane.netns import Topology, links
from membrane.netns.namespace import inside
from membrane.netns.sysctl import disable_ipv6, write_sysctl

SEGMENT = IPv4Network("198.19.8.0/24")
NODE_SIDE = "198.19.8.1"
CLIENT_IP = "198.19.8.2"
NODE_DEVICE = "ext0"


@dataclass
class Fabric:
    topo: Topology
    ns: str  # holds the bridge
    node_ns: str
    client: str  # the client host's namespace
    client_ip: str = CLIENT_IP
    hosts: dict[str, str] = field(default_factory=dict)  # backend host namespace -> address

    def _plug(self, ns: str, dev: str, port: str) -> None:
        self.topo.veth(ns, self.ns, names=(dev, port))
        with inside(self.ns), IPRoute() as ipr:
            bridge = ipr.link_lookup(ifname="br0")[0]
            ipr.link("set", index=ipr.link_lookup(ifname=port)[0], master=bridge)

    def _host(self, role: str, address: str) -> str:
        ns = self.topo.namespace(role)
        with inside(ns):
            disable_ipv6("all", "default")
        self._plug(ns, "eth0", f"p-{role}")
        links.add_address(ns, "eth0", f"{address}/{SEGMENT.prefixlen}")
        links.add_route(ns, "0.0.0.0/0", via=NODE_SIDE)
        return ns

    def add_backend_host(self, role: str, address: str, frontend: str | None = None) -> str:
        """A host on the segment; with `frontend` (an address), ready for DSR: the address
        on lo, no ARP answers for it, decapsulation on eth0."""
        ns = self._host(role, address)
        if frontend is not None:
            links.add_address(ns, "lo", f"{frontend}/32")
            with inside(ns):
                for dev in ("all", "default", "eth0"):
                    write_sysctl(f"net.ipv4.conf.{dev}.rp_filter", 0)
                write_sysctl("net.ipv4.conf.all.arp_ignore", 1)
                write_sysctl("net.ipv4.conf.all.arp_announce", 2)
            attach_decap("eth0", ns, "generic")
            self.topo.callback(detach_decap, "eth0", ns)
        self.hosts[ns] = address
        netns.wait_ping(self.node_ns, address)
        return ns

    def decapsulated(self, host_ns: str) -> int:
        """Packets lb_decap stripped on the host so far (DSR requests that reached it)."""
        return decap_counts("eth0", host_ns)["decapsulated"]


def build_fabric(topo: Topology, node_ns: str) -> Fabric:
    """The segment, the node's ext0 on it and the client host."""
    fabric_ns = topo.namespace("fabric")
    with inside(fabric_ns), IPRoute() as ipr:
        disable_ipv6("all", "default")
        ipr.link("add", ifname="br0", kind="bridge")
        ipr.link("set", index=ipr.link_lookup(ifname="br0")[0], state="up")
    fabric = Fabric(topo, fabric_ns, node_ns, "")
    fabric._plug(node_ns, NODE_DEVICE, "p-node")
    links.add_address(node_ns, NODE_DEVICE, f"{NODE_SIDE}/{SEGMENT.prefixlen}")
    fabric.client = fabric._host("client", CLIENT_IP)
    netns.wait_ping(fabric.client, NODE_SIDE)
    return fabric
