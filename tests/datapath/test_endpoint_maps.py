"""Node maps (created once, adopted after a restart, shared by every endpoint program) and
the ipcache writer."""

from __future__ import annotations

import os
from collections.abc import Iterator
from ipaddress import IPv4Network, IPv6Network

import pytest
from endpoint_harness import EP_IP, temporary_pin_dir

from membrane.bpf import BpfError
from membrane.bpf.maps import HASH, LPM_TRIE, LRU_HASH, PERCPU_HASH, RINGBUF
from membrane.datapath import Identity, NodeMaps, load_endpoint, sync_ipcache
from membrane.datapath.abi import FRAGS_EGRESS, FRAGS_INGRESS, NODE_MAPS
from membrane.datapath.ipcache import read_ipcache
from membrane.datapath.service_nat import SERVICE_PIN_SUBDIR

pytestmark = pytest.mark.root

BPF_F_NO_PREALLOC = 1


@pytest.fixture
def pin_dir() -> Iterator[str]:
    with temporary_pin_dir() as directory:
        yield directory


def ids(maps: NodeMaps) -> dict[str, int]:
    return {name: m.id for name, m in maps.maps().items()}


def test_created_as_declared(pin_dir: str) -> None:
    with NodeMaps.open(pin_dir, sizes={"ct": 4096}) as maps:
        assert sorted(os.listdir(pin_dir)) == sorted(NODE_MAPS)
        kinds = {name: (m.type, m.flags & BPF_F_NO_PREALLOC) for name, m in maps.maps().items()}
        assert kinds["ipcache"] == (LPM_TRIE, BPF_F_NO_PREALLOC)
        assert kinds["policy"] == (LPM_TRIE, BPF_F_NO_PREALLOC)
        assert kinds["endpoints"][0] == HASH
        assert kinds["ct"][0] == LRU_HASH
        assert kinds["drops"][0] == PERCPU_HASH and kinds["events"][0] == RINGBUF
        assert maps.sizes()["ct"] == 4096
        assert maps.sizes()["policy"] == 1 << 20


def test_adopted_after_a_restart(pin_dir: str) -> None:
    with NodeMaps.open(pin_dir, sizes={"ct": 4096}) as first:
        sync_ipcache(first, {IPv4Network("198.18.0.0/24"): (300, 0)})
        before = ids(first)
    with NodeMaps.open(pin_dir, sizes={"ct": 8192}) as second:  # sizes of pinned maps stay
        assert ids(second) == before
        assert second.sizes()["ct"] == 4096
        assert read_ipcache(second)[IPv4Network("198.18.0.0/24")] == (300, 0)


def test_a_missing_map_is_created_beside_the_adopted_ones(pin_dir: str) -> None:
    with NodeMaps.open(pin_dir, sizes={"ct": 4096}) as first:
        before = ids(first)
    os.unlink(os.path.join(pin_dir, "drops"))
    with NodeMaps.open(pin_dir) as second:
        after = ids(second)
        assert after["drops"] != before["drops"]
        assert {n: i for n, i in after.items() if n != "drops"} == {
            n: i for n, i in before.items() if n != "drops"
        }
        assert second.sizes()["ct"] == 4096
        assert second.drops.key_type.__name__ == "drop_key"  # typed by its own BTF


def test_unknown_map_sizes_are_refused(pin_dir: str) -> None:
    with pytest.raises(ValueError, match="conntrack"):
        NodeMaps.open(pin_dir, sizes={"conntrack": 10})


def test_endpoint_programs_share_resized_maps(pin_dir: str) -> None:
    with (
        NodeMaps.open(pin_dir, sizes={"ct": 4096, "policy": 1000}) as maps,
        load_endpoint(pin_dir, 7, EP_IP) as obj,
    ):
        assert obj.map("ct").id == maps.ct.id
        assert obj.map("policy").id == maps.policy.id


def test_fragment_records_are_per_endpoint_and_direction(pin_dir: str) -> None:
    """No endpoint or direction shares them, so none can evict another's records."""
    with (
        NodeMaps.open(pin_dir),
        load_endpoint(pin_dir, 7, EP_IP) as first,
        load_endpoint(pin_dir, 8, "198.18.0.11") as second,
    ):
        frag_maps = [o.map(n) for o in (first, second) for n in (FRAGS_INGRESS, FRAGS_EGRESS)]
        assert len({m.id for m in frag_maps}) == 4
        assert {m.type for m in frag_maps} == {LRU_HASH}
        # none of them pinned (the service maps are, in their own directory)
        assert sorted(os.listdir(pin_dir)) == sorted([*NODE_MAPS, SERVICE_PIN_SUBDIR])


def test_endpoint_programs_need_the_node_maps(pin_dir: str) -> None:
    with pytest.raises(BpfError, match=r"NodeMaps\.open"):
        load_endpoint(pin_dir, 7, EP_IP)


# ---- ipcache ---------------------------------------------------------------------------
def test_ipcache_sync_writes_only_differences(pin_dir: str) -> None:
    a, b, c = (IPv4Network(n) for n in ("198.18.0.0/16", "198.18.0.20/32", "198.19.0.0/24"))
    a6, b6 = IPv6Network("2001:db8:1::/64"), IPv6Network("2001:db8:1::20/128")
    worlds = {
        IPv4Network("0.0.0.0/0"): (int(Identity.WORLD), 0),
        IPv6Network("::/0"): (int(Identity.WORLD_IPV6), 0),
    }
    with NodeMaps.open(pin_dir) as maps:
        first = sync_ipcache(maps, {a: (300, 0), b: (400, 7), a6: (300, 0), b6: (400, 7)})
        assert (first.added, first.updated, first.removed) == (6, 0, 0)
        assert read_ipcache(maps) == {
            a: (300, 0),
            b: (400, 7),
            a6: (300, 0),
            b6: (400, 7),
            **worlds,
        }
        again = sync_ipcache(maps, {a: (300, 0), b: (400, 7), a6: (300, 0), b6: (400, 7)})
        assert (again.added, again.updated, again.removed) == (0, 0, 0)
        change = sync_ipcache(maps, {a: (301, 0), c: (500, 0), a6: (301, 0)})
        assert (change.added, change.updated, change.removed) == (1, 2, 2)
        assert read_ipcache(maps) == {a: (301, 0), c: (500, 0), a6: (301, 0), **worlds}


def test_ipcache_keeps_the_world_prefix(pin_dir: str) -> None:
    with NodeMaps.open(pin_dir) as maps:
        sync_ipcache(maps, {})
        assert read_ipcache(maps) == {
            IPv4Network("0.0.0.0/0"): (int(Identity.WORLD), 0),
            IPv6Network("::/0"): (int(Identity.WORLD_IPV6), 0),
        }
        with pytest.raises(ValueError, match="world"):
            sync_ipcache(maps, {IPv6Network("::/0"): (300, 0)})
        with pytest.raises(ValueError, match="world"):
            sync_ipcache(maps, {IPv4Network("0.0.0.0/0"): (300, 0)})
