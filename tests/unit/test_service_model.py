"""Services without a kernel: Kubernetes YAML into records, ClusterIP and NodePort
allocation, the checks that name a field, and the plan of map entries."""

from __future__ import annotations

import ipaddress
import textwrap

import pytest

from membrane.abi import SVC_MAX_FRONTENDS, SvcFrontendFlag, SvcScope, SvcSetFlag
from membrane.agent.state import EndpointRecord, PortSpec
from membrane.errors import UserError
from membrane.service.allocate import Allocator, allocate
from membrane.service.kubernetes import hand_written, parse_documents
from membrane.service.maps import capacity_problem
from membrane.service.model import EndpointSliceRecord, ServiceRecord
from membrane.service.plan import IdTable, NodeView, Plan, plan, selector_matches

CIDRS = {4: ipaddress.ip_network("198.19.128.0/17"), 6: ipaddress.ip_network("2001:db8:2::/112")}

SERVICE = """
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
  annotations: {service.cilium.io/lb-algorithm: maglev}
spec:
  type: NodePort
  selector: {app: web}
  ipFamilyPolicy: PreferDualStack
  externalIPs: [198.19.5.5]
  sessionAffinity: ClientIP
  externalTrafficPolicy: Local
  ports:
  - {name: http, port: 80, targetPort: http}
  - {name: dns, port: 53, protocol: UDP, targetPort: 5353, nodePort: 30053}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: api-1
  namespace: shop
  labels: {kubernetes.io/service-name: api}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- addresses: [198.18.0.10]
- addresses: [198.18.0.11]
  conditions: {ready: false, terminating: true}
- addresses: [198.18.0.12]
  conditions: {ready: false}
"""


def parse(text: str) -> tuple[list[ServiceRecord], list[EndpointSliceRecord]]:
    return parse_documents(textwrap.dedent(text))


def error_of(text: str) -> str:
    with pytest.raises(UserError) as err:
        parse(text)
    return str(err.value)


def test_a_service_and_a_slice_as_kubernetes_writes_them() -> None:
    (svc,), (eps,) = parse(SERVICE)
    assert svc.key == ("shop", "web") and svc.service_type == "NodePort"
    assert svc.algorithm == "maglev" and svc.affinity_timeout == 10800
    assert svc.external_traffic_policy == "Local" and svc.internal_traffic_policy == "Cluster"
    assert svc.ports[0].target_port == "http" and svc.ports[1].node_port == 30053
    assert svc.ip_families == (4,) and svc.prefer_dual_stack
    assert svc.external_ips == ("198.19.5.5",)
    assert eps.service == "api"
    states = {e.addresses[0]: e.state for e in eps.endpoints}
    assert states == {"198.18.0.10": "active", "198.18.0.11": "terminating"}  # not ready: out
    assert ServiceRecord.from_json(svc.to_json()) == svc
    assert EndpointSliceRecord.from_json(eps.to_json()) == eps


BAD = {
    "no ports": ("ports: []", "document 1: spec.ports: a Service needs at least one port"),
    "port out of range": (
        "ports: [{port: 0}]",
        "document 1: spec.ports[0].port: 0 is not between 1 and 65535",
    ),
    "unknown protocol": (
        "ports: [{port: 80, protocol: ICMP}]",
        "document 1: spec.ports[0].protocol: 'ICMP' is not a supported protocol",
    ),
    "sctp": ("ports: [{port: 80, protocol: SCTP}]", "spec.ports[0].protocol: 'SCTP'"),
    "unnamed multi-port": (
        "ports: [{port: 80}, {port: 81}]",
        "spec.ports[0].name: every port of a multi-port Service needs a name",
    ),
    "bad target name": (
        "ports: [{port: 80, targetPort: Not_A_Name}]",
        "spec.ports[0].targetPort: 'Not_A_Name' is not a port number or name",
    ),
    "node port out of range": (
        "type: NodePort\n  ports: [{port: 80, nodePort: 80}]",
        "spec.ports[0].nodePort: 80 is not between 30000 and 32767",
    ),
    "node port on a ClusterIP": (
        "ports: [{port: 80, nodePort: 30080}]",
        "spec.ports[0].nodePort: only NodePort and LoadBalancer services have one",
    ),
    "headless": ("clusterIP: None\n  ports: [{port: 80}]", "spec.clusterIP: headless"),
    "bad address": ("clusterIP: 1.2.3\n  ports: [{port: 80}]", "spec.clusterIP[0]: '1.2.3'"),
    "external name": ("type: ExternalName\n  ports: [{port: 80}]", "spec.type: ExternalName"),
    "unknown field": ("portz: []", "document 1: spec.portz: unknown field"),
    "affinity timeout": (
        "sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}"
        "\n  ports: [{port: 80}]",
        "spec.sessionAffinityConfig.clientIP.timeoutSeconds: 0 is not between 1 and 86400",
    ),
    "traffic policy": (
        "externalTrafficPolicy: Nearby\n  ports: [{port: 80}]",
        "spec.externalTrafficPolicy: 'Nearby' is not Cluster or Local",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_services_name_the_field(case: str) -> None:
    spec, message = BAD[case]
    text = f"apiVersion: v1\nkind: Service\nmetadata: {{name: s}}\nspec:\n  {spec}\n"
    assert message in error_of(text)


def test_bad_annotation_and_slices_name_the_field() -> None:
    assert "metadata.annotations.service.cilium.io/lb-algorithm: 'fast'" in error_of(
        "apiVersion: v1\nkind: Service\nmetadata: {name: s, annotations: "
        "{service.cilium.io/lb-algorithm: fast}}\nspec: {ports: [{port: 80}]}\n"
    )
    slice_head = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: e"
    assert "metadata.labels.kubernetes.io/service-name" in error_of(
        f"{slice_head}}}\naddressType: IPv4\n"
    )
    labelled = f"{slice_head}, labels: {{kubernetes.io/service-name: s}}}}\n"
    assert "addressType: 'FQDN' is not IPv4 or IPv6" in error_of(f"{labelled}addressType: FQDN\n")
    assert "endpoints[0].addresses[0]: 2001:db8::1 is not IPv4" in error_of(
        f"{labelled}addressType: IPv4\nendpoints: [{{addresses: ['2001:db8::1']}}]\n"
    )
    assert "document 2: metadata.name: Service default/s is defined twice" in error_of(
        "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 80}]}\n---\n"
        "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 80}]}\n"
    )
    assert "document 1: kind: 'Pod' is not Service or EndpointSlice" in error_of("kind: Pod\n")


def service(text: str) -> ServiceRecord:
    head = "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: n}\nspec:\n  "
    return parse(head + text)[0][0]


def test_cluster_ips_are_allocated_kept_and_checked() -> None:
    pool = Allocator([], CIDRS)
    first = allocate(service("ports: [{port: 80}]"), None, pool)
    assert first.cluster_ips == ("198.19.128.1",)
    given = allocate(service("clusterIP: 198.19.128.9\n  ports: [{port: 80}]"), None, pool)
    assert given.cluster_ips == ("198.19.128.9",)
    dual = allocate(service("ipFamilyPolicy: RequireDualStack\n  ports: [{port: 80}]"), None, pool)
    assert dual.cluster_ips == ("198.19.128.2", "2001:db8:2::1")
    # re-imported without an address: it keeps what it had
    pool.release(first)
    again = allocate(service("ports: [{port: 80}]"), first, pool)
    assert again.cluster_ips == first.cluster_ips
    with pytest.raises(UserError, match=r"spec.clusterIP: 198.19.128.9 is the ClusterIP of"):
        allocate(service("clusterIP: 198.19.128.9\n  ports: [{port: 80}]"), None, pool)
    with pytest.raises(UserError, match=r"spec.clusterIP: 10.0.0.1 is outside the service CIDR"):
        allocate(service("clusterIP: 10.0.0.1\n  ports: [{port: 80}]"), None, pool)
    with pytest.raises(UserError, match=r"spec.clusterIP: is immutable"):
        pool.release(first)
        allocate(service("clusterIP: 198.19.128.77\n  ports: [{port: 80}]"), first, pool)
    ipv4_only = Allocator([], {4: CIDRS[4]})
    with pytest.raises(UserError, match=r"ipFamilies: IPv6 needs a dual-stack agent"):
        allocate(service("ipFamilies: [IPv6]\n  ports: [{port: 80}]"), None, ipv4_only)
    with pytest.raises(UserError, match=r"externalIPs\[1\]: 2001:db8:9::10 is IPv6: it needs"):
        text = "externalIPs: [198.19.9.10, '2001:db8:9::10']\n  ports: [{port: 80}]"
        allocate(service(text), None, ipv4_only)
    prefer = allocate(
        service("ipFamilyPolicy: PreferDualStack\n  ports: [{port: 80}]"), None, ipv4_only
    )
    assert prefer.cluster_ips == ("198.19.128.1",)  # the second family only where there is one


def test_node_ports_are_allocated_and_unique() -> None:
    pool = Allocator([], CIDRS)
    a = allocate(service("type: NodePort\n  ports: [{port: 80}]"), None, pool)
    b = allocate(service("type: NodePort\n  ports: [{port: 80, nodePort: 30001}]"), None, pool)
    assert a.ports[0].node_port == 30000 and b.ports[0].node_port == 30001
    with pytest.raises(UserError, match=r"ports\[0\].nodePort: 30001 is the NodePort of another"):
        allocate(service("type: NodePort\n  ports: [{port: 80, nodePort: 30001}]"), None, pool)


def test_allocating_thousands_is_one_pass() -> None:
    pool = Allocator([], CIDRS)
    ips = {allocate(service("ports: [{port: 80}]"), None, pool).cluster_ips[0] for _ in range(5000)}
    assert len(ips) == 5000


def endpoint(name: str, ip: str, labels: dict[str, str], ip6: str | None = None) -> EndpointRecord:
    return EndpointRecord(
        1, "shop", name, "netns", "veth", ip, labels, (PortSpec("http", 8080, "TCP"),), ipv6=ip6
    )


def test_plan_sets_frontends_and_backends() -> None:
    (svc,), (eps,) = parse(SERVICE)
    pool = Allocator([], CIDRS)
    svc = allocate(svc, None, pool)
    api = allocate(service("ports: [{name: http, port: 8000}]"), None, pool)
    api = ServiceRecord.from_json({**api.to_json(), "namespace": "shop", "name": "api"})
    pods = (
        endpoint("w1", "198.18.0.5", {"app": "web"}, "2001:db8:1::5"),
        endpoint("w2", "198.18.0.6", {"k8s:app": "web"}),
        endpoint("x", "198.18.0.7", {"app": "other"}),
    )
    node = NodeView(pods, {4: ("198.19.0.1",), 6: ("2001:db8::1",)}, 16381)
    result = plan([svc, api], [eps], node)
    web = result.sets[("shop", "web", "http", 4, False)]
    assert [b.key for b in web.backends] == [("198.18.0.5", 8080, 6), ("198.18.0.6", 8080, 6)]
    assert web.flags == SvcSetFlag.MAGLEV | SvcSetFlag.AFFINITY and web.maglev_size == 16381
    dns = result.sets[("shop", "web", "dns", 4, False)]
    assert [b.key for b in dns.backends] == [("198.18.0.5", 5353, 17), ("198.18.0.6", 5353, 17)]
    # IPv6: only the pod with an IPv6 address
    web6 = result.sets[("shop", "web", "http", 6, False)]
    assert [b.key[0] for b in web6.backends] == ["2001:db8:1::5"]
    ip4 = svc.cluster_ips[0]
    cluster = result.frontends[(ip4, 80, 6, 4, SvcScope.INTERNAL)]
    assert cluster.set == ("shop", "web", "http", 4, False)
    assert cluster.flags == SvcFrontendFlag.CLUSTER_IP
    # externalTrafficPolicy=Local: from outside only the node's own backends
    node_port = svc.ports[0].node_port
    outside = result.frontends[("198.19.0.1", node_port, 6, 4, SvcScope.EXTERNAL)]
    assert outside.set[4] is True and outside.flags & SvcFrontendFlag.LOCAL
    inside = result.frontends[("198.19.0.1", node_port, 6, 4, SvcScope.INTERNAL)]
    assert inside.set[4] is False
    assert ("198.19.5.5", 80, 6, 4, SvcScope.EXTERNAL) in result.frontends
    # the slice's service: backends by port name, the terminating one kept but not active
    api_set = result.sets[("shop", "api", "http", 4, False)]
    assert {b.key[0]: b.state for b in api_set.backends} == {
        "198.18.0.10": "active",
        "198.18.0.11": "terminating",
    }
    assert [b.key[0] for b in api_set.active] == ["198.18.0.10"]


def test_hand_written_backends() -> None:
    svc, eps = hand_written(
        "shop",
        "db",
        {"ports": [{"port": 5432}]},
        {},
        [
            {"address": "198.18.0.9", "port": None, "weight": 3, "state": "active"},
            {"address": "198.18.0.8", "port": 6432, "weight": 1, "state": "maintenance"},
        ],
    )
    assert eps is not None and eps.service == "db"
    node = NodeView((), {4: ("198.19.0.1",)}, 16381)
    svc = allocate(svc, None, Allocator([], CIDRS))
    backends = plan([svc], [eps], node).sets[("shop", "db", "", 4, False)].backends
    assert [(b.key, b.state, b.weight) for b in backends] == [
        (("198.18.0.8", 6432, 6), "maintenance", 1),
        (("198.18.0.9", 5432, 6), "active", 3),
    ]


def test_selectors_match_with_or_without_the_source_prefix() -> None:
    assert selector_matches({"app": "web"}, {"k8s:app": "web", "tier": "x"})
    assert not selector_matches({"app": "web", "tier": "y"}, {"app": "web", "tier": "x"})


def test_ids_are_stable_and_reused() -> None:
    table = IdTable(10)
    assert [table.assign(k) for k in "abc"] == [1, 2, 3]
    table.keep_only(["a", "c"])
    assert table.assign("d") == 2 and table.assign("a") == 1
    assert IdTable(10, table.to_json()).assign("e") == 4


def test_capacity_is_refused_before_the_maps_are_full() -> None:
    full = Plan()
    for i in range(SVC_MAX_FRONTENDS + 1):
        full.frontends[(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}", 80, 6, 4, 1)] = None  # type: ignore[assignment]
    problem = capacity_problem(full)
    assert problem is not None and "svc_frontends" in problem and "nothing was changed" in problem
    assert capacity_problem(Plan()) is None


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"service_cidr": "198.18.0.0/20"}, "service-cidr: 198.18.0.0/20 overlaps the pod CIDR"),
        ({"service_cidr": "198.19.0.0/24"}, "service-cidr: 198.19.0.0/24 holds the node's address"),
        ({"service_cidr": "nope"}, "service-cidr: 'nope' is not an IPv4 CIDR"),
        ({"service_cidr_v6": "2001:db8:1::/112"}, "service-cidr-v6: 2001:db8:1::/112 overlaps"),
        ({"maglev_table_size": "16380"}, "bpf-lb-maglev-table-size: 16380 is not a prime"),
        ({"lb_algorithm": "roundrobin"}, "bpf-lb-algorithm: 'roundrobin' is not one of"),
    ],
)
def test_agent_service_options_are_checked(options: dict[str, str], message: str) -> None:
    from membrane.agent.config import make_config

    with pytest.raises(UserError) as err:
        make_config("/tmp/x", "/tmp/x.sock", None, "198.18.0.0/16", **options)
    assert message in str(err.value)
    config = make_config("/tmp/x", "/tmp/x.sock", None, "198.18.0.0/16", ipv6="false")
    assert str(config.service_cidr) == "198.19.128.0/17" and config.service_cidr_v6 is None
    assert config.maglev_table_size == 16381 and config.lb_algorithm == "random"
