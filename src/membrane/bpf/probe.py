"""Feature probe: which hooks, map types and helpers this kernel lets us use.

Every feature is probed by doing the real thing, loading a tiny program from
bpf/probe.bpf.c and attaching it to a throwaway target, because what a kernel declares
(its config, its BTF) and what it permits differ: fentry passes every static check on our
VMs and still fails to load with EPERM, and kprobe programs load but have nothing to
attach to. Probes leave nothing behind: links are detached, the veth pair lives in a
temporary network namespace and the cgroup hooks in a temporary child cgroup, and both
are removed even when a probe fails.

Other modules ask `supports(name)`; it probes only the group the feature belongs to, once
per process.
"""

from __future__ import annotations

import contextlib
import errno as E
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from membrane import netns
from membrane.bpf import _libbpf as L
from membrane.bpf.errors import AttachError, BpfError, LoadError
from membrane.bpf.fs import cgroup2_root
from membrane.bpf.links import (
    BPF_CGROUP_INET4_CONNECT,
    BPF_CGROUP_INET_INGRESS,
    Link,
    attach_auto,
    attach_cgroup,
    attach_cpu_sampler,
    attach_raw_tracepoint,
    attach_tc,
    attach_tracepoint,
    attach_uprobe,
    attach_xdp,
)
from membrane.bpf.maps import LPM_TRIE, LRU_HASH, PERCPU_ARRAY, RINGBUF, STACK_TRACE
from membrane.bpf.object import BpfObject, Program

PROBE_OBJECT = "probe"
_SO_COOKIE = 57  # asm-generic/socket.h

# What loading and attaching the probes takes (bit numbers from linux/capability.h).
CAPABILITIES = {"CAP_NET_ADMIN": 12, "CAP_SYS_ADMIN": 21, "CAP_PERFMON": 38, "CAP_BPF": 39}

# Failures that mean "the kernel (or this machine) does not allow it", never a bug here.
_REFUSALS = (BpfError, OSError, NetlinkError)


@dataclass(frozen=True)
class Feature:
    name: str
    category: str
    supported: bool
    detail: str  # what the probe did, or why it failed (the kernel's errno text)


# A check does the real thing against its group's target (an ifindex, a cgroup, or None)
# and returns what it did; it raises when the kernel refuses.
Check = Callable[[Any], str]
# Runs a callable against the group's target, wherever that target is reachable.
Runner = Callable[[Callable[[Any], Feature]], Feature]


@dataclass(frozen=True)
class _Group:
    category: str
    environment: Callable[[], contextlib.AbstractContextManager[Runner]]
    checks: dict[str, Check]


# ---- privileges and targets that other code reuses ------------------------------------
def missing_capabilities(needed: tuple[str, ...] = tuple(CAPABILITIES)) -> list[str]:
    """The capabilities in `needed` that this process does not have in effect."""
    with open("/proc/self/status") as f:
        effective = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
    return [name for name in needed if not effective >> CAPABILITIES[name] & 1]


def libc_path() -> str:
    """The C library mapped into this process: a uprobe target that surely exists."""
    with open("/proc/self/maps") as f:
        for line in f:
            path = line.split()[-1]
            if os.path.basename(path).startswith("libc.so"):
                return path
    raise BpfError("libc is not mapped into this process")


@contextlib.contextmanager
def temporary_cgroup(prefix: str = "membrane-probe") -> Iterator[Path]:
    """A new child of the cgroup v2 root, removed on exit. Removal waits (bounded) for
    processes moved into it to be gone, as rmdir fails with EBUSY until they are."""
    path = cgroup2_root() / f"{prefix}-{uuid.uuid4().hex[:12]}"
    path.mkdir()
    try:
        yield path
    finally:
        deadline = time.monotonic() + 5.0
        while True:
            try:
                path.rmdir()
                break
            except OSError as err:
                if err.errno != E.EBUSY or time.monotonic() > deadline:
                    raise
            time.sleep(0.01)


# ---- environments -----------------------------------------------------------------------
@contextlib.contextmanager
def _veth_in_temporary_netns() -> Iterator[Runner]:
    """A veth pair in a new network namespace, deleted (devices and all) on exit. Checks
    run with this thread inside the namespace, because the kernel resolves the ifindex
    given to XDP and tc attach in the caller's namespace."""
    name = netns.create(f"membrane-probe-{uuid.uuid4().hex[:12]}")
    try:
        netns.add_veth(name, "probe0", name, "probe1")
        index = netns.ifindex(name, "probe0")

        def run(fn: Callable[[Any], Feature]) -> Feature:
            with netns.inside(name):
                return fn(index)

        yield run
    finally:
        netns.delete(name)


@contextlib.contextmanager
def _cgroup() -> Iterator[Runner]:
    with temporary_cgroup() as path:
        yield lambda fn: fn(path)


@contextlib.contextmanager
def _nothing() -> Iterator[Runner]:
    yield lambda fn: fn(None)


# ---- checks -----------------------------------------------------------------------------
Attach = Callable[[Program, contextlib.ExitStack, Any], str]


@contextlib.contextmanager
def _loaded_alone(program: str, maps: tuple[str, ...]) -> Iterator[Program]:
    """Load `program` of the probe object with every other program switched off and only
    the maps it uses created."""
    obj = BpfObject.open(PROBE_OBJECT)
    try:
        for prog in obj.programs.values():
            prog.autoload = prog.name == program
        for name in obj.map_names():
            L.lib.bpf_map__set_autocreate(obj._map_ptr(name), name in maps)
        obj.load()
        yield obj.program(program)
    finally:
        obj.close()


def _program(program: str, attach: Attach | None = None, maps: tuple[str, ...] = ()) -> Check:
    """Load `program` alone, then attach it when `attach` is given (helper probes only
    load: the verifier's verdict on the call is the answer)."""

    def check(target: Any) -> str:
        with contextlib.ExitStack() as cleanup:  # unwinds: detach first, then close
            prog = cleanup.enter_context(_loaded_alone(program, maps))
            if attach is None:
                return "the verifier accepts a program that calls it"
            return attach(prog, cleanup, target)

    return check


def _keep(cleanup: contextlib.ExitStack, link: Link) -> None:
    cleanup.callback(link.detach)


def _xdp(mode: str) -> Attach:
    def attach(prog: Program, cleanup: contextlib.ExitStack, ifindex: int) -> str:
        _keep(cleanup, attach_xdp(prog, ifindex, mode)[0])
        return f"attached to a veth in {mode} mode"

    return attach


def _tcx(prog: Program, cleanup: contextlib.ExitStack, ifindex: int) -> str:
    cleanup.callback(attach_tc(prog, ifindex, "ingress", mode="tcx").detach)  # never clsact
    return "attached to a veth's ingress as a tcx link"


def _sock_destroy(_: int) -> str:
    """sock_diag's SOCK_DESTROY (CONFIG_INET_DIAG_DESTROY), with which the agent closes the
    socket LB's connections to removed backends: tried on a listener of the namespace."""
    from membrane.service.terminate import Target, destroy_here

    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        sock.listen()
        cookie = int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, _SO_COOKIE, 8), "little")
        if not destroy_here([Target("0.0.0.0", 0, frozenset({cookie}))]):
            raise BpfError("the listening socket was not found to destroy")
    return "destroyed a listening socket through sock_diag"


def _clsact(prog: Program, cleanup: contextlib.ExitStack, ifindex: int) -> str:
    cleanup.callback(attach_tc(prog, ifindex, "ingress", mode="clsact").detach)
    return "attached to a veth's ingress through a clsact qdisc"


def _cgroup_hook(attach_type: int, hook: str) -> Attach:
    def attach(prog: Program, cleanup: contextlib.ExitStack, cgroup: Path) -> str:
        _keep(cleanup, attach_cgroup(prog, str(cgroup), attach_type))
        return f"attached to a temporary cgroup's {hook} hook"

    return attach


def _tracepoint(prog: Program, cleanup: contextlib.ExitStack, _: None) -> str:
    _keep(cleanup, attach_tracepoint(prog, "syscalls", "sys_enter_getpid"))
    return "attached to syscalls:sys_enter_getpid"


def _raw_tp(prog: Program, cleanup: contextlib.ExitStack, _: None) -> str:
    _keep(cleanup, attach_raw_tracepoint(prog, "sys_enter"))
    return "attached to raw tracepoint sys_enter"


def _by_section(prog: Program, cleanup: contextlib.ExitStack, _: None) -> str:
    _keep(cleanup, attach_auto(prog))
    return f"attached to {prog.section}"


def _uprobe(prog: Program, cleanup: contextlib.ExitStack, _: None) -> str:
    libc = libc_path()
    _keep(cleanup, attach_uprobe(prog, libc, "getpid"))
    return f"attached to {libc}:getpid"


def _perf_event(prog: Program, cleanup: contextlib.ExitStack, _: None) -> str:
    _keep(cleanup, attach_cpu_sampler(prog, cpu=0, freq=1))
    return "attached to a software cpu-clock event"


def _iter_task(prog: Program, cleanup: contextlib.ExitStack, _: None) -> str:
    link = attach_auto(prog)
    _keep(cleanup, link)
    fd = L.lib.bpf_iter_create(link.fd)
    if fd < 0:
        raise AttachError("create a task iterator", L.errno_of(fd))
    with os.fdopen(fd, "rb") as output:
        tasks = len(output.read())  # the program writes one byte per task
    return f"iterated over {tasks} tasks"


def _map(map_type: int) -> Check:
    def check(_: None) -> str:
        ret = L.lib.libbpf_probe_bpf_map_type(map_type, None)
        if ret < 0:
            raise BpfError("map probe", -ret)
        if ret == 0:
            raise BpfError("the kernel refused to create one")
        return "created a test map"

    return check


_GROUPS = [
    _Group(
        "network",
        _veth_in_temporary_netns,
        {
            "xdp_native": _program("probe_xdp", _xdp("native")),
            "xdp_generic": _program("probe_xdp", _xdp("generic")),
            "tcx": _program("probe_tc", _tcx),
            "clsact": _program("probe_tc", _clsact),
            "sock_destroy": _sock_destroy,
        },
    ),
    _Group(
        "cgroup",
        _cgroup,
        {
            "cgroup_connect4": _program(
                "probe_connect4", _cgroup_hook(BPF_CGROUP_INET4_CONNECT, "connect4")
            ),
            "cgroup_skb": _program(
                "probe_cgroup_skb", _cgroup_hook(BPF_CGROUP_INET_INGRESS, "inet ingress")
            ),
        },
    ),
    _Group(
        "tracing",
        _nothing,
        {
            "tracepoint": _program("probe_tracepoint", _tracepoint),
            "raw_tp": _program("probe_raw_tp", _raw_tp),
            "tp_btf": _program("probe_tp_btf", _by_section),
            "kprobe": _program("probe_kprobe", _by_section),
            "fentry": _program("probe_fentry", _by_section),
            "fexit": _program("probe_fexit", _by_section),
            "lsm": _program("probe_lsm", _by_section),
            "uprobe": _program("probe_uprobe", _uprobe),
            "perf_event": _program("probe_perf_event", _perf_event),
            "iter_task": _program("probe_iter_task", _iter_task),
        },
    ),
    _Group(
        "map",
        _nothing,
        {
            "map_ringbuf": _map(RINGBUF),
            "map_lpm_trie": _map(LPM_TRIE),
            "map_lru_hash": _map(LRU_HASH),
            "map_percpu_array": _map(PERCPU_ARRAY),
            "map_stack_trace": _map(STACK_TRACE),
        },
    ),
    _Group(
        "helper",
        _nothing,
        {
            # Real programs, not libbpf_probe_bpf_helper: libbpf 1.1 looks for a verifier
            # message that kernel 6.18 no longer prints ("program of this type cannot use
            # helper" replaced "unknown func"), so it calls every helper supported.
            "helper_send_signal": _program("probe_send_signal"),
            "helper_get_stack": _program("probe_get_stack"),
            "helper_task_storage": _program("probe_task_storage", maps=("probe_task_storage_map",)),
        },
    ),
]


# ---- running ----------------------------------------------------------------------------
def _why(err: Exception) -> str:
    reason = (
        os.strerror(err.errno) if isinstance(err, OSError | BpfError) and err.errno else str(err)
    )
    if isinstance(err, LoadError):
        return f"load failed: {reason}"
    if isinstance(err, AttachError):
        return f"attach failed: {reason}"
    return reason


def _run_group(group: _Group) -> list[Feature]:
    def feature(name: str, check: Check) -> Callable[[Any], Feature]:
        def run(target: Any) -> Feature:
            try:
                return Feature(name, group.category, True, check(target))
            except _REFUSALS as err:
                return Feature(name, group.category, False, _why(err))

        return run

    with contextlib.ExitStack() as stack:
        try:
            runner = stack.enter_context(group.environment())
        except _REFUSALS as err:
            return [
                Feature(name, group.category, False, f"probe setup failed: {err}")
                for name in group.checks
            ]
        return [runner(feature(name, check)) for name, check in group.checks.items()]


def feature_names() -> list[str]:
    return [name for group in _GROUPS for name in group.checks]


def probe_features() -> list[Feature]:
    """Probe every feature now (about a second; needs root)."""
    return [feature for group in _GROUPS for feature in _run_group(group)]


@cache
def _group_results(category: str) -> dict[str, Feature]:
    group = next(g for g in _GROUPS if g.category == category)
    return {f.name: f for f in _run_group(group)}


def supports(name: str) -> bool:
    """Whether the kernel lets us use feature `name`. The feature's group is probed on the
    first question and remembered for the life of the process."""
    for group in _GROUPS:
        if name in group.checks:
            return _group_results(group.category)[name].supported
    raise KeyError(f"unknown feature {name!r} (known: {', '.join(feature_names())})")
