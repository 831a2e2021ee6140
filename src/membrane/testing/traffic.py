"""Traffic generators between namespaces: sockets born inside a namespace, listeners the
kernel answers for, one-SYN connect probes, and iperf3 throughput runs.

A socket stays in the namespace it was created in, and `netns.inside` moves only the
calling thread, so many probes from many namespaces can run at once in one process."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterable

from membrane import netns

IPERF_PORT = 5201


def socket_in(ns: str, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """An IPv4 socket of `kind` born in namespace `ns`."""
    with netns.inside(ns):
        return socket.socket(socket.AF_INET, kind)


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
    sock = socket_in(ns)
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
