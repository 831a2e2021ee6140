"""Waiting for a namespace to be ready, in-process: ICMP echo (no dependency on a `ping`
binary, which a fresh Debian image lacks) and listening sockets (a server started with
`popen` is usable only once it listens)."""

from __future__ import annotations

import secrets
import socket
import struct
import time

from membrane.netns.namespace import inside

_ECHO_REQUEST, _ECHO_REPLY = 8, 0
_ECHO6_REQUEST, _ECHO6_REPLY = 128, 129
_TCP_LISTEN = "0A"


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def ping(ns: str, ip: str, timeout: float = 1.0) -> bool:
    """Send one echo request (ICMP, or ICMPv6 to an IPv6 address) from `ns` to `ip`; True
    when the reply arrives in time."""
    v6 = ":" in ip
    with inside(ns):
        if v6:  # the kernel fills in ICMPv6 checksums and strips the IPv6 header
            sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    request, wanted = (_ECHO6_REQUEST, _ECHO6_REPLY) if v6 else (_ECHO_REQUEST, _ECHO_REPLY)
    with sock:
        # A fresh id per echo: conntrack sees a new flow, not one an earlier ping opened
        ident, seq = secrets.randbits(16), secrets.randbits(16)
        payload = b"membrane-ping"
        csum = 0 if v6 else _checksum(struct.pack("!BBHHH", request, 0, 0, ident, seq) + payload)
        try:
            sock.connect((ip, 0))  # a raw socket then only sees packets from `ip`
            sock.send(struct.pack("!BBHHH", request, 0, csum, ident, seq) + payload)
        except OSError:  # no route (yet): unreachable is an answer, not an error
            return False
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                reply, sender = sock.recvfrom(2048)
            except TimeoutError:
                return False
            icmp = reply if v6 else reply[(reply[0] & 0x0F) * 4 :]  # IPv4: skip the header
            # what queued before connect() took effect may come from anyone
            if len(icmp) >= 8 and socket.inet_pton(sock.family, sender[0]) == socket.inet_pton(
                sock.family, ip
            ):
                kind, _, _, rid, rseq = struct.unpack("!BBHHH", icmp[:8])
                if (kind, rid, rseq) == (wanted, ident, seq):
                    return True
    return False


def wait_ping(ns: str, ip: str, timeout: float = 10.0) -> None:
    """Wait until `ip` answers from `ns` (a fresh veth needs a moment for carrier and ARP);
    TimeoutError if it never does."""
    deadline = time.monotonic() + timeout
    while not ping(ns, ip, timeout=min(1.0, max(0.1, deadline - time.monotonic()))):
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"{ip} does not answer ping from network namespace {ns} within {timeout:g} s"
            )
        time.sleep(0.02)  # an unreachable answer comes back at once: do not spin


def listening(ns: str, port: int) -> bool:
    """Whether a TCP socket listens on `port` in `ns` (any address, IPv4 or IPv6). Reads the
    thread's own /proc view rather than connecting, which a server would see as a client."""
    with inside(ns):
        for table in ("tcp", "tcp6"):
            with open(f"/proc/thread-self/net/{table}") as f:
                next(f)  # header
                for line in f:
                    local, state = line.split()[1], line.split()[3]
                    if state == _TCP_LISTEN and int(local.rsplit(":", 1)[1], 16) == port:
                        return True
    return False


def wait_listening(ns: str, port: int, timeout: float = 10.0) -> None:
    """Wait until something listens on TCP `port` in `ns`; TimeoutError if nothing does."""
    deadline = time.monotonic() + timeout
    while not listening(ns, port):
        if time.monotonic() >= deadline:
            raise TimeoutError(f"nothing listens on TCP port {port} in network namespace {ns}")
        time.sleep(0.02)
