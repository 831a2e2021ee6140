"""The pytest fixtures around the real agent (membrane.testing.cluster): a test module shares
one `Cluster` (`cluster_fixture()`, or the session's standard one with
`shared_cluster_fixture()`), and each test gets it through `net_fixture()`, which
afterwards deletes every policy, restores namespace labels and removes pods the test added.

    from agent_support import cluster_fixture, net_fixture
    cluster = cluster_fixture()
    net = net_fixture()

`in_process_agent` runs the agent inside the test process instead, for tests that reach
into its parts (inject a failure into a map write).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from membrane.testing.agent import NODE_IP, POD_CIDR, AgentProcess, agent_unusable_reason
from membrane.testing.cluster import Cluster, running_cluster

if TYPE_CHECKING:
    from membrane.agent.agent import Agent


def cluster_fixture(**options: Any) -> Any:
    """A module-scoped `cluster` fixture: one agent and its pods for the whole module
    (options: namespaces, pod_names, allow_localhost)."""

    @pytest.fixture(scope="module")
    def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
        reason = agent_unusable_reason()
        if reason:
            pytest.skip(reason)
        with running_cluster(tmp_path_factory.mktemp("agent"), **options) as c:
            yield c

    return cluster


_shared: dict[str, Cluster] = {}


def shared_cluster_fixture(allow_localhost: str | None = None) -> Any:
    """A `cluster` fixture that hands every module the same standard cluster (x, y, z with
    a, b, c), built by the first module that asks and torn down at the end of the session
    (tests/integration/conftest.py calls `destroy_shared_clusters`): one start-up instead
    of one per module (one per `allow_localhost`, the agent's --allow-localhost). Modules
    whose tests stop the agent use `cluster_fixture()`."""
    key = f"standard-{allow_localhost or 'default'}"
    suffix = {None: "s", "policy": "p", "always": "l"}[allow_localhost]

    @pytest.fixture(scope="module")
    def cluster(tmp_path_factory: pytest.TempPathFactory) -> Cluster:
        reason = agent_unusable_reason()
        if reason:
            pytest.skip(reason)
        if key not in _shared:
            workdir = tmp_path_factory.mktemp("agent")
            # "mbs": unique_tag("t") names the other clusters mbt<pid><a-z>
            tag = f"mbs{os.getpid() % 100000}{suffix}"
            c = Cluster(AgentProcess(workdir, tag, allow_localhost=allow_localhost))
            try:
                c.setup()
            except BaseException:
                c.destroy()
                raise
            _shared[key] = c
        return _shared[key]

    return cluster


def destroy_shared_clusters() -> None:
    while _shared:
        _, c = _shared.popitem()
        c.destroy()


def net_fixture(families: tuple[int, ...] = (4,)) -> Any:
    """The function-scoped `net` fixture: the module's cluster, reset after each test.
    With `families` (4, 6) every test of the module runs once per family: the cluster's
    `check` probes over that family's addresses."""

    @pytest.fixture(params=families, ids=[f"ipv{f}" for f in families])
    def net(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[Cluster]:
        cluster.family = request.param
        try:
            yield cluster
        finally:
            cluster.family = 4
            cluster.reset()

    return net


@contextlib.contextmanager
def in_process_agent(workdir: Path, tag: str, **options: Any) -> Iterator[Agent]:
    """The real agent in this process (its methods called as the server's worker calls
    them), named like an AgentProcess with `tag`, whose `destroy` removes all it made by
    name however the body ends; `options` go to make_config."""
    reason = agent_unusable_reason()
    if reason:
        pytest.skip(reason)
    from membrane.agent.agent import Agent
    from membrane.agent.config import make_config

    names = AgentProcess(workdir, tag)
    config = make_config(
        str(names.state_dir),
        names.socket,
        names.node_netns,
        POD_CIDR,
        NODE_IP,
        names.prefix,
        **options,
    )
    agent = None
    try:
        agent = Agent.start(config)
        yield agent
    finally:
        if agent is not None:
            agent.stop()
        names.destroy()
