"""Many short TCP connections, for measuring how many new connections a path admits per
second: each one connects, sends a message, reads its echo and closes, and a new one
takes its place, so that `inflight` are always under way.

Started by path inside a namespace (`traffic.connection_rate` starts several); stdlib only,
one epoll loop, no package import: the client should cost little next to what it measures.
It prints "ready" once started, runs for SECONDS after a line "go SECONDS" on stdin, then
prints one JSON object: connections completed, failures by kind, the seconds measured and
each completed handshake's time from connect() to writable, in microseconds.

    python connection_churn.py 198.18.0.5 7000 16
"""

from __future__ import annotations

import errno
import json
import os
import select
import socket
import sys
import time

PAYLOAD = b"m" * 64
STUCK_S = 1.0  # a connection not done after this long is counted as a timeout


def churn(ip: str, port: int, inflight: int, seconds: float) -> dict[str, object]:
    poller = select.epoll()
    # fd -> (socket, when it started, what came back so far; None until the message is sent)
    open_: dict[int, tuple[socket.socket, float, bytes | None]] = {}
    done = 0
    failed: dict[str, int] = {}
    connect_us: list[int] = []

    def start() -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connecting_at = time.monotonic()  # before connect(): a connect hook's cost counts
        code = sock.connect_ex((ip, port))
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            count(errno.errorcode.get(code, str(code)))
            return
        open_[sock.fileno()] = (sock, connecting_at, None)
        poller.register(sock.fileno(), select.EPOLLOUT)

    def end(fd: int, failure: str | None = None) -> None:
        """Close connection `fd` (counted as done, or as `failure`) and start the next."""
        nonlocal done
        sock = open_.pop(fd)[0]
        poller.unregister(fd)
        sock.close()
        if failure is None:
            done += 1
        else:
            count(failure)
        start()

    def count(failure: str) -> None:
        failed[failure] = failed.get(failure, 0) + 1

    for _ in range(inflight):
        start()
    began = time.monotonic()
    deadline = began + seconds
    next_sweep = began + STUCK_S
    while (now := time.monotonic()) < deadline:
        for fd, _ in poller.poll(min(0.1, deadline - now)):
            if fd not in open_:  # its number was closed and reused in this batch
                continue
            sock, started, got = open_[fd]
            try:
                if got is None:  # connected, or the connect failed
                    if code := sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                        end(fd, errno.errorcode.get(code, str(code)))
                        continue
                    connect_us.append(round((time.monotonic() - started) * 1e6))
                    sock.send(PAYLOAD)
                    open_[fd] = (sock, started, b"")
                    poller.modify(fd, select.EPOLLIN)
                    continue
                chunk = sock.recv(len(PAYLOAD))
            except OSError as err:
                end(fd, errno.errorcode.get(err.errno or 0, type(err).__name__))
                continue
            got += chunk
            if not chunk:
                end(fd, "closed")
            elif len(got) < len(PAYLOAD):
                open_[fd] = (sock, started, got)  # rarely split: wait for the rest
            else:
                end(fd, None if got == PAYLOAD else "garbled")
        if now >= next_sweep:
            for fd, (_, started, _) in list(open_.items()):
                if now - started > STUCK_S:
                    end(fd, "timeout")
            next_sweep = now + STUCK_S
    elapsed = time.monotonic() - began
    for sock, _, _ in open_.values():
        sock.close()
    return {"connections": done, "failed": failed, "seconds": elapsed, "connect_us": connect_us}


def main(ip: str, port: int, inflight: int) -> None:
    print("ready", flush=True)
    command = sys.stdin.readline().split()
    if len(command) != 2 or command[0] != "go":
        sys.exit(f"expected `go SECONDS`, got {command!r}")
    result = churn(ip, port, inflight, float(command[1]))
    print(json.dumps({"pid": os.getpid(), **result}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
