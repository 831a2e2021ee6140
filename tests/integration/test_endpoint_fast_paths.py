"""What a container's start and stop wait for in the agent.

Add: the programs the agent loaded ahead for the endpoint are attached (the verifier works
while the agent idles, not during the add), and only when they were loaded for the id and
address the add hands out; when the prediction no longer holds (the address went
elsewhere), the add loads its own. Ahead of the add, the agent also makes the endpoint's
veth pair and attaches those programs to its host end: the add moves the pod's end into
the pod and records the attachments it finds there (same links, same programs); a
prediction that misses deletes that veth, and the add makes its own. The programs check
a pod's source address against the address they were loaded for, so pods made either way
reaching each other shows each runs programs made for it.

Delete as a runtime's DEL does it (finish_later): it returns once the endpoint is out of
force; its veth, programs and address go at the next add (or the server's follow-up), and
only then is its address free again.

An add's answer (a CNI result) uses the veth the add made, not a second look at it.

The real agent runs in this process on its own node namespace.
"""

from __future__ import annotations

from collections.abc import Iterator
from ipaddress import IPv4Address, IPv6Address

import pytest
from agent_support import in_process_agent
from pyroute2 import IPRoute

from membrane import netns
from membrane.agent.agent import Agent
from membrane.agent.endpoints import WARM_PEER, ProgramKey, WarmVeth, warm_peer_ifname
from membrane.api.models import EndpointCreate
from membrane.bpf import Link
from membrane.bpf.proginfo import program_info
from membrane.datapath.endpoint_prog import (
    HOOKS,
    attached_programs,
    links_dir,
    pinned_endpoint_ids,
)
from membrane.endpoint.plumbing import inspect_pod
from membrane.netns import find_link
from membrane.testing.cluster import unique_tag
from membrane.testing.reachability import Peer, Reachability, check

pytestmark = pytest.mark.root

NS = "pl"


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    with in_process_agent(tmp_path_factory.mktemp("agent"), unique_tag("pl")) as started:
        yield started


def loaded_ahead(agent: Agent) -> tuple[ProgramKey, dict[str, int]]:
    """What the agent loaded ahead for, and the ids of those programs by direction."""
    ahead = agent.endpoints._ahead
    assert ahead is not None, "nothing was loaded ahead"
    obj = ahead.programs.result(timeout=30)
    return ahead.key, {d: program_info(obj.program(name).fd).id for d, name in HOOKS.items()}


def made_ahead(agent: Agent) -> tuple[ProgramKey, WarmVeth, dict[str, int]]:
    """The veth the agent made ahead, with its programs attached, and the ids of its tcx
    links by direction (none in clsact mode)."""
    ahead = agent.endpoints._ahead
    assert ahead is not None, "nothing was prepared ahead"
    warm = ahead.warm.result(timeout=30)
    assert warm is not None, "no veth was made ahead"
    links = {d: a.info().id for d, a in warm.held.attached.items() if isinstance(a, Link)}
    return ahead.key, warm, links


def pinned_link_ids(agent: Agent, ep_id: int) -> dict[str, int]:
    found = {}
    for direction in HOOKS:
        try:
            with Link.from_pin(f"{links_dir(agent.config.bpf_dir, ep_id)}/{direction}") as link:
                found[direction] = link.info().id
        except (FileNotFoundError, OSError):
            continue
    return found


def node_links(agent: Agent) -> dict[str, int]:
    with agent.node.inside(), IPRoute() as ipr:
        return {link.get_attr("IFLA_IFNAME"): link["index"] for link in ipr.get_links()}


def add(agent: Agent, name: str) -> tuple[int, IPv4Address]:
    ep = agent.add_endpoint(EndpointCreate(namespace=NS, name=name, labels={"pod": name}))
    return ep.id, IPv4Address(ep.ipv4)


def test_an_add_attaches_the_programs_loaded_ahead_for_it(agent: Agent) -> None:
    key, programs = loaded_ahead(agent)
    _, warm, links = made_ahead(agent)
    assert warm.held.program_ids() == programs  # on the veth made ahead already
    warm_peer = warm_peer_ifname(key[0])
    assert node_links(agent)[warm_peer] == warm.pair.peer_ifindex
    ep_id, ipv4 = add(agent, "a")
    assert (ep_id, ipv4) == key[:2]
    assert attached_programs(agent.config.bpf_dir, ep_id) == programs
    # Not attached again: the links made ahead are the ones recorded (pinned) now.
    assert pinned_link_ids(agent, ep_id) == links
    ep = agent.state.endpoints[ep_id]
    assert node_links(agent)[ep.host_ifname] == warm.pair.host_ifindex
    assert warm_peer not in node_links(agent)  # moved into the pod, as eth0
    assert inspect_pod(agent.node, ep.netns, ep.host_ifname, ipv4) is not None
    next_key, _ = loaded_ahead(agent)  # and the next endpoint's are on their way
    assert next_key[0] != ep_id and next_key[1] != ipv4


def test_programs_loaded_for_an_address_that_went_elsewhere_are_not_used(agent: Agent) -> None:
    key, programs = loaded_ahead(agent)
    _, warm, _ = made_ahead(agent)
    taken = agent.endpoints.ipam.allocate("elsewhere")  # the predicted address
    try:
        ep_id, ipv4 = add(agent, "b")
    finally:
        agent.endpoints.ipam.release(taken)
    assert taken == key[1] and ipv4 != taken
    attached = attached_programs(agent.config.bpf_dir, ep_id)
    assert set(attached) == set(HOOKS) and set(attached.values()).isdisjoint(programs.values())
    # The veth made ahead (same name: the id held) was deleted; the add made its own.
    assert ep_id == key[0]
    links = node_links(agent)
    assert links[agent.state.endpoints[ep_id].host_ifname] != warm.pair.host_ifindex
    assert warm.pair.peer_ifindex not in links.values()
    next_key, _, _ = made_ahead(agent)
    warm_peers = [name for name in node_links(agent) if WARM_PEER.fullmatch(name)]
    assert warm_peers == [warm_peer_ifname(next_key[0])]  # only the next endpoint's
    peers = {ep.key: Peer(ep.key, ep.netns, ep.ipv4) for ep in agent.state.endpoints.values()}
    names = [f"{NS}/a", f"{NS}/b"]
    check(peers, Reachability(names, names, ports=((0, "ICMP"),)))


def host_veth(agent: Agent, ifname: str) -> bool:
    with agent.node.inside(), IPRoute() as ipr:
        return find_link(ipr, ifname) is not None


def test_a_runtime_delete_answers_first_and_the_next_add_finishes_it(agent: Agent) -> None:
    ep = agent.add_endpoint(EndpointCreate(namespace=NS, name="c", labels={"pod": "c"}))
    ipv4 = IPv4Address(ep.ipv4)
    agent.delete_endpoint(NS, "c", finish_later=True)
    assert (
        agent.snapshot.endpoint(NS, "c") is None and ep.ipv4 not in agent.snapshot.endpoints_by_ip
    )
    # Out of force, not yet taken down: its address is not free for another pod meanwhile.
    assert host_veth(agent, ep.host_ifname) and ep.id in pinned_endpoint_ids(agent.config.bpf_dir)
    assert agent.endpoints.ipam.owner(ipv4) == ep.key
    agent.add_endpoint(EndpointCreate(namespace=NS, name="d", labels={"pod": "d"}))
    assert not host_veth(agent, ep.host_ifname)
    assert ep.id not in pinned_endpoint_ids(agent.config.bpf_dir)
    assert agent.endpoints.ipam.owner(ipv4) is None
    assert netns.exists(ep.netns) is False  # not a runtime's: the agent's own namespace went


def test_an_adds_answer_takes_the_veth_it_made_once_and_only_while_it_stands(
    agent: Agent,
) -> None:
    ep = agent.add_endpoint(EndpointCreate(namespace=NS, name="e", labels={"pod": "e"}))
    made = agent.endpoints.made_link(ep)
    # What the add made is what a look at the pod's interfaces finds (the CNI result's
    # interfaces and MACs come from it), and it is handed out once.
    assert made is not None
    ipv6 = None if ep.ipv6 is None else IPv6Address(ep.ipv6)
    assert made == inspect_pod(agent.node, ep.netns, ep.host_ifname, IPv4Address(ep.ipv4), ipv6)
    assert agent.endpoints.made_link(ep) is None
    again = agent.add_endpoint(EndpointCreate(namespace=NS, name="f", labels={"pod": "f"}))
    agent.delete_endpoint(NS, "f")
    assert agent.endpoints.made_link(again) is None  # deleted: nothing to answer with
