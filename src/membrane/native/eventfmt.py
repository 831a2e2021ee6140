"""ctypes binding of native/eventfmt.c: ring-buffer records to table rows or JSON lines in
whole batches. Python prepares columns with numpy; the C side lays out every row, so no
Python code runs per event (bench/trace_open.py measures the consumer's rate)."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from membrane.errors import UserError

_LIBRARY = Path(__file__).with_name("libeventfmt.so")

COL_INT, COL_TEXT, COL_RAW, COL_TIME, COL_FIXED, COL_LIST = range(6)
COL_RIGHT, COL_CSTR, COL_JOIN = 1, 2, 4


class CColumn(ctypes.Structure):
    """struct mb_column."""

    _fields_ = [
        ("kind", ctypes.c_int32),
        ("flags", ctypes.c_int32),
        ("width", ctypes.c_int32),
        ("key_len", ctypes.c_int32),
        ("key", ctypes.c_char_p),
        ("ints", ctypes.c_void_p),
        ("nulls", ctypes.c_void_p),
        ("blob", ctypes.c_void_p),
        ("offsets", ctypes.c_void_p),
        ("lengths", ctypes.c_void_p),
        ("stride", ctypes.c_int64),
        ("max_len", ctypes.c_int32),
        ("decimals", ctypes.c_int32),
        ("table_decimals", ctypes.c_int32),
        ("pad", ctypes.c_int32),
        ("more", ctypes.c_void_p),
    ]


def _load() -> ctypes.CDLL:
    if not _LIBRARY.exists():
        raise UserError("", f"{_LIBRARY.name} is not built: run `make bpf` (or `make native`)")
    lib = ctypes.CDLL(str(_LIBRARY))
    u64, vp = ctypes.c_uint64, ctypes.c_void_p
    lib.mb_ring_scan.argtypes = [vp, u64, u64, u64, vp, vp, u64, ctypes.POINTER(u64)]
    lib.mb_ring_scan.restype = u64
    lib.mb_gather.argtypes = [vp, vp, vp, u64, ctypes.c_uint32, vp]
    lib.mb_gather.restype = u64
    i64 = ctypes.c_int64
    lib.mb_format_rows.argtypes = [
        ctypes.POINTER(CColumn),
        ctypes.c_int32,
        i64,
        i64,
        ctypes.c_int32,
        vp,
        i64,
        ctypes.POINTER(i64),
    ]
    lib.mb_format_rows.restype = i64
    return lib


_lib: ctypes.CDLL | None = None


def lib() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        _lib = _load()
    return _lib


def _addr(array: np.ndarray | None) -> int | None:
    return None if array is None else array.ctypes.data


@dataclass
class Scan:
    offsets: np.ndarray  # uint32: each record's data, relative to the scan's start
    lengths: np.ndarray  # uint32
    end: int  # ring position after the last record walked


def ring_scan(data_addr: int, mask: int, consumer: int, producer: int, limit: int) -> Scan:
    offsets = np.empty(limit, dtype=np.uint32)
    lengths = np.empty(limit, dtype=np.uint32)
    count = ctypes.c_uint64()
    end = lib().mb_ring_scan(
        data_addr, mask, consumer, producer, _addr(offsets), _addr(lengths), limit, count
    )
    return Scan(offsets[: count.value], lengths[: count.value], end)


def gather(
    block: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, size: int
) -> tuple[np.ndarray, int]:
    """The first `size` bytes of each record (zero-padded), as an (n, size) matrix; and
    how many records were shorter."""
    out = np.empty((len(offsets), size), dtype=np.uint8)
    shorter = lib().mb_gather(
        _addr(block), _addr(offsets), _addr(lengths), len(offsets), size, _addr(out)
    )
    return out, int(shorter)


class RowFormatter:
    """Formats rows from columns into a buffer it keeps between batches."""

    def __init__(self, json: bool, buffer_bytes: int = 4 << 20) -> None:
        self.json = json
        self._out = np.empty(buffer_bytes, dtype=np.uint8)

    def chunks(self, columns: Sequence[CColumn], rows: int) -> Iterator[memoryview]:
        """The text of `rows` rows, in buffer-sized pieces (each valid until the next)."""
        array = (CColumn * len(columns))(*columns)
        done, first = ctypes.c_int64(), 0
        while first < rows:
            written = lib().mb_format_rows(
                array,
                len(columns),
                first,
                rows,
                int(self.json),
                _addr(self._out),
                len(self._out),
                done,
            )
            if done.value == 0:  # one row larger than the buffer: grow it
                self._out = np.empty(len(self._out) * 2, dtype=np.uint8)
                continue
            first += done.value
            yield memoryview(self._out)[:written]
