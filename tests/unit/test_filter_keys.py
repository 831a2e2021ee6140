"""The IPv4 drop-dst summary: which /24s a prefix touches (pure, no kernel)."""

from __future__ import annotations

from ipaddress import ip_network

from membrane.filter.keys import summary_masks

FULL = (1 << 256) - 1


def index_of(text: str) -> int:
    return int(ip_network(text).network_address) >> 16


def test_a_host_sets_the_bit_of_its_24() -> None:
    assert summary_masks([ip_network("198.18.7.9/32")]) == {index_of("198.18.0.0/16"): 1 << 7}


def test_a_28_and_a_24_set_one_bit_each() -> None:
    masks = summary_masks([ip_network("198.18.7.16/28"), ip_network("198.18.200.0/24")])
    assert masks == {index_of("198.18.0.0/16"): (1 << 7) | (1 << 200)}


def test_a_22_sets_four_bits() -> None:
    assert summary_masks([ip_network("198.19.4.0/22")]) == {index_of("198.19.0.0/16"): 0xF << 4}


def test_short_prefixes_fill_whole_entries() -> None:
    masks = summary_masks([ip_network("198.18.0.0/15")])
    assert masks == {index_of("198.18.0.0/16"): FULL, index_of("198.19.0.0/16"): FULL}
    assert len(summary_masks([ip_network("0.0.0.0/0")])) == 65536


def test_only_limits_the_entries_and_ipv6_is_ignored() -> None:
    nets = [ip_network("198.18.0.0/15"), ip_network("2001:db8::/32")]
    assert summary_masks(nets, only={index_of("198.19.0.0/16")}) == {
        index_of("198.19.0.0/16"): FULL
    }
