"""The client side of Hubble's Observer API (gRPC), as `membrane observe` uses it.

The agent serves `observer.Observer` on a unix socket beside its REST socket (and, when
asked, on TCP like Cilium's :4244); Hubble's own CLI speaks to the same socket. This client
speaks gRPC through hubble.wire (the standard library only: importing grpcio would cost the
CLI ~150 ms). Errors come back as one line: the agent's INVALID_ARGUMENT as a `UserError`
naming the field it named, an absent agent as `AgentUnavailable` (exit code 1).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from google.protobuf.message import DecodeError, Message

from membrane.api.client import AgentUnavailable, socket_path
from membrane.errors import UserError
from membrane.hubble import HUBBLE_SOCKET_NAME
from membrane.hubble.observer import observer_pb2
from membrane.hubble.wire import (
    CANCELLED,
    INTERNAL,
    INVALID_ARGUMENT,
    UNAVAILABLE,
    Channel,
    RpcError,
)

UNARY_TIMEOUT = 10.0  # seconds; a local agent answers a status in milliseconds
SERVICE = "/observer.Observer/"


def default_server(api_socket: str | None = None) -> str:
    """The Observer API's address of the agent whose REST socket is `api_socket` (or the
    default one): `unix://<that socket's directory>/hubble.sock`."""
    directory = os.path.dirname(os.path.abspath(socket_path(api_socket)))
    return "unix://" + os.path.join(directory, HUBBLE_SOCKET_NAME)


def _error(server: str, err: RpcError) -> UserError:
    """One line for a failed call: the server's INVALID_ARGUMENT keeps its field
    ("FIELD: PROBLEM", as our server writes it); anything else names the server."""
    if err.code == INVALID_ARGUMENT:
        field, sep, problem = err.details.partition(": ")
        return UserError(field, problem) if sep else UserError("", err.details)
    if err.code == UNAVAILABLE:
        return AgentUnavailable(
            "server", f"no agent at {server}: is `membrane agent run` running? ({err.details})"
        )
    return AgentUnavailable("server", f"{server}: {err.code_name}: {err.details}")


def _parse(kind: type[Message], data: bytes) -> Any:
    """A response message; one that does not parse is the server's fault (INTERNAL)."""
    try:
        return kind.FromString(data)
    except DecodeError as err:
        raise RpcError(INTERNAL, f"{kind.DESCRIPTOR.full_name} does not parse: {err}") from None


class ObserverClient:
    """Calls to one Observer server over one HTTP/2 connection (hubble.wire: no grpcio,
    so that the CLI starts quickly); `close()` (or a `with` block) ends it."""

    def __init__(self, server: str, channel: Channel) -> None:
        self.server = server
        self._channel = channel

    @classmethod
    def connect(cls, server: str) -> ObserverClient:
        """`unix:///path/to/hubble.sock` or `host:port`. Nothing is sent yet: an agent
        that is not there is reported by the first call."""
        if not server:
            raise UserError("server", "is empty (give unix:///PATH or HOST:PORT)")
        try:
            return cls(server, Channel(server))
        except ValueError as err:
            raise UserError("server", f"{server}: {err}") from None

    def get_flows(
        self, request: observer_pb2.GetFlowsRequest
    ) -> Iterator[observer_pb2.GetFlowsResponse]:
        """The responses as they come; the stream ends when the server ends it (no
        follow), or quietly at Ctrl-C."""
        try:
            for message in self._channel.stream(SERVICE + "GetFlows", request.SerializeToString()):
                yield _parse(observer_pb2.GetFlowsResponse, message)
        except RpcError as err:
            if err.code != CANCELLED:
                raise _error(self.server, err) from None
        except KeyboardInterrupt:  # the way a follow ends
            pass

    def _unary(self, method: str, request: bytes) -> bytes:
        try:
            return self._channel.unary(SERVICE + method, request, UNARY_TIMEOUT)
        except RpcError as err:
            raise _error(self.server, err) from None

    def server_status(self) -> observer_pb2.ServerStatusResponse:
        answer = self._unary("ServerStatus", observer_pb2.ServerStatusRequest().SerializeToString())
        return self._parse(observer_pb2.ServerStatusResponse, answer)

    def get_nodes(self) -> observer_pb2.GetNodesResponse:
        answer = self._unary("GetNodes", observer_pb2.GetNodesRequest().SerializeToString())
        return self._parse(observer_pb2.GetNodesResponse, answer)

    def _parse(self, kind: type[Message], data: bytes) -> Any:
        try:
            return _parse(kind, data)
        except RpcError as err:
            raise _error(self.server, err) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ObserverClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
