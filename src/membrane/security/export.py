"""The security event export file (Tetragon's --export-filename): one event per line in
protobuf JSON, rotated by size (membrane.rotating_file, as the flow log), chosen by
Tetragon-style allow and deny lists of filters.

Lines are written on a thread of the exporter's own: `submit` only queues a batch. An
exporter that cannot keep up drops batches and counts them (`lost`).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from membrane.rotating_file import RotatingFile, export_limits
from membrane.security.filters import EventMatcher, parse_filter_lines
from membrane.security.format import json_line
from membrane.security.sink import Item, resolve
from membrane.tetragon.tetragon import events_pb2

log = logging.getLogger("membrane.agent")
Event = events_pb2.GetEventsResponse
DEFAULT_MAX_SIZE_MB = 10  # Tetragon's --export-file-max-size-mb
DEFAULT_MAX_BACKUPS = 5  # Tetragon's --export-file-max-backups
QUEUE_BATCHES = 4096


@dataclass(frozen=True)
class ExportSettings:
    path: str
    max_size_mb: int = DEFAULT_MAX_SIZE_MB
    max_backups: int = DEFAULT_MAX_BACKUPS
    allowlist: tuple[events_pb2.Filter, ...] = ()
    denylist: tuple[events_pb2.Filter, ...] = ()

    def matcher(self) -> EventMatcher | None:
        if not self.allowlist and not self.denylist:
            return None
        return EventMatcher.build(
            self.allowlist,
            self.denylist,
            ("security-export-allowlist", "security-export-denylist"),
        )


def make_export_settings(
    path: str,
    max_size_mb: int | str = DEFAULT_MAX_SIZE_MB,
    max_backups: int | str = DEFAULT_MAX_BACKUPS,
    allowlist: str = "",
    denylist: str = "",
) -> ExportSettings | None:
    """The checked `--security-export-*` options (None: no export). Filters are compiled
    here once, so a bad regular expression fails at start, naming its flag."""
    allow = parse_filter_lines(allowlist, "security-export-allowlist")
    deny = parse_filter_lines(denylist, "security-export-denylist")
    limits = export_limits(
        path, "security-export-file", "security-export", max_size_mb, max_backups, allow, deny
    )
    if limits is None:
        return None
    size, backups = limits
    settings = ExportSettings(path, size, backups, allow, deny)
    settings.matcher()
    return settings


class EventExporter:
    def __init__(self, settings: ExportSettings) -> None:
        self.settings = settings
        self._matcher = settings.matcher()
        self._file = RotatingFile(settings.path, settings.max_size_mb << 20, settings.max_backups)
        self._queue: queue.Queue[Sequence[Item] | None] = queue.Queue(QUEUE_BATCHES)
        self.written = 0
        self.lost = 0
        self._thread = threading.Thread(target=self._run, name="security-export", daemon=True)
        self._thread.start()

    def submit(self, events: Sequence[Item]) -> None:
        try:
            self._queue.put_nowait(events)
        except queue.Full:
            self.lost += len(events)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)
        self._file.close()

    def _run(self) -> None:
        while (batch := self._queue.get()) is not None:
            try:
                matcher = self._matcher
                events = (resolve(item) for item in batch)
                lines = [json_line(e) for e in events if matcher is None or matcher.matches(e)]
                self._file.write_lines(lines)
                self.written += len(lines)
            except Exception:
                log.exception("security export: writing failed; going on")
