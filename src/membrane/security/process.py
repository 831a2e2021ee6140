"""One process as the cache keeps it, and Tetragon's exec_id for it."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field

from google.protobuf.timestamp_pb2 import Timestamp

from membrane.tetragon.tetragon import tetragon_pb2

# Process.flags words, as Tetragon spells them.
FLAG_EXECVE = "execve"
FLAG_PROCFS = "procFS"
FLAG_CLONE = "clone"
FLAG_TRUNC_ARGS = "truncArgs"
FLAG_TRUNC_FILENAME = "truncFilename"  # the binary's path: deeper or longer than walked
FLAG_MISS = "miss"
DOCKER_ID_CHARS = 31  # Tetragon's `docker` field: a container id's leading characters


def exec_id(node: str, ktime_ns: int, pid: int) -> str:
    """Tetragon's exec_id: base64 (standard alphabet, padded) of `node:ktime:pid`, where
    ktime is the process's start in the kernel's monotonic nanoseconds. Unique across
    nodes and over time (a reused pid has another start)."""
    return base64.b64encode(f"{node}:{ktime_ns}:{pid}".encode()).decode()


@dataclass(frozen=True)
class PodRef:
    """The pod and container a process runs in (from the agent's endpoint registry)."""

    namespace: str
    name: str
    labels: tuple[tuple[str, str], ...] = ()
    container_id: str = ""
    container_name: str = ""

    def to_proto(self) -> tetragon_pb2.Pod:
        pod = tetragon_pb2.Pod(namespace=self.namespace, name=self.name)
        pod.pod_labels.update(dict(self.labels))
        if self.container_id or self.container_name:
            pod.container.id = self.container_id
            pod.container.name = self.container_name
        return pod


@dataclass
class ProcessEntry:
    """A process from its exec (or clone, or the /proc walk at start) to its exit.

    `ktime_ns` is when this exec (clone) happened in the kernel's monotonic clock: with
    the pid it names the process (exec_id). `parent_exec_id` is the exec_id of the parent
    at that time ("" when the parent is unknown: flag `miss`)."""

    exec_id: str
    pid: int
    tid: int
    ktime_ns: int
    start_time_ns: int  # wall clock, ns since the epoch
    uid: int
    auid: int
    binary: str
    arguments: str
    cwd: str
    flags: str
    parent_exec_id: str
    parent_pid: int
    netns: int = 0  # inode of the network namespace (pod attribution)
    cgroup_id: int = 0
    exited: bool = False
    pod: PodRef | None = None
    children: int = field(default=0, repr=False)  # remembered children that name us
    parent: ProcessEntry | None = field(default=None, repr=False, compare=False)
    _proto: tetragon_pb2.Process | None = field(default=None, repr=False, compare=False)

    def to_proto(self) -> tetragon_pb2.Process:
        """As Tetragon prints it (refcnt is ours to leave at 0); built once (what it shows
        never changes), copied into each event that names the process."""
        if self._proto is None:
            self._proto = self._build()
        return self._proto

    def _build(self) -> tetragon_pb2.Process:
        start = Timestamp()
        start.FromNanoseconds(self.start_time_ns)
        proc = tetragon_pb2.Process(
            exec_id=self.exec_id,
            cwd=self.cwd,
            binary=self.binary,
            arguments=self.arguments,
            flags=self.flags,
            start_time=start,
            parent_exec_id=self.parent_exec_id,
        )
        proc.pid.value = self.pid
        proc.tid.value = self.tid
        proc.uid.value = self.uid
        proc.auid.value = self.auid
        if self.pod is not None:
            proc.pod.CopyFrom(self.pod.to_proto())
            # Tetragon: the id cut to its first 31 characters (what it can read from cgroups)
            proc.docker = self.pod.container_id[:DOCKER_ID_CHARS]
        return proc
