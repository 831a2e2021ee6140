"""How trace tools print: fixed-width columns like bcc's tools, or JSON lines."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii
from typing import Any

import numpy as np

from membrane.native.eventfmt import RowFormatter
from membrane.trace.cells import Cells, ints


@dataclass(frozen=True)
class Column:
    key: str
    title: str
    width: int  # 0: the rest of the line
    right: bool = False
    fmt: Callable[[Any], str] | None = None  # table text of a value (JSON keeps the value)


class Printer:
    """Prints records as table rows (header first) or as JSON lines; counts them.

    A tool following a busy workload prints hundreds of thousands of events a second, so
    a batch goes out in one write, and `write_columns` takes it column by column (key -> one
    value per event) straight from numpy: a dict per event, padded cell by cell, cost
    three times as much (trace open: 5.5 against 1.8 us per event, bench/trace_open.py).
    """

    def __init__(self, columns: Sequence[Column], output: str) -> None:
        self.columns = columns
        self.json = output == "json"
        self.count = 0
        self._header_done = False
        self._formatter: RowFormatter | None = None
        self._keys: dict[str, bytes] = {}
        # One %-format for the whole row: faster than str.format or padding cell by cell.
        self._row = " ".join(
            ("%%%ds" if c.right else "%%-%ds") % c.width if c.width else "%s" for c in columns
        )

    def _line(self, values: Sequence[str]) -> str:
        return (self._row % tuple(values)).rstrip()

    def header(self) -> None:
        if not self.json and not self._header_done:
            print(self._line([c.title for c in self.columns]), flush=True)
            self._header_done = True

    def record(self, record: dict[str, Any]) -> None:
        self.records([record])

    def records(self, records: Sequence[dict[str, Any]]) -> None:
        if self.json:
            self._write_json(records)
        else:
            self.write_columns({c.key: [r.get(c.key) for r in records] for c in self.columns})

    def write_columns(self, fields: Mapping[str, Sequence[Any]]) -> None:
        """Events given as columns of equal length; a column missing from `fields` prints
        as "-"."""
        count = len(next(iter(fields.values()), ()))
        if not count:
            return
        if self.json:
            # json.dumps per event cost 4-5 us; the same text from column-wise encoding
            # (strings through json's own C escaper) and one %-template per line, ~1.5 us.
            row = "{" + ", ".join(json.dumps(k).replace("%", "%%") + ": %s" for k in fields) + "}\n"
            sys.stdout.write(
                "".join(
                    [
                        row % values
                        for values in zip(*map(_json_texts, fields.values()), strict=True)
                    ]
                )
            )
            self.count += count
            return
        self.header()
        cells = [_cells(fields.get(c.key, [None] * count), c.fmt) for c in self.columns]
        row = self._row
        sys.stdout.write(
            "".join([(row % values).rstrip() + "\n" for values in zip(*cells, strict=True)])
        )
        self.count += count

    def write_cells(self, cells: Mapping[str, Cells], rows: int) -> None:
        """A batch given as native cells (trace/cells.py): the rows are laid out by the
        compiled formatter and written in a few large writes, with no Python per event.
        Same text as `write_columns` for the same values."""
        if not rows:
            return
        if self._formatter is None:
            self._formatter = RowFormatter(self.json)
        if self.json:
            columns = [cell.column(self._key(k), 0, False) for k, cell in cells.items()]
        else:
            self.header()
            missing = ints(np.zeros(rows), nulls=np.ones(rows, dtype=np.bool_))
            columns = [
                cells.get(c.key, missing).column(b"", c.width, c.right) for c in self.columns
            ]
        self.flush()  # what went through the text layer comes first
        fd = sys.stdout.fileno()
        for chunk in self._formatter.chunks(columns, rows):
            # os.write directly: a signal can cut a pipe write short, and the rest must
            # still go out before the buffer is reused for the next chunk.
            while chunk:
                chunk = chunk[os.write(fd, chunk) :]
        self.count += rows

    def _key(self, key: str) -> bytes:
        """A JSON key as the formatter writes it: quoted, with its ": "."""
        found = self._keys.get(key)
        if found is None:
            found = self._keys[key] = (json.dumps(key) + ": ").encode()
        return found

    def _write_json(self, records: Sequence[dict[str, Any]]) -> None:
        sys.stdout.write("".join([json.dumps(r) + "\n" for r in records]))
        self.count += len(records)

    def flush(self) -> None:
        sys.stdout.flush()
        sys.stdout.buffer.flush()

    def summary(self, **fields: Any) -> None:
        """The closing line: JSON lines get a final {"summary": ...}; tables a stderr line."""
        if self.json:
            sys.stdout.write(json.dumps({"summary": fields}) + "\n")
            sys.stdout.flush()
            return
        text = ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in fields.items())
        print(f"\n{text}", file=sys.stderr)


def _json_texts(values: Sequence[Any]) -> list[str]:
    """A column's values as json.dumps writes them; plain types without a call each."""
    kinds = set(map(type, values))
    if kinds == {str}:
        return list(map(encode_basestring_ascii, values))
    if kinds <= {int, type(None)}:
        return ["null" if v is None else str(v) for v in values]
    if kinds <= {str, type(None)}:
        return ["null" if v is None else encode_basestring_ascii(v) for v in values]
    return list(map(json.dumps, values))


def _cells(values: Sequence[Any], fmt: Callable[[Any], str] | None) -> list[str]:
    """A column's table text; without `fmt`, strings pass through without a call."""
    if fmt is not None:
        return ["-" if v is None else fmt(v) for v in values]
    return ["-" if v is None else v if type(v) is str else _cell(v) for v in values]


def _cell(value: Any, fmt: Callable[[Any], str] | None = None) -> str:
    if value is None:
        return "-"
    if fmt is not None:
        return fmt(value)
    if isinstance(value, list):
        return " ".join(map(str, value))
    return str(value)


def text(raw: bytes) -> str:
    """A NUL-terminated C string from an event."""
    return bytes(raw).split(b"\0", 1)[0].decode(errors="replace")
