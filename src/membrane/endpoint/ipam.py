"""Pod address management: one address per endpoint from the pod CIDR.

Addresses are handed out round-robin (the search for a free one starts after the last
address given), so a just-released address is not reused at once: a new pod does not
inherit connections, conntrack entries or flow records meant for the previous owner.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from ipaddress import IPv4Address, IPv4Network

from membrane.errors import UserError


class Ipam:
    def __init__(self, pod_cidr: IPv4Network, reserved: Iterable[IPv4Address] = ()) -> None:
        """`reserved` addresses (the node IP, a gateway, ...) are never handed out; those
        outside the CIDR are ignored."""
        self.pod_cidr = IPv4Network(pod_cidr)
        first, last = int(self.pod_cidr.network_address), int(self.pod_cidr.broadcast_address)
        if self.pod_cidr.prefixlen < 31:  # a /31 or /32 has no network/broadcast address
            first, last = first + 1, last - 1
        self._first, self._last = first, last
        self._reserved = {a for a in map(int, map(IPv4Address, reserved)) if first <= a <= last}
        self._owners: dict[int, str] = {}
        self._next = first

    @property
    def capacity(self) -> int:
        """How many addresses can be allocated in all."""
        return self._last - self._first + 1 - len(self._reserved)

    @property
    def allocated(self) -> dict[IPv4Address, str]:
        """Address -> owner of every allocated address (what `restore` takes back)."""
        return {IPv4Address(a): owner for a, owner in sorted(self._owners.items())}

    def owner(self, addr: IPv4Address) -> str | None:
        return self._owners.get(int(addr))

    def allocate(self, owner: str) -> IPv4Address:
        """A free address, now owned by `owner`; UserError("pod-cidr") when none is left."""
        if len(self._owners) >= self.capacity:
            raise UserError(
                "pod-cidr",
                f"{self.pod_cidr} is exhausted: all {self.capacity} pod addresses are in use",
            )
        size = self._last - self._first + 1
        for step in range(size):
            candidate = self._first + (self._next - self._first + step) % size
            if candidate not in self._owners and candidate not in self._reserved:
                self._owners[candidate] = owner
                self._next = candidate + 1 if candidate < self._last else self._first
                return IPv4Address(candidate)
        raise AssertionError("capacity said a free address exists")  # pragma: no cover

    def release(self, addr: IPv4Address) -> None:
        """Free `addr`; freeing a free address does nothing, so cleanup can always call it."""
        self._owners.pop(int(addr), None)

    def restore(self, allocated: Mapping[IPv4Address, str]) -> None:
        """Take back the address -> owner map of a previous run (an agent restart adopting
        its endpoints). Checked as a whole before anything changes: an address outside the
        pod CIDR (it was changed between runs), reserved, or held by another owner is a
        UserError."""
        wanted = {int(IPv4Address(a)): owner for a, owner in allocated.items()}
        for addr, owner in wanted.items():
            ip = IPv4Address(addr)
            if not self._first <= addr <= self._last:
                raise UserError(
                    "pod-cidr", f"{ip} of {owner} is not a pod address of {self.pod_cidr}"
                )
            if addr in self._reserved:
                raise UserError("pod-cidr", f"{ip} of {owner} is a reserved address")
            holder = self._owners.get(addr)
            if holder is not None and holder != owner:
                raise UserError("pod-cidr", f"{ip} of {owner} is already allocated to {holder}")
        self._owners.update(wanted)
        if wanted:
            self._next = max(wanted) + 1 if max(wanted) < self._last else self._first
