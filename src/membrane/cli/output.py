"""Output conventions shared by every command: tables for people, JSON for machines."""

from __future__ import annotations

import json
import sys
from typing import Any


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2)
    sys.stdout.write("\n")


def print_table(columns: list[str], rows: list[list[str]], empty: str = "") -> None:
    if not rows and empty:
        print(empty)
        return
    # rich costs ~25 ms to import: only commands that print a table pay it
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, show_edge=False, pad_edge=False, header_style="bold")
    for col in columns:
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*row)
    Console(width=max(Console().width, 120)).print(table)
