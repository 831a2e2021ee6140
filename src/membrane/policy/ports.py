"""Port ranges as the datapath's policy keys hold them: prefixes of the 16-bit port."""

from __future__ import annotations

from functools import lru_cache

from membrane.datapath.policy_entries import PORT_BITS


@lru_cache(maxsize=65536)
def port_blocks(first: int, last: int) -> tuple[tuple[int, int], ...]:
    """The fewest (port, bits) prefixes covering exactly first..last, in order.
    Example: 80..83 -> [(80, 14)]; 0..65535 -> [(0, 0)]."""
    if not 0 <= first <= last <= 0xFFFF:
        raise ValueError(f"bad port range {first}..{last}")
    blocks: list[tuple[int, int]] = []
    while first <= last:
        # The largest aligned power-of-two block starting at `first` that stays in range.
        size = first & -first if first else 1 << PORT_BITS
        while first + size - 1 > last:
            size >>= 1
        blocks.append((first, PORT_BITS + 1 - size.bit_length()))
        first += size
    return tuple(blocks)
