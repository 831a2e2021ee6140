"""The server every pod (and the node and the outside host) runs in the policy tests: TCP and
UDP echo on each port given on the command line, on every address of its namespace (IPv6
ones too where the namespace has IPv6).

Started by path with `membrane.netns.popen` inside a namespace (`pods.start_echo_server`);
prints "ready" on stdout once every socket is bound, so the harness waits for that line
instead of sleeping. Stdlib only and no package import, one asyncio loop: a pod costs one
small process.

    python echo_server.py 80 81 82
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import sys

IP_PKTINFO = 8  # linux/in.h; the socket module does not export it
IPV6_RECVPKTINFO, IPV6_PKTINFO = 49, 50  # linux/in6.h


def _udp_socket(port: int, family: int = socket.AF_INET) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
            sock.bind(("::", port))
        else:
            sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
            sock.bind(("0.0.0.0", port))
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def _udp_echo(sock: socket.socket) -> None:
    """Answer every queued datagram from the address it was sent to: a host with several
    addresses (the node, the outside host) would otherwise answer from the one its route
    prefers, and the prober's connected socket would ignore that answer."""
    while True:
        try:
            data, ancillary, _, peer = sock.recvmsg(65535, socket.CMSG_SPACE(20))
        except BlockingIOError:
            return
        control = []
        for level, kind, value in ancillary:
            if (level, kind) == (socket.IPPROTO_IP, IP_PKTINFO):
                _, _, dst = struct.unpack("=I4s4s", value[:12])
                control = [(level, kind, struct.pack("=I4s4s", 0, dst, bytes(4)))]
            elif (level, kind) == (socket.IPPROTO_IPV6, IPV6_PKTINFO):
                control = [(level, kind, value[:16] + bytes(4))]  # from it, any device
        with contextlib.suppress(OSError):
            sock.sendmsg([data], control, 0, peer)


class _TcpEcho(asyncio.Protocol):
    """Echo what arrives, close when the peer does. A protocol rather than streams: no
    task per connection, so one process keeps up with thousands of connections a second
    (bench/conn_rate.py opens that many)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]

    def eof_received(self) -> bool:
        return False  # close our side too


async def main(ports: list[int]) -> None:
    loop = asyncio.get_running_loop()
    servers = []
    for port in ports:
        servers.append(
            await loop.create_server(_TcpEcho, "0.0.0.0", port, reuse_address=True, backlog=4096)
        )
        udp = _udp_socket(port)
        loop.add_reader(udp.fileno(), _udp_echo, udp)
        servers.append(udp)
        with contextlib.suppress(OSError):  # a namespace without IPv6 serves IPv4 only
            servers.append(
                await loop.create_server(_TcpEcho, "::", port, reuse_address=True, backlog=4096)
            )
            udp6 = _udp_socket(port, socket.AF_INET6)
            loop.add_reader(udp6.fileno(), _udp_echo, udp6)
            servers.append(udp6)
    print("ready", flush=True)
    await asyncio.Event().wait()  # until SIGTERM


if __name__ == "__main__":
    asyncio.run(main([int(p) for p in sys.argv[1:]]))
