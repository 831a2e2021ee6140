"""drop-src, rate-limit and syn-guard of `membrane filter` under a real flood: a raw-socket
sender in one namespace floods with spoofed sources while a legitimate client in another
sends UDP and opens TCP connections; both reach the server's eth0 through a router, and
the guard is the XDP program there (membrane.testing.ddos).

Bounds come from the sender's own counts and the clock: a token bucket lets through at
most burst + pps x (the time the flood lasted), and the legitimate stream (well under its
own limit) must arrive whole but for 5 %.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from filter_support import attachment, attachment_dir, detach_in, membrane, membrane_json

from membrane.abi import DIR24_BLOCKS
from membrane.bpf import Map
from membrane.netns import Topology
from membrane.testing import ddos
from membrane.testing.traffic import connect, drain, listen
from membrane.testing.waiting import wait_for

pytestmark = pytest.mark.root

SINK, TCP_PORT, OTHER_PORT = 9000, 7100, 7101
LEGIT_PPS, FLOOD_PPS, SECONDS = 300, 3000, 1.5


@pytest.fixture
def bed(topology: Topology) -> Iterator[ddos.Bed]:
    bed = ddos.build(topology)
    yield bed
    detach_in(topology.namespaces)


def on_server(bed: ddos.Bed, command: str, *args: str) -> list[str]:
    return [command, "--netns", bed.server.ns, "--dev", "eth0", *args]


def flood(topology: Topology, bed: ddos.Bed, kind: str = "spoof-udp", port: int = SINK) -> dict:
    """The flood and the legitimate stream at once; returns both senders' counts and what
    the server received from each."""
    with ddos.UdpCounter(bed.server.ns, bed.server.ip, SINK) as counter:
        legit = ddos.start_sender(
            topology, bed.legit.ns, kind="udp", dst=bed.server.ip, port=SINK,
            pps=LEGIT_PPS, seconds=SECONDS,
        )  # fmt: skip
        attack = ddos.start_sender(
            topology, bed.flood.ns, kind=kind, dst=bed.server.ip, port=port,
            pps=FLOOD_PPS, seconds=SECONDS, sources=ddos.SPOOFED,
        )  # fmt: skip
        sent = {"legit": ddos.finish(legit), "flood": ddos.finish(attack)}
        assert sent["flood"]["sent"] >= 0.5 * FLOOD_PPS * SECONDS, sent  # a flood it was
        wait_for(
            "the legitimate stream to arrive",
            lambda: counter.counts[bed.legit.ip] >= sent["legit"]["sent"] * 0.95,
            timeout=5,
        )
        received = {"legit": counter.counts[bed.legit.ip]}
        received["flood"] = sum(n for src, n in counter.counts.items() if src != bed.legit.ip)
    return {"sent": sent, "received": received}


def pinned_size(path: Path) -> int:
    with Map.from_pin(str(path)) as m:
        return m.max_entries


def guard_rule(bed: ddos.Bed, kind: str) -> dict:
    att = attachment(membrane_json("stats"), bed.server.ns, "eth0", "xdp")
    (rule,) = [r for r in att["rules"] if r["kind"] == kind]
    return rule


def test_drop_src_drops_the_spoofed_flood_and_keeps_the_legitimate_client(
    topology: Topology, bed: ddos.Bed
) -> None:
    # drop-src enabled on a filter that has drop-dst only: until then its tables are
    # one-element placeholders, then replaced by full ones under the running program
    membrane(*on_server(bed, "drop-dst", "198.18.254.254"))
    tbl24 = attachment_dir(bed.server.ns, "eth0", "xdp") / "drop_src_tbl24"
    assert pinned_size(tbl24) == 1
    out = membrane(*on_server(bed, "drop-src", ddos.SPOOFED)).stdout
    assert "1 drop-dst, 1 drop-src" in out
    assert pinned_size(tbl24) == DIR24_BLOCKS
    got = flood(topology, bed)
    assert got["received"]["flood"] == 0
    assert got["received"]["legit"] >= 0.95 * got["sent"]["legit"]["sent"]
    rule = guard_rule(bed, "drop-src")
    assert rule["rule"] == ddos.SPOOFED
    # every spoofed datagram that left the flooder met the rule (the router forwards all)
    assert 0.99 * got["sent"]["flood"]["sent"] <= rule["packets"] <= got["sent"]["flood"]["sent"]
    # removed live: the flood's sources get through again
    membrane(*on_server(bed, "drop-src", "--remove", ddos.SPOOFED))
    assert flood(topology, bed)["received"]["flood"] > 0


def test_rate_limit_caps_a_spoofed_prefix_and_keeps_the_legitimate_client(
    topology: Topology, bed: ddos.Bed
) -> None:
    pps, burst = 500, 50
    # while a guard is off its bucket map is a one-element placeholder; the first
    # rate-limit replaces it with a full one under the running program
    membrane(*on_server(bed, "drop-dst", "198.18.254.254"))
    pinned = attachment_dir(bed.server.ns, "eth0", "xdp")
    assert pinned_size(pinned / "rate_buckets") == pinned_size(pinned / "syn_buckets") == 1
    # the spoofed sources share one /16 and so one bucket; the client is in another /16
    membrane(
        *on_server(bed, "rate-limit", "--pps", str(pps), "--burst", str(burst)),
        "--prefix-len",
        "16",
    )
    got = flood(topology, bed)
    sent = got["sent"]["flood"]
    allowed = burst + pps * (sent["seconds"] + 0.5)  # + the time until the last packet's run
    assert got["received"]["flood"] <= allowed, got
    assert got["received"]["legit"] >= 0.95 * got["sent"]["legit"]["sent"], got
    rule = guard_rule(bed, "rate-limit")
    assert rule["settings"]["pps"] == pps and rule["settings"]["prefix_len"] == 16
    assert rule["settings"]["buckets"] == 65536 and rule["settings"]["memory"] > 0
    assert pinned_size(pinned / "rate_buckets") == 65536
    assert pinned_size(pinned / "syn_buckets") == 1
    assert sent["sent"] - allowed <= rule["packets"] <= sent["sent"]

    # changed live: a limit above the flood's rate drops nothing more
    membrane(*on_server(bed, "rate-limit", "--pps", str(FLOOD_PPS * 4), "--prefix-len", "16"))
    before = guard_rule(bed, "rate-limit")["packets"]
    again = flood(topology, bed)
    assert again["received"]["flood"] >= 0.95 * again["sent"]["flood"]["sent"]
    assert guard_rule(bed, "rate-limit")["packets"] == before
    membrane(*on_server(bed, "rate-limit", "--remove"))
    # off, its map can take another size; on, it cannot
    membrane(*on_server(bed, "rate-limit", "--pps", "10", "--buckets", "1024"))
    assert guard_rule(bed, "rate-limit")["settings"]["buckets"] == 1024
    refused = membrane(
        *on_server(bed, "rate-limit", "--pps", "10", "--buckets", "2048"), check=False
    )
    assert refused.returncode == 2 and "--buckets" in refused.stderr
    assert guard_rule(bed, "rate-limit")["settings"]["buckets"] == 1024
    membrane(*on_server(bed, "rate-limit", "--remove"))
    assert [r for r in attachment(membrane_json("list"), bed.server.ns, "eth0", "xdp")["rules"]
            if r["kind"] == "rate-limit"] == []  # fmt: skip


def test_syn_guard_caps_syns_to_the_port_and_leaves_other_ports(
    topology: Topology, bed: ddos.Bed
) -> None:
    pps, burst = 200, 20
    listeners = [listen(bed.server.ns, bed.server.ip, p) for p in (TCP_PORT, OTHER_PORT)]
    try:
        membrane(*on_server(bed, "syn-guard", "--pps", str(pps), "--burst", str(burst)))
        with ThreadPoolExecutor(max_workers=1) as pool:
            attack = ddos.start_sender(
                topology, bed.flood.ns, kind="syn", dst=bed.server.ip, port=TCP_PORT,
                pps=FLOOD_PPS, seconds=SECONDS, sources=ddos.SPOOFED,
            )  # fmt: skip
            # while the port is flooded, connections to another port open
            opened = pool.submit(
                lambda: [connect(bed.legit.ns, bed.server.ip, OTHER_PORT, 0.5) for _ in range(20)]
            ).result()
            sent = ddos.finish(attack)
        assert all(opened)
        drain(listeners)
        rule = guard_rule(bed, "syn-guard")
        allowed = burst + pps * (sent["seconds"] + 0.5)
        assert sent["sent"] - allowed <= rule["packets"] <= sent["sent"], (rule, sent)
        assert rule["packets"] >= 0.8 * sent["sent"]  # the guard did drop most of the flood
    finally:
        for sock in listeners:
            sock.close()
