"""The client side of Hubble's Observer API (gRPC), as `membrane observe` uses it.

The agent serves `observer.Observer` on a unix socket beside its REST socket (and, when
asked, on TCP like Cilium's :4244); Hubble's own CLI speaks to the same socket. Errors come
back as one line: the agent's INVALID_ARGUMENT as a `UserError` naming the field it named,
an absent agent as `AgentUnavailable` (exit code 1).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import grpc

from membrane.api.client import AgentUnavailable, socket_path
from membrane.errors import UserError
from membrane.hubble import HUBBLE_SOCKET_NAME
from membrane.hubble.observer import observer_pb2, observer_pb2_grpc

UNARY_TIMEOUT = 10.0  # seconds; a local agent answers a status in milliseconds


def default_server(api_socket: str | None = None) -> str:
    """The Observer API's address of the agent whose REST socket is `api_socket` (or the
    default one): `unix://<that socket's directory>/hubble.sock`."""
    directory = os.path.dirname(os.path.abspath(socket_path(api_socket)))
    return "unix://" + os.path.join(directory, HUBBLE_SOCKET_NAME)


def _error(server: str, err: grpc.RpcError) -> UserError:
    """One line for a failed call: the server's INVALID_ARGUMENT keeps its field
    ("FIELD: PROBLEM", as our server writes it); anything else names the server."""
    code, details = err.code(), err.details() or ""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        field, sep, problem = details.partition(": ")
        return UserError(field, problem) if sep else UserError("", details)
    if code == grpc.StatusCode.UNAVAILABLE:
        return AgentUnavailable(
            "server", f"no agent at {server}: is `membrane agent run` running? ({details})"
        )
    return AgentUnavailable("server", f"{server}: {code.name}: {details}")


class ObserverClient:
    """Calls to one Observer server; `close()` (or a `with` block) ends the channel."""

    def __init__(self, server: str, channel: grpc.Channel) -> None:
        self.server = server
        self._channel = channel
        self._stub = observer_pb2_grpc.ObserverStub(channel)

    @classmethod
    def connect(cls, server: str) -> ObserverClient:
        """`unix:///path/to/hubble.sock` or `host:port`. Nothing is sent yet: an agent
        that is not there is reported by the first call."""
        if not server:
            raise UserError("server", "is empty (give unix:///PATH or HOST:PORT)")
        return cls(server, grpc.insecure_channel(server))

    def get_flows(
        self, request: observer_pb2.GetFlowsRequest
    ) -> Iterator[observer_pb2.GetFlowsResponse]:
        """The responses as they come; the stream ends when the server ends it (no
        follow), or quietly at Ctrl-C."""
        call = self._stub.GetFlows(request)
        try:
            yield from call
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.CANCELLED:
                raise _error(self.server, err) from None
        except KeyboardInterrupt:  # the way a follow ends
            pass
        finally:
            call.cancel()

    def server_status(self) -> observer_pb2.ServerStatusResponse:
        try:
            return self._stub.ServerStatus(
                observer_pb2.ServerStatusRequest(), timeout=UNARY_TIMEOUT
            )
        except grpc.RpcError as err:
            raise _error(self.server, err) from None

    def get_nodes(self) -> observer_pb2.GetNodesResponse:
        try:
            return self._stub.GetNodes(observer_pb2.GetNodesRequest(), timeout=UNARY_TIMEOUT)
        except grpc.RpcError as err:
            raise _error(self.server, err) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ObserverClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
