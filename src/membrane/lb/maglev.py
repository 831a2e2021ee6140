"""Maglev consistent hashing (Eisenbud et al., NSDI 2016), the table the LB datapath reads.

Each backend gets a permutation of the M slots from two hashes of its name (an offset
and a skip); backends take turns claiming the next free slot of their permutation until
the table is full. Every backend ends up with ~M/N slots, and removing one backend only
frees its own slots: the others keep theirs, except where the refill shifts a few
(the paper's "minimal disruption"). Weights follow Cilium: a backend of weight w gets
w/max(weights) turns per round, so its share of slots is proportional to w.

The datapath picks slot `flow_hash(5-tuple) % M` (see flowhash.py); this module is the
reference the tests compare the kernel's choice against.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from membrane.abi import LB_DEFAULT_TABLE_SIZE as DEFAULT_SIZE  # prime, Cilium's default

MAX_SIZE = 1 << 20  # inner table entries a VIP may ask for (4 MiB of u32)
MAX_WEIGHT = 65535


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    return all(n % d for d in range(3, int(n**0.5) + 1, 2))


def _hash32(name: str, purpose: bytes) -> int:
    """A stable 32-bit hash of a backend's name (the same across processes and hosts,
    which Python's hash() is not)."""
    digest = hashlib.blake2b(name.encode(), digest_size=4, person=purpose).digest()
    return int.from_bytes(digest, "little")


def permutation_params(name: str, size: int) -> tuple[int, int]:
    """(offset, skip) of a backend's permutation: slot j of its preference list is
    (offset + j * skip) % size; skip in 1..size-1 visits every slot because size is prime."""
    return _hash32(name, b"maglev-offset") % size, _hash32(name, b"maglev-skip") % (size - 1) + 1


def build_table(
    names: Sequence[str], size: int = DEFAULT_SIZE, weights: Sequence[int] | None = None
) -> np.ndarray:
    """The lookup table: `size` entries, each the index (into `names`) of the backend that
    owns the slot; all -1 when there are no backends (or every weight is 0).

    The result depends on the set of names and weights only, not on their order, so that
    the control plane and the tests agree however backends were listed."""
    if not is_prime(size):
        raise ValueError(f"Maglev table size {size} is not prime")
    table = np.full(size, -1, dtype=np.int32)
    weights = list(weights) if weights is not None else [1] * len(names)
    order = sorted(
        (i for i in range(len(names)) if weights[i] > 0), key=lambda i: names[i].encode()
    )
    if not order:
        return table
    top = max(weights[i] for i in order)
    params = [permutation_params(names[i], size) for i in order]
    # the next slot of each backend's permutation, walked by adding skip (mod size)
    nexts = [offset for offset, _ in params]
    skips = [skip for _, skip in params]
    turns = [weights[i] for i in order]
    owner = [-1] * size
    left = size
    rounds = 0
    while True:
        rounds += 1
        for k, index in enumerate(order):
            w = turns[k]
            # weighted turns: w/top of a turn per round, spread evenly over the rounds
            if w != top and (rounds * w) // top == ((rounds - 1) * w) // top:
                continue
            slot, skip = nexts[k], skips[k]
            while owner[slot] >= 0:
                slot += skip
                if slot >= size:
                    slot -= size
            owner[slot] = index
            slot += skip
            nexts[k] = slot - size if slot >= size else slot
            left -= 1
            if not left:
                table[:] = owner
                return table


def modulo_choice(hashes: np.ndarray, backends: int) -> np.ndarray:
    """What a plain `hash % N` balancer picks: the baseline Maglev's disruption is
    compared with."""
    return (hashes % np.uint32(backends)).astype(np.int64)
