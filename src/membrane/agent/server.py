"""`membrane agent run`: the asyncio daemon serving the REST API on a unix socket.

Changes run one at a time on a single worker thread (the Agent is single-threaded by
design); flows are read from the ring buffer on their own thread and handed to the event
loop. SIGTERM/SIGINT stop the API and the readers and leave the datapath enforcing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import json
import logging
import os
import signal
import socket
import stat
import threading
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from membrane.agent import memory
from membrane.agent.agent import Agent
from membrane.agent.config import AgentConfig
from membrane.agent.endpoints import require_attach_mode
from membrane.agent.explain import trace
from membrane.agent.flows import FlowReader
from membrane.agent.kernel_drops import KernelDrops, start_kernel_drops
from membrane.api import views
from membrane.api.models import (
    EndpointCreate,
    NamespaceLabels,
    PolicyImport,
    ServiceCreate,
    TraceRequest,
    parse_body,
)
from membrane.api.openapi import openapi_document
from membrane.bpf.probe import missing_capabilities
from membrane.errors import NotFound, NotPermitted, UserError
from membrane.metrics import names as metric_names
from membrane.observe.store import FlowStore
from membrane.policy import validate

if TYPE_CHECKING:
    from membrane.hubble.server import HubbleServer
    from membrane.metrics.server import MetricsServers
    from membrane.observe.flowlog import FlowLog
    from membrane.security.policy.manager import TracingPolicies
    from membrane.security.runtime import SecurityRuntime

log = logging.getLogger("membrane.agent")
CT_GC_INTERVAL = 30.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, field: str, problem: str) -> web.Response:
    return web.json_response({"error": {"field": field, "problem": problem}}, status=status)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except NotFound as err:
        return _error(404, err.field, err.problem)
    except UserError as err:
        return _error(400, err.field, err.problem)
    except web.HTTPException:
        raise
    except Exception as err:  # a bug or a kernel failure: log it whole, answer one line
        log.exception("request failed", extra={"fields": {"path": request.path}})
        return _error(500, "agent", f"{type(err).__name__}: {err}")


class AgentServer:
    """Routes and lifecycle. Changes go to the agent on the worker thread; every read
    answers from the agent's current snapshot, without waiting for changes."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self._agent: Agent | None = None
        self.flows = FlowStore(config.hubble_buffer_size, config.node_name)
        self.hubble: HubbleServer | None = None  # the Observer API (gRPC)
        self.flow_log: FlowLog | None = None  # --flow-log
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="agent")
        self._reader: FlowReader | None = None
        self._kernel_drops: KernelDrops | None = None
        self._stopping = asyncio.Event()
        self.metrics: MetricsServers | None = None  # --prometheus-serve-addr and friends
        self.tracing: TracingPolicies | None = None  # TracingPolicy (membrane security policy)
        self.security: SecurityRuntime | None = None  # process cache, security events

    @property
    def agent(self) -> Agent:
        if self._agent is None:
            raise RuntimeError("the agent has not started")
        return self._agent

    async def run_sync(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    async def run_change(self, fn: Callable[..., Any], *args: Any, policy: bool = False) -> Any:
        """A change that recomputes what endpoints enforce, timed for the metrics
        (`policy`: it imports or deletes policies, cilium_policy_change_total)."""
        if self.metrics is None:
            return await self.run_sync(fn, *args)
        with self.metrics.policy.timed(policy_change=policy):
            return await self.run_sync(fn, *args)

    # ---- routes --------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(middlewares=[errors_middleware], client_max_size=64 << 20)
        r = app.router
        r.add_get("/v1/healthz", self.healthz)
        r.add_get("/v1/openapi.json", self.openapi)
        r.add_get("/v1/endpoints", self.list_endpoints)
        r.add_post("/v1/endpoints", self.add_endpoint)
        r.add_get("/v1/endpoints/{namespace}/{name}", self.get_endpoint)
        r.add_delete("/v1/endpoints/{namespace}/{name}", self.delete_endpoint)
        r.add_get("/v1/namespaces", self.list_namespaces)
        r.add_put("/v1/namespaces/{namespace}/labels", self.label_namespace)
        r.add_get("/v1/identities", self.list_identities)
        r.add_get("/v1/policies", self.list_policies)
        r.add_post("/v1/policies", self.import_policies)
        r.add_delete("/v1/policies", self.delete_policies)
        r.add_post("/v1/policy/trace", self.trace)
        r.add_get("/v1/services", self.list_services)
        r.add_post("/v1/services", self.add_service)
        r.add_post("/v1/services/import", self.import_services)
        r.add_get("/v1/services/{namespace}/{name}", self.get_service)
        r.add_delete("/v1/services/{namespace}/{name}", self.delete_service)
        r.add_get("/v1/security/policies", self.list_tracing_policies)
        r.add_post("/v1/security/policies", self.apply_tracing_policies)
        r.add_delete("/v1/security/policies/{name}", self.delete_tracing_policy)
        from membrane.security.api import add_routes

        add_routes(r, lambda: self.security)
        r.add_post("/v1/cni/{command}", self.cni)
        return app

    async def _json(self, request: web.Request) -> Any:
        try:
            return await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UserError("body", f"is not JSON ({err})") from None

    async def healthz(self, request: web.Request) -> web.Response:
        lost = self._reader.lost if self._reader else 0
        return web.json_response(views.health_view(self.agent.snapshot, lost))

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(openapi_document())

    async def list_endpoints(self, request: web.Request) -> web.Response:
        return web.json_response(views.endpoints_view(self.agent.snapshot))

    async def add_endpoint(self, request: web.Request) -> web.Response:
        req = parse_body(EndpointCreate, await self._json(request))
        ep = await self.run_change(self.agent.add_endpoint, req)
        await self._refresh_tracing_scope()
        return web.json_response(views.endpoint_view(ep, self.agent.snapshot), status=201)

    async def get_endpoint(self, request: web.Request) -> web.Response:
        m = request.match_info
        snapshot = self.agent.snapshot
        ep = snapshot.endpoint(m["namespace"], m["name"])
        if ep is None:
            raise NotFound("endpoint", f"{m['namespace']}/{m['name']} does not exist")
        return web.json_response(views.endpoint_view(ep, snapshot))

    async def delete_endpoint(self, request: web.Request) -> web.Response:
        m = request.match_info
        ep = await self.run_change(self.agent.delete_endpoint, m["namespace"], m["name"])
        await self._refresh_tracing_scope()
        return web.json_response(views.endpoint_view(ep, self.agent.snapshot))

    async def list_namespaces(self, request: web.Request) -> web.Response:
        return web.json_response(views.namespaces_view(self.agent.snapshot))

    async def label_namespace(self, request: web.Request) -> web.Response:
        ns = request.match_info["namespace"]
        try:
            validate.check_namespace(ns)
        except ValueError as err:
            raise UserError("namespace", str(err)) from None
        req = parse_body(NamespaceLabels, await self._json(request))
        labels = await self.run_change(self.agent.label_namespace, ns, req)
        return web.json_response({"name": ns, "labels": labels})

    async def list_identities(self, request: web.Request) -> web.Response:
        return web.json_response(views.identities_view(self.agent.snapshot))

    async def list_policies(self, request: web.Request) -> web.Response:
        return web.json_response(views.policies_view(self.agent.snapshot, request.query))

    async def import_policies(self, request: web.Request) -> web.Response:
        req = parse_body(PolicyImport, await self._json(request))
        result = await self.run_change(self.agent.import_policies, req.yaml, policy=True)
        return web.json_response(result)

    async def delete_policies(self, request: web.Request) -> web.Response:
        q = request.query
        everything = q.get("all") in ("1", "true")
        if not everything and "name" not in q:
            raise UserError("name", "give NS/NAME (or NAME for a clusterwide policy) or --all")
        result = await self.run_change(
            self.agent.delete_policies,
            q.get("namespace"),
            q.get("name"),
            q.get("kind"),
            everything,
            policy=True,
        )
        return web.json_response(result)

    async def cni(self, request: web.Request) -> web.Response:
        """The CNI plugin's calls, answered in the CNI spec's JSON (membrane.cni.service)."""
        from membrane.cni.service import answer

        status, result = await answer(
            self, request.match_info["command"], request.query, await request.read()
        )
        await self._refresh_tracing_scope()  # a pod came or went: namespaced policies follow
        return web.json_response(result, status=status)

    async def trace(self, request: web.Request) -> web.Response:
        req = parse_body(TraceRequest, await self._json(request))
        # A snapshot's read: off the event loop (the evaluator walks every rule), beside
        # changes rather than behind them.
        result = await asyncio.get_running_loop().run_in_executor(
            None, trace, self.agent.snapshot, req
        )
        return web.json_response(result)

    # ---- tracing policies (membrane.security.policy) ---------------------------------------
    def _tracing(self) -> TracingPolicies:
        if self.tracing is None:
            raise UserError("runtime-security", "is off in this agent (--runtime-security=false)")
        return self.tracing

    async def list_tracing_policies(self, request: web.Request) -> web.Response:
        return web.json_response(await self.run_sync(self._tracing().list))

    async def apply_tracing_policies(self, request: web.Request) -> web.Response:
        req = parse_body(PolicyImport, await self._json(request))
        return web.json_response(await self.run_sync(self._tracing().apply, req.yaml))

    async def delete_tracing_policy(self, request: web.Request) -> web.Response:
        name, namespace = request.match_info["name"], request.query.get("namespace")
        key = f"{namespace}/{name}" if namespace else name
        return web.json_response(await self.run_sync(self._tracing().delete, key))

    async def _refresh_tracing_scope(self) -> None:
        if self.tracing is not None:
            await self.run_sync(self.tracing.refresh_scope)

    def _start_tracing(self) -> TracingPolicies | None:
        """Tracing policies are part of runtime security: off with it (what an earlier
        agent pinned stays in force, as the datapath does, until an agent with runtime
        security deletes it)."""
        if self.security is None:
            return None
        from membrane.bpf.probe import supports
        from membrane.security.policy.manager import PodEndpoint, TracingPolicies

        def endpoints() -> list[PodEndpoint]:
            return [
                PodEndpoint(ep.namespace, ep.name, ep.netns, ep.labels)
                for ep in self.agent.snapshot.endpoints.values()
            ]

        tracing = TracingPolicies(
            self.config.state_dir,
            self.config.bpf_dir,
            self.config.node_name,
            self.config.cgroup_root or None,
            supports,
            endpoints,
            **self._security_parts(),
        )
        tracing.start()
        return tracing

    # ---- services (membrane.service) -----------------------------------------------------
    def _service_manager(self) -> Any:
        if self.agent.services is None:
            raise RuntimeError("services have not started")
        return self.agent.services

    async def list_services(self, request: web.Request) -> web.Response:
        return web.json_response({"services": self._service_manager().list_views()})

    async def get_service(self, request: web.Request) -> web.Response:
        m = request.match_info
        return web.json_response(self._service_manager().view(m["namespace"], m["name"]))

    async def add_service(self, request: web.Request) -> web.Response:
        req = parse_body(ServiceCreate, await self._json(request))
        return web.json_response(await self.run_sync(self.agent.add_service, req), status=201)

    async def import_services(self, request: web.Request) -> web.Response:
        req = parse_body(PolicyImport, await self._json(request))
        return web.json_response(await self.run_sync(self.agent.import_services, req.yaml))

    async def delete_service(self, request: web.Request) -> web.Response:
        m = request.match_info
        result = await self.run_sync(self.agent.delete_service, m["namespace"], m["name"])
        return web.json_response(result)

    # ---- runtime security (membrane.security) ------------------------------------------
    def _start_security(self) -> SecurityRuntime | None:
        from membrane.security.runtime import start_security

        node = self.config.node_name
        return start_security(self.config.security, node, lambda: self.agent.snapshot)

    def _security_parts(self) -> dict[str, Any]:
        """Where tracing policies publish events and find their processes."""
        if self.security is None:
            return {}
        return {"sink": self.security.store, "cache": self.security.cache}

    # ---- lifecycle -----------------------------------------------------------------------
    async def _gc_loop(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), CT_GC_INTERVAL)
            if self._stopping.is_set():
                return
            try:
                removed = await self.run_sync(self.agent.gc_conntrack)
                if removed:
                    log.info("conntrack gc", extra={"fields": {"removed": removed}})
                await self.run_sync(memory.collect_between_changes)
            except Exception:
                log.exception("housekeeping failed")

    def _start_flow_log(self) -> None:
        """Refill the store from the flow log's tail (flows survive a restart), then log
        every item the store takes from now on."""
        settings = self.config.flow_log
        if settings is None:
            return
        from membrane.observe.flowlog import FlowLog, read_tail

        self.flows.extend(read_tail(settings, self.flows.capacity))
        log.info("flow store refilled", extra={"fields": {"flows": len(self.flows)}})
        self.flow_log = FlowLog(settings, self.config.node_name)
        self.flows.add_sink(self.flow_log.submit)

    async def _start_hubble(self) -> None:
        from membrane.hubble.server import HubbleServer, ObserverService, grpc_address
        from membrane.metrics.address import parse_listen_address

        path = self.config.hubble_socket_path
        _claim_socket_path(path, "hubble-socket")
        listen = parse_listen_address(self.config.hubble_listen_address, "hubble-listen-address")
        service = ObserverService(self.flows, self.config.node_name, str(self.config.node_ip))
        self.hubble = HubbleServer(service, path, grpc_address(listen) if listen else "")
        await self.hubble.start()
        log.info("hubble listening", extra={"fields": {"socket": path, "tcp": self.hubble.tcp}})

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        self.metrics = _metrics_servers(self.config)  # listening first: a taken port fails here
        try:
            self._start_flow_log()
            await self._start_hubble()
            self._agent = await self.run_sync(Agent.start, self.config)
            self.security = await self.run_sync(self._start_security)
            self.tracing = await self.run_sync(self._start_tracing)
        except BaseException:
            if self.security is not None:
                self.security.stop()
            if self.metrics is not None:
                self.metrics.stop()
            if self.hubble is not None:
                await self.hubble.stop(0)
            if self.flow_log is not None:
                self.flow_log.close()
            raise
        # Two readers count flows, each on its own thread: one at a time.
        count = _one_at_a_time(self.metrics.counts.observe) if self.metrics else None
        self._reader = FlowReader(
            self.agent,
            lambda records: loop.call_soon_threadsafe(self.flows.extend, records),
            observe=count,
        )
        self.flows.reader_backlog = self._reader.backlog  # followers wait while it is behind
        if self.metrics is not None:
            reader = self._reader
            self.metrics.attach(
                lambda: self.agent.snapshot,
                self.config.bpf_dir,
                lambda: {
                    metric_names.LOST_PERF_EVENT_RING_BUFFER: reader.lost,
                    metric_names.LOST_OBSERVER_EVENTS_QUEUE: reader.dropped,
                },
            )
        self._reader.start()
        self._kernel_drops = start_kernel_drops(
            self.agent, lambda records: loop.call_soon_threadsafe(self.flows.extend, records), count
        )
        runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await runner.setup()
        sock = _listen(self.config.api_socket)
        site = web.SockSite(runner, sock)
        await site.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        gc_task = asyncio.create_task(self._gc_loop())
        log.info("api listening", extra={"fields": {"socket": self.config.api_socket}})
        print("membrane agent ready", flush=True)
        await self._stopping.wait()
        log.info("stopping; the datapath keeps enforcing")
        gc_task.cancel()
        self.flows.close()
        if self.hubble is not None:
            await self.hubble.stop()
        await runner.cleanup()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.config.api_socket)
        if self.metrics is not None:
            self.metrics.stop()
        self._reader.stop()
        if self._kernel_drops is not None:
            self._kernel_drops.stop()
        if self.tracing is not None:
            await self.run_sync(self.tracing.stop)
        if self.security is not None:
            self.security.stop()
        await self.run_sync(self.agent.stop)
        if self.flow_log is not None:
            self.flow_log.close()
        self._worker.shutdown()


def _one_at_a_time(fn: Callable[..., Any]) -> Callable[..., Any]:
    lock = threading.Lock()

    def locked(*args: Any) -> Any:
        with lock:
            return fn(*args)

    return locked


def _metrics_servers(config: AgentConfig) -> MetricsServers | None:
    """The metrics servers the options ask for (prometheus_client is imported only then)."""
    if not config.prometheus_serve_addr and not config.hubble_metrics_server:
        return None
    from membrane.metrics.server import MetricsServers

    return MetricsServers(config.prometheus_serve_addr, config.hubble_metrics_server)


def _claim_socket_path(path: str, option: str) -> None:
    """Make way for a unix socket at `path`: its directory exists, a stale socket file
    from an agent that died is removed; a live one means another agent serves it."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
    if os.path.exists(path):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)
        else:
            raise UserError(option, f"another agent is serving {path}")
        finally:
            probe.close()


def _listen(path: str) -> socket.socket:
    """A unix socket only root can use (mode 0600). A stale socket file from an agent that
    died is replaced; a live one means another agent serves it."""
    _claim_socket_path(path, "api-socket")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old_umask)
    os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
    sock.listen(128)
    sock.setblocking(False)
    return sock


def _lock_state_dir(config: AgentConfig) -> int:
    config.state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(config.state_dir / "agent.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError("state-dir", f"another agent is running with {config.state_dir}") from None
    return fd


def require_privileges() -> None:
    missing = missing_capabilities(("CAP_NET_ADMIN", "CAP_SYS_ADMIN", "CAP_BPF"))
    if missing:
        raise NotPermitted(
            "",
            f"the agent needs root ({', '.join(missing)} missing): it creates namespaces "
            "and veths and loads BPF programs; `membrane probe` shows what this kernel allows",
        )


def run_agent(config: AgentConfig) -> None:
    require_privileges()
    require_attach_mode(config.attach)
    lock = _lock_state_dir(config)
    try:
        asyncio.run(AgentServer(config).serve())
    finally:
        os.close(lock)
