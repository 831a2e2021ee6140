"""The outside of a node for NodePort tests, and a namespace to test-run the programs in.

Real traffic: one L2 segment (a bridge in a namespace of its
own) joining the node's external device, a client host and other hosts that serve as
backends, so a backend host can answer a client directly (DSR) instead of through the node.

    node netns:   ext0 198.19.8.1/24 ─┐
    client host:  eth0 198.19.8.2/24 ─┼── br0 (fabric namespace)
    backend host: eth0 198.19.8.1x/24 ┘

The hosts route everything else (the node's address, pods) via the node's 198.19.8.1.
A DSR backend host also holds the frontend's address on lo and strips the node's
IPv4-in-IPv4 (IPv6-in-IPv6) header with lb_decap (XDP; this kernel makes no ipip or
ip6tnl devices), as the backends of `membrane lb` do. A dual-stack fabric adds
2001:db8:8::/64 on the same segment (node 2001:db8:8::1, client ::2, hosts as IPv4's
last byte). A host can route to a pod behind a link of a smaller MTU (path MTU tests).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address

from pyroute2 import IPRoute

from membrane import netns
from membrane.bpf import Program, TestRunResult, test_run
from membrane.lb.decap import attach_decap, decap_counts, detach_decap
from membrane.netns import Topology, links
from membrane.netns.namespace import inside
from membrane.netns.sysctl import disable_ipv6, enable_ipv6, write_sysctl
from membrane.service.kubernetes import hand_written
from membrane.service.maps import ServiceIds
from membrane.service.nodeport import NodePortPath
from membrane.service.plan import NodeView, plan
from membrane.service.socklb import SocketLb
from membrane.testing.lb import NUD_PERMANENT, backend_mac

SEGMENT = IPv4Network("198.19.8.0/24")
SEGMENT6_PREFIX = "2001:db8:8::"  # its IPv6 /64 on a dual-stack fabric


def segment6(address: str) -> str:
    """A segment host's IPv6 address: IPv4's last byte after the /64 prefix (in hex)."""
    return f"{SEGMENT6_PREFIX}{int(address.rsplit('.', 1)[1]):x}"


NODE_SIDE = "198.19.8.1"
CLIENT_IP = "198.19.8.2"
NODE_DEVICE = "ext0"
# The test-run bed (datapath tests, bench/nodeport_cost.py): the node's address, another
# host on the segment and a pod of each
NODE_IP = "198.19.0.1"
REMOTE_HOST = "198.19.8.11"
LOCAL_POD, REMOTE_POD = "198.18.0.10", "198.18.200.11"
# ... and their IPv6 twins (the segment is 2001:db8:8::/64)
NODE_IP6, NODE_SIDE6, CLIENT_IP6 = "2001:db8::1", segment6(NODE_SIDE), segment6(CLIENT_IP)
REMOTE_HOST6 = "2001:db8:8::11"
LOCAL_POD6, REMOTE_POD6 = "2001:db8:1::10", "2001:db8:200::11"
FIRST_NODE_PORT = 30000
TARGET = 7000
# family -> (node, client, remote host, local pod, remote pod, first ClusterIP)
ADDRESSES = {
    4: (NODE_IP, CLIENT_IP, REMOTE_HOST, LOCAL_POD, REMOTE_POD, "198.19.128.1"),
    6: (NODE_IP6, CLIENT_IP6, REMOTE_HOST6, LOCAL_POD6, REMOTE_POD6, "2001:db8:fe::1"),
}


@dataclass
class Fabric:
    topo: Topology
    ns: str  # holds the bridge
    node_ns: str
    client: str  # the client host's namespace
    client_ip: str = CLIENT_IP
    hosts: dict[str, str] = field(default_factory=dict)  # backend host namespace -> address
    ipv6: bool = False  # 2001:db8:8::/64 on the segment too

    def _plug(self, ns: str, dev: str, port: str) -> None:
        self.topo.veth(ns, self.ns, names=(dev, port))
        with inside(self.ns), IPRoute() as ipr:
            bridge = ipr.link_lookup(ifname="br0")[0]
            ipr.link("set", index=ipr.link_lookup(ifname=port)[0], master=bridge)

    def _host(self, role: str, address: str) -> str:
        ns = self.topo.namespace(role)
        with inside(ns):
            (enable_ipv6 if self.ipv6 else disable_ipv6)("all", "default")
        self._plug(ns, "eth0", f"p-{role}")
        links.add_address(ns, "eth0", f"{address}/{SEGMENT.prefixlen}")
        links.add_route(ns, "0.0.0.0/0", via=NODE_SIDE)
        if self.ipv6:
            links.add_address(ns, "eth0", f"{segment6(address)}/64")
            links.add_route(ns, "::/0", via=segment6(NODE_SIDE))
        return ns

    def add_backend_host(
        self, role: str, address: str, frontend: str | None = None, frontend6: str | None = None
    ) -> str:
        """A host on the segment; with `frontend` (and `frontend6`: addresses), ready for
        DSR: the addresses on lo, no ARP answers for it, decapsulation on eth0."""
        ns = self._host(role, address)
        if frontend6 is not None:
            links.add_address(ns, "lo", f"{frontend6}/128")
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
        if self.ipv6:
            netns.wait_ping(self.node_ns, segment6(address))
        return ns

    def add_narrow_pod(self, host_ns: str, role: str, pods: tuple[str, ...], mtu: int) -> str:
        """A namespace holding `pods` (addresses, on lo) two hops behind `host_ns`: over a
        link of `mtu` bytes to a router, then a full-sized one to the pods. The pods'
        stack announces the full MSS, so a peer's full-sized segments meet the narrow
        link in the middle, where `host_ns` answers with fragmentation needed / packet
        too big. Links 198.19.10.0/30 and .4/30 (2001:db8:10::/64 and 2001:db8:11::/64)."""
        router, ns = self.topo.namespace(f"{role}-r"), self.topo.namespace(role)
        plan = (  # (near side, its device, its address, far side, its address, MTU)
            (host_ns, "narrow0", "198.19.10.1", router, "198.19.10.2", "2001:db8:10::", mtu),
            (router, "deep0", "198.19.10.5", ns, "198.19.10.6", "2001:db8:11::", None),
        )
        for side in (router, ns):
            with inside(side):
                (enable_ipv6 if self.ipv6 else disable_ipv6)("all", "default")
        for near, dev, near_ip, far, far_ip, prefix6, link_mtu in plan:
            self.topo.veth(near, far, names=(dev, "eth0"))
            if link_mtu is not None:
                for side, name in ((near, dev), (far, "eth0")):
                    with inside(side), IPRoute() as ipr:
                        ipr.link("set", index=ipr.link_lookup(ifname=name)[0], mtu=link_mtu)
            links.add_address(near, dev, f"{near_ip}/30")
            links.add_address(far, "eth0", f"{far_ip}/30")
            links.add_route(far, "0.0.0.0/0", via=near_ip)
            with inside(near):
                write_sysctl("net.ipv4.ip_forward", 1)
            if self.ipv6:
                links.add_address(near, dev, f"{prefix6}1/64")
                links.add_address(far, "eth0", f"{prefix6}2/64")
                links.add_route(far, "::/0", via=f"{prefix6}1")
                with inside(near):
                    write_sysctl("net.ipv6.conf.all.forwarding", 1)
        for pod in pods:
            v6 = ":" in pod
            links.add_address(ns, "lo", f"{pod}/{128 if v6 else 32}")
            links.add_route(router, pod, via="2001:db8:11::2" if v6 else "198.19.10.6")
            links.add_route(host_ns, pod, via="2001:db8:10::2" if v6 else "198.19.10.2")
            netns.wait_ping(host_ns, pod)
        return ns

    def decapsulated(self, host_ns: str) -> int:
        """Packets lb_decap stripped on the host so far (DSR requests that reached it)."""
        return decap_counts("eth0", host_ns)["decapsulated"]


def build_fabric(topo: Topology, node_ns: str, ipv6: bool = False) -> Fabric:
    """The segment, the node's ext0 on it and the client host; `ipv6`: dual-stack."""
    fabric_ns = topo.namespace("fabric")
    with inside(fabric_ns), IPRoute() as ipr:
        disable_ipv6("all", "default")  # the bridge itself needs no address
        ipr.link("add", ifname="br0", kind="bridge")
        ipr.link("set", index=ipr.link_lookup(ifname="br0")[0], state="up")
    fabric = Fabric(topo, fabric_ns, node_ns, "", ipv6=ipv6)
    fabric._plug(node_ns, NODE_DEVICE, "p-node")
    links.add_address(node_ns, NODE_DEVICE, f"{NODE_SIDE}/{SEGMENT.prefixlen}")
    if ipv6:
        links.add_address(node_ns, NODE_DEVICE, f"{segment6(NODE_SIDE)}/64")
    fabric.client = fabric._host("client", CLIENT_IP)
    netns.wait_ping(fabric.client, NODE_SIDE)
    if ipv6:
        netns.wait_ping(fabric.client, segment6(NODE_SIDE))
    return fabric


# ---- BPF_PROG_TEST_RUN of the programs -----------------------------------------------------
@dataclass(frozen=True)
class Bed:
    ns: str
    ext: int  # ifindex of ext0 (served; the remote backend is behind it)
    pod: int  # ifindex of the local pod's device

    def run(self, prog: Program, frame: bytes, ifindex: int) -> TestRunResult:
        """`prog` on `frame` as if it arrived on (or left by) device `ifindex`."""
        ctx = bytearray(192)  # struct __sk_buff: ingress_ifindex at 36, ifindex at 40
        struct.pack_into("II", ctx, 36, ifindex, ifindex)
        with inside(self.ns):
            return test_run(prog, frame, ctx=bytes(ctx))


def nodeport_testbed(topo: Topology) -> Bed:
    """A node-like namespace: ext0 (198.19.8.1/24 and 2001:db8:8::1/64, the remote host
    and the client as permanent neighbours, the other node's pods routed via the remote
    host) and pod0 (the local pod's /32 and /128)."""
    ns, peer, pod = topo.namespace("node"), topo.namespace("peer"), topo.namespace("pod")
    with inside(ns):
        enable_ipv6("all", "default")
    topo.veth(ns, peer, names=("ext0", "eth0"))
    topo.veth(ns, pod, names=("pod0", "eth0"))
    links.add_address(ns, "lo", f"{NODE_IP}/32")
    links.add_address(ns, "lo", f"{NODE_IP6}/128")
    links.add_address(ns, "ext0", f"{NODE_SIDE}/{SEGMENT.prefixlen}")
    links.add_address(ns, "ext0", f"{NODE_SIDE6}/64")
    with inside(ns), IPRoute() as ipr:
        ext, pod0 = ipr.link_lookup(ifname="ext0")[0], ipr.link_lookup(ifname="pod0")[0]
        for addr in (REMOTE_HOST, CLIENT_IP, REMOTE_HOST6, CLIENT_IP6):
            ipr.neigh("add", dst=addr, lladdr=backend_mac(addr), ifindex=ext, state=NUD_PERMANENT)
        for remote, host in ((REMOTE_POD, REMOTE_HOST), (REMOTE_POD6, REMOTE_HOST6)):
            bits = IPv6Address(remote).max_prefixlen if ":" in remote else 32
            ipr.route("add", dst=f"{remote}/{bits}", gateway=host, oif=ext)
        for local, bits in ((LOCAL_POD, 32), (LOCAL_POD6, 128)):
            ipr.route("add", dst=f"{local}/{bits}", oif=pod0)
            ipr.neigh("add", dst=local, lladdr=backend_mac(local), ifindex=pod0,
                      state=NUD_PERMANENT)  # fmt: skip
        write_sysctl("net.ipv4.ip_forward", 1)
        write_sysctl("net.ipv6.conf.all.forwarding", 1)  # bpf_fib_lookup asks for it
    return Bed(ns, ext, pod0)


def load_nodeport(
    bed: Bed,
    bpf_dir: str,
    mode: str,
    services: int,
    algorithm: str = "random",
    local_only: bool = False,
    protocol: str = "TCP",
    family: int = 4,
) -> NodePortPath:
    """The programs in `mode` on service maps of their own pinned under `bpf_dir` (made
    as the agent makes them: the socket LB's loader creates them, the nodeport loader reuses
    them), with `services` NodePorts (FIRST_NODE_PORT + 2i to the local pod, + 2i + 1 to the
    remote one, `protocol`, IPv`family`) written by the agent's writer; `local_only`:
    externalTrafficPolicy Local (and no endpoint of this node among the backends). ext0 is
    served (np_devices)."""
    socket_lb = SocketLb.start(bpf_dir, "", (4, 6))  # maps only: nothing attaches
    path = NodePortPath.start(bpf_dir, mode, IPv4Address(NODE_IP), IPv6Address(NODE_IP6))
    _, _, _, local_pod, remote_pod, first_cluster_ip = ADDRESSES[family]
    records, slices = [], []
    for i in range(services):
        for k, backend in enumerate((local_pod, remote_pod)):
            port = {"port": 80, "targetPort": TARGET, "protocol": protocol,
                    "nodePort": FIRST_NODE_PORT + 2 * i + k}  # fmt: skip
            spec = {
                "type": "NodePort",
                "clusterIP": str(ipaddress.ip_address(first_cluster_ip) + 2 * i + k),
                "externalTrafficPolicy": "Local" if local_only else "Cluster",
                "ports": [port],
            }
            annotations = {"service.cilium.io/lb-algorithm": algorithm}
            svc, eps = hand_written(
                "bench",
                f"s{i}-{k}",
                spec,
                annotations,
                [{"address": backend, "port": None, "state": "active", "weight": 1}],
            )
            records.append(svc.with_ips((spec["clusterIP"],)))
            slices.append(eps)
    node = NodeView((), {4: (NODE_IP,), 6: (NODE_IP6,)}, 16381)
    socket_lb.maps.apply(plan(records, [s for s in slices if s], node), ServiceIds.from_json(None))
    socket_lb.close()
    path.obj.map("np_devices").update(bed.ext, 1)
    return path
