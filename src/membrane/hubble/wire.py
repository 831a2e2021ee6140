"""gRPC over HTTP/2 with prior knowledge (h2c), client side, from the standard library
alone: what `membrane observe` needs to call the agent's Observer API without importing
grpcio (whose core imports asyncio: ~150 ms of a command that should answer in < 200 ms).
Its framing, HPACK and constants are also what the agent's server is built on
(hubble.grpc_server).

- HTTP/2 (RFC 9113): preface, SETTINGS and their ACK, HEADERS + CONTINUATION, DATA with
  padding, flow control (a large receive window, replenished as data is consumed; the
  peer's window respected when sending), PING answered, RST_STREAM, GOAWAY.
- HPACK (RFC 7541): requests are encoded as literals without indexing; responses are decoded
  fully (static and dynamic table, Huffman).
- gRPC: 5-byte length-prefixed messages, unary and server-streaming calls, the status from
  the trailers (grpc-status, percent-decoded grpc-message), trailers-only responses.

One call at a time per Channel (what a CLI does); a call abandoned half-way closes the
connection and the next call opens a new one.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Iterator

# --- HPACK (RFC 7541) --------------------------------------------------------------------

# Appendix A: the static table, index 1..61.
STATIC_TABLE: tuple[tuple[str, str], ...] = (
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    *((":status", code) for code in ("200", "204", "206", "304", "400", "404", "500")),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    *(
        (name, "")
        for name in [
            "accept-language",
            "accept-ranges",
            "accept",
            "access-control-allow-origin",
            "age",
            "allow",
            "authorization",
            "cache-control",
            "content-disposition",
            "content-encoding",
            "content-language",
            "content-length",
            "content-location",
            "content-range",
            "content-type",
            "cookie",
            "date",
            "etag",
            "expect",
            "expires",
            "from",
            "host",
            "if-match",
            "if-modified-since",
            "if-none-match",
            "if-range",
            "if-unmodified-since",
            "last-modified",
            "link",
            "location",
            "max-forwards",
            "proxy-authenticate",
            "proxy-authorization",
            "range",
            "referer",
            "refresh",
            "retry-after",
            "server",
            "set-cookie",
            "strict-transport-security",
            "transfer-encoding",
            "user-agent",
            "vary",
            "via",
            "www-authenticate",
        ]
    ),
)
STATIC_NAME_INDEX = {name: i + 1 for i, (name, _) in reversed(list(enumerate(STATIC_TABLE)))}
ENTRY_OVERHEAD = 32  # RFC 7541 4.1: an entry's size is name + value + 32 octets
DEFAULT_TABLE_SIZE = 4096

# Appendix B, as code lengths only: the code is canonical (codes of one length are
# consecutive in symbol order, each length's first code follows the previous length's
# last), so the lengths determine every code. One letter per symbol 0..256 (256 = EOS):
# "A" is 5 bits, "B" 6, ... "Z" 30.
_HUFFMAN_LENGTHS = (
    "ISXXXXXXXTZXXZXXXXXXXXZXXXXXXXXXBFFHIBDGFFDGDBBBAAABBBBBBBCDKBHFIBCCCCCCCCCCCCCCCCCCCCCC"
    "DCDIOIJBKABABABBBACCBBBABCBAABCCCCCKGJIXPRPPRRRSRSSSSSTSTTRSTSSSSQRSRSSTRQPRRSSQSRRTQRSS"
    "QQRQSRSSPRRRSRRSVVPORSRUVVVWWVTUOQVWWVWTQQVVXWWWPTPQRQQSRRUUTTVSVWVVWWWWWXWWWWWVZ"
)
EOS = 256


def _huffman_codes() -> list[tuple[int, int]]:
    """(code, length) per symbol, from the canonical lengths."""
    lengths = [ord(c) - ord("A") + 5 for c in _HUFFMAN_LENGTHS]
    codes: list[tuple[int, int]] = [(0, 0)] * len(lengths)
    code, previous = 0, min(lengths)
    for symbol in sorted(range(len(lengths)), key=lambda s: (lengths[s], s)):
        code <<= lengths[symbol] - previous
        previous = lengths[symbol]
        codes[symbol] = (code, previous)
        code += 1
    return codes


HUFFMAN_CODES = _huffman_codes()
# Decoding: code length -> {code: symbol}.
_HUFFMAN_BY_LENGTH: dict[int, dict[int, int]] = {}
for _symbol, (_code, _length) in enumerate(HUFFMAN_CODES):
    _HUFFMAN_BY_LENGTH.setdefault(_length, {})[_code] = _symbol
_SHORTEST = min(_HUFFMAN_BY_LENGTH)


class HpackError(ValueError):
    """A header block that cannot be decoded (a COMPRESSION_ERROR in HTTP/2 terms)."""


def huffman_encode(data: bytes) -> bytes:
    bits, count = 0, 0
    for byte in data:
        code, length = HUFFMAN_CODES[byte]
        bits, count = (bits << length) | code, count + length
    pad = -count % 8  # the padding is the most significant bits of EOS: all ones
    bits, count = (bits << pad) | ((1 << pad) - 1), count + pad
    return bits.to_bytes(count // 8, "big")


def huffman_decode(data: bytes) -> bytes:
    out = bytearray()
    code = length = 0
    for byte in data:
        for shift in range(7, -1, -1):
            code, length = (code << 1) | ((byte >> shift) & 1), length + 1
            if length < _SHORTEST:
                continue
            symbol = _HUFFMAN_BY_LENGTH.get(length, {}).get(code)
            if symbol is None:
                if length >= 30:
                    raise HpackError("invalid Huffman code")
                continue
            if symbol == EOS:
                raise HpackError("EOS in a Huffman-coded string")
            out.append(symbol)
            code = length = 0
    # What is left must be padding: fewer than 8 bits, all ones (RFC 7541 5.2).
    if length > 7 or code != (1 << length) - 1:
        raise HpackError("invalid Huffman padding")
    return bytes(out)


def encode_integer(value: int, prefix_bits: int, flags: int = 0) -> bytes:
    """RFC 7541 5.1: `value` in an N-bit prefix (the first byte's high bits are `flags`)."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([flags | value])
    out = bytearray([flags | limit])
    value -= limit
    while value >= 128:
        out.append((value & 127) | 128)
        value >>= 7
    out.append(value)
    return bytes(out)


def decode_integer(data: bytes, pos: int, prefix_bits: int) -> tuple[int, int]:
    """The integer at `pos` with an N-bit prefix, and the position after it."""
    limit = (1 << prefix_bits) - 1
    value = data[pos] & limit
    pos += 1
    if value < limit:
        return value, pos
    shift = 0
    while True:
        if pos >= len(data):
            raise HpackError("truncated integer")
        byte = data[pos]
        pos += 1
        value += (byte & 127) << shift
        shift += 7
        if not byte & 128:
            return value, pos
        if shift > 63:
            raise HpackError("integer too large")


def _encode_string(text: str, huffman: bool) -> bytes:
    raw = text.encode("latin-1")
    if huffman:
        coded = huffman_encode(raw)
        return encode_integer(len(coded), 7, 0x80) + coded
    return encode_integer(len(raw), 7) + raw


def encode_headers(headers: list[tuple[str, str]], huffman: bool = False) -> bytes:
    """A header block of literals without indexing (RFC 7541 6.2.2): nothing enters the
    peer's dynamic table, so the encoder keeps no state. A name in the static table is
    sent as its index."""
    out = bytearray()
    for name, value in headers:
        index = STATIC_NAME_INDEX.get(name)
        if index is None:
            out += b"\x00" + _encode_string(name, huffman)
        else:
            out += encode_integer(index, 4)
        out += _encode_string(value, huffman)
    return bytes(out)


class HeaderDecoder:
    """Decodes a connection's header blocks in order; keeps the dynamic table they build."""

    def __init__(self, max_table_size: int = DEFAULT_TABLE_SIZE) -> None:
        self.max_allowed = max_table_size  # what we advertised (SETTINGS_HEADER_TABLE_SIZE)
        self.max_size = max_table_size  # the encoder's current choice, <= max_allowed
        self.table: list[tuple[str, str]] = []  # newest first: index 62 is table[0]
        self.size = 0

    def _entry(self, index: int) -> tuple[str, str]:
        if 1 <= index <= len(STATIC_TABLE):
            return STATIC_TABLE[index - 1]
        dynamic = index - len(STATIC_TABLE) - 1
        if 0 <= dynamic < len(self.table):
            return self.table[dynamic]
        raise HpackError(f"header index {index} is not in the table")

    def _add(self, name: str, value: str) -> None:
        size = len(name) + len(value) + ENTRY_OVERHEAD
        self.table.insert(0, (name, value))
        self.size += size
        self._evict()

    def _evict(self) -> None:
        while self.size > self.max_size and self.table:
            name, value = self.table.pop()
            self.size -= len(name) + len(value) + ENTRY_OVERHEAD

    def _string(self, data: bytes, pos: int) -> tuple[str, int]:
        if pos >= len(data):
            raise HpackError("truncated string")
        huffman = data[pos] & 0x80
        length, pos = decode_integer(data, pos, 7)
        end = pos + length
        if end > len(data):
            raise HpackError("truncated string")
        raw = data[pos:end]
        return (huffman_decode(raw) if huffman else raw).decode("latin-1"), end

    def decode(self, block: bytes) -> list[tuple[str, str]]:
        headers: list[tuple[str, str]] = []
        pos = 0
        while pos < len(block):
            first = block[pos]
            if first & 0x80:  # indexed field (6.1)
                index, pos = decode_integer(block, pos, 7)
                if index == 0:
                    raise HpackError("header index 0")
                headers.append(self._entry(index))
                continue
            if first & 0xE0 == 0x20:  # dynamic table size update (6.3)
                if headers:
                    raise HpackError("table size update after a header field")
                size, pos = decode_integer(block, pos, 5)
                if size > self.max_allowed:
                    raise HpackError(f"table size {size} above {self.max_allowed}")
                self.max_size = size
                self._evict()
                continue
            # a literal: with incremental indexing (6.2.1, 6-bit index), else without or
            # never indexed (6.2.2, 6.2.3, 4-bit index)
            indexing = bool(first & 0x40)
            index, pos = decode_integer(block, pos, 6 if indexing else 4)
            if index:
                name = self._entry(index)[0]
            else:
                name, pos = self._string(block, pos)
            value, pos = self._string(block, pos)
            if indexing:
                self._add(name, value)
            headers.append((name, value))
        return headers


# --- HTTP/2 (RFC 9113) -------------------------------------------------------------------

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE = 0, 1, 2, 3, 4, 5
PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 6, 7, 8, 9
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20
SETTINGS_HEADER_TABLE_SIZE, SETTINGS_ENABLE_PUSH, SETTINGS_MAX_CONCURRENT_STREAMS = 1, 2, 3
SETTINGS_INITIAL_WINDOW_SIZE, SETTINGS_MAX_FRAME_SIZE = 4, 5
DEFAULT_WINDOW = 65_535  # every window's size before SETTINGS / WINDOW_UPDATE say more
DEFAULT_MAX_FRAME = 16_384
MAX_WINDOW = (1 << 31) - 1
# Error codes of RST_STREAM and GOAWAY (RFC 9113 7).
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0x0, 0x1, 0x2, 0x3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL = 0x5, 0x6, 0x7, 0x8
COMPRESSION_ERROR = 0x9
RECEIVE_WINDOW = 16 << 20  # ours, per stream and for the connection: a big answer streams
RECEIVE_MAX_FRAME = 1 << 20  # fewer, larger DATA frames for a long stream
_HEADER = struct.Struct(">HBBBI")  # 24-bit length as 16 + 8 bits, type, flags, stream id


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    length = len(payload)
    return _HEADER.pack(length >> 8, length & 0xFF, kind, flags, stream_id) + payload


def settings_frame(settings: dict[int, int]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(struct.pack(">HI", k, v) for k, v in settings.items()))


def window_update_frame(stream_id: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, stream_id, struct.pack(">I", increment))


def strip_padding(flags: int, payload: bytes) -> bytes:
    """A DATA or HEADERS payload without its Pad Length field and padding."""
    if not flags & PADDED:
        return payload
    if not payload or payload[0] >= len(payload):
        raise RpcError(INTERNAL, "HTTP/2 protocol error: padding longer than the frame")
    return payload[1 : len(payload) - payload[0]]


# --- gRPC --------------------------------------------------------------------------------

# grpc/status codes, by number (the names grpcio's StatusCode has).
STATUS_NAMES = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
]
OK, CANCELLED, UNKNOWN, INVALID_ARGUMENT, DEADLINE_EXCEEDED = 0, 1, 2, 3, 4
RESOURCE_EXHAUSTED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE = 8, 12, 13, 14
# An HTTP status other than 200 as a gRPC status (gRPC's http-grpc-status-mapping).
HTTP_STATUS = {400: INTERNAL, 401: 16, 403: 7, 404: UNIMPLEMENTED}
HTTP_STATUS.update(dict.fromkeys((429, 502, 503, 504), UNAVAILABLE))
# A RST_STREAM error code as a gRPC status (the rest are INTERNAL).
RESET_STATUS = {7: UNAVAILABLE, CANCEL: CANCELLED, 0xB: RESOURCE_EXHAUSTED, 0xC: 7}
_MESSAGE_PREFIX = struct.Struct(">BI")  # compressed flag, length
_HEX = b"0123456789abcdefABCDEF"


class RpcError(Exception):
    """A call that did not end with grpc-status 0."""

    def __init__(self, code: int, details: str) -> None:
        self.code = code
        self.details = details
        super().__init__(f"{self.code_name}: {details}")

    @property
    def code_name(self) -> str:
        return STATUS_NAMES[self.code] if 0 <= self.code < len(STATUS_NAMES) else "UNKNOWN"


def percent_decode(text: str) -> str:
    """grpc-message's encoding: %XX for bytes outside printable ASCII (and '%'), UTF-8."""
    if "%" not in text:
        return text
    out, i = bytearray(), 0
    raw = text.encode("latin-1")
    while i < len(raw):
        pair = raw[i + 1 : i + 3]
        if raw[i] == 0x25 and len(pair) == 2 and all(c in _HEX for c in pair):
            out.append(int(pair, 16))
            i += 3
            continue
        out.append(raw[i])
        i += 1
    return out.decode("utf-8", "replace")


def percent_encode(text: str) -> str:
    """grpc-message as a server writes it: UTF-8, with '%' and bytes outside printable
    ASCII as %XX (percent_decode's inverse)."""
    out = []
    for byte in text.encode("utf-8"):
        out.append(chr(byte) if 0x20 <= byte <= 0x7E and byte != 0x25 else f"%{byte:02X}")
    return "".join(out)


def parse_address(address: str) -> tuple[int, object, str]:
    """(socket family, socket address, :authority) of `unix:///PATH`, `unix:PATH` or
    `HOST:PORT` (`[V6]:PORT`); ValueError for anything else."""
    if address.startswith("unix:"):
        path = address[len("unix:") :]
        if path.startswith("//"):
            path = path[2:]
        if not path:
            raise ValueError("unix: needs a path")
        return socket.AF_UNIX, path, "localhost"
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("give unix:///PATH or HOST:PORT")
    family = socket.AF_INET
    if host.startswith("[") and host.endswith("]"):
        host, family = host[1:-1], socket.AF_INET6
    return family, (host, int(port)), address


class _Call:
    """One stream's state as frames arrive."""

    def __init__(self, stream_id: int, send_window: int) -> None:
        self.id = stream_id
        self.send_window = send_window
        self.headers: list[tuple[str, str]] | None = None
        self.trailers: list[tuple[str, str]] | None = None
        self.body = bytearray()  # DATA not yet cut into messages
        self.unacked = 0  # DATA consumed since our last WINDOW_UPDATE for the stream
        self.ended = False
        self.error: RpcError | None = None


class Channel:
    """One HTTP/2 connection to a gRPC server, opened by the first call."""

    def __init__(self, address: str, window: int = RECEIVE_WINDOW) -> None:
        self.family, self.sockaddr, self.authority = parse_address(address)
        self.window = window
        self._sock: socket.socket | None = None
        self._inbox = bytearray()
        self._next_stream = 1
        self._decoder = HeaderDecoder()
        self._send_window = DEFAULT_WINDOW  # the connection's, granted by the peer
        self._peer_initial_window = DEFAULT_WINDOW
        self._peer_max_frame = DEFAULT_MAX_FRAME
        self._unacked = 0  # connection-level DATA consumed since our last WINDOW_UPDATE
        self._goaway_last: int | None = None
        self._goaway_reason = ""

    # connection ------------------------------------------------------------------------

    def _connect(self, timeout: float | None) -> socket.socket:
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(self.sockaddr)
            if self.family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            settings = {
                SETTINGS_ENABLE_PUSH: 0,
                SETTINGS_INITIAL_WINDOW_SIZE: self.window,
                SETTINGS_MAX_FRAME_SIZE: RECEIVE_MAX_FRAME,
            }
            hello = PREFACE + settings_frame(settings)
            if self.window > DEFAULT_WINDOW:  # the connection's window starts at 64 KiB
                hello += window_update_frame(0, self.window - DEFAULT_WINDOW)
            sock.sendall(hello)
        except TimeoutError:
            sock.close()
            raise RpcError(DEADLINE_EXCEEDED, "connecting took too long") from None
        except OSError as err:
            sock.close()
            raise RpcError(UNAVAILABLE, err.strerror or str(err)) from None
        self._inbox.clear()
        self._decoder = HeaderDecoder()
        self._send_window, self._unacked = DEFAULT_WINDOW, 0
        self._peer_initial_window, self._peer_max_frame = DEFAULT_WINDOW, DEFAULT_MAX_FRAME
        self._next_stream, self._goaway_last = 1, None
        return sock

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.sendall(frame(GOAWAY, 0, 0, struct.pack(">II", 0, 0)))
            self._sock.close()
            self._sock = None

    def _send(self, data: bytes) -> None:
        assert self._sock is not None
        try:
            self._sock.sendall(data)
        except TimeoutError:
            raise RpcError(DEADLINE_EXCEEDED, "sending took too long") from None
        except OSError as err:
            raise RpcError(UNAVAILABLE, f"connection lost: {err.strerror or err}") from None

    def _send_control(self, data: bytes) -> None:
        """An ACK or WINDOW_UPDATE: if the peer is gone, reading says so (and what it
        sent before going is still read)."""
        assert self._sock is not None
        with contextlib.suppress(OSError):
            self._sock.sendall(data)

    def _read_frame(self) -> tuple[int, int, int, bytes]:
        """The next frame: (type, flags, stream id, payload)."""
        assert self._sock is not None
        inbox = self._inbox
        need = 9
        while True:
            if len(inbox) >= 9:
                high, low, kind, flags, stream_id = _HEADER.unpack_from(inbox)
                need = 9 + (high << 8 | low)
                if len(inbox) >= need:
                    payload = bytes(inbox[9:need])
                    del inbox[:need]
                    return kind, flags, stream_id & MAX_WINDOW, payload
            try:
                chunk = self._sock.recv(max(need - len(inbox), 1 << 18))
            except TimeoutError:
                raise RpcError(DEADLINE_EXCEEDED, "the server did not answer in time") from None
            except OSError as err:
                raise RpcError(UNAVAILABLE, f"connection lost: {err.strerror or err}") from None
            if not chunk:
                reason = self._goaway_reason or "the server closed the connection"
                raise RpcError(UNAVAILABLE, reason)
            inbox += chunk

    def _header_block(self, flags: int, payload: bytes, stream_id: int) -> bytes:
        """A HEADERS payload's field block, with its CONTINUATION frames."""
        block = strip_padding(flags, payload)
        if flags & PRIORITY_FLAG:
            block = block[5:]  # stream dependency and weight: nothing for a client
        while not flags & END_HEADERS:
            kind, flags, continued, more = self._read_frame()
            if kind != CONTINUATION or continued != stream_id:
                raise RpcError(INTERNAL, "HTTP/2 protocol error: header block interrupted")
            block += more
        return block

    def _pump(self, call: _Call) -> None:
        """Reads and handles one frame (and its CONTINUATIONs)."""
        kind, flags, stream_id, payload = self._read_frame()
        mine = stream_id == call.id
        if kind == DATA:
            self._unacked += len(payload)
            if mine and not call.ended:
                call.body += strip_padding(flags, payload)
                call.unacked += len(payload)
                call.ended = bool(flags & END_STREAM)
            self._replenish(call)
        elif kind == HEADERS:
            try:
                fields = self._decoder.decode(self._header_block(flags, payload, stream_id))
            except HpackError as err:  # the connection's header state is lost with it
                raise RpcError(INTERNAL, f"HTTP/2 header compression error: {err}") from None
            if mine:
                if call.headers is None:
                    call.headers = fields
                else:
                    call.trailers = fields
                    if not flags & END_STREAM:
                        call.error = RpcError(INTERNAL, "trailers without END_STREAM")
                if flags & END_STREAM:
                    if call.trailers is None:  # trailers-only: the status is in there
                        call.trailers = fields
                    call.ended = True
        elif kind == SETTINGS:
            if not flags & ACK:
                self._apply_settings(payload, call)
                self._send_control(frame(SETTINGS, ACK, 0))
        elif kind == PING:
            if not flags & ACK:
                self._send_control(frame(PING, ACK, 0, payload))
        elif kind == WINDOW_UPDATE:
            (increment,) = struct.unpack(">I", payload[:4])
            if stream_id == 0:
                self._send_window += increment & MAX_WINDOW
            elif mine:
                call.send_window += increment & MAX_WINDOW
        elif kind == RST_STREAM and mine:
            (code,) = struct.unpack(">I", payload[:4])
            call.error = RpcError(
                RESET_STATUS.get(code, INTERNAL), f"stream reset by the server (code {code})"
            )
            call.ended = True
        elif kind == GOAWAY:
            last, code = struct.unpack(">II", payload[:8])
            self._goaway_last = last & MAX_WINDOW
            debug = payload[8:].decode("utf-8", "replace")
            self._goaway_reason = (
                f"the server went away (code {code}{': ' + debug if debug else ''})"
            )
            if call.id > self._goaway_last and not call.ended:
                call.error = RpcError(UNAVAILABLE, self._goaway_reason)
                call.ended = True
        elif kind in (PUSH_PROMISE, CONTINUATION):
            raise RpcError(INTERNAL, f"HTTP/2 protocol error: unexpected frame type {kind}")
        # PRIORITY, RST_STREAM of other streams and unknown types are ignored (RFC 9113 5.5)

    def _apply_settings(self, payload: bytes, call: _Call) -> None:
        for offset in range(0, len(payload) - len(payload) % 6, 6):
            key, value = struct.unpack_from(">HI", payload, offset)
            if key == SETTINGS_INITIAL_WINDOW_SIZE:  # open streams' windows move alike
                call.send_window += value - self._peer_initial_window
                self._peer_initial_window = value
            elif key == SETTINGS_MAX_FRAME_SIZE:
                self._peer_max_frame = value
            # HEADER_TABLE_SIZE bounds the table of our encoder, which uses none

    def _replenish(self, call: _Call) -> None:
        """WINDOW_UPDATEs once half a window is consumed, so the peer never stalls."""
        updates = b""
        if self._unacked >= self.window // 2:
            updates += window_update_frame(0, self._unacked)
            self._unacked = 0
        if call.unacked >= self.window // 2 and not call.ended:
            updates += window_update_frame(call.id, call.unacked)
            call.unacked = 0
        if updates:
            self._send_control(updates)

    # calls -----------------------------------------------------------------------------

    def _start(self, method: str, request: bytes, timeout: float | None) -> _Call:
        if self._sock is None or self._goaway_last is not None:
            self.close()
            self._sock = self._connect(timeout)
        self._sock.settimeout(timeout)
        call = _Call(self._next_stream, 0)
        self._next_stream += 2
        headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", method),
            (":authority", self.authority),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            ("user-agent", "membrane-observe"),
        ]
        if timeout is not None:
            headers.append(("grpc-timeout", f"{max(1, int(timeout * 1000))}m"))
        block = encode_headers(headers)
        if len(block) > self._peer_max_frame:
            raise RpcError(INTERNAL, "request headers larger than a frame")
        call.send_window = self._peer_initial_window
        self._send(frame(HEADERS, END_HEADERS, call.id, block))
        self._send_body(call, _MESSAGE_PREFIX.pack(0, len(request)) + request)
        return call

    def _send_body(self, call: _Call, body: bytes) -> None:
        """DATA frames within the peer's windows, the last with END_STREAM."""
        view = memoryview(body)
        while True:
            room = min(self._send_window, call.send_window, self._peer_max_frame)
            if room <= 0 and view:
                self._pump(call)  # a WINDOW_UPDATE, perhaps an early answer
                if call.ended:
                    return
                continue
            chunk, view = view[:room], view[room:]
            self._send_window -= len(chunk)
            call.send_window -= len(chunk)
            self._send(frame(DATA, 0 if view else END_STREAM, call.id, bytes(chunk)))
            if not view:
                return

    def _messages(self, call: _Call) -> Iterator[bytes]:
        """The response messages as they arrive; then RpcError unless grpc-status is 0."""
        while True:
            body = call.body
            while len(body) >= 5:
                compressed, length = _MESSAGE_PREFIX.unpack_from(body)
                if len(body) < 5 + length:
                    break
                if compressed:
                    raise RpcError(INTERNAL, "compressed message, none was asked for")
                message = bytes(body[5 : 5 + length])
                del body[: 5 + length]
                yield message
            if call.ended:
                break
            self._pump(call)
        if call.error is not None:
            raise call.error
        self._check_status(call)
        if body:
            raise RpcError(INTERNAL, "the stream ended inside a message")

    def _check_status(self, call: _Call) -> None:
        head = dict(call.headers or ())
        http_status = int(head.get(":status", "0") or 0)
        trailers = dict(call.trailers or ())
        if "grpc-status" not in trailers:
            if http_status != 200:
                code = HTTP_STATUS.get(http_status, UNKNOWN)
                raise RpcError(code, f"HTTP status {http_status}")
            raise RpcError(INTERNAL, "the server ended the stream without a grpc-status")
        try:
            code = int(trailers["grpc-status"])
        except ValueError:
            raise RpcError(UNKNOWN, f"grpc-status {trailers['grpc-status']!r}") from None
        if code != OK:
            raise RpcError(code, percent_decode(trailers.get("grpc-message", "")))

    def unary(self, method: str, request: bytes, timeout: float | None = None) -> bytes:
        """One request, one response (`method` is `/package.Service/Method`)."""
        messages = list(self.stream(method, request, timeout))
        if len(messages) != 1:
            raise RpcError(INTERNAL, f"{len(messages)} responses to a unary call")
        return messages[0]

    def stream(self, method: str, request: bytes, timeout: float | None = None) -> Iterator[bytes]:
        """A server-streaming call: the responses as they come. Leaving before the end
        cancels the stream and closes the connection."""
        call = self._start(method, request, timeout)
        finished = False
        try:
            yield from self._messages(call)
            finished = True
        finally:
            if not finished:
                self._abandon(call)

    def _abandon(self, call: _Call) -> None:
        if self._sock is not None and not call.ended:
            with contextlib.suppress(OSError):
                self._sock.sendall(frame(RST_STREAM, 0, call.id, struct.pack(">I", CANCEL)))
        self.close()  # the rest of that stream may still be on its way: start afresh
