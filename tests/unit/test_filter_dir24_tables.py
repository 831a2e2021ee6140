"""The DIR-24-8 tables of IPv4 drop-dst on plain numpy arrays (no kernel): which entries a
change writes, and when a /24 takes, keeps and gives back a tbl8 group."""

from __future__ import annotations

from ipaddress import IPv4Network, ip_address

import numpy as np

from membrane.abi import DIR24_GROUP_ENTRIES, DIR24_RETIRED, DIR24_TOP_ENTRIES
from membrane.filter.dir24 import COVERING, GROUP, STATE, Dir24, entry


def tables(groups: int = 4) -> Dir24:
    return Dir24(
        np.zeros(1 << 24, dtype=np.uint32),
        np.zeros((groups, DIR24_GROUP_ENTRIES + 2), dtype=np.uint32),
        np.zeros(DIR24_TOP_ENTRIES, dtype=np.uint32),
    )


def at(text: str) -> int:
    return int(ip_address(text))


def test_a_short_prefix_writes_only_tbl24() -> None:
    t = tables()
    t.add(IPv4Network("198.18.0.0/22"), 7)
    first = at("198.18.0.0") >> 8
    assert np.flatnonzero(t.tbl24).tolist() == list(range(first, first + 4))
    assert set(t.tbl24[first : first + 4].tolist()) == {entry(7, 22)}
    assert not t.tbl8.any() and not t.top.any()


def test_prefixes_of_8_or_shorter_write_only_the_top_table() -> None:
    """A /8, a /4 and 0.0.0.0/0 change 1, 16 and 256 top entries, never tbl24 or a group:
    whatever is listed under them, a change of one of them is at most 256 stores."""
    t = tables()
    t.add(IPv4Network("198.18.5.7/32"), 5)
    t.add(IPv4Network("198.18.0.0/16"), 4)
    before24, before8 = t.tbl24.copy(), t.tbl8.copy()
    t.add(IPv4Network("198.0.0.0/8"), 3)
    t.add(IPv4Network("0.0.0.0/0"), 1)
    t.add(IPv4Network("192.0.0.0/4"), 2)
    assert np.array_equal(t.tbl24, before24) and np.array_equal(t.tbl8, before8)
    assert np.flatnonzero(t.top == entry(3, 8)).tolist() == [198]
    assert np.flatnonzero(t.top == entry(2, 4)).tolist() == [*range(192, 198), *range(199, 208)]
    assert np.count_nonzero(t.top == entry(1, 0)) == 256 - 16
    probes = ("198.18.5.7", "198.18.5.8", "198.19.0.1", "193.0.0.1", "10.0.0.1", "0.0.0.0")
    assert [t.lookup(at(a)) for a in probes] == [5, 4, 3, 2, 1, 1]
    t.remove(IPv4Network("198.0.0.0/8"), 3, parent=entry(2, 4))
    t.remove(IPv4Network("198.18.0.0/16"), 4, parent=entry(2, 4))  # tbl24 gets 0, not the /4
    assert t.tbl24[at("198.18.0.0") >> 8] == 0
    assert [t.lookup(at(a)) for a in probes] == [5, 2, 2, 2, 1, 1]
    t.remove(IPv4Network("192.0.0.0/4"), 2, parent=entry(1, 0))
    assert [t.lookup(at(a)) for a in probes] == [5, 1, 1, 1, 1, 1]
    t.remove(IPv4Network("0.0.0.0/0"), 1, parent=0)
    assert not t.top.any()
    assert [t.lookup(at(a)) for a in probes] == [5, 0, 0, 0, 0, 0]


def test_a_long_prefix_takes_a_group_that_keeps_the_24s_answer_once() -> None:
    t = tables()
    t.add(IPv4Network("198.18.0.0/16"), 1)
    t.add(IPv4Network("198.18.5.16/28"), 2)
    index = at("198.18.5.0") >> 8
    assert t.tbl24[index] == GROUP | 0 and t.tbl8[0, STATE] == index + 1
    assert t.tbl8[0, COVERING] == entry(1, 16)
    assert np.flatnonzero(t.tbl8[0, :DIR24_GROUP_ENTRIES]).tolist() == list(range(16, 32))
    assert [
        t.lookup(at(a)) for a in ("198.18.5.15", "198.18.5.16", "198.18.5.31", "198.18.5.32")
    ] == [1, 2, 2, 1]


def test_a_shorter_prefix_added_later_does_not_hide_a_longer_one() -> None:
    t = tables()
    t.add(IPv4Network("198.18.5.7/32"), 3)
    t.add(IPv4Network("198.18.5.0/24"), 2)
    t.add(IPv4Network("198.18.0.0/15"), 1)
    assert [t.lookup(at(a)) for a in ("198.18.5.7", "198.18.5.8", "198.19.0.1")] == [3, 2, 1]


def test_removing_the_last_long_prefix_unlinks_and_retires_the_group() -> None:
    t = tables()
    t.add(IPv4Network("198.18.5.0/24"), 2)
    t.add(IPv4Network("198.18.5.7/32"), 3)
    t.remove(IPv4Network("198.18.5.7/32"), 3, parent=entry(2, 24))
    assert t.tbl24[at("198.18.5.0") >> 8] == entry(2, 24)
    assert t.tbl8[0, STATE] == DIR24_RETIRED
    assert t.groups_available() == 4
    assert t.groups_needed([IPv4Network("198.18.5.9/32"), IPv4Network("198.18.5.10/32")]) == 1


def test_a_short_prefix_over_groups_writes_their_covering_word_only() -> None:
    """A /9 over groups taken one after another or far apart: each group's `covering`
    changes, none of its 256 entries does (the work is bounded by tbl24's span)."""
    for taken in ([], list(range(1, 63))):
        t = tables(groups=64)
        t.tbl8[taken, STATE] = 1  # busy elsewhere: the two /24s get groups 0 and 63
        t.add(IPv4Network("198.18.5.7/32"), 3)
        t.add(IPv4Network("198.18.9.7/32"), 4)
        entries = t.tbl8[:, :DIR24_GROUP_ENTRIES].copy()
        t.add(IPv4Network("198.0.0.0/9"), 1)
        t.add(IPv4Network("198.18.0.0/16"), 2)
        assert np.array_equal(t.tbl8[:, :DIR24_GROUP_ENTRIES], entries)
        probes = ("198.18.5.7", "198.18.5.8", "198.18.9.7", "198.18.9.6", "198.18.7.1", "198.5.0.1")
        assert [t.lookup(at(a)) for a in probes] == [3, 2, 4, 2, 2, 1]
        t.remove(IPv4Network("198.18.0.0/16"), 2, parent=entry(1, 9))
        assert [t.lookup(at(a)) for a in probes] == [3, 1, 4, 1, 1, 1]
        t.remove(IPv4Network("198.0.0.0/9"), 1, parent=0)
        assert [t.lookup(at(a)) for a in probes] == [3, 0, 4, 0, 0, 0]
        assert np.array_equal(t.tbl8[:, :DIR24_GROUP_ENTRIES], entries)


def test_a_long_prefix_removed_under_a_short_parent_leaves_zeros() -> None:
    """Group entries name only prefixes longer than /24: a /28 whose parent is a /16 gives
    its entries back as 0 (the group's covering answers), and a /32 under a /28 gets the
    /28's entry."""
    t = tables()
    t.add(IPv4Network("198.18.0.0/16"), 1)
    t.add(IPv4Network("198.18.5.16/28"), 2)
    t.add(IPv4Network("198.18.5.17/32"), 3)
    t.add(IPv4Network("198.18.5.200/32"), 4)
    t.remove(IPv4Network("198.18.5.17/32"), 3, parent=entry(2, 28))
    assert t.tbl8[0, 17] == entry(2, 28)
    t.remove(IPv4Network("198.18.5.16/28"), 2, parent=entry(1, 16))
    assert np.flatnonzero(t.tbl8[0, :DIR24_GROUP_ENTRIES]).tolist() == [200]
    assert [t.lookup(at(a)) for a in ("198.18.5.17", "198.18.5.200")] == [1, 4]
