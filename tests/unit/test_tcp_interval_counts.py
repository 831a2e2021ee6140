"""tcp-count's double-buffered counts (IntervalCounts) against a model of the kernel side:
every connect is reported once, also one that a program adds to the slot just left, and
the map keeps only about one interval's keys. No kernel: the key type comes from the
built object's BTF."""

from __future__ import annotations

from typing import Any

import pytest

from membrane.bpf.btf import Btf
from membrane.bpf.object import object_path
from membrane.trace.tools.tcp_count import IntervalCounts


@pytest.fixture(scope="module")
def key_type() -> Any:
    path = object_path("trace_tcp_connect")
    if not path.exists():
        pytest.skip("run `make bpf` first")
    return Btf.from_file(path).struct("tcp_count_key")


class FakeMaps:
    """`counts` and `count_slot` as the BPF program sees them."""

    def __init__(self, key_type: Any) -> None:
        self.key_type = key_type
        self.entries: dict[bytes, int] = {}
        self.slot = 0

    def key(self, port: int, slot: int) -> Any:
        key = self.key_type()
        key.tuple.family, key.tuple.dport, key.slot = 2, port, slot
        return key

    def connect(self, port: int, slot: int | None = None) -> None:
        """One count, into the current slot or (a program that read it before a flip)
        into the one given."""
        raw = bytes(self.key(port, self.slot if slot is None else slot))
        self.entries[raw] = self.entries.get(raw, 0) + 1

    # the Map methods IntervalCounts uses
    def lookup_batch(self) -> list[tuple[Any, int]]:
        return [(self.key_type.from_buffer_copy(raw), n) for raw, n in self.entries.items()]

    def delete_batch(self, keys: list[Any]) -> int:
        return sum(self.entries.pop(bytes(k), None) is not None for k in keys)

    def update(self, index: int, value: int) -> None:
        assert index == 0
        self.slot = value


def by_port(taken: dict[bytes, int], key_type: Any) -> dict[int, int]:
    tuple_type = type(key_type().tuple)
    return {tuple_type.from_buffer_copy(raw).dport: n for raw, n in taken.items()}


def test_late_counts_are_reported_once_and_old_keys_go(key_type: Any) -> None:
    maps = FakeMaps(key_type)
    counts = IntervalCounts(maps, maps)  # type: ignore[arg-type]
    maps.connect(80)
    maps.connect(80)
    assert by_port(counts.take(), key_type) == {80: 2}
    assert maps.slot == 1

    maps.connect(80, slot=0)  # in flight across the flip: lands in the slot just read
    maps.connect(443, slot=0)
    maps.connect(80)
    maps.connect(80)
    maps.connect(80)
    assert by_port(counts.take(), key_type) == {80: 4, 443: 1}
    assert {key_type.from_buffer_copy(raw).slot for raw in maps.entries} == {1}

    assert counts.take() == {}
    assert maps.entries == {}  # quiet for an interval: deleted
