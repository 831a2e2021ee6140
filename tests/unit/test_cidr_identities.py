"""The CIDR identities kept between changes equal the ones computed from scratch, whatever
sequence of prefix sets the policies go through (incremental relabelling of the prefixes
inside an added or removed one, removal, numbering)."""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Network

from hypothesis import given, settings
from hypothesis import strategies as st

from membrane.abi import Identity
from membrane.agent.cidr import CidrIdentities
from membrane.agent.identities import IdentityAllocator
from membrane.datapath.ipcache import WORLD_PREFIX, WORLD_PREFIX6, raw_key
from membrane.identity.labels import cidr_identities_labels

# A small universe so that prefixes nest often: 198.18.0.0/16 cut at a few lengths, and
# 2001:db8::/112 the same way.
prefix4 = st.builds(
    lambda addr, plen: IPv4Network((0xC6120000 | addr, plen), strict=False),
    st.integers(0, 0xFFFF),
    st.sampled_from([16, 20, 24, 28, 30, 32]),
)
prefix6 = st.builds(
    lambda addr, plen: IPv6Network(((0x20010DB8 << 96) | addr, plen), strict=False),
    st.integers(0, 0xFFFF),
    st.sampled_from([112, 116, 120, 124, 126, 128]),
)
prefix = st.one_of(prefix4, prefix6)
prefix_sets = st.lists(st.frozensets(prefix, max_size=12), min_size=1, max_size=6)


def expected(prefixes: frozenset[IPv4Network], alloc: IdentityAllocator) -> dict:
    labels = cidr_identities_labels(prefixes)
    ids = {p: alloc.for_prefix(p) for p in prefixes}
    return {
        "labels": {ids[p]: lb for p, lb in labels.items()},
        "prefix_of": {i: p for p, i in ids.items()},
        "ipcache": {
            raw_key(WORLD_PREFIX): (int(Identity.WORLD), 0, 0),
            **{raw_key(p): (i, 0, 0) for p, i in ids.items() if p.version == 4},
        },
        "ipcache6": {
            raw_key(WORLD_PREFIX6): (int(Identity.WORLD_IPV6), 0, 0),
            **{raw_key(p): (i, 0, 0) for p, i in ids.items() if p.version == 6},
        },
    }


@settings(max_examples=300, deadline=None)
@given(prefix_sets)
def test_kept_identities_equal_a_fresh_computation(sets: list[frozenset[IPv4Network]]) -> None:
    alloc = IdentityAllocator()
    kept = CidrIdentities.empty(dual_stack=False)
    for prefixes in sets:
        kept = kept.updated(prefixes, alloc)
        want = expected(prefixes, alloc)
        assert kept.prefixes == prefixes
        assert kept.labels == want["labels"]
        assert kept.prefix_of == want["prefix_of"]
        assert kept.ipcache == want["ipcache"]
        assert kept.ipcache6 == want["ipcache6"]
        alloc.retain(set(), prefixes)


def test_an_unchanged_set_is_the_same_object() -> None:
    alloc = IdentityAllocator()
    kept = CidrIdentities.empty(dual_stack=True).updated(
        frozenset({IPv4Network("198.18.0.0/24")}), alloc
    )
    assert kept.updated(frozenset(kept.prefixes), alloc) is kept
