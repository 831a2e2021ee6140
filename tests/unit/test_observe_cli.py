"""`membrane observe` asks the agent for what the options say, prints what comes back, and
refuses bad options before it connects."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest
import typer
from observe_support import FakeResolver, event, world_drop
from typer.testing import CliRunner

from membrane.api import client as api_client
from membrane.cli.observe import observe
from membrane.errors import UserError
from membrane.observe.record import flow_record, flow_response, response_dict
from membrane.observe.store import lost_events

# What the agent serves: GetFlowsResponses as protobuf JSON
FLOWS = [
    response_dict(flow_response(flow_record(e, FakeResolver(), "n1")))
    for e in (event(), world_drop())
]


class FakeClient:
    calls: ClassVar[list[tuple[str, str, dict, str | None]]] = []
    interrupt = False

    def __init__(self, api_socket: str | None) -> None:
        self.api_socket = api_socket

    @classmethod
    def connect(cls, api_socket: str | None = None) -> FakeClient:
        return cls(api_socket)

    def get(self, path: str, params: dict | None = None) -> Any:
        self.calls.append(("get", path, dict(params or {}), self.api_socket))
        return {"flows": FLOWS}

    def stream(self, path: str, params: dict | None = None) -> Iterator[dict]:
        self.calls.append(("stream", path, dict(params or {}), self.api_socket))
        yield FLOWS[0]
        yield lost_events(4)
        yield FLOWS[1]
        if self.interrupt:
            raise KeyboardInterrupt


@pytest.fixture
def agent(monkeypatch: pytest.MonkeyPatch) -> type[FakeClient]:
    FakeClient.calls = []
    FakeClient.interrupt = False
    monkeypatch.setattr(api_client, "ApiClient", FakeClient)
    monkeypatch.delenv("MEMBRANE_API_SOCKET", raising=False)
    return FakeClient


def run(*args: str) -> Any:
    app = typer.Typer()
    app.command()(observe)
    return CliRunner().invoke(app, list(args))


def test_last_flows_as_json(agent: type[FakeClient]) -> None:
    result = run("--last", "5", "-o", "json", "--pod", "shop/db", "--verdict", "dropped")
    assert result.exit_code == 0, result.output
    assert [json.loads(line) for line in result.stdout.splitlines()] == FLOWS
    assert agent.calls == [
        (
            "get",
            "/v1/flows",
            {"last": "5", "follow": "0", "pod": "shop/db", "verdict": "DROPPED"},
            None,
        )
    ]


def test_follow_prints_until_ctrl_c(agent: type[FakeClient]) -> None:
    agent.interrupt = True
    result = run("-f", "--api-socket", "/tmp/agent.sock", "--protocol", "tcp", "--port", "5432")
    assert result.exit_code == 0, result.output
    assert len(result.stdout.splitlines()) == 2
    assert "EVENTS LOST: 4 events" in result.stderr
    assert agent.calls == [
        (
            "stream",
            "/v1/flows",
            {"last": "20", "follow": "1", "protocol": "tcp", "port": "5432"},
            "/tmp/agent.sock",
        )
    ]


def test_api_socket_from_the_environment(
    agent: type[FakeClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEMBRANE_API_SOCKET", "/run/other.sock")
    assert run("-o", "table").exit_code == 0
    assert agent.calls[0][3] == "/run/other.sock"


def test_compact_is_the_default_and_names_policies_when_asked(agent: type[FakeClient]) -> None:
    result = run("--print-policy-names")
    assert result.exit_code == 0, result.output
    allowed, dropped = result.stdout.splitlines()
    assert "policy-verdict:L3-L4 INGRESS ALLOWED by CiliumNetworkPolicy shop/db-from-web" in allowed
    assert "Policy denied DROPPED (TCP Flags: SYN)" in dropped


def test_dict_output(agent: type[FakeClient]) -> None:
    result = run("-o", "dict")
    assert result.exit_code == 0, result.output
    assert result.stdout.count("VERDICT:") == 2


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["-o", "yaml"], "--output"),
        (["--last", "-1"], "--last"),
        (["--verdict", "ALLOWED"], "--verdict"),
        (["--port", "70000"], "--port"),
        (["--pod", "shop/"], "--pod"),
        (["--protocol", "gre"], "--protocol"),
    ],
)
def test_bad_options_fail_before_connecting(
    agent: type[FakeClient], args: list[str], field: str
) -> None:
    result = run(*args)
    assert isinstance(result.exception, UserError)
    assert result.exception.field == field
    assert agent.calls == []
