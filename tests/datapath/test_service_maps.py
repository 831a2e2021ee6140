"""The service maps as the kernel holds them after a plan is applied (pinned in a scratch
bpffs directory, no program attached): slots hold exactly the active backends, a Maglev set's
table is the Python reference's, ids stay stable across changes, and stale entries go."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from membrane.bpf.fs import PIN_ROOT
from membrane.lb.maglev import build_table
from membrane.service.maps import ServiceIds
from membrane.service.model import Endpoint, EndpointPort, EndpointSliceRecord, ServicePort
from membrane.service.model import ServiceRecord as Svc
from membrane.service.plan import NodeView, key_text, plan
from membrane.service.socklb import SocketLb

pytestmark = pytest.mark.root

NODE = NodeView((), {4: ("198.19.0.1",)}, 251)  # a small prime table: quick to compare


@pytest.fixture
def lb() -> Iterator[SocketLb]:
    pin = Path(PIN_ROOT) / f"test-svc-{uuid.uuid4().hex[:8]}"
    socket_lb = SocketLb.start(str(pin), "", (4,))  # maps only: no service, no hooks
    try:
        yield socket_lb
    finally:
        socket_lb.close()
        shutil.rmtree(pin, ignore_errors=True)


def service(algorithm: str = "random") -> Svc:
    return Svc(
        "shop", "web", (ServicePort("http", 80, "TCP", 8080),), ("198.19.128.1",),
        algorithm=algorithm,
    )  # fmt: skip


def endpoints(*states: tuple[str, str, int]) -> EndpointSliceRecord:
    return EndpointSliceRecord(
        "shop",
        "web-1",
        "web",
        (EndpointPort("http", 8080, "TCP"),),
        tuple(Endpoint((ip,), state, weight) for ip, state, weight in states),
    )


def slots(lb: SocketLb, set_id: int) -> list[int]:
    count = lb.maps.sets.lookup(set_id).count
    found = {k.slot: int(v) for k, v in lb.maps.slots.lookup_batch() if k.set == set_id}
    assert set(found) == set(range(1, count + 1))  # no hole, nothing beyond the count
    return [found[i] for i in range(1, count + 1)]


def test_slots_hold_the_active_backends_and_ids_are_stable(lb: SocketLb) -> None:
    three = endpoints(
        ("198.18.0.5", "active", 1), ("198.18.0.6", "terminating", 1),
        ("198.18.0.7", "maintenance", 1), ("198.18.0.8", "active", 1),
    )  # fmt: skip
    ids = lb.maps.apply(plan([service()], [three], NODE), ServiceIds.from_json(None))
    set_id = ids.sets.ids[key_text(("shop", "web", "http", 4, False))]
    backend = {ip: ids.backends.ids[key_text((ip, 8080, 6))] for ip in ("198.18.0.5",
               "198.18.0.6", "198.18.0.7", "198.18.0.8")}  # fmt: skip
    assert sorted(slots(lb, set_id)) == sorted([backend["198.18.0.5"], backend["198.18.0.8"]])
    states = {int(k): v.state for k, v in lb.maps.backends.lookup_batch()}
    assert states == {backend["198.18.0.5"]: 0, backend["198.18.0.6"]: 1,
                      backend["198.18.0.7"]: 2, backend["198.18.0.8"]: 0}  # fmt: skip
    # one backend goes: the others keep their ids, the slots shrink, its record goes
    fewer = endpoints(("198.18.0.5", "active", 1), ("198.18.0.6", "active", 1))
    again = lb.maps.apply(plan([service()], [fewer], NODE), ids)
    assert again.backends.ids[key_text(("198.18.0.5", 8080, 6))] == backend["198.18.0.5"]
    assert sorted(slots(lb, set_id)) == sorted([backend["198.18.0.5"], backend["198.18.0.6"]])
    assert {int(k) for k, _ in lb.maps.backends.lookup_batch()} == {
        backend["198.18.0.5"],
        backend["198.18.0.6"],
    }
    # the service goes: nothing of it stays
    lb.maps.apply(plan([], [], NODE), again)
    assert not lb.maps.frontends.lookup_batch() and not lb.maps.slots.lookup_batch()
    assert not lb.maps.backends.lookup_batch()
    assert lb.maps.sets.lookup(set_id).count == 0


def test_a_maglev_set_gets_the_reference_table(lb: SocketLb) -> None:
    weighted = endpoints(
        ("198.18.0.5", "active", 1), ("198.18.0.6", "active", 3),
        ("198.18.0.7", "terminating", 1),
    )  # fmt: skip
    ids = lb.maps.apply(plan([service("maglev")], [weighted], NODE), ServiceIds.from_json(None))
    set_id = ids.sets.ids[key_text(("shop", "web", "http", 4, False))]
    value = lb.maps.sets.lookup(set_id)
    assert value.maglev_size == 251 and value.flags & 1
    active = ["198.18.0.5", "198.18.0.6"]  # the terminating one is in no table
    owners = build_table([f"{ip}:8080" for ip in active], 251, [1, 3])
    expected = np.array([ids.backends.ids[key_text((ip, 8080, 6))] for ip in active])[owners]
    table = lb.maps.maglev_table(set_id)
    assert np.array_equal(table, expected)
    light, heavy = (ids.backends.ids[key_text((ip, 8080, 6))] for ip in active)
    assert np.count_nonzero(table == heavy) > 2 * np.count_nonzero(table == light)  # weight 3:1


def test_a_change_that_does_not_fit_writes_nothing(
    lb: SocketLb, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = lb.maps.apply(
        plan([service()], [endpoints(("198.18.0.5", "active", 1))], NODE),
        ServiceIds.from_json(None),
    )
    before = lb.maps.frontends.lookup_batch()
    monkeypatch.setattr("membrane.service.maps.SVC_MAX_FRONTENDS", 1)
    bigger = Svc("shop", "api", (ServicePort("http", 81, "TCP", 8080),), ("198.19.128.2",))
    with pytest.raises(Exception, match="needs 2 svc_frontends map entries"):
        lb.maps.apply(plan([service(), bigger], [], NODE), ids)
    assert [bytes(k) for k, _ in lb.maps.frontends.lookup_batch()] == [bytes(k) for k, _ in before]


def test_a_change_to_one_of_1500_services_writes_only_that_services_entries(
    lb: SocketLb, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Map writes follow the change, not the number of services in force: removing one of
    1,500 services (two backends each) and adding another touches a handful of entries,
    and a service left as it was (a Maglev one included) is not written again."""

    def many(n: int, skip: int = -1) -> tuple[list[Svc], list[EndpointSliceRecord]]:
        services, slices = [], []
        for i in range(n):
            if i == skip:
                continue
            name = f"svc-{i}"
            services.append(
                Svc("shop", name, (ServicePort("http", 80, "TCP", 8080),),
                    (f"198.19.{128 + i // 250}.{i % 250 + 1}",),
                    algorithm="maglev" if i == 0 else "random")
            )  # fmt: skip
            slices.append(
                EndpointSliceRecord(
                    "shop", f"{name}-1", name, (EndpointPort("http", 8080, "TCP"),),
                    tuple(Endpoint((f"198.18.{i // 100}.{2 * (i % 100) + k + 1}",))
                          for k in range(2)),
                )
            )  # fmt: skip
        return services, slices

    ids = lb.maps.apply(plan(*many(1500), NODE), ServiceIds.from_json(None))
    assert len(lb.maps.frontends.lookup_batch()) == 1500
    assert lb.maps.slot_count() == 3000
    writes: list[str] = []  # one line per entry written or deleted
    for name, m in lb.maps.maps().items():
        for op in ("update", "delete", "update_batch", "delete_batch"):
            real = getattr(m, op)

            def counted(*args: Any, _real=real, _name=name, _op=op) -> Any:
                if _op.endswith("_batch"):
                    args = (list(args[0]), *args[1:])
                    writes.extend([f"{_op} {_name}"] * len(args[0]))
                else:
                    writes.append(f"{_op} {_name}")
                return _real(*args)

            monkeypatch.setattr(m, op, counted)
    services, slices = many(1501, skip=700)  # svc-700 goes, svc-1500 comes
    ids = lb.maps.apply(plan(services, slices, NODE), ids)
    monkeypatch.undo()
    # svc-1500: 2 backends, 2 slots, its set, rev-NAT and frontend; svc-700: its frontend,
    # set, 2 slots and 2 backends go (and its rev-NAT entry is zeroed)
    assert len(writes) <= 16, writes
    assert "update svc_maglev" not in writes  # the unchanged Maglev set kept its table
    assert len(lb.maps.frontends.lookup_batch()) == 1500
    assert lb.maps.slot_count() == 3000
    assert ids.sets.get(key_text(("shop", "svc-700", "http", 4, False))) is None
