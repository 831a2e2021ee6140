"""A read-only reader of bbolt database files (the key/value store podman 4 keeps its
containers and pods in), standard library only.

Why read the file: podman holds the container's lock while it calls the CNI plugin, so
`podman inspect` (or its REST API) waits for the very call that asks it: a deadlock, measured
with podman 4.3.1. The database file itself is free to read, under a shared flock as bbolt's
own read-only handles take it.

The format (bbolt's `page.go`, `node.go`): fixed-size pages; pages 0 and 1 are meta pages
(the one with the higher transaction id that passes its checksum is current) naming the root
bucket's page; a bucket is a B+tree of branch pages (key → child page) and leaf pages (key →
value, or key → sub-bucket header: root page id and sequence, the sub-bucket's page inline
after the header when the root page id is 0).
"""

from __future__ import annotations

import fcntl
import os
import struct
import time
from collections.abc import Iterator

_MAGIC = 0xED0CDAED
_PAGE_HEADER = struct.Struct("<QHHI")  # id, flags, count, overflow
_META = struct.Struct("<IIIIQQQQQ")  # magic, version, page size, flags, root, seq, freelist,
# high-water page id, txid (then the checksum: FNV-1a 64 of these bytes)
_BRANCH_ELEMENT = struct.Struct("<IIQ")  # pos, ksize, child page id
_LEAF_ELEMENT = struct.Struct("<IIII")  # flags, pos, ksize, vsize
_BUCKET_HEADER = struct.Struct("<QQ")  # root page id, sequence
_BRANCH, _LEAF = 0x01, 0x02
_BUCKET_VALUE = 0x01
LOCK_WAIT = 2.0  # seconds: a writer holds the file only for one short transaction


class BoltError(Exception):
    """The file is no bbolt database (or a damaged one)."""


class BoltDB:
    """The database as it was when read: `bucket(...)` walks nested buckets."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._page_size, root = self._current_meta()
        self.root = Bucket(self, data, root * self._page_size)

    @classmethod
    def read(cls, path: str) -> BoltDB:
        """Read the file whole under a shared lock (bbolt writers hold an exclusive one)."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            deadline = time.monotonic() + LOCK_WAIT
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise BoltError(f"{path} stays locked by a writer") from None
                    time.sleep(0.005)
            with os.fdopen(os.dup(fd), "rb") as f:
                data = f.read()
        finally:
            os.close(fd)  # and with it the lock
        return cls(data)

    def _current_meta(self) -> tuple[int, int]:
        """(page size, root bucket page) of the newest valid meta page."""
        first = self._meta_at(0)
        size = first[2] if first is not None else 4096  # page 1 lies one page size in
        metas = [m for m in (first, self._meta_at(size)) if m is not None and m[2] == size]
        if not metas:
            raise BoltError("no valid meta page (not a bbolt database)")
        newest = max(metas, key=lambda m: m[8])
        return size, newest[4]

    def _meta_at(self, offset: int) -> tuple | None:
        start = offset + _PAGE_HEADER.size
        end = start + _META.size
        if end + 8 > len(self._data):
            return None
        (checksum,) = struct.unpack_from("<Q", self._data, end)
        if checksum != _fnv1a64(self._data[start:end]):
            return None
        meta = _META.unpack_from(self._data, start)
        return meta if meta[0] == _MAGIC else None

    def page(self, page_id: int) -> int:
        offset = page_id * self._page_size
        if offset + _PAGE_HEADER.size > len(self._data):
            raise BoltError(f"page {page_id} lies beyond the file")
        return offset

    def bucket(self, *names: bytes) -> Bucket | None:
        bucket: Bucket | None = self.root
        for name in names:
            bucket = bucket.bucket(name) if bucket is not None else None
        return bucket


class Bucket:
    """One bucket: a B+tree rooted at `offset` in `buf` (the file, or an inline value)."""

    def __init__(self, db: BoltDB, buf: bytes, offset: int) -> None:
        self._db, self._buf, self._offset = db, buf, offset

    def items(self) -> Iterator[tuple[bytes, bytes | Bucket]]:
        yield from self._walk(self._buf, self._offset)

    def get(self, key: bytes) -> bytes | None:
        value = dict(self.items()).get(key)
        return value if isinstance(value, bytes) else None

    def bucket(self, key: bytes) -> Bucket | None:
        value = dict(self.items()).get(key)
        return value if isinstance(value, Bucket) else None

    def _walk(self, buf: bytes, offset: int) -> Iterator[tuple[bytes, bytes | Bucket]]:
        _, flags, count, _ = _PAGE_HEADER.unpack_from(buf, offset)
        elements = offset + _PAGE_HEADER.size
        if flags & _BRANCH:
            for i in range(count):
                _, _, child = _BRANCH_ELEMENT.unpack_from(buf, elements + i * 16)
                yield from self._walk(self._db._data, self._db.page(child))
        elif flags & _LEAF:
            for i in range(count):
                at = elements + i * 16
                eflags, pos, ksize, vsize = _LEAF_ELEMENT.unpack_from(buf, at)
                key = bytes(buf[at + pos : at + pos + ksize])
                value = bytes(buf[at + pos + ksize : at + pos + ksize + vsize])
                if eflags & _BUCKET_VALUE:
                    root, _ = _BUCKET_HEADER.unpack_from(value, 0)
                    if root == 0:  # inline: the bucket's one page follows the header
                        yield key, Bucket(self._db, value, _BUCKET_HEADER.size)
                    else:
                        yield key, Bucket(self._db, self._db._data, self._db.page(root))
                else:
                    yield key, value
        else:
            raise BoltError(f"page at {offset} is neither a branch nor a leaf")


def _fnv1a64(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for byte in data:
        h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h
