"""IPv4 drop-dst as DIR-24-8 plus a table per /8: the tables the XDP program reads, kept
equal to the longest prefix match over the deny list while it changes under live traffic.

Layout and entry format: bpf/abi/filter.h. Prefixes of /9 and longer: tbl24 has an entry
per /24; a /24 that holds prefixes longer than /24 points to a group with an entry per
address, which names only prefixes longer than /24 (0 elsewhere), and a `covering` word
with the /24's own answer (its longest prefix of /9 to /24). Prefixes of /8 and shorter:
the top table, an entry per /8, read by the program where the others answer 0.
Each entry names the longest prefix holding its addresses (rule id and length) among
those its table holds, so a change needs only the tables: adding a prefix of length d
overwrites, within its range, the entries of prefixes no longer than d; removing it gives
its entries back to its parent (the longest shorter prefix holding it, found by the
caller) if the parent is in the same table, else 0.

Work per change, whatever else is listed: a prefix of /25 or longer touches at most 256
entries of one group; a prefix of length 9 <= d <= 24 touches its 2^(24 - d) tbl24 entries
and the `covering` words of the groups among them, never their 256 entries (a /9: 32,768 +
at most 8,192 words); a prefix of /8 or shorter touches its 2^(8 - d) top entries (256 at
most). Each is a few numpy operations on the mmap'd maps.

Why a lookup never sees a half-made state (the program loads each word once):
- The maps are shared memory and every entry is written with one aligned 4-byte store, so
  an address answers as by the old list or the new one, never from a torn entry. A change
  writes one of the two levels (tbl24 and groups, or top), and an address's answer is the
  first level's where that is not 0: each entry it reads goes from old to new once.
- A group is filled completely before the tbl24 entry that points to it is stored, and
  x86-64 (TSO) makes stores visible in program order: whoever reads the pointer finds the
  group complete.
- A group its /24 no longer needs is unlinked first (its tbl24 entry gets the /24's
  answer), then marked retired, and reused only after an RCU grace period: a program that
  read the old pointer may still read the group until then. Waiting costs ~10 ms; the
  manager does it after a removal is in force (`reclaim`), so an add finds free groups.
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
    DIR24_TOP_LENGTH,
)
from membrane.bpf import Map
from membrane.bpf.rcu import wait_for_running_programs

GROUP = 1 << DIR24_GROUP_BIT
RULE_MASK = (1 << DIR24_LENGTH_SHIFT) - 1
LENGTH_FIELD = 0x3F << DIR24_LENGTH_SHIFT
STATE = DIR24_GROUP_ENTRIES  # columns of dir24_group.state and .covering in a group's row
COVERING = DIR24_GROUP_ENTRIES + 1
FREE = 0
_SLICE = 1 << 16  # tbl24 entries changed per pass of _put


class TablesFull(Exception):
    """No tbl8 group is left for another /24 with prefixes longer than /24."""


def entry(rule: int, length: int) -> int:
    """The entry of a prefix: its rule id and length (0 for no prefix)."""
    return rule | length << DIR24_LENGTH_SHIFT if rule else 0


def _no_longer(entries: np.ndarray, length: int) -> np.ndarray:
    """Which entries name no prefix or one no longer than `length` (never a group: its
    bit makes it larger)."""
    return (entries & np.uint32(GROUP | LENGTH_FIELD)) <= length << DIR24_LENGTH_SHIFT


def _put(span: np.ndarray, chosen: Callable[[np.ndarray], np.ndarray], value: int) -> None:
    """`span[chosen(span)] = value` in branch-free passes that store every entry once
    (those not chosen get their own value back, which a reader cannot tell from no store):
    about twice as fast as a masked assignment, and in slices that keep the temporaries in
    the cache (a /0 spans 64 MiB)."""
    for start in range(0, len(span), _SLICE):
        part = span[start : start + _SLICE]
        select = chosen(part).astype(np.uint32)
        np.negative(select, out=select)  # 0 or all ones
        change = part ^ np.uint32(value)
        change &= select
        part ^= change


class Dir24:
    """tbl24, tbl8 and top as numpy views: a flat array of 2^24 entries, one row per group
    (its 256 entries, then `state` and `covering`), and a flat array of 256 entries."""

    def __init__(self, tbl24: np.ndarray, tbl8: np.ndarray, top: np.ndarray) -> None:
        self.tbl24, self.tbl8, self.top = tbl24, tbl8, top

    @classmethod
    def from_maps(cls, tbl24: Map, tbl8: Map, top: Map) -> Dir24:
        """Views of the live maps (drop_dst_tbl24, drop_dst_groups, drop_dst_top)."""
        words = tbl8.value_size // 4
        return cls(
            np.frombuffer(tbl24.mmap(), dtype=np.uint32),
            np.frombuffer(tbl8.mmap(), dtype=np.uint32).reshape(tbl8.max_entries, words),
            np.frombuffer(top.mmap(), dtype=np.uint32)[: 1 << DIR24_TOP_LENGTH],
        )

    @property
    def groups(self) -> int:
        return len(self.tbl8)

    # ---- reading ---------------------------------------------------------------------------
    def lookup(self, address: int) -> int:
        """The rule id for an address (0: none), read as the program reads it."""
        found = int(self.tbl24[address >> 8])
        if found & GROUP:
            row = self.tbl8[found & ~GROUP]
            found = int(row[address & 0xFF]) or int(row[COVERING])
        found = found or int(self.top[address >> 24])
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
        if length <= DIR24_TOP_LENGTH:
            span = self.top[first >> 24 : (first >> 24) + (1 << (DIR24_TOP_LENGTH - length))]
            span[_no_longer(span, length)] = new
            return
        if length <= 24:
            span = self.tbl24[first >> 8 : (first >> 8) + (1 << (24 - length))]
            groups = self._groups(first >> 8, span)
            _put(span, lambda part: _no_longer(part, length), new)
            covering = self.tbl8[groups, COVERING]
            self.tbl8[groups[_no_longer(covering, length)], COVERING] = new
            return
        index, low = first >> 8, first & 0xFF
        top = int(self.tbl24[index])
        if top & GROUP:
            span = self.tbl8[top & ~GROUP, low : low + (1 << (32 - length))]
            span[_no_longer(span, length)] = new
            return
        group = self._allocate()
        row = self.tbl8[group]
        row[:DIR24_GROUP_ENTRIES] = 0
        row[COVERING] = top  # what the /24 answers today
        row[low : low + (1 << (32 - length))] = new
        row[STATE] = index + 1
        self.tbl24[index] = GROUP | group  # publish the complete group

    def remove(self, net: IPv4Network, rule: int, parent: int) -> None:
        """Give the addresses `net` answers for to `parent` (the entry of the longest
        shorter prefix holding `net`, 0 for none; one of /8 or shorter counts as none for
        a prefix of /9 or longer: the top table answers there); unlink its group if it
        was the /24's last prefix longer than /24."""
        first, length = int(net.network_address), net.prefixlen
        old = entry(rule, length)
        if length <= DIR24_TOP_LENGTH:
            span = self.top[first >> 24 : (first >> 24) + (1 << (DIR24_TOP_LENGTH - length))]
            span[span == old] = parent
            return
        if parent >> DIR24_LENGTH_SHIFT <= DIR24_TOP_LENGTH:
            parent = 0
        if length <= 24:
            span = self.tbl24[first >> 8 : (first >> 8) + (1 << (24 - length))]
            groups = self._groups(first >> 8, span)
            _put(span, lambda part: part == old, parent)
            self.tbl8[groups[self.tbl8[groups, COVERING] == old], COVERING] = parent
            return
        index, low = first >> 8, first & 0xFF
        top = int(self.tbl24[index])
        if not top & GROUP:
            return  # not in the tables (a remove that ran before and was cut short)
        group = top & ~GROUP
        span = self.tbl8[group, low : low + (1 << (32 - length))]
        # a parent of /24 or shorter is the group's `covering`: such entries go back to 0
        span[span == old] = parent if parent >> DIR24_LENGTH_SHIFT > 24 else 0
        if not self.tbl8[group, :DIR24_GROUP_ENTRIES].any():
            # Only prefixes holding the whole /24 answer here now.
            self.tbl24[index] = self.tbl8[group, COVERING]  # unlink, then retire
            self.tbl8[group, STATE] = DIR24_RETIRED

    def covering(self, net: IPv4Network) -> int | None:
        """The entry of the longest prefix of /9 to /24 holding `net` (longer than /24), as
        the tables know it; None when its /24 has no group (then tbl24 has it)."""
        top = int(self.tbl24[int(net.network_address) >> 8])
        return int(self.tbl8[top & ~GROUP, COVERING]) if top & GROUP else None

    def _groups(self, first: int, span: np.ndarray) -> np.ndarray:
        """The groups of the /24s in `span` (tbl24 from entry `first` on): from the
        pointers in `span`, or for a span longer than the group table from the groups'
        owners (cheaper then; it may name a group taken but not yet linked, whose
        `covering` is then written in vain)."""
        if len(span) <= self.groups:
            return (span[(span & GROUP) != 0] & ~np.uint32(GROUP)).astype(np.intp)
        owner = self.tbl8[:, STATE]  # n + 1 for /24 number n; FREE and RETIRED fall outside
        return np.flatnonzero((owner > first) & (owner <= first + len(span)))

    def _allocate(self) -> int:
        free = np.flatnonzero(self.tbl8[:, STATE] == FREE)
        if not free.size:
            self.reclaim()
            free = np.flatnonzero(self.tbl8[:, STATE] == FREE)
            if not free.size:
                raise TablesFull(f"all {self.groups} tbl8 groups are in use")
        return int(free[0])

    def reclaim(self) -> int:
        """Free retired groups once no program can still be reading them, and groups
        marked in use that their /24 does not point to (a change cut short between
        taking a group and publishing it). Returns how many were freed (0: no wait)."""
        state = self.tbl8[:, STATE]
        used = np.flatnonzero((state != FREE) & (state != DIR24_RETIRED))
        owners = state[used].astype(np.int64) - 1
        orphans = used[self.tbl24[owners] != (GROUP | used.astype(np.uint32))]
        retired = np.flatnonzero(state == DIR24_RETIRED)
        if retired.size or orphans.size:
            wait_for_running_programs()
            state[retired] = FREE
            state[orphans] = FREE
        return int(retired.size + orphans.size)
