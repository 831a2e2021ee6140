"""Runtime security inside the agent: the process cache, the event store with its
followers and export file, and the process lifecycle monitor, started and stopped
together. Tracing policies (membrane.security.policy) use `cache` and `store`.

What the kernel lacks is said once at start (when the monitor's programs are refused, the
feature probe names what is missing) and the agent runs on without it: `missing` lists it
for `membrane security status` and the logs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from membrane.bpf.errors import BpfError
from membrane.bpf.probe import supports
from membrane.security.cache import ProcessCache
from membrane.security.export import EventExporter
from membrane.security.lifecycle import NEEDED_FEATURES, ProcessMonitor
from membrane.security.pods import PodDirectory
from membrane.security.settings import SecuritySettings
from membrane.security.sink import EventStore

if TYPE_CHECKING:
    from membrane.agent.snapshot import Snapshot

log = logging.getLogger("membrane.agent")


class SecurityRuntime:
    def __init__(
        self, settings: SecuritySettings, node_name: str, snapshot: Callable[[], Snapshot]
    ) -> None:
        self.settings = settings
        self.node_name = node_name
        self.cache = ProcessCache(
            node_name, settings.process_cache_size, pod_of=PodDirectory(snapshot)
        )
        self.store = EventStore(settings.event_buffer_size, settings.redactor)
        self.exporter: EventExporter | None = None
        self.monitor: ProcessMonitor | None = None
        self.missing: list[str] = []

    def start(self) -> None:
        if self.settings.export is not None:
            self.exporter = EventExporter(self.settings.export)
            self.store.add_exporter(self.exporter.submit)
        try:
            self.monitor = ProcessMonitor(self.cache, self.store.publish)
        except (BpfError, OSError) as err:
            # The probe names what the kernel lacks (it costs ~0.3 s: asked only now).
            lacking = [name for name in NEEDED_FEATURES if not supports(name)]
            self.missing = lacking or [f"security_process: {err}"]
            log.warning(
                "process lifecycle events are off: the kernel refused their programs",
                extra={"fields": {"missing": self.missing, "error": str(err)}},
            )
            return
        self.monitor.start()
        log.info(
            "runtime security started",
            extra={"fields": {"processes": self.monitor.procfs, "export": bool(self.exporter)}},
        )

    def stop(self) -> None:
        if self.monitor is not None:
            self.monitor.stop()
        if self.exporter is not None:
            self.exporter.close()

    def status(self) -> dict[str, Any]:
        m = self.monitor
        return {
            "enabled": True,
            "process_lifecycle": m is not None,
            "missing": self.missing,
            "processes_live": self.cache.live,
            "processes_known": len(self.cache),
            "processes_evicted": self.cache.evicted,
            "events_published": self.store.published,
            "events_kept": len(self.store),
            "execs": m.execs if m else 0,
            "exits": m.exits if m else 0,
            "clones": m.clones if m else 0,
            "unknown_exits": m.unknown_exits if m else 0,
            "lost_events": m.lost if m else 0,
            "export_written": self.exporter.written if self.exporter else 0,
            "export_lost": self.exporter.lost if self.exporter else 0,
        }


def start_security(
    settings: SecuritySettings | None, node_name: str, snapshot: Callable[[], Snapshot]
) -> SecurityRuntime | None:
    """The agent's runtime security, started (None when --runtime-security=false)."""
    settings = settings or SecuritySettings()
    if not settings.enabled:
        log.info("runtime security is off (--runtime-security=false)")
        return None
    runtime = SecurityRuntime(settings, node_name, snapshot)
    runtime.start()
    return runtime
