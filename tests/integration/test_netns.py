"""The namespace helper builds what it says, runs code and programs inside it, and leaves
nothing behind: not on success, not when the body raises."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from ipaddress import IPv4Interface

import pytest

from membrane import netns
from membrane.netns import Pair, Topology
from membrane.testing.signals import with_default_signals

pytestmark = pytest.mark.root


def _ns_id(file: str) -> tuple[int, int]:
    st = os.stat(file)
    return st.st_dev, st.st_ino


def _thread_ns() -> tuple[int, int]:
    return _ns_id("/proc/thread-self/ns/net")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][0] != "Z"
    except FileNotFoundError:
        return False


def _wait_for_exec(pid: int, comm: str, timeout: float = 10.0) -> None:
    """Popen returns after fork: wait until nsenter has entered and exec'd the program."""
    deadline = time.monotonic() + timeout
    while True:
        with open(f"/proc/{pid}/comm") as f:
            if f.read().strip() == comm:
                return
        assert time.monotonic() < deadline, f"{pid} never became {comm}"
        time.sleep(0.01)


def test_namespace_is_visible_to_iproute2_and_removed_on_close() -> None:
    with Topology() as topo:
        ns = topo.namespace("solo")
        assert ns.startswith(topo.tag) and netns.exists(ns)
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
        assert ns in listed.stdout
        lo = json.loads(netns.run(ns, ["ip", "-j", "link", "show", "lo"]).stdout)[0]
        assert "UP" in lo["flags"]
        with pytest.raises(FileExistsError):
            netns.create(ns)
    assert not netns.exists(ns) and ns not in netns.names()


def test_inside_moves_only_the_current_thread_and_restores_it(topology: Topology) -> None:
    ns = topology.namespace("inside")
    home = _thread_ns()
    go = threading.Event()
    seen_by_other_thread: list[tuple[int, int]] = []

    def look() -> None:
        go.wait(10)
        seen_by_other_thread.append(_thread_ns())

    worker = threading.Thread(target=look)  # started outside: threads inherit the namespace
    worker.start()
    with netns.inside(ns):
        assert _thread_ns() == _ns_id(netns.path(ns))
        go.set()
        worker.join()
    assert seen_by_other_thread == [home]
    assert _thread_ns() == home

    with pytest.raises(ZeroDivisionError), netns.inside(ns):
        1 / 0  # noqa: B018
    assert _thread_ns() == home


def test_pair_is_addressed_up_and_reachable_both_ways(pair: Pair) -> None:
    assert pair.client.ns != pair.server.ns
    assert pair.client.address.network == pair.server.address.network
    assert pair.client.address.network.subnet_of(IPv4Interface("198.18.0.0/16").network)
    for end in pair:
        (link,) = json.loads(netns.run(end.ns, ["ip", "-j", "addr", "show", end.name]).stdout)
        assert link["ifindex"] == end.ifindex()
        assert "UP" in link["flags"]
        assert {
            (a["local"], a["prefixlen"]) for a in link["addr_info"] if a["family"] == "inet"
        } == {(end.ip, 24)}
    assert netns.ping(pair.server.ns, pair.client.ip)


def test_pairs_of_one_run_get_distinct_subnets(topology: Topology, pair: Pair) -> None:
    other = topology.pair(roles=("client2", "server2"))
    assert other.client.address.network != pair.client.address.network


def test_ifindex_of_a_missing_device_names_device_and_namespace(pair: Pair) -> None:
    with pytest.raises(LookupError, match=rf"nosuch.*{pair.client.ns}"):
        netns.ifindex(pair.client.ns, "nosuch")


def test_route_through_the_server(pair: Pair) -> None:
    far = "198.19.77.1"  # the server's own address on another subnet
    netns.add_address(pair.server.ns, "lo", f"{far}/32")
    assert not netns.ping(pair.client.ns, far, timeout=0.3)
    netns.add_route(pair.client.ns, "198.19.77.0/24", via=pair.server.ip)
    netns.wait_ping(pair.client.ns, far, timeout=5)


def test_run_failure_carries_namespace_and_stderr(pair: Pair) -> None:
    with pytest.raises(netns.CommandError) as failure:
        netns.run(pair.client.ns, ["ip", "link", "show", "nosuch"])
    assert pair.client.ns in str(failure.value)
    assert "nosuch" in str(failure.value)


def test_programs_run_inside_the_namespace_and_are_stopped_on_close() -> None:
    with Topology() as topo:
        ns = topo.namespace("proc")
        proc = topo.popen(ns, ["sleep", "600"])
        _wait_for_exec(proc.pid, "sleep")
        assert _ns_id(f"/proc/{proc.pid}/ns/net") == _ns_id(netns.path(ns))
        # a program that shrugs off SIGTERM and leaves a child behind
        stubborn = topo.popen(
            ns, ["sh", "-c", "trap '' TERM; sleep 600 & echo $!; wait"], stdout=subprocess.PIPE
        )
        child = int(stubborn.stdout.readline())
        assert _alive(child)
    assert proc.returncode is not None and stubborn.returncode is not None
    assert not _alive(proc.pid) and not _alive(child)
    assert not netns.exists(ns)


def test_everything_is_undone_when_the_body_raises() -> None:
    external = f"mbt-ext-{os.getpid()}"
    netns.create(external)
    try:
        with pytest.raises(RuntimeError, match="boom"), Topology() as topo:
            pair = topo.pair()
            inner = topo.namespace("inner")
            topo.veth(inner, external, names=("up0", "down0"))
            proc = topo.popen(pair.server.ns, ["sleep", "600"])
            raise RuntimeError("boom")
        assert not any(netns.exists(ns) for ns in (*(e.ns for e in pair), inner))
        assert not _alive(proc.pid)
        assert topo.namespaces == []
        # the namespace we did not create survives; the veth end we put there does not
        links = json.loads(netns.run(external, ["ip", "-j", "link"]).stdout)
        assert [link["ifname"] for link in links] == ["lo"]
    finally:
        netns.delete(external)


def test_veth_into_a_foreign_namespace_is_removed_on_close() -> None:
    external = f"mbt-ext-{os.getpid()}"
    netns.create(external)
    try:
        with Topology() as topo:
            a, b = topo.veth(
                topo.namespace("a"), external, names=("x0", "y0"), subnet="198.18.250.0/30"
            )
            assert (a.ip, b.ip) == ("198.18.250.1", "198.18.250.2")
            netns.wait_ping(a.ns, b.ip)
            assert b.ifindex() > 0
        with pytest.raises(LookupError):
            netns.ifindex(external, "y0")
    finally:
        netns.delete(external)


CTRL_C_SCRIPT = """
import time
from membrane.netns import Topology
with Topology() as topo:
    pair = topo.pair()
    proc = topo.popen(pair.server.ns, ["sleep", "600"])
    print(pair.client.ns, pair.server.ns, proc.pid, flush=True)
    time.sleep(600)
"""


def test_ctrl_c_cleans_up() -> None:
    # SIGINT at its default (KeyboardInterrupt) even when this run inherited it ignored
    script = subprocess.Popen(
        with_default_signals([sys.executable, "-c", CTRL_C_SCRIPT]),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        client, server, pid = script.stdout.readline().split()
        assert netns.exists(client) and netns.exists(server) and _alive(int(pid))
        script.send_signal(signal.SIGINT)
        _, err = script.communicate(timeout=30)
    finally:
        netns.stop(script)
    assert "KeyboardInterrupt" in err
    assert not netns.exists(client) and not netns.exists(server)
    assert not _alive(int(pid))


STUBBORN = """
import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ready", flush=True)
time.sleep(600)
"""


@pytest.mark.timeout(60)
def test_stop_kills_a_program_in_our_own_process_group() -> None:
    """`stop` is also the cleanup for programs started without a session of their own:
    signalling a group such a program does not lead reaches nobody, and waiting for it
    then never ends. It must be killed by its PID, and we (its group) must survive."""
    proc = subprocess.Popen([sys.executable, "-c", STUBBORN], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        assert os.getpgid(proc.pid) == os.getpgid(0) != proc.pid
        started = time.monotonic()
        netns.stop(proc, grace=0.5)
        assert time.monotonic() - started < 10
        assert proc.returncode == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_wait_listening_sees_a_server_only_in_its_namespace(topology: Topology, pair: Pair) -> None:
    port = 18080
    assert not netns.listening(pair.server.ns, port)
    topology.popen(
        pair.server.ns, [sys.executable, "-m", "http.server", "-b", pair.server.ip, str(port)]
    )
    netns.wait_listening(pair.server.ns, port)
    assert not netns.listening(pair.client.ns, port)
    with netns.inside(pair.client.ns):
        conn = socket.create_connection((pair.server.ip, port), timeout=5)
    with conn:
        conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert conn.recv(12).startswith(b"HTTP/1.0 200")
