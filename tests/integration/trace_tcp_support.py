"""TCP workloads for the tests of the TCP trace tools (connect, accept, tcplife, tcp-count):
a server process in a namespace, client connections made from a thread of the test with
a kernel comm of its own, IPv6 addresses on a pair.

Every workload names itself with a fresh token (prctl PR_SET_NAME), so a test picks its
own events out of what the machine does meanwhile (other suites run TCP too), and --comm
can select exactly them."""

from __future__ import annotations

import ctypes
import json
import queue
import secrets
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

from membrane.netns import Pair, Topology, inside, run, wait_listening

T = TypeVar("T")
_PR_SET_NAME = 15
_TIME_WAIT = "06"  # /proc/net/tcp state
_libc = ctypes.CDLL(None, use_errno=True)

# argv: comm host port reply-bytes. Accepts forever; per connection reads to EOF, then
# answers reply-bytes and closes.
SERVER = textwrap.dedent("""
    import ctypes, socket, sys
    ctypes.CDLL(None).prctl(15, sys.argv[1].encode(), 0, 0, 0)
    host, port, reply = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.create_server((host, port), family=family) as srv:
        while True:
            conn, _ = srv.accept()
            with conn:
                while conn.recv(65536):
                    pass
                conn.sendall(b"y" * reply)
""")


def token() -> str:
    """A comm no other process has (15 bytes at most)."""
    return f"mbt{secrets.token_hex(4)}"


def port() -> int:
    """A server port unlikely to be what a concurrent test uses."""
    return 20000 + secrets.randbelow(30000)


class Server(NamedTuple):
    proc: subprocess.Popen[str]
    comm: str
    host: str
    port: int

    @property
    def pid(self) -> int:
        return self.proc.pid  # nsenter execs the program: its pid is the server's


def start_server(topology: Topology, ns: str, host: str, reply: int = 0) -> Server:
    """The SERVER script in `ns`, listening on host:port when this returns; the
    topology stops it."""
    comm, listen_port = token(), port()
    proc = topology.popen(
        ns, [sys.executable, "-c", SERVER, comm, host, str(listen_port), str(reply)]
    )
    wait_listening(ns, listen_port)
    return Server(proc, comm, host, listen_port)


def as_thread(comm: str, fn: Callable[[], T]) -> tuple[T, int]:
    """fn() run in a new thread of this process whose kernel comm is `comm`; returns its
    result and the thread's id (pid is ours)."""
    box: dict[str, object] = {}

    def body() -> None:
        _libc.prctl(_PR_SET_NAME, comm.encode(), 0, 0, 0)
        box["tid"] = threading.get_native_id()
        try:
            box["value"] = fn()
        except BaseException as err:  # re-raised in the caller
            box["error"] = err

    thread = threading.Thread(target=body)
    thread.start()
    thread.join(60)
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"], box["tid"]  # type: ignore[return-value]


def _socket(ns: str, host: str) -> socket.socket:
    with inside(ns):  # the socket belongs to ns for good
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.settimeout(10)
    return sock


def exchange(ns: str, host: str, server_port: int, send: int = 0, hold: float = 0.0) -> int:
    """One connection from `ns`: send `send` bytes, wait `hold` seconds, half-close, read
    the answer to EOF, close. Returns the local port."""
    with _socket(ns, host) as sock:
        sock.connect((host, server_port))
        local_port = sock.getsockname()[1]
        sock.sendall(b"x" * send)
        if hold:
            threading.Event().wait(hold)  # the connection's lifetime is the workload
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(65536):
            pass
    return local_port


def refused(ns: str, host: str, closed_port: int) -> int:
    """A connect that the peer refuses (nothing listens); returns the local port, bound
    first so that it is known."""
    with _socket(ns, host) as sock:
        sock.bind(("", 0))
        local_port = sock.getsockname()[1]
        try:
            sock.connect((host, closed_port))
        except ConnectionRefusedError:
            return local_port
    raise AssertionError(f"connect to {host}:{closed_port} was not refused")


def wait_closed(ns: str, peer_ports: list[int], timeout: float = 10.0) -> None:
    """Wait until no socket in `ns` talks to any of `peer_ports` any more (TIME_WAIT does
    not count: the socket it replaced has closed). A server closes after the client has
    seen its last byte: its socket leaves LAST_ACK only when the client's ACK arrives."""
    deadline = time.monotonic() + timeout
    while True:
        with inside(ns):
            open_ports = set()
            for table in ("tcp", "tcp6"):
                with open(f"/proc/thread-self/net/{table}") as f:
                    next(f)
                    for line in f:
                        remote, state = line.split()[2:4]
                        if state != _TIME_WAIT:
                            open_ports.add(int(remote.rsplit(":", 1)[1], 16))
        if not open_ports & set(peer_ports):
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"connections from ports {peer_ports} still open in {ns}")
        time.sleep(0.01)


class JsonLines:
    """The `-o json` stdout of a running tracer, line by line as it comes (a thread reads
    it), for tests that act on one report before the next."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self._lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(json.loads(line))
        self._lines.put(None)  # EOF

    def next(self, timeout: float = 10.0) -> dict[str, Any]:
        line = self._lines.get(timeout=timeout)
        if line is None:
            raise AssertionError("the tracer ended")
        return line

    def stop(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Ctrl-C: (the records not read yet, the closing summary)."""
        self.proc.send_signal(signal.SIGINT)
        assert self.proc.wait(timeout=20) == 0
        self._reader.join(timeout=20)
        rest = []
        while (line := self._lines.get_nowait()) is not None:
            rest.append(line)
        assert rest and set(rest[-1]) == {"summary"}, rest
        return rest[:-1], rest[-1]["summary"]


def add_ipv6(pair: Pair) -> tuple[str, str]:
    """2001:db8::1 (client) and ::2 (server) on the pair's eth0s, without duplicate address
    detection so that they work at once; returns the two addresses."""
    client, server = "2001:db8::1", "2001:db8::2"
    for end, addr in ((pair.client, client), (pair.server, server)):
        run(end.ns, ["ip", "-6", "addr", "add", f"{addr}/64", "dev", end.name, "nodad"])
    return client, server
