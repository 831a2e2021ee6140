"""The agent's services: records as imported or added, kept in --state-dir/services.json,
brought into the service maps after every change (and after every endpoint change, so
selector-based Services follow their pods).

A change is checked whole before anything is written (bad input and map capacity raise
UserError); a change whose map writes fail part of the way is undone by bringing the maps
back to the records in force.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from membrane import netns
from membrane.abi import SVC_XLATE_EP_MARK
from membrane.agent.state import EndpointRecord, _write_atomically
from membrane.errors import NotFound, UserError
from membrane.service.allocate import Allocator, Network, allocate
from membrane.service.maps import ServiceIds, ServiceMaps, address16
from membrane.service.model import EndpointSliceRecord, ServiceRecord
from membrane.service.plan import NodeView, Plan, key_text, local_addresses, merge, plan_service
from membrane.service.views import service_view

if TYPE_CHECKING:
    from membrane.agent.config import AgentConfig
    from membrane.service.socklb import SocketLb

log = logging.getLogger("membrane.service")
STORE_VERSION = 1
SO_NETNS_COOKIE = 71  # asm-generic/socket.h (Linux 5.14)
Services = dict[tuple[str, str], ServiceRecord]
Slices = dict[tuple[str, str], EndpointSliceRecord]
PRESSURE_WARNING = 0.9


@dataclass(frozen=True)
class FlowIndex:
    """What naming a flow's service needs, published whole after each change (the flow
    reader's thread reads it): the backends (address, port, protocol), the Service of
    each rev-NAT id, and the Service of each frontend (address, port, protocol): a flow
    seen before a per-packet translation, or a reply after it, names the frontend."""

    backends: frozenset[tuple[str, int, int]] = frozenset()
    services: dict[int, tuple[str, str]] = field(default_factory=dict)
    frontends: dict[tuple[str, int, int], tuple[str, str]] = field(default_factory=dict)

    @cached_property
    def backend_ports(self) -> frozenset[int]:
        """The ports a flow of some Service has on its service side (a backend's or a
        frontend's)."""
        return frozenset(port for _, port, _ in self.backends) | frozenset(
            port for _, port, _ in self.frontends
        )


@dataclass
class _Part:
    """A Service's part of the plan, what it was planned from, and its view (made once)."""

    service: ServiceRecord
    slices: tuple[EndpointSliceRecord, ...] | None
    plan: Plan
    view: dict[str, Any] | None = None


@dataclass(frozen=True)
class ServiceSettings:
    cidrs: dict[int, Network]  # family -> service CIDR
    pod_cidrs: tuple[Network, ...]  # where backends must be
    default_algorithm: str = "random"


class ServiceStore:
    """services.json: Services, EndpointSlices and the ids the maps use."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / "services.json"

    def load(self) -> tuple[Services, Slices, ServiceIds]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}, {}, ServiceIds.from_json(None)
        if data.get("version") != STORE_VERSION:
            raise ValueError(f"{self.path}: unknown version {data.get('version')!r}")
        services = [ServiceRecord.from_json(s) for s in data.get("services", [])]
        slices = [EndpointSliceRecord.from_json(s) for s in data.get("slices", [])]
        return (
            {s.key: s for s in services},
            {s.key: s for s in slices},
            ServiceIds.from_json(data.get("ids")),
        )

    def remove(self) -> None:
        """Forget every service (agent reset)."""
        self.path.unlink(missing_ok=True)

    def save(
        self,
        services: Iterable[ServiceRecord],
        slices: Iterable[EndpointSliceRecord],
        ids: ServiceIds,
    ) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomically(
            self.path,
            {
                "version": STORE_VERSION,
                "services": [s.to_json() for s in services],
                "slices": [s.to_json() for s in slices],
                "ids": ids.to_json(),
            },
        )


class ServiceManager:
    def __init__(
        self,
        settings: ServiceSettings,
        store: ServiceStore,
        socket_lb: SocketLb,
        node_view: Callable[[], NodeView],
        namespaces: Callable[[], Iterable[str | None]] = lambda: (),
        node_netns: str | None = None,
    ) -> None:
        self.settings = settings
        self.namespaces = namespaces  # where sockets to removed backends may live
        self.node_netns = node_netns  # the node's own (None: the agent's)
        self.terminate_connections = True
        self.flow_index = FlowIndex()
        self._netns_cookies: dict[str | None, int] = {}
        self.store = store
        self.socket_lb = socket_lb
        self.maps: ServiceMaps = socket_lb.maps
        self.node_view = node_view
        self.services, self.slices, self.ids = store.load()
        self.plan = Plan()
        self.views: dict[tuple[str, str], dict[str, Any]] = {}  # replaced whole: readers
        # Each Service's part of the plan, with what it was planned from: a change re-plans
        # (and re-views) only the Services whose record or EndpointSlices changed, all of
        # them when the node's endpoints did.
        self._parts: dict[tuple[str, str], _Part] = {}
        self._parts_node: NodeView | None = None

    # ---- changes -----------------------------------------------------------------------
    def sync(self) -> None:
        """Bring the maps to the records (start-up, and after endpoints changed)."""
        self._apply(self.services, self.slices)

    def follow_endpoints(self) -> None:
        """Endpoints came or went: only services that select pods, or keep to this node's
        (traffic policy Local), can change with them."""
        if any(
            svc.selector is not None
            or "Local" in (svc.external_traffic_policy, svc.internal_traffic_policy)
            for svc in self.services.values()
        ):
            self.sync()

    def import_yaml(self, text: str) -> dict[str, Any]:
        from membrane.service.kubernetes import parse_documents

        services, slices = parse_documents(text)
        new_services = dict(self.services)
        new_slices = dict(self.slices)
        pool = Allocator(self.services.values(), self.settings.cidrs)
        for svc in services:
            previous = self.services.get(svc.key)
            if previous is not None:
                pool.release(previous)
            new_services[svc.key] = self._checked(allocate(svc, previous, pool))
        for eps in slices:
            self._check_backends(eps)
            new_slices[eps.key] = eps
        self._apply(new_services, new_slices)
        return {
            "services": [self.views[s.key] for s in services],
            "endpoint_slices": [f"{s.namespace}/{s.name}" for s in slices],
            "warnings": self._pressure_warnings(),
        }

    def add(self, svc: ServiceRecord, backends: EndpointSliceRecord | None) -> dict[str, Any]:
        """`membrane service add`: a Service and, when given, its hand-written backends."""
        previous = self.services.get(svc.key)
        if previous is not None:
            raise UserError("service", f"{svc.ref} exists already (delete it, or import YAML)")
        pool = Allocator(self.services.values(), self.settings.cidrs)
        new_services = {**self.services, svc.key: self._checked(allocate(svc, None, pool))}
        new_slices = dict(self.slices)
        if backends is not None:
            self._check_backends(backends)
            new_slices[backends.key] = backends
        self._apply(new_services, new_slices)
        return self.views[svc.key]

    def delete(self, namespace: str, name: str) -> dict[str, Any]:
        key = (namespace, name)
        if key not in self.services:
            raise NotFound("service", f"{namespace}/{name} does not exist")
        view = self.views[key]
        new_services = {k: v for k, v in self.services.items() if k != key}
        # its EndpointSlices go with it (Kubernetes' garbage collector does the same)
        new_slices = {k: s for k, s in self.slices.items() if (s.namespace, s.service) != key}
        self._apply(new_services, new_slices)
        return view

    def _apply(
        self,
        services: Services,
        slices: Slices,
    ) -> None:
        node = self.node_view()
        parts = self._planned(services, slices, node)
        new_plan = merge(part.plan for part in parts.values())
        if services:
            self.socket_lb.attach()  # once; a node without services has no hooks
        try:
            ids = self.maps.apply(new_plan, self.ids)
        except UserError:
            raise  # refused before any write
        except BaseException:
            log.exception("service map write failed; restoring the services in force")
            try:
                self.ids = self.maps.apply(self.plan, self.ids)
            except Exception:
                log.exception("the service maps could not be restored")
            raise
        removed = {(k[0], k[1]) for k in self.plan.backends()} - {
            (k[0], k[1]) for k in new_plan.backends()
        }
        self.services, self.slices, self.ids, self.plan = services, slices, ids, new_plan
        self._parts, self._parts_node = parts, node
        if removed:
            self._terminate(removed)
        self.store.save(services.values(), slices.values(), ids)
        for part in parts.values():
            if part.view is None:
                part.view = service_view(part.service, part.plan, ids, node)
        self.views = {key: parts[key].view for key in sorted(services)}  # type: ignore[misc]
        by_frontend = {(k[0], k[1], k[3]): fe.service for k, fe in new_plan.frontends.items()}
        self.flow_index = FlowIndex(
            frozenset(new_plan.backends()),
            {ids.revnat.ids[key_text(k)]: svc for k, svc in by_frontend.items()},
            {(k[0], k[1], k[2]): fe.service for k, fe in new_plan.frontends.items()},
        )

    def _planned(self, services: Services, slices: Slices, node: NodeView) -> dict[Any, _Part]:
        """Each Service's part of the plan: the one in force where nothing it was planned
        from changed, planned anew otherwise."""
        by_service: dict[tuple[str, str], list[EndpointSliceRecord]] = {}
        for eps in slices.values():
            by_service.setdefault((eps.namespace, eps.service), []).append(eps)
        known = self._parts if node == self._parts_node else {}
        local = local_addresses(node)
        parts = {}
        for key, svc in services.items():
            own = tuple(by_service[key]) if key in by_service else None
            part = known.get(key)
            if part is None or part.service != svc or part.slices != own:
                part = _Part(svc, own, plan_service(svc, own, node, local))
            parts[key] = part
        return parts

    def _terminate(self, removed: set[tuple[str, int]]) -> None:
        """Close the connections the socket LB made to backends that are gone."""
        from membrane.service.terminate import DestroyUnsupported, Target, destroy_everywhere

        if not self.terminate_connections:
            return
        cookies = self.maps.translated_sockets(removed)
        targets = [Target(a, p, frozenset(c)) for (a, p), c in cookies.items()]
        if not targets:
            return
        try:
            closed = destroy_everywhere(self.namespaces(), targets)
        except DestroyUnsupported:
            self.terminate_connections = False
            log.warning(
                "this kernel cannot destroy sockets (CONFIG_INET_DIAG_DESTROY): connections "
                "to removed backends stay open until they end"
            )
            return
        log.info("connections to removed backends closed", extra={"fields": {"sockets": closed}})

    # ---- checks ------------------------------------------------------------------------
    def _checked(self, svc: ServiceRecord) -> ServiceRecord:
        where = f"Service {svc.ref}: spec"
        for i, ip in enumerate(svc.external_ips):
            address = ipaddress.ip_address(ip)
            if any(address in cidr for cidr in self.settings.cidrs.values()):
                raise UserError(f"{where}.externalIPs[{i}]", f"{ip} is inside the service CIDR")
            if address.is_loopback or address.is_multicast or address.is_unspecified:
                raise UserError(f"{where}.externalIPs[{i}]", f"{ip} is not a unicast address")
        if svc.algorithm == "random" and "service.cilium.io/lb-algorithm" not in svc.annotations:
            svc = replace(svc, algorithm=self.settings.default_algorithm)
        return svc

    def _check_backends(self, eps: EndpointSliceRecord) -> None:
        where = f"EndpointSlice {eps.namespace}/{eps.name}: endpoints"
        for i, ep in enumerate(eps.endpoints):
            for j, text in enumerate(ep.addresses):
                address = ipaddress.ip_address(text)
                if not any(
                    address.version == c.version and address in c for c in self.settings.pod_cidrs
                ):
                    cidrs = ", ".join(str(c) for c in self.settings.pod_cidrs)
                    raise UserError(
                        f"{where}[{i}].addresses[{j}]",
                        f"{text} is not a pod address (outside {cidrs})",
                    )

    def _pressure_warnings(self) -> list[str]:
        warnings = []
        counts = {
            "svc_frontends": len(self.plan.frontends),
            "svc_backends": len(self.plan.backends()),
            "svc_slots": sum(len(s.slots()) for s in self.plan.sets.values()),
        }
        for name, count in counts.items():
            size = self.maps.maps()[name].max_entries
            if count > PRESSURE_WARNING * size:
                warnings.append(f"{name} is {count / size:.0%} full ({count:,} of {size:,})")
        return warnings

    def close(self) -> None:
        self.socket_lb.close()

    # ---- reading -----------------------------------------------------------------------
    def list_views(self) -> list[dict[str, Any]]:
        return list(self.views.values())

    def view(self, namespace: str, name: str) -> dict[str, Any]:
        found = self.views.get((namespace, name))
        if found is None:
            raise NotFound("service", f"{namespace}/{name} does not exist")
        return found

    def connection_service(
        self,
        client_netns: str | None,
        address: str,
        port: int,
        protocol: int,
        client_endpoint: int | None = None,
    ) -> tuple[str, str] | None:
        """The Service (namespace, name) of a connection from `client_netns` (None: the
        agent's own) to address:port: the frontend's, when that is a frontend; else the
        one whose frontend the socket LB translated the connection to that backend
        through, or the endpoint programs did for `client_endpoint` (its id); None when
        it was not a service's (or nothing says so any more).
        Called from the flow reader's thread: reads only published state and the map."""
        index = self.flow_index
        frontend = index.frontends.get((address, port, protocol))
        if frontend is not None:
            return frontend
        if (address, port, protocol) not in index.backends:
            return None
        family = ipaddress.ip_address(address).version
        key = self.maps.xlate.key_type(
            addr=address16(address), port=port, protocol=protocol, family=family
        )
        clients = []
        with contextlib.suppress(OSError):  # OSError: the client's namespace is gone
            clients.append(self._netns_cookie(client_netns))
        if client_endpoint is not None:
            clients.append(SVC_XLATE_EP_MARK << 32 | client_endpoint)
        for client in clients:
            key.netns = client
            revnat = self.maps.xlate.lookup(key)
            if revnat is not None:
                return index.services.get(int(revnat))
        return None

    def _netns_cookie(self, ns: str | None) -> int:
        cookie = self._netns_cookies.get(ns)
        if cookie is None:
            with (
                netns.inside(ns) if ns else contextlib.nullcontext(),
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock,
            ):
                raw = sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
            cookie = self._netns_cookies[ns] = int.from_bytes(raw, "little")
        return cookie

    def set_id(self, key: tuple[Any, ...]) -> int | None:
        return self.ids.sets.get(key_text(key))


def start_services(
    config: AgentConfig, endpoints: Callable[[], Iterable[EndpointRecord]]
) -> ServiceManager:
    """The agent's services: the maps created or adopted, the socket LB adopted (or attached
    once there is a service), the recorded services brought into the maps."""
    from membrane.service.socklb import SocketLb

    cidrs: dict[int, Network] = {4: config.service_cidr}
    pod_cidrs: list[Network] = [config.pod_cidr]
    node_addresses = {4: (str(config.node_ip),)}
    if config.service_cidr_v6 is not None and config.pod_cidr_v6 is not None:
        cidrs[6] = config.service_cidr_v6
        pod_cidrs.append(config.pod_cidr_v6)
        node_addresses[6] = (str(config.node_ipv6),)
    families = tuple(sorted(cidrs))
    socket_lb = SocketLb.start(config.bpf_dir, config.cgroup_root, families)
    settings = ServiceSettings(cidrs, tuple(pod_cidrs), config.lb_algorithm)

    def node_view() -> NodeView:
        return NodeView(tuple(endpoints()), node_addresses, config.maglev_table_size)

    def namespaces() -> list[str | None]:
        return [config.node_netns, *(ep.netns for ep in endpoints())]

    manager = ServiceManager(
        settings,
        ServiceStore(config.state_dir),
        socket_lb,
        node_view,
        namespaces,
        config.node_netns,
    )
    manager.sync()
    return manager
