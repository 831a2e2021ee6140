"""Reachability truth tables, the way the Kubernetes network-policy e2e tests state them: an
expected matrix of (source, destination, port, protocol) → allowed, built with a few
wildcard helpers, compared against real traffic, and shown as tables when they disagree.

Probing runs in this process: each probe's socket is opened inside the source's network
namespace (`traffic.socket_in`), then every probe of a matrix runs at once on one asyncio
loop. A probe is a TCP connect plus an echo round trip, or a UDP datagram and its echo; silence
for PROBE_TIMEOUT is a drop. Each failed probe is retried once, so a lost first packet is
not mistaken for a policy drop; a whole 9x9x4 table takes about a second (drops dominate:
two timeouts).

A policy drops in silence, so only silence counts as "denied". A refusal (a TCP RST, an
ICMP port unreachable) is an answer from the destination: the path let the probe through
and nothing listened there, a dead or missing server, which no table may pass off as a
denial. Such cells are errors, shown as '!' in the tables.

Peers are named "NS/NAME" for pods and freely for others ("host", "world", "world-2");
patterns use shell wildcards ("x/*", "*/a", "*").
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import itertools
import os
import socket
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from membrane import netns
from membrane.testing.traffic import socket_in
from membrane.testing.waiting import wait_for

PROBE_TIMEOUT = 0.6  # an echo over two veths takes well under a millisecond
ATTEMPTS = 2
DEFAULT_PORTS: tuple[tuple[int, str], ...] = ((80, "TCP"), (81, "TCP"), (80, "UDP"), (81, "UDP"))

Case = tuple[str, str, int, str]  # source, destination, port, protocol ("ICMP": port unused)


@dataclass(frozen=True)
class Peer:
    """Something that sends and answers probes: a namespace, the address others reach it
    at, and whether its probes must leave from that address (an extra address of the
    outside host) rather than the one the kernel would pick."""

    key: str
    netns: str
    ip: str
    bind: bool = False


# ---- probing ---------------------------------------------------------------------------
def _socket(peer: Peer, proto: str, to: str) -> socket.socket:
    kind = socket.SOCK_STREAM if proto == "TCP" else socket.SOCK_DGRAM
    sock = socket_in(peer.netns, kind, to=to)
    sock.setblocking(False)
    if peer.bind:
        sock.bind((peer.ip, 0))
    return sock


async def _attempt(src: Peer, dst: Peer, port: int, proto: str, timeout: float) -> str:
    """One probe: "ok", "timeout", "refused" or the error's name."""
    loop = asyncio.get_running_loop()
    payload = os.urandom(16).hex().encode()
    sock = _socket(src, proto, dst.ip)
    try:
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, (dst.ip, port))
            await loop.sock_sendall(sock, payload)
            got = b""
            while len(got) < len(payload):
                chunk = await loop.sock_recv(sock, 4096)
                if not chunk:
                    return "closed"
                got += chunk
            return "ok" if got == payload else "garbled"
    except TimeoutError:
        return "timeout"
    except ConnectionRefusedError:
        return "refused"
    except OSError as err:
        return type(err).__name__ if not err.errno else os.strerror(err.errno)
    finally:
        sock.close()


async def _probe(src: Peer, dst: Peer, port: int, proto: str, timeout: float) -> str:
    outcome = "timeout"
    for _ in range(ATTEMPTS):
        outcome = await _attempt(src, dst, port, proto, timeout)
        if outcome == "ok":
            break
    return outcome


def _ping(src: Peer, dst: Peer, timeout: float) -> str:
    for _ in range(ATTEMPTS):
        if netns.ping(src.netns, dst.ip, timeout=timeout):
            return "ok"
    return "timeout"


def probe(
    peers: dict[str, Peer], cases: Iterable[Case], timeout: float = PROBE_TIMEOUT
) -> dict[Case, str]:
    """Run every case at once; the outcome of each ("ok" means it got through)."""
    cases = list(cases)
    stream = [c for c in cases if c[3] != "ICMP"]
    icmp = [c for c in cases if c[3] == "ICMP"]

    async def run_all() -> list[str]:
        return await asyncio.gather(
            *(_probe(peers[s], peers[d], port, proto, timeout) for s, d, port, proto in stream)
        )

    with ThreadPoolExecutor(max_workers=max(1, min(32, len(icmp)))) as pool:
        pings = [pool.submit(_ping, peers[s], peers[d], timeout) for s, d, _, _ in icmp]
        outcomes = dict(zip(stream, asyncio.run(run_all()) if stream else [], strict=True))
        outcomes.update(zip(icmp, (p.result() for p in pings), strict=True))
    return outcomes


# ---- the expected matrix ---------------------------------------------------------------
@dataclass
class Reachability:
    """Expected verdicts for every (source, destination, port, protocol). A peer talking to
    itself never leaves its namespace, so those cells are always expected allowed (and are
    probed, as a check of the harness)."""

    sources: Sequence[str]
    destinations: Sequence[str]
    ports: Sequence[tuple[int, str]] = DEFAULT_PORTS
    default: bool = True
    expected: dict[Case, bool] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.expect_all(self.default)

    def cases(self) -> list[Case]:
        return [
            (s, d, port, proto)
            for (port, proto), s, d in itertools.product(
                self.ports, self.sources, self.destinations
            )
        ]

    def expect_all(self, allowed: bool) -> Reachability:
        for case in self.cases():
            self.expected[case] = allowed
        return self

    def expect(
        self,
        from_: str = "*",
        to: str = "*",
        port: int | None = None,
        proto: str | None = None,
        allowed: bool = True,
    ) -> Reachability:
        """Set every matching cell; later calls override earlier ones."""
        for case in self.cases():
            s, d, p, pr = case
            if (
                fnmatch.fnmatchcase(s, from_)
                and fnmatch.fnmatchcase(d, to)
                and port in (None, p)
                and proto in (None, pr)
            ):
                self.expected[case] = allowed
        return self

    def allow(self, from_: str = "*", to: str = "*", **kw: object) -> Reachability:
        return self.expect(from_, to, allowed=True, **kw)  # type: ignore[arg-type]

    def deny(self, from_: str = "*", to: str = "*", **kw: object) -> Reachability:
        return self.expect(from_, to, allowed=False, **kw)  # type: ignore[arg-type]

    def want(self, case: Case) -> bool:
        return True if case[0] == case[1] else self.expected[case]


DROPPED = "timeout"  # the one outcome a policy drop produces


def agrees(allowed: bool, outcome: str) -> bool:
    """Whether a probe's outcome is what an allowed (or denied) cell must show."""
    return outcome == "ok" if allowed else outcome == DROPPED


def compare(reach: Reachability, observed: dict[Case, str]) -> list[Case]:
    return [c for c in reach.cases() if not agrees(reach.want(c), observed[c])]


def _mark(outcome: str) -> str:
    return {"ok": "+", DROPPED: "-"}.get(outcome, "!")


def render(reach: Reachability, observed: dict[Case, str], wrong: list[Case]) -> str:
    """Per port/protocol, expected | observed | comparison side by side ('+' allowed, '-'
    denied, '!' an error such as a refusal; '.' as expected, 'X' wrong), then every wrong
    cell with what happened."""
    bad = set(wrong)
    width = max(len(k) for k in [*reach.sources, *reach.destinations]) + 1
    label = width + 2
    lines = [f"{len(wrong)} of {len(reach.cases())} cells wrong"]
    for port, proto in reach.ports:
        title = f"{port}/{proto}" if proto != "ICMP" else "ICMP"
        head = "".join(f"{d:>{width}}" for d in reach.destinations)
        lines.append("")
        lines.append(
            f"{title:<{label}}{'expected':>{len(head)}} | {'observed':>{len(head)}} | comparison"
        )
        lines.append(f"{'':<{label}}{head} | {head} | {head}")
        for s in reach.sources:
            cells = [(s, d, port, proto) for d in reach.destinations]
            exp = "".join(f"{'+' if reach.want(c) else '-':>{width}}" for c in cells)
            obs = "".join(f"{_mark(observed[c]):>{width}}" for c in cells)
            cmp_ = "".join(f"{'X' if c in bad else '.':>{width}}" for c in cells)
            lines.append(f"{s:<{label}}{exp} | {obs} | {cmp_}")
    lines.append("")
    for s, d, port, proto in wrong:
        want = "allowed" if reach.want((s, d, port, proto)) else "denied"
        got = observed[(s, d, port, proto)]
        why = "" if got in ("ok", DROPPED) else " (an error, not a policy drop: is a server there?)"
        lines.append(f"  {s} -> {d} {port}/{proto}: expected {want}, got {got}{why}")
    return "\n".join(lines)


def check(peers: dict[str, Peer], reach: Reachability, timeout: float = PROBE_TIMEOUT) -> None:
    """Probe the whole matrix; on any disagreement fail with the truth tables."""
    observed = probe(peers, reach.cases(), timeout)
    wrong = compare(reach, observed)
    if wrong:
        table = render(reach, observed, wrong)
        raise AssertionError(f"reachability is not what the policy says\n{table}")


# ---- long-lived connections ------------------------------------------------------------
class Connection:
    """An established TCP connection from `src` to an echo server, to see what a policy
    change does to traffic that is already flowing."""

    def __init__(self, src: Peer, dst: Peer, port: int, timeout: float = 3.0) -> None:
        self.sock = _socket(src, "TCP", dst.ip)
        self.sock.setblocking(True)
        self.sock.settimeout(timeout)
        self.sock.connect((dst.ip, port))

    def echo(self, timeout: float = PROBE_TIMEOUT) -> bool:
        """Send a message; True when its echo comes back within `timeout`. A message that
        does not come back stays in flight (TCP retransmits it), so later calls first
        drain what is owed."""
        payload = os.urandom(8).hex().encode()
        self.sock.settimeout(timeout)
        try:
            self.sock.sendall(payload)
            got = b""
            while not got.endswith(payload):
                chunk = self.sock.recv(65536)
                if not chunk:
                    return False
                got += chunk
        except (TimeoutError, OSError):
            return False
        return True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


MAX_STALL = 2.0  # seconds without an echo that count as the stream breaking


class Stream:
    """A TCP connection carrying echo round trips back to back on a thread of its own."""

    def __init__(self, src: Peer, dst: Peer, port: int) -> None:
        self.conn = Connection(src, dst, port)
        self.rounds = 0
        self.max_gap = 0.0
        self.failure: str | None = None
        self._last = time.monotonic()  # when the last round trip completed
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        last = time.monotonic()
        while not self._stop.is_set():
            if not self.conn.echo(timeout=MAX_STALL * 2):
                self.failure = f"an echo did not come back after {self.rounds} rounds"
                return
            now = time.monotonic()
            self.max_gap, last = max(self.max_gap, now - last), now
            self._last = now
            self.rounds += 1
            self._stop.wait(0.002)  # pace it: a few hundred round trips a second

    def flowing(self, more: int = 20) -> None:
        """Wait until `more` further round trips have completed."""
        target = self.rounds + more
        wait_for(f"{more} more round trips", lambda: self.rounds >= target or self.failure)
        assert self.failure is None, self.failure

    def cut(self, within: float = 5.0) -> None:
        """Wait until the stream stops carrying echoes (a deny took effect), at most
        `within` seconds; then no round trip completes for another second."""
        wait_for("the stream to stop", lambda: self.failure or self.stalled(0.5), within)
        rounds = self.rounds
        time.sleep(1.0)
        assert self.rounds == rounds, "round trips still complete after the deny"

    def stalled(self, seconds: float) -> bool:
        return time.monotonic() - self._last > seconds

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.conn.close()
