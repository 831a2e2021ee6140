"""The agent's changes run with Python's collector paused; survivors are frozen, and the
housekeeping collection still frees cycles made during a change."""

from __future__ import annotations

import gc
import weakref

from membrane.agent import memory


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def test_a_change_pauses_the_collector_and_freezes_survivors() -> None:
    seen = {}

    @memory.one_change
    def change() -> Node:
        seen["enabled"] = gc.isenabled()
        return Node()

    frozen = gc.get_freeze_count()
    kept = change()
    assert seen == {"enabled": False}
    assert gc.isenabled()
    assert gc.get_freeze_count() > frozen
    assert kept is not None


@memory.one_change
def _make_a_cycle() -> weakref.ref[Node]:
    a, b = Node(), Node()
    a.other, b.other = b, a  # a cycle: only the collector frees it
    return weakref.ref(a)


def test_a_small_change_collects_its_own_cycles() -> None:
    assert _make_a_cycle()() is None


def test_a_big_change_leaves_its_cycles_to_the_housekeeping(monkeypatch) -> None:
    monkeypatch.setattr(memory, "SMALL_CHANGE_OBJECTS", -1)  # every change counts as big
    ref = _make_a_cycle()
    gc.collect()
    assert ref() is not None  # frozen: out of the collector's sight
    assert not memory.collect_between_changes()  # changes have not paused long enough
    assert memory.collect_between_changes(idle_s=0)
    assert ref() is None
    assert not memory.collect_between_changes(idle_s=0)  # nothing frozen since
