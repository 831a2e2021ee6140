"""Bad input to `membrane filter` is refused as the design says: exit code 2, one line on
stderr naming the field, no traceback, and nothing in force changed.

Filters are in force on the server's eth0 for the whole module (XDP: drop-dst A and
drop-proto sctp; tc: allow-only client -> B:7001); after every refused command,
`list -o json`, the pins and the traffic verdicts must be exactly what they were before.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest
from filter_support import (
    MEMBRANE,
    Flow,
    detach_in,
    echo_server,
    expect,
    filters_in,
    host,
    membrane,
    pins,
    user_error,
    xdp_prog_id,
)

from membrane import netns
from membrane.bpf import BpfObject
from membrane.bpf import _libbpf as L
from membrane.netns import Topology
from membrane.testing.cli import WITHOUT_CAPABILITIES

pytestmark = pytest.mark.root

PORT = 7001


@dataclass
class InForce:
    """The module's namespaces and filters, and how they looked before any bad command.
    After a case that failed, the next one starts from freshly applied filters, so one
    failure does not fail every case after it."""

    client: str
    server: str
    src: str  # client .1
    other_src: str  # client .4
    a: str  # server .2: dropped by drop-dst
    b: str  # server .3: port 7001 open to the client's .1 only
    foreign_prog: int  # the XDP program someone else attached to the server's ext1
    listing: Any = None
    pins: dict[str, int] = field(default_factory=dict)
    damaged: bool = True

    def apply(self) -> None:
        detach_in([self.client, self.server])
        membrane("drop-dst", "--netns", self.server, "--dev", "eth0", f"{self.a}/32")
        membrane("drop-proto", "--netns", self.server, "--dev", "eth0", "sctp")
        membrane(
            "allow-only",
            "--netns",
            self.server,
            "--dev",
            "eth0",
            "--src",
            self.src,
            "--dst",
            self.b,
            "--dport",
            str(PORT),
        )
        self.listing = filters_in([self.client, self.server])
        self.pins = pins(self.server)
        expect(self.verdicts())
        self.damaged = False

    def verdicts(self) -> dict[Flow, str]:
        return {
            Flow("ping", self.client, self.a): "drop",
            Flow("ping", self.client, self.b): "pass",
            Flow("tcp", self.client, self.b, PORT, src=self.src): "pass",
            Flow("tcp", self.client, self.b, PORT, src=self.other_src): "drop",
        }

    def assert_unchanged(self) -> None:
        with ThreadPoolExecutor(1) as pool:  # list while the traffic probes wait for silence
            listing = pool.submit(filters_in, [self.client, self.server])
            expect(self.verdicts())
            assert listing.result() == self.listing
        assert pins(self.server) == self.pins
        assert xdp_prog_id(self.server, "ext1") == self.foreign_prog
        self.damaged = False

    def fill(self, args: list[str]) -> list[str]:
        return [
            a.format(server=self.server, a=self.a, b=self.b, src=self.src, other_src=self.other_src)
            for a in args
        ]


@pytest.fixture(scope="module")
def topology_in_force() -> Iterator[InForce]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    with Topology() as topo:
        try:
            yield _build(topo)
        finally:
            detach_in(topo.namespaces)


def _attach_foreign_xdp(ns: str, dev: str) -> None:
    """Any XDP program membrane did not attach: a plain netlink attachment (what `ip link
    set xdp` makes), which outlives the object we loaded it from."""
    with netns.inside(ns), BpfObject.open("selftest") as obj:
        obj.load()
        ret = L.lib.bpf_xdp_attach(
            socket.if_nametoindex(dev), obj.program("selftest_xdp").fd, L.XDP_FLAGS_SKB_MODE, None
        )
        assert ret == 0, f"bpf_xdp_attach: {ret}"


def _build(topo: Topology) -> InForce:
    pair = topo.pair()
    c, s = pair.client, pair.server
    a, b, other_src = s.ip, host(s, 3), host(c, 4)
    netns.add_address(s.ns, "eth0", f"{b}/24")
    netns.add_address(c.ns, "eth0", f"{other_src}/24")
    echo_server(topo, s.ns, [a, b], tcp=[PORT])
    topo.veth(c.ns, s.ns, names=("ext0", "ext1"))
    _attach_foreign_xdp(s.ns, "ext1")
    foreign = xdp_prog_id(s.ns, "ext1")
    assert foreign is not None
    return InForce(c.ns, s.ns, c.ip, other_src, a, b, foreign)


@pytest.fixture
def in_force(topology_in_force: InForce) -> InForce:
    """The filters in force, as they were set up; a case counts as having damaged them
    until its `assert_unchanged` has passed."""
    state = topology_in_force
    if state.damaged:
        state.apply()
    state.damaged = True
    return state


S = ["--netns", "{server}", "--dev", "eth0"]
ALLOW = ["allow-only", *S, "--src", "{src}", "--dst", "{b}"]

CASES = {
    # devices and namespaces
    "unknown device": (
        ["drop-dst", "--netns", "{server}", "--dev", "nosuch0", "{b}"],
        "--dev",
        "no network device named 'nosuch0'",
    ),
    "unknown netns": (
        ["drop-dst", "--netns", "mbt-no-such-ns", "--dev", "eth0", "{b}"],
        "--netns",
        "mbt-no-such-ns",
    ),
    "foreign XDP program": (
        ["drop-dst", "--netns", "{server}", "--dev", "ext1", "{b}"],
        "--dev",
        "ext1 already has",
    ),
    # prefixes
    "not a prefix": (["drop-dst", *S, "198.18.300.0/24"], "CIDR", "'198.18.300.0/24' is not"),
    "bad second prefix": (["drop-dst", *S, "{b}", "198.18.0.0/33"], "CIDR[1]", "198.18.0.0/33"),
    "host bits set": (
        ["drop-dst", *S, "198.18.0.1/16"],
        "CIDR",
        "host bits set; did you mean 198.18.0.0/16",
    ),
    "bad --add": (["drop-dst", *S, "--add", "198.18.0.0/8x"], "--add", "198.18.0.0/8x"),
    "removing what is not there": (
        ["drop-dst", *S, "{b}", "--remove", "{a}/32", "--remove", "198.18.0.99"],
        "--remove",
        "198.18.0.99/32",
    ),
    "bad --mode": (["drop-dst", *S, "--mode", "turbo", "{b}"], "--mode", "'turbo'"),
    "other --mode than attached, with --remove": (
        ["drop-dst", *S, "--mode", "native", "--remove", "{a}/32", "{b}"],
        "--mode",
        "generic mode",
    ),
    # drop-src
    "drop-src not a prefix": (["drop-src", *S, "198.18.0.0/33"], "CIDR", "198.18.0.0/33"),
    "drop-src removing what is not there": (
        ["drop-src", *S, "--remove", "{src}"],
        "--remove",
        "source deny list",
    ),
    # rate-limit and syn-guard
    "rate-limit without --pps": (["rate-limit", *S], "--pps", "packets per second"),
    "rate-limit --pps 0": (["rate-limit", *S, "--pps", "0"], "--pps", "0 is not between"),
    "rate-limit --burst 0": (
        ["rate-limit", *S, "--pps", "10", "--burst", "0"],
        "--burst",
        "0 is not between",
    ),
    "rate-limit --prefix-len 33": (
        ["rate-limit", *S, "--pps", "10", "--prefix-len", "33"],
        "--prefix-len",
        "33 is not between 1 and 32",
    ),
    "rate-limit --prefix-len6 129": (
        ["rate-limit", *S, "--pps", "10", "--prefix-len6", "129"],
        "--prefix-len6",
        "129",
    ),
    "rate-limit --buckets 0": (
        ["rate-limit", *S, "--pps", "10", "--buckets", "0"],
        "--buckets",
        "0 is not between",
    ),
    "rate-limit --remove when off": (["rate-limit", *S, "--remove"], "--remove", "no rate-limit"),
    "syn-guard --remove when off": (["syn-guard", *S, "--remove"], "--remove", "no syn-guard"),
    "syn-guard --pps too large": (
        ["syn-guard", *S, "--pps", str(2**32)],
        "--pps",
        "is not between",
    ),
    # protocols
    "unknown protocol": (["drop-proto", *S, "udp", "tcpp"], "PROTOCOL[1]", "'tcpp'"),
    "dropped and removed": (
        ["drop-proto", *S, "sctp", "--remove", "sctp"],
        "--remove",
        "sctp is both dropped and removed",
    ),
    # allow-only
    "port out of range": ([*ALLOW, "--dport", "65536"], "--dport", "65536 is out of range"),
    "port not a number": ([*ALLOW, "--dport", "http"], "--dport", "'http' is not a port"),
    "unknown attach mode": (
        [*ALLOW, "--dport", "80", "--attach", "tc"],
        "--attach",
        "'tc' is not one of",
    ),
    "address families differ": (
        ["allow-only", *S, "--src", "{src}", "--dst", "2001:db8::2", "--dport", "80"],
        "--dst",
        "IPv6",
    ),
    # reading and detaching
    "bad -o (list)": (["list", "-o", "yaml"], "--output", "'yaml'"),
    "bad --hook": (["detach", *S, "--hook", "tc"], "--hook", "'tc' is not one of"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_refused_and_changes_nothing(in_force: InForce, case: str) -> None:
    args, field, problem = CASES[case]
    line = user_error(*in_force.fill(args))
    assert line.startswith(f"membrane: error: {field}: "), line
    assert problem in line, line
    in_force.assert_unchanged()


@pytest.mark.parametrize("args", [["list"], ["drop-dst", *S, "{b}"]], ids=["list", "drop-dst"])
def test_not_root_is_told_what_it_lacks(in_force: InForce, args: list[str]) -> None:
    if not shutil.which("setpriv"):
        pytest.skip("setpriv (util-linux) is not installed")
    argv = [*WITHOUT_CAPABILITIES, *MEMBRANE, "filter", *in_force.fill(args)]
    line = user_error(argv=argv)
    assert "needs root" in line and "CAP_BPF" in line, line
    in_force.assert_unchanged()


def test_more_24s_with_long_prefixes_than_groups_is_refused(in_force: InForce) -> None:
    """A filter with room for two /24s holding prefixes longer than /24 (--tbl8-groups 2,
    on the client's eth0): a third such /24 is refused by name, exit 2, and nothing in
    force changes; within the room, adding still works; the size is kept."""
    on_client = ["--netns", in_force.client, "--dev", "eth0"]
    membrane("drop-dst", *on_client, "--tbl8-groups", "2", "198.19.1.7/32", "198.19.2.0/25")
    mine, theirs = filters_in([in_force.client]), pins(in_force.client)
    try:
        line = user_error("drop-dst", *on_client, "198.19.1.9/32", "198.19.3.1/32")
        assert line.startswith("membrane: error: CIDR: "), line
        assert "more than 2 different /24s" in line, line
        line = user_error("drop-dst", *on_client, "--tbl8-groups", "4", "198.19.1.9/32")
        assert line.startswith("membrane: error: --tbl8-groups: "), line
        assert filters_in([in_force.client]) == mine and pins(in_force.client) == theirs
        membrane("drop-dst", *on_client, "198.19.1.9/32", "198.19.3.0/24")
        rules = {r["rule"] for r in filters_in([in_force.client])[0]["rules"]}
        assert rules == {"198.19.1.7/32", "198.19.2.0/25", "198.19.1.9/32", "198.19.3.0/24"}
    finally:
        detach_in([in_force.client])
    in_force.assert_unchanged()
