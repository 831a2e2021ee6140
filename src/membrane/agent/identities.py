"""Identity numbers: one per distinct endpoint label set, one per policy CIDR prefix.

Numbers are handed out once and remembered (the agent persists `to_json()`), so a
restarted agent gives every endpoint the number it had: the datapath's pinned policy and
ipcache entries, and the identities in flow records, stay valid across restarts.
"""

from __future__ import annotations

from collections.abc import Collection
from ipaddress import IPv4Network, IPv6Network
from typing import Any

from membrane.abi import Identity

# Where numbering starts; plain ints, since they are persisted and counted up.
FIRST_ENDPOINT_IDENTITY = int(Identity.FIRST_ENDPOINT)
FIRST_CIDR_IDENTITY = int(Identity.FIRST_CIDR)


def labels_key(labels: frozenset[Any]) -> str:
    """A canonical text for a label set (order-free)."""
    return "\n".join(sorted(str(label) for label in labels))


class IdentityAllocator:
    def __init__(self) -> None:
        self._by_labels: dict[str, int] = {}
        self._by_prefix: dict[str, int] = {}
        self._next_endpoint = FIRST_ENDPOINT_IDENTITY
        self._next_cidr = FIRST_CIDR_IDENTITY

    def for_labels(self, labels: frozenset[Any]) -> int:
        key = labels_key(labels)
        ident = self._by_labels.get(key)
        if ident is None:
            ident = self._next_endpoint
            self._next_endpoint += 1
            self._by_labels[key] = ident
        return ident

    def for_prefix(self, prefix: IPv4Network | IPv6Network) -> int:
        key = str(prefix)
        ident = self._by_prefix.get(key)
        if ident is None:
            ident = self._next_cidr
            self._next_cidr += 1
            self._by_prefix[key] = ident
        return ident

    def retain(self, label_keys: set[str], prefixes: Collection[IPv4Network | IPv6Network]) -> None:
        """Forget identities no longer in use, so their numbers' meaning cannot go stale.
        Numbers are never reused (the counters only grow)."""
        self._by_labels = {k: v for k, v in self._by_labels.items() if k in label_keys}
        # Every prefix in `prefixes` was given a number (for_prefix) and none was forgotten
        # since: the same count means the same set, and nothing to forget.
        if len(prefixes) != len(self._by_prefix):
            keep = {str(p) for p in prefixes}
            self._by_prefix = {k: v for k, v in self._by_prefix.items() if k in keep}

    def checkpoint(self) -> tuple[int, int]:
        """Where numbering stands; `rollback` forgets what was handed out since."""
        return (self._next_endpoint, self._next_cidr)

    def rollback(self, mark: tuple[int, int], reuse: bool) -> None:
        """Forget the identities handed out since `mark` (numbers only grow, so they are
        those at or above it), for a change that failed. `reuse`: their numbers may be
        handed out again, only when no map ever held them."""
        next_endpoint, next_cidr = mark
        self._by_labels = {k: v for k, v in self._by_labels.items() if v < next_endpoint}
        self._by_prefix = {k: v for k, v in self._by_prefix.items() if v < next_cidr}
        if reuse:
            self._next_endpoint, self._next_cidr = mark

    def to_json(self) -> dict[str, Any]:
        return {
            "endpoint": self._by_labels,
            "cidr": self._by_prefix,
            "next_endpoint": self._next_endpoint,
            "next_cidr": self._next_cidr,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> IdentityAllocator:
        alloc = cls()
        alloc._by_labels = dict(data.get("endpoint", {}))
        alloc._by_prefix = dict(data.get("cidr", {}))
        alloc._next_endpoint = data.get("next_endpoint", FIRST_ENDPOINT_IDENTITY)
        alloc._next_cidr = data.get("next_cidr", FIRST_CIDR_IDENTITY)
        return alloc
