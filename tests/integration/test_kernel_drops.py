"""Drops anywhere (issue 11 part 5): packets of pods that the kernel drops outside our
datapath show up as drop flows of the right pod, with the kernel's reason, read by the real
agent's drop monitor from skb:kfree_skb. The kernel is made to drop them inside namespaces
the test's agent created: UDP to a port with no socket in the peer pod (NO_SOCKET), an
nftables drop rule in a pod's namespace (NETFILTER_DROP), a socket whose receive queue is
full (SOCKET_RCVBUFF), a destination the node has no route for (the node drops it on the
pod's veth). They count in hubble_drop_total. Drops in a namespace the agent does not
know are not reported.

What to expect comes from the kernel: where the monitor cannot run (no tp_btf, kfree_skb
without a reason), the agent must say so in one log line, and the flows are not expected."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from agent_support import cluster_fixture

from membrane import netns
from membrane.agent.kernel_drops import drop_reason_names, unavailable_reason
from membrane.bpf.btf import kernel_btf
from membrane.testing.agent import agent_unusable_reason
from membrane.testing.cluster import Cluster, running_cluster, unique_tag
from membrane.testing.traffic import free_loopback_port
from membrane.testing.waiting import wait_for

pytestmark = pytest.mark.root


METRICS = f"127.0.0.1:{free_loopback_port()}"
cluster = cluster_fixture(
    namespaces=("x",), pod_names=("a", "b"), extra_args=("--hubble-metrics-server", METRICS)
)
UNROUTED = "198.19.77.7"  # in the test range, and routed nowhere in the node
OFF_LINE = "kernel drop monitor off"


@pytest.fixture(scope="module")
def why_off() -> str | None:
    if agent_unusable_reason():
        pytest.skip(agent_unusable_reason() or "")
    return unavailable_reason()


@pytest.fixture
def monitor(cluster: Cluster, why_off: str | None) -> Cluster:
    if why_off is not None:
        pytest.skip(f"the kernel drop monitor cannot run here: {why_off}")
    return cluster


def kernel_reasons() -> set[str]:
    return set(drop_reason_names(kernel_btf()).values())


@contextlib.contextmanager
def udp_socket(ns: str, family: int = 4) -> Iterator[socket.socket]:
    with netns.inside(ns):
        s = socket.socket(socket.AF_INET6 if family == 6 else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        yield s
    finally:
        s.close()


def kernel_drops(c: Cluster, match: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
    """The drop flows with a kernel reason that `match` accepts."""
    flows = [r["flow"] for r in c.agent.observe(last=2000) if "flow" in r]
    return [
        f
        for f in flows
        if f.get("verdict") == "DROPPED"
        and f.get("event_type", {}).get("type") == 1
        and f.get("Summary", "").startswith("kernel ")
        and match(f)
    ]


def send_until_seen(
    c: Cluster, send: Callable[[], None], match: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """Send, look, send again: the agent watches a new pod within its poll interval."""

    def seen() -> list[dict[str, Any]]:
        send()
        return kernel_drops(c, match)

    return wait_for("the kernel's drop as a flow", seen, timeout=20, interval=0.3)[-1]


def reason_of(flow: dict[str, Any]) -> str:
    return flow["Summary"].removeprefix("kernel ").split()[0].rstrip(";")


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_udp_to_a_port_without_socket_is_a_no_socket_drop_of_the_receiver(
    monitor: Cluster, family: int
) -> None:
    c = monitor
    a, b = c.pods["x/a"], c.pods["x/b"]
    src, dst = (a.ip, b.ip) if family == 4 else (a.ip6, b.ip6)
    if dst is None:
        pytest.skip("the agent's pods have no IPv6 address")
    port = 9999 - family  # the echo server listens on 80-82 only
    with udp_socket(a.netns, family) as s:
        flow = send_until_seen(
            c,
            lambda: s.sendto(b"anyone?", (dst, port)),
            lambda f: f["l4"].get("UDP", {}).get("destination_port") == port,
        )
    assert reason_of(flow) == "NO_SOCKET"
    assert flow["IP"] == {"source": src, "destination": dst, "ipVersion": f"IPv{family}"}
    # dropped in b's namespace, on its way in: b's ingress, a as the source
    assert flow["traffic_direction"] == "INGRESS"
    assert (flow["destination"]["namespace"], flow["destination"]["pod_name"]) == ("x", "b")
    assert (flow["source"]["namespace"], flow["source"]["pod_name"]) == ("x", "a")
    assert flow["destination"]["ID"] == b.info["id"]
    assert flow["interface"]["name"] == "eth0"
    assert flow["node_name"] == c.agent.node_netns
    # Hubble's DropReason has no kernel reasons: the number is left unknown (0: omitted)
    assert "drop_reason_desc" not in flow


@pytest.mark.parametrize("hook", ["input", "output"])
def test_nftables_drop_in_a_pod_is_a_netfilter_drop(monitor: Cluster, hook: str) -> None:
    """input: dropped on b's way in (its device known); output: dropped in a's namespace
    before the packet has a device (the socket's namespace names the pod)."""
    if shutil.which("nft") is None:
        pytest.skip("nft is not installed (scripts/setup.sh installs nftables)")
    if "NETFILTER_DROP" not in kernel_reasons():
        pytest.skip("this kernel's drop reasons have no NETFILTER_DROP")
    c = monitor
    a, b = c.pods["x/a"], c.pods["x/b"]
    port = 7777 if hook == "input" else 7778
    table = unique_tag("kd")
    rules = (
        f"table inet {table} {{\n  chain {hook} {{\n"
        f"    type filter hook {hook} priority 0;\n    udp dport {port} drop\n  }}\n}}\n"
    )
    where = b if hook == "input" else a
    nft = ["nsenter", f"--net={netns.path(where.netns)}", "nft"]
    subprocess.run([*nft, "-f", "-"], input=rules, text=True, check=True)
    try:
        with udp_socket(a.netns) as s:

            def send() -> None:
                with contextlib.suppress(PermissionError):  # what an output drop returns
                    s.sendto(b"blocked", (b.ip, port))

            flow = send_until_seen(
                c, send, lambda f: f["l4"].get("UDP", {}).get("destination_port") == port
            )
    finally:
        subprocess.run([*nft, "delete", "table", "inet", table], check=False)
    assert reason_of(flow) == "NETFILTER_DROP"
    assert flow["destination"]["pod_name"] == "b" and flow["source"]["pod_name"] == "a"
    if hook == "input":
        assert flow["traffic_direction"] == "INGRESS"
        assert flow["interface"]["name"] == "eth0"
    else:
        assert flow["traffic_direction"] == "EGRESS"
        assert flow["source"]["ID"] == a.info["id"]


def test_a_full_receive_queue_is_a_socket_rcvbuff_drop(monitor: Cluster) -> None:
    if "SOCKET_RCVBUFF" not in kernel_reasons():
        pytest.skip("this kernel's drop reasons have no SOCKET_RCVBUFF")
    c = monitor
    a, b = c.pods["x/a"], c.pods["x/b"]
    port = 7001
    with udp_socket(b.netns) as sink, udp_socket(a.netns) as s:
        sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)  # the kernel's minimum
        sink.bind((b.ip, port))  # and never read: the queue fills after a few datagrams
        flow = send_until_seen(
            c,
            lambda: [s.sendto(b"x" * 1000, (b.ip, port)) for _ in range(20)],
            lambda f: f["l4"].get("UDP", {}).get("destination_port") == port,
        )
    assert reason_of(flow) == "SOCKET_RCVBUFF"
    assert flow["destination"]["pod_name"] == "b" and flow["traffic_direction"] == "INGRESS"


def test_no_route_in_the_node_is_the_senders_egress_drop_on_its_veth(monitor: Cluster) -> None:
    c = monitor
    a = c.pods["x/a"]
    with udp_socket(a.netns) as s:
        flow = send_until_seen(
            c,
            lambda: s.sendto(b"nowhere", (UNROUTED, 5000)),
            lambda f: f["IP"]["destination"] == UNROUTED,
        )
    # the node routes it: dropped there, on the node side of a's veth, for a's egress
    assert reason_of(flow) in kernel_reasons()
    assert flow["traffic_direction"] == "EGRESS"
    assert (flow["source"]["pod_name"], flow["source"]["ID"]) == ("a", a.info["id"])
    assert flow["interface"]["name"] == a.info["host_ifname"]
    assert flow["destination"]["labels"] and flow["destination"]["labels"][0].startswith(
        "reserved:world"
    )


def test_drops_in_a_namespace_the_agent_does_not_know_are_not_reported(
    monitor: Cluster,
) -> None:
    c = monitor
    a, b = c.pods["x/a"], c.pods["x/b"]
    stranger = netns.create(f"{unique_tag('kd')}-stranger")
    try:
        with udp_socket(stranger) as s:
            for _ in range(50):  # NO_SOCKET drops on its loopback
                s.sendto(b"ignored", ("127.0.0.1", 9))
        # a watched drop after them: once it is seen, the others would have been too
        marker = 9998
        with udp_socket(a.netns) as s:
            send_until_seen(
                c,
                lambda: s.sendto(b"marker", (b.ip, marker)),
                lambda f: f["l4"].get("UDP", {}).get("destination_port") == marker,
            )
    finally:
        netns.delete(stranger)
    assert not kernel_drops(c, lambda f: f["IP"].get("source") == "127.0.0.1")


def test_a_restarted_agent_watches_the_pods_it_adopts(monitor: Cluster) -> None:
    c = monitor
    a, b = c.pods["x/a"], c.pods["x/b"]
    c.agent.restart()  # the monitor is not pinned: the new agent loads its own
    port = 9991
    with udp_socket(a.netns) as s:
        flow = send_until_seen(
            c,
            lambda: s.sendto(b"still there?", (b.ip, port)),
            lambda f: f["l4"].get("UDP", {}).get("destination_port") == port,
        )
    assert reason_of(flow) == "NO_SOCKET" and flow["destination"]["pod_name"] == "b"


def unknown_udp_drops() -> float:
    """hubble_drop_total{reason="DROP_REASON_UNKNOWN",protocol="UDP"} as the agent exports
    it (0 before the first)."""
    with urllib.request.urlopen(f"http://{METRICS}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    for line in text.splitlines():
        if (
            line.startswith("hubble_drop_total{")
            and 'reason="DROP_REASON_UNKNOWN"' in line
            and 'protocol="UDP"' in line
        ):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_kernel_drops_count_in_hubble_drop_total(monitor: Cluster) -> None:
    """The datapath's own drops always have a reason Hubble knows: only kernel drops are
    counted as DROP_REASON_UNKNOWN."""
    c = monitor
    a, b = c.pods["x/a"], c.pods["x/b"]
    port = 9990
    before = unknown_udp_drops()

    def to_port(f: dict[str, Any]) -> bool:
        return f["l4"].get("UDP", {}).get("destination_port") == port

    with udp_socket(a.netns) as s:
        send_until_seen(c, lambda: s.sendto(b"count me", (b.ip, port)), to_port)
    seen = len(kernel_drops(c, to_port))
    assert wait_for("the drops counted", lambda: unknown_udp_drops() - before >= seen > 0)


def test_the_agent_says_when_the_monitor_is_off(why_off: str | None, tmp_path: Path) -> None:
    """Turned off by the option (every kernel), or off because the kernel cannot."""
    args = ("--kernel-drops=false",) if why_off is None else ()
    with running_cluster(tmp_path, namespaces=("x",), pod_names=("a",), extra_args=args) as c:
        log = wait_for("the monitor's line", lambda: OFF_LINE in c.agent.log_tail(200), timeout=5)
        assert log
        tail = c.agent.log_tail(200)
        assert ("--kernel-drops=false" if why_off is None else why_off) in tail
        assert "kernel drop monitor on" not in tail
