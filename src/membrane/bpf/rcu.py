"""Waiting until no BPF program still runs on what it read before now.

Programs of the networking hooks (XDP, tc) run inside RCU read-side sections, so once an
RCU grace period has passed, every run that started earlier has returned. User space has
no synchronize_rcu(); membarrier(MEMBARRIER_CMD_GLOBAL) is implemented with one (since
Linux 4.16; 4.20 unified the RCU flavours, so it also waits for softirq sections).
"""

from __future__ import annotations

import ctypes
import time

_SYS_MEMBARRIER = 324  # x86-64
_MEMBARRIER_CMD_GLOBAL = 1
# A program run lasts microseconds: where membarrier is refused (nohz_full CPUs), a pause
# far longer than any run is the best user space can do.
_FALLBACK_PAUSE_S = 0.05

_libc = ctypes.CDLL(None, use_errno=True)


def wait_for_running_programs() -> None:
    """Return once every BPF program that was running when called has returned."""
    if _libc.syscall(_SYS_MEMBARRIER, _MEMBARRIER_CMD_GLOBAL, 0) != 0:
        time.sleep(_FALLBACK_PAUSE_S)
