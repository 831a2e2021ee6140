"""filter_tc on frames that BPF_PROG_TEST_RUN will not run: an untagged frame that ends
inside the fixed IPv4 or IPv6 header its EtherType announces. The test-run refuses those
(EINVAL on the kernels we run), but a device hands them to tc all the same, e.g. frames
written to a packet socket: the parser must let them pass, counted as unparsed. So they go
through a real device here: the program attached at tc egress of one end of a veth, the
frame sent on a packet socket, and seen arriving (intact) at the other end.

The namespaces have IPv6 off and no addresses, so nothing but these frames crosses the veth
and the program's counters move for them alone."""

from __future__ import annotations

import select
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from filter_harness import STATS, FilterProgram
from packets import l2_len, packet

from membrane import netns
from membrane.bpf import Link
from membrane.bpf.links import attach_tc
from membrane.netns import Topology

pytestmark = pytest.mark.root

SERVER = {4: "198.19.0.10", 6: "2001:db8:2::10"}
SOURCE = {4: "198.18.9.9", 6: "2001:db8:9::9"}
FIXED_IP_HEADER = {4: 20, 6: 40}
ETHERTYPE = {4: 0x0800, 6: 0x86DD}
ETH_P_ALL = 0x0003


@dataclass
class Wire:
    program: FilterProgram
    tx_ns: str
    rx_ns: str

    def counters(self) -> dict[str, tuple[int, int]]:
        stats = self.program.map("filter_stats")
        return {
            name: (sum(c.packets for c in per_cpu), sum(c.bytes for c in per_cpu))
            for name, per_cpu in ((n, stats.lookup(i)) for n, i in STATS.items())
        }

    def send(self, frame: bytes, family: int) -> bytes | None:
        """Send `frame` out of tx's eth0; the frame rx's eth0 received (None: nothing)."""
        with netns.inside(self.rx_ns):
            capture = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        with netns.inside(self.tx_ns):
            sender = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        with capture, sender:
            capture.bind(("eth0", ETH_P_ALL))
            sender.sendto(frame, ("eth0", ETHERTYPE[family]))
            while select.select([capture], [], [], 2)[0]:
                got = capture.recv(65536)
                if got == frame:
                    return got
        return None


@pytest.fixture(scope="module")
def wire() -> Iterator[Wire]:
    program = FilterProgram("filter_tc")
    try:
        with Topology() as topo:
            tx, rx = topo.namespace("tx"), topo.namespace("rx")
            for ns in (tx, rx):
                with netns.inside(ns):
                    netns.disable_ipv6("all", "default")
            topo.veth(tx, rx)
            with netns.inside(tx):
                attached = attach_tc(program.prog, netns.ifindex(tx, "eth0"), "egress")
            if isinstance(attached, Link):  # tcx; a clsact filter goes with the device
                topo.callback(attached.close)
            yield Wire(program, tx, rx)
    finally:
        program.close()


@pytest.mark.parametrize(
    ("family", "cut"),
    [(4, 1), (4, 10), (4, 19), (6, 1), (6, 30), (6, 39)],
)
def test_untagged_cut_in_the_fixed_ip_header_passes_unparsed(
    wire: Wire, family: int, cut: int
) -> None:
    assert cut < FIXED_IP_HEADER[family]
    frame = bytes(packet(SERVER[family], "tcp", src=SOURCE[family]))[: l2_len() + cut]
    before = wire.counters()
    assert wire.send(frame, family) == frame, "the frame did not pass"
    after = wire.counters()
    moved = {k: (after[k][0] - before[k][0], after[k][1] - before[k][1]) for k in after}
    counted = (1, len(frame))
    assert moved == {"passed": counted, "dropped": (0, 0), "unparsed": counted}


def test_a_whole_frame_passes_parsed(wire: Wire) -> None:
    """The same path with a frame the parser reads to the end: counted, not unparsed (so
    the case above does see the parser give up, not something of the path)."""
    frame = bytes(packet(SERVER[4], "tcp", src=SOURCE[4]))
    before = wire.counters()
    assert wire.send(frame, 4) == frame
    after = wire.counters()
    assert after["passed"][0] - before["passed"][0] == 1
    assert after["unparsed"] == before["unparsed"]
