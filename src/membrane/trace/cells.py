"""Columns of a batch of events as the native formatter takes them (native/eventfmt.c):
numbers, text and times, each a whole column from numpy. A tool's decoder returns
{key: cell} and never touches single events; what repeats (a flag set, an errno, a
command name) is turned into text once per distinct value."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from membrane.bpf.ktime import ktimes_to_unix_ns
from membrane.native.eventfmt import (
    COL_CSTR,
    COL_FIXED,
    COL_INT,
    COL_JOIN,
    COL_LIST,
    COL_RAW,
    COL_RIGHT,
    COL_TEXT,
    COL_TIME,
    CColumn,
)


@dataclass
class Cells:
    """One column: `kind` says how values print (eventfmt COL_*); `keep` holds the arrays
    the C side reads while the column is in use."""

    kind: int
    ints: np.ndarray | None = None  # int64
    nulls: np.ndarray | None = None  # bool: no value ("-" in a table, null in JSON)
    blob: np.ndarray | None = None  # uint8: text bytes
    blob_start: int = 0  # byte where row 0's text starts when `offsets` is None
    offsets: np.ndarray | None = None  # int64 per row, into blob
    lengths: np.ndarray | None = None  # int32 per row
    stride: int = 0  # without offsets: row i at blob_start + i * stride
    max_len: int = 0  # without lengths: every row's length
    cstr: bool = False  # text ends at its first NUL
    decimals: int = 0  # COL_FIXED: ints are value * 10^decimals
    table_decimals: int = 0  # COL_FIXED: digits after the point in a table
    join: bool = False  # COL_LIST: one string of the items joined by spaces
    more: np.ndarray | None = None  # bool, COL_LIST joined: " ..." after the items

    def column(self, key: bytes, width: int, right: bool) -> CColumn:
        def addr(a: np.ndarray | None) -> int | None:
            return None if a is None else a.ctypes.data

        blob = None if self.blob is None else self.blob.ctypes.data + self.blob_start
        return CColumn(
            kind=self.kind,
            flags=(COL_RIGHT if right else 0)
            | (COL_CSTR if self.cstr else 0)
            | (COL_JOIN if self.join else 0),
            width=width,
            key_len=len(key),
            key=key,
            ints=addr(self.ints),
            nulls=addr(self.nulls),
            blob=blob,
            offsets=addr(self.offsets),
            lengths=addr(self.lengths),
            stride=self.stride,
            max_len=self.max_len,
            decimals=self.decimals,
            table_decimals=self.table_decimals,
            more=addr(self.more),
        )


def ints(values: np.ndarray, nulls: np.ndarray | None = None) -> Cells:
    return Cells(
        COL_INT,
        ints=np.ascontiguousarray(values, dtype=np.int64),
        nulls=None if nulls is None else np.ascontiguousarray(nulls, dtype=np.bool_),
    )


def fixed(scaled: np.ndarray, decimals: int, table_decimals: int) -> Cells:
    """A number with decimals, given as value * 10^decimals (an int: 1.5 ms at 3 decimals
    is 1500): JSON as round(value, decimals) prints, a table with table_decimals."""
    return Cells(
        COL_FIXED,
        ints=np.ascontiguousarray(scaled, dtype=np.int64),
        decimals=decimals,
        table_decimals=table_decimals,
    )


def times(ts_ns: np.ndarray) -> Cells:
    """bpf_ktime_get_ns() values as ISO 8601 UTC times with microseconds."""
    return Cells(COL_TIME, ints=ktimes_to_unix_ns(ts_ns))


def task(
    task: np.ndarray,
    times_ns: np.ndarray | None = None,
    ppid: np.ndarray | None = None,
    unknown_null: bool = False,
) -> dict[str, Cells]:
    """The leading columns every per-event tool has: "time" (when `times_ns` is given),
    pid, tid, ppid (when given), uid, comm of each `struct trace_task`. `unknown_null`:
    all of them null where the pid is 0 (an event no process was known for)."""
    nulls = task["pid"] == 0 if unknown_null else None
    out: dict[str, Cells] = {} if times_ns is None else {"time": times(times_ns)}
    out["pid"] = ints(task["pid"], nulls=nulls)
    out["tid"] = ints(task["tid"], nulls=nulls)
    if ppid is not None:
        out["ppid"] = ints(ppid)
    out["uid"] = ints(task["uid"], nulls=nulls)
    out["comm"] = cstrings(task["comm"], nulls=nulls)
    return out


def cstrings(field: np.ndarray, nulls: np.ndarray | None = None) -> Cells:
    """A fixed char array of each event (comm): text up to its NUL."""
    matrix = np.ascontiguousarray(field)
    raw = matrix.view(np.uint8).reshape(len(matrix), -1)
    return Cells(
        COL_TEXT,
        blob=raw,
        stride=raw.shape[1],
        max_len=raw.shape[1],
        cstr=True,
        nulls=None if nulls is None else np.ascontiguousarray(nulls, dtype=np.bool_),
    )


def tail_text(block: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> Cells:
    """Each event's variable-length tail (EventBatch.tail)."""
    return Cells(
        COL_TEXT,
        blob=block,
        offsets=np.ascontiguousarray(starts, dtype=np.int64),
        lengths=np.ascontiguousarray(lengths, dtype=np.int32),
        cstr=True,
    )


def text_lists(
    block: np.ndarray,
    starts: np.ndarray,
    lengths: np.ndarray,
    join: bool = False,
    more: np.ndarray | None = None,
) -> Cells:
    """Strings each ended by a NUL (exec's argv) at block[starts : starts + lengths]: a
    JSON array of strings, in a table joined by spaces; with `join` one string in JSON
    too, " ..." added where `more` is true."""
    return Cells(
        COL_LIST,
        blob=block,
        offsets=np.ascontiguousarray(starts, dtype=np.int64),
        lengths=np.ascontiguousarray(lengths, dtype=np.int32),
        join=join,
        more=None if more is None else np.ascontiguousarray(more, dtype=np.bool_),
    )


def booleans(values: np.ndarray) -> Cells:
    """Booleans (any nonzero number is true): JSON true/false."""
    return mapped(np.asarray(values) != 0, lambda v: "true" if v else "false", raw=True)


def mapped(values: np.ndarray, name: Callable[[Any], str | None], raw: bool = False) -> Cells:
    """Text for a value that repeats (flags, errno, syscall): `name` runs once per distinct
    value of the batch; None prints as "-" / null. With `raw` the text is written as it is
    (JSON literals: true, false, a number)."""
    distinct, inverse = _distinct(np.asarray(values))
    texts = [name(v) for v in distinct.tolist()]
    encoded = [b"" if t is None else t.encode() for t in texts]
    sizes = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1])) if len(sizes) else sizes
    missing = np.fromiter((t is None for t in texts), dtype=np.bool_, count=len(texts))
    return Cells(
        COL_RAW if raw else COL_TEXT,
        blob=np.frombuffer(b"".join(encoded) or b"\0", dtype=np.uint8),
        offsets=starts[inverse].astype(np.int64),
        lengths=sizes[inverse].astype(np.int32),
        nulls=missing[inverse] if missing.any() else None,
    )


_DENSE = 1 << 16  # values spanning fewer than this are indexed directly, without a sort


def _distinct(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """np.unique(values, return_inverse=True), in O(n) when the values span a small range
    (flags, syscall numbers, a handful of errors): the sort cost 30-70 ns per event."""
    values = values.reshape(-1)
    if values.dtype.kind == "b":
        values = values.astype(np.int64)
    if values.dtype.kind in "iu" and len(values):
        low, high = int(values.min()), int(values.max())
        if high - low < _DENSE:
            shifted = (values - low).astype(np.intp)
            present = np.zeros(high - low + 1, dtype=np.bool_)
            present[shifted] = True
            index = np.cumsum(present) - 1
            return np.flatnonzero(present) + low, index[shifted]
    distinct, inverse = np.unique(values, return_inverse=True)
    return distinct, inverse.reshape(-1)
