"""observe.encode against observe.record: the bytes a follower is sent for a batch of rows
parse to exactly the GetFlowsResponse that record.py builds for each event, whatever the
events share (templates and parts are cached by the fields they read: an event that differs
from a cached one only in a field some part reads must not get that part's old bytes)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from observe_support import DB, WEB, FakeResolver, addr, event_rows, flow_event_dtype

from membrane.hubble.observer import observer_pb2
from membrane.observe.encode import FlowEncoder, varint
from membrane.observe.record import event_response, sequence_uuid, wall_offset_ns

RESOLVER = FakeResolver()
PREFIX = 0x0123_4567_89AB_CDEF

# Small domains, so that batches repeat values and every cache is hit and missed.
ADDRESSES = [WEB.ipv4, DB.ipv4, "203.0.113.9", "198.19.0.1"]
ADDRESSES_V6 = ["2001:db8::1", "2001:db8::a"]


def _domains(v6: bool) -> dict[str, st.SearchStrategy[Any]]:
    pool = ADDRESSES_V6 if v6 else ADDRESSES
    return {
        "ts_ns": st.integers(0, 10**12),
        "type": st.sampled_from([1, 2, 3]),
        "cpu": st.integers(0, 3),
        "saddr": st.sampled_from(pool).map(addr),
        "daddr": st.sampled_from(pool).map(addr),
        "family": st.just(6) if v6 else st.sampled_from([4, 0]),
        "sport": st.sampled_from([0, 3, 8, 128, 40000]),
        "dport": st.sampled_from([0, 1, 5432]),
        "proto": st.sampled_from([6, 17, 132, 1, 58, 47]),
        "dir": st.integers(0, 1),
        "tcp_flags": st.sampled_from([0, 0x02, 0x12, 0x11, 0x04, 0xFF]),
        "match": st.sampled_from([1, 1, 1, 0, 2, 3, 4, 5]),  # mostly a rule that decided
        "ep_id": st.sampled_from([WEB.id, DB.id, 99]),
        "drop_reason": st.sampled_from([0, 130, 133, 181, 7]),
        "peer_identity": st.sampled_from([1, 2, WEB.identity, DB.identity, 70000]),
        "rule_id": st.sampled_from([7, 9, 0, 11]),
        "policy_rev": st.integers(0, 2),
        "len": st.integers(0, 1500),
    }


HEADER = ("ts_ns", "type", "cpu")


def _as_event(fields: dict[str, Any]) -> dict[str, Any]:
    event = {k: v for k, v in fields.items() if k not in HEADER}
    event["h"] = {"version": 1, **{k: fields[k] for k in HEADER}}
    return event


@st.composite
def batches(draw: st.DrawFn) -> list[list[dict[str, Any]]]:
    """Batches of events that are each a base event with one to three fields changed:
    near neighbours share most cached parts and differ in what some part reads."""
    domains = _domains(draw(st.booleans()))
    base = {name: draw(strategy) for name, strategy in domains.items()}
    out = []
    for _ in range(draw(st.integers(1, 3))):
        batch = []
        for _ in range(draw(st.integers(1, 30))):
            changed = draw(st.lists(st.sampled_from(sorted(domains)), min_size=1, max_size=3))
            batch.append(_as_event(base | {name: draw(domains[name]) for name in changed}))
        out.append(batch)
    return out


@pytest.fixture(scope="module")
def dtype() -> np.dtype:
    return flow_event_dtype()


def expected(ev: dict[str, Any], seq: int) -> observer_pb2.GetFlowsResponse:
    return event_response(ev, RESOLVER, "node-1", sequence_uuid(PREFIX, seq))


@settings(max_examples=100, deadline=None)
@given(events=batches())
def test_encoded_batches_parse_to_the_records_flows(
    dtype: np.dtype, events: list[list[dict[str, Any]]]
) -> None:
    encoder = FlowEncoder(RESOLVER, "node-1")  # one encoder: later batches hit its caches
    seq = 0
    for batch in events:
        messages = encoder.encode(event_rows(dtype, batch), seq, PREFIX, wall_offset_ns(RESOLVER))
        assert len(messages) == len(batch)
        for i, (message, ev) in enumerate(zip(messages, batch, strict=True)):
            assert observer_pb2.GetFlowsResponse.FromString(message) == expected(ev, seq + i)
        seq += len(batch)


def test_equal_events_share_their_parts_and_differ_in_time_and_uuid(dtype: np.dtype) -> None:
    base = {"h": {"ts_ns": 5, "version": 1, "type": 1}, "saddr": addr(WEB.ipv4)}
    base |= {"daddr": addr(DB.ipv4), "proto": 6, "sport": 1, "dport": 2, "ep_id": DB.id}
    batch = [{**base, "h": {**base["h"], "ts_ns": t, "cpu": t % 2}} for t in range(1000)]
    encoder = FlowEncoder(RESOLVER, "node-1")
    messages = encoder.encode(event_rows(dtype, batch), 1 << 62, PREFIX, 10**18)
    assert encoder.parts_built == 3  # addresses, ports, the rest (no service): once for 1000
    parsed = [observer_pb2.GetFlowsResponse.FromString(m) for m in messages]
    assert len({p.flow.uuid for p in parsed}) == 1000
    assert [p.flow.time.ToNanoseconds() for p in parsed] == [10**18 + t for t in range(1000)]
    assert all(p.time == p.flow.time and p.node_name == "node-1" for p in parsed)
    # the sequence number wraps inside the uuid as sequence_uuid's does
    assert parsed[0].flow.uuid == sequence_uuid(PREFIX, 1 << 62)


def test_varint() -> None:
    assert [varint(v) for v in (0, 1, 127, 128, 300, 1 << 35)] == [
        b"\x00",
        b"\x01",
        b"\x7f",
        b"\x80\x01",
        b"\xac\x02",
        b"\x80\x80\x80\x80\x80\x01",
    ]
