"""The Observer API client: where the agent's socket is, and one clear line for every way a
call fails (no agent, a request the agent refuses naming its field)."""

from __future__ import annotations

from pathlib import Path

import pytest
from observe_support import observer_server

from membrane.api.client import AgentUnavailable
from membrane.errors import UserError
from membrane.hubble.client import ObserverClient, default_server
from membrane.hubble.flow import flow_pb2
from membrane.hubble.observer import observer_pb2
from membrane.observe.record import flow_response
from membrane.observe.store import FlowStore


def test_the_server_is_beside_the_api_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MEMBRANE_API_SOCKET", raising=False)
    assert default_server(None) == "unix:///run/membrane/hubble.sock"
    assert default_server("/tmp/a/api.sock") == "unix:///tmp/a/hubble.sock"
    monkeypatch.setenv("MEMBRANE_API_SOCKET", "/srv/m/membrane.sock")
    assert default_server(None) == "unix:///srv/m/hubble.sock"


def test_no_agent_is_one_line_naming_the_address(tmp_path: Path) -> None:
    address = f"unix://{tmp_path}/hubble.sock"
    with ObserverClient.connect(address) as client:
        with pytest.raises(AgentUnavailable) as err:
            client.server_status()
        assert f"no agent at {address}" in str(err.value)
        assert "membrane agent run" in str(err.value) and err.value.exit_code == 1
        with pytest.raises(AgentUnavailable):
            list(client.get_flows(observer_pb2.GetFlowsRequest()))
    with pytest.raises(UserError):
        ObserverClient.connect("")


def test_calls_and_refusals(tmp_path: Path) -> None:
    store = FlowStore(capacity=7, node_name="node-1")
    store.extend(flow_response(flow_pb2.Flow(uuid=str(i))) for i in range(3))
    with (
        observer_server(store, str(tmp_path / "hubble.sock")) as address,
        ObserverClient.connect(address) as client,
    ):
        got = [r.flow.uuid for r in client.get_flows(observer_pb2.GetFlowsRequest(number=2))]
        assert got == ["1", "2"]
        status = client.server_status()
        assert (status.num_flows, status.max_flows, status.seen_flows) == (3, 7, 3)
        assert [n.name for n in client.get_nodes().nodes] == ["node-1"]
        bad = flow_pb2.FlowFilter(destination_ip=["300.1.1.1"])
        with pytest.raises(UserError) as err:
            list(client.get_flows(observer_pb2.GetFlowsRequest(blacklist=[bad])))
        assert err.value.field == "blacklist[0].destination_ip"
        assert err.value.exit_code == 2


def test_a_bad_address_names_the_server_option() -> None:
    with pytest.raises(UserError) as err:
        ObserverClient.connect("localhost")
    assert err.value.field == "server" and "HOST:PORT" in str(err.value)


def test_a_stream_left_half_way_then_the_next_call(tmp_path: Path) -> None:
    """What Ctrl-C (or a consumer that stops reading) leaves: the stream is cancelled and
    the next call on the same client gets a fresh connection."""
    store = FlowStore(capacity=8191, node_name="node-1")
    store.extend(flow_response(flow_pb2.Flow(uuid=str(i))) for i in range(5_000))
    with (
        observer_server(store, str(tmp_path / "hubble.sock")) as address,
        ObserverClient.connect(address) as client,
    ):
        flows = client.get_flows(observer_pb2.GetFlowsRequest(number=5_000))
        assert [next(flows).flow.uuid for _ in range(3)] == ["0", "1", "2"]
        flows.close()
        got = [r.flow.uuid for r in client.get_flows(observer_pb2.GetFlowsRequest(number=5_000))]
        assert got == [str(i) for i in range(5_000)]
        assert client.server_status().num_flows == 5_000
