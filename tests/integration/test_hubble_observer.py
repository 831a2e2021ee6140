"""Hubble's Observer API of the real agent, over its unix socket and its TCP listener, with
stubs generated from our proto files (Hubble's package, message and field names and
numbers, so what these stubs read Hubble's clients read): GetFlows of real pod traffic with
number/first/follow/since/until and whitelist/blacklist as Hubble answers them,
ServerStatus, GetNodes, the gRPC health check, INVALID_ARGUMENT naming the bad field; the
flow log, and flows surviving an agent restart through it."""

from __future__ import annotations

import json
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from membrane.hubble.client import ObserverClient, default_server
from membrane.hubble.flow import flow_pb2
from membrane.hubble.observer import observer_pb2, observer_pb2_grpc
from membrane.hubble.relay import relay_pb2
from membrane.observe.format import parse_response
from membrane.testing.agent import agent_unusable_reason
from membrane.testing.cli import user_error
from membrane.testing.cluster import Cluster, running_cluster
from membrane.testing.traffic import free_loopback_port
from membrane.testing.waiting import wait_for

pytestmark = pytest.mark.root

Request = observer_pb2.GetFlowsRequest
Response = observer_pb2.GetFlowsResponse


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    reason = agent_unusable_reason()
    if reason:
        pytest.skip(reason)
    workdir = tmp_path_factory.mktemp("hubble")
    port = free_loopback_port()
    args = [
        "--hubble-listen-address", f"127.0.0.1:{port}",
        "--flow-log", str(workdir / "flows.log"),
    ]  # fmt: skip
    with running_cluster(workdir, ("x", "y"), ("a", "b"), extra_args=args) as c:
        c.tcp_address = f"127.0.0.1:{port}"  # type: ignore[attr-defined]
        c.flow_log = workdir / "flows.log"  # type: ignore[attr-defined]
        yield c


def unix_address(c: Cluster) -> str:
    return default_server(c.agent.socket)


@pytest.fixture(params=["unix", "tcp"])
def stub(
    cluster: Cluster, request: pytest.FixtureRequest
) -> Iterator[observer_pb2_grpc.ObserverStub]:
    address = unix_address(cluster) if request.param == "unix" else cluster.tcp_address  # type: ignore[attr-defined]
    with grpc.insecure_channel(address) as channel:
        yield observer_pb2_grpc.ObserverStub(channel)


def flows(stub: observer_pb2_grpc.ObserverStub, request: Request) -> list[flow_pb2.Flow]:
    return [r.flow for r in stub.GetFlows(request, timeout=20) if r.HasField("flow")]


def pods(flow: flow_pb2.Flow) -> tuple[str, str]:
    src, dst = flow.source, flow.destination
    return f"{src.namespace}/{src.pod_name}", f"{dst.namespace}/{dst.pod_name}"


def ns_of(flow: flow_pb2.Flow) -> int:
    return flow.time.ToNanoseconds()


def traffic(c: Cluster, src: str, dst: str) -> None:
    """A TCP connection (and its policy verdict flow) from pod `src` to pod `dst`."""
    c.check(c.reach(sources=[src], destinations=[dst], ports=((80, "TCP"),)))


@pytest.fixture(scope="module")
def some_flows(cluster: Cluster) -> None:
    """Flows both ways between x/a and y/b, on record."""
    with grpc.insecure_channel(unix_address(cluster)) as channel:
        stub = observer_pb2_grpc.ObserverStub(channel)
        for src, dst in (("x/a", "y/b"), ("y/b", "x/a"), ("x/a", "y/b")):
            traffic(cluster, src, dst)
        wait_for(
            "flows both ways",
            lambda: {("x/a", "y/b"), ("y/b", "x/a")} <= {pods(f) for f in flows(stub, Request())},
        )


def test_get_flows_returns_the_pods_traffic(
    stub: observer_pb2_grpc.ObserverStub, some_flows: None
) -> None:
    everything = flows(stub, Request())  # number 0, no follow: the whole buffer
    assert {("x/a", "y/b"), ("y/b", "x/a")} <= {pods(f) for f in everything}
    newest = flows(stub, Request(number=2))
    assert [f.uuid for f in newest] == [f.uuid for f in everything[-2:]]
    first = flows(stub, Request(number=2, first=True))
    assert [f.uuid for f in first] == [f.uuid for f in everything[:2]]


def test_whitelist_and_blacklist(stub: observer_pb2_grpc.ObserverStub, some_flows: None) -> None:
    from_a = flow_pb2.FlowFilter(source_pod=["x/a"])
    only = flows(stub, Request(whitelist=[from_a]))
    assert only and all(pods(f)[0] == "x/a" for f in only)
    without = flows(stub, Request(blacklist=[from_a]))
    assert without and all(pods(f)[0] != "x/a" for f in without)
    # filters select before `number` counts
    last = flows(stub, Request(number=1, whitelist=[flow_pb2.FlowFilter(source_pod=["y/b"])]))
    assert len(last) == 1 and pods(last[0])[0] == "y/b"


def test_since_and_until_bound_by_the_flows_time(
    stub: observer_pb2_grpc.ObserverStub, some_flows: None
) -> None:
    everything = flows(stub, Request())
    assert len(everything) >= 3
    middle = everything[len(everything) // 2].time
    since = flows(stub, Request(since=middle))
    until = flows(stub, Request(until=middle))
    assert since and all(ns_of(f) >= middle.ToNanoseconds() for f in since)
    assert until and all(ns_of(f) <= middle.ToNanoseconds() for f in until)
    # Together they cover every stored flow (flows that arrive meanwhile, such as a closing
    # connection's late trace events, may add to `since`).
    assert {f.uuid for f in since} | {f.uuid for f in until} >= {f.uuid for f in everything}


def test_follow_streams_new_flows(
    cluster: Cluster, stub: observer_pb2_grpc.ObserverStub, some_flows: None
) -> None:
    request = Request(
        follow=True, whitelist=[flow_pb2.FlowFilter(source_pod=["y/"], destination_pod=["x/a"])]
    )
    stored = {f.uuid for f in flows(stub, Request())}
    call = stub.GetFlows(request)
    got: list[flow_pb2.Flow] = []
    done = threading.Event()

    def read() -> None:
        try:
            for response in call:
                if response.HasField("flow"):
                    got.append(response.flow)
                    done.set()
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.CANCELLED, err

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        call.initial_metadata()  # the agent sends it once the feed is live
        traffic(cluster, "y/b", "x/a")
        assert done.wait(20), "no followed flow arrived"
        # number 0 with follow: only new flows, none of those stored before
        assert got and not {f.uuid for f in got} & stored
        assert all(pods(f) == ("y/b", "x/a") for f in got)
    finally:
        call.cancel()
        reader.join(5)


def test_server_status_and_nodes(
    cluster: Cluster, stub: observer_pb2_grpc.ObserverStub, some_flows: None
) -> None:
    status = stub.ServerStatus(observer_pb2.ServerStatusRequest(), timeout=10)
    stored = list(stub.GetFlows(Request(), timeout=20))
    assert status.max_flows == 4095  # Hubble's default buffer
    assert 0 < status.num_flows <= status.max_flows
    assert status.num_flows >= len([r for r in stored if r.HasField("flow")]) - 50
    assert status.seen_flows >= 3 and status.uptime_ns > 0
    assert status.num_connected_nodes.value == 1 and status.version.startswith("membrane")
    [node] = stub.GetNodes(observer_pb2.GetNodesRequest(), timeout=10).nodes
    assert node.name == cluster.agent.node_netns
    assert node.state == relay_pb2.NODE_CONNECTED and node.max_flows == 4095


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (
            Request(whitelist=[flow_pb2.FlowFilter(source_ip=["not-an-ip"])]),
            "whitelist[0].source_ip",
        ),
        (
            Request(
                blacklist=[flow_pb2.FlowFilter(), flow_pb2.FlowFilter(destination_port=["http"])]
            ),
            "blacklist[1].destination_port",
        ),
        (Request(first=True, follow=True), "first"),
    ],
)
def test_invalid_requests_name_the_field(
    stub: observer_pb2_grpc.ObserverStub, request_: Request, field: str
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        list(stub.GetFlows(request_, timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(f"{field}: "), err.value.details()


def test_health_check_and_socket_mode(cluster: Cluster) -> None:
    path = default_server(cluster.agent.socket).removeprefix("unix://")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
    with grpc.insecure_channel(unix_address(cluster)) as channel:
        check = channel.unary_unary("/grpc.health.v1.Health/Check")
        assert check(b"", timeout=10) == b"\x08\x01"  # HealthCheckResponse{status: SERVING}


def test_our_client_reads_the_same_and_names_errors(cluster: Cluster, some_flows: None) -> None:
    with ObserverClient.connect(unix_address(cluster)) as client:
        got = [r for r in client.get_flows(Request(number=3)) if r.HasField("flow")]
        assert len(got) == 3
        assert client.server_status().max_flows == 4095
        assert client.get_nodes().nodes[0].name == cluster.agent.node_netns
        from membrane.errors import UserError

        with pytest.raises(UserError) as err:
            list(client.get_flows(Request(whitelist=[flow_pb2.FlowFilter(source_ip=["x"])])))
        assert err.value.field == "whitelist[0].source_ip"


def test_flow_log_lines_are_get_flows_responses(cluster: Cluster, some_flows: None) -> None:
    log_path: Path = cluster.flow_log  # type: ignore[attr-defined]

    def logged() -> list[Response]:
        lines = log_path.read_text().splitlines() if log_path.exists() else []
        return [parse_response(json.loads(line)) for line in lines if line.strip()]

    entries = wait_for("flows in the flow log", lambda: [r for r in logged() if r.HasField("flow")])
    assert {("x/a", "y/b"), ("y/b", "x/a")} <= {pods(r.flow) for r in entries}


def test_flows_survive_an_agent_restart(cluster: Cluster, some_flows: None) -> None:
    with grpc.insecure_channel(unix_address(cluster)) as channel:
        before = flows(observer_pb2_grpc.ObserverStub(channel), Request())
    # everything the store holds reached the log (written off the loop, so wait)
    log_path: Path = cluster.flow_log  # type: ignore[attr-defined]
    wait_for("the flow log to catch up", lambda: before[-1].uuid in log_path.read_text())
    # a follower connected while the agent stops: its stream ends, the stop does not wait
    ended: list[str] = []
    channel = grpc.insecure_channel(unix_address(cluster))
    call = observer_pb2_grpc.ObserverStub(channel).GetFlows(Request(follow=True))
    call.initial_metadata()

    def follow() -> None:
        try:
            for _ in call:
                pass
            ended.append("OK")
        except grpc.RpcError as err:
            ended.append(err.code().name)

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    cluster.agent.stop(timeout=10)
    follower.join(10)
    channel.close()
    assert ended == ["OK"], ended  # the agent ends it, as a finished answer
    cluster.agent.start()
    with grpc.insecure_channel(unix_address(cluster)) as channel:
        after = flows(observer_pb2_grpc.ObserverStub(channel), Request())
    uuids = [f.uuid for f in after]
    assert [f.uuid for f in before] == uuids[: len(before)], "the same flows, in order"
    # and the restarted agent goes on adding new ones behind them
    traffic(cluster, "x/a", "y/b")
    with grpc.insecure_channel(unix_address(cluster)) as channel:
        stub = observer_pb2_grpc.ObserverStub(channel)
        wait_for("a new flow", lambda: len(flows(stub, Request())) > len(before))


def test_bad_agent_options_exit_2_naming_the_flag(cluster: Cluster) -> None:
    for args, flag in (
        (["--hubble-buffer-size", "4096"], "hubble-buffer-size"),
        (["--flow-log", "/tmp/x.log", "--flow-log-allowlist", "{nope"], "flow-log-allowlist"),
        (
            ["--flow-log", "/tmp/x.log", "--flow-log-denylist", '[{"source_ip":["1.2.3"]}]'],
            "flow-log-denylist",
        ),
        (["--hubble-listen-address", "4244"], "hubble-listen-address"),
    ):
        result = cluster.agent.cli(
            "agent", "run", "--state-dir", "/nonexistent/never", *args, check=False
        )
        user_error(result, flag)
