"""Imports that last the whole command.

Start-up creates many objects and frees almost none, and most commands are short
processes, so the cyclic garbage collector mostly wastes time on them: it stays off while
the command line's modules import (entry.run, and a subcommand's in lazy.load), and what they
made, module-level objects that live until exit, is then frozen: kept out of every later
collection, the interpreter's last one at exit included. The collector runs as usual for
the command itself, which may be a daemon. On `membrane observe --last 20` that is ~20 ms
of ~115 ms of CPU (bench/RESULTS.md, observe_last)."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def importing_for_good() -> Iterator[None]:
    """Imports whose objects live until exit: no collection while they run, and none of
    their objects looked at by a collection again."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()
