"""Output conventions shared by every command: tables for people, JSON for machines."""

from __future__ import annotations

import json
import sys
from typing import Any

BOLD, RESET = "\033[1m", "\033[0m"


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2)
    sys.stdout.write("\n")


def print_table(columns: list[str], rows: list[list[str]], empty: str = "") -> None:
    """Left-aligned columns two spaces apart under a header (bold on a terminal), the
    layout rich printed here before. Laid out by hand because importing rich costs ~40 ms,
    a third of what a whole client command may take; long cells widen the line instead of
    folding (`-o json` is the form for machines)."""
    if not rows and empty:
        print(empty)
        return
    widths = [max(len(cell) for cell in column) for column in zip(columns, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    header = line(columns)
    print(f"{BOLD}{header}{RESET}" if sys.stdout.isatty() else header)
    for row in rows:
        print(line(row))
