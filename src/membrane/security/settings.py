"""`membrane agent run`'s runtime security options, checked."""

from __future__ import annotations

from dataclasses import dataclass, field

from membrane.choices import parse_bool, whole_number
from membrane.security.cache import DEFAULT_MAX_EXITED
from membrane.security.export import ExportSettings, make_export_settings
from membrane.security.redaction import Redactor, parse_redaction_filters
from membrane.security.sink import DEFAULT_CAPACITY


@dataclass(frozen=True)
class SecuritySettings:
    enabled: bool = True
    process_cache_size: int = DEFAULT_MAX_EXITED  # exited processes remembered
    event_buffer_size: int = DEFAULT_CAPACITY  # events kept for `security events --last`
    export: ExportSettings | None = None
    redactor: Redactor = field(default_factory=lambda: Redactor(()))


def make_security_settings(
    enabled: bool | str = True,
    process_cache_size: int | str = DEFAULT_MAX_EXITED,
    event_buffer_size: int | str = DEFAULT_CAPACITY,
    export_file: str = "",
    export_max_size_mb: int | str = 10,
    export_max_backups: int | str = 5,
    export_allowlist: str = "",
    export_denylist: str = "",
    redaction_filters: str = "",
) -> SecuritySettings:
    return SecuritySettings(
        enabled=parse_bool(enabled, "runtime-security"),
        process_cache_size=whole_number(process_cache_size, "process-cache-size", 1),
        event_buffer_size=whole_number(event_buffer_size, "security-event-buffer-size", 1),
        export=make_export_settings(
            export_file, export_max_size_mb, export_max_backups, export_allowlist, export_denylist
        ),
        redactor=parse_redaction_filters(redaction_filters, "security-redaction-filters"),
    )
