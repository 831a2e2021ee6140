"""One run of a trace tool: load its object with the common filters, attach every program,
deliver events and interval ticks until the duration ends or Ctrl-C, then report losses."""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from membrane.bpf import AttachError, BpfObject, LoadError, Map
from membrane.bpf.fs import ensure_tracefs
from membrane.bpf.links import Link, attach_auto
from membrane.bpf.probe import missing_capabilities
from membrane.bpf.ringbuf import BATCH_FILL, Records, RingBuffer
from membrane.errors import NotPermitted, UserError
from membrane.trace.batch import EventBatch, EventLayout
from membrane.trace.cells import Cells
from membrane.trace.options import TraceOptions
from membrane.trace.output import Column, Printer

_POLL_MS = 100
READY_LINE = "Tracing... Hit Ctrl-C to end."
_NEEDED_CAPS = ("CAP_BPF", "CAP_PERFMON", "CAP_SYS_ADMIN")


def require_privileges() -> None:
    missing = missing_capabilities(_NEEDED_CAPS)
    if missing:
        raise NotPermitted(
            "", f"tracing needs root ({', '.join(missing)} missing) to load and attach BPF programs"
        )


class TraceSession:
    """Context manager around a loaded tool object and its links."""

    def __init__(
        self,
        obj_name: str,
        opts: TraceOptions,
        config: dict[str, Any] | None = None,
        map_sizes: dict[str, int] | None = None,
        attach: bool = True,
        programs: Callable[[str], bool] | None = None,
        unused_maps: Sequence[str] = (),
    ) -> None:
        require_privileges()
        ensure_tracefs()
        self.opts = opts
        self.links: list[Link] = []
        self._stack = contextlib.ExitStack()
        self.obj = self._stack.enter_context(BpfObject.open(obj_name))
        try:
            self.obj.set_config(**opts.bpf_config(), **(config or {}))
            for name, size in (map_sizes or {}).items():
                self.obj.set_max_entries(name, size)
            for name in unused_maps:  # used only by programs that do not load here
                self.obj.set_autocreate(name, False)
            for name, prog in self.obj.programs.items():
                if programs is not None and not programs(name):
                    prog.autoload = False  # e.g. a tracepoint this kernel does not have
            self.obj.load()
        except LoadError as err:
            self.close()
            raise UserError(
                "", f"the kernel refused {obj_name}: {_first_line(err.log)}; see `membrane probe`"
            ) from None
        if attach:
            for prog in self.obj.programs.values():
                if prog.autoload:
                    self.attach(lambda p=prog: attach_auto(p))

    def attach(self, make_link: Callable[[], Link]) -> Link:
        try:
            link = make_link()
        except AttachError as err:
            self.close()
            raise UserError("", f"cannot attach: {err}; see `membrane probe`") from None
        self.links.append(link)
        return link

    def __enter__(self) -> TraceSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def detach(self) -> None:
        """Stop the programs but keep the object and its maps: a tool that aggregates in
        maps reads them after this, so nothing changes between its reads."""
        for link in reversed(self.links):
            link.close()  # unpinned: closing the last fd detaches
        self.links.clear()

    def close(self) -> None:
        self.detach()
        self._stack.close()

    def map(self, name: str) -> Map:
        return self.obj.map(name)

    def ring(self, struct: str | None) -> RingBuffer:
        """The object's `events` ring buffer, decoding records as `struct`; without one,
        it returns records of any length together (ringbuf.Records)."""
        ring = RingBuffer(
            self.map("events"),
            dtype=None if struct is None else self.obj.btf.dtype(struct),
            lost_map=self.map("events_lost"),
            variable=struct is None,
        )
        self._stack.callback(ring.close)
        return ring

    def run(
        self,
        ring: RingBuffer | None = None,
        on_events: Callable[[np.ndarray], None] | None = None,
        interval: float | None = None,
        on_interval: Callable[[], None] | None = None,
    ) -> float:
        """Deliver events (and interval ticks) until --duration or Ctrl-C/SIGTERM.
        Returns the seconds traced."""
        start = time.monotonic()
        end = start + self.opts.duration if self.opts.duration else None
        next_tick = start + interval if interval else None
        with _stop_signals() as stopped:
            # Programs are attached by now: say so (people and tests wait for this line).
            print(READY_LINE, file=sys.stderr, flush=True)
            while not stopped():
                now = time.monotonic()
                if end is not None and now >= end:
                    break
                wait = min(
                    t - now for t in (end, next_tick, now + _POLL_MS / 1000) if t is not None
                )
                if ring is not None:
                    batch = ring.poll(max(int(wait * 1000), 0))
                    if on_events is not None and len(batch):
                        on_events(batch)
                else:
                    time.sleep(max(wait, 0))
                if next_tick is not None and time.monotonic() >= next_tick:
                    next_tick += interval  # type: ignore[operator]
                    if on_interval is not None:
                        on_interval()
            if ring is not None and on_events is not None:
                batch = ring.drain()  # what arrived before the stop is still reported
                if len(batch):
                    on_events(batch)
        return time.monotonic() - start


@contextlib.contextmanager
def _stop_signals() -> Iterator[Callable[[], bool]]:
    """Ctrl-C (SIGINT) and SIGTERM end a trace with its summary. They only set a flag that
    the loop checks between polls (at most _POLL_MS apart): a KeyboardInterrupt raised
    wherever the signal lands could cut a callback short, and lose a batch decoded but not
    printed or counts taken out of a map but not reported. A second one interrupts at once
    (output blocked on a full pipe). A SIGINT that was ignored when we started (a
    background job of a shell) stays ignored."""
    stopped = False

    def handler(signum: int, frame: object) -> None:
        nonlocal stopped
        if stopped:
            raise KeyboardInterrupt
        stopped = True

    signals = [signal.SIGTERM]
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signals.append(signal.SIGINT)
    previous = {signum: signal.signal(signum, handler) for signum in signals}
    try:
        yield lambda: stopped
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def _first_line(log: str) -> str:
    lines = [line for line in log.splitlines() if line.strip()]
    return lines[-1] if lines else "no reason given"


def stream_events(
    obj_name: str,
    struct: str,
    opts: TraceOptions,
    columns: Sequence[Column],
    decode: Callable[..., Any],
    *,
    timestamps: bool,
    ring_bytes: int,
    keep: Callable[[EventBatch], np.ndarray] | None = None,
    config: dict[str, Any] | None = None,
    map_sizes: dict[str, int] | None = None,
    tail: str | None = None,
    tail_len: str | None = None,
    programs: Callable[[str], bool] | None = None,
    unused_maps: Sequence[str] = (),
) -> None:
    """The whole run of a tool that prints one line per event (open, exec, connect, ...).

    Records may end in a variable-length `tail` field (its used length in `tail_len`).
    The ring holds `ring_bytes` unless --buffer-size says otherwise. `decode(batch,
    times=...)` turns an EventBatch into cells (a dict of trace.cells.Cells: the native
    formatter lays the rows out, nothing runs per event), columns (a dict of lists) or
    records (a list of dicts); `keep(batch)` optionally selects rows first. `programs`
    chooses which of the object's programs load (default: all), `unused_maps` names maps
    that only the others use (not created). The run ends with the
    summary line: events shown, events lost, seconds."""
    printer = Printer(columns, opts.output)
    ring_size = opts.buffer_size or ring_bytes
    sizes = {**(map_sizes or {}), "events": ring_size}
    # Woken when the ring is 1/BATCH_FILL full, not every 16 KiB: large batches. Events
    # are timed only when a time is printed (a clock read per event costs).
    config = {
        "events_wakeup_bytes": ring_size // BATCH_FILL,
        "events_timestamps": timestamps or printer.json,
        **(config or {}),
    }
    with TraceSession(
        obj_name, opts, config=config, map_sizes=sizes, programs=programs, unused_maps=unused_maps
    ) as session:
        layout = EventLayout.of(session.obj.btf.dtype(struct), tail, tail_len)
        ring = session.ring(None)
        printer.header()

        def show(records: Records) -> None:
            batch, _ = EventBatch.decode(layout, records)
            if keep is not None:
                batch = batch.select(keep(batch))
            decoded = decode(batch, times=timestamps or printer.json)
            if isinstance(decoded, dict) and isinstance(next(iter(decoded.values())), Cells):
                printer.write_cells(decoded, len(batch))
            elif isinstance(decoded, dict):
                printer.write_columns(decoded)
            else:
                printer.records(decoded)
            printer.flush()

        seconds = session.run(ring, show)
        printer.summary(events=printer.count, lost=ring.lost, seconds=round(seconds, 3))
