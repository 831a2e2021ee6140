"""The container a process runs in, from its cgroup (v2): the kernel side records the
cgroup's id, which is the inode number of the cgroup's directory in the cgroup2 mount,
and runtimes name that directory after the container (podman with runc and cgroupfs:
`/libpod_parent/<pod id>/libpod-<container id>`, with systemd `libpod-<id>.scope`;
others `<id>`, `docker-<id>.scope`, `cri-containerd-<id>.scope`). As Tetragon does, the
container id is the last path component holding 64 hex digits.

Ids are resolved by a walk of the cgroup2 tree, cached by inode: a walk happens only
when an id is not known yet (a new cgroup), not per process."""

from __future__ import annotations

import os
import re

_CONTAINER_ID = re.compile(r"(?:^|[-_])([0-9a-f]{64})(?:\.scope)?$")
_MAX_UNKNOWN = 4096  # ids no walk found (cgroups gone already), remembered up to this


def cgroup2_mount(mounts: str = "/proc/self/mounts") -> str | None:
    """Where the cgroup2 hierarchy is mounted (/sys/fs/cgroup, or .../unified in the
    hybrid layout), None without one."""
    try:
        with open(mounts) as f:
            for line in f:
                fields = line.split()
                if len(fields) > 2 and fields[2] == "cgroup2":
                    return fields[1]
    except OSError:
        pass
    return None


def container_id_of(path: str) -> str:
    """The container a cgroup path names ("" when none does)."""
    for part in reversed(path.split("/")):
        if found := _CONTAINER_ID.search(part):
            return found.group(1)
    return ""


def cgroup_id_of_process(pid: int, proc: str = "/proc", mount: str | None = None) -> int:
    """A running process's cgroup v2 id (0 when unknown): the inode of its directory."""
    mount = mount or cgroup2_mount()
    if mount is None:
        return 0
    try:
        with open(f"{proc}/{pid}/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    return os.stat(mount + line[3:].rstrip("\n")).st_ino
    except OSError:
        pass
    return 0


class CgroupContainers:
    """`cgroup id -> container id` ("" for a cgroup of no container)."""

    def __init__(self, mount: str | None = None) -> None:
        self.mount = mount if mount is not None else cgroup2_mount()
        self._known: dict[int, str] = {}
        self._unknown: set[int] = set()
        self.walks = 0

    def __call__(self, cgroup_id: int) -> str:
        if not cgroup_id or self.mount is None:
            return ""
        found = self._known.get(cgroup_id)
        if found is not None:
            return found
        if cgroup_id in self._unknown:
            return ""
        self._known = self._walk()
        found = self._known.get(cgroup_id)
        if found is None:
            if len(self._unknown) >= _MAX_UNKNOWN:
                self._unknown.clear()
            self._unknown.add(cgroup_id)
            return ""
        return found

    def _walk(self) -> dict[int, str]:
        """Every cgroup directory's inode and the container its path names."""
        self.walks += 1
        known: dict[int, str] = {}
        todo = [(self.mount, "")]
        while todo:
            directory, container = todo.pop()
            try:
                entries = list(os.scandir(directory))
            except OSError:
                continue  # removed while walking
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    here = container_id_of(entry.name) or container
                    known[entry.inode()] = here
                    todo.append((entry.path, here))
        return known
