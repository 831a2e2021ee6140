"""native/ringdrain.c: a real BPF ring (the selftest program's, filled with BPF_PROG_TEST_RUN)
emptied by the native thread while Python takes nothing, every event staged in order and
the kernel's ring never full; a staging ring that is full drops and counts exactly; a quiet
event (below the producers' wakeup threshold) arrives within the timeout."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest

from membrane.bpf import BpfObject, test_run
from membrane.bpf.ringbuf import RingBuffer
from membrane.native.ringdrain import RingDrain
from membrane.testing.waiting import wait_for

pytestmark = pytest.mark.root

PACKET = bytes(64)
RING_BYTES = 1 << 16  # ~1,300 selftest records (48 bytes each with the ring's header)
PER_RUN = 64  # events a selftest run emits (its most)
WAKEUP = 16384  # the selftest's events_wakeup_bytes (bpf/lib/events.h)


@pytest.fixture
def ring() -> Iterator[tuple[BpfObject, RingBuffer]]:
    obj = BpfObject.open("selftest")
    obj.set_config(events_per_run=PER_RUN, event_magic=0xFEED)
    obj.set_max_entries("events", RING_BYTES)
    obj.load()
    try:
        with RingBuffer(
            obj.map("events"), obj.btf.dtype("selftest_event"), lost_map=obj.map("events_lost")
        ) as r:
            yield obj, r
    finally:
        obj.close()


def produce(obj: BpfObject, drain: RingDrain, runs: int) -> None:
    """`runs` runs of PER_RUN events each, each run once the thread staged the last (so
    the kernel's ring, a few runs deep, is never what limits)."""
    for _ in range(runs):
        before = drain.counts()
        test_run(obj.program("selftest_xdp"), PACKET, repeat=1)
        wait_for(
            "the thread to stage the run",
            lambda b=before: (
                (c := drain.counts()).staged + c.dropped >= b.staged + b.dropped + PER_RUN
            ),
            interval=0.001,
        )


def test_the_thread_empties_the_ring_while_python_takes_nothing(
    ring: tuple[BpfObject, RingBuffer],
) -> None:
    obj, r = ring
    drain = RingDrain(r, r.dtype, capacity=1 << 16, timeout_ms=2, wakeup_bytes=WAKEUP)
    try:
        produce(obj, drain, 150)  # 9,600 events: ~7 rings' worth, nothing taken meanwhile
        counts = drain.counts()
        assert (counts.staged, counts.dropped, counts.waiting, r.lost) == (9600, 0, 9600, 0)
        first, rest = drain.take(4_000), drain.take()
        got = np.concatenate([first, rest])
        assert np.array_equal(got["seq"], np.arange(9600))  # every one, in order
        assert (got["magic"] == 0xFEED).all()
        assert drain.counts().waiting == 0 and len(drain.take()) == 0
    finally:
        drain.close()


def test_a_full_staging_ring_drops_and_counts_exactly(ring: tuple[BpfObject, RingBuffer]) -> None:
    obj, r = ring
    drain = RingDrain(r, r.dtype, capacity=1024, timeout_ms=2, wakeup_bytes=WAKEUP)
    try:
        produce(obj, drain, 50)  # 3,200 events into 1,024 rows
        counts = drain.counts()
        assert (counts.staged, counts.dropped, r.lost) == (1024, 3200 - 1024, 0)
        assert np.array_equal(drain.take()["seq"], np.arange(1024))  # the oldest were kept
        produce(obj, drain, 1)  # room again
        assert np.array_equal(drain.take()["seq"], np.arange(3200, 3200 + PER_RUN))
    finally:
        drain.close()


def test_a_quiet_event_arrives_within_the_timeout(ring: tuple[BpfObject, RingBuffer]) -> None:
    obj = BpfObject.open("selftest")
    obj.set_config(events_per_run=1, event_magic=0xFEED)
    obj.load()
    try:
        with RingBuffer(obj.map("events"), obj.btf.dtype("selftest_event")) as quiet:
            drain = RingDrain(quiet, quiet.dtype, capacity=64, timeout_ms=50, wakeup_bytes=WAKEUP)
            try:
                started = time.monotonic()
                test_run(obj.program("selftest_xdp"), PACKET, repeat=1)  # 48 bytes: no wakeup
                drain.wait(5)
                got = drain.take()
                assert len(got) == 1 and time.monotonic() - started < 1
            finally:
                drain.close()
    finally:
        obj.close()


def test_closing_ends_the_thread_at_once(ring: tuple[BpfObject, RingBuffer]) -> None:
    _, r = ring
    drain = RingDrain(r, r.dtype, capacity=64, timeout_ms=10_000, wakeup_bytes=WAKEUP)
    closing = time.monotonic()
    drain.close()
    assert time.monotonic() - closing < 2  # not after its 10 s wait
