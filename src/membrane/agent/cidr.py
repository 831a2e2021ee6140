"""The policies' CIDR prefixes as identities: each prefix gets an identity whose labels
are `cidr:Q` for every policy prefix Q containing it (and `reserved:world` with its
family's world), and an ipcache entry in its family's map. Kept between changes and
updated by what changed: a few added or removed prefixes cost what they touch (their own
labels and those of the prefixes inside them), not the whole set, so a one-rule import
beside 10,000 CIDR rules stays small."""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from membrane.abi import Identity
from membrane.agent.identities import IdentityAllocator
from membrane.datapath.ipcache import RawKey, RawValue, raw_key, world_prefix
from membrane.identity.labels import (
    Label,
    Network,
    PrefixIndex,
    cidr_identities_labels,
    prefix_index,
    prefixes_within,
)

INCREMENTAL_LIMIT = 64  # prefixes added or removed at once; more: relabel them all


class CidrIdentities(NamedTuple):
    """One version; never changed in place (a snapshot's universe shares its dicts)."""

    prefixes: frozenset[Network]
    labels: dict[int, frozenset[Label]]  # identity -> labels
    prefix_of: dict[int, Network]  # identity -> prefix
    ipcache: dict[RawKey, RawValue]  # the IPv4 ipcache's CIDR part, world included
    ipcache6: dict[RawKey, RawValue]  # the same for IPv6
    index: PrefixIndex  # `prefixes` for the labelling

    @classmethod
    def empty(cls, dual_stack: bool) -> CidrIdentities:
        """No prefixes: only each family's world, numbered as the node's stack wants it
        (IPv4-only: world; dual-stack: world-ipv4 and world-ipv6)."""
        world4 = Identity.WORLD_IPV4 if dual_stack else Identity.WORLD
        return cls(
            frozenset(),
            {},
            {},
            {raw_key(world_prefix(4)): (int(world4), 0, 0)},
            {raw_key(world_prefix(6)): (int(Identity.WORLD_IPV6), 0, 0)},
            {},
        )

    def map_of(self, prefix: Network) -> dict[RawKey, RawValue]:
        return self.ipcache if prefix.version == 4 else self.ipcache6

    def updated(
        self, prefixes: frozenset[Network], identities: IdentityAllocator
    ) -> CidrIdentities:
        """The version for `prefixes`; numbers come from `identities`."""
        added, removed = prefixes - self.prefixes, self.prefixes - prefixes
        if not added and not removed:
            return self
        world4, world6 = raw_key(world_prefix(4)), raw_key(world_prefix(6))
        relabel: Iterable[Network] | None
        if len(added) + len(removed) > INCREMENTAL_LIMIT or not self.prefixes:
            relabel = None  # all of them
            labels, prefix_of = {}, {}
            ipcache = {world4: self.ipcache[world4]}
            ipcache6 = {world6: self.ipcache6[world6]}
            index = prefix_index(prefixes)
        else:
            index = dict(self.index)
            index.update(prefix_index(added))
            for gone in prefix_index(removed):
                del index[gone]
            inside = {q for p in added | removed for q in prefixes_within(prefixes, p)}
            relabel = added | inside
            labels, prefix_of = dict(self.labels), dict(self.prefix_of)
            ipcache, ipcache6 = dict(self.ipcache), dict(self.ipcache6)
            for prefix in removed:  # still numbered: the allocator forgets after the sync
                ident = identities.for_prefix(prefix)
                del labels[ident], prefix_of[ident]
                del (ipcache if prefix.version == 4 else ipcache6)[raw_key(prefix)]
        for prefix, prefix_labels in cidr_identities_labels(index, relabel).items():
            ident = identities.for_prefix(prefix)
            labels[ident] = prefix_labels
            prefix_of[ident] = prefix
            (ipcache if prefix.version == 4 else ipcache6)[raw_key(prefix)] = (ident, 0, 0)
        return CidrIdentities(prefixes, labels, prefix_of, ipcache, ipcache6, index)
