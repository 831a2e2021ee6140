"""BPF ring buffer consumer that decodes whole batches at once.

libbpf's `ring_buffer__poll` calls back into Python once per record, which tops out near
1 M events/s. Here the ring is mmap'ed directly and every run of equally sized records is
turned into a numpy structured array with one memcpy, so the per-event cost is a share of
that copy instead of a Python call.

Kernel layout (kernel/bpf/ringbuf.c): the consumer position lives on a page we may write
(offset 0); the producer position page and the data area follow at offset `pagesize`,
read-only. The data area is mapped twice in a row, so a record that wraps around the end
of the ring is still contiguous in our mapping. Each record starts with an 8-byte header
whose first word is the length plus the BUSY (not yet committed) and DISCARD bits;
records are 8-byte aligned.

Records of varying length (a path as long as it is) cannot be cut into a strided array: with
`variable=True`, `poll`/`drain` return `Records` instead, the consumed bytes in one copy and
where each record is in them, found by the compiled scanner in native/eventfmt.c.
"""

from __future__ import annotations

import ctypes
import mmap
import select
import time
from dataclasses import dataclass

import numpy as np

from membrane.bpf.errors import BpfError
from membrane.bpf.maps import RINGBUF, Map
from membrane.native import eventfmt

BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
HEADER_SIZE = 8
DEFAULT_POLL_MS = 50
_FIRST_WINDOW = 512  # headers compared before assuming a long run of one record size
_MAX_RECORDS = 1 << 16  # per drain of a variable-length ring: a batch stays in cache
_BATCH_MAX_WAIT_S = 0.1  # the longest a record waits in a busy ring (a quiet one: the poll)
BATCH_FILL = 8  # a busy ring is drained when about 1/BATCH_FILL of it is full


@dataclass
class Records:
    """Records of varying length, consumed together: record i is
    block[offsets[i] : offsets[i] + lengths[i]]."""

    block: np.ndarray  # uint8, a copy of the consumed part of the ring
    offsets: np.ndarray  # uint32
    lengths: np.ndarray  # uint32

    def __len__(self) -> int:
        return len(self.offsets)


@dataclass(frozen=True)
class RingLayout:
    """A mapped ring's addresses (RingBuffer.layout)."""

    fd: int  # the ring map's fd (for epoll)
    data: int  # the data area, mapped twice in a row
    mask: int  # its size - 1
    consumer: int  # the consumer position (u64, ours to write)
    producer: int  # the producer position (u64)


# Decoded records: a structured array with a dtype, the raw records without one.
Batch = np.ndarray | list[bytes] | Records


def _record_stride(length: int) -> int:
    return (length + HEADER_SIZE + 7) & ~7


class RingBuffer:
    """Consume a BPF_MAP_TYPE_RINGBUF map.

    With `dtype`, `poll`/`drain` return a structured array with one row per record (the
    first `dtype.itemsize` bytes of each; shorter records are counted in `malformed` and
    skipped). Without it they return the raw records as a list of bytes.

    The producers in bpf/lib/events.h wake us only when the backlog crosses a threshold
    (for a variable-length ring: set it to size / BATCH_FILL), so `poll` also returns
    after `timeout_ms` with whatever arrived below it: the timeout is the delivery latency
    of a quiet stream.
    """

    def __init__(
        self,
        ring: Map,
        dtype: np.dtype | None = None,
        lost_map: Map | None = None,
        variable: bool = False,
    ) -> None:
        if ring.type != RINGBUF:
            raise BpfError(f"map {ring.name} is not a ring buffer (type {ring.type})")
        self.name = ring.name
        self._fd = ring.fd
        self.dtype = dtype
        self.variable = variable
        self._last_drain = 0
        self._last_drain_at = 0.0
        self._fill_rate = 0.0  # bytes/s the producers wrote between the last two drains
        self.malformed = 0
        self._lost_map = lost_map
        self._size = ring.max_entries
        self._mask = self._size - 1
        page = mmap.PAGESIZE
        self._data_offset = page
        self._consumer_map = mmap.mmap(
            ring.fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0
        )
        try:
            self._producer_map = mmap.mmap(
                ring.fd, page + 2 * self._size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page
            )
        except OSError:
            self._consumer_map.close()
            raise
        # Aligned 8-byte words: each read or write below is a single load or store.
        self._consumer_pos = ctypes.c_uint64.from_buffer(self._consumer_map)
        self._producer_pos = np.frombuffer(self._producer_map, dtype=np.uint64, count=1)
        self._data = np.frombuffer(self._producer_map, dtype=np.uint8)
        self._epoll = select.epoll()
        # A variable-length ring's producers wake us when it is 1/BATCH_FILL full (their
        # events_wakeup_bytes): edge-triggered, a wait ends at that wakeup, not as soon as
        # the ring holds anything.
        self._epoll.register(ring.fd, select.EPOLLIN | (select.EPOLLET if variable else 0))

    def layout(self) -> RingLayout:
        """Where the mapped ring is, for a consumer in native code (native/ringdrain.c);
        valid until close()."""
        return RingLayout(
            fd=self._fd,
            data=self._data.ctypes.data + self._data_offset,
            mask=self._mask,
            consumer=ctypes.addressof(self._consumer_pos),
            producer=self._producer_pos.ctypes.data,
        )

    # ---- lifecycle -------------------------------------------------------------------
    def close(self) -> None:
        """Unmap the ring. Arrays returned earlier stay valid: they are copies."""
        if self._epoll.closed:
            return
        self._epoll.close()
        # Views into the mappings must be gone before the mappings can close.
        del self._consumer_pos, self._producer_pos, self._data
        self._consumer_map.close()
        self._producer_map.close()

    def __enter__(self) -> RingBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- consuming -------------------------------------------------------------------
    @property
    def lost(self) -> int:
        """Records the producers could not write because the ring was full (all CPUs)."""
        if self._lost_map is None:
            raise BpfError(f"ring buffer {self.name}: no lost-event counter map was given")
        return int(sum(self._lost_map.lookup(0)))

    def poll(self, timeout_ms: int = DEFAULT_POLL_MS) -> Batch:
        """Return what is in the ring now, or wait up to `timeout_ms` for a wakeup."""
        if self.variable and 0 < self._last_drain < _MAX_RECORDS and self._fill_rate:
            # A busy stream that the consumer outpaces: wait until about 1/BATCH_FILL of
            # the ring is full (the producers' wakeup, or the time that takes at the last
            # rate; at most _BATCH_MAX_WAIT_S), so that each drain is a large batch. Every
            # drain has a fixed cost, and the consumer's CPU time slows the producer down
            # even on another CPU (bench/RESULTS.md, trace_open).
            wait = self._size / BATCH_FILL / self._fill_rate
            self._epoll.poll(min(wait, _BATCH_MAX_WAIT_S, timeout_ms / 1000))
        batch = self.drain()
        if len(batch) or timeout_ms == 0:
            return batch
        self._epoll.poll(timeout_ms / 1000)
        return self.drain()

    def drain(self) -> Batch:
        """Consume every committed record up to the producer position seen on entry;
        never blocks. At most one ring's worth of records is returned per call."""
        if self.variable:
            return self._drain_records()
        consumer = self._consumer_pos.value
        producer = int(self._producer_pos[0])
        chunks: list[Batch] = []
        while consumer < producer:
            header_at = self._data_offset + (consumer & self._mask)
            length = int(self._data[header_at : header_at + 4].view(np.uint32)[0])
            if length & BUSY_BIT:
                break  # not committed yet; later records wait behind it
            stride = _record_stride(length & ~DISCARD_BIT)
            if length & DISCARD_BIT:
                consumer += stride
                continue
            count = self._uniform_run(header_at, length, stride, (producer - consumer) // stride)
            chunks.append(self._decode(header_at + HEADER_SIZE, length, stride, count))
            consumer += count * stride
        # Everything is copied out of the ring: hand the space back to the producers.
        self._consumer_pos.value = consumer
        return self._join(chunks)

    def _drain_records(self) -> Records:
        consumer = self._consumer_pos.value
        producer = int(self._producer_pos[0])
        scan = eventfmt.ring_scan(
            self._data.ctypes.data + self._data_offset,
            self._mask,
            consumer,
            producer,
            _MAX_RECORDS,
        )
        # The data area is mapped twice in a row: the consumed span is contiguous.
        start = self._data_offset + (consumer & self._mask)
        block = self._data[start : start + (scan.end - consumer)].copy()
        self._consumer_pos.value = scan.end
        now = time.monotonic()
        if self._last_drain_at:
            self._fill_rate = (scan.end - consumer) / max(now - self._last_drain_at, 1e-6)
        self._last_drain_at = now
        self._last_drain = len(scan.offsets)
        return Records(block, scan.offsets, scan.lengths)

    def _headers(self, header_at: int, stride: int, count: int) -> np.ndarray:
        return np.ndarray(
            (count,), dtype=np.uint32, buffer=self._data, offset=header_at, strides=(stride,)
        )

    def _uniform_run(self, header_at: int, length: int, stride: int, limit: int) -> int:
        """How many records from `header_at` on are committed and exactly `length` long.
        Each matching header proves where the next one is, so the first mismatch ends
        the run (a different size, a discarded record or one still being written).
        Windows double, so finding a run of k records compares O(k) headers."""
        checked, window = 0, _FIRST_WINDOW
        while checked < limit:
            window = min(window, limit)
            headers = self._headers(header_at + checked * stride, stride, window - checked)
            mismatch = headers != length
            first = int(mismatch.argmax())
            if mismatch[first]:
                return checked + first
            checked, window = window, window * 2
        return limit

    def _decode(self, data_at: int, length: int, stride: int, count: int) -> Batch:
        if self.dtype is None:
            raw = self._producer_map
            return [
                raw[at : at + length] for at in range(data_at, data_at + count * stride, stride)
            ]
        if length < self.dtype.itemsize:
            self.malformed += count
            return np.empty(0, dtype=self.dtype)
        # One memcpy of the whole run (headers and padding included), then a strided view
        # of that copy: copying through the structured dtype goes field by field and cost
        # 3-5x more per record (94 against 20-29 ns for 328-byte records).
        block = self._data[data_at - HEADER_SIZE : data_at - HEADER_SIZE + count * stride].copy()
        return np.ndarray(
            (count,), dtype=self.dtype, buffer=block, offset=HEADER_SIZE, strides=(stride,)
        )

    def _join(self, chunks: list[Batch]) -> Batch:
        if self.dtype is None:
            return [record for chunk in chunks for record in chunk]
        if not chunks:
            return np.empty(0, dtype=self.dtype)
        return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)
