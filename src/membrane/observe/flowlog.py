"""Flow logs: the agent's flows written to a file, one observer.GetFlowsResponse per line in
protobuf JSON (what `hubble observe -o json` prints), as Hubble's exporter does
(`--hubble-export-file-path`): rotated by size, kept to a number of backups, and chosen by
an allowlist and a denylist of FlowFilters in the JSON Hubble's exporter takes.

Lines are written on a thread of the log's own, never on the event loop or the reader's
thread: `submit` only queues a batch (a store Segment: the flow reader's rows become flows
there, on the log's thread, as it iterates them). A log that cannot keep up loses batches,
counts them and says so in the file (a lost_events line, source OBSERVER_EVENTS_QUEUE).
The log's tail refills the agent's flow store when it starts, so recent flows survive a
restart.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
from collections.abc import Iterable
from dataclasses import dataclass

from google.protobuf import json_format

from membrane.errors import UserError
from membrane.hubble.flow import flow_pb2
from membrane.hubble.json_codec import decode, encode
from membrane.hubble.observer import observer_pb2
from membrane.json_objects import concatenated_objects
from membrane.observe.record import lost_response
from membrane.observe.store import Matcher, Segment, build_matcher
from membrane.rotating_file import RotatingFile, backups, export_limits

log = logging.getLogger("membrane.agent")
Item = observer_pb2.GetFlowsResponse
DEFAULT_MAX_SIZE_MB = 10  # Hubble's --hubble-export-file-max-size-mb
DEFAULT_MAX_BACKUPS = 5  # Hubble's --hubble-export-file-max-backups
QUEUE_BATCHES = 4096  # batches waiting for the writer before new ones are dropped
Batch = Segment | list[Item]
_TAIL_BLOCK = 1 << 16


@dataclass(frozen=True)
class FlowLogSettings:
    """`--flow-log*` options, checked."""

    path: str
    max_size_mb: int = DEFAULT_MAX_SIZE_MB
    max_backups: int = DEFAULT_MAX_BACKUPS
    allowlist: tuple[flow_pb2.FlowFilter, ...] = ()
    denylist: tuple[flow_pb2.FlowFilter, ...] = ()

    @property
    def max_bytes(self) -> int:
        return self.max_size_mb << 20


def parse_filters(text: str, option: str) -> tuple[flow_pb2.FlowFilter, ...]:
    """FlowFilters from JSON with proto field names: a list of objects, or objects one
    after another (Hubble's exporter form, `{"source_pod":["a/"]}{"verdict":["DROPPED"]}`,
    commas between them allowed)."""
    text = text.strip()
    if not text:
        return ()
    try:
        value = json.loads(text)
        objects = value if isinstance(value, list) else [value]
    except json.JSONDecodeError:
        objects = concatenated_objects(text, option)
    filters = []
    for i, obj in enumerate(objects):
        if not isinstance(obj, dict):
            raise UserError(option, f"item {i} is not a FlowFilter object: {json.dumps(obj)}")
        try:
            filters.append(json_format.ParseDict(obj, flow_pb2.FlowFilter()))
        except json_format.ParseError as err:
            raise UserError(option, f"item {i} is not a FlowFilter: {err}") from None
    return tuple(filters)


def make_settings(
    path: str,
    max_size_mb: int | str = DEFAULT_MAX_SIZE_MB,
    max_backups: int | str = DEFAULT_MAX_BACKUPS,
    allowlist: str = "",
    denylist: str = "",
) -> FlowLogSettings | None:
    """The settings of `--flow-log PATH` and its companions (None: no flow log). Filters
    are also built once, so a value the matcher refuses fails here, naming the flag."""
    allow = parse_filters(allowlist, "flow-log-allowlist")
    deny = parse_filters(denylist, "flow-log-denylist")
    limits = export_limits(path, "flow-log", "flow-log", max_size_mb, max_backups, allow, deny)
    if limits is None:
        return None
    size, backups = limits
    settings = FlowLogSettings(path, size, backups, allow, deny)
    settings_matcher(settings)
    return settings


def settings_matcher(settings: FlowLogSettings) -> Matcher | None:
    """The allow/deny filters as one matcher (None: every flow)."""
    if not settings.allowlist and not settings.denylist:
        return None
    try:
        return build_matcher(settings.allowlist, settings.denylist, ("allowlist", "denylist"))
    except UserError as err:
        flag = "flow-log-" + err.field.partition("[")[0]
        raise UserError(flag, f"{err.field}: {err.problem}") from None


class FlowLog:
    """The writer of one flow log."""

    def __init__(self, settings: FlowLogSettings, node_name: str = "") -> None:
        self.settings = settings
        self.node_name = node_name
        self._matcher = settings_matcher(settings)
        self._queue: queue.Queue[Batch | None] = queue.Queue(QUEUE_BATCHES)
        self._dropped = 0  # items not queued since the last lost_events line (any thread)
        self._dropped_lock = threading.Lock()
        self.written = 0  # lines written
        self.lost = 0  # items dropped because the writer fell behind, in total
        self._file = RotatingFile(settings.path, settings.max_bytes, settings.max_backups)
        self._thread = threading.Thread(target=self._run, name="flow-log", daemon=True)
        self._thread.start()

    def submit(self, items: Batch) -> None:
        """Queue a batch for the writer; never waits."""
        try:
            self._queue.put_nowait(items)
        except queue.Full:
            with self._dropped_lock:
                self._dropped += len(items)
                self.lost += len(items)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)
        self._file.close()

    def _run(self) -> None:
        while True:
            batch = self._queue.get()
            try:
                self._write(batch or [])  # the last call (None) reports what was dropped
            except Exception:
                log.exception("flow log: writing failed; going on")
            if batch is None:
                return

    def _write(self, batch: Iterable[Item]) -> None:
        lines: list[str] = []
        with self._dropped_lock:
            dropped, self._dropped = self._dropped, 0
        if dropped:
            source = flow_pb2.OBSERVER_EVENTS_QUEUE
            notice = lost_response(source, dropped, self.node_name)
            lines.append(json.dumps(encode(notice), separators=(",", ":")))
        matcher = self._matcher
        for item in batch:  # lost-events notices pass every filter
            if matcher is None or not item.HasField("flow") or matcher.matches(item.flow):
                lines.append(json.dumps(encode(item), separators=(",", ":")))
        self._file.write_lines(lines)
        self.written += len(lines)


def read_tail(settings: FlowLogSettings, count: int) -> list[Item]:
    """The last `count` items of the log (across its backups), oldest first. Lines that
    do not parse (a line cut short by a crash) are skipped and counted in the log."""
    lines: list[bytes] = []
    for path in backups(settings.path, settings.max_backups):
        if len(lines) >= count:
            break
        try:
            lines = _last_lines(path, count - len(lines)) + lines
        except FileNotFoundError:
            break
    items, bad = [], 0
    for line in lines:
        try:
            items.append(decode(json.loads(line), Item()))
        except (ValueError, json_format.ParseError):
            bad += 1
    if bad:
        log.warning("flow log: lines skipped", extra={"fields": {"lines": bad}})
    return items


def _last_lines(path: str, count: int) -> list[bytes]:
    """The last `count` non-empty lines of a file, read backwards block by block."""
    if count <= 0:
        return []
    blocks: list[bytes] = []
    newlines = 0
    with open(path, "rb") as f:
        at = f.seek(0, os.SEEK_END)
        while at > 0 and newlines <= count:
            step = min(_TAIL_BLOCK, at)
            at -= step
            f.seek(at)
            block = f.read(step)
            newlines += block.count(b"\n")
            blocks.append(block)
    lines = [line for line in b"".join(reversed(blocks)).split(b"\n") if line.strip()]
    if at > 0:
        lines = lines[1:]  # the first may be a part of a line
    return lines[-count:]
