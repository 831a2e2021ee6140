"""hubble.wire, the CLI's gRPC client: HPACK against RFC 7541's own examples (Appendix C),
Huffman round trips, HTTP/2 framing edge cases against a scripted peer on a unix socket
(CONTINUATION, padding, PING, flow control both ways, trailers-only errors), and a stream
far larger than HTTP/2's default 64 KiB window from the agent's real grpc.aio server."""

from __future__ import annotations

import contextlib
import random
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from observe_support import observer_server

from membrane.hubble import wire
from membrane.hubble.flow import flow_pb2
from membrane.hubble.observer import observer_pb2
from membrane.observe.record import flow_response
from membrane.observe.store import FlowStore


def hexbytes(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


# --- HPACK: RFC 7541 Appendix C -----------------------------------------------------------


def test_integers_c1() -> None:
    assert wire.encode_integer(10, 5) == b"\x0a"
    assert wire.encode_integer(1337, 5) == hexbytes("1f9a0a")
    assert wire.encode_integer(42, 8) == b"\x2a"
    assert wire.decode_integer(hexbytes("1f9a0a"), 0, 5) == (1337, 3)
    assert wire.decode_integer(b"\xea", 0, 5) == (10, 1)  # flag bits above the prefix


def test_single_representations_c2() -> None:
    decoder = wire.HeaderDecoder()
    c21 = hexbytes("400a 6375 7374 6f6d 2d6b 6579 0d63 7573 746f 6d2d 6865 6164 6572")
    assert decoder.decode(c21) == [("custom-key", "custom-header")]
    assert (decoder.table, decoder.size) == ([("custom-key", "custom-header")], 55)

    c22 = hexbytes("040c 2f73 616d 706c 652f 7061 7468")
    decoder = wire.HeaderDecoder()
    assert decoder.decode(c22) == [(":path", "/sample/path")]
    assert decoder.table == []
    # our encoder writes exactly this: a literal without indexing, the name by its index
    assert wire.encode_headers([(":path", "/sample/path")]) == c22

    c23 = hexbytes("1008 7061 7373 776f 7264 0673 6563 7265 74")
    assert decoder.decode(c23) == [("password", "secret")]
    assert decoder.table == []

    assert decoder.decode(b"\x82") == [(":method", "GET")]


REQUEST_1 = [(":method", "GET"), (":scheme", "http"), (":path", "/")]
REQUEST_1 += [(":authority", "www.example.com")]
REQUEST_2 = [*REQUEST_1, ("cache-control", "no-cache")]
REQUEST_3 = [(":method", "GET"), (":scheme", "https"), (":path", "/index.html")]
REQUEST_3 += [(":authority", "www.example.com"), ("custom-key", "custom-value")]
REQUEST_TABLES = [
    ([(":authority", "www.example.com")], 57),
    ([("cache-control", "no-cache"), (":authority", "www.example.com")], 110),
    (
        [
            ("custom-key", "custom-value"),
            ("cache-control", "no-cache"),
            (":authority", "www.example.com"),
        ],
        164,
    ),
]
REQUESTS_PLAIN = [  # C.3
    "8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
    "8286 84be 5808 6e6f 2d63 6163 6865",
    "8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65",
]
REQUESTS_HUFFMAN = [  # C.4
    "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff",
    "8286 84be 5886 a8eb 1064 9cbf",
    "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
]

DATE_1, DATE_2 = "Mon, 21 Oct 2013 20:13:21 GMT", "Mon, 21 Oct 2013 20:13:22 GMT"
LOCATION = "https://www.example.com"
COOKIE = "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1"
RESPONSE_1 = [
    (":status", "302"),
    ("cache-control", "private"),
    ("date", DATE_1),
    ("location", LOCATION),
]
RESPONSE_2 = [(":status", "307"), *RESPONSE_1[1:]]
RESPONSE_3 = [(":status", "200"), ("cache-control", "private"), ("date", DATE_2)]
RESPONSE_3 += [("location", LOCATION), ("content-encoding", "gzip"), ("set-cookie", COOKIE)]
RESPONSE_TABLES = [
    (
        [
            ("location", LOCATION),
            ("date", DATE_1),
            ("cache-control", "private"),
            (":status", "302"),
        ],
        222,
    ),
    (
        [
            (":status", "307"),
            ("location", LOCATION),
            ("date", DATE_1),
            ("cache-control", "private"),
        ],
        222,
    ),
    ([("set-cookie", COOKIE), ("content-encoding", "gzip"), ("date", DATE_2)], 215),
]
RESPONSES_PLAIN = [  # C.5
    "4803 3330 3258 0770 7269 7661 7465 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133"
    "2032 303a 3133 3a32 3120 474d 546e 1768 7474 7073 3a2f 2f77 7777 2e65 7861 6d70"
    "6c65 2e63 6f6d",
    "4803 3330 37c1 c0bf",
    "88c1 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 303a 3133 3a32 3220 474d"
    "54c0 5a04 677a 6970 7738 666f 6f3d 4153 444a 4b48 514b 425a 584f 5157 454f 5049"
    "5541 5851 5745 4f49 553b 206d 6178 2d61 6765 3d33 3630 303b 2076 6572 7369 6f6e"
    "3d31",
]
RESPONSES_HUFFMAN = [  # C.6
    "4882 6402 5885 aec3 771a 4b61 96d0 7abe 9410 54d4 44a8 2005 9504 0b81 66e0 82a6"
    "2d1b ff6e 919d 29ad 1718 63c7 8f0b 97c8 e9ae 82ae 43d3",
    "4883 640e ffc1 c0bf",
    "88c1 6196 d07a be94 1054 d444 a820 0595 040b 8166 e084 a62d 1bff c05a 839b d9ab"
    "77ad 94e7 821d d7f2 e6c7 b335 dfdf cd5b 3960 d5af 2708 7f36 72c1 ab27 0fb5 291f"
    "9587 3160 65c0 03ed 4ee5 b106 3d50 07",
]


@pytest.mark.parametrize(
    ("blocks", "lists", "tables", "table_size"),
    [
        (REQUESTS_PLAIN, [REQUEST_1, REQUEST_2, REQUEST_3], REQUEST_TABLES, 4096),
        (REQUESTS_HUFFMAN, [REQUEST_1, REQUEST_2, REQUEST_3], REQUEST_TABLES, 4096),
        (RESPONSES_PLAIN, [RESPONSE_1, RESPONSE_2, RESPONSE_3], RESPONSE_TABLES, 256),
        (RESPONSES_HUFFMAN, [RESPONSE_1, RESPONSE_2, RESPONSE_3], RESPONSE_TABLES, 256),
    ],
    ids=["C.3", "C.4", "C.5", "C.6"],
)
def test_header_lists_on_one_connection(
    blocks: list[str],
    lists: list[list[tuple[str, str]]],
    tables: list[tuple[list[tuple[str, str]], int]],
    table_size: int,
) -> None:
    decoder = wire.HeaderDecoder(table_size)
    for block, expected, (table, size) in zip(blocks, lists, tables, strict=True):
        assert decoder.decode(hexbytes(block)) == expected
        assert (decoder.table, decoder.size) == (table, size)


def test_table_size_updates() -> None:
    decoder = wire.HeaderDecoder()
    decoder.decode(hexbytes(REQUESTS_PLAIN[0]))
    assert decoder.size == 57
    assert decoder.decode(b"\x20") == []  # size 0: everything evicted
    assert (decoder.table, decoder.size, decoder.max_size) == ([], 0, 0)
    with pytest.raises(wire.HpackError, match="4097"):
        decoder.decode(wire.encode_integer(4097, 5, 0x20))
    with pytest.raises(wire.HpackError, match="after a header"):
        decoder.decode(b"\x82\x20")
    with pytest.raises(wire.HpackError, match="not in the table"):
        decoder.decode(b"\xbe")  # index 62: the dynamic table is empty
    with pytest.raises(wire.HpackError, match="truncated"):
        decoder.decode(b"\x04\x0c/sample")


# --- Huffman -----------------------------------------------------------------------------


def test_huffman_round_trips() -> None:
    assert wire.huffman_encode(b"www.example.com") == hexbytes("f1e3 c2e5 f23a 6ba0 ab90 f4ff")
    assert wire.huffman_decode(hexbytes("a8eb 1064 9cbf")) == b"no-cache"
    every_byte = bytes(range(256))
    assert wire.huffman_decode(wire.huffman_encode(every_byte)) == every_byte
    rng = random.Random(7541)
    for size in (0, 1, 2, 3, 7, 64, 1000):
        data = bytes(rng.randrange(256) for _ in range(size))
        assert wire.huffman_decode(wire.huffman_encode(data)) == data
    text = b"grpc-status grpc-message application/grpc 0123456789"
    assert len(wire.huffman_encode(text)) < len(text)
    assert wire.HUFFMAN_CODES[wire.EOS] == ((1 << 30) - 1, 30)


def test_huffman_refuses_bad_padding_and_eos() -> None:
    with pytest.raises(wire.HpackError, match="padding"):
        wire.huffman_decode(b"\x00")  # '0' (00000) then padding of zeros
    with pytest.raises(wire.HpackError, match="padding"):
        wire.huffman_decode(hexbytes("f1e3 c2e5 f23a 6ba0 ab90 f4ff ff"))  # 8+ bits of 1s
    with pytest.raises(wire.HpackError, match="EOS"):
        wire.huffman_decode(b"\xff\xff\xff\xfc")  # EOS (30 ones) then 2 zero bits


# --- HTTP/2 framing against a scripted peer ----------------------------------------------


class Peer:
    """The server side of one connection, driven by a test's script."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.conn.settimeout(10)
        self.buffer = b""

    def _exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            chunk = self.conn.recv(65536)
            if not chunk:
                raise EOFError
            self.buffer += chunk
        out, self.buffer = self.buffer[:size], self.buffer[size:]
        return out

    def read_frame(self) -> tuple[int, int, int, bytes]:
        high, low, kind, flags, stream_id = struct.unpack(">HBBBI", self._exactly(9))
        return kind, flags, stream_id, self._exactly(high << 8 | low)

    def read_request(self, data_limit: int | None = None) -> tuple[list[tuple[str, str]], bytes]:
        """The preface, then frames up to the request's end: (headers, body). With
        `data_limit`, stops once that much DATA came (the request's end not yet seen)."""
        assert self._exactly(len(wire.PREFACE)) == wire.PREFACE
        headers: list[tuple[str, str]] = []
        body = b""
        while True:
            kind, flags, _, payload = self.read_frame()
            if kind == wire.HEADERS:
                headers = wire.HeaderDecoder().decode(payload)
            elif kind == wire.DATA:
                body += payload
                if flags & wire.END_STREAM or len(body) == data_limit:
                    return headers, body

    def send(self, *frames: bytes) -> None:
        self.conn.sendall(b"".join(frames))


@contextlib.contextmanager
def scripted_peer(tmp_path: Path, script: Callable[[Peer], None]) -> Iterator[str]:
    """A unix socket whose first connection `script` serves; yields its address and
    re-raises what the script asserted."""
    path = str(tmp_path / "h2.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    failures: list[BaseException] = []

    def serve() -> None:
        try:
            listener.settimeout(10)
            conn, _ = listener.accept()
            with conn:
                script(Peer(conn))
        except BaseException as err:  # reported in the test's thread
            failures.append(err)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield "unix://" + path
    finally:
        thread.join(timeout=15)
        listener.close()
        if failures:  # the script's failure explains the client's, if any
            raise failures[0]
    assert not thread.is_alive()


def grpc_message(payload: bytes) -> bytes:
    return struct.pack(">BI", 0, len(payload)) + payload


OK_HEADERS = b"\x88" + wire.encode_headers([("content-type", "application/grpc")], huffman=True)
OK_TRAILERS = wire.encode_headers([("grpc-status", "0")])


def test_continuation_padding_ping_and_split_messages(tmp_path: Path) -> None:
    seen: dict[str, bytes] = {}

    def script(peer: Peer) -> None:
        headers, body = peer.read_request()
        assert (":path", "/observer.Observer/GetFlows") in headers
        assert ("te", "trailers") in headers and body == grpc_message(b"ask")
        # the response headers: padded, with a priority, cut by a CONTINUATION
        first, rest = OK_HEADERS[:2], OK_HEADERS[2:]
        pad = 3
        headers_payload = bytes([pad]) + b"\x00\x00\x00\x00\x10" + first + b"\x00" * pad
        stream = grpc_message(b"one") + grpc_message(b"") + grpc_message(b"three" * 10)
        peer.send(
            wire.settings_frame({}),
            wire.frame(wire.PING, 0, 0, b"pingpong"),
            wire.frame(wire.HEADERS, wire.PADDED | wire.PRIORITY_FLAG, 1, headers_payload),
            wire.frame(wire.CONTINUATION, wire.END_HEADERS, 1, rest),
            wire.frame(wire.DATA, wire.PADDED, 1, b"\x02" + stream[:3] + b"\x00\x00"),
            wire.frame(wire.PRIORITY, 0, 1, b"\x00" * 5),  # ignored
            wire.frame(0xFA, 0, 0, b"unknown"),  # an unknown type: ignored
            wire.frame(wire.DATA, 0, 1, stream[3:20]),
            wire.frame(wire.DATA, 0, 1, stream[20:]),
            wire.frame(wire.HEADERS, wire.END_HEADERS | wire.END_STREAM, 1, OK_TRAILERS),
        )
        while "ping" not in seen or "settings" not in seen:
            kind, flags, _, payload = peer.read_frame()
            if kind == wire.PING and flags & wire.ACK:
                seen["ping"] = payload
            if kind == wire.SETTINGS and flags & wire.ACK:
                seen["settings"] = payload

    with scripted_peer(tmp_path, script) as address:
        channel = wire.Channel(address)
        got = list(channel.stream("/observer.Observer/GetFlows", b"ask"))
        channel.close()
    assert got == [b"one", b"", b"three" * 10]
    assert seen == {"ping": b"pingpong", "settings": b""}


def test_the_peers_window_is_respected_when_sending(tmp_path: Path) -> None:
    request = bytes(range(256)) * 400  # 102,400 bytes: more than the 65,535 granted

    def script(peer: Peer) -> None:
        _, body = peer.read_request(data_limit=wire.DEFAULT_WINDOW)
        more = len(request) + 5 - len(body)
        peer.send(wire.window_update_frame(0, more), wire.window_update_frame(1, more))
        while True:
            kind, flags, _, payload = peer.read_frame()
            if kind == wire.DATA:
                body += payload
                if flags & wire.END_STREAM:
                    break
        assert body == grpc_message(request)
        peer.send(
            wire.frame(wire.HEADERS, wire.END_HEADERS, 1, OK_HEADERS),
            wire.frame(wire.DATA, 0, 1, grpc_message(b"thanks")),
            wire.frame(wire.HEADERS, wire.END_HEADERS | wire.END_STREAM, 1, OK_TRAILERS),
        )

    with scripted_peer(tmp_path, script) as address:
        channel = wire.Channel(address)
        assert channel.unary("/observer.Observer/ServerStatus", request, timeout=10) == b"thanks"
        channel.close()


def test_our_window_is_replenished_as_data_is_consumed(tmp_path: Path) -> None:
    window = wire.DEFAULT_WINDOW
    message = grpc_message(b"x" * 40_000)
    answer = message * 10  # 400 KB: six windows' worth

    def script(peer: Peer) -> None:
        peer.read_request()
        peer.send(wire.frame(wire.HEADERS, wire.END_HEADERS, 1, OK_HEADERS))
        sent, granted = 0, {0: window, 1: window}
        while sent < len(answer):
            room = min(*granted.values(), 16_384, len(answer) - sent)
            if room:  # never more than the client granted: it must send WINDOW_UPDATEs
                peer.send(wire.frame(wire.DATA, 0, 1, answer[sent : sent + room]))
                sent += room
                granted = {k: v - room for k, v in granted.items()}
                continue
            kind, _, stream_id, payload = peer.read_frame()
            if kind == wire.WINDOW_UPDATE:
                granted[stream_id] += struct.unpack(">I", payload)[0]
        peer.send(wire.frame(wire.HEADERS, wire.END_HEADERS | wire.END_STREAM, 1, OK_TRAILERS))

    with scripted_peer(tmp_path, script) as address:
        channel = wire.Channel(address, window=window)
        got = list(channel.stream("/observer.Observer/GetFlows", b"", timeout=10))
        channel.close()
    assert len(got) == 10 and got[0] == message[5:]


@pytest.mark.parametrize(
    ("frames", "code", "details"),
    [
        (  # trailers-only: the status in the only HEADERS, grpc-message percent-encoded
            [
                wire.frame(
                    wire.HEADERS,
                    wire.END_HEADERS | wire.END_STREAM,
                    1,
                    b"\x88"
                    + wire.encode_headers(
                        [("grpc-status", "3"), ("grpc-message", "since: bad%20time %E2%9C%93%")],
                        huffman=True,
                    ),
                )
            ],
            wire.INVALID_ARGUMENT,
            "since: bad time \u2713%",
        ),
        (
            [wire.frame(wire.RST_STREAM, 0, 1, struct.pack(">I", 7))],
            wire.UNAVAILABLE,
            "stream reset by the server (code 7)",
        ),
        (
            [wire.frame(wire.GOAWAY, 0, 0, struct.pack(">II", 0, 0) + b"shutting down")],
            wire.UNAVAILABLE,
            "the server went away (code 0: shutting down)",
        ),
        (
            [
                wire.frame(
                    wire.HEADERS,
                    wire.END_HEADERS | wire.END_STREAM,
                    1,
                    wire.encode_headers([(":status", "404")]),
                )
            ],
            wire.UNIMPLEMENTED,
            "HTTP status 404",
        ),
        (
            [
                wire.frame(wire.HEADERS, wire.END_HEADERS, 1, OK_HEADERS),
                wire.frame(wire.DATA, wire.END_STREAM, 1, grpc_message(b"a")),
            ],
            wire.INTERNAL,
            "the server ended the stream without a grpc-status",
        ),
        ([], wire.UNAVAILABLE, "the server closed the connection"),
        (
            [wire.frame(wire.HEADERS, wire.END_HEADERS, 1, b"\xbe")],  # empty dynamic table
            wire.INTERNAL,
            "HTTP/2 header compression error: header index 62 is not in the table",
        ),
    ],
    ids=["trailers-only", "rst-stream", "goaway", "http-404", "no-trailers", "eof", "hpack"],
)
def test_failures_are_status_codes(
    tmp_path: Path, frames: list[bytes], code: int, details: str
) -> None:
    def script(peer: Peer) -> None:
        peer.read_request()
        peer.send(*frames)

    with scripted_peer(tmp_path, script) as address:
        channel = wire.Channel(address)
        with pytest.raises(wire.RpcError) as err:
            list(channel.stream("/observer.Observer/GetFlows", b"", timeout=10))
        channel.close()
    assert (err.value.code, err.value.details) == (code, details)


def test_addresses() -> None:
    assert wire.parse_address("unix:///run/m/hubble.sock")[1:] == (
        "/run/m/hubble.sock",
        "localhost",
    )
    assert wire.parse_address("unix:rel.sock")[1] == "rel.sock"
    assert wire.parse_address("198.18.0.1:4244")[:2] == (socket.AF_INET, ("198.18.0.1", 4244))
    assert wire.parse_address("[2001:db8::1]:4244")[:2] == (
        socket.AF_INET6,
        ("2001:db8::1", 4244),
    )
    for bad in ("unix://", "host", "host:http", ":4244", "host:70000"):
        with pytest.raises(ValueError):
            wire.parse_address(bad)


# --- the agent's real server -------------------------------------------------------------


def test_a_stream_far_beyond_the_default_window_from_the_real_server(tmp_path: Path) -> None:
    count = 5_000
    store = FlowStore(capacity=8191, node_name="node-1")
    store.extend(
        flow_response(flow_pb2.Flow(uuid=f"flow-{i:05d}", Summary="TCP Flags: SYN " * 4))
        for i in range(count)
    )
    request = observer_pb2.GetFlowsRequest(number=count).SerializeToString()
    with observer_server(store, str(tmp_path / "hubble.sock")) as address:
        # HTTP/2's default window: the server stalls unless we send WINDOW_UPDATEs
        channel = wire.Channel(address, window=wire.DEFAULT_WINDOW)
        got = list(channel.stream("/observer.Observer/GetFlows", request, timeout=20))
        assert sum(len(m) for m in got) > 4 * wire.DEFAULT_WINDOW
        uuids = [observer_pb2.GetFlowsResponse.FromString(m).flow.uuid for m in got]
        assert uuids == [f"flow-{i:05d}" for i in range(count)]
        # the same connection serves the next call
        status = observer_pb2.ServerStatusResponse.FromString(
            channel.unary("/observer.Observer/ServerStatus", b"", timeout=10)
        )
        assert status.num_flows == count
        channel.close()
