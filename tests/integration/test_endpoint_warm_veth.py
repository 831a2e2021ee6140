"""The veth pair the agent makes ahead of the next endpoint (both ends in its node
namespace, the programs attached to the host end) is the agent's own, never a leak: an
agent killed (-9) with one made and not used has it deleted at its next start, so the next
add of that id works; a stopped agent (SIGTERM) leaves none; neither touches recorded
endpoints' veths. The real agent, on its own node namespace."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from pyroute2 import IPRoute

from membrane import netns
from membrane.testing.agent import AgentProcess, agent_unusable_reason, running_agent
from membrane.testing.cluster import unique_tag
from membrane.testing.waiting import wait_for

pytestmark = pytest.mark.root

_MBR = re.compile(r"mbrw?[0-9]+")


@pytest.fixture
def agent() -> Iterator[AgentProcess]:
    reason = agent_unusable_reason()
    if reason:
        pytest.skip(reason)
    with running_agent(unique_tag("w")) as started:
        yield started


def mbr_links(agent: AgentProcess) -> dict[str, int]:
    """The agent's devices in its node namespace (host veths and warm peers): name ->
    ifindex."""
    with netns.inside(agent.node_netns), IPRoute() as ipr:
        found = {link.get_attr("IFLA_IFNAME"): link["index"] for link in ipr.get_links()}
    return {name: index for name, index in found.items() if _MBR.fullmatch(name)}


def add(agent: AgentProcess, name: str) -> dict[str, Any]:
    return agent.cli_json("endpoint", "add", f"w/{name}", "--label", f"pod={name}")


def made_ahead(agent: AgentProcess, ep_id: int) -> dict[str, int]:
    """Wait for the veth pair of endpoint `ep_id` made ahead; its devices."""
    wait_for(f"the veth of endpoint {ep_id} made ahead", lambda: f"mbrw{ep_id}" in mbr_links(agent))
    links = mbr_links(agent)
    return {name: links[name] for name in (f"mbr{ep_id}", f"mbrw{ep_id}")}


def test_a_killed_agents_veth_made_ahead_is_deleted_at_its_start(agent: AgentProcess) -> None:
    a = add(agent, "a")
    nxt = a["id"] + 1
    left = made_ahead(agent, nxt)
    agent.kill9()
    assert mbr_links(agent).items() >= left.items()  # nobody deleted it

    agent.start()
    again = made_ahead(agent, nxt)  # the restarted agent's own, for the same id
    assert set(again.values()).isdisjoint(left.values()), "the dead agent's veth is still there"
    b = add(agent, "b")  # the id whose veth name the dead agent held
    assert b["id"] == nxt
    assert mbr_links(agent)[b["host_ifname"]] == again[f"mbr{nxt}"]
    netns.wait_ping(b["netns"], a["ipv4"], timeout=5)


def test_a_stopped_agent_leaves_only_its_endpoints_veths(agent: AgentProcess) -> None:
    a = add(agent, "a")
    made_ahead(agent, a["id"] + 1)
    assert agent.stop() == 0
    assert set(mbr_links(agent)) == {a["host_ifname"]}
