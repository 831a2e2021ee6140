"""drop-src and the token-bucket guards (rate-limit, syn-guard) of filter_xdp, through the
real program (BPF_PROG_TEST_RUN).

drop-src is drop-dst's tables read with the source address: random prefix sets checked
against a reference longest-prefix match, IPv4 and IPv6. The token buckets run on real
time (bpf_ktime_get_ns): a back-to-back batch passes exactly `burst` (the batch takes far
less than one refill interval, which the test measures and asserts), a measured wait
refills what the rate allows over the wait, within bounds taken from clock readings
around the runs.
"""

from __future__ import annotations

import ipaddress
import random
import time
from collections.abc import Iterator

import pytest
from filter_harness import FilterProgram, longest_match
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from test_filter_dir24 import probes, random_prefixes

from membrane.abi import FILTER_GUARD_RATE, FILTER_GUARD_SYN
from membrane.filter.keys import DropDstTables

pytestmark = pytest.mark.root

DST4, DST6 = "198.18.200.1", "2001:db8:200::1"
RATE_RULE, SYN_RULE = 900, 901
BUCKETS = 64  # LRU size the tests load with
MAC = "02:00:00:00:00:01"


def frame(src: str, dst: str | None = None, *, tcp_flags: str | None = None, dport: int = 80):
    """A UDP datagram (or a TCP segment with `tcp_flags`) from `src`."""
    v6 = ":" in src
    ip = IPv6(src=src, dst=dst or DST6) if v6 else IP(src=src, dst=dst or DST4)
    l4 = TCP(sport=40000, dport=dport, flags=tcp_flags) if tcp_flags else UDP(dport=dport)
    return bytes(Ether(src=MAC, dst=MAC) / ip / l4 / b"payload!")


@pytest.fixture(scope="module")
def src_only() -> Iterator[FilterProgram]:
    f = FilterProgram("filter_xdp", enable_drop_src=True)
    yield f
    f.close()


@pytest.fixture
def guarded() -> Iterator[FilterProgram]:
    """A fresh program (empty buckets) with both guards compiled in and off."""
    f = FilterProgram(
        "filter_xdp",
        enable_rate_limit=True,
        enable_syn_guard=True,
        max_entries={"rate_buckets": BUCKETS, "syn_buckets": BUCKETS},
    )
    yield f
    f.close()


def set_guard(f: FilterProgram, index: int, rule: int, pps: int, burst: int, **lens: int) -> None:
    config = f.map("guard_config")
    config.update(index, config.value_type(rule_id=rule, pps=pps, burst=burst, **lens))
    f.watch(rule)


# ---- drop-src ---------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(3))
def test_drop_src_matches_the_reference_by_source_through_live_changes(
    src_only: FilterProgram, seed: int
) -> None:
    rng = random.Random(seed)
    tables = DropDstTables.of(src_only.map, "src")
    rules = random_prefixes(rng, 120, first_rule=1, short=seed == 2)
    tables.add(rules.items())
    for _ in range(2):
        addresses = probes(rng, rules)
        got = src_only.dropping_rules(frame(str(a)) for a in addresses)
        want = [longest_match(a, rules) or 0 for a in addresses]  # type: ignore[arg-type]
        wrong = [(str(a), g, w) for a, g, w in zip(addresses, got, want, strict=True) if g != w]
        assert not wrong, f"{len(wrong)} of {len(addresses)} differ, e.g. {wrong[:5]}"
        gone = rng.sample(sorted(rules), len(rules) // 2)
        assert sorted(tables.remove(gone)) == sorted(rules.pop(n) for n in gone)
    tables.remove(list(rules))
    addresses = probes(random.Random(seed), rules, 50)
    assert src_only.dropping_rules(frame(str(a)) for a in addresses) == [0] * len(addresses)


def test_drop_src_ipv6_and_the_destination_is_not_judged(src_only: FilterProgram) -> None:
    tables = DropDstTables.of(src_only.map, "src")
    rules = {
        ipaddress.ip_network("2001:db8:66::/48"): 11,
        ipaddress.ip_network("2001:db8:66:1::/64"): 12,
        ipaddress.ip_network("198.18.66.0/24"): 13,
    }
    tables.add(rules.items())
    try:
        cases = {
            ("2001:db8:66::5", DST6): 11,
            ("2001:db8:66:1::5", DST6): 12,
            ("2001:db8:67::5", DST6): 0,
            ("198.18.66.9", DST4): 13,
            ("198.18.67.9", DST4): 0,
            # a listed address as the destination: drop-src does not look at it
            ("2001:db8:67::5", "2001:db8:66::5"): 0,
            ("198.18.67.9", "198.18.66.9"): 0,
        }
        got = src_only.dropping_rules(frame(s, d) for s, d in cases)
        assert dict(zip(cases, got, strict=True)) == cases
    finally:
        tables.remove(list(rules))


# ---- token buckets ----------------------------------------------------------------------
def passed_of(f: FilterProgram, data: bytes, count: int, rule: int) -> tuple[int, int, int]:
    """Run `data` `count` times back to back: (passed, monotonic ns before, after)."""
    started = time.monotonic_ns()
    out = f.run(data, repeat=count)
    ended = time.monotonic_ns()
    dropped = out.rules.get(rule, (0, 0))[0]
    assert out.stats["dropped"][0] == dropped
    return count - dropped, started, ended


def test_a_burst_passes_exactly_then_the_rate_refills(guarded: FilterProgram) -> None:
    pps, burst = 20, 7
    set_guard(guarded, FILTER_GUARD_RATE, RATE_RULE, pps, burst, prefix_len4=32, prefix_len6=128)
    data = frame("198.18.10.1")
    passed, t0, t1 = passed_of(guarded, data, 50, RATE_RULE)
    assert t1 - t0 < 1e9 / pps, "the batch must take less than one refill interval"
    assert passed == burst
    # a measured wait: tokens in [floor(quiet * pps), ceil(span * pps)], capped at burst
    time.sleep(0.2)
    passed, t2, t3 = passed_of(guarded, data, 50, RATE_RULE)
    low = min(burst, int((t2 - t1) * pps // 1_000_000_000))
    high = min(burst, -(-(t3 - t0) * pps // 1_000_000_000))
    assert low <= passed <= high, (low, passed, high)
    assert low >= 3  # the bounds are tight enough to fail: 0.2 s at 20 pps is 4 tokens


def test_sources_have_their_own_buckets_or_share_their_prefix(guarded: FilterProgram) -> None:
    set_guard(guarded, FILTER_GUARD_RATE, RATE_RULE, 1, 3, prefix_len4=24, prefix_len6=64)
    sources = ("198.18.10.1", "198.18.10.2", "198.18.11.1", "2001:db8:1::1", "2001:db8:1::2")
    frames = {src: frame(src) for src in sources}  # built first: the runs take < 1 s
    started = time.monotonic_ns()
    counts = {src: passed_of(guarded, data, 10, RATE_RULE)[0] for src, data in frames.items()}
    assert time.monotonic_ns() - started < 1e9
    # .10.2 shares .10.1's /24 bucket, spent already; ::2 shares ::1's /64
    assert counts == {
        "198.18.10.1": 3,
        "198.18.10.2": 0,
        "198.18.11.1": 3,
        "2001:db8:1::1": 3,
        "2001:db8:1::2": 0,
    }


def test_burst_lowered_live_takes_effect(guarded: FilterProgram) -> None:
    set_guard(guarded, FILTER_GUARD_RATE, RATE_RULE, 1, 10, prefix_len4=32, prefix_len6=128)
    assert passed_of(guarded, frame("198.18.12.1"), 3, RATE_RULE)[0] == 3
    set_guard(guarded, FILTER_GUARD_RATE, RATE_RULE, 1, 2, prefix_len4=32, prefix_len6=128)
    assert passed_of(guarded, frame("198.18.12.1"), 10, RATE_RULE)[0] == 2
    config = guarded.map("guard_config")
    config.update(FILTER_GUARD_RATE, config.value_type())  # off: everything passes
    assert passed_of(guarded, frame("198.18.12.1"), 10, RATE_RULE)[0] == 10


def test_the_bucket_map_stays_bounded_under_spoofed_sources(guarded: FilterProgram) -> None:
    """More sources than buckets: the LRU map never holds more than its size, and the
    events of drops name the rule."""
    set_guard(guarded, FILTER_GUARD_RATE, RATE_RULE, 1, 1, prefix_len4=32, prefix_len6=128)
    sources = [f"198.19.{i // 250}.{i % 250 + 1}" for i in range(BUCKETS * 8)]
    for src in sources:  # each new source gets a full bucket: one packet passes
        assert passed_of(guarded, frame(src), 2, RATE_RULE)[0] == 1
    buckets = guarded.map("rate_buckets")
    assert buckets.max_entries == BUCKETS
    assert 0 < len(list(buckets.keys())) <= BUCKETS
    out = guarded.run(frame(sources[-1]))
    assert out.verdict == "drop"
    assert [int(e["rule_id"]) for e in out.events] == [RATE_RULE]


def test_syn_guard_limits_syns_per_destination_port_only(guarded: FilterProgram) -> None:
    set_guard(guarded, FILTER_GUARD_SYN, SYN_RULE, 1, 4)
    syn = frame("198.18.10.1", tcp_flags="S", dport=80)
    assert passed_of(guarded, syn, 10, SYN_RULE)[0] == 4
    # the same destination port from another source: the bucket is the destination's
    assert passed_of(guarded, frame("198.18.99.1", tcp_flags="S", dport=80), 5, SYN_RULE)[0] == 0
    # another port, another destination: their own buckets
    assert passed_of(guarded, frame("198.18.10.1", tcp_flags="S", dport=81), 10, SYN_RULE)[0] == 4
    other = frame("198.18.10.1", "198.18.200.2", tcp_flags="S", dport=80)
    assert passed_of(guarded, other, 10, SYN_RULE)[0] == 4
    # not SYNs: SYN-ACK, ACK, data and UDP all pass
    for flags in ("SA", "A", "PA"):
        assert passed_of(guarded, frame("198.18.10.1", tcp_flags=flags), 10, SYN_RULE)[0] == 10
    assert passed_of(guarded, frame("198.18.10.1", dport=80), 10, SYN_RULE)[0] == 10
    v6 = frame("2001:db8:1::1", tcp_flags="S", dport=80)
    assert passed_of(guarded, v6, 10, SYN_RULE)[0] == 4
