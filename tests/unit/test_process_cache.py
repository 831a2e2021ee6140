"""The process cache: ancestry through exited parents, flags, pod attribution, and a
bound on what it remembers however many processes come and go."""

from __future__ import annotations

from membrane.security.cache import ProcessCache
from membrane.security.events import exec_event, exit_event, fill_process
from membrane.security.process import PodRef, ProcessEntry
from membrane.tetragon.tetragon import events_pb2

_WALL = 1_700_000_000 * 10**9


def _start(cache: ProcessCache, pid: int, ppid: int, ktime: int, flags=("execve",), netns=0):
    entry = cache.new_entry(
        pid=pid,
        tid=pid,
        ktime_ns=ktime,
        start_time_ns=_WALL + ktime,
        uid=0,
        auid=1000,
        binary=f"/bin/p{pid}",
        arguments="-x",
        cwd="/",
        flags=list(flags),
        parent_pid=ppid,
        netns=netns,
    )
    cache.start(entry)
    return entry


def test_ancestry_through_exited_parents() -> None:
    cache = ProcessCache("n", max_exited=4)
    init = _start(cache, 1, 0, 1, ("procFS",))
    shell = _start(cache, 10, 1, 2)
    child = _start(cache, 11, 10, 3)
    grandchild = _start(cache, 12, 11, 4)
    cache.exit(10)
    cache.exit(11)
    for i in range(100):  # churn: exited leaves come and go
        _start(cache, 1000 + i, 1, 10 + i)
        cache.exit(1000 + i)
    assert [a.pid for a in cache.ancestors(grandchild)] == [10, 1]
    assert cache.parent(grandchild) is child
    event = exec_event(cache, grandchild, _WALL).event()
    assert event.process_exec.parent.exec_id == child.exec_id
    assert [a.exec_id for a in event.process_exec.ancestors] == [shell.exec_id, init.exec_id]
    assert len(cache) <= 4 + 4  # live ones and their exited ancestors, plus max_exited


def test_memory_is_bounded_under_churn() -> None:
    cache = ProcessCache("n", max_exited=100)
    _start(cache, 1, 0, 1, ("procFS",))
    for i in range(20_000):
        _start(cache, 2 + i % 30_000, 1, 2 + i)
        cache.exit(2 + i % 30_000)
    assert len(cache) == 101
    assert cache.evicted == 20_000 - 100


def test_missing_parent_is_flagged_and_exec_replaces_clone() -> None:
    cache = ProcessCache("n")
    orphan = _start(cache, 50, 49, 7)
    assert orphan.flags == "execve miss" and orphan.parent_exec_id == ""
    clone = _start(cache, 51, 50, 8, ("clone",))
    execd = _start(cache, 51, 50, 9, ("execve", "clone"))
    assert cache.entry(51) is execd and clone.exited
    assert cache.by_exec_id(clone.exec_id) is clone  # kept: it may still be named


def test_exit_names_signal_or_status_and_pod() -> None:
    pod = PodRef("ns1", "web", (("app", "web"),), "c0ffee", "main")
    cache = ProcessCache("n", pod_of=lambda netns, cgroup: pod if netns == 77 else None)
    _start(cache, 1, 0, 1, ("procFS",))
    entry = _start(cache, 5, 1, 2, netns=77)
    assert isinstance(entry, ProcessEntry) and entry.pod == pod
    killed = exit_event(cache, entry, _WALL, 9).event()
    assert killed.process_exit.signal == "SIGKILL"
    assert killed.process_exit.process.pod.pod_labels == {"app": "web"}
    assert killed.process_exit.process.pod.container.id == "c0ffee"
    assert killed.process_exit.process.docker == "c0ffee"
    code = exit_event(cache, entry, _WALL, 3 << 8).event()
    assert code.process_exit.status == 3 and not code.process_exit.signal
    message = events_pb2.GetEventsResponse().process_tracepoint
    assert fill_process(message, cache, 5, tid=6)
    assert message.process.tid.value == 6 and message.parent.pid.value == 1
    assert not fill_process(message, cache, 999)


def test_store_builds_lazily_redacts_and_follows() -> None:
    import asyncio

    from membrane.security.events import dropped_notice
    from membrane.security.redaction import parse_redaction_filters
    from membrane.security.sink import EventStore, resolve

    cache = ProcessCache("n")
    entry = _start(cache, 1, 0, 1, ("procFS",))
    entry.arguments = "--token=abc"  # before its message is first built
    store = EventStore(2, parse_redaction_filters('{"redact":["--token=(\\\\S+)"]}'))
    lazy = exec_event(cache, entry, _WALL)
    loop = asyncio.new_event_loop()
    try:
        history, follower = store.follow(loop)
        store.publish([lazy, dropped_notice("n", 3), exit_event(cache, entry, _WALL, 0)])
        loop.run_until_complete(asyncio.sleep(0))
        assert history == [] and follower.queue.qsize() == 1
        kept = [resolve(item) for item in store.recent()]
        assert len(kept) == 2  # the capacity: the oldest went
        assert kept[0].rate_limit_info.number_of_dropped_process_events == 3
        assert resolve(lazy).process_exec.process.arguments == "--token=*****"
    finally:
        loop.close()
