"""IPv4 drop-dst's DIR-24-8 tables against a reference longest-prefix match, through the
real program (BPF_PROG_TEST_RUN): random prefix sets of every length /0-/32, nested and
overlapping, probed at random addresses and at the edges of every prefix (its first and
last address and the ones just outside), after live adds and removes, and after the maps
are reopened from their pins by a new program.

The verdict and the rule id (from the drop event) of every probe must be the reference's.
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import numpy as np
import pytest
from filter_harness import FilterProgram, longest_match
from packets import offset_of, packet
from scapy.layers.inet import IP

from membrane.abi import DIR24_GROUPS, DIR24_RETIRED
from membrane.bpf.fs import ensure_bpffs
from membrane.filter.dir24 import STATE, TablesFull
from membrane.filter.keys import DropDstTables

pytestmark = pytest.mark.root

HOME = IPv4Network("198.18.0.0/15")  # where prefixes cluster, so that they nest
TEMPLATE = bytes(packet("198.18.0.1", "udp"))
DST_AT = offset_of(packet("198.18.0.1", "udp"), IP) + 16
Rules = dict[IPv4Network, int]


def frame_to(address: IPv4Address) -> bytes:
    """The template UDP frame with another destination (the program reads no checksum)."""
    return TEMPLATE[:DST_AT] + address.packed + TEMPLATE[DST_AT + 4 :]


def random_prefixes(rng: random.Random, count: int, first_rule: int, short: bool = False) -> Rules:
    """`count` prefixes around a few anchors in HOME: every length, mostly long ones (short
    ones answer for everything under them), many nested in or overlapping each other.
    With `short`, a third are /0 to /8 (the top table), and half the anchors are anywhere
    in the address space, so that short prefixes hold long ones in many /8s."""
    anchors = [HOME[rng.randrange(HOME.num_addresses)] for _ in range(6)]
    if short:
        anchors += [IPv4Address(rng.getrandbits(32)) for _ in range(6)]
    lengths = list(range(33))
    weights = [1 if n < 8 else 3 if n <= 24 else 8 for n in lengths]
    if short:
        weights = [18 if n <= 8 else w for n, w in enumerate(weights)]
    rules: Rules = {}
    while len(rules) < count:
        length = rng.choices(lengths, weights)[0]
        near = anchors[rng.randrange(len(anchors))]
        address = int(near) ^ rng.getrandbits(rng.choice((4, 8, 12, 16)))
        if short and length <= 8:
            address = rng.getrandbits(32)
        net = IPv4Network((address, length), strict=False)
        rules.setdefault(net, first_rule + len(rules))
    return rules


def probes(rng: random.Random, rules: Rules, extra: int = 300) -> list[IPv4Address]:
    """The edges of every prefix and random addresses, in and around HOME."""
    found: set[int] = set()
    for net in rules:
        first, last = int(net.network_address), int(net.broadcast_address)
        found.update(a for a in (first - 1, first, last, last + 1) if 0 <= a < 1 << 32)
    found.update(
        int(HOME.network_address) + rng.randrange(HOME.num_addresses) for _ in range(extra)
    )
    found.update(rng.getrandbits(32) for _ in range(extra // 10))
    for net in rules:  # inside every prefix, not only at its edges
        found.add(int(net.network_address) + rng.randrange(net.num_addresses))
    return [IPv4Address(a) for a in sorted(found)]


def assert_matches_reference(f: FilterProgram, rules: Rules, addresses: list[IPv4Address]) -> None:
    got = f.dropping_rules(frame_to(a) for a in addresses)
    want = [longest_match(a, rules) or 0 for a in addresses]  # type: ignore[arg-type]
    wrong = [(str(a), g, w) for a, g, w in zip(addresses, got, want, strict=True) if g != w]
    assert not wrong, f"{len(wrong)} of {len(addresses)} lookups differ, e.g. {wrong[:5]}"


def assert_empty(tables: DropDstTables) -> None:
    """Nothing left: every tbl24 and top entry is 0 and no group is in use."""
    assert not np.count_nonzero(tables.dir24.tbl24)
    assert not np.count_nonzero(tables.dir24.top)
    state = tables.dir24.tbl8[:, STATE]
    assert np.all((state == 0) | (state == DIR24_RETIRED))


@pytest.fixture
def xdp() -> Iterator[FilterProgram]:
    f = FilterProgram("filter_xdp", enable_drop_dst=True, enable_drop_proto=False)
    yield f
    f.close()


@pytest.mark.parametrize("short", [False, True], ids=["mostly-long", "with-short"])
@pytest.mark.parametrize("seed", range(4))
def test_random_prefix_sets_match_the_reference_through_live_changes(
    xdp: FilterProgram, seed: int, short: bool
) -> None:
    """`with-short`: a third of the prefixes /0 to /8, anywhere, mixed with long ones."""
    rng = random.Random(seed)
    tables = xdp.dst_tables()
    rules = random_prefixes(rng, 150, first_rule=1, short=short)
    tables.add(rules.items())
    assert_matches_reference(xdp, rules, probes(rng, rules))

    for round_ in range(3):  # remove a third, add as many new ones (some nested in old)
        gone = rng.sample(sorted(rules), len(rules) // 3)
        assert sorted(tables.remove(gone)) == sorted(rules.pop(n) for n in gone)
        new = {
            n: r
            for n, r in random_prefixes(rng, 50, 1000 * (round_ + 1), short).items()
            if n not in rules
        }
        tables.add(new.items())
        rules.update(new)
        assert_matches_reference(xdp, rules, probes(rng, rules | dict.fromkeys(gone, 0)))

    tables.remove(list(rules))
    assert_matches_reference(xdp, {}, probes(rng, rules))
    assert_empty(tables)


@pytest.mark.parametrize("short", [False, True], ids=["mostly-long", "with-short"])
def test_one_change_at_a_time_matches_the_reference(xdp: FilterProgram, short: bool) -> None:
    """Single adds and removes in random order, each checked where it could matter: the
    edges of the changed prefix and of every prefix it nests in or holds."""
    rng = random.Random(11)
    tables = xdp.dst_tables()
    pool = random_prefixes(rng, 120, first_rule=1, short=short)
    rules: Rules = {}
    for _ in range(240):
        net = rng.choice(sorted(pool))
        if net in rules:
            assert tables.remove([net]) == [rules.pop(net)]
        else:
            rules[net] = pool[net]
            tables.add([(net, pool[net])])
        related = {n: r for n, r in pool.items() if n.overlaps(net)}
        assert_matches_reference(xdp, rules, probes(rng, related, extra=10))
    tables.remove(list(rules))
    assert_empty(tables)


def test_a_group_is_reused_only_after_a_grace_period(xdp: FilterProgram) -> None:
    """Every group taken: one more /24 with a longer prefix is refused; a freed group is
    retired, not free, until no program can still be reading it; then it is reused."""
    tables = xdp.dst_tables()
    hosts = [IPv4Network((int(HOME.network_address) + (i << 8) + 7, 32)) for i in range(511)]
    many = {IPv4Network(((10 << 24) + (i << 8), 32)): 2 + i for i in range(DIR24_GROUPS - 511)}
    rules = {n: 20000 + i for i, n in enumerate(hosts)} | many
    tables.add(rules.items())
    extra = IPv4Network("198.19.255.9/32")  # the one /24 of HOME left
    assert tables.dir24.groups_available() == 0
    assert tables.dir24.groups_needed([extra]) == 1
    with pytest.raises(TablesFull):
        tables.add([(extra, 1)])
    tables.remove([extra])  # its record goes; nothing was in force

    tables.remove([hosts[0]])
    del rules[hosts[0]]
    state = tables.dir24.tbl8[:, STATE]
    assert np.count_nonzero(state == DIR24_RETIRED) == 1
    assert tables.dir24.groups_available() == 1
    tables.add([(extra, 1)])  # waits for a grace period, then reuses the retired group
    rules[extra] = 1
    assert np.count_nonzero(state == DIR24_RETIRED) == 0
    sample = [n.network_address for n in [*hosts[:20], extra]] + [IPv4Address("198.18.0.7")]
    assert_matches_reference(xdp, rules, sample)
    tables.remove(list(rules))
    assert_empty(tables)


@pytest.fixture
def pin_dir() -> Iterator[Path]:
    path = Path(ensure_bpffs()) / f"test-dir24-{random.getrandbits(32):08x}"
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_tables_reopened_from_pins_keep_answering_and_changing(pin_dir: Path) -> None:
    """What `membrane filter` does across runs: a new program reuses the pinned maps, and
    a later run changes them through tables opened from the pins."""
    rng = random.Random(5)

    def reload() -> FilterProgram:
        return FilterProgram(
            "filter_xdp", str(pin_dir), enable_drop_dst=True, enable_drop_proto=False
        )

    first = reload()
    rules = random_prefixes(rng, 100, first_rule=1)
    try:
        first.dst_tables().add(rules.items())
    finally:
        first.close()
    again = reload()
    try:
        assert_matches_reference(again, rules, probes(rng, rules))
        reopened = DropDstTables.of(again.map)
        assert {str(n): r for n, r in reopened.items(version=4)} == {
            str(n): r for n, r in rules.items()
        }
        gone = sorted(rules)[::2]
        reopened.remove(gone)
        for net in gone:
            del rules[net]
        new = {n: r for n, r in random_prefixes(rng, 30, first_rule=500).items() if n not in rules}
        reopened.add(new.items())
        rules.update(new)
        assert_matches_reference(again, rules, probes(rng, rules))
    finally:
        again.close()
