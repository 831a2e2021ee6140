"""ctypes binding of native/ringdrain.c: a ring buffer of fixed-size records drained by a
native thread that never takes the GIL, into a staging ring the Python reader takes batches
from. The kernel's ring is then emptied as the producers wake us, whatever the interpreter
is busy with; what the reader cannot keep up with is dropped, and counted, in our memory
(Hubble calls that stage the observer's events queue), never in the datapath's ring."""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from membrane.bpf.ringbuf import RingBuffer
from membrane.errors import UserError

_LIBRARY = Path(__file__).with_name("libringdrain.so")
_lib: ctypes.CDLL | None = None


def _load() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        if not _LIBRARY.exists():
            raise UserError("", f"{_LIBRARY.name} is not built: run `make bpf` (or `make native`)")
        lib = ctypes.CDLL(str(_LIBRARY), use_errno=True)  # calls release the GIL
        u64, vp, i32 = ctypes.c_uint64, ctypes.c_void_p, ctypes.c_int
        lib.mb_drain_start.argtypes = [
            *(vp, u64, vp, vp, i32, i32, i32, u64, ctypes.c_uint32, u64, vp)
        ]
        lib.mb_drain_start.restype = vp
        lib.mb_drain_take.argtypes = [vp, vp, u64]
        lib.mb_drain_take.restype = u64
        lib.mb_drain_stop.argtypes = [vp]
        lib.mb_drain_stop.restype = None
        _lib = lib
    return _lib


_HEAD, _TAIL, _COUNTERS = 0, 1, 5  # native/ringdrain.c: MB_HEAD, MB_TAIL, MB_DRAIN_COUNTERS


@dataclass(frozen=True)
class DrainCounts:
    staged: int  # records ever staged
    dropped: int  # records the staging ring had no room for (the reader fell behind)
    short: int  # records shorter than a row (another layout)
    waiting: int  # staged, not yet taken
    priority: int  # the thread's: 2 real-time (SCHED_FIFO), 1 nice -20, 0 ordinary


class RingDrain:
    """Drains `ring` (records of at least `dtype.itemsize` bytes; the first that many are
    kept) into a staging ring of `capacity` rows (a power of two). The producers wake the
    thread when their backlog crosses `wakeup_bytes` (their events_wakeup_bytes: a larger
    value here would leave a backlog past it waiting); a record below it waits at most
    `timeout_ms`."""

    def __init__(
        self,
        ring: RingBuffer,
        dtype: np.dtype,
        capacity: int,
        timeout_ms: int,
        wakeup_bytes: int,
    ) -> None:
        self.dtype = dtype
        self._lib = _load()
        # The thread's counters (native/ringdrain.c MB_*), read here without a call (a call
        # gives the GIL away and waits to get it back).
        self._counters = np.zeros(_COUNTERS, dtype=np.uint64)
        self._epoll = select.epoll()
        self.notify_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        layout = ring.layout()
        # Edge-triggered: the thread sleeps until the producers' next wakeup (level would
        # report the ring readable while any record is in it, a busy loop of small drains).
        self._epoll.register(layout.fd, select.EPOLLIN | select.EPOLLET)
        self._stopping = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)  # ends its wait
        self._epoll.register(self._stopping, select.EPOLLIN)
        self._handle = self._lib.mb_drain_start(
            layout.data,
            layout.mask,
            layout.consumer,
            layout.producer,
            self._epoll.fileno(),
            self.notify_fd,
            timeout_ms,
            wakeup_bytes,
            dtype.itemsize,
            capacity,
            self._counters.ctypes.data,
        )
        if not self._handle:
            err = ctypes.get_errno()
            self._close_fds()
            raise OSError(err, f"ring drain thread: {os.strerror(err)}")

    def take(self, limit: int | None = None) -> np.ndarray:
        """Staged rows, oldest first (at most `limit`); empty if none."""
        waiting = self.waiting
        if not waiting:
            return np.empty(0, dtype=self.dtype)
        out = np.empty(waiting if limit is None else min(waiting, limit), dtype=self.dtype)
        n = self._lib.mb_drain_take(self._handle, out.ctypes.data, len(out))
        return out[:n]

    @property
    def waiting(self) -> int:
        """Rows staged, not yet taken."""
        return int(self._counters[_HEAD]) - int(self._counters[_TAIL])

    def wait(self, timeout_s: float) -> None:
        """Until the thread staged rows since the last wait (or `timeout_s` passes)."""
        ready, _, _ = select.select([self.notify_fd], [], [], timeout_s)
        if ready:
            with contextlib.suppress(BlockingIOError):  # another wait read it
                os.eventfd_read(self.notify_fd)

    def wake(self) -> None:
        """Ends a wait() now (a reader that is stopping)."""
        os.eventfd_write(self.notify_fd, 1)

    def counts(self) -> DrainCounts:
        head, tail, dropped, short, priority = (int(v) for v in self._counters)
        return DrainCounts(head, dropped, short, head - tail, priority)

    def close(self) -> None:
        """Ends the thread; rows taken earlier stay valid."""
        if self._handle:
            os.eventfd_write(self._stopping, 1)
            self._lib.mb_drain_stop(self._handle)
            self._handle = None
            self._close_fds()

    def _close_fds(self) -> None:
        self._epoll.close()
        os.close(self.notify_fd)
        os.close(self._stopping)
