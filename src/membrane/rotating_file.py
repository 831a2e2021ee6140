"""A log file rotated by size, as Hubble's and Tetragon's exporters keep theirs: FILE is
written until the next line would pass `max_bytes`, then FILE -> FILE.1 -> ... -> FILE.N
(the oldest goes); with N = 0 the file simply starts again."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sized
from typing import IO

from membrane.choices import whole_number
from membrane.errors import UserError

FILE_MODE = 0o640


def export_limits(
    path: str,
    path_flag: str,
    flag_prefix: str,
    max_size_mb: int | str,
    max_backups: int | str,
    allow: Sized,
    deny: Sized,
) -> tuple[int, int] | None:
    """The checked size (MiB) and backup count of an export file named by `--<path_flag>`
    whose companions are `--<flag_prefix>-max-size-mb/-max-backups/-allowlist/-denylist`
    (None: no file). Filters without a file are refused rather than silently unused."""
    size = whole_number(max_size_mb, f"{flag_prefix}-max-size-mb", 1)
    backups = whole_number(max_backups, f"{flag_prefix}-max-backups", 0)
    if not path:
        if allow or deny:
            flag = f"{flag_prefix}-allowlist" if allow else f"{flag_prefix}-denylist"
            raise UserError(flag, f"filters need --{path_flag} FILE")
        return None
    if os.path.isdir(path):
        raise UserError(path_flag, f"{path} is a directory")
    return size, backups


class RotatingFile:
    def __init__(self, path: str, max_bytes: int, max_backups: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.max_backups = max_backups
        os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o755, exist_ok=True)
        self._file = self._open()

    def _open(self) -> IO[str]:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
        return os.fdopen(fd, "a", encoding="utf-8")

    def write_lines(self, lines: Iterable[str]) -> None:
        """Each line (without its newline) whole in one file, then flushed."""
        size = self._file.tell()
        for line in lines:
            data = line + "\n"
            if size and size + len(data) > self.max_bytes:
                self._rotate()
                size = 0
            self._file.write(data)
            size += len(data)
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def _rotate(self) -> None:
        self._file.close()
        path, keep = self.path, self.max_backups
        if keep == 0:
            os.unlink(path)
        else:
            for i in range(keep - 1, 0, -1):
                if os.path.exists(f"{path}.{i}"):
                    os.replace(f"{path}.{i}", f"{path}.{i + 1}")
            os.replace(path, f"{path}.1")
        self._file = self._open()


def backups(path: str, max_backups: int) -> list[str]:
    """The log's files, newest first."""
    return [path] + [f"{path}.{i}" for i in range(1, max_backups + 1)]
