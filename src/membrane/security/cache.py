"""The process cache: every live process of the node by pid, and recently exited ones by
exec_id so that events name their parent and ancestors after those have gone.

Bounded: an exited process is kept while a remembered process names it as parent (its
ancestry), otherwise in a queue of at most `max_exited` that drops the oldest first. So
memory follows the number of live processes plus `max_exited`, whatever the churn.

Written by one thread (the process event reader); other threads (tracing policies'
readers, the API) only read, one dict lookup at a time, which the GIL keeps whole.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator

from membrane.security.process import FLAG_MISS, PodRef, ProcessEntry, exec_id
from membrane.tetragon.tetragon import tetragon_pb2

DEFAULT_MAX_EXITED = 8192
MAX_ANCESTORS = 64  # a guard against a cycle of reused pids; real chains are shorter
PodResolver = Callable[[int, int], "PodRef | None"]  # (netns inode, cgroup id) -> pod


class ProcessCache:
    def __init__(
        self,
        node_name: str,
        max_exited: int = DEFAULT_MAX_EXITED,
        pod_of: PodResolver | None = None,
    ) -> None:
        self.node_name = node_name
        self.max_exited = max_exited
        self.pod_of = pod_of
        self._live: dict[int, ProcessEntry] = {}  # pid -> the process running now
        self._known: dict[str, ProcessEntry] = {}  # exec_id -> every remembered process
        self._evictable: OrderedDict[str, None] = OrderedDict()  # exited, no children
        self.evicted = 0

    # ---- reads (any thread) --------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._known)

    @property
    def live(self) -> int:
        return len(self._live)

    def entry(self, pid: int) -> ProcessEntry | None:
        """The process running now as `pid` (a thread id finds nothing: use its tgid)."""
        return self._live.get(pid)

    def by_exec_id(self, exec_id_: str) -> ProcessEntry | None:
        return self._known.get(exec_id_)

    def process(self, pid: int, tid: int | None = None) -> tetragon_pb2.Process | None:
        """The Process message for an event of `pid` (thread `tid`), as Tetragon fills
        it: exec_id, parent_exec_id, binary, arguments, pod, ..."""
        entry = self._live.get(pid)
        if entry is None:
            return None
        proc = entry.to_proto()
        if tid is not None:
            proc.tid.value = tid
        return proc

    def parent(self, entry: ProcessEntry) -> ProcessEntry | None:
        return entry.parent

    def ancestors(self, entry: ProcessEntry) -> Iterator[ProcessEntry]:
        """The parent's parent and on, nearest first, up to init or the first unknown.
        Entries link to their parent: a chain stays whole while anything holds it."""
        parent = entry.parent
        for _ in range(MAX_ANCESTORS):
            parent = parent.parent if parent is not None else None
            if parent is None:
                return
            yield parent

    def entries(self) -> list[ProcessEntry]:
        return list(self._known.values())

    # ---- changes (the reader's thread) ---------------------------------------------------
    def new_entry(
        self,
        *,
        pid: int,
        tid: int,
        ktime_ns: int,
        start_time_ns: int,
        uid: int,
        auid: int,
        binary: str,
        arguments: str,
        cwd: str,
        flags: list[str],
        parent_pid: int,
        netns: int = 0,
        cgroup_id: int = 0,
    ) -> ProcessEntry:
        """An entry for a process that starts now (exec, clone) or was found in /proc,
        linked to the parent running as `parent_pid` (flag `miss` when none is known)."""
        parent = self._live.get(parent_pid)
        if parent is None and pid != 1 and FLAG_MISS not in flags:
            flags = [*flags, FLAG_MISS]
        pod = self.pod_of(netns, cgroup_id) if self.pod_of is not None and netns else None
        return ProcessEntry(
            exec_id=exec_id(self.node_name, ktime_ns, pid),
            pid=pid,
            tid=tid,
            ktime_ns=ktime_ns,
            start_time_ns=start_time_ns,
            uid=uid,
            auid=auid,
            binary=binary,
            arguments=arguments,
            cwd=cwd,
            flags=" ".join(flags),
            parent_exec_id=parent.exec_id if parent is not None else "",
            parent_pid=parent_pid,
            parent=parent,
            netns=netns,
            cgroup_id=cgroup_id,
            pod=pod,
        )

    def start(self, entry: ProcessEntry) -> None:
        """`entry` runs as its pid from now on: an exec replaces what ran there before
        (the clone, or the previous exec), which is remembered as long as needed."""
        before = self._live.get(entry.pid)
        self._live[entry.pid] = entry
        self._known[entry.exec_id] = entry
        parent = entry.parent
        if parent is not None:
            parent.children += 1
        if before is not None and before is not entry:
            self._retire(before)
        self._collect()

    def exit(self, pid: int) -> ProcessEntry | None:
        """The process running as `pid` ended; it stays known while it is needed."""
        entry = self._live.pop(pid, None)
        if entry is not None:
            self._retire(entry)
            self._collect()
        return entry

    def _retire(self, entry: ProcessEntry) -> None:
        entry.exited = True
        if entry.children == 0:
            self._evictable[entry.exec_id] = None

    def _collect(self) -> None:
        while len(self._evictable) > self.max_exited:
            gone_id, _ = self._evictable.popitem(last=False)
            gone = self._known.pop(gone_id, None)
            if gone is None:
                continue
            self.evicted += 1
            parent = gone.parent
            if parent is not None:
                parent.children -= 1
                if parent.exited and parent.children == 0:
                    self._evictable[parent.exec_id] = None
