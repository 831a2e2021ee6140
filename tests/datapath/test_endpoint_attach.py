"""Endpoint programs on a real veth: attach at tcx ingress/egress of the node side, pinned
links that survive their loader, in-place program swaps on re-attach, detach. Traffic is
a ping from the "pod" namespace to the "node" namespace over the veth."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from endpoint_harness import policy_entry, temporary_pin_dir

from membrane.abi import Direction, Identity, IpProto
from membrane.bpf import Link
from membrane.datapath import (
    EndpointPolicy,
    NodeMaps,
    PolicyWriter,
    attach_endpoint,
    detach_endpoint,
    is_attached,
    sync_ipcache,
)
from membrane.datapath.endpoint_prog import links_dir
from membrane.datapath.policy_entries import PolicyEntry
from membrane.netns import Pair, delete_link, next_subnet, ping

pytestmark = pytest.mark.root

EP_ID = 31
POD_IDENTITY = 5000


@pytest.fixture
def maps() -> Iterator[NodeMaps]:
    with temporary_pin_dir() as pin_dir, NodeMaps.open(pin_dir) as node_maps:
        sync_ipcache(node_maps, {})
        yield node_maps
        detach_endpoint(pin_dir, EP_ID)


def attach(maps: NodeMaps, pair: Pair) -> None:
    """The client namespace plays the pod; the server side of the veth is the node's."""
    pod, node = pair
    attach_endpoint(maps.pin_dir, EP_ID, pod.ip, node.ifindex(), node_netns=node.ns)


def set_policy(maps: NodeMaps, egress: bool, entries: list[PolicyEntry] | None = None) -> None:
    PolicyWriter(maps).apply(
        {EP_ID: EndpointPolicy(False, egress, entries or [])}, {EP_ID: POD_IDENTITY}
    )


def link_ids(maps: NodeMaps) -> dict[str, tuple[int, int]]:
    """direction -> (link id, program id) of the pinned links."""
    out = {}
    for direction in ("ingress", "egress"):
        with Link.from_pin(os.path.join(links_dir(maps.pin_dir, EP_ID), direction)) as link:
            info = link.info()
            out[direction] = (info.id, info.prog_id)
    return out


def test_attach_enforce_and_detach(maps: NodeMaps, pair: Pair) -> None:
    pod, node = pair
    set_policy(maps, egress=False)
    attach(maps, pair)
    assert is_attached(maps.pin_dir, EP_ID)
    assert ping(pod.ns, node.ip)

    set_policy(maps, egress=True)  # default deny from the pod
    assert not ping(pod.ns, node.ip, timeout=0.3)
    echo_to_world = policy_entry(Direction.EGRESS, Identity.WORLD, proto=IpProto.ICMP, port=8)
    set_policy(maps, egress=True, entries=[echo_to_world])
    assert ping(pod.ns, node.ip)

    assert detach_endpoint(maps.pin_dir, EP_ID)
    assert not is_attached(maps.pin_dir, EP_ID)
    assert not os.path.exists(links_dir(maps.pin_dir, EP_ID))
    set_policy(maps, egress=True)
    assert ping(pod.ns, node.ip)  # no program left to enforce anything
    assert not detach_endpoint(maps.pin_dir, EP_ID)


def test_reattach_swaps_programs_into_the_pinned_links(maps: NodeMaps, pair: Pair) -> None:
    set_policy(maps, egress=False)
    attach(maps, pair)
    before = link_ids(maps)
    attach(maps, pair)  # what a restarted agent does
    after = link_ids(maps)
    for direction in ("ingress", "egress"):
        assert after[direction][0] == before[direction][0]  # same link
        assert after[direction][1] != before[direction][1]  # new program
    assert ping(pair.client.ns, pair.server.ip)


def test_links_of_a_deleted_device_are_replaced(maps: NodeMaps, topology, pair: Pair) -> None:
    set_policy(maps, egress=False)
    attach(maps, pair)
    old = link_ids(maps)
    delete_link(pair.server.ns, "eth0")
    assert not is_attached(maps.pin_dir, EP_ID)  # the links are defunct
    pod, node = topology.veth(pair.client.ns, pair.server.ns, subnet=next_subnet())
    attach_endpoint(maps.pin_dir, EP_ID, pod.ip, node.ifindex(), node_netns=node.ns)
    assert is_attached(maps.pin_dir, EP_ID)
    assert link_ids(maps)["ingress"][0] != old["ingress"][0]
    assert ping(pod.ns, node.ip)
