"""The policy map's capacity: `PolicyWriter.peak` counts, before anything is written, the
most entries the map holds while `apply` runs (the agent refuses a change above the map's
size). Checked against real writes: the count after every batch written, over random
changes of several endpoints (one step and two steps in a row, as a sync with identities on
their way out writes them), and the kernel's own limit: a change whose peak is the map's
size fits exactly, one more entry fails with ENOSPC part of the way through."""

from __future__ import annotations

import errno
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from endpoint_harness import temporary_pin_dir
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from membrane.abi import Direction
from membrane.agent.config import DEFAULT_POLICY_MAP_MAX
from membrane.bpf import BpfError
from membrane.datapath import EndpointPolicy, PolicyWriter
from membrane.datapath.nodemaps import NodeMaps
from membrane.datapath.policy_entries import PolicyEntry

pytestmark = pytest.mark.root

SIZE = 64  # the small policy map's max_entries
ENDPOINTS = (1, 2, 3)
IDENTITIES = {1: 300, 2: 300, 3: 301}

Step = dict[int, EndpointPolicy]


@pytest.fixture(scope="module")
def maps() -> Iterator[NodeMaps]:
    with temporary_pin_dir() as pin_dir, NodeMaps.open(pin_dir, {"policy": 1024}) as node_maps:
        yield node_maps


def entries_of(ports: set[int], denies: set[int]) -> frozenset[PolicyEntry]:
    return frozenset(
        PolicyEntry(Direction.INGRESS, 400 + port % 3, 6, port, 16, port in denies, port + 1)
        for port in ports
    )


@st.composite
def steps(draw: st.DrawFn) -> Step:
    """New policies for some of the endpoints (at most 20 entries each), sometimes one
    policy object for all of them (replicas, as the compiler hands them out)."""
    out: Step = {}
    shared = draw(st.booleans())
    for ep_id in draw(st.sets(st.sampled_from(ENDPOINTS), min_size=1)):
        if shared and out:
            out[ep_id] = next(iter(out.values()))
            continue
        ports = draw(st.sets(st.integers(1, 30), max_size=20))
        denies = draw(st.sets(st.sampled_from(sorted(ports)))) if ports else set()
        out[ep_id] = EndpointPolicy(draw(st.booleans()), False, entries_of(ports, denies))
    return out


def count(maps: NodeMaps) -> int:
    return len(maps.policy.lookup_batch())


def observed_peak(maps: NodeMaps, writer: PolicyWriter, plan: list[Step]) -> int:
    """Apply each step; the most entries the map held after any batch write."""
    seen = [count(maps)]
    original = maps.policy.update_batch_raw

    def counting(keys: bytes, values: bytes, flags: int = 0) -> int:
        written = original(keys, values, flags)
        seen.append(count(maps))
        return written

    maps.policy.update_batch_raw = counting  # type: ignore[method-assign]
    try:
        for step in plan:
            writer.apply(step, identities(step))
    finally:
        del maps.policy.update_batch_raw
    return max(seen)


def identities(step: Mapping[int, Any]) -> dict[int, int]:
    return {ep_id: IDENTITIES[ep_id] for ep_id in step}


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(plan=st.lists(steps(), min_size=1, max_size=2))
def test_peak_is_the_most_entries_the_writes_reach(maps: NodeMaps, plan: list[Step]) -> None:
    writer = PolicyWriter(maps)  # reads what earlier examples left: any starting point
    predicted = writer.peak([(step, identities(step)) for step in plan])
    assert predicted == observed_peak(maps, writer, plan)
    assert count(maps) == sum(len(group) for group in writer.written().values())


def test_the_kernel_refuses_one_entry_more_than_the_size() -> None:
    """What the agent's check guards against: max_entries counts entries, and a batch
    that overflows the map fails after writing part of itself."""
    with temporary_pin_dir() as pin_dir, NodeMaps.open(pin_dir, {"policy": SIZE}) as maps:
        writer = PolicyWriter(maps)
        full = {1: EndpointPolicy(True, False, entries_of(set(range(SIZE)), set()))}
        assert writer.peak([(full, {1: 300})]) == SIZE
        writer.apply(full, {1: 300})
        assert count(maps) == SIZE
        more = {2: EndpointPolicy(True, False, entries_of({1, 2}, set()))}
        assert writer.peak([(more, {2: 300})]) == SIZE + 2
        with pytest.raises(BpfError) as failed:
            PolicyWriter(maps).apply(more, {2: 300})
        assert failed.value.errno in (errno.ENOSPC, errno.E2BIG), failed.value
        assert count(maps) == SIZE


def test_the_agents_default_size_is_the_compiled_one() -> None:
    """--policy-map-max's default must be what the object declares (a map it creates with
    the default is then the same map an older agent created)."""
    with temporary_pin_dir() as pin_dir, NodeMaps.open(pin_dir) as maps:
        assert maps.policy.max_entries == DEFAULT_POLICY_MAP_MAX
