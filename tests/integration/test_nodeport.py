"""NodePort services from outside the node with real TCP: the agent's per-packet path
(`--devices ext0`, `--bpf-lb-mode snat|dsr`) on the node's external device, a client host
and backend hosts on one L2 segment with it (membrane.testing.nodeport).

    client host 198.19.8.2 ── br0 ── node ext0 198.19.8.1 (NodePorts on 198.19.0.1)
                                 ├── snat-host 198.19.8.11, a "pod" 198.18.200.11 of another node
                                 └── dsr-host  198.19.8.12, a "pod" 198.18.201.12, and the node's
                                               address on lo, decapsulating (lb_decap)
plus a local pod svc/web of the agent. The node routes the other nodes' pod addresses via
their hosts, as an overlay-less cluster would. The segment is dual-stack (2001:db8:8::/64,
NodePorts also on 2001:db8::1); behind snat-host, over a link of MTU 1280, a narrow "pod"
198.18.202.13 / 2001:db8:1::202:13 (path MTU discovery through a NodePort).
"""

from __future__ import annotations

import json
import socket
import textwrap
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from membrane import netns
from membrane.bpf.probe import temporary_cgroup
from membrane.netns import Topology, links
from membrane.netns.namespace import inside
from membrane.service.nodeport import pinned_counters
from membrane.testing.agent import NODE_IP, NODE_IP6, AgentProcess, agent_unusable_reason
from membrane.testing.cluster import unique_tag
from membrane.testing.nodeport import NODE_DEVICE, Fabric, build_fabric, segment6
from membrane.testing.pods import Pod, start_echo_server
from membrane.testing.traffic import echoed_while_sent, free_loopback_port
from membrane.testing.waiting import wait_for

pytestmark = pytest.mark.skipif(bool(agent_unusable_reason()), reason=str(agent_unusable_reason()))

TARGET = 7000  # the backends' port
SNAT_HOST, SNAT_POD, SNAT_POD6 = "198.19.8.11", "198.18.200.11", "2001:db8:1::200:11"
DSR_HOST, DSR_POD, DSR_POD6 = "198.19.8.12", "198.18.201.12", "2001:db8:1::201:12"
NARROW_POD, NARROW_POD6, NARROW_MTU = "198.18.202.13", "2001:db8:1::202:13", 1280
NODE = {4: NODE_IP, 6: NODE_IP6}
FAMILY = {4: socket.AF_INET, 6: socket.AF_INET6}
IP_MTU, IPV6_MTU = 14, 24  # linux/in.h, linux/in6.h: Python's socket module lacks them


@dataclass
class NodePortBed:
    agent: AgentProcess
    fabric: Fabric
    web: Pod  # the local backend pod
    snat_host: str
    dsr_host: str

    def counters(self) -> dict[str, int]:
        found = pinned_counters(str(self.agent.bpf_dir))
        assert found is not None, "the agent has no per-packet path"
        return found

    def import_services(self, text: str) -> None:
        path = Path(self.agent.state_dir).parent / "svc.yaml"
        path.write_text(textwrap.dedent(text))
        self.agent.cli("service", "import", str(path))


def node_port_service(
    name: str,
    node_port: int,
    selector: str | None = None,
    protocol: str = "TCP",
    target: int = TARGET,
    **spec: str,
) -> str:
    """A Service of type NodePort (port 80 -> `target`) as a user writes it; without a
    selector its EndpointSlice comes separately."""
    extra = "".join(f"\n  {k}: {v}" for k, v in spec.items())
    select = f"\n  selector:\n    app: {selector}" if selector else ""
    return f"""
apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: svc
spec:
  type: NodePort{select}{extra}
  ports:
  - name: http
    port: 80
    protocol: {protocol}
    targetPort: {target}
    nodePort: {node_port}
"""


def endpoint_slice(service: str, address: str, suffix: str = "1") -> str:
    family = "IPv6" if ":" in address else "IPv4"
    return f"""
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {service}-{suffix}
  namespace: svc
  labels:
    kubernetes.io/service-name: {service}
addressType: {family}
ports:
- name: http
  port: {TARGET}
  protocol: TCP
endpoints:
- addresses: ["{address}"]
"""


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodePortBed]:
    tag = unique_tag("np")
    workdir = tmp_path_factory.mktemp("nodeport")
    # The socket LB covers an empty cgroup only: the test's own processes, the client host's
    # among them, must reach NodePorts as outside clients do, through the node's device.
    with temporary_cgroup(f"membrane-test-{tag}") as cgroup:
        args = ["--devices", NODE_DEVICE, "--bpf-lb-mode", "snat", "--cgroup-root", str(cgroup),
                "--prometheus-serve-addr", f"127.0.0.1:{free_loopback_port()}"]  # fmt: skip
        agent = AgentProcess(workdir, tag, extra_args=args)
        try:
            agent.start()
            with Topology("mnp") as topo:
                yield _build(agent, topo)
        finally:
            agent.destroy()


def _build(agent: AgentProcess, topo: Topology) -> NodePortBed:
    info = agent.cli_json("endpoint", "add", "svc/web", "--label", "app=web")
    web = Pod("svc", "web", info)
    topo.callback(netns.stop, start_echo_server(web.netns, (TARGET,)))
    fabric = build_fabric(topo, agent.node_netns, ipv6=True)
    snat_host = fabric.add_backend_host("snat", SNAT_HOST)
    dsr_host = fabric.add_backend_host("dsr", DSR_HOST, frontend=NODE_IP, frontend6=NODE_IP6)
    for host, pod, pod6 in ((snat_host, SNAT_POD, SNAT_POD6), (dsr_host, DSR_POD, DSR_POD6)):
        links.add_address(host, "lo", f"{pod}/32")
        links.add_address(host, "lo", f"{pod6}/128")
        links.add_route(agent.node_netns, f"{pod}/32", via=fabric.hosts[host])
        links.add_route(agent.node_netns, f"{pod6}/128", via=segment6(fabric.hosts[host]))
    narrow = fabric.add_narrow_pod(snat_host, "narrow", (NARROW_POD, NARROW_POD6), NARROW_MTU)
    links.add_route(agent.node_netns, f"{NARROW_POD}/32", via=SNAT_HOST)
    links.add_route(agent.node_netns, f"{NARROW_POD6}/128", via=segment6(SNAT_HOST))
    for ns in (snat_host, narrow):
        topo.callback(netns.stop, start_echo_server(ns, (TARGET,)))
    # DSR: the inner packet keeps the frontend's address and port
    topo.callback(netns.stop, start_echo_server(dsr_host, (TARGET, 30082, 30092)))
    wait_for("the agent to serve ext0", lambda: served(agent))
    return NodePortBed(agent, fabric, web, snat_host, dsr_host)


def served(agent: AgentProcess) -> bool:
    """Both programs are on ext0 (their links pinned by the agent)."""
    links_dir = agent.bpf_dir / "nodeport" / "links"
    return all((links_dir / f"{NODE_DEVICE}-{d}").exists() for d in ("ingress", "egress"))


def echo(
    client_ns: str,
    port: int,
    message: bytes = b"hello nodeport",
    timeout: float = 3.0,
    host: str = NODE_IP,
) -> bytes:
    """One connection from the client host to host:port, `message` and its echo."""
    with inside(client_ns):
        sock = socket.create_connection((host, port), timeout=timeout)
    with sock:
        sock.sendall(message)
        got = b""
        while len(got) < len(message):
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
        return got


def echo_bulk(client_ns: str, port: int, data: bytes, host: str = NODE_IP) -> bytes:
    """`data` to host:port and its echo, read while it is sent."""
    with inside(client_ns):
        sock = socket.create_connection((host, port), timeout=5)
    with sock:
        return echoed_while_sent(sock, data)


def metrics(agent: AgentProcess) -> dict[tuple[str, str], float]:
    """The agent's Prometheus metrics: (sample name, its only label's value) -> value."""
    at = agent.extra_args.index("--prometheus-serve-addr")
    with urllib.request.urlopen(f"http://{agent.extra_args[at + 1]}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {
        (sample.name, next(iter(sample.labels.values()), "")): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


def link_stats(ns: str, dev: str) -> dict[str, int]:
    """The device's rx/tx bytes and packets (`ip -s`; /sys would show the root namespace's)."""
    shown = json.loads(netns.run(ns, ["ip", "-s", "-j", "link", "show", "dev", dev]).stdout)[0]
    stats = shown["stats64"]
    return {
        "rx_bytes": stats["rx"]["bytes"],
        "tx_bytes": stats["tx"]["bytes"],
        "rx_packets": stats["rx"]["packets"],
    }


def peers_seen(host_ns: str) -> set[str]:
    """Where the connections established to TARGET on a backend host come from."""
    out = netns.run(host_ns, ["ss", "-Htn", "state", "established", f"( sport = :{TARGET} )"])
    return {line.split()[-1].rsplit(":", 1)[0] for line in out.stdout.splitlines()}


def test_nodeport_to_a_local_pod_is_translated_both_ways(bed: NodePortBed) -> None:
    bed.import_services(node_port_service("web", 30080, selector="web"))
    before = bed.counters()
    for i in range(5):
        message = f"local {i}".encode()
        assert echo(bed.fabric.client, 30080, message) == message
    moved = delta(before, bed.counters())
    assert moved.get("new_flow") == 5, moved
    assert moved.get("to_local", 0) >= 15 and moved.get("reply_local", 0) >= 10, moved
    assert "to_snat" not in moved and "error" not in moved, moved
    # the same counters and the flow maps' fill, as the agent's Prometheus metrics
    scraped = metrics(bed.agent)
    assert scraped[("membrane_nodeport_packets_total", "to_local")] == bed.counters()["to_local"]
    assert scraped[("cilium_bpf_map_pressure", "np_flows")] > 0


def test_external_ip_from_outside_reaches_a_local_pod(bed: NodePortBed) -> None:
    """An externalIP (routed to the node, as a router would) on the service port."""
    bed.import_services("""
    apiVersion: v1
    kind: Service
    metadata: {name: web-external, namespace: svc}
    spec:
      selector: {app: web}
      externalIPs: [198.19.9.10]
      ports: [{name: http, port: 8080, targetPort: 7000}]
    """)
    before = bed.counters()
    with inside(bed.fabric.client):
        sock = socket.create_connection(("198.19.9.10", 8080), timeout=3)
    with sock:
        sock.sendall(b"external")
        assert sock.recv(100) == b"external"
        assert sock.getpeername() == ("198.19.9.10", 8080)
    moved = delta(before, bed.counters())
    assert moved.get("new_flow") == 1 and moved.get("reply_local", 0) >= 1, moved


def test_nodeport_to_another_host_in_snat_mode_comes_back_through_the_node(
    bed: NodePortBed,
) -> None:
    bed.import_services(node_port_service("remote", 30081) + endpoint_slice("remote", SNAT_POD))
    before = bed.counters()
    with inside(bed.fabric.client):
        sock = socket.create_connection((NODE_IP, 30081), timeout=3)
    with sock:
        sock.sendall(b"snat")
        assert sock.recv(100) == b"snat"
        # the backend host sees the node as its client: its replies must come back here
        assert peers_seen(bed.snat_host) == {NODE_IP}
    moved = delta(before, bed.counters())
    assert moved.get("to_snat", 0) >= 3 and moved.get("reply_snat", 0) >= 2, moved


def test_external_traffic_policy_local_without_a_local_backend_drops(bed: NodePortBed) -> None:
    text = node_port_service("only-remote", 30083, externalTrafficPolicy="Local")
    bed.import_services(text + endpoint_slice("only-remote", SNAT_POD))
    before = bed.counters()
    with pytest.raises(OSError):
        echo(bed.fabric.client, 30083, timeout=0.5)
    assert delta(before, bed.counters()).get("no_backend", 0) >= 1


def test_policy_still_applies_to_the_backend_behind_a_nodeport(bed: NodePortBed) -> None:
    bed.import_services(node_port_service("web", 30080, selector="web"))
    only_pods = """
    apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata: {name: web-from-pods, namespace: svc}
    spec:
      endpointSelector: {matchLabels: {app: web}}
      ingress:
      - fromEndpoints: [{matchLabels: {app: web-client}}]
    """
    from_client = f"""
    apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata: {{name: web-from-client, namespace: svc}}
    spec:
      endpointSelector: {{matchLabels: {{app: web}}}}
      ingress:
      - fromCIDR: ["{bed.fabric.client_ip}/32"]
    """
    try:
        bed.agent.import_policy(textwrap.dedent(only_pods))
        with pytest.raises(OSError):
            echo(bed.fabric.client, 30080, timeout=0.5)
        bed.agent.import_policy(textwrap.dedent(from_client))
        assert echo(bed.fabric.client, 30080) == b"hello nodeport"
    finally:
        bed.agent.delete_all_policies()


def test_ipv6_nodeport_to_a_local_pod_is_translated_both_ways(bed: NodePortBed) -> None:
    bed.import_services(node_port_service("web6", 30090, selector="web", ipFamilies="[IPv6]"))
    before = bed.counters()
    for i in range(3):
        message = f"local6 {i}".encode()
        assert echo(bed.fabric.client, 30090, message, host=NODE_IP6) == message
    moved = delta(before, bed.counters())
    assert moved.get("new_flow") == 3, moved
    assert moved.get("to_local", 0) >= 9 and moved.get("reply_local", 0) >= 6, moved
    assert "to_snat" not in moved and "error" not in moved, moved


def test_ipv6_nodeport_to_another_host_in_snat_mode_comes_back_through_the_node(
    bed: NodePortBed,
) -> None:
    service = node_port_service("remote6", 30091, ipFamilies="[IPv6]")
    bed.import_services(service + endpoint_slice("remote6", SNAT_POD6))
    before = bed.counters()
    with inside(bed.fabric.client):
        sock = socket.create_connection((NODE_IP6, 30091), timeout=3)
    with sock:
        sock.sendall(b"snat6")
        assert sock.recv(100) == b"snat6"
        assert peers_seen(bed.snat_host) == {f"[{NODE_IP6}]"}
    moved = delta(before, bed.counters())
    assert moved.get("to_snat", 0) >= 3 and moved.get("reply_snat", 0) >= 2, moved


def test_ipv6_external_traffic_policy_local_without_a_local_backend_drops(
    bed: NodePortBed,
) -> None:
    text = node_port_service(
        "only-remote6", 30093, ipFamilies="[IPv6]", externalTrafficPolicy="Local"
    )
    bed.import_services(text + endpoint_slice("only-remote6", SNAT_POD6))
    before = bed.counters()
    with pytest.raises(OSError):
        echo(bed.fabric.client, 30093, timeout=0.5, host=NODE_IP6)
    assert delta(before, bed.counters()).get("no_backend", 0) >= 1


@pytest.mark.parametrize("family", [4, 6])
def test_udp_port_unreachable_from_a_backend_refuses_the_clients_socket(
    bed: NodePortBed, family: int
) -> None:
    """Nothing listens on the backend pod's UDP port: its ICMP error, translated back,
    reaches the client's connected socket as ECONNREFUSED."""
    text = node_port_service(
        "refuse", 30094, selector="web", protocol="UDP", target=TARGET + 1,
        ipFamilyPolicy="PreferDualStack",
    )  # fmt: skip
    bed.import_services(text)
    before = bed.counters()
    with inside(bed.fabric.client):
        sock = socket.socket(FAMILY[family], socket.SOCK_DGRAM)
    with sock:
        sock.settimeout(3)
        sock.connect((NODE[family], 30094))
        sock.send(b"anyone there?")
        with pytest.raises(ConnectionRefusedError):
            sock.recv(100)
    moved = delta(before, bed.counters())
    assert moved.get("to_local", 0) >= 1 and moved.get("icmp_error", 0) >= 1, moved


def path_mtu(sock: socket.socket) -> int:
    """What the socket's stack knows of the path MTU (IP_MTU / IPV6_MTU)."""
    if sock.family == socket.AF_INET6:
        return sock.getsockopt(socket.IPPROTO_IPV6, IPV6_MTU)
    return sock.getsockopt(socket.IPPROTO_IP, IP_MTU)


@pytest.mark.parametrize("family", [4, 6])
def test_path_mtu_discovery_works_through_a_nodeport(bed: NodePortBed, family: int) -> None:
    """The backend sits behind a 1280-byte link: the hop before it reports the node's
    SNAT'd segments too big to the node, which passes the error on to the client
    translated; the client lowers its path MTU and the megabyte arrives (without the
    translation the big segments vanish and the transfer stalls)."""
    slices = endpoint_slice("narrow", NARROW_POD) + endpoint_slice("narrow", NARROW_POD6, "2")
    bed.import_services(
        node_port_service("narrow", 30095, ipFamilyPolicy="PreferDualStack") + slices
    )
    before = bed.counters()
    message = bytes(range(256)) * 4096
    with inside(bed.fabric.client):
        sock = socket.create_connection((NODE[family], 30095), timeout=10)
    try:
        with sock:
            assert echoed_while_sent(sock, message) == message
            assert path_mtu(sock) <= NARROW_MTU
    finally:  # later tests expect the client's full MTU towards the node
        netns.run(bed.fabric.client, ["ip", f"-{family}", "route", "flush", "cache"])
    moved = delta(before, bed.counters())
    assert moved.get("icmp_error", 0) >= 1 and moved.get("to_snat", 0) >= 1, moved


def assert_backends_answer_directly(bed: NodePortBed, port: int, host: str) -> None:
    """A megabyte each way through a DSR NodePort: one flow, its packets tunnelled to the
    backend host, and the replies reaching the client without the node."""
    before, node_before = bed.counters(), link_stats(bed.agent.node_netns, NODE_DEVICE)
    client_before = link_stats(bed.fabric.client, "eth0")
    decapsulated = bed.fabric.decapsulated(bed.dsr_host)
    # Full-sized segments fit the tunnel only because the node lowered the MSS the
    # client's SYN announced
    message = bytes(range(256)) * 4096
    assert echo_bulk(bed.fabric.client, port, message, host=host) == message
    moved = delta(before, bed.counters())
    assert moved.get("new_flow") == 1 and moved.get("to_dsr", 0) >= 3, moved
    assert moved.get("mss_clamped") == 1, moved
    assert "reply_snat" not in moved and "reply_local" not in moved, moved
    assert bed.fabric.decapsulated(bed.dsr_host) - decapsulated >= moved["to_dsr"]
    # The replies (as many bytes as the requests) reached the client without the node: the
    # node's device received about what the client sent, not that and the replies too.
    node_rx = link_stats(bed.agent.node_netns, NODE_DEVICE)["rx_bytes"] - node_before["rx_bytes"]
    client = link_stats(bed.fabric.client, "eth0")
    client_rx = client["rx_bytes"] - client_before["rx_bytes"]
    client_tx = client["tx_bytes"] - client_before["tx_bytes"]
    assert client_rx >= len(message)
    assert node_rx < client_tx + client_rx / 4, (node_rx, client_tx, client_rx)


def test_dsr_mode_backends_answer_the_client_directly(bed: NodePortBed) -> None:
    """Restarts the agent in DSR mode (flows and links are adopted)."""
    bed.agent.extra_args = [a if a != "snat" else "dsr" for a in bed.agent.extra_args]
    bed.agent.restart()
    bed.import_services(node_port_service("direct", 30082) + endpoint_slice("direct", DSR_POD))
    assert_backends_answer_directly(bed, 30082, NODE_IP)


def test_ipv6_dsr_mode_backends_answer_the_client_directly(bed: NodePortBed) -> None:
    """After the IPv4 DSR test (the agent is in DSR mode): IPv6-in-IPv6 to the backend
    host, whose replies go to the client straight from the frontend's address."""
    service = node_port_service("direct6", 30092, ipFamilies="[IPv6]")
    bed.import_services(service + endpoint_slice("direct6", DSR_POD6))
    assert_backends_answer_directly(bed, 30092, NODE_IP6)


def test_a_restart_without_devices_turns_the_path_off(bed: NodePortBed) -> None:
    """Last: the agent's pinned links on ext0 go when --devices no longer names it."""
    args = bed.agent.extra_args
    at = args.index("--devices")
    bed.agent.extra_args = args[:at] + args[at + 2 :]
    bed.agent.restart()
    assert not (bed.agent.bpf_dir / "nodeport" / "links" / f"{NODE_DEVICE}-ingress").exists()
    before = bed.counters()
    with pytest.raises(OSError):  # nothing on the node listens on the NodePort itself
        echo(bed.fabric.client, 30080, timeout=0.5)
    assert delta(before, bed.counters()) == {}
