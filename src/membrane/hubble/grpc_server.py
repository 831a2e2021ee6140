"""gRPC over HTTP/2 with prior knowledge (h2c), server side, on asyncio: how the agent serves
Hubble's Observer API (hubble.server) on its unix socket and TCP address, built on
hubble.wire's framing and HPACK.

grpc.aio spends ~45 us of server CPU per streamed message even when handed serialized bytes
(~140 us when it serializes them; bench/RESULTS.md, flow_pipeline): a follower of a flood
needs tens of thousands of messages a second. Here a streaming handler hands over many
serialized messages at once and they leave as a few DATA frames in one write.

HTTP/2 (RFC 9113) as a server needs it: the client preface, our SETTINGS, SETTINGS and PING
acknowledged, HEADERS with CONTINUATION and padding, DATA, flow control both ways (the
peer's connection and stream windows respected when sending, ours handed back as request
data arrives), RST_STREAM (a client's cancel ends its call's handler), GOAWAY (sent when
the server stops; after a client's, the connection closes once its calls are done),
REFUSED_STREAM beyond MAX_CONCURRENT_STREAMS, protocol errors ending the connection with
GOAWAY; PRIORITY and unknown frame types ignored.

gRPC (PROTOCOL-HTTP2): POST with content-type application/grpc (anything else: HTTP 415),
one length-prefixed request message (compressed ones are refused: we offer no encoding),
responses as length-prefixed messages, the status in trailers (grpc-status,
percent-encoded grpc-message) or alone when nothing else was sent (trailers-only),
grpc-timeout as the call's deadline (DEADLINE_EXCEEDED), UNIMPLEMENTED for an unknown
method, RESOURCE_EXHAUSTED for a request over MAX_REQUEST_BYTES, UNKNOWN for a handler's
bug (logged).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping, Sequence

from membrane.hubble import wire
from membrane.hubble.wire import (
    ACK,
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    PADDED,
    PING,
    PREFACE,
    PRIORITY_FLAG,
    PUSH_PROMISE,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    HeaderDecoder,
    HpackError,
    encode_headers,
    frame,
)

log = logging.getLogger("membrane.hubble")

MAX_CONCURRENT_STREAMS = 128
MAX_REQUEST_BYTES = 4 << 20  # grpc's default receive limit
MAX_HEADER_BLOCK = 64 << 10
WRITE_BUFFER_HIGH = 1 << 20  # bytes queued in the transport before a sender waits
_HEADER = struct.Struct(">HBBBI")
_MESSAGE_PREFIX = struct.Struct(">BI")
_OUR_MAX_FRAME = wire.DEFAULT_MAX_FRAME  # what we accept (we do not advertise more)
_RESPONSE_HEADERS = [(":status", "200"), ("content-type", "application/grpc")]
_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}

UnaryHandler = Callable[[bytes], Awaitable[bytes]]
StreamHandler = Callable[[bytes, "ServerStream"], Awaitable[None]]


class GrpcError(Exception):
    """A call's end with a status other than OK, raised by a handler."""

    def __init__(self, code: int, details: str = "") -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class _ConnectionError(Exception):
    """A protocol error that ends the connection (GOAWAY with `code`)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


def parse_timeout(value: str) -> float | None:
    """grpc-timeout ("100m", "5S": at most 8 digits and a unit) in seconds; None if not
    one."""
    digits, unit = value[:-1], value[-1:]
    if not 0 < len(digits) <= 8 or not digits.isdigit() or unit not in _TIMEOUT_UNITS:
        return None
    return int(digits) * _TIMEOUT_UNITS[unit]


def grpc_frames(messages: Sequence[bytes]) -> bytes:
    """Serialized messages as one gRPC body: each behind its 5-byte prefix."""
    parts: list[bytes] = []
    for message in messages:
        parts.append(_MESSAGE_PREFIX.pack(0, len(message)))
        parts.append(message)
    return b"".join(parts)


class ServerStream:
    """The response side of one call, for its handler."""

    def __init__(self, connection: _Connection, stream_id: int, send_window: int) -> None:
        self.id = stream_id
        self.send_window = send_window
        self.headers_sent = False
        self.finished = False  # trailers sent (or the stream reset): nothing more goes
        self.request_ended = False
        self.request: dict[str, str] = {}
        self.body = bytearray()
        self.task: asyncio.Task[None] | None = None
        self._connection = connection

    async def send_headers(self) -> None:
        """The response headers now, before any message: the client's initial metadata
        (a follower knows its feed is live)."""
        if not self.headers_sent:
            self._connection.write_headers(self, _RESPONSE_HEADERS, end_stream=False)
            await self._connection.writable()

    async def send(self, messages: Sequence[bytes]) -> None:
        """Serialized response messages, in as few DATA frames as the peer's windows and
        frame size allow; waits while the windows are closed or the socket is full."""
        if messages:
            await self._connection.send_data(self, grpc_frames(messages))


class _Connection(asyncio.Protocol):
    """One client connection: reads frames, runs each call's handler as a task."""

    def __init__(self, server: GrpcServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, ServerStream] = {}
        self.closed = False
        self._inbox = bytearray()
        self._preface = False
        self._decoder = HeaderDecoder()
        self._continuing: tuple[int, int, bytearray] | None = None  # stream, flags, block
        self._last_stream = 0
        self._peer_window = wire.DEFAULT_WINDOW  # the peer's initial stream window
        self._peer_max_frame = wire.DEFAULT_MAX_FRAME
        self._send_window = wire.DEFAULT_WINDOW  # the connection's
        self._window_open = asyncio.Event()  # set (and replaced) when a window grows
        self._writable = asyncio.Event()
        self._writable.set()
        self._going_away = False  # GOAWAY sent or received: no new calls

    # ---- asyncio.Protocol ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.connections.add(self)
        transport.write(
            wire.settings_frame({wire.SETTINGS_MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS})
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        for stream in list(self.streams.values()):
            stream.finished = True
            if stream.task is not None:
                stream.task.cancel()
        self.streams.clear()
        self._wake_senders()
        self._writable.set()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def data_received(self, data: bytes) -> None:
        self._inbox += data
        try:
            if not self._preface:
                if len(self._inbox) < len(PREFACE):
                    if not PREFACE.startswith(bytes(self._inbox)):
                        raise _ConnectionError(wire.PROTOCOL_ERROR, "not an HTTP/2 preface")
                    return
                if self._inbox[: len(PREFACE)] != PREFACE:
                    raise _ConnectionError(wire.PROTOCOL_ERROR, "not an HTTP/2 preface")
                del self._inbox[: len(PREFACE)]
                self._preface = True
            self._read_frames()
        except _ConnectionError as err:
            self.go_away(err.code, str(err))
            self.close()

    # ---- frames in ----------------------------------------------------------------------
    def _read_frames(self) -> None:
        inbox = self._inbox
        while len(inbox) >= 9 and not self.closed:
            high, low, kind, flags, stream_id = _HEADER.unpack_from(inbox)
            length = high << 8 | low
            if length > _OUR_MAX_FRAME:
                raise _ConnectionError(wire.FRAME_SIZE_ERROR, f"a frame of {length} bytes")
            if len(inbox) < 9 + length:
                return
            payload = bytes(inbox[9 : 9 + length])
            del inbox[: 9 + length]
            self._frame(kind, flags, stream_id & wire.MAX_WINDOW, payload)

    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if self._continuing is not None and (
            kind != CONTINUATION or stream_id != self._continuing[0]
        ):
            raise _ConnectionError(wire.PROTOCOL_ERROR, "header block interrupted")
        if kind == DATA:
            self._data(flags, stream_id, payload)
        elif kind == HEADERS:
            self._headers(flags, stream_id, payload)
        elif kind == CONTINUATION:
            if self._continuing is None:
                raise _ConnectionError(wire.PROTOCOL_ERROR, "CONTINUATION without HEADERS")
            self._continuing[2].extend(payload)
            if len(self._continuing[2]) > MAX_HEADER_BLOCK:
                raise _ConnectionError(wire.PROTOCOL_ERROR, "a header block over 64 KiB")
            if flags & END_HEADERS:
                sid, first_flags, block = self._continuing
                self._continuing = None
                self._header_block(sid, first_flags, bytes(block))
        elif kind == SETTINGS:
            self._settings(flags, stream_id, payload)
        elif kind == PING:
            if stream_id or len(payload) != 8:
                raise _ConnectionError(wire.PROTOCOL_ERROR, "a malformed PING")
            if not flags & ACK:
                self._write(frame(PING, ACK, 0, payload))
        elif kind == WINDOW_UPDATE:
            self._window_update(stream_id, payload)
        elif kind == RST_STREAM:
            if not stream_id or len(payload) != 4:
                raise _ConnectionError(wire.PROTOCOL_ERROR, "a malformed RST_STREAM")
            self._reset(stream_id)
        elif kind == GOAWAY:
            self._going_away = True
            if not self.streams:
                self.close()
        elif kind == PUSH_PROMISE:
            raise _ConnectionError(wire.PROTOCOL_ERROR, "PUSH_PROMISE from a client")
        # PRIORITY and unknown types: nothing to do (RFC 9113 5.3.2, 5.5)

    def _unpadded(self, flags: int, payload: bytes) -> bytes:
        if not flags & PADDED:
            return payload
        if not payload or payload[0] >= len(payload):
            raise _ConnectionError(wire.PROTOCOL_ERROR, "padding longer than the frame")
        return payload[1 : len(payload) - payload[0]]

    def _data(self, flags: int, stream_id: int, payload: bytes) -> None:
        if not stream_id:
            raise _ConnectionError(wire.PROTOCOL_ERROR, "DATA on stream 0")
        updates = wire.window_update_frame(0, len(payload)) if payload else b""
        stream = self.streams.get(stream_id)
        if stream is None or stream.request_ended:
            if stream_id > self._last_stream:
                raise _ConnectionError(wire.PROTOCOL_ERROR, "DATA on an idle stream")
            self._write(updates)  # a cancelled call's data in flight: still ours to count
            return
        stream.body += self._unpadded(flags, payload)
        if len(stream.body) > MAX_REQUEST_BYTES + 5:
            stream.request_ended = True
            self._write(updates)
            self.finish(stream, wire.RESOURCE_EXHAUSTED, "request larger than 4 MiB")
            return
        if flags & END_STREAM:
            stream.request_ended = True
            self._write(updates)
            self._dispatch(stream)
        elif payload:
            self._write(updates + wire.window_update_frame(stream_id, len(payload)))

    def _headers(self, flags: int, stream_id: int, payload: bytes) -> None:
        if not stream_id:
            raise _ConnectionError(wire.PROTOCOL_ERROR, "HEADERS on stream 0")
        block = self._unpadded(flags, payload)
        if flags & PRIORITY_FLAG:
            block = block[5:]
        if flags & END_HEADERS:
            self._header_block(stream_id, flags, block)
        else:
            self._continuing = (stream_id, flags, bytearray(block))

    def _header_block(self, stream_id: int, flags: int, block: bytes) -> None:
        try:
            fields = self._decoder.decode(block)
        except HpackError as err:  # the connection's header state is lost with it
            raise _ConnectionError(wire.COMPRESSION_ERROR, str(err)) from None
        stream = self.streams.get(stream_id)
        if stream is not None:  # the request's trailers: only its end matters
            if not flags & END_STREAM:
                raise _ConnectionError(wire.PROTOCOL_ERROR, "trailers without END_STREAM")
            if not stream.request_ended:
                stream.request_ended = True
                self._dispatch(stream)
            return
        if stream_id % 2 == 0 or stream_id <= self._last_stream:
            raise _ConnectionError(wire.PROTOCOL_ERROR, f"HEADERS on stream {stream_id}")
        self._last_stream = stream_id
        if self._going_away or len(self.streams) >= MAX_CONCURRENT_STREAMS:
            self._write(frame(RST_STREAM, 0, stream_id, struct.pack(">I", wire.REFUSED_STREAM)))
            return
        stream = ServerStream(self, stream_id, self._peer_window)
        stream.request = dict(fields)
        self.streams[stream_id] = stream
        if flags & END_STREAM:
            stream.request_ended = True
            self._dispatch(stream)

    def _settings(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id:
            raise _ConnectionError(wire.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            return
        if len(payload) % 6:
            raise _ConnectionError(wire.FRAME_SIZE_ERROR, "SETTINGS of a partial entry")
        for offset in range(0, len(payload), 6):
            key, value = struct.unpack_from(">HI", payload, offset)
            if key == wire.SETTINGS_INITIAL_WINDOW_SIZE:
                if value > wire.MAX_WINDOW:
                    raise _ConnectionError(wire.FLOW_CONTROL_ERROR, "window above 2^31-1")
                for stream in self.streams.values():  # open streams' windows move alike
                    stream.send_window += value - self._peer_window
                self._peer_window = value
            elif key == wire.SETTINGS_MAX_FRAME_SIZE:
                if not wire.DEFAULT_MAX_FRAME <= value < 1 << 24:
                    raise _ConnectionError(wire.PROTOCOL_ERROR, f"max frame size {value}")
                self._peer_max_frame = value
            # HEADER_TABLE_SIZE bounds our encoder's table, which uses none; the rest
            # (push, concurrency, header list size) asks nothing of a server's answers
        self._write(frame(SETTINGS, ACK, 0))
        self._wake_senders()

    def _window_update(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise _ConnectionError(wire.FRAME_SIZE_ERROR, "a malformed WINDOW_UPDATE")
        increment = struct.unpack(">I", payload)[0] & wire.MAX_WINDOW
        if not stream_id:
            if not increment:
                raise _ConnectionError(wire.PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self._send_window += increment
            if self._send_window > wire.MAX_WINDOW:
                raise _ConnectionError(wire.FLOW_CONTROL_ERROR, "window above 2^31-1")
        elif (stream := self.streams.get(stream_id)) is not None:
            stream.send_window += increment
            if not increment or stream.send_window > wire.MAX_WINDOW:
                self._reset(stream_id, wire.FLOW_CONTROL_ERROR)
                return
        self._wake_senders()

    def _reset(self, stream_id: int, code: int | None = None) -> None:
        """The stream ends now (a client's RST_STREAM, or ours with `code`)."""
        stream = self.streams.pop(stream_id, None)
        if code is not None:
            self._write(frame(RST_STREAM, 0, stream_id, struct.pack(">I", code)))
        if stream is not None:
            stream.finished = True
            if stream.task is not None:
                stream.task.cancel()
        self._wake_senders()
        self.close_if_done()

    # ---- calls --------------------------------------------------------------------------
    def _dispatch(self, stream: ServerStream) -> None:
        request = stream.request
        if request.get(":method") != "POST" or not request.get("content-type", "").startswith(
            "application/grpc"
        ):
            self.write_headers(stream, [(":status", "415")], end_stream=True)
            self._forget(stream)
            return
        path = request.get(":path", "")
        body = bytes(stream.body)
        stream.body = bytearray()
        if len(body) < 5 or _MESSAGE_PREFIX.unpack_from(body)[1] != len(body) - 5:
            self.finish(stream, wire.INTERNAL, "the request is not one length-prefixed message")
            return
        if body[0]:
            self.finish(stream, wire.UNIMPLEMENTED, "compressed requests are not supported")
            return
        unary, streaming = self.server.unary.get(path), self.server.streaming.get(path)
        if unary is None and streaming is None:
            self.finish(stream, wire.UNIMPLEMENTED, f"unknown method {path}")
            return
        timeout = parse_timeout(request.get("grpc-timeout", ""))
        stream.task = asyncio.get_running_loop().create_task(
            self._call(stream, body[5:], unary, streaming, timeout)
        )

    async def _call(
        self,
        stream: ServerStream,
        request: bytes,
        unary: UnaryHandler | None,
        streaming: StreamHandler | None,
        timeout: float | None,
    ) -> None:
        code, details = wire.OK, ""
        try:
            async with asyncio.timeout(timeout):
                if unary is not None:
                    await stream.send([await unary(request)])
                else:
                    assert streaming is not None
                    await streaming(request, stream)
        except GrpcError as err:
            code, details = err.code, err.details
        except TimeoutError:
            code, details = wire.DEADLINE_EXCEEDED, "deadline exceeded"
        except _StreamGone:
            return
        except Exception as err:  # a bug: the client hears UNKNOWN, the log has the rest
            path = stream.request.get(":path", "")
            log.exception("gRPC handler failed", extra={"fields": {"method": path}})
            code, details = wire.UNKNOWN, f"{type(err).__name__}: {err}"
        finally:
            if stream.finished:  # reset by the client, or the connection is gone
                self.streams.pop(stream.id, None)
                self.close_if_done()
        self.finish(stream, code, details)

    def finish(self, stream: ServerStream, code: int, details: str = "") -> None:
        """The call's status: trailers after what was sent, or trailers-only."""
        if stream.finished:
            return
        status = [("grpc-status", str(code))]
        if details:
            status.append(("grpc-message", wire.percent_encode(details)))
        if stream.headers_sent:
            self.write_headers(stream, status, end_stream=True)
        else:
            self.write_headers(stream, [*_RESPONSE_HEADERS, *status], end_stream=True)
        self._forget(stream)

    def _forget(self, stream: ServerStream) -> None:
        stream.finished = True
        self.streams.pop(stream.id, None)
        if not stream.request_ended:  # answered before the request ended: end it here
            self._write(frame(RST_STREAM, 0, stream.id, struct.pack(">I", wire.NO_ERROR)))
        self.close_if_done()

    # ---- frames out ---------------------------------------------------------------------
    def write_headers(
        self, stream: ServerStream, headers: list[tuple[str, str]], end_stream: bool
    ) -> None:
        block = encode_headers(headers)
        limit = self._peer_max_frame
        first, rest = block[:limit], block[limit:]
        flags = (END_STREAM if end_stream else 0) | (0 if rest else END_HEADERS)
        frames = [frame(HEADERS, flags, stream.id, first)]
        while rest:
            piece, rest = rest[:limit], rest[limit:]
            frames.append(frame(CONTINUATION, 0 if rest else END_HEADERS, stream.id, piece))
        stream.headers_sent = True
        self._write(b"".join(frames))

    async def send_data(self, stream: ServerStream, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if stream.finished or self.closed:
                raise _StreamGone
            room = min(self._send_window, stream.send_window)
            if room <= 0:
                await self._window_open.wait()
                continue
            head = b""
            if not stream.headers_sent:
                head = encode_headers(_RESPONSE_HEADERS)
                head = frame(HEADERS, END_HEADERS, stream.id, head)
                stream.headers_sent = True
            take, max_frame = min(room, len(view)), self._peer_max_frame
            frames = [head]
            for at in range(0, take, max_frame):
                piece = view[at : min(at + max_frame, take)]
                frames.append(_HEADER.pack(len(piece) >> 8, len(piece) & 0xFF, DATA, 0, stream.id))
                frames.append(piece)
            self._send_window -= take
            stream.send_window -= take
            view = view[take:]
            self._write(b"".join(frames))
            await self.writable()

    async def writable(self) -> None:
        """Returns once the socket's buffer has room (at once, mostly)."""
        if not self._writable.is_set():
            await self._writable.wait()
        if self.closed:
            raise _StreamGone

    def _write(self, data: bytes) -> None:
        if data and self.transport is not None and not self.closed:
            self.transport.write(data)

    def _wake_senders(self) -> None:
        self._window_open.set()
        self._window_open = asyncio.Event()

    def go_away(self, code: int = wire.NO_ERROR, reason: str = "") -> None:
        """No new calls: the client is told which it sent may still be answered."""
        if not self._going_away or code != wire.NO_ERROR:
            self._write(
                frame(GOAWAY, 0, 0, struct.pack(">II", self._last_stream, code) + reason.encode())
            )
        self._going_away = True

    def close_if_done(self) -> None:
        if self._going_away and not self.streams:
            self.close()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()


class _StreamGone(Exception):
    """The call's stream or connection ended under its handler."""


class GrpcServer:
    """Methods by path (`/package.Service/Method`): unary handlers return the serialized
    response, streaming handlers send through their ServerStream; both may raise
    GrpcError."""

    def __init__(
        self, unary: Mapping[str, UnaryHandler], streaming: Mapping[str, StreamHandler]
    ) -> None:
        self.unary = dict(unary)
        self.streaming = dict(streaming)
        self.connections: set[_Connection] = set()
        self._servers: list[asyncio.AbstractServer] = []

    async def listen_unix(self, path: str) -> None:
        loop = asyncio.get_running_loop()
        self._servers.append(await loop.create_unix_server(lambda: _Connection(self), path))

    async def listen_tcp(self, address: str) -> int:
        """`HOST:PORT` (`[V6]:PORT`; `[::]:PORT` or `:PORT`: every address, both
        families); the port it listens on (the kernel's choice for port 0)."""
        sock = listening_socket(address)
        loop = asyncio.get_running_loop()
        self._servers.append(await loop.create_server(lambda: _Connection(self), sock=sock))
        return int(sock.getsockname()[1])

    async def stop(self, grace: float) -> None:
        """Stop listening, tell every client (GOAWAY), give calls under way `grace`
        seconds to end, then end the rest (UNAVAILABLE) and close."""
        for server in self._servers:
            server.close()
        connections = list(self.connections)
        for connection in connections:
            connection.go_away()
            connection.close_if_done()
        tasks = [s.task for c in connections for s in c.streams.values() if s.task is not None]
        if tasks and grace > 0:
            await asyncio.wait(tasks, timeout=grace)
        for connection in connections:
            for stream in list(connection.streams.values()):
                connection.finish(stream, wire.UNAVAILABLE, "the server is stopping")
                if stream.task is not None:
                    stream.task.cancel()
            connection.close()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        self._servers.clear()


def listening_socket(address: str) -> socket.socket:
    """A listening TCP socket for `HOST:PORT`; OSError if it cannot be had."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not port_text.isdigit():
        raise OSError(0, f"{address!r} is not HOST:PORT")
    host, port = host.strip("[]"), int(port_text)
    if host in ("", "::"):  # every address: one IPv6 socket that takes IPv4 too
        candidates = [(socket.AF_INET6, ("::", port), False), (socket.AF_INET, ("", port), None)]
    else:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        candidates = [(family, addr, True) for family, _, _, _, addr in infos[:1]]
    error: OSError | None = None
    for family, addr, v6only in candidates:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and v6only is not None:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
            sock.bind(addr)
            sock.listen(socket.SOMAXCONN)
            sock.setblocking(False)
            return sock
        except OSError as err:
            sock.close()
            error = err
    assert error is not None
    raise error


def unlink_socket(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
