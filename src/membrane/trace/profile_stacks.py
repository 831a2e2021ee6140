"""The stacks `membrane trace profile` counted in the kernel (bpf/trace_profile.bpf.c),
read back once at the end of the run and named.

Names are looked up in batches: all distinct kernel addresses in one search of kallsyms,
the user addresses of each program image in one call of the symbolizer, which parses a
file only when one of them falls into it. Stacks that differ only in return addresses
within the same functions are merged once named.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from membrane.abi import PROFILE_NO_STACK
from membrane.bpf.maps import Map
from membrane.trace import flamegraph
from membrane.trace.output import text
from membrane.trace.session import TraceSession
from membrane.trace.symbols import Symbolizer, demangle, return_targets

TOTALS = (  # of the kernel's per-CPU profile_stats, in the summary as they are
    "samples",
    "lost",
    "kernel_stack_eexist",
    "kernel_stack_efault",
    "kernel_stack_other",
    "user_stack_eexist",
    "user_stack_efault",
    "user_stack_other",
    "stack_collisions",
)
_NO_FRAMES = np.zeros(0, dtype=np.uint64)


@dataclass(frozen=True)
class Stack:
    """One counted stack; frames innermost first, as the kernel records them."""

    pid: int
    comm: str
    samples: int
    kernel: list[str]
    user: list[str]
    kernel_error: str | None  # errno name when the kernel stack id was an error
    user_error: str | None

    def record(self) -> dict[str, Any]:
        """The JSON form; field names are a stable contract."""
        return {
            "pid": self.pid,
            "comm": self.comm,
            "samples": self.samples,
            "kernel_stack": self.kernel,
            "user_stack": self.user,
            "kernel_stack_error": self.kernel_error,
            "user_stack_error": self.user_error,
        }

    def folded_frames(self) -> list[str]:
        """Root first: the command, the user frames, then the kernel frames marked _[k]."""
        user = ["[missing user stack]"] if self.user_error else self.user
        kernel = ["[missing kernel stack]"] if self.kernel_error else self.kernel
        return [
            self.comm,
            *reversed(user),
            *(f + flamegraph.KERNEL_SUFFIX for f in reversed(kernel)),
        ]

    def text(self) -> str:
        """bcc profile's layout: kernel frames, `--`, user frames, `- comm (pid)`, count."""
        lines = []
        if self.kernel_error:
            lines.append("[missing kernel stack]")
        lines += self.kernel
        if lines and (self.user or self.user_error):
            lines.append("--")
        if self.user_error:
            lines.append("[missing user stack]")
        lines += self.user
        lines.append(f"{'-':<16} {self.comm} ({self.pid})")
        return "".join(f"    {line}\n" for line in lines) + f"        {self.samples}\n"


def _errno_name(stack: int) -> str | None:
    if stack >= 0 or stack == PROFILE_NO_STACK:
        return None
    return errno.errorcode.get(-stack, str(-stack))


def _stored_stacks(stack_map: Map) -> dict[int, np.ndarray]:
    """Stack id -> its return addresses, innermost first."""
    stacks = {}
    for stack_id, value in stack_map.lookup_batch():
        offset = type(value).ips.offset
        stacks[stack_id] = np.frombuffer(value, dtype="<u8", count=value.depth, offset=offset)
    return stacks


def _targets(ids: Iterable[int], stored: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """The addresses to name of the stacks `ids` (see symbols.return_targets)."""
    return {i: return_targets(stored.get(i, _NO_FRAMES)) for i in ids}


def _named(
    targets: dict[int, np.ndarray], names_of: Callable[[np.ndarray], list[str]]
) -> dict[int, tuple[str, ...]]:
    """Frame names of stacks (id -> addresses to name), with one call of `names_of` for
    all their distinct addresses."""
    if not targets:
        return {}
    distinct, where = np.unique(np.concatenate(list(targets.values())), return_inverse=True)
    names = names_of(distinct)
    named, pos = {}, 0
    for stack_id, frames in targets.items():
        named[stack_id] = tuple(names[i] for i in where[pos : pos + len(frames)].tolist())
        pos += len(frames)
    return named


def collect(
    session: TraceSession, symbolizer: Symbolizer, kernel_stacks: bool
) -> tuple[list[Stack], dict[str, int]]:
    """The counted stacks, symbolized, hottest first, and the kernel's totals (call after
    the programs are detached, so that nothing changes between the reads)."""
    per_cpu = session.map("stats").lookup(0)
    totals = {name: sum(getattr(s, name) for s in per_cpu) for name in TOTALS}
    entries = session.map("counts").lookup_batch()
    stored = _stored_stacks(session.map("stacks"))

    kernel = _named(
        _targets({key.kernel_stack for key, _ in entries if key.kernel_stack >= 0}, stored),
        Symbolizer.kernel_names,
    )
    latest: dict[int, int] = {}  # pid -> the last program it was seen running (exec_id)
    per_image: dict[tuple[int, int], set[int]] = {}
    for key, _ in entries:
        pid, exec_id = key.image.pid, key.image.exec_id
        latest[pid] = max(exec_id, latest.get(pid, 0))
        if key.user_stack >= 0:
            per_image.setdefault((pid, exec_id), set()).add(key.user_stack)
    user: dict[tuple[int, int, int], tuple[str, ...]] = {}
    for (pid, exec_id), ids in per_image.items():
        targets = _targets(ids, stored)
        if latest[pid] == exec_id and symbolizer.outside(
            pid, exec_id, np.concatenate(list(targets.values()))
        ):
            symbolizer.refresh(pid, exec_id)  # it mapped code the profile did not see
        named = _named(targets, lambda t, p=pid, e=exec_id: symbolizer.names(p, e, t))
        user.update({(pid, exec_id, i): frames for i, frames in named.items()})

    # Stack ids differ by every return address; stacks equal once symbolized are one.
    merged: dict[tuple, int] = {}
    for key, count in entries:
        pid, exec_id = key.image.pid, key.image.exec_id
        kernel_frames = kernel.get(key.kernel_stack, ())
        user_frames = user.get((pid, exec_id, key.user_stack), ())
        errors = (_errno_name(key.kernel_stack), _errno_name(key.user_stack))
        if not kernel_frames and not user_frames and errors == (None, None):
            # Only one kind of stack was taken (-K or -U) and this sample has none of it.
            kernel_frames, user_frames = (
                (("[user mode]",), ()) if kernel_stacks else ((), ("[kernel thread]",))
            )
        ident = (pid, text(key.comm), kernel_frames, user_frames, *errors)
        merged[ident] = merged.get(ident, 0) + count
    readable = demangle(name for _, _, _, frames, *_ in merged for name in frames)
    stacks = [
        Stack(
            pid=pid,
            comm=comm,
            samples=count,
            kernel=list(kernel_frames),
            user=[readable.get(name, name) for name in user_frames],
            kernel_error=kernel_error,
            user_error=user_error,
        )
        for (pid, comm, kernel_frames, user_frames, kernel_error, user_error), count in (
            merged.items()
        )
    ]
    stacks.sort(key=lambda s: (-s.samples, s.pid, s.comm))
    return stacks, totals
