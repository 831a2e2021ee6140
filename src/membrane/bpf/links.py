"""Attaching programs to hooks. Every attach returns a link that can be pinned (to outlive
this process), updated in place (atomic program swap) and detached.

tcx and XDP use kernel bpf_links (BPF_LINK_CREATE); clsact tc is the fallback for kernels
without tcx and persists by itself (no link to pin).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno as E
import os
from dataclasses import dataclass

from membrane.bpf import _libbpf as L
from membrane.bpf.errors import AttachError, BpfError, captured_log
from membrane.bpf.maps import obj_get
from membrane.bpf.object import Program

# enum bpf_attach_type values used here
BPF_CGROUP_INET_INGRESS, BPF_CGROUP_INET_EGRESS = 0, 1
BPF_CGROUP_INET4_CONNECT, BPF_CGROUP_INET6_CONNECT = 10, 11
BPF_CGROUP_UDP4_SENDMSG = 14
BPF_XDP = 37
BPF_TCX_INGRESS, BPF_TCX_EGRESS = 46, 47

XDP_MODES = {"native": L.XDP_FLAGS_DRV_MODE, "generic": L.XDP_FLAGS_SKB_MODE}


class LinkInfo(ctypes.Structure):
    """The head of struct bpf_link_info plus the largest union member we read."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("prog_id", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("u", ctypes.c_uint64 * 8),
    ]


# link types whose union starts with an ifindex (xdp: ifindex; tcx: ifindex, attach_type)
LINK_TYPE_XDP, LINK_TYPE_TCX, LINK_TYPE_NETKIT = 6, 11, 13


class Link:
    """A kernel bpf_link, by fd. `close()` only drops our fd (a pinned link keeps working);
    `detach()` ends the attachment for everyone."""

    def __init__(self, fd: int, kind: str, libbpf_link: int | None = None) -> None:
        self.fd = fd
        self.kind = kind
        self._libbpf_link = libbpf_link
        self.pin_path: str | None = None

    @classmethod
    def from_pin(cls, path: str, kind: str = "pinned") -> Link:
        link = cls(obj_get(path), kind)
        link.pin_path = path
        return link

    def info(self) -> LinkInfo:
        info = LinkInfo()
        size = ctypes.c_uint32(ctypes.sizeof(info))
        ret = L.lib.bpf_obj_get_info_by_fd(self.fd, ctypes.byref(info), ctypes.byref(size))
        if ret:
            raise BpfError("bpf_obj_get_info_by_fd(link)", L.errno_of(ret))
        return info

    @property
    def ifindex(self) -> int:
        """Interface of an XDP or tcx link; 0 once the device is gone (link is defunct)."""
        return self.info().u[0] & 0xFFFFFFFF

    def pin(self, path: str) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        ret = L.lib.bpf_obj_pin(self.fd, path.encode())
        if ret:
            raise BpfError(f"pin {self.kind} link at {path}", L.errno_of(ret))
        self.pin_path = path

    def unpin(self) -> None:
        if self.pin_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.pin_path)
            self.pin_path = None

    def update(self, program: Program) -> None:
        """Atomically replace the attached program; traffic never sees no program."""
        ret = L.lib.bpf_link_update(self.fd, program.fd, None)
        if ret:
            raise BpfError(f"update {self.kind} link", L.errno_of(ret))

    def detach(self) -> None:
        """Detach in the kernel, remove our pin and close the fd. Tracing links
        (tracepoint, uprobe, perf_event, raw_tp) refuse BPF_LINK_DETACH with EOPNOTSUPP:
        they end when their last fd and pin are gone, which the unpin and close do."""
        ret = L.lib.bpf_link_detach(self.fd)
        if ret and L.errno_of(ret) not in (E.ENOLINK, E.EINVAL, E.EOPNOTSUPP):
            raise BpfError(f"detach {self.kind} link", L.errno_of(ret))
        self.unpin()
        self.close()

    def close(self) -> None:
        """Drop our handle. A pinned link stays attached; an unpinned one ends here, as
        it would when the kernel sees its last fd close."""
        if self._libbpf_link:
            if self.pin_path:
                # A disconnected libbpf link is freed without closing anything, so close
                # the link fd ourselves. libbpf 1.1 offers no way to close the perf event
                # fd of a tracing link without disabling the event: that one fd stays open
                # until the process exits (the pinned link holds its own reference).
                L.lib.bpf_link__disconnect(self._libbpf_link)
                os.close(self.fd)
            L.lib.bpf_link__destroy(self._libbpf_link)
            self._libbpf_link = None
        elif self.fd >= 0:
            os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> Link:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


def _link_create(prog: Program, target_fd: int, attach_type: int, flags: int = 0) -> int:
    opts = L.LinkCreateOpts(sz=ctypes.sizeof(L.LinkCreateOpts), flags=flags)
    fd = L.lib.bpf_link_create(prog.fd, target_fd, attach_type, ctypes.byref(opts))
    return fd


def _from_libbpf(ptr: int | None, kind: str, what: str) -> Link:
    if not ptr:
        raise AttachError(f"attach {what}", ctypes.get_errno() or E.EINVAL)
    return Link(L.lib.bpf_link__fd(ptr), kind, libbpf_link=ptr)


# ---- networking ------------------------------------------------------------------------
def attach_xdp(prog: Program, ifindex: int, mode: str = "auto") -> tuple[Link, str]:
    """Attach XDP as a bpf_link. mode: native, generic or auto (native, else generic).
    Returns the link and the mode that took."""
    modes = ["native", "generic"] if mode == "auto" else [mode]
    err = E.EINVAL
    for m in modes:
        fd = _link_create(prog, ifindex, BPF_XDP, XDP_MODES[m])
        if fd >= 0:
            return Link(fd, f"xdp-{m}"), m
        err = L.errno_of(fd)
        if err in (E.EBUSY, E.EEXIST, E.ENODEV):
            break
    raise AttachError(f"attach XDP ({mode}) to ifindex {ifindex}", err)


BPF_TC_F_REPLACE = 1
# How attach_tc may attach: tcx when the kernel has it (else clsact), or only one of them.
TC_MODES = ("auto", "tcx", "clsact")


@dataclass(frozen=True)
class TcSlot:
    """Where a clsact filter sits on its hook: a priority and a handle chosen by its owner.
    A fixed slot is what lets a later process find the filter again (bpf_tc_query), swap
    its program atomically (BPF_TC_F_REPLACE on the same slot) and remove it; a filter
    in a kernel-chosen slot is lost once the process that attached it forgets it."""

    priority: int
    handle: int


@dataclass
class ClsactAttachment:
    """tc clsact fallback for kernels without tcx. Persists without pins."""

    ifindex: int
    direction: str
    handle: int
    priority: int
    kind: str = "clsact"
    pin_path: str | None = None

    @property
    def slot(self) -> TcSlot:
        return TcSlot(self.priority, self.handle)

    def _hook(self) -> L.TcHook:
        return _tc_hook(self.ifindex, self.direction)

    def update(self, program: Program) -> None:
        """Swap the program in the same slot: the kernel replaces the filter in place."""
        opts = L.TcOpts(
            sz=ctypes.sizeof(L.TcOpts),
            prog_fd=program.fd,
            flags=BPF_TC_F_REPLACE,
            handle=self.handle,
            priority=self.priority,
        )
        ret = L.lib.bpf_tc_attach(ctypes.byref(self._hook()), ctypes.byref(opts))
        if ret:
            raise BpfError("replace clsact program", L.errno_of(ret))

    def program_id(self) -> int | None:
        """Id of the program in this slot, or None when the slot (or device) is empty."""
        opts = L.TcOpts(sz=ctypes.sizeof(L.TcOpts), handle=self.handle, priority=self.priority)
        ret = L.lib.bpf_tc_query(ctypes.byref(self._hook()), ctypes.byref(opts))
        if ret:
            if L.errno_of(ret) in (E.ENOENT, E.EINVAL, E.ENODEV):
                return None
            raise BpfError("query clsact program", L.errno_of(ret))
        return opts.prog_id

    def detach(self) -> None:
        """Remove the filter in this slot; nothing to do when it (or its device) is gone."""
        opts = L.TcOpts(sz=ctypes.sizeof(L.TcOpts), handle=self.handle, priority=self.priority)
        ret = L.lib.bpf_tc_detach(ctypes.byref(self._hook()), ctypes.byref(opts))
        if ret and L.errno_of(ret) not in (E.ENOENT, E.ENODEV):
            raise BpfError("detach clsact program", L.errno_of(ret))

    def pin(self, path: str) -> None:
        """Nothing to pin: clsact filters live as long as the device."""

    def close(self) -> None:
        """Nothing to release."""


def _tc_hook(ifindex: int, direction: str) -> L.TcHook:
    point = L.BPF_TC_INGRESS if direction == "ingress" else L.BPF_TC_EGRESS
    return L.TcHook(sz=ctypes.sizeof(L.TcHook), ifindex=ifindex, attach_point=point)


def attach_tc(
    prog: Program,
    ifindex: int,
    direction: str = "ingress",
    mode: str = "auto",
    slot: TcSlot | None = None,
) -> Link | ClsactAttachment:
    """Attach a tc program. mode: auto (tcx when the kernel has it, clsact otherwise),
    tcx or clsact. On clsact, `slot` places the filter where its owner can find it again;
    a filter already in that slot is replaced atomically (never a second one beside it).
    Without a slot the kernel picks one."""
    if direction not in ("ingress", "egress"):
        raise ValueError(f"direction must be ingress or egress, not {direction!r}")
    if mode not in TC_MODES:
        raise ValueError(f"mode must be one of {', '.join(TC_MODES)}, not {mode!r}")
    if mode != "clsact":
        attach_type = BPF_TCX_INGRESS if direction == "ingress" else BPF_TCX_EGRESS
        fd = _link_create(prog, ifindex, attach_type)
        if fd >= 0:
            return Link(fd, f"tcx-{direction}")
        err = L.errno_of(fd)
        if mode == "tcx" or err not in (E.EINVAL, E.EOPNOTSUPP, E.ENOTSUP):
            raise AttachError(f"attach tcx {direction} to ifindex {ifindex}", err)
    hook = _tc_hook(ifindex, direction)
    ret = L.lib.bpf_tc_hook_create(ctypes.byref(hook))
    if ret and L.errno_of(ret) != E.EEXIST:
        raise AttachError(f"create clsact on ifindex {ifindex}", L.errno_of(ret))
    opts = L.TcOpts(sz=ctypes.sizeof(L.TcOpts), prog_fd=prog.fd)
    if slot is not None:
        opts.handle, opts.priority, opts.flags = slot.handle, slot.priority, BPF_TC_F_REPLACE
    ret = L.lib.bpf_tc_attach(ctypes.byref(hook), ctypes.byref(opts))
    if ret:
        raise AttachError(f"attach clsact {direction} to ifindex {ifindex}", L.errno_of(ret))
    return ClsactAttachment(ifindex, direction, opts.handle, opts.priority)


def attach_cgroup(prog: Program, cgroup_path: str, attach_type: int) -> Link:
    """Attach to a cgroup v2 directory (e.g. BPF_CGROUP_INET4_CONNECT)."""
    dfd = os.open(cgroup_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = _link_create(prog, dfd, attach_type)
    finally:
        os.close(dfd)
    if fd < 0:
        raise AttachError(f"attach cgroup program to {cgroup_path}", L.errno_of(fd))
    return Link(fd, "cgroup")


# ---- tracing ---------------------------------------------------------------------------
def attach_tracepoint(prog: Program, category: str, name: str) -> Link:
    with captured_log():
        ptr = L.lib.bpf_program__attach_tracepoint(prog.ptr, category.encode(), name.encode())
    return _from_libbpf(ptr, "tracepoint", f"tracepoint {category}:{name}")


def attach_raw_tracepoint(prog: Program, name: str) -> Link:
    with captured_log():
        ptr = L.lib.bpf_program__attach_raw_tracepoint(prog.ptr, name.encode())
    return _from_libbpf(ptr, "raw_tp", f"raw tracepoint {name}")


def attach_auto(prog: Program) -> Link:
    """Attach by section name (tp_btf/..., fentry/..., lsm/..., iter/...)."""
    with captured_log():
        ptr = L.lib.bpf_program__attach(prog.ptr)
    return _from_libbpf(ptr, prog.section.split("/")[0], f"program {prog.name} ({prog.section})")


def attach_kprobe(prog: Program, func: str, retprobe: bool = False) -> Link:
    """Attach a kprobe (or kretprobe) to kernel function `func`."""
    with captured_log():
        ptr = L.lib.bpf_program__attach_kprobe(prog.ptr, retprobe, func.encode())
    return _from_libbpf(ptr, "kretprobe" if retprobe else "kprobe", f"kprobe {func}")


def attach_uprobe(
    prog: Program,
    binary: str,
    func: str | None = None,
    offset: int = 0,
    pid: int = -1,
    retprobe: bool = False,
) -> Link:
    """Attach a uprobe by symbol name (resolved by libbpf) or by file offset."""
    opts = L.UprobeOpts(
        sz=ctypes.sizeof(L.UprobeOpts), retprobe=retprobe, func_name=func.encode() if func else None
    )
    with captured_log():
        ptr = L.lib.bpf_program__attach_uprobe_opts(
            prog.ptr, pid, binary.encode(), offset, ctypes.byref(opts)
        )
    target = f"{binary}:{func or hex(offset)}"
    return _from_libbpf(ptr, "uretprobe" if retprobe else "uprobe", f"uprobe {target}")


# ---- perf events -----------------------------------------------------------------------
PERF_TYPE_HARDWARE, PERF_TYPE_SOFTWARE = 0, 1
PERF_COUNT_SW_CPU_CLOCK = 0
_PERF_FLAG_FREQ = 1 << 10  # attr.freq bit in the flags word
_NR_PERF_EVENT_OPEN = 298  # x86_64


class PerfEventAttr(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("size", ctypes.c_uint32),
        ("config", ctypes.c_uint64),
        ("sample_period_or_freq", ctypes.c_uint64),
        ("sample_type", ctypes.c_uint64),
        ("read_format", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("rest", ctypes.c_uint8 * 64),
    ]


def open_perf_event(
    cpu: int,
    *,
    type_: int = PERF_TYPE_SOFTWARE,
    config: int = PERF_COUNT_SW_CPU_CLOCK,
    freq: int = 0,
    period: int = 0,
    pid: int = -1,
) -> int:
    """perf_event_open(2) for sampling; returns the event fd."""
    attr = PerfEventAttr(type=type_, size=ctypes.sizeof(PerfEventAttr), config=config)
    if freq:
        attr.sample_period_or_freq = freq
        attr.flags = _PERF_FLAG_FREQ
    else:
        attr.sample_period_or_freq = period or 1
    fd = L.libc.syscall(_NR_PERF_EVENT_OPEN, ctypes.byref(attr), pid, cpu, -1, 8)  # CLOEXEC
    if fd < 0:
        raise AttachError(f"perf_event_open on cpu {cpu}", ctypes.get_errno())
    return fd


def attach_perf_event(prog: Program, perf_fd: int) -> Link:
    with captured_log():
        ptr = L.lib.bpf_program__attach_perf_event(prog.ptr, perf_fd)
    return _from_libbpf(ptr, "perf_event", f"perf event fd {perf_fd}")


def attach_cpu_sampler(prog: Program, cpu: int, freq: int) -> Link:
    """Run `prog` `freq` times a second on `cpu` (a software cpu-clock event, which works
    where hardware counters do not). The link owns the event and closes it."""
    fd = open_perf_event(cpu, freq=freq)
    try:
        return attach_perf_event(prog, fd)
    except AttachError:
        os.close(fd)
        raise
