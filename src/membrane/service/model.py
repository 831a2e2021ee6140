"""Services as the agent records them: Kubernetes' Service (frontends and how to balance) and
the endpoints behind it (from EndpointSlices, from `membrane service add --backend`, or from
the pods its selector matches).

Records are immutable and JSON round-trips exactly, so the agent persists them as they are
(membrane.service.store) and a snapshot hands them to readers on other threads.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

PROTOCOLS = {"TCP": 6, "UDP": 17}  # what the socket LB translates
ALGORITHMS = ("random", "maglev")
TRAFFIC_POLICIES = ("Cluster", "Local")
BACKEND_STATES = ("active", "terminating", "maintenance")
DEFAULT_AFFINITY_TIMEOUT = 10800  # Kubernetes' sessionAffinityConfig.clientIP default (3 h)
MAX_AFFINITY_TIMEOUT = 86400
NODE_PORT_RANGE = (30000, 32767)  # Kubernetes' default --service-node-port-range
# Cilium's annotation (honoured with --bpf-lb-algorithm-annotation there; always here).
ALGORITHM_ANNOTATION = "service.cilium.io/lb-algorithm"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"  # an EndpointSlice's service


@dataclass(frozen=True)
class ServicePort:
    name: str
    port: int
    protocol: str  # TCP or UDP
    target_port: int | str  # a number, or the name of the endpoints' port
    node_port: int | None = None

    def describe(self) -> str:
        return f"{self.port}/{self.protocol}"


@dataclass(frozen=True)
class EndpointPort:
    name: str
    port: int
    protocol: str


@dataclass(frozen=True)
class Endpoint:
    """One endpoint of an EndpointSlice (or a backend given by hand): its addresses serve
    the slice's ports."""

    addresses: tuple[str, ...]
    state: str = "active"  # active, terminating or maintenance
    weight: int = 1
    port: int | None = None  # a backend given by hand on its own port (else the slice's)


@dataclass(frozen=True)
class EndpointSliceRecord:
    namespace: str
    name: str
    service: str  # the kubernetes.io/service-name label
    ports: tuple[EndpointPort, ...]
    endpoints: tuple[Endpoint, ...]

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    def to_json(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "name": self.name,
            "service": self.service,
            "ports": [vars(p) for p in self.ports],
            "endpoints": [
                {
                    "addresses": list(e.addresses),
                    "state": e.state,
                    "weight": e.weight,
                    "port": e.port,
                }
                for e in self.endpoints
            ],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EndpointSliceRecord:
        return cls(
            namespace=data["namespace"],
            name=data["name"],
            service=data["service"],
            ports=tuple(EndpointPort(**p) for p in data["ports"]),
            endpoints=tuple(
                Endpoint(tuple(e["addresses"]), e["state"], e["weight"], e.get("port"))
                for e in data["endpoints"]
            ),
        )


@dataclass(frozen=True)
class ServiceRecord:
    namespace: str
    name: str
    ports: tuple[ServicePort, ...]
    cluster_ips: tuple[str, ...] = ()  # given or allocated, IPv4 first
    selector: dict[str, str] | None = None  # None: endpoints come from EndpointSlices only
    external_ips: tuple[str, ...] = ()
    affinity_timeout: int | None = None  # sessionAffinity ClientIP: seconds; None: off
    external_traffic_policy: str = "Cluster"
    internal_traffic_policy: str = "Cluster"
    algorithm: str = "random"
    service_type: str = "ClusterIP"
    ip_families: tuple[int, ...] = (4,)  # the families it needs ClusterIPs of
    prefer_dual_stack: bool = False  # and the other one where the agent is dual-stack
    requested_ips: tuple[str, ...] = ()  # spec.clusterIPs as written (kept on re-import)
    annotations: dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    def with_ips(self, cluster_ips: tuple[str, ...]) -> ServiceRecord:
        return replace(self, cluster_ips=cluster_ips)

    def to_json(self) -> dict[str, Any]:
        return {
            **{k: v for k, v in vars(self).items() if k != "ports"},
            "ports": [vars(p) for p in self.ports],
            "cluster_ips": list(self.cluster_ips),
            "external_ips": list(self.external_ips),
            "ip_families": list(self.ip_families),
            "requested_ips": list(self.requested_ips),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ServiceRecord:
        data = dict(data)
        data["ports"] = tuple(ServicePort(**p) for p in data["ports"])
        for name in ("cluster_ips", "external_ips", "ip_families", "requested_ips"):
            data[name] = tuple(data.get(name, ()))
        return cls(**data)
