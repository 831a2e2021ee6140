"""IPv4 drop-dst as DIR-24-8: the tables the XDP program reads, kept equal to the longest
prefix match over the deny list while it changes under live traffic.

Layout and entry format: bpf/abi/filter.h. tbl24 has an entry per /24; a /24 that holds
prefixes longer than /24 points to a group of tbl8 with an entry per address. Each entry
names the longest prefix holding its addresses (rule id and length), so a change needs
only the tables: adding a prefix of length d overwrites, within its range, the entries of
prefixes no longer than d; removing it gives its entries back to its parent (the longest
shorter prefix holding it, found by the caller).

Why a lookup never sees a half-made state (the program loads each entry once):
- The maps are shared memory and every entry is written with one aligned 4-byte store, so
  an address answers as by the old list or the new one, never from a torn entry.
- A group is filled completely before the tbl24 entry that points to it is stored, and
  x86-64 (TSO) makes stores visible in program order: whoever reads the pointer finds the
  group complete.
- A group its /24 no longer needs is unlinked first (its tbl24 entry gets the /24's
  answer), then marked retired, and reused only after an RCU grace period: a program that
  read the old pointer may still read the group until then. Waiting costs ~10 ms, so it
  happens only when no free group is left.
"""

from __future__ import annotations

from collections.abc import Callable
from ipaddress import IPv4Network

import numpy as np

from membrane.abi import (
    DIR24_GROUP_BIT,
    DIR24_GROUP_ENTRIES,
    DIR24_LENGTH_SHIFT,
    DIR24_RETIRED,
)
from membrane.bpf import Map
from membrane.bpf.rcu import wait_for_running_programs

GROUP = 1 << DIR24_GROUP_BIT
RULE_MASK = (1 << DIR24_LENGTH_SHIFT) - 1
LENGTH_FIELD = 0x3F << DIR24_LENGTH_SHIFT
STATE = DIR24_GROUP_ENTRIES  # column of dir24_group.state in a group's row of words
FREE = 0


class TablesFull(Exception):
    """No tbl8 group is left for another /24 with prefixes longer than /24."""


def entry(rule: int, length: int) -> int:
    """The entry of a prefix: its rule id and length (0 for no prefix)."""
    return rule | length << DIR24_LENGTH_SHIFT if rule else 0


def _no_longer(entries: np.ndarray, length: int) -> np.ndarray:
    """Which entries name no prefix or one no longer than `length` (never a group: its
    bit makes it larger)."""
    return (entries & np.uint32(GROUP | LENGTH_FIELD)) <= length << DIR24_LENGTH_SHIFT


class Dir24:
    """tbl24 and tbl8 as numpy views: a flat array of 2^24 entries, and one row per group
    (its 256 entries, then `state` and padding)."""

    def __init__(self, tbl24: np.ndarray, tbl8: np.ndarray) -> None:
        self.tbl24, self.tbl8 = tbl24, tbl8

    @classmethod
    def from_maps(cls, tbl24: Map, tbl8: Map) -> Dir24:
        """Views of the live maps (drop_dst_tbl24, drop_dst_tbl8)."""
        words = tbl8.value_size // 4
        return cls(
            np.frombuffer(tbl24.mmap(), dtype=np.uint32),
            np.frombuffer(tbl8.mmap(), dtype=np.uint32).reshape(tbl8.max_entries, words),
        )

    @property
    def groups(self) -> int:
        return len(self.tbl8)

    # ---- reading ---------------------------------------------------------------------------
    def lookup(self, address: int) -> int:
        """The rule id for an address (0: none), read as the program reads it."""
        found = int(self.tbl24[address >> 8])
        if found & GROUP:
            found = int(self.tbl8[found & ~GROUP, address & 0xFF])
        return found & RULE_MASK

    def groups_needed(self, nets: list[IPv4Network]) -> int:
        """How many groups adding `nets` takes: /24s that get their first longer prefix."""
        indices = {int(n.network_address) >> 8 for n in nets if n.prefixlen > 24}
        return sum(1 for i in indices if not int(self.tbl24[i]) & GROUP)

    def groups_available(self) -> int:
        """Free groups, counting retired ones (they are free after a grace period)."""
        state = self.tbl8[:, STATE]
        return int(np.count_nonzero((state == FREE) | (state == DIR24_RETIRED)))

    # ---- changing --------------------------------------------------------------------------
    def add(self, net: IPv4Network, rule: int) -> None:
        """Make `net` (rule id `rule`) the answer wherever no longer prefix is."""
        first, length = int(net.network_address), net.prefixlen
        new = entry(rule, length)
        if length <= 24:
            span = self.tbl24[first >> 8 : (first >> 8) + (1 << (24 - length))]
            span[_no_longer(span, length)] = new
            self._rewrite(self._groups(span), lambda e: _no_longer(e, length), new)
            return
        index, low = first >> 8, first & 0xFF
        top = int(self.tbl24[index])
        if top & GROUP:
            span = self.tbl8[top & ~GROUP, low : low + (1 << (32 - length))]
            span[_no_longer(span, length)] = new
            return
        group = self._allocate()
        row = self.tbl8[group]
        row[:DIR24_GROUP_ENTRIES] = top  # what the /24 answers today
        row[low : low + (1 << (32 - length))] = new
        row[STATE] = index + 1
        self.tbl24[index] = GROUP | group  # publish the complete group

    def remove(self, net: IPv4Network, rule: int, parent: int) -> None:
        """Give the addresses `net` answers for to `parent` (the entry of the longest
        shorter prefix holding `net`, 0 for none); free its group if it was the /24's
        last prefix longer than /24."""
        first, length = int(net.network_address), net.prefixlen
        old = entry(rule, length)
        if length <= 24:
            span = self.tbl24[first >> 8 : (first >> 8) + (1 << (24 - length))]
            span[span == old] = parent
            self._rewrite(self._groups(span), lambda e: e == old, parent)
            return
        index, low = first >> 8, first & 0xFF
        top = int(self.tbl24[index])
        if not top & GROUP:
            return  # not in the tables (a remove that ran before and was cut short)
        group = top & ~GROUP
        span = self.tbl8[group, low : low + (1 << (32 - length))]
        span[span == old] = parent
        row = self.tbl8[group, :DIR24_GROUP_ENTRIES]
        if _no_longer(row, 24).all():
            # Only prefixes holding the whole /24 answer here now: every entry is the same.
            self.tbl24[index] = row[0]  # unlink, then retire
            self.tbl8[group, STATE] = DIR24_RETIRED

    @staticmethod
    def _groups(span: np.ndarray) -> np.ndarray:
        """The groups the tbl24 entries of `span` point to."""
        return (span[(span & GROUP) != 0] & ~np.uint32(GROUP)).astype(np.intp)

    def _rewrite(
        self, groups: np.ndarray, match: Callable[[np.ndarray], np.ndarray], value: int
    ) -> None:
        """Store `value` in the entries of `groups` that `match` selects, one store each.
        Groups taken one after another lie side by side: scan their block in place, unless
        it is mostly other groups (then gather them, which costs a copy)."""
        if not groups.size:
            return
        low, high = int(groups.min()), int(groups.max()) + 1
        if high - low <= 4 * groups.size:
            block = self.tbl8[low:high, :DIR24_GROUP_ENTRIES]
            member = np.zeros(high - low, dtype=bool)
            member[groups - low] = True
            block[match(block) & member[:, None]] = value
        else:
            which, column = np.nonzero(match(self.tbl8[groups, :DIR24_GROUP_ENTRIES]))
            self.tbl8[groups[which], column] = value

    def _allocate(self) -> int:
        free = np.flatnonzero(self.tbl8[:, STATE] == FREE)
        if not free.size:
            self._reclaim()
            free = np.flatnonzero(self.tbl8[:, STATE] == FREE)
            if not free.size:
                raise TablesFull(f"all {self.groups} tbl8 groups are in use")
        return int(free[0])

    def _reclaim(self) -> None:
        """Free retired groups once no program can still be reading them, and groups
        marked in use that their /24 does not point to (a change cut short between
        taking a group and publishing it)."""
        state = self.tbl8[:, STATE]
        used = np.flatnonzero((state != FREE) & (state != DIR24_RETIRED))
        owners = state[used].astype(np.int64) - 1
        orphans = used[self.tbl24[owners] != (GROUP | used.astype(np.uint32))]
        retired = np.flatnonzero(state == DIR24_RETIRED)
        if retired.size or orphans.size:
            wait_for_running_programs()
            state[retired] = FREE
            state[orphans] = FREE
