"""BPF timestamps: bpf_ktime_get_ns() counts CLOCK_MONOTONIC nanoseconds."""

from __future__ import annotations

import time
from datetime import UTC, datetime


def ktime_to_unix(ts_ns: int) -> float:
    """Unix time of a bpf_ktime_get_ns() value."""
    return time.time() - (time.clock_gettime_ns(time.CLOCK_MONOTONIC) - ts_ns) / 1e9


def ktime_to_iso(ts_ns: int) -> str:
    return datetime.fromtimestamp(ktime_to_unix(ts_ns), UTC).isoformat(timespec="microseconds")
