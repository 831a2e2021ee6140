"""The CLI's side of the agent API: HTTP/1.1 with JSON bodies over the agent's unix socket.

Standard library only, and not even http.client: with the ssl and email modules it pulls
in, it costs a client command ~20 % of its start-up. The agent's server (aiohttp) is the
only peer, so this speaks just what it needs: one request per connection, a body by
Content-Length or chunked. Errors the agent reports for bad input come back as `UserError`
(one line, exit code 2); an agent that cannot be reached is an `AgentUnavailable` (exit
code 1).
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, urlencode

from membrane.errors import UserError

SOCKET_ENV = "MEMBRANE_API_SOCKET"
DEFAULT_SOCKET = "/run/membrane/membrane.sock"
MAX_HEADER_BYTES = 64 * 1024


def socket_path(api_socket: str | None) -> str:
    return api_socket or os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET


class AgentUnavailable(UserError):
    exit_code = 1


class AgentFailed(UserError):
    """The agent accepted the request but could not carry it out."""

    exit_code = 1


class ProtocolError(OSError):
    """The peer did not answer in HTTP/1.1 as the agent does."""


class _Response:
    """Status, headers and body of one response on its own connection."""

    def __init__(self, sock: socket.socket) -> None:
        self._file = sock.makefile("rb")
        sock.close()  # the file keeps the connection open until it is closed
        status_line = self._file.readline(MAX_HEADER_BYTES)
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
            raise ProtocolError(f"not an HTTP response: {status_line[:80]!r}")
        self.status = int(parts[1])
        self.headers: dict[str, str] = {}
        while True:
            line = self._file.readline(MAX_HEADER_BYTES)
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            self.headers[name.strip().lower()] = value.strip()
        self._chunked = self.headers.get("transfer-encoding", "").lower() == "chunked"
        length = self.headers.get("content-length")
        self._left = int(length) if length is not None and not self._chunked else None

    def _chunks(self) -> Iterator[bytes]:
        if not self._chunked:
            data = self._file.read() if self._left is None else self._file.read(self._left)
            if self._left is not None and len(data) < self._left:
                raise ProtocolError("the response ended early")
            yield data
            return
        while True:
            size_line = self._file.readline(MAX_HEADER_BYTES)
            try:
                size = int(size_line.split(b";")[0], 16)
            except ValueError:
                raise ProtocolError(f"bad chunk size {size_line[:40]!r}") from None
            if size == 0:
                return
            data = self._file.read(size)
            if len(data) < size:
                raise ProtocolError("the response ended inside a chunk")
            self._file.readline(MAX_HEADER_BYTES)  # the CRLF after the chunk
            yield data

    def read(self) -> bytes:
        try:
            return b"".join(self._chunks())
        finally:
            self._file.close()

    def lines(self) -> Iterator[bytes]:
        """The body line by line, as it arrives."""
        pending = b""
        try:
            for chunk in self._chunks():
                pending += chunk
                *complete, pending = pending.split(b"\n")
                yield from complete
            if pending:
                yield pending
        finally:
            self._file.close()


def path_of(*parts: str) -> str:
    """URL path from parts, each quoted (names may hold characters URLs reserve)."""
    return "/" + "/".join(quote(p, safe="") for p in parts)


class ApiClient:
    def __init__(self, path: str, timeout: float | None = 600.0) -> None:
        self.path = path
        self.timeout = timeout

    @classmethod
    def connect(cls, api_socket: str | None = None) -> ApiClient:
        return cls(socket_path(api_socket))

    def _request(
        self, method: str, path: str, params: dict | None, body: Any, timeout: float | None
    ) -> _Response:
        query = {k: v for k, v in (params or {}).items() if v is not None}
        url = path + ("?" + urlencode(query, doseq=True) if query else "")
        data = b"" if body is None else json.dumps(body).encode()
        head = [
            f"{method} {url} HTTP/1.1",
            "Host: membrane",
            "Accept: application/json",
            "Connection: close",
            f"Content-Length: {len(data)}",
        ]
        if body is not None:
            head.append("Content-Type: application/json")
        request = ("\r\n".join(head) + "\r\n\r\n").encode() + data
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(self.path)
            sock.sendall(request)
            resp = _Response(sock)
        except (FileNotFoundError, ConnectionRefusedError) as err:
            sock.close()
            raise AgentUnavailable(
                "api-socket",
                f"no agent answers at {self.path} ({err.strerror}); start one with "
                f"`membrane agent run` or point {SOCKET_ENV} at its socket",
            ) from None
        except PermissionError:
            sock.close()
            raise AgentUnavailable(
                "api-socket", f"permission denied on {self.path} (the socket is root-only)"
            ) from None
        except (TimeoutError, OSError) as err:
            sock.close()
            raise AgentUnavailable("api-socket", f"{self.path}: {err}") from None
        if resp.status >= 400:
            raise _error_of(resp)
        return resp

    def call(
        self,
        method: str,
        path: str,
        params: dict | None = None,
        body: Any = None,
    ) -> Any:
        resp = self._request(method, path, params, body, self.timeout)
        raw = resp.read()
        return json.loads(raw) if raw else None

    def get(self, path: str, params: dict | None = None) -> Any:
        return self.call("GET", path, params)

    def post(self, path: str, body: Any = None, params: dict | None = None) -> Any:
        return self.call("POST", path, params, body)

    def put(self, path: str, body: Any = None) -> Any:
        return self.call("PUT", path, None, body)

    def delete(self, path: str, params: dict | None = None) -> Any:
        return self.call("DELETE", path, params)

    def stream(self, path: str, params: dict | None = None) -> Iterator[dict]:
        """Newline-delimited JSON objects until the agent closes the stream."""
        resp = self._request("GET", path, params, None, None)
        for line in resp.lines():
            line = line.strip()
            if line:
                yield json.loads(line)


def _error_of(resp: _Response) -> UserError:
    raw = resp.read()
    try:
        err = json.loads(raw)["error"]
        field, problem = str(err.get("field", "")), str(err["problem"])
    except (ValueError, KeyError, TypeError):
        field, problem = "agent", f"HTTP {resp.status}: {raw[:200].decode(errors='replace')}"
    if resp.status >= 500:
        return AgentFailed(field, problem)
    return UserError(field, problem)
