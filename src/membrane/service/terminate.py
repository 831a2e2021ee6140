"""Close the connections the socket LB made to backends that were removed (as Cilium's
--bpf-lb-sock-terminate-pod-connections): without it a connected UDP socket keeps sending
to an address nobody serves any more, and a TCP one waits for its timeouts.

The sockets are found by their cookies (the socket LB recorded each translated socket in
svc_sock) and their destination, in every network namespace of the node (pods and the node
itself), and destroyed with sock_diag's SOCK_DESTROY (the kernel resets a TCP socket and
reports ECONNABORTED to its owner). That needs CONFIG_INET_DIAG_DESTROY, which Debian and
Ubuntu kernels have; where it is missing (EOPNOTSUPP) nothing is closed, and the agent says
so once. bpf_sock_destroy() (Linux 6.5, from socket iterators) would do the same from BPF;
the netlink call needs no program and works on older kernels too.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from membrane import netns

log = logging.getLogger("membrane.service")

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY, SOCK_DESTROY = 20, 21
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x4, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
ALL_STATES = 0xFFFFFFFF
_HDR = struct.Struct("=IHHII")
_REQ = struct.Struct("=BBBBI")  # family, protocol, ext, pad, states (+ the socket id)
_ID = struct.Struct(">HH16s16s")  # ports and addresses in network order
_ID_TAIL = struct.Struct("=I8s")  # interface, cookie (host order, as the kernel keeps it)
_MSG_HEAD = struct.Struct("=BBBB")


@dataclass(frozen=True)
class Target:
    """A removed backend: sockets connected to it whose cookie is in `cookies` go."""

    address: str
    port: int
    cookies: frozenset[int]


class DestroyUnsupported(OSError):
    """The kernel has no SOCK_DESTROY (CONFIG_INET_DIAG_DESTROY off)."""


def _request(sock: socket.socket, kind: int, flags: int, body: bytes, seq: int) -> None:
    sock.send(_HDR.pack(_HDR.size + len(body), kind, flags, seq, 0) + body)


def _messages(sock: socket.socket) -> Iterator[tuple[int, bytes]]:
    """(type, payload) of every reply to one request, until DONE or an ack."""
    while True:
        data = sock.recv(1 << 16)
        offset = 0
        while offset < len(data):
            length, kind, _, _, _ = _HDR.unpack_from(data, offset)
            payload = data[offset + _HDR.size : offset + length]
            offset += (length + 3) & ~3
            if kind == NLMSG_DONE:
                return
            if kind == NLMSG_ERROR:
                (code,) = struct.unpack_from("=i", payload)
                if code:
                    raise OSError(-code, os.strerror(-code))
                return
            yield kind, payload


def _sockets(sock: socket.socket, family: int, protocol: int) -> list[bytes]:
    """The inet_diag socket ids (as the kernel wrote them) of every socket of a kind."""
    sockid = bytes(_ID.size + _ID_TAIL.size)
    _request(
        sock,
        SOCK_DIAG_BY_FAMILY,
        NLM_F_REQUEST | NLM_F_DUMP,
        _REQ.pack(family, protocol, 0, 0, ALL_STATES) + sockid,
        1,
    )
    return [
        payload[_MSG_HEAD.size : _MSG_HEAD.size + _ID.size + _ID_TAIL.size]
        for kind, payload in _messages(sock)
        if kind == SOCK_DIAG_BY_FAMILY
    ]


def destroy_here(targets: Iterable[Target]) -> int:
    """Destroy, in this thread's network namespace, the sockets that `targets` name; how
    many went. DestroyUnsupported where the kernel cannot."""
    wanted = {}
    for t in targets:
        address = ipaddress.ip_address(t.address)
        wanted[(address.version, address.packed.ljust(16, b"\0"), t.port)] = t.cookies
    if not wanted:
        return 0
    destroyed = 0
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as sock:
        for family, version in ((socket.AF_INET, 4), (socket.AF_INET6, 6)):
            for protocol in (socket.IPPROTO_TCP, socket.IPPROTO_UDP):
                for sockid in _sockets(sock, family, protocol):
                    _, dport, _, dst = _ID.unpack_from(sockid)
                    _, cookie_raw = _ID_TAIL.unpack_from(sockid, _ID.size)
                    cookie = int.from_bytes(cookie_raw, "little")
                    cookies = wanted.get((version, dst, dport))
                    if cookies is None or cookie not in cookies:
                        continue
                    body = _REQ.pack(family, protocol, 0, 0, ALL_STATES) + sockid
                    _request(sock, SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, body, 2)
                    try:
                        for _ in _messages(sock):
                            pass
                    except OSError as err:
                        if err.errno == errno.EOPNOTSUPP:
                            raise DestroyUnsupported(err.errno, "SOCK_DESTROY") from None
                        if err.errno != errno.ENOENT:  # closed meanwhile
                            raise
                        continue
                    destroyed += 1
    return destroyed


def destroy_everywhere(namespaces: Iterable[str | None], targets: list[Target]) -> int:
    """`destroy_here` in each network namespace (None: the agent's own)."""
    total = 0
    for ns in namespaces:
        try:
            if ns is None:
                total += destroy_here(targets)
            else:
                with netns.inside(ns):
                    total += destroy_here(targets)
        except DestroyUnsupported:
            raise
        except OSError as err:  # a pod going away meanwhile
            log.debug("socket destroy skipped", extra={"fields": {"netns": ns, "why": str(err)}})
    return total
