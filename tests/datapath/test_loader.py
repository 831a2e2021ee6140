"""The BPF loader against the real kernel: verifier errors, load-time constants, maps of
every kind we use, pinning and reloads, the ring-buffer consumer, and links (tracepoint,
uprobe, perf_event, cgroup) including pins, in-place program swaps and detach.

selftest.bpf.o is driven through BPF_PROG_TEST_RUN; selftest_trace.bpf.o counts only
what the test's own thread does, so other activity on the machine cannot disturb counts.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from membrane.bpf import BpfObject, Link, LoadError, Map, test_run
from membrane.bpf.fs import BPFFS, ensure_bpffs
from membrane.bpf.links import (
    BPF_CGROUP_INET4_CONNECT,
    attach_cgroup,
    attach_perf_event,
    attach_tracepoint,
    attach_uprobe,
    open_perf_event,
)
from membrane.bpf.maps import possible_cpus
from membrane.bpf.probe import libc_path, temporary_cgroup
from membrane.bpf.ringbuf import Batch, RingBuffer

pytestmark = pytest.mark.root

XDP_DROP, XDP_PASS = 1, 2
PACKET = bytes(64)  # test runs only need a frame-sized buffer
EVENT_RECORD = 48  # sizeof(struct selftest_event) + 8-byte ring header, 8-aligned


@pytest.fixture
def pin_dir() -> Iterator[str]:
    """A fresh bpffs directory, removed (with every pin in it) after the test."""
    ensure_bpffs()
    path = f"{BPFFS}/membrane-test-{uuid.uuid4().hex[:12]}"
    os.makedirs(path)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def selftest() -> Iterator[BpfObject]:
    with BpfObject.open("selftest") as obj:
        obj.load()
        yield obj


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(0.001)


# ---- loading and configuration -----------------------------------------------------------
def test_verifier_rejection_raises_load_error_with_the_verifier_log() -> None:
    with BpfObject.open("selftest_bad") as obj, pytest.raises(LoadError) as info:
        obj.load()
    assert info.value.errno == errno.EACCES
    assert "invalid access to packet" in info.value.log
    assert not obj.loaded


@pytest.mark.parametrize(("verdict", "expected"), [(XDP_PASS, XDP_PASS), (XDP_DROP, XDP_DROP)])
def test_config_global_takes_effect(verdict: int, expected: int) -> None:
    with BpfObject.open("selftest") as obj:
        obj.set_config(verdict=verdict)
        obj.load()
        assert obj.get_config("verdict") == verdict
        assert test_run(obj.program("selftest_xdp"), PACKET).retval == expected


def test_unknown_config_name_names_the_available_ones() -> None:
    with BpfObject.open("selftest") as obj, pytest.raises(KeyError) as info:
        obj.set_config(verdictt=XDP_DROP)
    message = str(info.value)
    assert "verdictt" in message
    for name in ("verdict", "event_magic", "events_per_run"):
        assert name in message


# ---- maps ------------------------------------------------------------------------------
def test_hash_map_with_struct_key_from_btf_keeps_the_padding(selftest: BpfObject) -> None:
    hash_map = selftest.map("hash_map")
    Key = hash_map.key_type
    # struct selftest_key { u32 a; u16 b; /* 2 bytes padding */ u64 c; }
    assert ctypes.sizeof(Key) == 16
    assert (Key.a.offset, Key.b.offset, Key.c.offset) == (0, 4, 8)
    key = Key(a=1, b=2, c=3)
    hash_map.update(key, 42)
    assert hash_map.lookup(Key(a=1, b=2, c=3)) == 42
    # The kernel compares keys bytewise, padding included: dirty padding is another key.
    dirty = bytearray(bytes(key))
    dirty[6] = 0xFF
    assert hash_map.lookup(bytes(dirty)) is None
    [stored] = list(hash_map.keys())
    assert (stored.a, stored.b, stored.c) == (1, 2, 3)


def test_per_cpu_values_one_per_possible_cpu(selftest: BpfObject) -> None:
    counts = selftest.map("percpu_counts")
    test_run(selftest.program("selftest_xdp"), PACKET, repeat=5)
    values = counts.lookup(0)
    assert len(values) == possible_cpus()
    assert sum(values) == 5
    written = [cpu * 10 + 1 for cpu in range(possible_cpus())]
    counts.update(1, written)
    assert counts.lookup(1) == written


def test_lpm_trie_longest_prefix_wins(selftest: BpfObject) -> None:
    lpm = selftest.map("lpm_map")

    def key(cidr: str) -> object:
        net = ipaddress.ip_network(cidr)
        k = lpm.key_type()
        k.prefixlen = net.prefixlen
        k.addr[:] = list(net.network_address.packed)
        return k

    lpm.update(key("198.18.0.0/15"), 1)
    lpm.update(key("198.18.7.0/24"), 2)
    assert lpm.lookup(key("198.18.7.9/32")) == 2
    assert lpm.lookup(key("198.19.1.1/32")) == 1
    assert lpm.lookup(key("198.20.0.1/32")) is None


def test_iterate_and_delete(selftest: BpfObject) -> None:
    hash_map = selftest.map("hash_map")
    Key = hash_map.key_type
    keys = [Key(a=i, b=i, c=i * 1000) for i in range(10)]
    for i, k in enumerate(keys):
        hash_map.update(k, i)
    assert len(hash_map) == 10
    assert {(k.a, k.c, v) for k, v in hash_map.items()} == {(i, i * 1000, i) for i in range(10)}
    assert hash_map.delete(keys[3]) is True
    assert hash_map.delete(keys[3]) is False
    assert hash_map.lookup(keys[3]) is None
    assert sorted(k.a for k in hash_map) == [i for i in range(10) if i != 3]


def test_batch_update_and_lookup(selftest: BpfObject) -> None:
    hash_map = selftest.map("hash_map")
    Key = hash_map.key_type
    pairs = [(Key(a=i, b=i % 7, c=i << 33), i * i) for i in range(300)]
    assert hash_map.update_batch(pairs) == 300
    got = hash_map.lookup_batch(chunk=64)  # several chunks: the resume token is used
    assert sorted((k.a, k.b, k.c, v) for k, v in got) == [
        (i, i % 7, i << 33, i * i) for i in range(300)
    ]


def test_pinned_map_opens_from_its_pin(selftest: BpfObject, pin_dir: str) -> None:
    hash_map = selftest.map("hash_map")
    Key = hash_map.key_type
    hash_map.update(Key(a=7), 7)
    hash_map.pin(f"{pin_dir}/hash_map")
    with Map.from_pin(f"{pin_dir}/hash_map") as again:
        assert again.id == hash_map.id
        [(key, value)] = list(again.items())  # types come from the kernel's copy of BTF
        assert (key.a, value) == (7, 7)
        again.update(Key(a=8), 8)
    assert hash_map.lookup(Key(a=8)) == 8


def test_state_survives_a_reload_through_pinned_maps(pin_dir: str) -> None:
    with BpfObject.open("selftest") as first:
        first.pin_maps(pin_dir)
        first.load()
        Key = first.map("hash_map").key_type
        first.map("hash_map").update(Key(a=9, b=9, c=9), 99)
        test_run(first.program("selftest_xdp"), PACKET, repeat=3)
        map_id = first.map("hash_map").id
    assert os.path.exists(f"{pin_dir}/hash_map")
    with BpfObject.open("selftest") as second:
        second.pin_maps(pin_dir)
        second.load()
        assert second.map("hash_map").id == map_id
        assert second.map("hash_map").lookup(Key(a=9, b=9, c=9)) == 99
        test_run(second.program("selftest_xdp"), PACKET, repeat=2)
        assert sum(second.map("percpu_counts").lookup(0)) == 5


def test_map_reused_from_another_objects_pin_keeps_this_objects_types(pin_dir: str) -> None:
    """sock_lb creates the service maps and nodeport reuses their pins: the kernel's type
    ids of a reused map are sock_lb's, which name other types in nodeport's BTF."""
    names = ["svc_frontends", "svc_backends", "svc_slots"]
    declared = {}
    for name in ("sock_lb", "nodeport"):
        with BpfObject.open(name) as obj:
            for prog in obj.programs.values():
                prog.autoload = False
            obj.pin_maps(pin_dir, names=names)
            obj.load()
            declared[name] = {
                n: (obj.map(n).key_type.__name__, obj.map(n).value_type.__name__) for n in names
            }
            key = obj.map("svc_frontends").key_type(port=80, protocol=6, family=4, scope=1)
            if name == "sock_lb":
                obj.map("svc_frontends").update(key, bytes(obj.map("svc_frontends").value_size))
            else:
                assert obj.map("svc_frontends").lookup(key) is not None
    assert declared["nodeport"] == declared["sock_lb"]
    assert declared["nodeport"]["svc_frontends"][0] == "svc_frontend_key"


# ---- ring buffer -----------------------------------------------------------------------
def selftest_with_events(events_per_run: int, ring_bytes: int | None = None) -> BpfObject:
    obj = BpfObject.open("selftest")
    obj.set_config(events_per_run=events_per_run, event_magic=0xFEED)
    if ring_bytes:
        obj.set_max_entries("events", ring_bytes)
    return obj.load()


def consumer(obj: BpfObject) -> RingBuffer:
    return RingBuffer(
        obj.map("events"), obj.btf.dtype("selftest_event"), lost_map=obj.map("events_lost")
    )


def receive(ring: RingBuffer, count: int) -> np.ndarray:
    """Poll until `count` events arrived (or fail after a deadline)."""
    chunks, received = [], 0
    deadline = time.monotonic() + 10
    while received < count and time.monotonic() < deadline:
        batch = ring.poll()
        chunks.append(batch)
        received += len(batch)
    return np.concatenate(chunks) if chunks else np.empty(0, ring.dtype)


def test_ring_buffer_delivers_every_event_decoded_in_bulk() -> None:
    with selftest_with_events(64) as obj, consumer(obj) as ring:
        test_run(obj.program("selftest_xdp"), PACKET, repeat=50)
        got = receive(ring, 3200)
        assert len(got) == 3200
        assert np.array_equal(np.sort(got["seq"]), np.arange(3200))
        assert (got["magic"] == 0xFEED).all()
        assert (got["tag"] == b"selftest").all()
        assert (got["hdr"]["version"] == 1).all()
        assert ring.lost == 0
        assert len(ring.poll(timeout_ms=1)) == 0


def emit_while_polling(
    obj: BpfObject, ring: RingBuffer, runs: int, timeout_ms: int
) -> tuple[Batch, float]:
    """Run the program `runs` times once this thread sleeps in the ring's epoll
    wait; returns (what that poll returned, seconds it took)."""
    poller = threading.get_native_id()

    def blocked_in_poll() -> bool:
        with open(f"/proc/self/task/{poller}/wchan") as f:
            return f.read() == "do_epoll_wait"

    def produce() -> None:
        wait_for(blocked_in_poll)
        test_run(obj.program("selftest_xdp"), PACKET, repeat=runs)

    producer = threading.Thread(target=produce)
    producer.start()
    start = time.monotonic()
    got = ring.poll(timeout_ms=timeout_ms)
    elapsed = time.monotonic() - start
    producer.join()
    return got, elapsed


def test_ring_buffer_poll_wakes_when_the_backlog_crosses_the_threshold() -> None:
    with selftest_with_events(64) as obj, consumer(obj) as ring:
        threshold = obj.get_config("events_wakeup_bytes")
        got, elapsed = emit_while_polling(obj, ring, runs=6, timeout_ms=60_000)
        assert elapsed < 10  # woken, not timed out
        assert len(got) >= threshold // EVENT_RECORD
        assert len(got) + len(ring.drain()) == 6 * 64


def test_ring_buffer_quiet_events_arrive_when_the_poll_times_out() -> None:
    with selftest_with_events(1) as obj, consumer(obj) as ring:
        got, elapsed = emit_while_polling(obj, ring, runs=1, timeout_ms=200)
        assert len(got) == 1  # below the wakeup threshold: no wakeup, yet delivered
        assert elapsed >= 0.19


def test_ring_buffer_records_that_wrap_around_the_end_arrive_whole() -> None:
    # 4096 is not a multiple of 48: records soon straddle the end of the ring, where
    # only the double mapping of the data area keeps them contiguous.
    with selftest_with_events(64, ring_bytes=4096) as obj, consumer(obj) as ring:
        seqs = []
        for _ in range(20):
            test_run(obj.program("selftest_xdp"), PACKET)  # 64 records of 48 bytes fit
            batch = ring.drain()
            assert len(batch) == 64
            seqs.extend(batch["seq"].tolist())
        assert seqs == list(range(64 * 20))
        assert ring.lost == 0


def test_ring_buffer_counts_what_did_not_fit() -> None:
    emitted = 64 * 10
    with selftest_with_events(64, ring_bytes=4096) as obj:
        test_run(obj.program("selftest_xdp"), PACKET, repeat=10)  # nobody consumes
        with consumer(obj) as ring:
            got = ring.drain()
            assert ring.lost > 0
            assert len(got) + ring.lost == emitted
            assert len(got) == 4096 // EVENT_RECORD
            assert got["seq"].tolist() == list(range(len(got)))


MIXED = 200


def mixed_expectation(i: int) -> str:
    """Mirror of emit_mixed in selftest_trace.bpf.c."""
    if i % 3 == 2:
        return "discarded"
    if i % 5 == 4:
        return "short"
    return "long" if i % 4 == 1 else "normal"


@pytest.fixture
def mixed_events() -> Iterator[BpfObject]:
    with BpfObject.open("selftest_trace") as obj:
        obj.set_config(mixed_count=MIXED)
        obj.load()
        test_run(obj.program("emit_mixed"), PACKET)
        yield obj


def test_ring_buffer_mixed_sizes_and_discards_decode_per_record(mixed_events: BpfObject) -> None:
    kinds = [mixed_expectation(i) for i in range(MIXED)]
    with RingBuffer(mixed_events.map("events"), mixed_events.btf.dtype("selftest_event")) as ring:
        got = ring.drain()
    assert got["seq"].tolist() == [i for i, k in enumerate(kinds) if k in ("normal", "long")]
    assert (got["magic"] == 0x5E1F).all()
    assert ring.malformed == kinds.count("short")


def test_ring_buffer_without_dtype_returns_raw_records(mixed_events: BpfObject) -> None:
    sizes = {"short": 8, "normal": 40, "long": 48}
    kinds = [mixed_expectation(i) for i in range(MIXED)]
    with RingBuffer(mixed_events.map("events")) as ring:
        got = ring.drain()
    assert [len(r) for r in got] == [sizes[k] for k in kinds if k != "discarded"]
    kept = [i for i, k in enumerate(kinds) if k != "discarded"]
    assert [int.from_bytes(r[16:24] if len(r) > 8 else r[:8], "little") for r in got] == kept


# ---- links -----------------------------------------------------------------------------
@pytest.fixture
def tracer() -> Iterator[BpfObject]:
    with BpfObject.open("selftest_trace") as obj:
        obj.set_config(target_tid=threading.get_native_id())
        obj.load()
        yield obj


def counts(obj: BpfObject) -> ctypes.Structure:
    return obj.map("counts").lookup(0)


def getpid_calls(n: int) -> None:
    for _ in range(n):
        os.getpid()


def test_tracepoint_counts_this_threads_getpid_until_detached(tracer: BpfObject) -> None:
    link = attach_tracepoint(tracer.program("count_getpid"), "syscalls", "sys_enter_getpid")
    try:
        before = counts(tracer).getpid
        getpid_calls(25)
        assert counts(tracer).getpid - before == 25
    finally:
        link.detach()
    after = counts(tracer).getpid
    getpid_calls(25)
    assert counts(tracer).getpid == after


def test_pinned_link_outlives_its_handle_and_detaches_from_the_pin(
    tracer: BpfObject, pin_dir: str
) -> None:
    path = f"{pin_dir}/getpid_link"
    link = attach_tracepoint(tracer.program("count_getpid"), "syscalls", "sys_enter_getpid")
    link.pin(path)
    link.close()
    before = counts(tracer).getpid
    getpid_calls(10)
    assert counts(tracer).getpid - before == 10  # the pin keeps it attached

    Link.from_pin(path).detach()
    assert not os.path.exists(path)
    after = counts(tracer).getpid
    getpid_calls(10)
    assert counts(tracer).getpid == after


def test_uprobe_on_a_libc_function(tracer: BpfObject) -> None:
    link = attach_uprobe(tracer.program("count_uprobe"), libc_path(), "getppid")
    try:
        before = counts(tracer).uprobe
        for _ in range(15):
            os.getppid()
        assert counts(tracer).uprobe - before == 15
    finally:
        link.detach()
    after = counts(tracer).uprobe
    os.getppid()
    assert counts(tracer).uprobe == after


def burn_cpu(until: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not until():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met while burning CPU")
        sum(range(10_000))


def test_perf_event_samples_this_thread_with_stack_ids(tracer: BpfObject) -> None:
    # cpu-clock of this thread only, one sample per 100 µs of its CPU time
    fd = open_perf_event(cpu=-1, pid=threading.get_native_id(), period=100_000)
    try:
        link = attach_perf_event(tracer.program("count_sample"), fd)  # now owns fd
    except BaseException:
        os.close(fd)
        raise
    try:
        burn_cpu(until=lambda: counts(tracer).samples >= 20)
        assert counts(tracer).stacks > 0
    finally:
        link.detach()
    after = counts(tracer).samples
    start = time.thread_time()
    burn_cpu(until=lambda: time.thread_time() - start > 0.1)  # ~1000 sample periods
    assert counts(tracer).samples == after


CONNECT_FROM_CGROUP = """
import os, socket, sys
with open(os.path.join(sys.argv[1], "cgroup.procs"), "w") as f:
    f.write(str(os.getpid()))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    s.connect(("127.0.0.1", 9))
    print("ok")
except PermissionError:
    print("EPERM")
"""


def connect_from(cgroup: Path) -> str:
    """connect() a UDP socket from a child process placed in `cgroup`."""
    done = subprocess.run(
        [sys.executable, "-S", "-c", CONNECT_FROM_CGROUP, str(cgroup)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout.strip()


def test_cgroup_connect4_link_update_swaps_the_program(tracer: BpfObject) -> None:
    with temporary_cgroup("membrane-test") as cgroup:
        link = attach_cgroup(tracer.program("connect_allow"), str(cgroup), BPF_CGROUP_INET4_CONNECT)
        try:
            assert connect_from(cgroup) == "ok"
            assert (counts(tracer).connect_a, counts(tracer).connect_b) == (1, 0)
            link.update(tracer.program("connect_deny"))
            assert connect_from(cgroup) == "EPERM"
            assert (counts(tracer).connect_a, counts(tracer).connect_b) == (1, 1)
        finally:
            link.detach()
        assert connect_from(cgroup) == "ok"
        assert (counts(tracer).connect_a, counts(tracer).connect_b) == (1, 1)
