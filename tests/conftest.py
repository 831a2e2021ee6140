"""Shared fixtures: namespaces and veth pairs that are always cleaned up, and the `root`
marker (tests that need root and a BPF-capable kernel are skipped, with the reason, when
run unprivileged)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from membrane.netns import Pair, Topology

ROOT_REASON = "needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_BPF): run the suite as root"


def is_root() -> bool:
    return os.geteuid() == 0


def require_root() -> None:
    """Skip the calling test or fixture when not root."""
    if not is_root():
        pytest.skip(ROOT_REASON)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if is_root():
        return
    skip = pytest.mark.skip(reason=ROOT_REASON)
    for item in items:
        if item.get_closest_marker("root"):
            item.add_marker(skip)


@pytest.fixture
def topology() -> Iterator[Topology]:
    """A Topology that the test may fill freely; everything in it is removed afterwards,
    whether the test passed, failed or raised."""
    require_root()
    with Topology() as topo:
        yield topo


@pytest.fixture
def pair(topology: Topology) -> Pair:
    """Namespaces "client" and "server" joined by eth0<->eth0, addresses .1/.2 of a /24
    from 198.18.0.0/16 not used by other tests of this run; the server answers ping."""
    return topology.pair()
