"""Path-MTU discovery through a default-deny pod: a router namespace with a narrower link
sits between x/a and y/b, a bulk TCP transfer from x/a sends segments that do not fit,
the router answers "fragmentation needed", and that ICMP error (from a "world" address no
policy allows) reaches x/a because it quotes a connection x/a's conntrack tracks. Before,
it was dropped as any other ICMP from world: the transfer stalled for good.

    x/a ──▶ node ──(in, MTU 1500)──▶ router ──(out, MTU 1280)──▶ node ──▶ y/b
      ◀────────── "fragmentation needed" from the router ──────────┘
    y/b's acknowledgements go straight back through the node.

Only x/a's traffic to y/b takes the detour: a policy-routing rule on the node matches
packets arriving from x/a's veth."""

from __future__ import annotations

import contextlib
import re
import secrets
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from agent_support import net_fixture, shared_cluster_fixture
from pyroute2 import IPRoute

from membrane import netns
from membrane.netns import Topology
from membrane.testing.cluster import Cluster
from membrane.testing.pods import Pod
from membrane.testing.traffic import socket_in
from membrane.testing.waiting import wait_for

pytestmark = pytest.mark.root

cluster = shared_cluster_fixture()
net = net_fixture()

LINK_IN, LINK_OUT = "198.19.44.0/30", "198.19.45.0/30"  # node .1, router .2 on each
NARROW_MTU = 1280
DETOUR_TABLE = 4401
TRANSFER = 1 << 20
STALL = 15.0  # seconds; before the fix the transfer never completes

X_A_INGRESS_FROM_C_ONLY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: only-from-c, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  ingress:
  - fromEndpoints: [{matchLabels: {pod: c}}]
"""


@dataclass
class Detour:
    router_ns: str
    router_ip: str  # where its ICMP errors come from


def _index(ipr: IPRoute, dev: str) -> int:
    return ipr.link_lookup(ifname=dev)[0]


@pytest.fixture
def detour(net: Cluster) -> Iterator[Detour]:
    """Route x/a's packets to y/b through a router namespace whose way back to the node
    has the narrow MTU; everything removed afterwards, also on failure."""
    a, b = net.pods["x/a"], net.pods["y/b"]
    node_ns = net.agent.node_netns
    tag = secrets.token_hex(3)
    node_in, node_out = f"rt{tag}i", f"rt{tag}o"
    with Topology() as topo:
        router = topo.namespace("router")
        node_in_end, router_in = topo.veth(node_ns, router, names=(node_in, "in0"), subnet=LINK_IN)
        node_end, _ = topo.veth(node_ns, router, names=(node_out, "out0"), subnet=LINK_OUT)
        for ns, dev in ((node_ns, node_out), (router, "out0")):
            with netns.inside(ns), IPRoute() as ipr:
                ipr.link("set", index=_index(ipr, dev), mtu=NARROW_MTU)
        with netns.inside(router):
            netns.write_sysctl("net.ipv4.ip_forward", 1)
        netns.add_route(router, f"{b.ip}/32", via=node_end.ip, dev="out0")
        netns.add_route(router, "default", via=node_in_end.ip, dev="in0")
        with netns.inside(node_ns):
            # Back from the router, x/a's packets come in on node_out: loose source check.
            netns.write_sysctl(f"net.ipv4.conf.{node_out}.rp_filter", 2)
        rule = {"iifname": a.info["host_ifname"], "dst": b.ip, "dst_len": 32}
        with netns.inside(node_ns), IPRoute() as ipr:
            ipr.route(
                "add",
                dst=f"{b.ip}/32",
                gateway=router_in.ip,
                oif=_index(ipr, node_in),
                table=DETOUR_TABLE,
            )
            ipr.rule("add", table=DETOUR_TABLE, priority=100, **rule)
        topo.callback(_delete_rule, node_ns, rule)
        # What x/a learnt of this path must not outlive it.
        topo.callback(netns.run, a.netns, ["ip", "route", "flush", "cache"])
        yield Detour(router, router_in.ip)


def _delete_rule(ns: str, rule: dict[str, object]) -> None:
    with netns.inside(ns), IPRoute() as ipr:
        ipr.rule("del", table=DETOUR_TABLE, priority=100, **rule)


def transfer(src: Pod, dst: Pod, size: int, timeout: float) -> int:
    """Send `size` bytes to dst's echo server on port 80 and read them back; returns how
    many came back within `timeout` seconds."""
    sock = socket_in(src.netns)
    sock.settimeout(timeout)
    back = 0
    try:
        sock.connect((dst.ip, 80))
        sender = threading.Thread(target=_send_all, args=(sock, size), daemon=True)
        sender.start()
        while back < size:
            chunk = sock.recv(65536)
            if not chunk:
                break
            back += len(chunk)
    except TimeoutError:
        pass
    finally:
        sock.close()
    return back


def _send_all(sock: socket.socket, size: int) -> None:
    with contextlib.suppress(OSError):  # closed by the reader after a stall
        sock.sendall(bytes(size))


def path_mtu(pod: Pod, dst: str) -> int | None:
    """The MTU the pod's kernel learnt for `dst` (ip route get shows the cached value)."""
    out = netns.run(pod.netns, ["ip", "-4", "route", "get", dst]).stdout
    found = re.search(r"\bmtu (\d+)", out)
    return int(found.group(1)) if found else None


def related_icmp_flows(net: Cluster, pod: Pod, router_ip: str) -> list[dict]:
    return [
        f
        for f in (r["flow"] for r in net.agent.observe() if "flow" in r)
        if f.get("trace_reason") == "RELATED"
        and f["verdict"] == "FORWARDED"
        and f["IP"] == {"source": router_ip, "destination": pod.ip, "ipVersion": "IPv4"}
        and f.get("l4") == {"ICMPv4": {"type": 3, "code": 4}}
    ]


def test_fragmentation_needed_reaches_a_default_deny_pod(net: Cluster, detour: Detour) -> None:
    net.import_policy(X_A_INGRESS_FROM_C_ONLY)
    a, b = net.pods["x/a"], net.pods["y/b"]
    assert transfer(a, b, TRANSFER, STALL) == TRANSFER
    assert path_mtu(a, b.ip) == NARROW_MTU
    wait_for(
        "the related ICMP error in x/a's flows",
        lambda: related_icmp_flows(net, a, detour.router_ip),
    )
