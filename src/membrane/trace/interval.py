"""Periodic reports of tools that aggregate in the kernel (syscount-style): the --interval
option and the stamp each report starts with."""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime

import typer

from membrane.errors import UserError

INTERVAL = typer.Option(
    1.0, "--interval", "-i", help="Report every this many seconds; 0: only once, at the end."
)
_MIN_INTERVAL = 0.01


def check_interval(interval: float) -> float | None:
    """The interval for TraceSession.run; None: report only at the end."""
    if not math.isfinite(interval) or interval < 0:
        raise UserError("--interval", f"{interval} is not a number of seconds >= 0")
    if 0 < interval < _MIN_INTERVAL:
        raise UserError(
            "--interval", f"{interval}: at most {1 / _MIN_INTERVAL:.0f} reports a second"
        )
    return interval or None


class Stamp:
    """When a report was taken and how long it covers. The table shows bcc's [HH:MM:SS]
    line; JSON rows carry `time` (ISO 8601, UTC) and `seconds`."""

    def __init__(self) -> None:
        self._last = time.monotonic()

    def next(self) -> tuple[str, float, str]:
        """(iso time, seconds since the previous report, [HH:MM:SS])."""
        now = time.monotonic()
        seconds, self._last = round(now - self._last, 3), now
        return (
            datetime.now(UTC).isoformat(timespec="microseconds"),
            seconds,
            time.strftime("[%H:%M:%S]"),
        )
