"""Shared by the `membrane filter` integration tests: run the CLI the way a user does (a
subprocess that exits), send real traffic between test namespaces and judge what got
through, and look at pins and links from outside (bpffs, bpftool).

Verdicts: "pass" (the echo came back), "drop" (silence until the timeout), or what else
happened ("refused", "unreachable", ...): a refused connection proves the packet arrived, so
it never counts as dropped.
"""

from __future__ import annotations

import errno
import json
import os
import random
import select
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path
from typing import Any

from membrane import netns
from membrane.netns import Topology
from membrane.testing import cli
from membrane.testing.waiting import wait_for

MEMBRANE = [sys.executable, "-m", "membrane"]
FILTER_ROOT = Path("/sys/fs/bpf/membrane/filter")
PASS_TIMEOUT = 3.0  # an echo over a veth takes microseconds; this is only a safety margin
DROP_TIMEOUT = 0.2  # silence for this long counts as dropped
CLI_TIMEOUT = 60


# ---- the CLI ---------------------------------------------------------------------------
def membrane(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`membrane filter ARGS...` in a process of its own, which has exited on return."""
    result = subprocess.run(
        [*MEMBRANE, "filter", *args],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )
    if check:
        assert result.returncode == 0, (
            f"membrane filter {' '.join(args)} exited {result.returncode}:\n{result.stderr}"
        )
    return result


def membrane_json(*args: str) -> Any:
    return json.loads(membrane(*args, "-o", "json").stdout)


def user_error(*args: str, argv: list[str] | None = None) -> str:
    """Run a command that must be refused as bad input; returns its one stderr line."""
    cmd = argv or [*MEMBRANE, "filter", *args]
    return cli.user_error(
        subprocess.run(cmd, capture_output=True, text=True, timeout=CLI_TIMEOUT, check=False)
    )


def attachment(data: list[dict[str, Any]], ns: str, dev: str, hook: str) -> dict[str, Any]:
    """The entry of `list/stats -o json` for one device and hook."""
    found = [a for a in data if (a["netns"], a["device"], a["hook"]) == (ns, dev, hook)]
    assert len(found) == 1, f"expected one {hook} filter on {dev} in {ns}, got {data}"
    return found[0]


def rules_of(data: list[dict[str, Any]], ns: str, dev: str, hook: str) -> dict[str, str]:
    """{rule text: kind} of one attachment."""
    return {r["rule"]: r["kind"] for r in attachment(data, ns, dev, hook)["rules"]}


def rule_stat(
    data: list[dict[str, Any]], ns: str, dev: str, hook: str, text: str
) -> dict[str, Any]:
    (rule,) = [r for r in attachment(data, ns, dev, hook)["rules"] if r["rule"] == text]
    return rule


# ---- state seen from outside the CLI ---------------------------------------------------
def pins(ns: str) -> dict[str, int]:
    """Every pin and directory of the filters in namespace `ns`, with its inode: a
    re-created pin or a re-attached link shows up as a changed inode."""
    scope = FILTER_ROOT / f"netns-{ns}"
    return {str(p.relative_to(scope)): p.stat().st_ino for p in scope.rglob("*")}


def attachment_dir(ns: str, dev: str, hook: str) -> Path:
    return FILTER_ROOT / f"netns-{ns}" / dev / hook


def pinned_link(ns: str, dev: str, hook: str) -> dict[str, Any]:
    """bpftool's view of an attachment's pinned link: {"id", "type", "prog_id"}."""
    path = attachment_dir(ns, dev, hook) / "link"
    out = subprocess.run(
        ["bpftool", "-j", "link", "show", "pinned", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out)


def kernel_link_ids() -> set[int]:
    out = subprocess.run(
        ["bpftool", "-j", "link", "show"], capture_output=True, text=True, check=True
    ).stdout
    return {link["id"] for link in json.loads(out or "[]")}


def xdp_prog_id(ns: str, dev: str) -> int | None:
    """The XDP program the kernel runs on `dev` (whoever attached it), or None."""
    (link,) = json.loads(netns.run(ns, ["ip", "-j", "link", "show", "dev", dev]).stdout)
    return link.get("xdp", {}).get("prog", {}).get("id")


# ---- addresses -------------------------------------------------------------------------
def host(iface: netns.Iface, n: int) -> str:
    """The n-th address of the /24 an end of a pair is on (.1 client, .2 server)."""
    assert iface.address is not None
    return str(iface.address.network.network_address + n)


def v6(iface: netns.Iface, n: int) -> str:
    """An address of 2001:db8:<third octet>::/64, parallel to `host`."""
    assert iface.address is not None
    return f"2001:db8:{iface.address.network.network_address.packed[2]:x}::{n:x}"


def add_ipv6(ns: str, dev: str, address: str) -> None:
    """Add a /64 IPv6 address usable at once (no duplicate address detection)."""
    netns.run(ns, ["ip", "-6", "addr", "add", f"{address}/64", "dev", dev, "nodad"])


# ---- the echo server -------------------------------------------------------------------
ECHO_SERVER = r"""
import json, selectors, socket, sys
spec = json.loads(sys.argv[1])
sel = selectors.DefaultSelector()
for addr in spec["addresses"]:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    for kind, ports in ((socket.SOCK_STREAM, spec["tcp"]), (socket.SOCK_DGRAM, spec["udp"])):
        for port in ports:
            s = socket.socket(family, kind)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.setsockopt(socket.SOL_IP, 15, 1)  # IP_FREEBIND
            s.bind((addr, port))
            if kind == socket.SOCK_STREAM:
                s.listen(64)
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ, "listen" if kind == socket.SOCK_STREAM
                         else "udp")
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        s = key.fileobj
        try:
            if key.data == "udp":
                data, peer = s.recvfrom(65535)
                s.sendto(data, peer)
            elif key.data == "listen":
                conn, _ = s.accept()
                conn.setblocking(False)
                sel.register(conn, selectors.EVENT_READ, "conn")
            else:
                data = s.recv(65535)
                if data:
                    s.sendall(data)
                else:
                    sel.unregister(s)
                    s.close()
        except OSError:
            if key.data == "conn":
                sel.unregister(s)
                s.close()
"""


def echo_server(
    topology: Topology,
    ns: str,
    addresses: list[str],
    tcp: Sequence[int] = (),
    udp: Sequence[int] = (),
) -> subprocess.Popen[str]:
    """A TCP and UDP echo server in `ns`, bound to each address and port (so UDP replies
    leave from the address that was asked); stopped by PID when the topology closes."""
    spec = json.dumps({"addresses": addresses, "tcp": list(tcp), "udp": list(udp)})
    proc = topology.popen(
        ns,
        [sys.executable, "-c", ECHO_SERVER, spec],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    ready, _, _ = select.select([proc.stdout], [], [], 10)
    line = proc.stdout.readline() if ready else ""
    if line.strip() != "ready":
        raise AssertionError(
            f"echo server in {ns} did not start (exit {proc.poll()}): "
            f"{proc.stderr.read() if proc.poll() is not None else ''}"
        )
    return proc


# ---- traffic -------------------------------------------------------------------------
def _family(addr: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ip_address(addr).version == 6 else socket.AF_INET


def _socket(ns: str, family: socket.AddressFamily, kind: int, proto: int = 0) -> socket.socket:
    with netns.inside(ns):
        return socket.socket(family, kind, proto)


def _failure(err: OSError) -> str:
    if isinstance(err, TimeoutError):
        return "drop"
    if err.errno == errno.ECONNREFUSED:
        return "refused"
    if err.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return "unreachable"
    return f"error: {err}"


def _tcp(ns: str, dst: str, port: int, src: str | None, timeout: float) -> str:
    with _socket(ns, _family(dst), socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            if src:
                s.bind((src, 0))
            s.connect((dst, port))
            s.sendall(b"membrane")
            got = b""
            while len(got) < 8:
                chunk = s.recv(8 - len(got))
                if not chunk:
                    return "closed"
                got += chunk
        except OSError as err:
            return _failure(err)
    return "pass" if got == b"membrane" else f"garbled: {got!r}"


def _udp(ns: str, dst: str, port: int, src: str | None, timeout: float) -> str:
    with _socket(ns, _family(dst), socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        token = os.urandom(8)
        try:
            if src:
                s.bind((src, 0))
            s.connect((dst, port))
            s.send(token)
            got = s.recv(64)
        except OSError as err:
            return _failure(err)
    return "pass" if got == token else f"garbled: {got!r}"


def _ping6(ns: str, dst: str, timeout: float) -> bool:
    """One ICMPv6 echo (netns.ping speaks IPv4 only); the kernel fills in the checksum."""
    with _socket(ns, socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6) as s:
        ident, seq = random.getrandbits(16), random.getrandbits(16)
        try:
            s.connect((dst, 0))
            s.send(struct.pack("!BBHHH", 128, 0, 0, ident, seq) + b"membrane-ping6")
        except OSError:
            return False
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            s.settimeout(left)
            try:
                reply = s.recv(2048)
            except TimeoutError:
                return False
            if len(reply) >= 8:
                kind, _, _, rid, rseq = struct.unpack("!BBHHH", reply[:8])
                if (kind, rid, rseq) == (129, ident, seq):
                    return True
    return False


@dataclass(frozen=True)
class Flow:
    """One probe: `ping`, `tcp` (connect and echo) or `udp` (datagram and echo)."""

    kind: str
    ns: str
    dst: str
    port: int = 0
    src: str | None = None

    def __str__(self) -> str:
        where = f"{self.dst}:{self.port}" if self.port else self.dst
        return f"{self.kind} {self.src or self.ns} -> {where}"

    def verdict(self, timeout: float) -> str:
        if self.kind == "ping":
            answered = (
                _ping6(self.ns, self.dst, timeout)
                if ":" in self.dst
                else netns.ping(self.ns, self.dst, timeout)
            )
            return "pass" if answered else "drop"
        probe = {"tcp": _tcp, "udp": _udp}[self.kind]
        return probe(self.ns, self.dst, self.port, self.src, timeout)


def expect(flows: dict[Flow, str]) -> None:
    """Probe every flow at once and compare with the expected verdicts (pass or drop)."""

    def run(item: tuple[Flow, str]) -> str:
        flow, want = item
        return flow.verdict(PASS_TIMEOUT if want == "pass" else DROP_TIMEOUT)

    with ThreadPoolExecutor(max_workers=len(flows)) as pool:
        got = dict(zip(flows, pool.map(run, flows.items()), strict=True))
    wrong = [
        f"{flow}: expected {want}, got {got[flow]}"
        for flow, want in flows.items()
        if got[flow] != want
    ]
    assert not wrong, "traffic verdicts differ:\n  " + "\n  ".join(wrong)


def send_udp(
    ns: str, dst: str, port: int, count: int, *, sport: int, size: int, src: str | None = None
) -> None:
    """Send `count` datagrams of `size` payload bytes and wait for nothing."""
    with _socket(ns, _family(dst), socket.SOCK_DGRAM) as s:
        s.bind((src or ("::" if ":" in dst else "0.0.0.0"), sport))
        for _ in range(count):
            s.sendto(b"m" * size, (dst, port))


def detach_in(namespaces: list[str]) -> None:
    """Detach every filter in these namespaces, whatever the test left (also after a
    failure), then check that none of their pins is left, and that the shared maps went
    with the last filter. Only the test's own namespaces are touched: another run or a
    benchmark may have filters of its own in force."""
    failures = []
    for ns in namespaces:
        scope = FILTER_ROOT / f"netns-{ns}"
        for entry in sorted(scope.iterdir()) if scope.is_dir() else []:
            dev = entry.name.replace("%2e", ".").replace("%25", "%")  # as the manager pins it
            result = membrane("detach", "--netns", ns, "--dev", dev, check=False)
            if result.returncode:
                failures.append(f"detach {dev} in {ns}: {result.stderr.strip()}")
    assert not failures, failures
    left = [ns for ns in namespaces if (FILTER_ROOT / f"netns-{ns}").exists()]
    assert not left, f"pins left behind in {FILTER_ROOT} for {left}"

    def shared_maps_gone_or_in_use() -> bool:
        # (polled: another process may be detaching its own last filter right now)
        try:
            return any(p.is_dir() for p in FILTER_ROOT.iterdir())
        except FileNotFoundError:
            return True

    wait_for("the shared maps to go with the last filter", shared_maps_gone_or_in_use, 2)


def filters_in(namespaces: list[str]) -> list[dict[str, Any]]:
    """`list -o json`, only the filters in these namespaces."""
    return [a for a in membrane_json("list") if a["netns"] in namespaces]


def foreign_filters(namespaces: list[str]) -> list[dict[str, Any]]:
    """Filters in force that are not in these namespaces (another run's, a benchmark's)."""
    return [a for a in membrane_json("list") if a["netns"] not in namespaces]
