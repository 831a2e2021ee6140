"""Pod address management: one address per endpoint from the pod CIDR (one Ipam per
family: IPv4, and IPv6 on a dual-stack node).

Addresses are handed out round-robin (the search for a free one starts after the last
address given), so a just-released address is not reused at once: a new pod does not
inherit connections, conntrack entries or flow records meant for the previous owner.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network

from membrane.errors import UserError

Address = IPv4Address | IPv6Address


class Ipam:
    def __init__(
        self, pod_cidr: IPv4Network | IPv6Network | str, reserved: Iterable[Address] = ()
    ) -> None:
        """`reserved` addresses (the node IP, a gateway, ...) are never handed out; those
        outside the CIDR are ignored. IPv4 leaves out the network and broadcast addresses,
        IPv6 the subnet-router anycast address (the first)."""
        self.pod_cidr = ip_network(pod_cidr)
        self._version = self.pod_cidr.version
        first, last = int(self.pod_cidr.network_address), int(self.pod_cidr.broadcast_address)
        if self._version == 6:
            first += 1
        elif self.pod_cidr.prefixlen < 31:  # a /31 or /32 has no network/broadcast address
            first, last = first + 1, last - 1
        self._first, self._last = first, last
        self._reserved = {a for a in map(int, map(ip_address, reserved)) if first <= a <= last}
        self._owners: dict[int, str] = {}
        self._next = first

    @property
    def capacity(self) -> int:
        """How many addresses can be allocated in all."""
        return self._last - self._first + 1 - len(self._reserved)

    @property
    def allocated(self) -> dict[Address, str]:
        """Address -> owner of every allocated address (what `restore` takes back)."""
        return {self._address(a): owner for a, owner in sorted(self._owners.items())}

    def owner(self, addr: Address) -> str | None:
        return self._owners.get(int(addr))

    def _address(self, value: int) -> Address:
        return IPv4Address(value) if self._version == 4 else IPv6Address(value)

    def allocate(self, owner: str) -> Address:
        """A free address, now owned by `owner`; UserError("pod-cidr") when none is left."""
        candidate = self._next_free()
        if candidate is None:
            raise UserError(
                "pod-cidr",
                f"{self.pod_cidr} is exhausted: all {self.capacity} pod addresses are in use",
            )
        self._owners[candidate] = owner
        self._next = candidate + 1 if candidate < self._last else self._first
        return self._address(candidate)

    def peek(self) -> Address | None:
        """The address the next `allocate` hands out (None: none is left)."""
        candidate = self._next_free()
        return None if candidate is None else self._address(candidate)

    def _next_free(self) -> int | None:
        if len(self._owners) >= self.capacity:
            return None
        size = self._last - self._first + 1
        for step in range(size):
            candidate = self._first + (self._next - self._first + step) % size
            if candidate not in self._owners and candidate not in self._reserved:
                return candidate
        raise AssertionError("capacity said a free address exists")  # pragma: no cover

    def release(self, addr: Address) -> None:
        """Free `addr`; freeing a free address does nothing, so cleanup can always call it."""
        self._owners.pop(int(addr), None)

    def restore(self, allocated: Mapping[Address, str]) -> None:
        """Take back the address -> owner map of a previous run (an agent restart adopting
        its endpoints). Checked as a whole before anything changes: an address outside the
        pod CIDR (it was changed between runs), reserved, or held by another owner is a
        UserError."""
        wanted = {int(ip_address(a)): owner for a, owner in allocated.items()}
        for addr, owner in wanted.items():
            ip = self._address(addr)
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
