"""Hubble's Observer API (gRPC service `observer.Observer`) served by the agent, on its
event loop (grpc.aio), from the agent's flow store: what Hubble's CLI, Hubble Relay and
`membrane observe` read flows from.

GetFlows keeps Hubble's meaning of number/first/follow/since/until and of the whitelist
and blacklist (observe.flowfilter); a bad request is INVALID_ARGUMENT with details
"FIELD: PROBLEM". The standard health service (grpc.health.v1, which `hubble status`
asks first) answers SERVING.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import AsyncIterator

import grpc

from membrane import __version__
from membrane.errors import UserError
from membrane.hubble.observer import observer_pb2, observer_pb2_grpc
from membrane.hubble.relay import relay_pb2
from membrane.observe.store import FlowQuery, FlowStore, build_matcher

SOCKET_MODE = 0o660
HEALTH_SERVICE = "grpc.health.v1.Health"
_HEALTH_SERVING = b"\x08\x01"  # HealthCheckResponse{status: SERVING}, field 1 varint 1


def query_of(request: observer_pb2.GetFlowsRequest) -> FlowQuery:
    """The store query a GetFlowsRequest asks for; UserError for what Hubble refuses."""
    if request.first and request.follow:
        raise UserError("first", "cannot be specified with follow")
    since = until = None
    if request.HasField("since"):
        since = _nanoseconds(request.since, "since")
    if request.HasField("until"):
        until = _nanoseconds(request.until, "until")
    return FlowQuery(
        number=request.number,
        first=request.first,
        follow=request.follow,
        since_ns=since,
        until_ns=until,
        matcher=build_matcher(request.whitelist, request.blacklist),
    )


def _nanoseconds(stamp: object, field: str) -> int:
    # Timestamp's own range: 0001-01-01 to 9999-12-31, nanos 0..999,999,999
    seconds, nanos = stamp.seconds, stamp.nanos  # type: ignore[attr-defined]
    if not -62135596800 <= seconds <= 253402300799 or not 0 <= nanos < 1_000_000_000:
        raise UserError(field, f"{seconds}s {nanos}ns is not a valid timestamp")
    return seconds * 1_000_000_000 + nanos


class ObserverService(observer_pb2_grpc.ObserverServicer):
    def __init__(self, store: FlowStore, node_name: str, address: str = "") -> None:
        self.store = store
        self.node_name = node_name
        self.address = address
        self.version = f"membrane {__version__}"
        self._started = time.monotonic_ns()

    @property
    def uptime_ns(self) -> int:
        return time.monotonic_ns() - self._started

    async def GetFlows(
        self, request: observer_pb2.GetFlowsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[observer_pb2.GetFlowsResponse]:
        try:
            query = query_of(request)
        except UserError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        if not query.follow:
            for item in self.store.query(query):
                yield item
            return
        sub = self.store.subscribe(query)
        # Headers now, not with the first flow: the client knows the feed is live.
        await context.send_initial_metadata(())
        try:
            async for item in sub:
                yield item
        finally:
            self.store.unsubscribe(sub)

    async def ServerStatus(
        self, request: observer_pb2.ServerStatusRequest, context: grpc.aio.ServicerContext
    ) -> observer_pb2.ServerStatusResponse:
        status = observer_pb2.ServerStatusResponse(
            num_flows=len(self.store),
            max_flows=self.store.capacity,
            seen_flows=self.store.seen_flows,
            uptime_ns=self.uptime_ns,
            version=self.version,
        )
        status.num_connected_nodes.value = 1
        status.num_unavailable_nodes.value = 0
        return status

    async def GetNodes(
        self, request: observer_pb2.GetNodesRequest, context: grpc.aio.ServicerContext
    ) -> observer_pb2.GetNodesResponse:
        node = observer_pb2.Node(
            name=self.node_name,
            version=self.version,
            address=self.address,
            state=relay_pb2.NODE_CONNECTED,
            uptime_ns=self.uptime_ns,
            num_flows=len(self.store),
            max_flows=self.store.capacity,
            seen_flows=self.store.seen_flows,
        )
        return observer_pb2.GetNodesResponse(nodes=[node])


async def _health_check(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return _HEALTH_SERVING


def _health_handler() -> grpc.GenericRpcHandler:
    """grpc.health.v1.Health/Check without the grpcio-health-checking package: the
    answer is one constant message, whatever service is asked about."""
    check = grpc.unary_unary_rpc_method_handler(
        _health_check, request_deserializer=bytes, response_serializer=bytes
    )
    return grpc.method_handlers_generic_handler(HEALTH_SERVICE, {"Check": check})


def grpc_address(listen: tuple[str, int]) -> str:
    """A parsed listen address (metrics.address) as grpc writes it."""
    host, port = listen
    if not host:
        return f"[::]:{port}"  # every address, both families
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class HubbleServer:
    """The gRPC server on a unix socket (mode 0660) and, optionally, a TCP address."""

    def __init__(self, service: ObserverService, socket_path: str, tcp: str = "") -> None:
        self.service = service
        self.socket_path = socket_path
        self.tcp = tcp  # "host:port" for grpc ("[::]:4244" for every address), "": none
        self.tcp_port = 0
        self._server = grpc.aio.server()
        observer_pb2_grpc.add_ObserverServicer_to_server(service, self._server)
        self._server.add_generic_rpc_handlers((_health_handler(),))

    async def start(self) -> None:
        os.makedirs(os.path.dirname(self.socket_path) or ".", mode=0o755, exist_ok=True)
        self._server.add_insecure_port("unix:" + self.socket_path)
        if self.tcp:
            try:
                self.tcp_port = self._server.add_insecure_port(self.tcp)
            except RuntimeError as err:  # grpc's "failed to bind"
                raise UserError("hubble-listen-address", f"{self.tcp}: {err}") from None
        old_umask = os.umask(0o117)  # the socket is born 0660: no moment open to all
        try:
            await self._server.start()
        finally:
            os.umask(old_umask)
        os.chmod(self.socket_path, SOCKET_MODE)

    async def stop(self, grace: float = 1.0) -> None:
        await self._server.stop(grace)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
