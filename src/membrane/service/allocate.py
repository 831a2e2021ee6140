"""ClusterIPs from --service-cidr (and --service-cidr-v6) and NodePorts from 30000-32767:
what a Service asks for is checked, what it leaves out is allocated (lowest free first), and
a re-imported Service keeps what it had, as Kubernetes keeps a Service's ClusterIP."""

from __future__ import annotations

import ipaddress
import itertools
from collections.abc import Iterable
from dataclasses import replace

from membrane.errors import UserError
from membrane.service.model import NODE_PORT_RANGE, ServicePort, ServiceRecord

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Allocator:
    """The addresses and NodePorts in use, for one change: allocating thousands of Services
    in one import costs one pass over each range, not one per Service."""

    def __init__(self, services: Iterable[ServiceRecord], cidrs: dict[int, Network]) -> None:
        self.cidrs = cidrs
        self.ips = {ip for svc in services for ip in svc.cluster_ips}
        self.node_ports = {p.node_port for svc in services for p in svc.ports if p.node_port}
        self._next_ip = {family: int(cidr.network_address) + 1 for family, cidr in cidrs.items()}
        self._next_port = NODE_PORT_RANGE[0]

    def release(self, svc: ServiceRecord) -> None:
        self.ips.difference_update(svc.cluster_ips)
        self.node_ports.difference_update(p.node_port for p in svc.ports)

    def take(self, svc: ServiceRecord) -> None:
        self.ips.update(svc.cluster_ips)
        self.node_ports.update(p.node_port for p in svc.ports if p.node_port)

    def free_ip(self, family: int, field: str) -> str:
        cidr = self.cidrs[family]
        first, last = int(cidr.network_address) + 1, int(cidr.broadcast_address) - 1
        if family == 6:
            last += 1  # IPv6 has no broadcast address
        cls = ipaddress.IPv4Address if family == 4 else ipaddress.IPv6Address
        start = self._next_ip[family]
        for candidate in itertools.chain(range(start, last + 1), range(first, start)):
            text = str(cls(candidate))
            if text not in self.ips:
                self._next_ip[family] = candidate + 1
                return text
        raise UserError(field, f"the service CIDR {cidr} has no free address")

    def free_node_port(self, where: str) -> int:
        low, high = NODE_PORT_RANGE
        start = self._next_port
        for number in itertools.chain(range(start, high + 1), range(low, start)):
            if number not in self.node_ports:
                self._next_port = number + 1
                return number
        raise UserError(f"{where}.ports", f"no free NodePort in {low}-{high}")


def allocate(svc: ServiceRecord, previous: ServiceRecord | None, pool: Allocator) -> ServiceRecord:
    """`svc` with its ClusterIPs and NodePorts set, taken from `pool` (which holds every
    other Service's). `previous`: the Service of that name in force, whose addresses are
    kept and must already be released from `pool`."""
    where = f"Service {svc.ref}: spec"
    cidrs = pool.cidrs
    families = list(svc.ip_families)
    for family in families:
        if family not in cidrs:
            raise UserError(
                f"{where}.ipFamilies", f"IPv{family} needs a dual-stack agent (--ipv6=true)"
            )
    for i, ip in enumerate(svc.external_ips):
        family = ipaddress.ip_address(ip).version
        if family not in cidrs:  # the node has no address of that family to serve it on
            raise UserError(
                f"{where}.externalIPs[{i}]",
                f"{ip} is IPv{family}: it needs a dual-stack agent (--ipv6=true)",
            )
    if svc.prefer_dual_stack:
        families += [f for f in sorted(cidrs) if f not in families][:1]
    kept = {ipaddress.ip_address(ip).version: ip for ip in previous.cluster_ips} if previous else {}
    ips = []
    for i, family in enumerate(families):
        cidr = cidrs[family]
        asked = svc.requested_ips[i] if i < len(svc.requested_ips) else None
        field = f"{where}.clusterIPs[{i}]" if len(svc.requested_ips) > 1 else f"{where}.clusterIP"
        if asked is not None:
            if ipaddress.ip_address(asked) not in cidr:
                raise UserError(field, f"{asked} is outside the service CIDR {cidr}")
            if asked in pool.ips:
                raise UserError(field, f"{asked} is the ClusterIP of another Service")
            if family in kept and kept[family] != asked:
                raise UserError(
                    field, f"is immutable: the Service has {kept[family]} (delete it first)"
                )
            ips.append(asked)
        elif family in kept and kept[family] not in pool.ips:
            ips.append(kept[family])
        else:
            ips.append(pool.free_ip(family, field))
        pool.ips.add(ips[-1])
    kept_ports = {(p.port, p.protocol): p.node_port for p in previous.ports} if previous else {}
    ports: list[ServicePort] = []
    for i, port in enumerate(svc.ports):
        if port.node_port is not None:
            if port.node_port in pool.node_ports:
                raise UserError(
                    f"{where}.ports[{i}].nodePort",
                    f"{port.node_port} is the NodePort of another Service",
                )
        elif svc.service_type != "ClusterIP":
            number = kept_ports.get((port.port, port.protocol))
            if number is None or number in pool.node_ports:
                number = pool.free_node_port(where)
            port = replace(port, node_port=number)
        pool.node_ports.add(port.node_port)
        ports.append(port)
    return replace(svc, cluster_ips=tuple(ips), ports=tuple(ports), ip_families=tuple(families))
