"""A batch of trace events as one array of their fixed parts, plus where each event's
variable tail (a path, as long as it is) lies in the consumed ring bytes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from membrane.bpf.ringbuf import Records
from membrane.native import eventfmt


@dataclass(frozen=True)
class EventLayout:
    """How a tool's records look: the fixed part as a numpy dtype, and optionally a tail
    field that only its first `tail_len_field` bytes of are sent."""

    head: np.dtype
    tail: str | None = None
    tail_offset: int = 0
    tail_len_field: str | None = None

    @classmethod
    def of(cls, struct: np.dtype, tail: str | None = None, tail_len: str | None = None):
        """From the BTF dtype of the whole struct: the head is every field before `tail`."""
        if tail is None:
            return cls(struct)
        offset = struct.fields[tail][1]
        names = [n for n in struct.names if struct.fields[n][1] < offset]
        head = np.dtype(
            {
                "names": names,
                "formats": [struct.fields[n][0] for n in names],
                "offsets": [struct.fields[n][1] for n in names],
                "itemsize": offset,
            }
        )
        return cls(head, tail, offset, tail_len)


class EventBatch:
    """Events of one drain. `batch["field"]` is a column of the fixed part (as with a
    structured array), so decoders written for fixed-size records keep working."""

    def __init__(self, layout: EventLayout, head: np.ndarray, records: Records) -> None:
        self.layout = layout
        self.head = head
        self.records = records

    @classmethod
    def decode(cls, layout: EventLayout, records: Records) -> tuple[EventBatch, int]:
        """The batch, and how many records were shorter than the fixed part (malformed:
        left out)."""
        size = layout.head.itemsize
        matrix, shorter = eventfmt.gather(records.block, records.offsets, records.lengths, size)
        head = matrix.view(layout.head).reshape(len(records))
        if shorter:
            whole = records.lengths >= size
            return cls(layout, head[whole], _select(records, whole)), shorter
        return cls(layout, head, records), 0

    def __len__(self) -> int:
        return len(self.head)

    def __getitem__(self, key: str) -> np.ndarray:
        return self.head[key]

    def select(self, mask: np.ndarray) -> EventBatch:
        return EventBatch(self.layout, self.head[mask], _select(self.records, mask))

    def tail(self) -> tuple[np.ndarray, np.ndarray]:
        """Where each event's tail starts in `records.block`, and its length: the bytes
        the kernel sent, without the terminating NUL."""
        layout = self.layout
        if layout.tail is None:
            raise ValueError("this event has no variable-length tail")
        starts = self.records.offsets.astype(np.int64) + layout.tail_offset
        sent = self.records.lengths.astype(np.int64) - layout.tail_offset
        lengths = (
            np.minimum(self.head[layout.tail_len_field], sent) if layout.tail_len_field else sent
        )
        return starts, np.maximum(lengths - 1, 0).astype(np.int32)


def _select(records: Records, mask: np.ndarray) -> Records:
    return Records(records.block, records.offsets[mask], records.lengths[mask])
