"""Services through the real agent: Kubernetes YAML in, real TCP and UDP connections from
pods and from the node to ClusterIPs (socket LB in a test cgroup, never the root one),
selector-based services following their pods, backends changing under continuous
connects, policy applied after translation, and restart survival."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from membrane import netns
from membrane.agent.endpoints import host_ifname
from membrane.bpf.probe import supports
from membrane.netns.namespace import inside
from membrane.testing.agent import agent_unusable_reason
from membrane.testing.cluster import Cluster, running_cluster, unique_tag
from membrane.testing.pods import Pod, start_echo_server
from membrane.testing.services import (
    connect_many,
    finish,
    hold_connection,
    name_server,
    service_cgroup,
    start_connecting,
    stop_all,
)
from membrane.testing.traffic import echoed_while_sent, free_loopback_port

WEB = textwrap.dedent("""
    apiVersion: v1
    kind: Service
    metadata:
      name: web
      namespace: shop
    spec:
      ipFamilyPolicy: PreferDualStack
      selector:
        app: web
      ports:
      - name: http
        port: 80
        targetPort: http
      - name: dns
        port: 53
        protocol: UDP
        targetPort: 8080
""")


@dataclass
class Env:
    cluster: Cluster
    cgroup: Path
    client: Pod
    metrics: str  # --hubble-metrics-server
    web: dict[str, Pod] = field(default_factory=dict)
    servers: dict[str, Any] = field(default_factory=dict)

    def cli(self, *args: str, check: bool = True, input: str | None = None) -> Any:
        return self.cluster.agent.cli(*args, check=check, input=input)

    def import_yaml(self, text: str, check: bool = True) -> Any:
        return self.cli("service", "import", "-", check=check, input=textwrap.dedent(text))

    def get(self, ref: str) -> dict[str, Any]:
        return dict(json.loads(self.cli("service", "get", ref, "-o", "json").stdout))

    def add_web(self, name: str, labels: dict[str, str] | None = None) -> Pod:
        pod = self.cluster.add_pod(
            "shop", name, labels or {"app": "web"}, ["http=8080/TCP"], serve=False
        )
        self.web[name] = pod
        self.servers[name] = name_server(pod.netns, name, 8080)
        return pod

    def remove_web(self, name: str) -> None:
        stop_all([self.servers.pop(name)])
        self.web.pop(name)
        self.cluster.delete_pod(f"shop/{name}")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    reason = agent_unusable_reason()
    if reason:
        pytest.skip(reason)
    tag = unique_tag("v")
    metrics = f"127.0.0.1:{free_loopback_port()}"
    with (
        service_cgroup(tag) as cgroup,
        running_cluster(
            tmp_path_factory.mktemp("agent"),
            namespaces=("shop",),
            pod_names=("client",),
            tag=tag,
            extra_args=["--cgroup-root", str(cgroup), "--hubble-metrics-server", metrics],
        ) as cluster,
    ):
        e = Env(cluster, cgroup, cluster.pods["shop/client"], metrics)
        try:
            for name in ("web-1", "web-2"):
                e.add_web(name)
            e.import_yaml(WEB)
            yield e
        finally:
            stop_all(list(e.servers.values()))


def cluster_ip(svc: dict[str, Any], family: int = 4) -> str:
    return next(ip for ip in svc["cluster_ips"] if (":" in ip) == (family == 6))


def sliced_service(
    name: str,
    ip: str,
    port: int,
    target_port: int,
    endpoints: list[dict[str, Any]],
    protocol: str = "TCP",
) -> str:
    """YAML of a selectorless Service in shop at a fixed ClusterIP and the EndpointSlice
    that lists its backends (`endpoints`, as Kubernetes writes them)."""
    return f"""
        apiVersion: v1
        kind: Service
        metadata: {{name: {name}, namespace: shop}}
        spec:
          clusterIP: {ip}
          ports: [{{name: port, port: {port}, targetPort: {target_port}, protocol: {protocol}}}]
        ---
        apiVersion: discovery.k8s.io/v1
        kind: EndpointSlice
        metadata:
          name: {name}-1
          namespace: shop
          labels: {{kubernetes.io/service-name: {name}}}
        addressType: IPv4
        ports: [{{name: port, port: {target_port}, protocol: {protocol}}}]
        endpoints: {json.dumps(endpoints)}
    """


def endpoints_at(*addresses: str) -> list[dict[str, Any]]:
    """EndpointSlice endpoints, one a backend address."""
    return [{"addresses": [address]} for address in addresses]


def assert_denied_then_allowed(
    env: Env, cgroup: Path | None, ip: str, deny: str, allow: str
) -> None:
    """The client's connection to ip:80 fails while policy `deny` is in force, and five
    succeed while `allow` is (each removed after)."""
    env.cluster.import_policy(deny)
    try:
        denied = connect_many(env.client.netns, cgroup, ip, 80, count=1)
        assert not denied["answers"] and len(denied["failures"]) == 1
    finally:
        env.cluster.agent.delete_all_policies()
    env.cluster.import_policy(allow)
    try:
        allowed = connect_many(env.client.netns, cgroup, ip, 80, count=5)
        assert not allowed["failures"] and sum(allowed["answers"].values()) == 5
    finally:
        env.cluster.agent.delete_all_policies()


def test_import_allocates_and_shows_the_service(env: Env) -> None:
    svc = env.get("shop/web")
    ip4 = cluster_ip(svc)
    assert ip4.startswith("198.19.128.") or ip4.startswith("198.19.")
    assert len(svc["cluster_ips"]) == 2  # PreferDualStack on a dual-stack agent
    backends = {(b["address"], b["port"], b["protocol"]) for b in svc["backends"]}
    for pod in env.web.values():
        assert (pod.ip, 8080, "TCP") in backends  # targetPort by name: the pod's http port
        assert (pod.ip, 8080, "UDP") in backends
    listed = env.cli("service", "list").stdout
    assert "web" in listed and ip4 in listed


@pytest.mark.parametrize("family", [4, 6])
def test_tcp_and_udp_through_the_cluster_ip_from_a_pod(env: Env, family: int) -> None:
    ip = cluster_ip(env.get("shop/web"), family)
    tcp = connect_many(env.client.netns, env.cgroup, ip, 80, count=30)
    assert not tcp["failures"]
    assert set(tcp["answers"]) == set(env.web)  # random spreads over both backends
    assert tcp["peers"] == [ip]  # getpeername shows the service, not the backend
    for proto in ("udp", "cudp"):
        udp = connect_many(env.client.netns, env.cgroup, ip, 53, count=10, proto=proto)
        assert not udp["failures"], proto
        assert sum(udp["answers"].values()) == 10
        assert udp["peers"] == [ip], proto  # replies come from the service address


def test_the_node_reaches_the_cluster_ip(env: Env) -> None:
    ip = cluster_ip(env.get("shop/web"))
    node_ns = env.cluster.agent.node_netns
    tcp = connect_many(node_ns, env.cgroup, ip, 80, count=20)
    assert not tcp["failures"] and set(tcp["answers"]) <= set(env.web)
    udp = connect_many(node_ns, env.cgroup, ip, 53, count=5, proto="udp")
    assert not udp["failures"] and udp["peers"] == [ip]


# A process the socket LB does not see (outside --cgroup-root): the endpoint programs
# translate its packets to the ClusterIP one by one (bpf/lib/service_nat.h).
OUTSIDE = None


@pytest.mark.parametrize("family", [4, 6])
def test_outside_the_cgroup_the_endpoint_programs_translate(env: Env, family: int) -> None:
    ip = cluster_ip(env.get("shop/web"), family)
    tcp = connect_many(env.client.netns, OUTSIDE, ip, 80, count=30)
    assert not tcp["failures"]  # the SYN-ACK came back from the ClusterIP
    assert set(tcp["answers"]) == set(env.web)  # random spreads over both backends
    assert tcp["peers"] == [ip]
    for proto in ("udp", "cudp"):
        udp = connect_many(env.client.netns, OUTSIDE, ip, 53, count=10, proto=proto)
        assert not udp["failures"], proto
        assert sum(udp["answers"].values()) == 10
        assert udp["peers"] == [ip], proto  # recvfrom: the reply's source is the ClusterIP


def test_outside_the_cgroup_policy_judges_the_backend(env: Env) -> None:
    """The client's egress policy sees the translated packet: a deny of the backends'
    pods drops it, an allow of them (and nothing else) lets it through."""
    ip = cluster_ip(env.get("shop/web"))
    deny = """
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: client-deny-web, namespace: shop}
        spec:
          endpointSelector: {matchLabels: {pod: client}}
          egressDeny:
          - toEndpoints: [{matchLabels: {app: web}}]
    """
    allow = """
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: client-to-web-only, namespace: shop}
        spec:
          endpointSelector: {matchLabels: {pod: client}}
          egress:
          - toEndpoints: [{matchLabels: {app: web}}]
    """
    assert_denied_then_allowed(env, OUTSIDE, ip, deny, allow)


def test_outside_the_cgroup_flows_name_the_service(env: Env) -> None:
    ip = cluster_ip(env.get("shop/web"))
    started = time.time()
    assert not connect_many(env.client.netns, OUTSIDE, ip, 80, count=4)["failures"]
    backends = {p.ip for p in env.web.values()}

    def recent() -> list[dict[str, Any]]:
        return [
            r["flow"] for r in env.cluster.agent.observe(2000)
            if "flow" in r and unix_time(r["flow"]["time"]) >= started
        ]  # fmt: skip

    def seen() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        flows = recent()
        requests = [f for f in flows if f["IP"]["source"] == env.client.ip
                    and f["IP"]["destination"] in backends]  # fmt: skip
        replies = [f for f in flows if f["IP"]["destination"] == env.client.ip
                   and f["IP"]["source"] == ip]  # fmt: skip
        return requests, replies

    deadline = time.monotonic() + 10
    while not all(found := seen()) and time.monotonic() < deadline:
        time.sleep(0.1)
    requests, replies = found
    assert requests, "no flow from the client to a backend (after translation)"
    assert replies, "no reply from the ClusterIP (after the reverse translation)"
    for flow in requests:
        assert flow["destination_service"] == {"namespace": "shop", "name": "web"}
    for flow in replies:
        assert flow["source_service"] == {"namespace": "shop", "name": "web"}


HOLD = textwrap.dedent("""
    import socket, sys
    host, port = sys.argv[1], int(sys.argv[2])
    s = socket.create_connection((host, port), timeout=5)
    for line in sys.stdin:
        s.sendall(b"ping")
        print(s.recv(100).decode(), s.getpeername()[0], flush=True)
""")


def test_outside_the_cgroup_a_connection_survives_a_restart(env: Env) -> None:
    """Conntrack and svc_nat are pinned: an established connection through the per-packet
    translation keeps working across an agent restart, and new ones work while the agent
    is down."""
    echo = {n: start_echo_server(env.web[n].netns, (81,)) for n in env.web}
    env.import_yaml("""
        apiVersion: v1
        kind: Service
        metadata: {name: kept, namespace: shop}
        spec:
          clusterIP: 198.19.128.204
          selector: {app: web}
          ports: [{name: echo, port: 9001, targetPort: 81}]
    """)
    holder = netns.popen(
        env.client.netns,
        [sys.executable, "-c", HOLD, "198.19.128.204", "9001"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    agent = env.cluster.agent
    web_ip = cluster_ip(env.get("shop/web"))
    try:
        assert holder.stdin is not None and holder.stdout is not None

        def echoed() -> str:
            holder.stdin.write("\n")
            holder.stdin.flush()
            return holder.stdout.readline().strip()

        assert echoed() == "ping 198.19.128.204"
        agent.stop()
        try:
            assert echoed() == "ping 198.19.128.204"
            down = connect_many(env.client.netns, OUTSIDE, web_ip, 80, count=5)
            assert not down["failures"]
        finally:
            agent.start()
        assert echoed() == "ping 198.19.128.204"
    finally:
        stop_all([holder, *echo.values()])
        env.cli("service", "delete", "shop/kept", check=False)


CONNECTED_UDP = textwrap.dedent("""
    import socket, sys
    host, port = sys.argv[1], int(sys.argv[2])
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(3)
    s.connect((host, port))
    s.send(b"anyone there?")
    try:
        s.recv(100)
        print("answered")
    except OSError as err:
        print(type(err).__name__)
""")


@pytest.mark.parametrize("family", [4, 6])
def test_outside_the_cgroup_a_closed_udp_port_refuses_through_the_cluster_ip(
    env: Env, family: int
) -> None:
    """Nothing listens on the backends' UDP port: a backend's port unreachable, rewritten
    by the client's endpoint program (quote and source: the ClusterIP), reaches the
    client's connected socket as ECONNREFUSED (without the rewrite it times out)."""
    env.import_yaml("""
        apiVersion: v1
        kind: Service
        metadata: {name: closed, namespace: shop}
        spec:
          ipFamilyPolicy: PreferDualStack
          selector: {app: web}
          ports: [{name: nothing, port: 5400, protocol: UDP, targetPort: 5999}]
    """)
    try:
        ip = cluster_ip(env.get("shop/closed"), family)
        result = netns.run(
            env.client.netns, [sys.executable, "-c", CONNECTED_UDP, ip, "5400"], timeout=20
        )
        assert result.stdout.strip() == "ConnectionRefusedError", result.stdout
    finally:
        env.cli("service", "delete", "shop/closed", check=False)


IP_MTU, IPV6_MTU = 14, 24  # linux/in.h, linux/in6.h: Python's socket module lacks them


@pytest.mark.parametrize("family", [4, 6])
def test_outside_the_cgroup_path_mtu_discovery_works_through_the_cluster_ip(
    env: Env, family: int
) -> None:
    """The backend's node-side veth carries 1280 bytes: the node reports the client's
    full-sized segments (to the backend, after translation) too big; the client's
    endpoint program gives the quote the ClusterIP back, the client's socket lowers its
    path MTU and the megabyte arrives (without the rewrite the transfer stalls)."""
    narrow = env.cluster.add_pod("shop", "narrow", {"app": "narrow"}, serve=False)
    echo = start_echo_server(narrow.netns, (8090,))
    node_ns = env.cluster.agent.node_netns
    env.import_yaml("""
        apiVersion: v1
        kind: Service
        metadata: {name: narrow, namespace: shop}
        spec:
          ipFamilyPolicy: PreferDualStack
          selector: {app: narrow}
          ports: [{name: echo, port: 9003, targetPort: 8090}]
    """)
    try:
        netns.run(node_ns, ["ip", "link", "set", host_ifname(narrow.id), "mtu", "1280"])
        ip = cluster_ip(env.get("shop/narrow"), family)
        message = bytes(range(256)) * 4096
        with inside(env.client.netns):
            sock = socket.create_connection((ip, 9003), timeout=10)
        with sock:
            assert echoed_while_sent(sock, message) == message
            level, option = (
                (socket.IPPROTO_IPV6, IPV6_MTU) if family == 6 else (socket.IPPROTO_IP, IP_MTU)
            )
            assert sock.getsockopt(level, option) <= 1280
    finally:
        stop_all([echo])
        env.cli("service", "delete", "shop/narrow", check=False)
        env.cluster.delete_pod("shop/narrow")
        # later tests expect the client's full MTU
        netns.run(env.client.netns, ["ip", f"-{family}", "route", "flush", "cache"], check=False)


def test_outside_the_cgroup_a_pod_reaching_its_own_service_gets_another_backend(
    env: Env,
) -> None:
    """Hairpin: a backend pod connecting to its own service through the per-packet path
    never gets itself (its stack would drop the answer from its own address as a
    martian): always the other backend; with itself the only backend, every attempt
    fails (dropped as SERVICE_BACKEND_NOT_FOUND), not by chance."""
    ip = cluster_ip(env.get("shop/web"))
    web1 = env.web["web-1"]
    seen = connect_many(web1.netns, OUTSIDE, ip, 80, count=20)
    assert not seen["failures"] and seen["answers"] == {"web-2": 20}
    env.import_yaml(sliced_service("itself", "198.19.128.206", 9002, 8080, endpoints_at(web1.ip)))
    try:
        alone = connect_many(web1.netns, OUTSIDE, "198.19.128.206", 9002, count=1)
        assert not alone["answers"] and len(alone["failures"]) == 1
        other = connect_many(env.client.netns, OUTSIDE, "198.19.128.206", 9002, count=3)
        assert other["answers"] == {"web-1": 3}  # everyone else still reaches it
    finally:
        env.cli("service", "delete", "shop/itself", check=False)


def test_selector_follows_pods_coming_and_going(env: Env) -> None:
    ip = cluster_ip(env.get("shop/web"))
    env.add_web("web-3")
    try:
        addresses = {b["address"] for b in env.get("shop/web")["backends"]}
        assert env.web["web-3"].ip in addresses
        seen = connect_many(env.client.netns, env.cgroup, ip, 80, count=60)
        assert "web-3" in seen["answers"] and not seen["failures"]
    finally:
        gone = env.web["web-3"].ip
        env.remove_web("web-3")
    assert gone not in {b["address"] for b in env.get("shop/web")["backends"]}
    after = connect_many(env.client.netns, env.cgroup, ip, 80, count=30)
    assert set(after["answers"]) == {"web-1", "web-2"} and not after["failures"]


def test_endpoint_slices_and_backend_states(env: Env) -> None:
    web1, web2 = env.web["web-1"].ip, env.web["web-2"].ip
    ready, terminating = endpoints_at(web1, web2)
    ready["conditions"] = {"ready": True}
    terminating["conditions"] = {"ready": False, "serving": True, "terminating": True}
    env.import_yaml(sliced_service("api", "198.19.128.200", 8000, 8080, [ready, terminating]))
    try:
        svc = env.get("shop/api")
        assert svc["cluster_ips"] == ["198.19.128.200"]
        states = {b["address"]: b["state"] for b in svc["backends"]}
        assert states == {web1: "active", web2: "terminating"}
        seen = connect_many(env.client.netns, env.cgroup, "198.19.128.200", 8000, count=30)
        assert seen["answers"] == {"web-1": 30}  # never the terminating one
    finally:
        env.cli("service", "delete", "shop/api")


BAD = [
    ("ports: []", "spec.ports: a Service needs at least one port"),
    ("ports: [{port: 70000}]", "spec.ports[0].port: 70000 is not between 1 and 65535"),
    ("ports: [{port: 80, protocol: ICMP}]", "spec.ports[0].protocol"),
    ("clusterIP: 10.0.0.1\n  ports: [{port: 80}]", "spec.clusterIP: 10.0.0.1 is outside"),
]


@pytest.mark.parametrize(("spec", "message"), BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_bad_input_exits_2_naming_the_field_and_changes_nothing(
    env: Env, spec: str, message: str
) -> None:
    before = env.cli("service", "list", "-o", "json").stdout
    text = "apiVersion: v1\nkind: Service\nmetadata: {name: bad, namespace: shop}\n"
    text += f"spec:\n  {spec}\n"
    result = env.cli("service", "import", "-", check=False, input=text)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert env.cli("service", "list", "-o", "json").stdout == before


def test_a_backend_outside_every_pod_cidr_is_refused(env: Env) -> None:
    result = env.cli(
        "service", "add", "shop/far", "--port", "80", "--backend", "192.0.2.1", check=False
    )
    assert result.returncode == 2
    assert "addresses[0]: 192.0.2.1 is not a pod address" in result.stderr
    assert "far" not in env.cli("service", "list").stdout


def test_no_failed_connect_while_backends_change(env: Env) -> None:
    """Backends added and removed (by EndpointSlice) under continuous connects."""

    def churn(*names: str) -> str:
        return sliced_service(
            "churn", "198.19.128.201", 8000, 8080, endpoints_at(*(env.web[n].ip for n in names))
        )

    env.import_yaml(churn("web-1"))
    try:
        client = start_connecting(env.client.netns, env.cgroup, "198.19.128.201", 8000, 4.0)
        for step in (("web-1", "web-2"), ("web-2",), ("web-1", "web-2"), ("web-1",)) * 2:
            env.import_yaml(churn(*step))
            time.sleep(0.2)  # let connects happen against each set
        result = finish(client)
        assert not result["failures"], result["failures"][:5]
        assert set(result["answers"]) == {"web-1", "web-2"}
        assert sum(result["answers"].values()) > 50
    finally:
        env.cli("service", "delete", "shop/churn")


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_connections_to_a_removed_backend_are_closed(env: Env, proto: str) -> None:
    """The socket LB's connections to a backend that leaves are destroyed (SOCK_DESTROY):
    TCP is reset, a connected UDP socket sees ECONNABORTED; the others stay."""
    if not supports("sock_destroy"):
        pytest.skip("the kernel has no SOCK_DESTROY (CONFIG_INET_DIAG_DESTROY)")
    echo = {n: start_echo_server(env.web[n].netns, (81,)) for n in ("web-1", "web-2")}

    def held(*names: str) -> str:
        backends = endpoints_at(*(env.web[n].ip for n in names))
        return sliced_service("held", "198.19.128.203", 9000, 81, backends, proto.upper())

    holders: list[subprocess.Popen[str]] = []
    try:
        env.import_yaml(held("web-1"))
        holders.append(hold_connection(env.client.netns, env.cgroup, "198.19.128.203", 9000, proto))
        env.import_yaml(held("web-2"))
        out, _ = holders[0].communicate(timeout=10)
        assert out.strip() in ("closed ECONNABORTED", "closed ECONNRESET")
        # a connection to the backend that stays is left alone
        holders.append(hold_connection(env.client.netns, env.cgroup, "198.19.128.203", 9000, proto))
        env.import_yaml(held("web-2", "web-1"))
        assert holders[1].poll() is None
    finally:
        stop_all([*holders, *echo.values()])
        env.cli("service", "delete", "shop/held", check=False)


def test_policy_applies_to_the_backend_after_translation(env: Env) -> None:
    ip = cluster_ip(env.get("shop/web"))
    deny = """
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: web-deny-client, namespace: shop}
        spec:
          endpointSelector: {matchLabels: {app: web}}
          ingressDeny:
          - fromEndpoints: [{matchLabels: {pod: client}}]
    """
    allow = """
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: web-allow-client, namespace: shop}
        spec:
          endpointSelector: {matchLabels: {app: web}}
          ingress:
          - fromEndpoints: [{matchLabels: {pod: client}}]
    """
    assert_denied_then_allowed(env, env.cgroup, ip, deny, allow)


def test_maglev_and_session_affinity(env: Env) -> None:
    env.import_yaml("""
        apiVersion: v1
        kind: Service
        metadata:
          name: sticky
          namespace: shop
          annotations: {service.cilium.io/lb-algorithm: maglev}
        spec:
          clusterIP: 198.19.128.202
          selector: {app: web}
          sessionAffinity: ClientIP
          sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}
          ports: [{port: 80, targetPort: 8080}]
    """)
    try:
        svc = env.get("shop/sticky")
        assert svc["lb_algorithm"] == "maglev" and svc["maglev_table_size"] == 16381
        assert svc["session_affinity"] == "ClientIP"
        seen = connect_many(env.client.netns, env.cgroup, "198.19.128.202", 80, count=20)
        assert not seen["failures"] and len(seen["answers"]) == 1  # one client, one backend
    finally:
        env.cli("service", "delete", "shop/sticky")


def test_services_survive_a_restart_and_translate_while_the_agent_is_down(env: Env) -> None:
    agent = env.cluster.agent
    ip = cluster_ip(env.get("shop/web"))
    before = env.get("shop/web")
    agent.stop()
    try:
        down = connect_many(env.client.netns, env.cgroup, ip, 80, count=10)
        assert not down["failures"] and set(down["answers"]) <= set(env.web)
    finally:
        agent.start()
    assert env.get("shop/web") == before
    links = sorted(p.name for p in (agent.bpf_dir / "services" / "links").iterdir())
    assert "sock_connect4" in links
    shown = subprocess.run(
        ["bpftool", "-j", "cgroup", "show", str(env.cgroup)],
        capture_output=True,
        text=True,
        check=True,
    )
    names = [p["name"] for p in json.loads(shown.stdout)]
    assert names.count("sock_connect4") == 1  # adopted, not attached twice
    after = connect_many(env.client.netns, env.cgroup, ip, 80, count=10)
    assert not after["failures"]


def test_flows_name_the_service_the_connection_went_through(env: Env) -> None:
    ip = cluster_ip(env.get("shop/web"))
    started = time.time()  # earlier tests' flows name the Services they went through
    result = connect_many(env.client.netns, env.cgroup, ip, 80, count=4)
    assert not result["failures"]
    backends = {p.ip for p in env.web.values()}

    def to_backends() -> list[dict[str, Any]]:
        flows = [
            r["flow"] for r in env.cluster.agent.observe(2000)
            if "flow" in r and unix_time(r["flow"]["time"]) >= started
        ]  # fmt: skip
        return [
            f for f in flows
            if f["IP"]["source"] == env.client.ip and f["IP"]["destination"] in backends
            and f.get("l4", {}).get("TCP", {}).get("destination_port") == 8080
        ]  # fmt: skip

    deadline = time.monotonic() + 10
    while not (seen := to_backends()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert seen, "no flow from the client to a backend"
    for flow in seen:
        assert flow["destination_service"] == {"namespace": "shop", "name": "web"}
    # Hubble's --to-service filter finds them
    out = env.cli("observe", "--last", "2000", "--to-service", "shop/web", "-o", "json").stdout
    filtered = [json.loads(line)["flow"] for line in out.splitlines() if line.strip()]
    assert filtered and all(f["destination_service"]["name"] == "web" for f in filtered)
    replies = [
        r["flow"] for r in env.cluster.agent.observe(2000)
        if "flow" in r and r["flow"]["IP"]["destination"] == env.client.ip
        and r["flow"]["IP"]["source"] in backends and unix_time(r["flow"]["time"]) >= started
    ]  # fmt: skip
    for flow in replies:
        assert flow["source_service"] == {"namespace": "shop", "name": "web"}
    # a flow that is no service's names none
    services = backends | set(env.get("shop/web")["cluster_ips"])
    others = [
        r["flow"] for r in env.cluster.agent.observe(2000)
        if "flow" in r and r["flow"]["IP"]["destination"] not in services
        and r["flow"]["IP"]["source"] not in services
    ]  # fmt: skip
    assert all("destination_service" not in f and "source_service" not in f for f in others)


GONE = """
    apiVersion: v1
    kind: Service
    metadata: {name: gone, namespace: shop}
    spec:
      selector: {app: gone}
      ports: [{name: http, port: 81, targetPort: http}]
"""


def flows_processed(env: Env) -> float:
    """hubble_flows_processed_total over all its labels: the flows the agent has read."""
    with urllib.request.urlopen(f"http://{env.metrics}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "hubble_flows_processed"
        for sample in family.samples
        if sample.name == "hubble_flows_processed_total"
    )


def wait_until_read(env: Env, quiet: float = 0.5, timeout: float = 20) -> None:
    """Until the agent has read every flow so far: its count stayed the same for `quiet`
    seconds (nothing else sends here). Reading them does not build them."""
    deadline = time.monotonic() + timeout
    last, since = flows_processed(env), time.monotonic()
    while time.monotonic() - since < quiet:
        assert time.monotonic() < deadline, "the agent never stopped reading flows"
        time.sleep(0.05)
        now = flows_processed(env)
        if now != last:
            last, since = now, time.monotonic()


def unix_time(text: str) -> float:
    """An RFC 3339 time as Hubble's JSON writes it (up to 9 digits of fraction)."""
    whole, _, fraction = text.rstrip("Z").partition(".")
    at = datetime.strptime(whole, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
    return at.timestamp() + float(f"0.{fraction or 0}")


def test_flows_keep_the_service_they_went_through_after_it_is_deleted(env: Env) -> None:
    """The Service is named when the agent reads a flow, not when it is shown: flows of
    connections made through shop/gone (read, never shown, before it goes) name it after
    it is deleted, and those of later connections straight to the same backend name none."""
    backend = env.add_web("gone-1", {"app": "gone"})
    try:
        env.import_yaml(GONE)
        ip = cluster_ip(env.get("shop/gone"))
        assert not connect_many(env.client.netns, env.cgroup, ip, 81, count=3)["failures"]
        wait_until_read(env)
        env.cli("service", "delete", "shop/gone")
        deleted_at = time.time()
        direct = connect_many(env.client.netns, env.cgroup, backend.ip, 8080, count=3)
        assert not direct["failures"]
        wait_until_read(env)
        flows = [r["flow"] for r in env.cluster.agent.observe(4000) if "flow" in r]
        flows = [f for f in flows if backend.ip in (f["IP"]["source"], f["IP"]["destination"])]
        before = [f for f in flows if unix_time(f["time"]) < deleted_at]
        after = [f for f in flows if unix_time(f["time"]) > deleted_at]
        gone = {"namespace": "shop", "name": "gone"}
        assert before and after
        for flow in before:
            to_backend = flow["IP"]["destination"] == backend.ip
            assert flow.get("destination_service" if to_backend else "source_service") == gone
        assert all("destination_service" not in f and "source_service" not in f for f in after)
    finally:
        env.cli("service", "delete", "shop/gone", check=False)
        env.remove_web("gone-1")
