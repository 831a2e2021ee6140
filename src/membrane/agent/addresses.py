"""Pod-address identities: a pod address inside a prefix that a Kubernetes ipBlock names
(or a Cilium CIDR rule under --policy-cidr-match-mode=all) gets a second identity of its
own, labelled `cidr:Q` for every such prefix Q containing it. The ipcache carries it beside
the pod's identity (ipcache_value.addr_identity) and the datapath applies the entries of
both, so an ipBlock selects exactly the pods whose address it holds, not every pod that
shares their labels (membrane.policy.rules explains the selectors)."""

from __future__ import annotations

from collections.abc import Iterable

from membrane.datapath.ipcache import Address
from membrane.identity.labels import Label, Network, cidr_label


class AddressPrefixes:
    """The address prefixes of the policies in force, indexed for containment: a lookup
    costs one set probe per prefix length (33 or 129), whatever the number of prefixes."""

    def __init__(self, prefixes: Iterable[Network] = ()) -> None:
        self.prefixes = frozenset(prefixes)
        self._by_key = {(p.version, int(p.network_address), p.prefixlen): p for p in self.prefixes}
        self._lengths = {
            version: sorted({p.prefixlen for p in self.prefixes if p.version == version})
            for version in (4, 6)
        }
        self._labels: dict[Address, frozenset[Label] | None] = {}

    def labels_of(self, addr: Address) -> frozenset[Label] | None:
        """The pod-address identity labels of `addr`, or None when no prefix holds it."""
        if addr in self._labels:
            return self._labels[addr]
        bits, value = addr.max_prefixlen, int(addr)
        found = [
            prefix
            for plen in self._lengths[addr.version]
            if (
                prefix := self._by_key.get(
                    (addr.version, value >> (bits - plen) << (bits - plen), plen)
                )
            )
        ]
        labels = frozenset(map(cidr_label, found)) or None
        self._labels[addr] = labels
        return labels
