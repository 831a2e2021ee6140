"""Kernel filesystems the loader needs: bpffs for pins, tracefs for tracepoints, cgroup v2."""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from membrane.bpf import _libbpf as L
from membrane.bpf.errors import BpfError

BPFFS = "/sys/fs/bpf"
PIN_ROOT = f"{BPFFS}/membrane"
TRACEFS = "/sys/kernel/tracing"
_BPF_FS_MAGIC = 0xCAFE4A11


def _mounts() -> list[tuple[str, str]]:
    """(mount point, fs type) of every mount in this mount namespace."""
    with open("/proc/self/mounts") as f:
        return [(p[1], p[2]) for p in (line.split() for line in f) if len(p) >= 3]


def _mount(source: str, target: str, fstype: str) -> None:
    os.makedirs(target, exist_ok=True)
    if L.libc.mount(source.encode(), target.encode(), fstype.encode(), 0, None):
        raise BpfError(f"mount {fstype} at {target}", ctypes.get_errno())


def ensure_bpffs() -> str:
    """Mount bpffs at /sys/fs/bpf when it is missing; returns the membrane pin root."""
    if (BPFFS, "bpf") not in _mounts():
        _mount("bpf", BPFFS, "bpf")
    return PIN_ROOT


def ensure_tracefs() -> str:
    if (TRACEFS, "tracefs") not in _mounts():
        _mount("tracefs", TRACEFS, "tracefs")
    return TRACEFS


def cgroup2_root() -> Path:
    """Where the unified (v2) cgroup hierarchy is mounted."""
    for point, fstype in _mounts():
        if fstype == "cgroup2":
            return Path(point)
    raise BpfError("no cgroup2 mount found (cgroup v2 hooks need one)")


def is_pinned(path: str) -> bool:
    return os.path.exists(path)


@contextlib.contextmanager
def temporary_pin_dir() -> Iterator[str]:
    """/sys/fs/bpf/membrane/test-<random> for tests and benchmarks, removed with everything
    pinned in it."""
    ensure_bpffs()
    pin_dir = os.path.join(PIN_ROOT, f"test-{secrets.token_hex(4)}")
    try:
        yield pin_dir
    finally:
        shutil.rmtree(pin_dir, ignore_errors=True)
