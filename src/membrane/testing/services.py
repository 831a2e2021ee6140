"""Service tests' processes: a server in a pod that answers with its own name (so a client
sees which backend it reached), clients that run inside a test cgroup (the socket LB's
--cgroup-root) and a network namespace, and the test cgroup itself.

    with service_cgroup("mbt1") as cg:
        server = name_server(pod.netns, "web-1", 8080)
        answers = connect_many(client.netns, cg, "198.19.128.1", 80, count=20)
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from membrane import netns
from membrane.bpf.probe import temporary_cgroup

# Answers every TCP connection and UDP datagram on PORT with NAME (IPv4 and IPv6).
_SERVER = textwrap.dedent("""
    import socket, sys, threading
    name, port = sys.argv[1].encode(), int(sys.argv[2])
    def tcp(family, addr):
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((addr, port)); s.listen(1024)
        while True:
            c, _ = s.accept()
            try:
                c.sendall(name)
            except OSError:
                pass
            c.close()
    def udp(family, addr):
        s = socket.socket(family, socket.SOCK_DGRAM)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((addr, port))
        while True:
            _, peer = s.recvfrom(2048)
            s.sendto(name, peer)
    for family, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        for serve in (tcp, udp):
            try:
                threading.Thread(target=serve, args=(family, addr), daemon=True).start()
            except OSError:
                pass
    print("ready", flush=True)
    threading.Event().wait()
""")

# Connects COUNT times (or until DURATION seconds pass) and prints one JSON line: the
# names that answered, the failures (with their errors), and the peer address sockets showed.
_CLIENT = textwrap.dedent("""
    import json, socket, sys, time
    proto, host = sys.argv[1], sys.argv[2]
    port, count, duration = int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    answers, failures, peers = {}, [], set()
    deadline = time.monotonic() + duration
    done = 0
    while done < count or time.monotonic() < deadline:
        done += 1
        try:
            if proto == "tcp":
                s = socket.socket(family, socket.SOCK_STREAM); s.settimeout(3)
                s.connect((host, port)); peers.add(s.getpeername()[0]); data = s.recv(100)
            elif proto == "udp":
                s = socket.socket(family, socket.SOCK_DGRAM); s.settimeout(3)
                s.sendto(b"x", (host, port)); data, peer = s.recvfrom(100); peers.add(peer[0])
            else:
                s = socket.socket(family, socket.SOCK_DGRAM); s.settimeout(3)
                s.connect((host, port)); s.send(b"x"); data = s.recv(100)
                peers.add(s.getpeername()[0])
            s.close()
            if not data:
                raise OSError("empty answer")
            answers[data.decode()] = answers.get(data.decode(), 0) + 1
        except OSError as err:
            failures.append(f"{type(err).__name__}: {err}")
        if done >= count and duration <= 0:
            break
    print(json.dumps({"answers": answers, "failures": failures, "peers": sorted(peers)}))
""")


# Opens one connection (tcp, or connected udp), checks it echoes, says "connected", then
# waits on it and says how it ended: "closed <errno name>" (or "closed eof").
_HOLDER = textwrap.dedent("""
    import errno, socket, sys
    proto, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    s = socket.socket(family, kind)
    s.settimeout(5)
    s.connect((host, port))
    s.send(b"ping")
    assert s.recv(100) == b"ping"
    print("connected", flush=True)
    s.settimeout(None)
    try:
        data = s.recv(100)
        print("closed eof" if not data else "closed data", flush=True)
    except OSError as err:
        print("closed", errno.errorcode.get(err.errno, err.errno), flush=True)
""")


@contextlib.contextmanager
def service_cgroup(tag: str) -> Iterator[Path]:
    """A child cgroup of the cgroup2 root for the socket LB (never the root itself)."""
    with temporary_cgroup(f"membrane-test-{tag}") as path:
        yield path


def _in_cgroup(cgroup: Path | None) -> Any:
    if cgroup is None:
        return None
    procs = str(cgroup / "cgroup.procs")

    def enter() -> None:
        with open(procs, "w") as f:
            f.write(str(os.getpid()))

    return enter


def name_server(ns: str, name: str, port: int) -> subprocess.Popen[str]:
    """A server in `ns` answering with `name` on TCP and UDP `port`; stop it with
    netns.stop."""
    proc = netns.popen(ns, [sys.executable, "-c", _SERVER, name, str(port)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        netns.stop(proc)
        raise RuntimeError(f"name server in {ns} did not start")
    netns.wait_listening(ns, port)
    return proc


def _client_argv(proto: str, host: str, port: int, count: int, duration: float) -> list[str]:
    return [sys.executable, "-c", _CLIENT, proto, host, str(port), str(count), str(duration)]


def connect_many(
    ns: str,
    cgroup: Path | None,
    host: str,
    port: int,
    count: int = 10,
    proto: str = "tcp",
    timeout: float = 60,
) -> dict[str, Any]:
    """`count` connections (tcp; udp: a datagram each, unconnected; cudp: connected UDP)
    from a process in `ns` and `cgroup`: {"answers": {name: n}, "failures": [...],
    "peers": [addresses sockets showed as the peer]}."""
    result = subprocess.run(
        netns.command(ns, _client_argv(proto, host, port, count, 0)),
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=_in_cgroup(cgroup),
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"client in {ns} failed: {result.stderr[-2000:]}")
    return dict(json.loads(result.stdout))


def start_connecting(
    ns: str, cgroup: Path, host: str, port: int, duration: float, proto: str = "tcp"
) -> subprocess.Popen[str]:
    """Connect over and over for `duration` seconds in the background; `finish` reads the
    result."""
    return subprocess.Popen(
        netns.command(ns, _client_argv(proto, host, port, 1, duration)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_in_cgroup(cgroup),
        start_new_session=True,
    )


def hold_connection(
    ns: str, cgroup: Path, host: str, port: int, proto: str = "tcp"
) -> subprocess.Popen[str]:
    """One long-lived connection (tcp or connected udp) to an echo server, returned once it
    echoed; its stdout then says how it was closed."""
    proc = subprocess.Popen(
        netns.command(ns, [sys.executable, "-c", _HOLDER, proto, host, str(port)]),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_in_cgroup(cgroup),
        start_new_session=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line != "connected":
        netns.stop(proc)
        raise RuntimeError(f"no connection to {host}:{port} ({line!r}, {proc.stderr.read()})")
    return proc


def finish(proc: subprocess.Popen[str], timeout: float = 60) -> dict[str, Any]:
    out, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"client failed: {err[-2000:]}")
    return dict(json.loads(out))


def stop_all(procs: Sequence[subprocess.Popen[str]]) -> None:
    for proc in procs:
        with contextlib.suppress(Exception):
            netns.stop(proc)
