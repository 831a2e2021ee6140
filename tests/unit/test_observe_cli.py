"""`membrane observe` turns its flags into the GetFlowsRequest Hubble's CLI would send, sends
it over the Observer API, prints what comes back, and refuses bad flags before it connects.

The last tests run the command against the agent's real gRPC Observer server (on a unix
socket in a temporary directory) holding a fixed set of flows."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest
from google.protobuf import json_format
from test_observe_filters import FLOWS
from typer.testing import CliRunner

from membrane.cli.observe import app
from membrane.errors import UserError
from membrane.hubble import client as hubble_client
from membrane.hubble.flow import flow_pb2
from membrane.hubble.observer import observer_pb2
from membrane.observe.record import lost_response

NODE = "node-1"


def responses() -> list[observer_pb2.GetFlowsResponse]:
    """The fixed flows as the store keeps them, one second apart."""
    out = []
    for i, flow in enumerate(FLOWS.values()):
        response = observer_pb2.GetFlowsResponse(flow=flow, node_name=NODE)
        response.flow.time.seconds = response.time.seconds = 1_800_000_000 + i
        out.append(response)
    return out


class FakeClient:
    """Stands in for ObserverClient: records the requests, answers with `answer`."""

    requests: ClassVar[list[tuple[str, observer_pb2.GetFlowsRequest]]] = []
    answer: ClassVar[list[observer_pb2.GetFlowsResponse]] = []

    def __init__(self, server: str) -> None:
        self.server = server

    @classmethod
    def connect(cls, server: str) -> FakeClient:
        return cls(server)

    def get_flows(
        self, request: observer_pb2.GetFlowsRequest
    ) -> Iterator[observer_pb2.GetFlowsResponse]:
        self.requests.append((self.server, request))
        yield from self.answer

    def __enter__(self) -> FakeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


@pytest.fixture
def agent(monkeypatch: pytest.MonkeyPatch) -> type[FakeClient]:
    FakeClient.requests = []
    FakeClient.answer = responses()[:2]
    monkeypatch.setattr(hubble_client, "ObserverClient", FakeClient)
    for name in ("MEMBRANE_API_SOCKET", "MEMBRANE_HUBBLE_SERVER"):
        monkeypatch.delenv(name, raising=False)
    return FakeClient


def run(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def filters(request: observer_pb2.GetFlowsRequest, which: str) -> list[dict]:
    return [
        json_format.MessageToDict(f, preserving_proto_field_name=True)
        for f in getattr(request, which)
    ]


def test_last_flows_as_json(agent: type[FakeClient]) -> None:
    result = run("--last", "5", "-o", "json", "--pod", "shop/db", "--verdict", "DROPPED")
    assert result.exit_code == 0, result.output
    printed = [json.loads(line) for line in result.stdout.splitlines()]
    assert [p["flow"]["source"]["pod_name"] for p in printed] == ["web-1", "db-0"]
    [(server, request)] = agent.requests
    assert server == "unix:///run/membrane/hubble.sock"  # beside the default API socket
    assert (request.number, request.follow, request.first) == (5, False, False)
    assert filters(request, "whitelist") == [
        {"source_pod": ["shop/db"], "verdict": ["DROPPED"]},
        {"destination_pod": ["shop/db"], "verdict": ["DROPPED"]},
    ]
    assert filters(request, "blacklist") == []


def test_not_negates_only_the_next_flag_wherever_it_stands(agent: type[FakeClient]) -> None:
    for args in (
        ("--protocol", "tcp", "--not", "--verdict", "FORWARDED", "--to-port", "80"),
        ("--not", "--verdict", "FORWARDED", "--to-port", "80", "--protocol", "tcp"),
    ):
        assert run(*args).exit_code == 0
    first, second = (request for _, request in agent.requests)
    for request in (first, second):
        assert filters(request, "blacklist") == [{"verdict": ["FORWARDED"]}]
        assert filters(request, "whitelist") == [{"protocol": ["tcp"], "destination_port": ["80"]}]
    assert run("--verdict", "FORWARDED", "--not", "--to-port", "80").exit_code == 0
    _, third = agent.requests[-1]
    assert filters(third, "whitelist") == [{"verdict": ["FORWARDED"]}]
    assert filters(third, "blacklist") == [{"destination_port": ["80"]}]


def test_follow_reports_lost_events(agent: type[FakeClient]) -> None:
    flows = responses()
    agent.answer = [flows[0], lost_response(flow_pb2.HUBBLE_RING_BUFFER, 4, NODE), flows[1]]
    result = run("-f", "--api-socket", "/tmp/agent.sock", "-4", "-t", "policy-verdict")
    assert result.exit_code == 0, result.output
    assert len(result.stdout.splitlines()) == 2
    assert "EVENTS LOST: 4 events" in result.stderr
    [(server, request)] = agent.requests
    assert server == "unix:///tmp/hubble.sock"
    assert (request.number, request.follow) == (0, True)  # only new flows
    assert filters(request, "whitelist") == [{"ip_version": ["IPv4"], "event_type": [{"type": 5}]}]


def test_server_flag_and_environment(
    agent: type[FakeClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEMBRANE_API_SOCKET", "/run/other/membrane.sock")
    assert run("-o", "table").exit_code == 0
    monkeypatch.setenv("MEMBRANE_HUBBLE_SERVER", "localhost:4244")
    assert run("-o", "dict").exit_code == 0
    assert run("--server", "unix:///x/hubble.sock").exit_code == 0
    assert [server for server, _ in agent.requests] == [
        "unix:///run/other/hubble.sock",
        "localhost:4244",
        "unix:///x/hubble.sock",
    ]


def test_print_raw_filters_does_not_connect(agent: type[FakeClient]) -> None:
    result = run("--from-pod", "kube-system/", "--not", "-t", "drop", "--print-raw-filters")
    assert result.exit_code == 0, result.output
    assert result.stdout == (
        "allowlist:\n"
        '    - \'{"source_pod":["kube-system/"]}\'\n'
        "denylist:\n"
        '    - \'{"event_type":[{"type":1}]}\'\n'
    )
    assert agent.requests == []


def test_help_states_the_rules() -> None:
    result = run("--help")
    assert result.exit_code == 0
    for text in ("--not", "--from-pod", "--to-label", "--tcp-flags", "either side", "OR"):
        assert text in result.stdout


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["-o", "yaml"], "--output"),
        (["--last", "-1"], "--last"),
        (["--first", "3", "-f"], "--first"),
        (["--verdict", "ALLOWED"], "--verdict"),
        (["--port", "70000"], "--port"),
        (["--from-ip", "1.2.3"], "--from-ip"),
        (["--protocol", "gre"], "--protocol"),
        (["--since", "last tuesday"], "--since"),
        (["--not"], "--not"),
        (["-n", "a", "--from-pod", "b"], "--from-pod"),
    ],
)
def test_bad_options_fail_before_connecting(
    agent: type[FakeClient], args: list[str], field: str
) -> None:
    result = run(*args)
    assert isinstance(result.exception, UserError)
    assert result.exception.field == field
    assert agent.requests == []


# ---- against the agent's Observer server -------------------------------------------------
@pytest.fixture
def observer_server(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The agent's gRPC Observer server over a store of the fixed flows, on its own event
    loop thread; yields its address."""
    from membrane.hubble.server import HubbleServer, ObserverService
    from membrane.observe.store import FlowStore

    monkeypatch.delenv("MEMBRANE_HUBBLE_SERVER", raising=False)
    store = FlowStore(capacity=15, node_name=NODE)
    store.extend(responses())
    socket_path = str(tmp_path / "hubble.sock")
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> HubbleServer:  # grpc.aio binds a server to the loop it is made on
        server = HubbleServer(ObserverService(store, NODE), socket_path)
        await server.start()
        return server

    try:
        server = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=10)
        yield "unix://" + socket_path
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(timeout=10)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


@pytest.mark.parametrize(
    ("args", "pods"),
    [
        ((), ["web-1", "db-0", "coredns-5d", "", "client"]),
        (("--from-pod", "kube-system/"), ["coredns-5d"]),
        (("-n", "shop", "--not", "--verdict", "FORWARDED"), [""]),
        (("--to-label", "app=web", "--tcp-flags", "SYN"), ["db-0", ""]),
        (("--ip", "2001:db8::/32"), ["client"]),
        (("--last", "2"), ["", "client"]),
        (("--first", "1"), ["web-1"]),
    ],
)
def test_the_agent_answers_by_hubble_rules(
    observer_server: str, args: tuple[str, ...], pods: list[str]
) -> None:
    result = run("--server", observer_server, "-o", "json", *args)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["flow"].get("source", {}).get("pod_name", "") for line in lines] == pods
