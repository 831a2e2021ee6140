"""Traffic generators between namespaces: sockets born inside a namespace, listeners the
kernel answers for, one-SYN connect probes, iperf3 throughput runs, and many short
connections at once (new connections per second).

A socket stays in the namespace it was created in, and `netns.inside` moves only the
calling thread, so many probes from many namespaces can run at once in one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from membrane import netns

IPERF_PORT = 5201
CHURN_CLIENT = str(Path(__file__).with_name("connection_churn.py"))


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a server a test starts)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def echoed_while_sent(sock: socket.socket, data: bytes, timeout: float = 20) -> bytes:
    """`data` on a connected socket to an echo server and its echo, read while it is sent
    (so neither side's buffers fill up and stall a transfer bigger than they are)."""
    received = bytearray()

    def read() -> None:
        while len(received) < len(data):
            chunk = sock.recv(1 << 20)
            if not chunk:
                return
            received.extend(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        sock.sendall(data)
    finally:
        reader.join(timeout)
    return bytes(received)


def socket_in(ns: str, kind: int = socket.SOCK_STREAM, to: str | None = None) -> socket.socket:
    """A socket of `kind` born in namespace `ns`: IPv4, or IPv6 when the address it is
    meant for (`to`) is one."""
    family = socket.AF_INET6 if to is not None and ":" in to else socket.AF_INET
    with netns.inside(ns):
        return socket.socket(family, kind)


def listen(ns: str, ip: str, port: int, backlog: int = 4096) -> socket.socket:
    """A non-blocking TCP listener on `ip`:`port` in `ns`. The kernel completes handshakes
    without accept(), so a connect succeeds exactly when the path lets SYN and SYN-ACK
    through; `drain` closes what queued up."""
    with netns.inside(ns):
        sock = socket.create_server((ip, port), backlog=backlog)
    sock.setblocking(False)
    return sock


def drain(listeners: Iterable[socket.socket]) -> None:
    """Accept and close every connection queued on `listeners`."""
    for sock in listeners:
        while True:
            try:
                conn, _ = sock.accept()
            except BlockingIOError:
                break
            conn.close()


def connect(ns: str, ip: str, port: int, timeout: float, bind: str | None = None) -> bool:
    """One TCP connect from `ns` (from address `bind`, if given): True when the handshake
    completes within `timeout`. Below 1 s that is the first SYN's fate: the kernel
    retransmits only after 1 s."""
    sock = socket_in(ns, to=ip)
    try:
        if bind:
            sock.bind((bind, 0))
        sock.settimeout(timeout)
        sock.connect((ip, port))
        return True
    except OSError:  # timeout (the path dropped the SYN) or refused
        return False
    finally:
        sock.close()


def iperf(
    client_ns: str,
    server_ns: str,
    server_ip: str,
    duration: float,
    udp: bool,
    port: int = IPERF_PORT,
) -> float:
    """One iperf3 test against a fresh one-shot server; receiver bits/s (TCP, one stream)
    or packets/s (UDP, 64-byte payloads at unlimited rate)."""
    server = netns.popen(server_ns, ["iperf3", "-s", "-1", "-p", str(port)])
    try:
        netns.wait_listening(server_ns, port)
        argv = ["iperf3", "-c", server_ip, "-p", str(port), "-t", f"{duration:g}", "-J"]
        if udp:
            argv += ["-u", "-l", "64", "-b", "0"]
        result = netns.run(client_ns, argv, timeout=duration + 60)
    finally:
        netns.stop(server)
    received = json.loads(result.stdout)["end"]["sum_received"]
    if udp:
        return (received["packets"] - received["lost_packets"]) / received["seconds"]
    return received["bits_per_second"]


def join_cgroup(cgroup: Path) -> None:
    """Move the calling process into `cgroup` (in a child, before it runs its program)."""
    (cgroup / "cgroup.procs").write_text(str(os.getpid()))


@dataclass
class ConnectionRate:
    per_s: float  # connections completed per second, all client processes together
    connections: int
    failed: dict[str, int]  # failures by kind (ECONNREFUSED, timeout, ...)
    connect_us: list[int]  # each completed handshake: connect() to writable, microseconds


def connection_rate(
    client_ns: str,
    server_ip: str,
    port: int,
    seconds: float,
    processes: int = 4,
    inflight: int = 64,
    cgroup: Path | None = None,
    client: Path | None = None,
) -> ConnectionRate:
    """New TCP connections per second from `client_ns` to an echo server: `processes`
    clients (connection_churn.py) keep `inflight` connections under way between them, each
    one connect, a 64-byte message and its echo, close; all start together and run for
    `seconds`. The client namespace lets closed connections' ports be reused (tcp_tw_reuse,
    the whole port range): at thousands a second, TIME_WAIT would otherwise exhaust them.
    With `cgroup` (a cgroup v2 directory) the clients run in it (a socket LB's cgroup).
    `client`: an executable speaking connection_churn.py's protocol (bench/c/conn_churn.c,
    cheap enough that the path and not the client bounds the rate)."""
    with netns.inside(client_ns):
        netns.write_sysctl("net.ipv4.tcp_tw_reuse", 1)
        netns.write_sysctl("net.ipv4.ip_local_port_range", "1024 65535")
    share, extra = divmod(inflight, processes)
    with ExitStack() as stack:
        clients = []
        for i in range(processes):
            program = [str(client)] if client else [sys.executable, CHURN_CLIENT]
            argv = [*program, server_ip, str(port), str(share + (i < extra))]
            proc = netns.popen(
                client_ns,
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                preexec_fn=None if cgroup is None else partial(join_cgroup, cgroup),
            )
            stack.callback(netns.stop, proc)
            clients.append(proc)
        for proc in clients:
            assert proc.stdout is not None
            if (said := proc.stdout.readline()).strip() != "ready":
                raise RuntimeError(f"connection client did not start (said {said!r})")
        for proc in clients:
            assert proc.stdin is not None
            proc.stdin.write(f"go {seconds}\n")
            proc.stdin.flush()
        results = []
        for proc in clients:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"connection client {proc.pid} ended without a result")
            results.append(json.loads(line))
    failed: dict[str, int] = {}
    for r in results:
        for kind, n in r["failed"].items():
            failed[kind] = failed.get(kind, 0) + n
    return ConnectionRate(
        per_s=sum(r["connections"] / r["seconds"] for r in results),
        connections=sum(r["connections"] for r in results),
        failed=failed,
        connect_us=[us for r in results for us in r["connect_us"]],
    )
