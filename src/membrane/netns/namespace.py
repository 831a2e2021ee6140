"""Named network namespaces: create, delete, and run Python code inside one.

Namespaces are bind-mounted under /run/netns, exactly where iproute2 keeps them, so a person
can follow along with `ip netns exec NAME ...`. In-process code enters a namespace with
setns() on the calling thread only (`inside`): `ip netns exec` would also remount /sys, and
a whole-process switch would pull every other thread (event loops, the agent) along with it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

from pyroute2 import IPRoute
from pyroute2 import netns as _netns

RUN_DIR = "/run/netns"
_THREAD_NS = "/proc/thread-self/ns/net"

_libc = ctypes.CDLL(None, use_errno=True)
_CLONE_NEWNET = 0x40000000
_MS_BIND, _MS_REC, _MS_SHARED = 0x1000, 0x4000, 1 << 20


def path(ns: str) -> str:
    """The namespace file: a name under /run/netns, or an absolute path as given (a CNI
    plugin is handed /proc/PID/ns/net or a runtime's own bind mount)."""
    if ns.startswith("/"):
        return ns
    if not ns or "/" in ns or ns in (".", ".."):
        raise ValueError(f"invalid namespace name {ns!r}")
    return f"{RUN_DIR}/{ns}"


def exists(ns: str) -> bool:
    return os.path.exists(path(ns))


def names() -> list[str]:
    """Names of the namespaces under /run/netns."""
    return sorted(_netns.listnetns(RUN_DIR))


def create(ns: str) -> str:
    """Create namespace `ns` with loopback up (what most tools expect); fails if it exists.
    Returns the name."""
    if exists(ns):
        raise FileExistsError(f"network namespace {ns} already exists")
    _bind_new_namespace(path(ns))
    try:
        with inside(ns), IPRoute() as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
    except BaseException:
        delete(ns)
        raise
    return ns


def _bind_new_namespace(file: str) -> None:
    """What `ip netns add` does, without forking (pyroute2's create forks a child: ~6 ms
    against ~0.6 ms here): unshare a new network namespace on this thread only, bind-mount
    it at `file`, and return the thread to where it was."""
    _share_run_dir(os.path.dirname(file))
    os.close(os.open(file, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0))
    try:
        own = os.open(_THREAD_NS, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _check(_libc.unshare(_CLONE_NEWNET), "unshare(CLONE_NEWNET)")
            try:
                # thread-self, not self: /proc/self is the thread-group leader's namespace
                _check(
                    _libc.mount(_THREAD_NS.encode(), file.encode(), b"none", _MS_BIND, None),
                    f"bind-mount the new network namespace at {file}",
                )
            finally:
                _netns.setns(own, flags=0)
        finally:
            os.close(own)
    except BaseException:
        os.unlink(file)
        raise


def _share_run_dir(run_dir: str) -> None:
    """Make the namespace directory a shared mount point, as iproute2 does, so that a later
    unmount of a namespace reaches the mount namespaces that copied it (else the namespace
    lives on there, and so do its devices)."""
    os.makedirs(run_dir, exist_ok=True)
    if _libc.mount(b"", run_dir.encode(), b"none", _MS_SHARED | _MS_REC, None) == 0:
        return
    _check(
        _libc.mount(run_dir.encode(), run_dir.encode(), b"none", _MS_BIND | _MS_REC, None),
        f"bind-mount {run_dir} onto itself",
    )
    _check(
        _libc.mount(b"", run_dir.encode(), b"none", _MS_SHARED | _MS_REC, None),
        f"make {run_dir} a shared mount",
    )


def _check(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno() or errno.EIO
        raise OSError(code, f"{what}: {os.strerror(code)}")


def delete(ns: str) -> None:
    """Unmount and remove the namespace file. The kernel frees the namespace (and its
    devices: a veth's peer elsewhere goes too) once no process is left in it. Deleting a
    namespace that is already gone is not an error, so cleanup can always call this."""
    if exists(ns):
        _netns.remove(path(ns))


@contextmanager
def inside(ns: str) -> Iterator[None]:
    """Run the body with the current thread in namespace `ns`, and put it back afterwards
    (also on an exception). Sockets opened inside (pyroute2, BPF ifindex lookups, XDP/tc
    attach by ifindex) stay bound to `ns` after the block. Other threads are unaffected,
    but a thread started inside the block starts in `ns` (threads inherit namespaces)."""
    own = os.open(_THREAD_NS, os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(path(ns), os.O_RDONLY | os.O_CLOEXEC)
        try:
            _netns.setns(target, flags=0)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _netns.setns(own, flags=0)
    finally:
        os.close(own)


def ifindex(ns: str, dev: str) -> int:
    """Interface index of `dev` in `ns` (ifindexes are per namespace: eth0 is 2 in many)."""
    with inside(ns):
        try:
            return socket.if_nametoindex(dev)
        except OSError:
            raise LookupError(f"no device {dev!r} in network namespace {ns}") from None
