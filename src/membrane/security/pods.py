"""Pod attribution: the endpoint whose network namespace a process runs in, from the
agent's endpoint registry (its published snapshot). Agent-made pods and containers that
came through CNI both have their namespace recorded, so the namespace's inode names the
pod. The container is the one the process's cgroup names (a pod's containers share its
namespace, which the runtime networked through its infra container); the endpoint's own
container when the cgroup names none."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from membrane import netns
from membrane.security.cgroups import CgroupContainers
from membrane.security.process import PodRef

if TYPE_CHECKING:
    from membrane.agent.snapshot import Snapshot


class PodDirectory:
    """`(netns inode, cgroup id) -> PodRef | None`, rebuilt when the snapshot changes."""

    def __init__(
        self,
        snapshot: Callable[[], Snapshot],
        container_of: Callable[[int], str] | None = None,
    ) -> None:
        self._snapshot = snapshot
        self._container_of = container_of if container_of is not None else CgroupContainers()
        self._seen: Snapshot | None = None
        self._by_netns: dict[int, PodRef] = {}
        self._by_container: dict[tuple[int, str], PodRef] = {}

    def __call__(self, netns_inode: int, cgroup_id: int) -> PodRef | None:
        snapshot = self._snapshot()
        if snapshot is not self._seen:
            self._by_netns = _pods_by_netns(snapshot)
            self._by_container = {}
            self._seen = snapshot
        pod = self._by_netns.get(netns_inode)
        if pod is None:
            return None
        if not pod.container_id:
            return pod  # an agent-made pod: no runtime, its processes' cgroups are not its
        container_id = self._container_of(cgroup_id)
        if not container_id or container_id == pod.container_id:
            return pod
        key = (netns_inode, container_id)
        if key not in self._by_container:
            # Another container of the pod: its name is podman's record, which only the
            # CNI ADD of the infra container reads.
            self._by_container[key] = dataclasses.replace(
                pod, container_id=container_id, container_name=""
            )
        return self._by_container[key]


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
