"""AddressDump (a plain rtnetlink address dump) reads what pyroute2 reads: every address
of each family, across the several messages a long dump takes (hundreds of veths with an
IPv6 link-local address each, as a node with hundreds of pods has)."""

from __future__ import annotations

from ipaddress import ip_address
from socket import AF_INET, AF_INET6

import pytest
from pyroute2 import IPRoute

from membrane import netns
from membrane.netns import Topology
from membrane.netns.addresses import AddressDump
from membrane.testing.waiting import wait_for

pytestmark = pytest.mark.root


def test_the_dump_reads_what_pyroute2_reads(topology: Topology) -> None:
    ns = f"{topology.tag}-many"
    topology.callback(netns.delete, ns)
    netns.create(ns)
    with netns.inside(ns), IPRoute() as ipr:
        netns.enable_ipv6("all", "default")
        for i in range(300):
            ipr.link("add", ifname=f"v{i}", kind="veth", peer={"ifname": f"p{i}"})
            for end in (f"v{i}", f"p{i}"):  # both: the link-local comes with the carrier
                ipr.link("set", index=ipr.link_lookup(ifname=end)[0], state="up")
        lo = ipr.link_lookup(ifname="lo")[0]
        ipr.link("set", index=lo, state="up")
        ipr.addr("add", index=lo, address="198.19.0.1", prefixlen=32)
        ipr.addr("add", index=lo, address="2001:db8:ff::1", prefixlen=128)
        wait_for(
            "the veths' link-local addresses", lambda: len(ipr.get_addr(family=AF_INET6)) > 600
        )
        expected = {
            family: sorted(
                ip_address(a.get_attr("IFA_ADDRESS")) for a in ipr.get_addr(family=family)
            )
            for family in (AF_INET, AF_INET6)
        }
        with AddressDump() as dump:
            found = {family: sorted(dump.addresses(family)) for family in (AF_INET, AF_INET6)}
            again = sorted(dump.addresses(AF_INET6))  # the socket serves many dumps
    assert len(expected[AF_INET6]) > 600  # a link-local address per veth end, and lo's
    assert found == expected
    assert again == expected[AF_INET6]
