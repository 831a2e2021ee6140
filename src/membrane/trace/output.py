"""How trace tools print: fixed-width columns like bcc's tools, or JSON lines."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Column:
    key: str
    title: str
    width: int  # 0: the rest of the line
    right: bool = False


class Printer:
    """Prints records as table rows (header first) or as JSON lines; counts them."""

    def __init__(self, columns: Sequence[Column], output: str) -> None:
        self.columns = columns
        self.json = output == "json"
        self.count = 0
        self._header_done = False

    def _line(self, values: Sequence[str]) -> str:
        cells = []
        for col, value in zip(self.columns, values, strict=True):
            if not col.width:
                cells.append(value)
            else:
                cells.append(value.rjust(col.width) if col.right else value.ljust(col.width))
        return " ".join(cells).rstrip()

    def header(self) -> None:
        if not self.json and not self._header_done:
            print(self._line([c.title for c in self.columns]), flush=True)
            self._header_done = True

    def record(self, record: dict[str, Any]) -> None:
        self.count += 1
        if self.json:
            sys.stdout.write(json.dumps(record) + "\n")
            return
        self.header()
        sys.stdout.write(self._line([_cell(record.get(c.key)) for c in self.columns]) + "\n")

    def flush(self) -> None:
        sys.stdout.flush()

    def summary(self, **fields: Any) -> None:
        """The closing line: JSON lines get a final {"summary": ...}; tables a stderr line."""
        if self.json:
            sys.stdout.write(json.dumps({"summary": fields}) + "\n")
            sys.stdout.flush()
            return
        text = ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in fields.items())
        print(f"\n{text}", file=sys.stderr)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return " ".join(map(str, value))
    return str(value)


def text(raw: bytes) -> str:
    """A NUL-terminated C string from an event."""
    return bytes(raw).split(b"\0", 1)[0].decode(errors="replace")
