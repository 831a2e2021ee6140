"""Node maps meeting a build whose layouts differ (membrane.datapath.upgrade): the maps that
changed are found (and only those), re-created and filled field by field (a hash, an LPM
trie, a per-CPU hash), and an agent that died half-way through a migration leaves nothing
a restart cannot finish."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from endpoint_harness import temporary_pin_dir

from membrane.bpf import Map
from membrane.bpf.maps import possible_cpus
from membrane.datapath import NodeMaps
from membrane.datapath.upgrade import STAGING, NodeMapMigration, changed_node_maps
from membrane.testing.builds import OBJECTS_ENV, build_endpoint_variant

pytestmark = pytest.mark.root

GROWN = {"endpoints": "endpoint_state", "policy": "policy_value", "drops": "drop_value"}


@pytest.fixture(scope="module")
def variant(tmp_path_factory: pytest.TempPathFactory) -> Path:
    grow = [(struct, "__u32 moved") for struct in GROWN.values()]
    return build_endpoint_variant(tmp_path_factory.mktemp("variant"), grow=grow)


def fields(value: object) -> dict[str, object]:
    names = [name for name, *_ in type(value)._fields_ if not name.startswith("_pad")]
    values = {n: getattr(value, n) for n in names if n != "moved"}
    return {n: bytes(v) if isinstance(v, ctypes.Array) else v for n, v in values.items()}


@pytest.fixture
def pin_dir() -> Iterator[str]:
    with temporary_pin_dir() as path, NodeMaps.open(path) as maps:
        maps.endpoints.update(7, maps.endpoints.value_type(identity=300, policy_rev=4))
        key = maps.policy.key_type(prefixlen=64, ep_id=7, identity=300)
        maps.policy.update(key, maps.policy.value_type(rule_id=9, deny=1))
        drop = maps.drops.key_type(ep_id=7, dir=1, reason=133)
        per_cpu = [maps.drops.value_type(packets=i, bytes=100 * i) for i in range(possible_cpus())]
        maps.drops.update(drop, per_cpu)
        yield path


def contents(pin_dir: str) -> dict[str, list[object]]:
    out = {}
    for name in GROWN:
        with Map.from_pin(os.path.join(pin_dir, name)) as m:
            out[name] = [
                (
                    fields(k) if hasattr(k, "_fields_") else k,
                    [fields(x) for x in v] if isinstance(v, list) else fields(v),
                )
                for k, v in m.items()
            ]
    return out


def test_changed_maps_are_migrated_field_by_field(
    pin_dir: str, variant: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = contents(pin_dir)
    with Map.from_pin(os.path.join(pin_dir, "endpoints")) as m:
        size_before = m.value_size
    assert changed_node_maps(pin_dir) == []
    monkeypatch.setenv(OBJECTS_ENV, str(variant))
    assert sorted(changed_node_maps(pin_dir)) == sorted(GROWN)

    migration = NodeMapMigration.start(pin_dir)
    assert contents(pin_dir) == before  # every field but the new one, which is zero
    with Map.from_pin(os.path.join(pin_dir, "endpoints")) as m:
        assert m.value_size > size_before and m.lookup(7).moved == 0
    migration.finish()
    assert not os.path.exists(os.path.join(pin_dir, STAGING))
    assert changed_node_maps(pin_dir) == []

    monkeypatch.delenv(OBJECTS_ENV)  # and back
    NodeMapMigration.start(pin_dir).finish()
    assert contents(pin_dir) == before


def test_a_migration_cut_short_is_finished_by_the_next_start(
    pin_dir: str, variant: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = contents(pin_dir)
    monkeypatch.setenv(OBJECTS_ENV, str(variant))
    NodeMapMigration.start(pin_dir)  # the agent dies before finish()
    assert os.listdir(os.path.join(pin_dir, STAGING))
    with Map.from_pin(os.path.join(pin_dir, STAGING, "endpoints-old")) as old:
        old.update(8, old.value_type(identity=301))  # an old program wrote on meanwhile
    NodeMapMigration.start(pin_dir).finish()
    assert not os.path.exists(os.path.join(pin_dir, STAGING))
    assert changed_node_maps(pin_dir) == []
    after = contents(pin_dir)
    assert after["policy"] == before["policy"] and after["drops"] == before["drops"]
    with Map.from_pin(os.path.join(pin_dir, "endpoints")) as m:
        assert {k: v.identity for k, v in m.items()} == {7: 300, 8: 301}
