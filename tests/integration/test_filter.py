"""`membrane filter` on real traffic between namespaces: what each filter drops and what it
lets through, that filters outlive the command and change live, that detach undoes all
of it, and that counters and events match the packets sent.

Every filter sits on the server's eth0; the client sends. The server has two addresses on
that device (A = .2, B = .3, and 2001:db8:N::2/::3), so "dropped" and "still passes" are
always seen side by side on one device.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import queue
import shutil
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from filter_support import (
    FILTER_ROOT,
    MEMBRANE,
    Flow,
    add_ipv6,
    attachment,
    attachment_dir,
    detach_in,
    echo_server,
    expect,
    foreign_filters,
    host,
    kernel_link_ids,
    membrane,
    membrane_json,
    pinned_link,
    rule_stat,
    rules_of,
    send_udp,
    user_error,
    v6,
    xdp_prog_id,
)

from membrane import netns
from membrane.bpf import Map
from membrane.filter.dir24 import entry as dir24_entry
from membrane.filter.manager import CLSACT_SLOT as FILTER_SLOT
from membrane.netns import Pair, Topology
from membrane.testing.tc import clsact_filters
from membrane.testing.waiting import wait_for

pytestmark = pytest.mark.root

TCP_PORT, TCP_OTHER, UDP_PORT, UDP_SINK = 7001, 7002, 7003, 7009
ETH_IP_UDP = 14 + 20 + 8  # header bytes in front of a UDP payload, as XDP and tc see it
ETH_IP_ICMP = 14 + 20 + 8
PING_PAYLOAD = len(b"membrane-ping")  # what membrane.netns.ping sends


@pytest.fixture(autouse=True)
def filters(topology: Topology) -> Iterator[None]:
    """Whatever a test attached is detached, pins and all, even when it fails; this runs
    before the namespaces go (the fixture is torn down before `topology`)."""
    yield
    detach_in(topology.namespaces)


@dataclass(frozen=True)
class Net:
    client: str  # namespace names
    server: str
    src: str  # the client's address (.1)
    other_src: str  # a second client address (.4)
    a: str  # the server's address (.2): the one filters name
    b: str  # a second server address on the same device (.3)
    a6: str
    b6: str
    src6: str

    def flows(self, dst: str) -> list[Flow]:
        """Ping, a TCP echo and a UDP echo from the client to `dst`."""
        return [
            Flow("ping", self.client, dst),
            Flow("tcp", self.client, dst, TCP_PORT),
            Flow("udp", self.client, dst, UDP_PORT),
        ]


@pytest.fixture
def net(topology: Topology, pair: Pair) -> Net:
    c, s = pair.client, pair.server
    n = Net(c.ns, s.ns, c.ip, host(c, 4), s.ip, host(s, 3), v6(s, 2), v6(s, 3), v6(c, 1))
    netns.add_address(s.ns, "eth0", f"{n.b}/24")
    netns.add_address(c.ns, "eth0", f"{n.other_src}/24")
    add_ipv6(c.ns, "eth0", n.src6)
    add_ipv6(s.ns, "eth0", n.a6)
    add_ipv6(s.ns, "eth0", n.b6)
    echo_server(topology, s.ns, [n.a, n.b, n.a6, n.b6], tcp=[TCP_PORT, TCP_OTHER], udp=[UDP_PORT])
    return n


def on_server(net: Net, *args: str) -> list[str]:
    return [*args[:1], "--netns", net.server, "--dev", "eth0", *args[1:]]


# ---- drop-dst ------------------------------------------------------------------------
def test_drop_dst_drops_ping_tcp_udp_to_the_prefix_only(net: Net) -> None:
    to_a, to_b = net.flows(net.a), net.flows(net.b)
    expect({f: "pass" for f in to_a + to_b})

    out = membrane(*on_server(net, "drop-dst", f"{net.a}/32")).stdout
    assert "1 drop-dst" in out
    # auto mode on a veth is generic: native XDP there would turn off the peer's TSO
    assert "xdp generic" in out
    assert [a["mode"] for a in membrane_json("list", "--netns", net.server)] == ["generic"]

    expect({**{f: "drop" for f in to_a}, **{f: "pass" for f in to_b}})
    # one echo request, one SYN (the 0.2 s wait is shorter than the first retransmit),
    # one datagram: ARP is not IP and never reaches the rule
    stats = membrane_json("stats")
    assert rule_stat(stats, net.server, "eth0", "xdp", f"{net.a}/32")["packets"] == 3


def test_drop_dst_ipv6_from_file_in_generic_mode(net: Net, tmp_path: Path) -> None:
    to_a6, to_b6 = net.flows(net.a6), net.flows(net.b6)
    expect({f: "pass" for f in to_a6 + to_b6})  # also waits for neighbour discovery
    deny = tmp_path / "deny.txt"
    deny.write_text(f"# addresses nobody may reach\n\n{net.a6}/128  # the first one\n")

    membrane(*on_server(net, "drop-dst", "--from-file", str(deny), "--mode", "generic"))

    att = attachment(membrane_json("list"), net.server, "eth0", "xdp")
    assert att["mode"] == "generic"
    assert rules_of([att], net.server, "eth0", "xdp") == {f"{net.a6}/128": "drop-dst"}
    assert xdp_prog_id(net.server, "eth0") is not None
    expect(
        {
            **{f: "drop" for f in to_a6},
            **{f: "pass" for f in to_b6},
            **{f: "pass" for f in net.flows(net.a)},
        }
    )  # IPv4 to the same host still passes


def test_filters_outlive_the_command_and_change_live(net: Net) -> None:
    first = subprocess.Popen(
        [*MEMBRANE, "filter", *on_server(net, "drop-dst", net.a)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    _, err = first.communicate(timeout=60)
    assert first.returncode == 0, err
    assert not list(FILTER_ROOT.glob(f"staging-{first.pid}-*"))
    ping_a, ping_b = Flow("ping", net.client, net.a), Flow("ping", net.client, net.b)
    expect({ping_a: "drop", ping_b: "pass"})  # the command is gone; the filter is not

    # a second run sees the filter
    att = attachment(membrane_json("list"), net.server, "eth0", "xdp")
    assert att["state"] == "attached"
    assert [r["rule"] for r in att["rules"]] == [f"{net.a}/32"]
    link_pin = attachment_dir(net.server, "eth0", "xdp") / "link"
    inode, link = link_pin.stat().st_ino, pinned_link(net.server, "eth0", "xdp")

    def same_attachment() -> None:
        assert link_pin.stat().st_ino == inode
        now = pinned_link(net.server, "eth0", "xdp")
        assert now["id"] == link["id"], "the XDP link was replaced"
        assert xdp_prog_id(net.server, "eth0") == now["prog_id"]

    membrane(*on_server(net, "drop-dst", "--add", net.b))
    expect({ping_a: "drop", ping_b: "drop"})
    same_attachment()
    assert pinned_link(net.server, "eth0", "xdp")["prog_id"] == link["prog_id"]

    membrane(*on_server(net, "drop-dst", "--remove", f"{net.a}/32"))
    expect({ping_a: "pass", ping_b: "drop"})
    same_attachment()
    assert pinned_link(net.server, "eth0", "xdp")["prog_id"] == link["prog_id"]

    # the other XDP filter swaps the program inside the same link
    membrane(*on_server(net, "drop-proto", "udp"))
    same_attachment()
    assert pinned_link(net.server, "eth0", "xdp")["prog_id"] != link["prog_id"]
    expect(
        {
            ping_a: "pass",
            ping_b: "drop",
            Flow("udp", net.client, net.a, UDP_PORT): "drop",
            Flow("tcp", net.client, net.a, TCP_PORT): "pass",
        }
    )
    assert rules_of(membrane_json("list"), net.server, "eth0", "xdp") == {
        f"{net.b}/32": "drop-dst",
        "udp": "drop-proto",
    }


def _ids(ns: str) -> dict[str, int]:
    """Rule text -> rule id of the XDP filter on eth0 in `ns`."""
    return {
        r["rule"]: r["id"] for r in attachment(membrane_json("list"), ns, "eth0", "xdp")["rules"]
    }


def _pretend_older_build(path: Path, layout: str, rules: dict[str, int]) -> None:
    """Make an attachment look as an older build left it, its list being `rules`:
    `dir24-v2` has no top table (prefixes of /8 and shorter were in tbl24); `dir24-v1`
    has the groups map under its old name too; `lpm` has no DIR-24-8 maps and the list in
    an LPM trie. The program keeps running on its own maps meanwhile."""
    (path / "drop_dst_top").unlink()
    if layout == "dir24-v1":
        (path / "drop_dst_groups").rename(path / "drop_dst_tbl8")
    elif layout == "lpm":
        for name in ("drop_dst_groups", "drop_dst_tbl24", "drop_dst_v4"):
            (path / name).unlink()
        subprocess.run(
            ["bpftool", "map", "create", str(path / "drop_dst_v4"), "type", "lpm_trie",
             "key", "8", "value", "4", "entries", "65536", "name", "drop_dst_v4", "flags", "1"],
            check=True,
        )  # fmt: skip
    with Map.from_pin(str(path / "drop_dst_v4")) as m:  # the record, by both builds' key
        for text, rule_id in rules.items():
            net = ipaddress.IPv4Network(text)
            m.update(struct.pack("<I", net.prefixlen) + net.network_address.packed, rule_id)


@pytest.mark.parametrize("layout", ["dir24-v2", "dir24-v1", "lpm"])
def test_a_filter_of_an_older_build_is_moved_to_the_current_maps(net: Net, layout: str) -> None:
    """The first change after an upgrade moves the deny list (prefixes and rule ids) to the
    current maps and swaps the program in the same link: no detach, nothing lost."""
    ping_a, ping_b = Flow("ping", net.client, net.a), Flow("ping", net.client, net.b)
    membrane(*on_server(net, "drop-dst", f"{net.a}/32", "198.19.0.0/16"))
    path = attachment_dir(net.server, "eth0", "xdp")
    before, link = _ids(net.server), pinned_link(net.server, "eth0", "xdp")
    # the older build's list also names B (rule 9) and a /8 (rule 10), which the running
    # program does not
    _pretend_older_build(path, layout, before | {f"{net.b}/32": 9, "100.0.0.0/8": 10})
    inode = (path / "drop_dst_v4").stat().st_ino
    expect({ping_a: "drop", ping_b: "pass"})
    listed = before | {f"{net.b}/32": 9, "100.0.0.0/8": 10}
    assert _ids(net.server) == listed  # listed as it is, not moved
    assert (path / "drop_dst_v4").stat().st_ino == inode

    membrane(*on_server(net, "drop-dst", "--add", "198.19.7.0/24"))
    assert _ids(net.server) == listed | {"198.19.7.0/24": 3}
    expect({ping_a: "drop", ping_b: "drop"})
    with Map.from_pin(str(path / "drop_dst_top")) as top:  # the /8 is in the top table
        assert list(top.lookup(0).entry)[100] == dir24_entry(10, 8)
    now = pinned_link(net.server, "eth0", "xdp")
    assert now["id"] == link["id"] and now["prog_id"] != link["prog_id"]
    names = {p.name for p in path.iterdir()}
    assert {"drop_dst_groups", "drop_dst_tbl24", "drop_dst_top", "drop_dst_v4"} <= names
    assert not names & {"drop_dst_tbl8", "drop_dst_v4_summary", "migrating"}
    membrane(*on_server(net, "drop-dst", "--remove", f"{net.b}/32"))
    expect({ping_a: "drop", ping_b: "pass"})


def test_enabling_drop_proto_moves_a_filter_of_an_older_build_first(net: Net) -> None:
    """The program that enables drop-proto reads the current drop-dst maps: the deny list
    moves to them before it goes in (not empty new maps beside the old ones)."""
    ping_a = Flow("ping", net.client, net.a)
    membrane(*on_server(net, "drop-dst", f"{net.a}/32"))
    path = attachment_dir(net.server, "eth0", "xdp")
    _pretend_older_build(path, "dir24-v2", _ids(net.server))
    membrane(*on_server(net, "drop-proto", "udp"))
    assert (path / "drop_dst_top").exists() and not (path / "migrating").exists()
    expect({ping_a: "drop", Flow("udp", net.client, net.b, UDP_PORT): "drop"})
    membrane(*on_server(net, "drop-dst", "--remove", f"{net.a}/32"))
    expect({ping_a: "pass"})


# ---- drop-proto ----------------------------------------------------------------------
def test_drop_proto_drops_only_the_named_protocol(net: Net) -> None:
    ping, tcp, udp = net.flows(net.a)
    expect({ping: "pass", tcp: "pass", udp: "pass"})

    membrane(*on_server(net, "drop-proto", "icmp"))
    expect({ping: "drop", tcp: "pass", udp: "pass"})

    membrane(*on_server(net, "drop-proto", "tcp", "--remove", "icmp"))
    expect({ping: "pass", tcp: "drop", udp: "pass"})

    membrane(*on_server(net, "drop-proto", "udp", "--remove", "tcp"))
    expect({ping: "pass", tcp: "pass", udp: "drop"})
    assert rules_of(membrane_json("list"), net.server, "eth0", "xdp") == {"udp": "drop-proto"}


# ---- allow-only ----------------------------------------------------------------------
def test_allow_only_lets_only_the_listed_flows_reach_the_port(net: Net) -> None:
    allowed = Flow("tcp", net.client, net.a, TCP_PORT, src=net.src)
    other_src = Flow("tcp", net.client, net.a, TCP_PORT, src=net.other_src)
    other_dst = Flow("tcp", net.client, net.b, TCP_PORT, src=net.src)
    other_port = Flow("tcp", net.client, net.a, TCP_OTHER, src=net.other_src)
    udp_allowed = Flow("udp", net.client, net.a, UDP_PORT, src=net.src)
    udp_other = Flow("udp", net.client, net.a, UDP_PORT, src=net.other_src)
    ping = Flow("ping", net.client, net.a)
    everything = [allowed, other_src, other_dst, other_port, udp_allowed, udp_other, ping]
    expect({f: "pass" for f in everything})

    flow = ["--src", net.src, "--dst", net.a, "--dport", str(TCP_PORT)]
    membrane(*on_server(net, "allow-only", *flow))
    membrane(
        *on_server(
            net,
            "allow-only",
            "--src",
            net.src,
            "--dst",
            net.a,
            "--dport",
            str(UDP_PORT),
            "--proto",
            "udp",
        )
    )
    expect(
        {
            allowed: "pass",
            other_src: "drop",
            other_dst: "drop",
            other_port: "pass",
            udp_allowed: "pass",
            udp_other: "drop",
            ping: "pass",
        }
    )
    assert rules_of(membrane_json("list"), net.server, "eth0", "tc-ingress") == {
        f"allow {net.src} -> {net.a} tcp/{TCP_PORT}": "allow-only",
        f"drop other tcp/{TCP_PORT}": "guard",
        f"allow {net.src} -> {net.a} udp/{UDP_PORT}": "allow-only",
        f"drop other udp/{UDP_PORT}": "guard",
    }

    # a second allowed flow; removing the first keeps the port guarded
    membrane(
        *on_server(
            net, "allow-only", "--src", net.other_src, "--dst", net.a, "--dport", str(TCP_PORT)
        )
    )
    membrane(*on_server(net, "allow-only", *flow, "--remove"))
    expect({allowed: "drop", other_src: "pass", other_dst: "drop"})
    # removing the last one opens the port again (the UDP guard stays)
    membrane(
        *on_server(
            net,
            "allow-only",
            "--src",
            net.other_src,
            "--dst",
            net.a,
            "--dport",
            str(TCP_PORT),
            "--remove",
        )
    )
    expect({allowed: "pass", other_src: "pass", other_dst: "pass", udp_other: "drop"})
    assert rules_of(membrane_json("list"), net.server, "eth0", "tc-ingress") == {
        f"allow {net.src} -> {net.a} udp/{UDP_PORT}": "allow-only",
        f"drop other udp/{UDP_PORT}": "guard",
    }


def test_allow_only_egress_filters_what_leaves_the_device(net: Net) -> None:
    allowed = Flow("tcp", net.client, net.a, TCP_PORT, src=net.src)
    other_src = Flow("tcp", net.client, net.a, TCP_PORT, src=net.other_src)
    membrane(
        "allow-only",
        "--netns",
        net.client,
        "--dev",
        "eth0",
        "--direction",
        "egress",
        "--src",
        net.src,
        "--dst",
        net.a,
        "--dport",
        str(TCP_PORT),
    )
    expect(
        {
            allowed: "pass",
            other_src: "drop",
            Flow("tcp", net.client, net.a, TCP_OTHER, src=net.other_src): "pass",
        }
    )
    # it was the client's egress that dropped: the server's device has no filter at all
    assert not (FILTER_ROOT / f"netns-{net.server}").exists()
    stats = membrane_json("stats")
    assert attachment(stats, net.client, "eth0", "tc-egress")["state"] == "attached"
    guard = rule_stat(stats, net.client, "eth0", "tc-egress", f"drop other tcp/{TCP_PORT}")
    assert guard["packets"] == 1  # one SYN


# ---- detach ----------------------------------------------------------------------------
def test_detach_restores_traffic_and_removes_pins_and_links(net: Net) -> None:
    to_a = Flow("ping", net.client, net.a)
    server_guarded = Flow("tcp", net.client, net.a, TCP_PORT, src=net.other_src)
    client_guarded = Flow("tcp", net.client, net.b, TCP_OTHER, src=net.other_src)
    membrane(*on_server(net, "drop-dst", net.a))
    membrane(
        *on_server(net, "allow-only", "--src", net.src, "--dst", net.a, "--dport", str(TCP_PORT))
    )
    membrane(
        "allow-only",
        "--netns",
        net.client,
        "--dev",
        "eth0",
        "--direction",
        "egress",
        "--src",
        net.src,
        "--dst",
        net.b,
        "--dport",
        str(TCP_OTHER),
    )
    links = {
        hook: pinned_link(ns, "eth0", hook)["id"]
        for ns, hook in ((net.server, "xdp"), (net.server, "tc-ingress"), (net.client, "tc-egress"))
    }
    assert set(links.values()) <= kernel_link_ids()
    expect({to_a: "drop", server_guarded: "drop", client_guarded: "drop"})

    out = membrane("detach", "--netns", net.server, "--dev", "eth0", "--hook", "xdp").stdout
    assert out.strip() == f"detached xdp filter from eth0 (netns {net.server})"
    assert not attachment_dir(net.server, "eth0", "xdp").exists()
    assert links["xdp"] not in kernel_link_ids()
    assert xdp_prog_id(net.server, "eth0") is None
    # ping A passes again (the tc filter guards TCP only); the others are still in force
    expect({to_a: "pass", server_guarded: "drop", client_guarded: "drop"})

    membrane("detach", "--netns", net.server, "--dev", "eth0")
    assert not (FILTER_ROOT / f"netns-{net.server}").exists()
    assert links["tc-ingress"] not in kernel_link_ids()
    expect({server_guarded: "pass", client_guarded: "drop"})
    assert attachment_dir(net.client, "eth0", "tc-egress").is_dir()

    if others := foreign_filters([net.client, net.server]):
        pytest.skip(f"not running `detach --all`: it would remove filters of others {others}")
    out = membrane("detach", "--all").stdout
    assert out.strip() == f"detached tc-egress filter from eth0 (netns {net.client})"
    assert not FILTER_ROOT.exists()
    assert not set(links.values()) & kernel_link_ids()
    expect({to_a: "pass", server_guarded: "pass", client_guarded: "pass"})


def test_clsact_filter_is_found_replaced_never_doubled_and_detached(net: Net) -> None:
    """--attach clsact (the fallback of kernels without tcx): the filter sits in a fixed
    slot, so a second attach with its pins lost replaces it instead of adding another, and
    detach removes it. `tc` itself counts the filters."""
    allowed = Flow("tcp", net.client, net.a, TCP_PORT, src=net.src)
    other_src = Flow("tcp", net.client, net.a, TCP_PORT, src=net.other_src)
    flow = ["--src", net.src, "--dst", net.a, "--dport", str(TCP_PORT)]
    membrane(*on_server(net, "allow-only", *flow, "--attach", "clsact"))
    slots = [
        (f["pref"], f["options"]["handle"]) for f in clsact_filters(net.server, "eth0", "ingress")
    ]
    assert slots == [(FILTER_SLOT.priority, hex(FILTER_SLOT.handle))]
    assert attachment(membrane_json("list"), net.server, "eth0", "tc-ingress")["state"] == (
        "attached (clsact)"
    )
    expect({allowed: "pass", other_src: "drop"})
    line = user_error(*on_server(net, "allow-only", *flow, "--attach", "tcx"))
    assert "--attach" in line and "clsact" in line

    shutil.rmtree(attachment_dir(net.server, "eth0", "tc-ingress"))  # its pins lost
    membrane(*on_server(net, "allow-only", *flow, "--attach", "clsact"))
    assert len(clsact_filters(net.server, "eth0", "ingress")) == 1
    expect({allowed: "pass", other_src: "drop"})

    membrane("detach", "--netns", net.server, "--dev", "eth0")
    assert clsact_filters(net.server, "eth0", "ingress") == []
    expect({allowed: "pass", other_src: "pass"})


def test_detach_after_the_namespace_was_deleted(topology: Topology, pair: Pair) -> None:
    gone = pair.server.ns
    membrane("drop-dst", "--netns", gone, "--dev", "eth0", pair.server.ip)
    membrane(
        "allow-only",
        "--netns",
        gone,
        "--dev",
        "eth0",
        "--src",
        pair.client.ip,
        "--dst",
        pair.server.ip,
        "--dport",
        str(TCP_PORT),
    )
    links = {pinned_link(gone, "eth0", h)["id"] for h in ("xdp", "tc-ingress")}
    netns.delete(gone)  # nothing runs in it, so the kernel frees it and its devices

    def defunct() -> list[str]:
        states = [a["state"] for a in membrane_json("list") if a["netns"] == gone]
        return states if states and all(s.startswith("defunct") for s in states) else []

    assert len(wait_for("the filters to notice their device is gone", defunct)) == 2
    assert len([a for a in membrane_json("stats") if a["netns"] == gone]) == 2

    out = membrane("detach", "--netns", gone, "--dev", "eth0").stdout
    assert sorted(out.splitlines()) == sorted(
        f"detached {h} filter from eth0 (netns {gone})" for h in ("xdp", "tc-ingress")
    )
    assert not (FILTER_ROOT / f"netns-{gone}").exists()
    assert not links & kernel_link_ids()


# ---- counters and events ---------------------------------------------------------------
def _events(ns: str) -> list[dict]:
    """Queued drop events of the filters in `ns` (reading drains them)."""
    lines = membrane("events", "-o", "json").stdout.splitlines()
    return [ev for ev in map(json.loads, lines) if ev["netns"] == ns]


def _check_times(events: list[dict], since: datetime) -> None:
    for ev in events:
        at = datetime.fromisoformat(ev["time"])
        assert (
            since - timedelta(seconds=2) <= at <= datetime.now(at.tzinfo) + timedelta(seconds=2)
        ), f"event time {at} is not when the packet was sent"


def test_drop_dst_counters_and_events_match_the_datagrams_sent(net: Net) -> None:
    n, m, size, sport = 7, 3, 20, 40001
    membrane(*on_server(net, "drop-dst", f"{net.a}/32"))
    rule_text = f"{net.a}/32"
    since = datetime.now().astimezone()
    send_udp(net.client, net.a, UDP_SINK, n, sport=sport, size=size)
    send_udp(net.client, net.b, UDP_SINK, m, sport=sport, size=size)  # passes

    def counted() -> list:
        stats = membrane_json("stats")
        rule = rule_stat(stats, net.server, "eth0", "xdp", rule_text)
        return stats if rule["packets"] >= n else []

    att = attachment(wait_for(f"{n} packets on the rule", counted), net.server, "eth0", "xdp")
    (rule,) = att["rules"]
    assert (rule["packets"], rule["bytes"]) == (n, n * (ETH_IP_UDP + size))
    totals = att["totals"]
    assert totals["dropped"] == {"packets": n, "bytes": n * (ETH_IP_UDP + size)}
    assert totals["passed"]["packets"] >= m  # plus whatever else the client sent (IPv6 ND)
    assert totals["unparsed"]["packets"] == 0
    for key in ("packets", "bytes"):
        assert totals["seen"][key] == totals["passed"][key] + totals["dropped"][key]

    events = _events(net.server)
    assert len(events) == n, events
    expected = {
        "device": "eth0",
        "netns": net.server,
        "hook": "xdp",
        "protocol": "udp",
        "src": net.src,
        "dst": net.a,
        "sport": sport,
        "dport": UDP_SINK,
        "length": ETH_IP_UDP + size,
        "rule_id": rule["id"],
        "rule": f"drop-dst {rule_text}",
    }
    for ev in events:
        assert {k: ev[k] for k in expected} == expected
    _check_times(events, since)
    assert _events(net.server) == []  # read once: the ring is drained


def test_drop_proto_counters_and_followed_events_match_the_pings_sent(net: Net) -> None:
    n = 4
    membrane(*on_server(net, "drop-proto", "icmp"))
    follower = subprocess.Popen(
        [*MEMBRANE, "filter", "events", "--follow", "-o", "json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        with contextlib.suppress(ValueError, OSError):  # stdout closed when we stop it
            for line in follower.stdout:
                lines.put(line)

    reader = threading.Thread(target=read, daemon=True)
    try:
        reader.start()
        since = datetime.now().astimezone()
        for _ in range(n):
            assert not netns.ping(net.client, net.a, timeout=0.05)
        events = []
        deadline = time.monotonic() + 10
        while len(events) < n and time.monotonic() < deadline:
            try:
                ev = json.loads(lines.get(timeout=0.2))
            except queue.Empty:
                assert follower.poll() is None, follower.stderr.read()
                continue
            if ev["netns"] == net.server:
                events.append(ev)
    finally:
        netns.stop(follower)
        reader.join(5)
    assert len(events) == n, f"followed {len(events)} events, sent {n} pings"

    att = attachment(membrane_json("stats"), net.server, "eth0", "xdp")
    (rule,) = att["rules"]
    assert (rule["rule"], rule["packets"], rule["bytes"]) == (
        "icmp",
        n,
        n * (ETH_IP_ICMP + PING_PAYLOAD),
    )
    assert att["totals"]["dropped"]["packets"] == n
    for ev in events:
        assert (
            ev["hook"],
            ev["protocol"],
            ev["src"],
            ev["dst"],
            ev["sport"],
            ev["dport"],
            ev["rule_id"],
            ev["rule"],
        ) == ("xdp", "icmp", net.src, net.a, 0, 0, rule["id"], "drop-proto icmp")
    _check_times(events, since)


def test_allow_only_counters_and_events_match_the_datagrams_sent(net: Net) -> None:
    n, m, size = 5, 3, 10
    membrane(
        *on_server(
            net,
            "allow-only",
            "--src",
            net.src,
            "--dst",
            net.a,
            "--dport",
            str(UDP_SINK),
            "--proto",
            "udp",
        )
    )
    send_udp(net.client, net.a, UDP_SINK, n, sport=40002, size=size, src=net.other_src)
    send_udp(net.client, net.a, UDP_SINK, m, sport=40003, size=size, src=net.src)
    guard_text = f"drop other udp/{UDP_SINK}"
    flow_text = f"allow {net.src} -> {net.a} udp/{UDP_SINK}"

    def counted() -> list:
        stats = membrane_json("stats")
        done = (
            rule_stat(stats, net.server, "eth0", "tc-ingress", guard_text)["packets"] >= n
            and rule_stat(stats, net.server, "eth0", "tc-ingress", flow_text)["packets"] >= m
        )
        return stats if done else []

    stats = wait_for("the datagrams to be counted", counted)
    guard = rule_stat(stats, net.server, "eth0", "tc-ingress", guard_text)
    flow = rule_stat(stats, net.server, "eth0", "tc-ingress", flow_text)
    assert (guard["packets"], guard["bytes"]) == (n, n * (ETH_IP_UDP + size))
    assert (flow["packets"], flow["bytes"]) == (m, m * (ETH_IP_UDP + size))
    totals = attachment(stats, net.server, "eth0", "tc-ingress")["totals"]
    assert totals["dropped"] == {"packets": n, "bytes": n * (ETH_IP_UDP + size)}
    assert totals["passed"]["packets"] >= m

    events = _events(net.server)
    assert len(events) == n, events
    for ev in events:
        assert (
            ev["hook"],
            ev["protocol"],
            ev["src"],
            ev["dst"],
            ev["sport"],
            ev["dport"],
            ev["length"],
            ev["rule_id"],
            ev["rule"],
        ) == (
            "tc-ingress",
            "udp",
            net.other_src,
            net.a,
            40002,
            UDP_SINK,
            ETH_IP_UDP + size,
            guard["id"],
            f"guard {guard_text}",
        )
