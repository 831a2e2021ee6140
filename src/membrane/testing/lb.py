"""A namespace where the `membrane lb` program can run through BPF_PROG_TEST_RUN: the
program asks the kernel's FIB for the next hop, so it needs a device with forwarding on,
a subnet for the backends and their MACs (permanent neighbour entries). Used by the
datapath tests and bench/lb_cost.py.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from pyroute2 import IPRoute

from membrane.bpf import Program, TestRunResult, test_run
from membrane.netns import Topology, links
from membrane.netns.namespace import inside
from membrane.netns.sysctl import enable_ipv6, write_sysctl

NUD_PERMANENT = 0x80
LB_MAC = "02:00:00:00:02:02"


def backend_mac(addr: str) -> str:
    """The MAC the testbed gives a backend: from its address's last byte."""
    last = ipaddress.ip_address(addr).packed[-1]
    return f"02:be:00:00:00:{last:02x}"


@dataclass(frozen=True)
class LbTestbed:
    ns: str
    ifindex: int  # of eth0, where packets "arrive"

    def run(self, prog: Program, frame: bytes, repeat: int = 1) -> TestRunResult:
        """Run `prog` on `frame` as if it arrived on eth0 (struct xdp_md as context)."""
        ctx = struct.pack("6I", 0, len(frame), 0, self.ifindex, 0, 0)
        with inside(self.ns):
            return test_run(prog, frame, ctx=ctx, ctx_out_size=24, repeat=repeat)


def lb_testbed(topo: Topology, addresses: Iterable[str], backends: Iterable[str]) -> LbTestbed:
    """Namespace `<tag>-lb` with eth0 (to a peer namespace) holding `addresses` (CIDR)
    and a permanent neighbour entry for each of `backends`."""
    ns, peer = topo.namespace("lb"), topo.namespace("peer")
    with inside(ns):
        enable_ipv6("all", "default")
    topo.veth(ns, peer)
    with inside(ns), IPRoute() as ipr:
        index = ipr.link_lookup(ifname="eth0")[0]
        ipr.link("set", index=index, address=LB_MAC)
        for cidr in addresses:
            iface = ipaddress.ip_interface(cidr)
            ipr.addr("add", index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen)
        for addr in backends:
            ipr.neigh("add", dst=addr, lladdr=backend_mac(addr), ifindex=index, state=NUD_PERMANENT)
        write_sysctl("net.ipv4.conf.eth0.forwarding", 1)
        write_sysctl("net.ipv6.conf.eth0.forwarding", 1)
    links.set_up(ns, "eth0")
    return LbTestbed(ns, index)
