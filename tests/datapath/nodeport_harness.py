"""What the test runs of the per-packet service path (bpf/nodeport.bpf.c) share: its
verdicts, the NodePorts of load_nodeport's first service, running one of its programs in
the namespace of membrane.testing.nodeport, and reading and checking what it wrote."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from packets import checksums_valid, ip_of, l4_of
from scapy.layers.l2 import Ether

from membrane.netns import Topology
from membrane.service.nodeport import NodePortPath
from membrane.testing.nodeport import FIRST_NODE_PORT, Bed, nodeport_testbed

TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = 0, 2, 7
LOCAL_PORT, REMOTE_PORT = FIRST_NODE_PORT, FIRST_NODE_PORT + 1  # service 0's two NodePorts


def run(bed: Bed, path: NodePortPath, prog: str, data: bytes) -> tuple[int, Ether]:
    """Program `prog` of `path` on `data` arriving on ext0: its verdict and the frame."""
    result = bed.run(path.obj.program(prog), data, bed.ext)
    return result.retval, Ether(result.data)


def flow_of(frame: Ether) -> tuple[str, int, str, int]:
    """(source, source port, destination, destination port) of the frame's TCP or UDP."""
    ip = ip_of(frame)
    l4 = l4_of(ip)
    return ip.src, l4.sport, ip.dst, l4.dport


def translated(bed: Bed, path: NodePortPath, prog: str, data: bytes, verdict: int) -> Ether:
    """The frame `prog` wrote for `data`, its verdict and every checksum checked."""
    got, out = run(bed, path, prog, data)
    assert got == verdict
    assert checksums_valid(ip_of(out))
    return out


@pytest.fixture(scope="module", name="bed")
def nodeport_bed() -> Iterator[Bed]:
    """Fixture `bed`: the namespace to test-run the programs in (one local and one remote
    backend per family), one a module that imports this."""
    with Topology("mnp") as topo:
        yield nodeport_testbed(topo)
