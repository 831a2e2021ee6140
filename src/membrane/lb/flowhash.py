"""The 5-tuple hash of the LB datapath (bpf/lib/jhash.h), in numpy: Linux's jhash2 over
ten 32-bit words (source and destination address, 16 bytes each with IPv4 in the first
4, the ports, the protocol). The Maglev slot of a flow is `hash % M`.

Words are read from the bytes as the kernel reads them (little-endian here), so the
Python reference and the kernel agree bit for bit; tests check that on random flows.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

import numpy as np

from membrane.abi import LB_HASH_SEED as FLOW_HASH_SEED
from membrane.abi import LB_HASH_WORDS as WORDS

JHASH_INITVAL = 0xDEADBEEF

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _rol(x: np.ndarray, k: int) -> np.ndarray:
    return (x << np.uint32(k)) | (x >> np.uint32(32 - k))


def _mix(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, ...]:
    a = a - c
    a ^= _rol(c, 4)
    c = c + b
    b = b - a
    b ^= _rol(a, 6)
    a = a + c
    c = c - b
    c ^= _rol(b, 8)
    b = b + a
    a = a - c
    a ^= _rol(c, 16)
    c = c + b
    b = b - a
    b ^= _rol(a, 19)
    a = a + c
    c = c - b
    c ^= _rol(b, 4)
    b = b + a
    return a, b, c


def _final(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    c ^= b
    c = c - _rol(b, 14)
    a ^= c
    a = a - _rol(c, 11)
    b ^= a
    b = b - _rol(a, 25)
    c ^= b
    c = c - _rol(b, 16)
    a ^= c
    a = a - _rol(c, 4)
    b ^= a
    b = b - _rol(a, 14)
    c ^= b
    c = c - _rol(b, 24)
    return c


def jhash_words(words: np.ndarray, seed: int = FLOW_HASH_SEED) -> np.ndarray:
    """jhash2 of each row of `words` (shape (n, 10), uint32)."""
    assert words.shape[1] == WORDS
    words = words.astype(np.uint32)
    start = np.uint32((JHASH_INITVAL + (WORDS << 2) + seed) & 0xFFFFFFFF)
    a = np.full(len(words), start, dtype=np.uint32)
    b, c = a.copy(), a.copy()
    with np.errstate(over="ignore"):
        for i in (0, 3, 6):
            a, b, c = _mix(a + words[:, i], b + words[:, i + 1], c + words[:, i + 2])
        return _final(a + words[:, 9], b, c)


def flow_words(
    src: Sequence[IPAddress],
    dst: Sequence[IPAddress],
    sport: Sequence[int],
    dport: Sequence[int],
    proto: Sequence[int],
) -> np.ndarray:
    """The ten hashed words of each flow, laid out as struct lb_flow_key's first 40 bytes."""
    n = len(src)
    raw = np.zeros((n, 32), dtype=np.uint8)
    for i in range(n):
        raw[i, 0 : src[i].max_prefixlen // 8] = np.frombuffer(src[i].packed, dtype=np.uint8)
        raw[i, 16 : 16 + dst[i].max_prefixlen // 8] = np.frombuffer(dst[i].packed, dtype=np.uint8)
    words = raw.view("<u4").astype(np.uint32)
    ports = np.asarray(sport, dtype=np.uint32) | (np.asarray(dport, dtype=np.uint32) << 16)
    return np.column_stack([words, ports, np.asarray(proto, dtype=np.uint32)])


def flow_hash(
    src: Sequence[IPAddress],
    dst: Sequence[IPAddress],
    sport: Sequence[int],
    dport: Sequence[int],
    proto: Sequence[int],
) -> np.ndarray:
    return jhash_words(flow_words(src, dst, sport, dport, proto))
