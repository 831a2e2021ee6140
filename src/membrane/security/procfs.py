"""The processes that predate the agent, read from /proc when it starts (flag `procFS`),
parents before children, so the cache can name the parent and ancestors of every event.

A process's start in /proc (stat field 22, clock ticks since boot) stands for its exec
ktime: exec_ids of these processes are close to Tetragon's, not equal to what the kernel
would have given at the exec we did not see.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from membrane.bpf.ktime import ktime_to_unix
from membrane.security.cache import ProcessCache
from membrane.security.cgroups import cgroup2_mount, cgroup_id_of_process
from membrane.security.process import FLAG_PROCFS, ProcessEntry

_TICK_NS = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
_NO_AUID = 0xFFFFFFFF


@dataclass(frozen=True)
class ProcRecord:
    pid: int
    ppid: int
    start_ticks: int
    uid: int
    auid: int
    binary: str
    arguments: str
    cwd: str
    netns: int
    cgroup_id: int = 0


def read_process(proc: str, pid: int, cgroup_mount: str | None = None) -> ProcRecord | None:
    """One process's record, or None when it is gone or is a kernel thread."""
    base = f"{proc}/{pid}"
    try:
        with open(f"{base}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
        with open(f"{base}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        # comm may hold spaces and parentheses: the fields follow the last ')'.
        fields = stat[stat.rindex(")") + 2 :].split()
        ppid, start = int(fields[1]), int(fields[19])
        binary = _readlink(f"{base}/exe")
        if not binary:
            return None  # a kernel thread (or a zombie): no executable
        uid = os.stat(base).st_uid
        with open(f"{base}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    uid = int(line.split()[2])  # effective, as exec events report
                    break
        try:
            with open(f"{base}/loginuid") as f:
                auid = int(f.read().strip() or _NO_AUID)
        except OSError:
            auid = _NO_AUID
        netns = _inode(f"{base}/ns/net")
        cgroup_id = cgroup_id_of_process(pid, proc, cgroup_mount)
    except (OSError, ValueError, IndexError):
        return None
    args = [a.decode(errors="replace") for a in argv[1:] if a]
    return ProcRecord(
        pid=pid,
        ppid=ppid,
        start_ticks=start,
        uid=uid,
        auid=auid,
        binary=binary,
        arguments=" ".join(args),
        cwd=_readlink(f"{base}/cwd"),
        netns=netns,
        cgroup_id=cgroup_id,
    )


def _readlink(path: str) -> str:
    try:
        target = os.readlink(path)
    except OSError:
        return ""
    return target.removesuffix(" (deleted)")


def _inode(path: str) -> int:
    try:
        return os.stat(path).st_ino
    except OSError:
        return 0


def load_processes(cache: ProcessCache, proc: str = "/proc") -> list[ProcessEntry]:
    """Every user process running now into the cache, oldest first (a parent always
    started before its children). Returns the entries added."""
    records = []
    mount = cgroup2_mount()
    for name in os.listdir(proc):
        if name.isdigit() and (rec := read_process(proc, int(name), mount)) is not None:
            records.append(rec)
    records.sort(key=lambda r: (r.start_ticks, r.pid))
    added = []
    for rec in records:
        ktime = rec.start_ticks * _TICK_NS
        entry = cache.new_entry(
            pid=rec.pid,
            tid=rec.pid,
            ktime_ns=ktime,
            start_time_ns=int(ktime_to_unix(ktime) * 1e9),
            uid=rec.uid,
            auid=rec.auid,
            binary=rec.binary,
            arguments=rec.arguments,
            cwd=rec.cwd,
            flags=[FLAG_PROCFS],
            parent_pid=rec.ppid,
            netns=rec.netns,
            cgroup_id=rec.cgroup_id,
        )
        cache.start(entry)
        added.append(entry)
    return added
