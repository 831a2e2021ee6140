"""Python's cyclic garbage collector and the agent's large, long-lived state.

With 10,000 rules the agent holds millions of objects (parsed policies, identities,
compiled entries) that live until the next change. The collector walks every tracked object
on each full collection, and a big change allocates enough to trigger many of them: 60 % of
a 10,000-rule import, and 0.2-0.4 s at random moments inside small changes. So a change runs
with the collector paused, what survives it is frozen (out of the collector's sight;
reference counting still frees it), and the agent's housekeeping collects everything, cycles
among frozen objects included, once changes have paused for a few seconds (a full collection
takes a while, and a change arriving meanwhile would wait for it). The collector is
process-wide, so is this.
"""

from __future__ import annotations

import functools
import gc
import threading
import time
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")

_lock = threading.Lock()
_depth = 0  # changes in progress (nested calls count once)
_frozen_since_collect = False
_last_change_ended = 0.0
IDLE_BEFORE_COLLECT_S = 5.0
SMALL_CHANGE_OBJECTS = 200_000


def _enter() -> None:
    global _depth
    with _lock:
        _depth += 1
        if _depth == 1:
            gc.disable()


def _leave() -> None:
    global _depth, _frozen_since_collect, _last_change_ended
    with _lock:
        _depth -= 1
        if _depth == 0:
            # With the collector paused, everything the change allocated is still in the
            # youngest generation: collecting it alone costs the change's size, not the
            # agent's, and keeps its cycles from being frozen. A big change (a large
            # import) leaves that to the housekeeping.
            if gc.get_count()[0] <= SMALL_CHANGE_OBJECTS:
                gc.collect(0)
            gc.freeze()
            _frozen_since_collect = True
            _last_change_ended = time.monotonic()
            gc.enable()


def one_change(method: Callable[P, R]) -> Callable[P, R]:
    """Run `method` with the collector paused; freeze what survives it."""

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        _enter()
        try:
            return method(*args, **kwargs)
        finally:
            _leave()

    return wrapper


def collect_between_changes(idle_s: float = IDLE_BEFORE_COLLECT_S) -> bool:
    """A full collection of everything, frozen objects included, unless nothing was frozen
    since the last one or the last change ended less than `idle_s` ago. Returns whether it
    collected."""
    global _frozen_since_collect
    with _lock:
        idle = time.monotonic() - _last_change_ended >= idle_s
        if _depth or not _frozen_since_collect or not idle:
            return False
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        _frozen_since_collect = False
        return True
