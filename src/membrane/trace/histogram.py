"""Power-of-two histograms (filled in the kernel by bpf/lib/log2_hist.h), printed exactly
the way bcc's tools print them, so people read them as they always have:

         usecs               : count     distribution
             0 -> 1          : 12       |****************************************|
             2 -> 3          : 3        |**********                              |

and as JSON buckets with the same bounds.
"""

from __future__ import annotations

from collections.abc import Sequence

STARS = 40  # bcc's stars_max
_NARROW_MAX_SLOT = 32  # bcc switches to wide columns (and half the stars) beyond this slot


def buckets(slots: Sequence[int]) -> list[dict[str, int]]:
    """The rows bcc prints: slots 1 up to the last non-empty one, with their bounds.
    Slot i holds values 2^(i-1) .. 2^i - 1, except that slot 1 holds 0 and 1."""
    last = max((i for i, count in enumerate(slots) if count), default=0)
    rows = []
    for i in range(1, last + 1):
        low, high = (1 << i) >> 1, (1 << i) - 1
        rows.append({"low": low - 1 if low == high else low, "high": high, "count": slots[i]})
    return rows


def _stars(count: int, most: int, width: int) -> str:
    return "*" * min(width, int(width * count / most)) if most else ""


def log2_lines(slots: Sequence[int], unit: str) -> list[str]:
    """bcc's print_log2_hist for one histogram (no lines when it is empty)."""
    rows = buckets(slots)
    if not rows:
        return []
    most = max(slots)
    if len(rows) <= _NARROW_MAX_SLOT:
        head, bound, width = f"     {unit:<19} : count     distribution", 10, STARS
    else:
        head, bound, width = f"               {unit:<29} : count     distribution", 20, STARS // 2
    return [head] + [
        f"{r['low']:>{bound}} -> {r['high']:<{bound}} : {r['count']:<8} "
        f"|{_stars(r['count'], most, width):<{width}}|"
        for r in rows
    ]
