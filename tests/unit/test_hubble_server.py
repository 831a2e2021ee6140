"""The agent's Observer server (hubble.server on hubble.grpc_server, our own HTTP/2) against
the other side's implementation: grpcio clients with stubs generated from our protos, over
the unix socket and TCP (unary calls, the health check, GetFlows with number/first/since/
until, follow and cancel, streams far beyond HTTP/2's windows, status codes, deadlines, the
server stopping); and the HTTP/2 rules a scripted client can check byte by byte (SETTINGS
and PING acknowledged, flow-control windows never overrun, HTTP 415, GOAWAY on a protocol
error, RST_STREAM ending a follow)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from observe_support import on_own_loop

from membrane.hubble import wire
from membrane.hubble.flow import flow_pb2
from membrane.hubble.observer import observer_pb2, observer_pb2_grpc
from membrane.hubble.server import HubbleServer, ObserverService
from membrane.observe.record import flow_response
from membrane.observe.store import FlowStore
from membrane.testing.waiting import wait_for

SECOND = 1_000_000_000
Request = observer_pb2.GetFlowsRequest


def numbered(n: int, pad: int = 0) -> observer_pb2.GetFlowsResponse:
    """Flow n, at second n of the epoch (`pad`: a longer Summary, a larger message)."""
    flow = flow_pb2.Flow(uuid=str(n), Summary="x" * pad, node_name="node-1")
    flow.time.FromNanoseconds(n * SECOND)
    return flow_response(flow)


@dataclass
class Running:
    store: FlowStore
    server: HubbleServer
    loop: asyncio.AbstractEventLoop
    unix: str
    tcp: str

    def on_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run fn on the server's event loop (where the store lives) and wait for it."""

        async def call() -> Any:
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(timeout=10)

    def subscribers(self) -> int:
        return self.on_loop(lambda: len(self.store._subscriptions))


@contextlib.contextmanager
def running(tmp_path: Path, flows: int = 0, pad: int = 0) -> Iterator[Running]:
    """The server over a store of `flows` numbered flows, on an event loop thread of its
    own, on a unix socket and 127.0.0.1 (a port the kernel picks)."""
    store = FlowStore(capacity=8191, node_name="node-1")
    store.extend(numbered(i, pad) for i in range(flows))
    path = str(tmp_path / "hubble.sock")

    async def start() -> HubbleServer:
        server = HubbleServer(ObserverService(store, "node-1", "198.19.0.1"), path, "127.0.0.1:0")
        await server.start()
        return server

    with on_own_loop(start) as (server, loop):
        yield Running(store, server, loop, "unix://" + path, f"127.0.0.1:{server.tcp_port}")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    with running(tmp_path_factory.mktemp("hubble"), flows=10) as r:
        yield r


@pytest.fixture(params=["unix", "tcp"])
def stub(
    served: Running, request: pytest.FixtureRequest
) -> Iterator[observer_pb2_grpc.ObserverStub]:
    address = served.unix if request.param == "unix" else served.tcp
    with grpc.insecure_channel(address) as channel:
        yield observer_pb2_grpc.ObserverStub(channel)


def uuids(responses: Any) -> list[int]:
    return [int(r.flow.uuid) for r in responses if r.HasField("flow")]


# ---- grpcio clients ----------------------------------------------------------------------


def test_unary_calls_and_the_health_check(
    served: Running, stub: observer_pb2_grpc.ObserverStub
) -> None:
    status = stub.ServerStatus(observer_pb2.ServerStatusRequest(), timeout=10)
    assert (status.num_flows, status.max_flows, status.seen_flows) == (10, 8191, 10)
    assert status.num_connected_nodes.value == 1 and status.version.startswith("membrane")
    [node] = stub.GetNodes(observer_pb2.GetNodesRequest(), timeout=10).nodes
    assert (node.name, node.address, node.num_flows) == ("node-1", "198.19.0.1", 10)
    for address in (served.unix, served.tcp):
        with grpc.insecure_channel(address) as channel:
            check = channel.unary_unary("/grpc.health.v1.Health/Check")
            assert check(b"", timeout=10) == b"\x08\x01"  # HealthCheckResponse SERVING


def test_get_flows_by_hubbles_rules(stub: observer_pb2_grpc.ObserverStub) -> None:
    def ask(**kw: Any) -> list[int]:
        return uuids(stub.GetFlows(Request(**kw), timeout=10))

    assert ask() == list(range(10))
    assert ask(number=3) == [7, 8, 9]
    assert ask(number=3, first=True) == [0, 1, 2]
    since, until = observer_pb2.GetFlowsRequest(), observer_pb2.GetFlowsRequest()
    since.since.FromNanoseconds(6 * SECOND)
    until.until.FromNanoseconds(2 * SECOND)
    assert uuids(stub.GetFlows(since, timeout=10)) == [6, 7, 8, 9]
    assert uuids(stub.GetFlows(until, timeout=10)) == [0, 1, 2]


def test_status_codes(served: Running, stub: observer_pb2_grpc.ObserverStub) -> None:
    bad = Request(blacklist=[flow_pb2.FlowFilter(), flow_pb2.FlowFilter(source_ip=["x"])])
    for request, field in (
        (bad, "blacklist[1].source_ip"),
        (Request(first=True, follow=True), "first"),
    ):
        with pytest.raises(grpc.RpcError) as err:
            list(stub.GetFlows(request, timeout=10))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith(f"{field}: ")
    with grpc.insecure_channel(served.unix) as channel:
        with pytest.raises(grpc.RpcError) as err:
            channel.unary_unary("/observer.Observer/GetAgentEvents")(b"", timeout=10)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        with pytest.raises(grpc.RpcError) as err:  # not a GetFlowsRequest
            list(channel.unary_stream("/observer.Observer/GetFlows")(b"\xff\xff", timeout=10))
        assert err.value.code() == grpc.StatusCode.INTERNAL


def test_follow_streams_new_flows_until_cancelled(
    served: Running, stub: observer_pb2_grpc.ObserverStub
) -> None:
    before = served.subscribers()
    call = stub.GetFlows(Request(follow=True, number=2))
    call.initial_metadata()  # sent once the feed is live
    served.on_loop(served.store.extend, [numbered(i) for i in range(100, 3100)])
    got = []
    for response in call:
        got.append(int(response.flow.uuid))
        if len(got) == 3002:
            break
    assert got == [8, 9, *range(100, 3100)]  # the backlog asked for, then every new one
    call.cancel()
    wait_for("the server to end the cancelled follow", lambda: served.subscribers() == before)
    served.on_loop(served.store.extend, [numbered(i) for i in range(10)])  # as it was


def test_a_stream_far_beyond_the_windows(tmp_path: Path) -> None:
    with running(tmp_path, flows=5000, pad=500) as r, grpc.insecure_channel(r.tcp) as channel:
        got = list(observer_pb2_grpc.ObserverStub(channel).GetFlows(Request(), timeout=30))
        assert uuids(got) == list(range(5000))  # ~2.6 MB: many windows of 64 KiB


def test_a_deadline_ends_a_follow(served: Running) -> None:
    """grpc-timeout is the call's deadline on the server too (a scripted client: grpcio
    would end the call itself)."""
    with raw_client(served) as client:
        client.request(Request(follow=True), extra=[("grpc-timeout", "200m")])
        headers, _, trailers = client.response()
    assert ("content-type", "application/grpc") in headers
    assert dict(trailers)["grpc-status"] == str(wire.DEADLINE_EXCEEDED)


def test_stopping_ends_follows(tmp_path: Path) -> None:
    """The agent closes its store first (a follow ends as a finished answer); a call the
    server still has when it stops ends UNAVAILABLE."""
    with running(tmp_path) as r, grpc.insecure_channel(r.unix) as channel:
        stub = observer_pb2_grpc.ObserverStub(channel)
        ended, stuck = stub.GetFlows(Request(follow=True)), stub.GetFlows(Request(follow=True))
        ended.initial_metadata()
        stuck.initial_metadata()
        r.on_loop(lambda: r.store.unsubscribe(next(iter(r.store._subscriptions))))
        r.on_loop(lambda: asyncio.ensure_future(r.server.stop(0.2)))
        codes = []
        for call in (ended, stuck):
            try:
                list(call)
                codes.append("OK")
            except grpc.RpcError as err:
                codes.append(err.code().name)
        assert sorted(codes) == ["OK", "UNAVAILABLE"]


# ---- a scripted client: HTTP/2 rules -------------------------------------------------------


class RawClient:
    """One HTTP/2 connection driven by hand."""

    def __init__(self, sock: socket.socket, window: int = wire.DEFAULT_WINDOW) -> None:
        self.sock = sock
        self.sock.settimeout(10)
        self.buffer = b""
        self.decoder = wire.HeaderDecoder()
        sock.sendall(
            wire.PREFACE + wire.settings_frame({wire.SETTINGS_INITIAL_WINDOW_SIZE: window})
        )

    def read_frame(self) -> tuple[int, int, int, bytes]:
        def exactly(size: int) -> bytes:
            while len(self.buffer) < size:
                chunk = self.sock.recv(1 << 16)
                if not chunk:
                    raise EOFError
                self.buffer += chunk
            out, self.buffer = self.buffer[:size], self.buffer[size:]
            return out

        high, low, kind, flags, stream_id = struct.unpack(">HBBBI", exactly(9))
        return kind, flags, stream_id, exactly(high << 8 | low)

    def request(
        self,
        request: Any,
        stream_id: int = 1,
        extra: list[tuple[str, str]] = (),  # type: ignore[assignment]
        path: str = "/observer.Observer/GetFlows",
        content_type: str = "application/grpc",
    ) -> None:
        headers = [(":method", "POST"), (":scheme", "http"), (":path", path)]
        headers += [(":authority", "x"), ("content-type", content_type), ("te", "trailers"), *extra]
        body = request.SerializeToString()
        self.sock.sendall(
            wire.frame(wire.HEADERS, wire.END_HEADERS, stream_id, wire.encode_headers(headers))
            + wire.frame(
                wire.DATA, wire.END_STREAM, stream_id, struct.pack(">BI", 0, len(body)) + body
            )
        )

    def response(self, stream_id: int = 1) -> tuple[list, bytes, list]:
        """Headers, DATA and trailers of a stream, to its end (control frames answered
        by the server are skipped)."""
        headers: list = []
        trailers: list = []
        data = b""
        while True:
            kind, flags, sid, payload = self.read_frame()
            if sid != stream_id:
                continue
            if kind == wire.HEADERS:
                fields = self.decoder.decode(payload)
                if headers:
                    trailers = fields
                else:
                    headers = fields
                    if flags & wire.END_STREAM:
                        trailers = fields
            elif kind == wire.DATA:
                data += payload
            if flags & wire.END_STREAM or kind == wire.RST_STREAM:
                return headers, data, trailers


@contextlib.contextmanager
def raw_client(r: Running, window: int = wire.DEFAULT_WINDOW) -> Iterator[RawClient]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(r.unix.removeprefix("unix://"))
    with sock:
        yield RawClient(sock, window)


def test_settings_ping_and_content_type(served: Running) -> None:
    with raw_client(served) as client:
        kind, flags, _, payload = client.read_frame()  # the server's SETTINGS come first
        assert (kind, flags) == (wire.SETTINGS, 0)
        assert struct.unpack(">HI", payload[:6]) == (wire.SETTINGS_MAX_CONCURRENT_STREAMS, 128)
        client.sock.sendall(wire.frame(wire.PING, 0, 0, b"12345678"))
        assert client.read_frame()[:2] == (wire.SETTINGS, wire.ACK)  # ours, acknowledged
        assert client.read_frame() == (wire.PING, wire.ACK, 0, b"12345678")
        client.request(Request(), content_type="text/plain")
        headers, _, _ = client.response()
        assert headers == [(":status", "415")]


def test_the_clients_window_is_never_overrun(served: Running) -> None:
    """With a 100-byte window the server sends 100 bytes of DATA and waits for more."""
    with raw_client(served, window=100) as client:
        client.request(Request(number=10))
        data = b""
        while len(data) < 100:
            kind, _, sid, payload = client.read_frame()
            if kind == wire.DATA and sid == 1:
                data += payload
        client.sock.settimeout(0.3)
        with pytest.raises(TimeoutError):  # nothing beyond the window
            client.read_frame()
        client.sock.settimeout(10)
        client.sock.sendall(wire.window_update_frame(1, 1 << 20))  # the stream's: more room
        _, rest, trailers = client.response()
    assert dict(trailers)["grpc-status"] == "0"
    messages, body = [], data + rest
    while body:
        _, length = struct.unpack(">BI", body[:5])
        messages.append(observer_pb2.GetFlowsResponse.FromString(body[5 : 5 + length]))
        body = body[5 + length :]
    assert uuids(messages) == list(range(10))


def test_a_reset_ends_the_follow_and_a_protocol_error_the_connection(served: Running) -> None:
    before = served.subscribers()
    with raw_client(served) as client:
        client.request(Request(follow=True))
        wait_for("the follow to start", lambda: served.subscribers() == before + 1)
        client.sock.sendall(wire.frame(wire.RST_STREAM, 0, 1, struct.pack(">I", wire.CANCEL)))
        wait_for("the follow to end", lambda: served.subscribers() == before)
        client.sock.sendall(
            wire.frame(wire.HEADERS, wire.END_HEADERS, 2, b"")
        )  # even: a client may not
        while True:
            kind, _, _, payload = client.read_frame()
            if kind == wire.GOAWAY:
                break
        last, code = struct.unpack(">II", payload[:8])
        assert (last, code) == (1, wire.PROTOCOL_ERROR)
        with pytest.raises(EOFError):
            client.read_frame()
