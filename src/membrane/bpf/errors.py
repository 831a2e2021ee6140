"""Loader exceptions and the capture of libbpf's log (which carries the verifier log)."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import threading
from collections.abc import Iterator

from membrane.bpf import _libbpf as L

log = logging.getLogger("membrane.bpf")


class BpfError(Exception):
    """A libbpf or kernel call failed; `errno` says why."""

    def __init__(self, message: str, errno: int = 0) -> None:
        self.errno = errno
        detail = f": {os.strerror(errno)}" if errno else ""
        super().__init__(f"{message}{detail}")


class LoadError(BpfError):
    """Loading an object failed. `log` holds libbpf's messages, including the verifier log."""

    def __init__(self, message: str, errno: int, log_text: str) -> None:
        super().__init__(message, errno)
        self.log = log_text

    def __str__(self) -> str:
        base = super().__str__()
        return f"{base}\n{self.log}" if self.log else base


class AttachError(BpfError):
    """Attaching a program to a hook failed."""


# x86-64 va_list is a pointer to a 24-byte __va_list_tag; copying those bytes is va_copy,
# which lets us measure the formatted length first and then format for real.
_VA_LIST_TAG_SIZE = 24
_capture = threading.local()


_LIBBPF_DEBUG = 2


def _on_libbpf_print(level: int, fmt: bytes, va_list: int) -> int:
    # Debug lines (a few hundred per object load) are left unformatted: they cost ~1 ms
    # per 100, and what explains a failure (the verifier log) comes as a warning.
    if level >= _LIBBPF_DEBUG:
        return 0
    tag = (ctypes.c_char * _VA_LIST_TAG_SIZE).from_address(va_list)
    saved = bytes(tag)
    need = L.libc.vsnprintf(None, 0, fmt, va_list)
    ctypes.memmove(va_list, saved, _VA_LIST_TAG_SIZE)
    buf = ctypes.create_string_buffer(max(need, 0) + 1)
    L.libc.vsnprintf(buf, len(buf), fmt, va_list)
    text = buf.value.decode(errors="replace")
    sink = getattr(_capture, "lines", None)
    if sink is not None:
        sink.append(text)
    else:
        log.debug("libbpf: %s", text.rstrip())
    return 0


_print_fn = L.PrintFn(_on_libbpf_print)  # module-level: the callback must outlive every call
L.lib.libbpf_set_print(_print_fn)


@contextlib.contextmanager
def captured_log() -> Iterator[list[str]]:
    """Collect libbpf's messages emitted by this thread inside the block."""
    previous = getattr(_capture, "lines", None)
    lines: list[str] = []
    _capture.lines = lines
    try:
        yield lines
    finally:
        _capture.lines = previous
