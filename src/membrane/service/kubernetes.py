"""Kubernetes `Service` (v1) and `EndpointSlice` (discovery.k8s.io/v1) YAML, as users write
them, into service records. Every problem is a UserError naming the document and the field
path (`document 2: spec.ports[0].port`), found before anything is returned.

Supported: ClusterIP, NodePort and LoadBalancer services (a LoadBalancer is served as a
NodePort: no load balancer address is assigned), spec.clusterIP/clusterIPs, ipFamilies and
ipFamilyPolicy, ports with targetPort by number or by name, nodePort, selector,
externalIPs, sessionAffinity ClientIP with sessionAffinityConfig.clientIP.timeoutSeconds,
external/internalTrafficPolicy, and the annotation service.cilium.io/lb-algorithm
(random or maglev). Not supported (refused by name): ExternalName and headless services,
SCTP, FQDN EndpointSlices.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from membrane.errors import UserError
from membrane.policy.parse import _documents
from membrane.service.model import (
    ALGORITHM_ANNOTATION,
    ALGORITHMS,
    DEFAULT_AFFINITY_TIMEOUT,
    MAX_AFFINITY_TIMEOUT,
    NODE_PORT_RANGE,
    PROTOCOLS,
    SERVICE_NAME_LABEL,
    TRAFFIC_POLICIES,
    Endpoint,
    EndpointPort,
    EndpointSliceRecord,
    ServicePort,
    ServiceRecord,
)

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_PORT_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,13}[a-z0-9])?$")  # IANA_SVC_NAME, <= 15
_SERVICE_SPEC = {
    "type", "clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy", "ports", "selector",
    "externalIPs", "sessionAffinity", "sessionAffinityConfig", "externalTrafficPolicy",
    "internalTrafficPolicy", "publishNotReadyAddresses", "allocateLoadBalancerNodePorts",
    "loadBalancerIP", "loadBalancerSourceRanges", "loadBalancerClass", "healthCheckNodePort",
    "trafficDistribution",
}  # fmt: skip
_SERVICE_PORT = {"name", "port", "targetPort", "protocol", "nodePort", "appProtocol"}
_TOP_LEVEL = {"apiVersion", "kind", "metadata", "spec", "status"}
_SLICE_TOP_LEVEL = {"apiVersion", "kind", "metadata", "addressType", "endpoints", "ports"}
_SLICE_ENDPOINT = {
    "addresses", "conditions", "hostname", "nodeName", "targetRef", "zone", "hints",
    "deprecatedTopology",
}  # fmt: skip
_SLICE_PORT = {"name", "port", "protocol", "appProtocol"}
FAMILIES = {"IPv4": 4, "IPv6": 6}


def parse_documents(text: str) -> tuple[list[ServiceRecord], list[EndpointSliceRecord]]:
    """Every Service and EndpointSlice of a YAML stream (empty documents skipped)."""
    services: dict[tuple[str, str], int] = {}
    slices: dict[tuple[str, str], int] = {}
    found_services, found_slices = [], []
    for number, document in _documents(text):
        if document is None:
            continue
        where = f"document {number}"
        if not isinstance(document, dict):
            raise UserError(where, "must be a mapping with apiVersion, kind, metadata and spec")
        kind = document.get("kind")
        if kind == "Service":
            svc = parse_service(document, where)
            _once(services, svc.key, number, f"{where}: metadata.name", "Service")
            found_services.append(svc)
        elif kind == "EndpointSlice":
            eps = parse_endpoint_slice(document, where)
            _once(slices, eps.key, number, f"{where}: metadata.name", "EndpointSlice")
            found_slices.append(eps)
        else:
            raise UserError(f"{where}: kind", f"{kind!r} is not Service or EndpointSlice")
    if not found_services and not found_slices:
        raise UserError("file", "holds no Service or EndpointSlice")
    return found_services, found_slices


def _once(seen: dict[tuple[str, str], int], key: tuple[str, str], number: int, where: str,
          kind: str) -> None:  # fmt: skip
    if key in seen:
        raise UserError(
            where, f"{kind} {key[0]}/{key[1]} is defined twice (also in document {seen[key]})"
        )
    seen[key] = number


def _mapping(value: Any, where: str, allowed: set[str] | None = None) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(where, "must be a mapping")
    if allowed is not None:
        for key in value:
            if key not in allowed:
                raise UserError(f"{where}.{key}" if where else str(key), "unknown field")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise UserError(where, "must be a list")
    return value


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise UserError(where, "must be a string")
    return value


def _port(value: Any, where: str, low: int = 1, high: int = 65535) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(where, f"{value!r} is not a port number")
    if not low <= value <= high:
        raise UserError(where, f"{value} is not between {low} and {high}")
    return value


def _protocol(value: Any, where: str) -> str:
    protocol = "TCP" if value is None else value
    if protocol not in PROTOCOLS:
        raise UserError(where, f"{protocol!r} is not a supported protocol (TCP or UDP)")
    return protocol


def _metadata(document: dict[str, Any], where: str) -> tuple[str, str, dict[str, Any]]:
    meta = _mapping(document.get("metadata"), f"{where}: metadata")
    name = meta.get("name")
    if not isinstance(name, str) or not _DNS_LABEL.match(name):
        raise UserError(f"{where}: metadata.name", f"{name!r} is not a DNS label (RFC 1123)")
    namespace = meta.get("namespace", "default")
    if not isinstance(namespace, str) or not _DNS_LABEL.match(namespace):
        raise UserError(f"{where}: metadata.namespace", f"{namespace!r} is not a DNS label")
    return namespace, name, meta


def _address(value: Any, where: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(_string(value, where))
    except ValueError:
        raise UserError(where, f"{value!r} is not an IP address") from None


def parse_service(document: dict[str, Any], where: str) -> ServiceRecord:
    _mapping(document, where, _TOP_LEVEL)
    if document.get("apiVersion") != "v1":
        raise UserError(f"{where}: apiVersion", f"{document.get('apiVersion')!r} is not v1")
    namespace, name, meta = _metadata(document, where)
    annotations = {str(k): str(v) for k, v in _mapping(meta.get("annotations"), "metadata").items()}
    spec = _mapping(document.get("spec"), f"{where}: spec", _SERVICE_SPEC)
    service_type = spec.get("type", "ClusterIP")
    if service_type == "ExternalName":
        raise UserError(f"{where}: spec.type", "ExternalName services are not supported")
    if service_type not in ("ClusterIP", "NodePort", "LoadBalancer"):
        raise UserError(
            f"{where}: spec.type", f"{service_type!r} is not ClusterIP, NodePort or LoadBalancer"
        )
    ports = _service_ports(spec, f"{where}: spec.ports", service_type != "ClusterIP")
    requested = _cluster_ips(spec, f"{where}: spec")
    families, prefer_dual_stack = _families(spec, requested, f"{where}: spec")
    selector = spec.get("selector")
    if selector is not None:
        selector = {
            str(k): _string(v, f"{where}: spec.selector.{k}")
            for k, v in _mapping(selector, f"{where}: spec.selector").items()
        }
    external_ips = tuple(
        str(_address(ip, f"{where}: spec.externalIPs[{i}]"))
        for i, ip in enumerate(_list(spec.get("externalIPs"), f"{where}: spec.externalIPs"))
    )
    affinity = spec.get("sessionAffinity", "None")
    timeout = None
    if affinity == "ClientIP":
        config = _mapping(spec.get("sessionAffinityConfig"), f"{where}: spec.sessionAffinityConfig")
        client = _mapping(config.get("clientIP"), f"{where}: spec.sessionAffinityConfig.clientIP")
        timeout = client.get("timeoutSeconds", DEFAULT_AFFINITY_TIMEOUT)
        _port(
            timeout,
            f"{where}: spec.sessionAffinityConfig.clientIP.timeoutSeconds",
            1,
            MAX_AFFINITY_TIMEOUT,
        )
    elif affinity != "None":
        raise UserError(f"{where}: spec.sessionAffinity", f"{affinity!r} is not None or ClientIP")
    policies = {}
    for option in ("externalTrafficPolicy", "internalTrafficPolicy"):
        value = spec.get(option, "Cluster")
        if value not in TRAFFIC_POLICIES:
            raise UserError(f"{where}: spec.{option}", f"{value!r} is not Cluster or Local")
        policies[option] = value
    algorithm = annotations.get(ALGORITHM_ANNOTATION, "random")
    if algorithm not in ALGORITHMS:
        raise UserError(
            f"{where}: metadata.annotations.{ALGORITHM_ANNOTATION}",
            f"{algorithm!r} is not {' or '.join(ALGORITHMS)}",
        )
    return ServiceRecord(
        namespace=namespace,
        name=name,
        ports=ports,
        selector=selector,
        external_ips=external_ips,
        affinity_timeout=timeout,
        external_traffic_policy=policies["externalTrafficPolicy"],
        internal_traffic_policy=policies["internalTrafficPolicy"],
        algorithm=algorithm,
        service_type=service_type,
        ip_families=families,
        prefer_dual_stack=prefer_dual_stack,
        requested_ips=requested,
        annotations=annotations,
    )


def _service_ports(spec: dict[str, Any], where: str, node_ports: bool) -> tuple[ServicePort, ...]:
    items = _list(spec.get("ports"), where)
    if not items:
        raise UserError(where, "a Service needs at least one port")
    ports: list[ServicePort] = []
    for i, item in enumerate(items):
        at = f"{where}[{i}]"
        item = _mapping(item, at, _SERVICE_PORT)
        name = item.get("name", "")
        if name and (not isinstance(name, str) or not _PORT_NAME.match(name)):
            raise UserError(f"{at}.name", f"{name!r} is not a port name (IANA_SVC_NAME)")
        if len(items) > 1 and not name:
            raise UserError(f"{at}.name", "every port of a multi-port Service needs a name")
        if "port" not in item:
            raise UserError(f"{at}.port", "is required")
        port = _port(item["port"], f"{at}.port")
        protocol = _protocol(item.get("protocol"), f"{at}.protocol")
        target = item.get("targetPort", port)
        if isinstance(target, str):
            if not _PORT_NAME.match(target):
                raise UserError(f"{at}.targetPort", f"{target!r} is not a port number or name")
        else:
            target = _port(target, f"{at}.targetPort")
        node_port = item.get("nodePort")
        if node_port is not None:
            if not node_ports:
                raise UserError(
                    f"{at}.nodePort", "only NodePort and LoadBalancer services have one"
                )
            node_port = _port(node_port, f"{at}.nodePort", *NODE_PORT_RANGE)
        for other in ports:
            if name and other.name == name:
                raise UserError(f"{at}.name", f"{name!r} is used by another port")
            if (other.port, other.protocol) == (port, protocol):
                raise UserError(f"{at}.port", f"{port}/{protocol} is listed twice")
            if node_port is not None and other.node_port == node_port:
                raise UserError(f"{at}.nodePort", f"{node_port} is used by another port")
        ports.append(ServicePort(name, port, protocol, target, node_port))
    return tuple(ports)


def _cluster_ips(spec: dict[str, Any], where: str) -> tuple[str, ...]:
    """spec.clusterIPs (or clusterIP) as written: addresses, or () to allocate."""
    ips = _list(spec.get("clusterIPs"), f"{where}.clusterIPs")
    single = spec.get("clusterIP")
    if single in (None, ""):
        single = None
    if single == "None" or "None" in ips:
        raise UserError(
            f"{where}.clusterIP", "headless services (clusterIP: None) are not supported"
        )
    if single is not None:
        if ips and ips[0] != single:
            raise UserError(f"{where}.clusterIPs[0]", f"must equal spec.clusterIP ({single})")
        ips = ips or [single]
    field = "clusterIPs" if spec.get("clusterIPs") is not None else "clusterIP"
    found = [_address(ip, f"{where}.{field}[{i}]") for i, ip in enumerate(ips)]
    if len(found) > 2 or (len(found) == 2 and found[0].version == found[1].version):
        raise UserError(f"{where}.clusterIPs", "at most one address of each family")
    return tuple(str(ip) for ip in found)


def _families(
    spec: dict[str, Any], requested: tuple[str, ...], where: str
) -> tuple[tuple[int, ...], bool]:
    """The families the Service needs ClusterIPs of (the agent refuses IPv6 where it is
    IPv4-only), and whether it prefers the other family too (PreferDualStack: added where
    the agent is dual-stack)."""
    names = _list(spec.get("ipFamilies"), f"{where}.ipFamilies")
    families = []
    for i, name in enumerate(names):
        if name not in FAMILIES:
            raise UserError(f"{where}.ipFamilies[{i}]", f"{name!r} is not IPv4 or IPv6")
        families.append(FAMILIES[name])
    if len(set(families)) != len(families):
        raise UserError(f"{where}.ipFamilies", "lists a family twice")
    policy = spec.get("ipFamilyPolicy", "SingleStack")
    if policy not in ("SingleStack", "PreferDualStack", "RequireDualStack"):
        raise UserError(f"{where}.ipFamilyPolicy", f"{policy!r} is not a known policy")
    given = [ipaddress.ip_address(ip).version for ip in requested]
    if not families:
        families = given or [4]
    if given and given != families[: len(given)]:
        raise UserError(f"{where}.clusterIPs", "the addresses' families differ from ipFamilies")
    if policy == "SingleStack" and len(families) > 1:
        raise UserError(f"{where}.ipFamilyPolicy", "SingleStack with two ipFamilies")
    if policy == "RequireDualStack" and len(families) == 1:
        families.append(6 if families[0] == 4 else 4)
    return tuple(families), policy == "PreferDualStack" and len(families) == 1


def parse_endpoint_slice(document: dict[str, Any], where: str) -> EndpointSliceRecord:
    _mapping(document, where, _SLICE_TOP_LEVEL)
    if document.get("apiVersion") != "discovery.k8s.io/v1":
        raise UserError(
            f"{where}: apiVersion", f"{document.get('apiVersion')!r} is not discovery.k8s.io/v1"
        )
    namespace, name, meta = _metadata(document, where)
    labels = _mapping(meta.get("labels"), f"{where}: metadata.labels")
    service = labels.get(SERVICE_NAME_LABEL)
    if not isinstance(service, str) or not _DNS_LABEL.match(service):
        raise UserError(
            f"{where}: metadata.labels.{SERVICE_NAME_LABEL}", "names the slice's Service: required"
        )
    address_type = document.get("addressType")
    if address_type not in FAMILIES:
        raise UserError(f"{where}: addressType", f"{address_type!r} is not IPv4 or IPv6")
    family = FAMILIES[address_type]
    ports = []
    for i, item in enumerate(_list(document.get("ports"), f"{where}: ports")):
        at = f"{where}: ports[{i}]"
        item = _mapping(item, at, _SLICE_PORT)
        port_name = item.get("name") or ""
        if not isinstance(port_name, str):
            raise UserError(f"{at}.name", "must be a string")
        if "port" not in item:
            raise UserError(f"{at}.port", "is required")
        ports.append(
            EndpointPort(
                port_name, _port(item["port"], f"{at}.port"), _protocol(item.get("protocol"), at)
            )
        )
    endpoints = []
    for i, item in enumerate(_list(document.get("endpoints"), f"{where}: endpoints")):
        at = f"{where}: endpoints[{i}]"
        item = _mapping(item, at, _SLICE_ENDPOINT)
        addresses = _list(item.get("addresses"), f"{at}.addresses")
        if not addresses:
            raise UserError(f"{at}.addresses", "an endpoint needs an address")
        found = []
        for j, text in enumerate(addresses):
            address = _address(text, f"{at}.addresses[{j}]")
            if address.version != family:
                raise UserError(f"{at}.addresses[{j}]", f"{address} is not {address_type}")
            found.append(str(address))
        conditions = _mapping(
            item.get("conditions"), f"{at}.conditions", {"ready", "serving", "terminating"}
        )
        if conditions.get("terminating") is True:
            state = "terminating"
        elif conditions.get("ready") is False:
            continue  # not ready and not terminating: not a backend (as kube-proxy)
        else:
            state = "active"
        endpoints.append(Endpoint(tuple(found), state))
    return EndpointSliceRecord(namespace, name, service, tuple(ports), tuple(endpoints))


def hand_written(
    namespace: str,
    name: str,
    spec: dict[str, Any],
    annotations: dict[str, str],
    backends: list[dict[str, Any]],
) -> tuple[ServiceRecord, EndpointSliceRecord | None]:
    """`membrane service add`: the Service checked as an imported one would be, and its
    backends as an EndpointSlice of its own (`<name>-membrane`)."""
    document = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "annotations": annotations},
        "spec": spec,
    }
    svc = parse_service(document, "service")
    if not backends:
        return svc, None
    if len(svc.ports) != 1:
        raise UserError("backend", "backends given by hand need a Service with one port")
    port = svc.ports[0]
    if not isinstance(port.target_port, int) and any(b["port"] is None for b in backends):
        raise UserError("backend", f"give each backend's port (targetPort {port.target_port!r})")
    endpoints = []
    for i, b in enumerate(backends):
        address = _address(b["address"], f"backend[{i}].address")
        endpoints.append(Endpoint((str(address),), b["state"], b["weight"], b["port"]))
    target = port.target_port if isinstance(port.target_port, int) else 0
    slice_ports = (EndpointPort(port.name, target or 1, port.protocol),)
    return svc, EndpointSliceRecord(
        namespace, f"{name}-membrane", name, slice_ports, tuple(endpoints)
    )
