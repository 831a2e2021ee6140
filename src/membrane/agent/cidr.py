"""The policies' CIDR prefixes as identities: each prefix gets an identity whose labels
are `cidr:Q` for every policy prefix Q containing it (and `reserved:world`), and an
ipcache entry. Kept between changes and updated by what changed: a few added or removed
prefixes cost what they touch (their own labels and those of the prefixes inside them),
not the whole set, so a one-rule import beside 10,000 CIDR rules stays small."""

from __future__ import annotations

from collections.abc import Iterable
from ipaddress import IPv4Network
from typing import NamedTuple

from membrane.abi import Identity
from membrane.agent.identities import IdentityAllocator
from membrane.datapath.ipcache import WORLD_PREFIX, RawKey, RawValue, raw_key
from membrane.identity.labels import (
    Label,
    PrefixIndex,
    cidr_identities_labels,
    prefix_index,
    prefixes_within,
)

INCREMENTAL_LIMIT = 64  # prefixes added or removed at once; more: relabel them all


class CidrIdentities(NamedTuple):
    """One version; never changed in place (a snapshot's universe shares its dicts)."""

    prefixes: frozenset[IPv4Network]
    labels: dict[int, frozenset[Label]]  # identity -> labels
    prefix_of: dict[int, IPv4Network]  # identity -> prefix
    ipcache: dict[RawKey, RawValue]  # the ipcache's CIDR part, world included
    index: PrefixIndex  # `prefixes` for the labelling

    def updated(
        self, prefixes: frozenset[IPv4Network], identities: IdentityAllocator
    ) -> CidrIdentities:
        """The version for `prefixes`; numbers come from `identities`."""
        added, removed = prefixes - self.prefixes, self.prefixes - prefixes
        if not added and not removed:
            return self
        relabel: Iterable[IPv4Network] | None
        if len(added) + len(removed) > INCREMENTAL_LIMIT or not self.prefixes:
            relabel = None  # all of them
            labels, prefix_of, ipcache = {}, {}, dict(NO_CIDRS.ipcache)
            index = prefix_index(prefixes)
        else:
            index = dict(self.index)
            index.update(prefix_index(added))
            for gone in prefix_index(removed):
                del index[gone]
            inside = {q for p in added | removed for q in prefixes_within(prefixes, p)}
            relabel = added | inside
            labels, prefix_of = dict(self.labels), dict(self.prefix_of)
            ipcache = dict(self.ipcache)
            for prefix in removed:  # still numbered: the allocator forgets after the sync
                ident = identities.for_prefix(prefix)
                del labels[ident], prefix_of[ident], ipcache[raw_key(prefix)]
        for prefix, prefix_labels in cidr_identities_labels(index, relabel).items():
            ident = identities.for_prefix(prefix)
            labels[ident] = prefix_labels
            prefix_of[ident] = prefix
            ipcache[raw_key(prefix)] = (ident, 0)
        return CidrIdentities(prefixes, labels, prefix_of, ipcache, index)


NO_CIDRS = CidrIdentities(
    frozenset(), {}, {}, {raw_key(WORLD_PREFIX): (int(Identity.WORLD), 0)}, {}
)
