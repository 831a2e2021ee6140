"""The container a cgroup path names, as runtimes lay their cgroups out."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from membrane.security.cgroups import CgroupContainers, container_id_of

CID = "0b9b5d4455399b8e8948bf2c92599d5eeae275630a5b947ca883f07fbf75071b"
POD = "882fa0385ca45c4d5de144a072d5ed0b550a6f184999ec5c867212e5d5278af3"


@pytest.mark.parametrize(
    "path",
    [
        f"/libpod_parent/{POD}/libpod-{CID}",  # podman, cgroupfs, in a pod
        f"/machine.slice/libpod-{CID}.scope",  # podman, systemd
        f"/machine.slice/libpod-{CID}.scope/container",  # podman's nested cgroup
        f"/system.slice/docker-{CID}.scope",
        f"/kubepods/besteffort/pod1234/{CID}",
        f"/kubepods.slice/kubepods-pod1.slice/cri-containerd-{CID}.scope",
    ],
)
def test_a_containers_cgroup_names_it(path: str) -> None:
    assert container_id_of(path) == CID


@pytest.mark.parametrize(
    "path", ["/", "/user.slice/user-0.slice/session-1.scope", f"/x/libpod-{CID}0", "/a-b"]
)
def test_other_cgroups_name_no_container(path: str) -> None:
    assert container_id_of(path) == ""


def test_ids_resolve_by_directory_inode_walking_again_only_for_new_ones(tmp_path: Path) -> None:
    container = tmp_path / "libpod_parent" / POD / f"libpod-{CID}"
    container.mkdir(parents=True)
    other = tmp_path / "user.slice"
    other.mkdir()
    containers = CgroupContainers(str(tmp_path))
    assert containers(os.stat(container).st_ino) == CID
    assert containers(os.stat(other).st_ino) == ""
    assert containers.walks == 1
    later = tmp_path / f"libpod-{POD}"
    later.mkdir()
    assert containers(os.stat(later).st_ino) == POD
    assert containers.walks == 2
    assert containers(999_999_999) == ""  # gone: remembered, not walked for again
    assert containers(999_999_999) == ""
    assert containers.walks == 3
