"""Pod attribution: the endpoint whose network namespace a process runs in, from the
agent's endpoint registry (its published snapshot). Agent-made pods and containers that
came through CNI both have their namespace recorded, so the namespace's inode names the
pod and, for CNI, its container."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from membrane import netns
from membrane.security.process import PodRef

if TYPE_CHECKING:
    from membrane.agent.snapshot import Snapshot


class PodDirectory:
    """`(netns inode, cgroup id) -> PodRef | None`, rebuilt when the snapshot changes."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self._snapshot = snapshot
        self._seen: Snapshot | None = None
        self._by_netns: dict[int, PodRef] = {}

    def __call__(self, netns_inode: int, cgroup_id: int) -> PodRef | None:
        snapshot = self._snapshot()
        if snapshot is not self._seen:
            self._by_netns = _pods_by_netns(snapshot)
            self._seen = snapshot
        return self._by_netns.get(netns_inode)


def _pods_by_netns(snapshot: Snapshot) -> dict[int, PodRef]:
    pods = {}
    for ep in snapshot.endpoints.values():
        try:
            inode = os.stat(netns.path(ep.netns)).st_ino
        except OSError:
            continue  # its namespace is gone (the endpoint is being removed)
        pods[inode] = PodRef(
            namespace=ep.namespace,
            name=ep.name,
            labels=tuple(sorted(ep.labels.items())),
            container_id=ep.container_id or "",
            container_name=ep.container_name or "",
        )
    return pods
