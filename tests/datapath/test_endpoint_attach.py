"""Endpoint programs on a real veth, in both attach modes: tcx (pinned links) and clsact
(filters in a fixed slot, recorded under the pin directory). Attachments survive their
loader, are found again and swapped in place on re-attach (never a second filter beside
the first), replaced when the device or the mode changes, and removed by detach. Traffic
is a ping from the "pod" namespace to the "node" namespace over the veth."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from endpoint_harness import policy_entry, temporary_pin_dir

from membrane import netns
from membrane.abi import Direction, Identity, IpProto
from membrane.bpf import Link
from membrane.bpf.probe import supports
from membrane.datapath import (
    EndpointPolicy,
    NodeMaps,
    PolicyWriter,
    attach_endpoint,
    detach_endpoint,
    is_attached,
    sync_ipcache,
)
from membrane.datapath.endpoint_prog import (
    CLSACT_SLOT,
    HOOKS,
    attach_mode,
    attached_programs,
    links_dir,
)
from membrane.datapath.policy_entries import PolicyEntry
from membrane.netns import Pair, Topology, delete_link, next_subnet, ping
from membrane.testing.tc import clsact_filters

pytestmark = pytest.mark.root

EP_ID = 31
POD_IDENTITY = 5000


@pytest.fixture
def maps() -> Iterator[NodeMaps]:
    with temporary_pin_dir() as pin_dir, NodeMaps.open(pin_dir) as node_maps:
        sync_ipcache(node_maps, {})
        yield node_maps
        detach_endpoint(pin_dir, EP_ID)


@pytest.fixture(params=["tcx", "clsact"])
def mode(request: pytest.FixtureRequest) -> str:
    if request.param == "tcx" and not supports("tcx"):
        pytest.skip("this kernel has no tcx (Linux 6.6 or later)")
    return request.param


def attach(maps: NodeMaps, pair: Pair, mode: str) -> None:
    """The client namespace plays the pod; the server side of the veth is the node's."""
    pod, node = pair
    got = attach_endpoint(maps.pin_dir, EP_ID, pod.ip, node.ifindex(), node.ns, mode)
    assert got == mode == attach_mode(maps.pin_dir, EP_ID)


def filters(pair: Pair) -> dict[str, list[tuple[int, int, int]]]:
    """direction -> (priority, handle, program id) of every clsact filter on the node side."""
    found = {}
    for direction in HOOKS:
        found[direction] = [
            (f["pref"], int(f["options"]["handle"], 16), f["options"]["prog"]["id"])
            for f in clsact_filters(pair.server.ns, "eth0", direction)
        ]
    return found


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


def test_attach_enforce_and_detach(maps: NodeMaps, pair: Pair, mode: str) -> None:
    pod, node = pair
    set_policy(maps, egress=False)
    attach(maps, pair, mode)
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
    assert filters(pair) == {"ingress": [], "egress": []}
    set_policy(maps, egress=True)
    assert ping(pod.ns, node.ip)  # no program left to enforce anything
    assert not detach_endpoint(maps.pin_dir, EP_ID)


def test_reattach_swaps_programs_in_place(maps: NodeMaps, pair: Pair, mode: str) -> None:
    """What a restarted agent does: the same link (tcx) or the same filter slot (clsact)
    gets the new program; nothing is added beside it."""
    set_policy(maps, egress=False)
    attach(maps, pair, mode)
    before = attached_programs(maps.pin_dir, EP_ID)
    links_before = link_ids(maps) if mode == "tcx" else None
    for _ in range(2):
        attach(maps, pair, mode)
    after = attached_programs(maps.pin_dir, EP_ID)
    assert set(after) == set(before) == {"ingress", "egress"}
    assert all(after[d] != before[d] for d in after), "the programs were not swapped"
    if mode == "tcx":
        assert {d: i[0] for d, i in link_ids(maps).items()} == {
            d: i[0] for d, i in (links_before or {}).items()
        }
        assert filters(pair) == {"ingress": [], "egress": []}
    else:
        slot = (CLSACT_SLOT.priority, CLSACT_SLOT.handle)
        assert filters(pair) == {d: [(*slot, after[d])] for d in HOOKS}
    assert ping(pair.client.ns, pair.server.ip)


def test_a_lost_clsact_filter_is_noticed_and_restored(maps: NodeMaps, pair: Pair) -> None:
    set_policy(maps, egress=False)
    attach(maps, pair, "clsact")
    netns.run(pair.server.ns, ["tc", "filter", "del", "dev", "eth0", "ingress"])
    assert not is_attached(maps.pin_dir, EP_ID)
    attach(maps, pair, "clsact")
    assert is_attached(maps.pin_dir, EP_ID)
    assert [len(f) for f in filters(pair).values()] == [1, 1]


def test_switching_modes_leaves_one_attachment(maps: NodeMaps, pair: Pair) -> None:
    if not supports("tcx"):
        pytest.skip("this kernel has no tcx (Linux 6.6 or later)")
    set_policy(maps, egress=True)  # default deny from the pod: only a program lets ping out
    echo_to_world = policy_entry(Direction.EGRESS, Identity.WORLD, proto=IpProto.ICMP, port=8)
    set_policy(maps, egress=True, entries=[echo_to_world])
    attach(maps, pair, "tcx")
    attach(maps, pair, "clsact")
    assert [len(f) for f in filters(pair).values()] == [1, 1]
    assert is_attached(maps.pin_dir, EP_ID)
    attach(maps, pair, "tcx")
    assert filters(pair) == {"ingress": [], "egress": []}
    assert is_attached(maps.pin_dir, EP_ID)
    set_policy(maps, egress=True)
    assert not ping(pair.client.ns, pair.server.ip, timeout=0.3)  # still enforced


def test_attachments_of_a_deleted_device_are_replaced(
    maps: NodeMaps, topology: Topology, pair: Pair, mode: str
) -> None:
    set_policy(maps, egress=False)
    attach(maps, pair, mode)
    old = attached_programs(maps.pin_dir, EP_ID)
    delete_link(pair.server.ns, "eth0")
    assert not is_attached(maps.pin_dir, EP_ID)  # defunct links, or filters gone
    pod, node = topology.veth(pair.client.ns, pair.server.ns, subnet=next_subnet())
    attach_endpoint(maps.pin_dir, EP_ID, pod.ip, node.ifindex(), node.ns, mode)
    assert is_attached(maps.pin_dir, EP_ID)
    assert attached_programs(maps.pin_dir, EP_ID)["ingress"] != old["ingress"]
    assert ping(pod.ns, node.ip)
