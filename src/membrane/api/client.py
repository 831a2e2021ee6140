"""The CLI's side of the agent API: HTTP/1.1 with JSON bodies over the agent's unix socket.

Standard library only, so that every `membrane` command starts quickly. Errors the agent
reports for bad input come back as `UserError` (one line, exit code 2); an agent that cannot
be reached is an `AgentUnavailable` (exit code 1).
"""

from __future__ import annotations

import http.client
import json
import os
import socket
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, urlencode

from membrane.errors import UserError

SOCKET_ENV = "MEMBRANE_API_SOCKET"
DEFAULT_SOCKET = "/run/membrane/membrane.sock"


def socket_path(api_socket: str | None) -> str:
    return api_socket or os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET


class AgentUnavailable(UserError):
    exit_code = 1


class AgentFailed(UserError):
    """The agent accepted the request but could not carry it out."""

    exit_code = 1


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None) -> None:
        super().__init__("membrane", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if self.timeout is not None:
            sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


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
    ) -> http.client.HTTPResponse:
        query = {k: v for k, v in (params or {}).items() if v is not None}
        url = path + ("?" + urlencode(query, doseq=True) if query else "")
        conn = _UnixConnection(self.path, timeout)
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, url, body=data, headers=headers)
            resp = conn.getresponse()
        except (FileNotFoundError, ConnectionRefusedError) as err:
            raise AgentUnavailable(
                "api-socket",
                f"no agent answers at {self.path} ({err.strerror}); start one with "
                f"`membrane agent run` or point {SOCKET_ENV} at its socket",
            ) from None
        except PermissionError:
            raise AgentUnavailable(
                "api-socket", f"permission denied on {self.path} (the socket is root-only)"
            ) from None
        except (TimeoutError, OSError) as err:
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
        for line in resp:
            line = line.strip()
            if line:
                yield json.loads(line)


def _error_of(resp: http.client.HTTPResponse) -> UserError:
    raw = resp.read()
    try:
        err = json.loads(raw)["error"]
        field, problem = str(err.get("field", "")), str(err["problem"])
    except (ValueError, KeyError, TypeError):
        field, problem = "agent", f"HTTP {resp.status}: {raw[:200].decode(errors='replace')}"
    if resp.status >= 500:
        return AgentFailed(field, problem)
    return UserError(field, problem)
