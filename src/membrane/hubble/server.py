"""Hubble's Observer API (gRPC service `observer.Observer`) served by the agent, on its
event loop (hubble.grpc_server: our own HTTP/2 server, which sends a follower's flows as
serialized bytes in batches), from the agent's flow store: what Hubble's CLI, Hubble Relay
and `membrane observe` read flows from.

GetFlows keeps Hubble's meaning of number/first/follow/since/until and of the whitelist
and blacklist (observe.flowfilter); a bad request is INVALID_ARGUMENT with details
"FIELD: PROBLEM". The standard health service (grpc.health.v1, which `hubble status`
asks first) answers SERVING.
"""

from __future__ import annotations

import asyncio
import os
import time

from google.protobuf.message import DecodeError, Message

from membrane import __version__
from membrane.errors import UserError
from membrane.hubble import wire
from membrane.hubble.grpc_server import GrpcError, GrpcServer, ServerStream, unlink_socket
from membrane.hubble.observer import observer_pb2
from membrane.hubble.relay import relay_pb2
from membrane.observe.store import FlowQuery, FlowStore, SubscriptionClosed, build_matcher

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


SERVICE = "/observer.Observer/"
# Messages a follower is sent per turn of the event loop: a slice is encoded and written,
# then everything else (the reader's hand-overs, other clients) gets its turn.
FOLLOW_SLICE = 256


def _parse(kind: type[Message], data: bytes) -> Message:
    try:
        return kind.FromString(data)
    except DecodeError as err:
        raise GrpcError(
            wire.INTERNAL, f"{kind.DESCRIPTOR.full_name} does not parse: {err}"
        ) from None


class ObserverService:
    def __init__(self, store: FlowStore, node_name: str, address: str = "") -> None:
        self.store = store
        self.node_name = node_name
        self.address = address
        self.version = f"membrane {__version__}"
        self._started = time.monotonic_ns()

    @property
    def uptime_ns(self) -> int:
        return time.monotonic_ns() - self._started

    def server(self) -> GrpcServer:
        """A gRPC server of this service and the health check."""
        return GrpcServer(
            unary={
                SERVICE + "ServerStatus": self.server_status,
                SERVICE + "GetNodes": self.get_nodes,
                f"/{HEALTH_SERVICE}/Check": _health_check,
            },
            streaming={SERVICE + "GetFlows": self.get_flows},
        )

    async def get_flows(self, request: bytes, stream: ServerStream) -> None:
        parsed = _parse(observer_pb2.GetFlowsRequest, request)
        try:
            query = query_of(parsed)  # type: ignore[arg-type]
        except UserError as err:
            raise GrpcError(wire.INVALID_ARGUMENT, str(err)) from None
        if not query.follow:
            messages = self.store.query_messages(query)
            for at in range(0, len(messages), FOLLOW_SLICE):
                await stream.send(messages[at : at + FOLLOW_SLICE])
            return
        sub = self.store.subscribe(query)
        try:
            # Headers now, not with the first flow: the client knows the feed is live.
            await stream.send_headers()
            while True:
                try:
                    messages = await sub.messages(FOLLOW_SLICE)
                except SubscriptionClosed:
                    return
                await stream.send(messages)
                await asyncio.sleep(0)
        finally:
            self.store.unsubscribe(sub)

    async def server_status(self, request: bytes) -> bytes:
        status = observer_pb2.ServerStatusResponse(
            num_flows=len(self.store),
            max_flows=self.store.capacity,
            seen_flows=self.store.seen_flows,
            uptime_ns=self.uptime_ns,
            version=self.version,
        )
        status.num_connected_nodes.value = 1
        status.num_unavailable_nodes.value = 0
        return status.SerializeToString()

    async def get_nodes(self, request: bytes) -> bytes:
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
        return observer_pb2.GetNodesResponse(nodes=[node]).SerializeToString()


async def _health_check(request: bytes) -> bytes:
    """grpc.health.v1.Health/Check: one constant answer, whatever service is asked about."""
    return _HEALTH_SERVING


def grpc_address(listen: tuple[str, int]) -> str:
    """A parsed listen address (metrics.address) as `HOST:PORT` (`[::]:PORT` for every
    address, both families)."""
    host, port = listen
    if not host:
        return f"[::]:{port}"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class HubbleServer:
    """The Observer server on a unix socket (mode 0660) and, optionally, a TCP address."""

    def __init__(self, service: ObserverService, socket_path: str, tcp: str = "") -> None:
        self.service = service
        self.socket_path = socket_path
        self.tcp = tcp  # "host:port" ("[::]:4244" for every address), "": none
        self.tcp_port = 0
        self._server = service.server()

    async def start(self) -> None:
        os.makedirs(os.path.dirname(self.socket_path) or ".", mode=0o755, exist_ok=True)
        if self.tcp:
            try:
                self.tcp_port = await self._server.listen_tcp(self.tcp)
            except OSError as err:
                raise UserError("hubble-listen-address", f"{self.tcp}: {err.strerror}") from None
        old_umask = os.umask(0o117)  # the socket is born 0660: no moment open to all
        try:
            await self._server.listen_unix(self.socket_path)
        finally:
            os.umask(old_umask)
        os.chmod(self.socket_path, SOCKET_MODE)

    async def stop(self, grace: float = 1.0) -> None:
        await self._server.stop(grace)
        unlink_socket(self.socket_path)
