"""The PolicyWriter and the policy generations: a change is written in place into the live
generation (tightening first, loosening second; tests/unit/test_policy_writer_phases.py
checks every moment in between); the datapath still enforces two generations at once, which
is where an older writer's half-done switch leaves an endpoint, and the writer finishes it.
The writer reads everything it needs from the maps, so a restarted writer carries on."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from endpoint_harness import (
    EP_ID,
    EP_IDENTITY,
    EP_IP,
    EndpointDatapath,
    allow,
    assert_dropped,
    assert_passed,
    policy_entry,
)
from packets import tcp_segment

from membrane.abi import Direction, DropReason
from membrane.datapath import EndpointPolicy, PolicyWriter
from membrane.datapath.policy import Verdict, compile_entries, policy_key, policy_value, slot_of
from membrane.datapath.policy_entries import PolicyEntry

pytestmark = pytest.mark.root

PEER = "198.18.0.20"
PEER_ID = 1001
EGRESS = Direction.EGRESS
OLD = [allow(EGRESS, PEER_ID, port=80, rule_id=1), allow(EGRESS, PEER_ID, port=81, rule_id=2)]
NEW = [allow(EGRESS, PEER_ID, port=81, rule_id=3), allow(EGRESS, PEER_ID, port=82, rule_id=4)]


@pytest.fixture
def dp() -> Iterator[EndpointDatapath]:
    with EndpointDatapath.temporary() as datapath:
        datapath.set_ipcache({f"{PEER}/32": PEER_ID})
        yield datapath


_sports = iter(range(30000, 60000))


def verdicts(dp: EndpointDatapath, ports: tuple[int, ...] = (80, 81, 82)) -> dict[int, str]:
    """Verdict of a new egress connection to each port."""
    return {p: dp.egress(tcp_segment(EP_IP, PEER, next(_sports), p)).verdict for p in ports}


def policy_keys(dp: EndpointDatapath) -> set[tuple[int, int, int]]:
    """(ep_id, gen, dport) of every entry in the policy map."""
    return {(int(k.ep_id), int(k.gen), socket.ntohs(k.dport)) for k, _ in dp.maps.policy.items()}


def test_first_policy_is_generation_zero(dp: EndpointDatapath) -> None:
    dp.writer.remove_endpoint(EP_ID)
    dp.set_policy(OLD, egress=True)
    state = dp.state()
    assert (list(state.gen), list(state.enforce), state.identity) == ([0, 0], [2, 2], EP_IDENTITY)
    assert state.policy_rev != 0
    assert policy_keys(dp) == {(EP_ID, 0, 80), (EP_ID, 0, 81)}
    assert verdicts(dp) == {80: "pass", 81: "pass", 82: "drop"}


def test_a_change_is_written_in_place(dp: EndpointDatapath) -> None:
    dp.set_policy(OLD, egress=True)
    before = dp.state()
    live = before.gen[0]
    dp.set_policy(NEW, egress=True)
    after = dp.state()
    assert list(after.gen) == [live, live]
    assert after.policy_rev == before.policy_rev + 1
    assert policy_keys(dp) == {(EP_ID, live, 81), (EP_ID, live, 82)}
    assert verdicts(dp) == {80: "drop", 81: "pass", 82: "pass"}


def test_a_change_writes_only_the_keys_that_change(dp: EndpointDatapath) -> None:
    dp.set_policy(OLD, egress=True)
    kept = policy_key(dp.maps, EP_ID, dp.state().gen[0], slot_of(OLD[1]))
    # A marker behind the writer's back: it survives only if the writer leaves the key alone.
    dp.maps.policy.update(kept, policy_value(dp.maps, Verdict(77, False)))
    dp.set_policy([OLD[1], NEW[1]], egress=True)
    assert dp.maps.policy.lookup(kept).rule_id == 77
    assert verdicts(dp) == {80: "drop", 81: "pass", 82: "pass"}


def test_applying_the_same_policy_changes_nothing(dp: EndpointDatapath) -> None:
    dp.set_policy(OLD, egress=True)
    before = bytes(dp.state())
    keys = policy_keys(dp)
    dp.set_policy(list(reversed(OLD)), egress=True)
    assert bytes(dp.state()) == before
    assert policy_keys(dp) == keys


def test_enforcement_change_alone_is_a_change(dp: EndpointDatapath) -> None:
    dp.set_policy(OLD, egress=True)
    dp.set_policy(OLD, egress=False)
    state = dp.state()
    assert state.enforce[state.gen[0]] == 0
    assert verdicts(dp)[82] == "pass"


def test_identity_change_alone_keeps_the_revision(dp: EndpointDatapath) -> None:
    dp.set_policy(OLD, egress=True)
    rev = dp.state().policy_rev
    dp.set_policy(OLD, egress=True, identity=EP_IDENTITY + 1)
    assert (dp.state().identity, dp.state().policy_rev) == (EP_IDENTITY + 1, rev)


def _half_switched(dp: EndpointDatapath) -> int:
    """Leave the endpoint where an agent dying mid-switch leaves it: OLD live, NEW written
    in the other generation, state {old, new}. Returns the new generation."""
    dp.set_policy(OLD, egress=True)
    state = dp.state()
    old = state.gen[0]
    new = 1 - old
    for slot, verdict in compile_entries(NEW).items():
        dp.maps.policy.update(policy_key(dp.maps, EP_ID, new, slot), policy_value(dp.maps, verdict))
    state.gen[1] = new
    state.enforce[new] = 1 << EGRESS
    state.policy_rev += 1
    dp.maps.endpoints.update(EP_ID, state)
    return new


def test_during_a_switch_only_what_both_allow_passes(dp: EndpointDatapath) -> None:
    _half_switched(dp)
    assert verdicts(dp) == {80: "drop", 81: "pass", 82: "drop"}
    out = dp.egress(tcp_segment(EP_IP, PEER, 12345, 82))
    assert_dropped(out, DropReason.POLICY_DENIED, EGRESS)


def test_during_a_switch_established_connections_need_both(dp: EndpointDatapath) -> None:
    dp.set_policy(OLD, egress=True)
    dp.egress(tcp_segment(EP_IP, PEER, 1111, 80))
    dp.egress(tcp_segment(EP_IP, PEER, 1112, 81))
    _half_switched(dp)
    assert_dropped(
        dp.egress(tcp_segment(EP_IP, PEER, 1111, 80, "A")), DropReason.POLICY_DENIED, EGRESS
    )
    assert_passed(dp.egress(tcp_segment(EP_IP, PEER, 1112, 81, "A")), new_flow=False)


def test_a_restarted_writer_finishes_a_half_done_switch(dp: EndpointDatapath) -> None:
    new = _half_switched(dp)
    writer = PolicyWriter(dp.maps)  # the agent restarted
    writer.apply({EP_ID: EndpointPolicy(False, True, NEW)}, {EP_ID: EP_IDENTITY})
    assert list(dp.state().gen) == [new, new]
    assert policy_keys(dp) == {(EP_ID, new, 81), (EP_ID, new, 82)}
    assert verdicts(dp) == {80: "drop", 81: "pass", 82: "pass"}


def test_a_restarted_writer_adopts_the_maps(dp: EndpointDatapath) -> None:
    dp.set_policy(OLD, egress=True)
    state = bytes(dp.state())
    writer = PolicyWriter(dp.maps)
    writer.apply({EP_ID: EndpointPolicy(False, True, OLD)}, {EP_ID: EP_IDENTITY})
    assert bytes(dp.state()) == state  # nothing to do
    writer.apply({EP_ID: EndpointPolicy(False, True, NEW)}, {EP_ID: EP_IDENTITY})
    gen = dp.state().gen[0]
    assert policy_keys(dp) == {(EP_ID, gen, 81), (EP_ID, gen, 82)}


def test_stale_entries_in_the_idle_generation_are_removed(dp: EndpointDatapath) -> None:
    dp.set_policy(OLD, egress=True)
    idle = 1 - dp.state().gen[0]
    stale = slot_of(allow(EGRESS, PEER_ID, port=9999))
    dp.maps.policy.update(
        policy_key(dp.maps, EP_ID, idle, stale), policy_value(dp.maps, Verdict(9, False))
    )
    PolicyWriter(dp.maps).apply({EP_ID: EndpointPolicy(False, True, NEW)}, {EP_ID: EP_IDENTITY})
    assert policy_keys(dp) == {(EP_ID, 1 - idle, 81), (EP_ID, 1 - idle, 82)}


def test_leftovers_of_an_interrupted_cleanup_go_on_the_next_apply(dp: EndpointDatapath) -> None:
    dp.set_policy(OLD, egress=True)
    idle = 1 - dp.state().gen[0]
    leftover = slot_of(allow(EGRESS, PEER_ID, port=9999))
    dp.maps.policy.update(
        policy_key(dp.maps, EP_ID, idle, leftover), policy_value(dp.maps, Verdict(9, False))
    )
    state = bytes(dp.state())
    PolicyWriter(dp.maps).apply({EP_ID: EndpointPolicy(False, True, OLD)}, {EP_ID: EP_IDENTITY})
    assert bytes(dp.state()) == state
    assert policy_keys(dp) == {(EP_ID, 1 - idle, 80), (EP_ID, 1 - idle, 81)}


def test_bad_input_changes_nothing(dp: EndpointDatapath) -> None:
    dp.set_policy(OLD, egress=True)
    state, keys = bytes(dp.state()), policy_keys(dp)
    bad = [policy_entry(EGRESS, PEER_ID, port=80, port_bits=20)]
    with pytest.raises(ValueError, match="port"):
        dp.writer.apply(
            {EP_ID: EndpointPolicy(False, True, NEW), 9: EndpointPolicy(False, True, bad)},
            {EP_ID: EP_IDENTITY, 9: 2000},
        )
    assert (bytes(dp.state()), policy_keys(dp), dp.state(9)) == (state, keys, None)


def test_several_endpoints_switch_together(dp: EndpointDatapath) -> None:
    dp.add_endpoint(9, "198.18.0.11")
    dp.writer.apply(
        {EP_ID: EndpointPolicy(False, True, OLD), 9: EndpointPolicy(False, True, OLD)},
        {EP_ID: EP_IDENTITY, 9: 2000},
    )
    dp.writer.apply(
        {EP_ID: EndpointPolicy(False, True, NEW), 9: EndpointPolicy(False, True, NEW)},
        {EP_ID: EP_IDENTITY, 9: 2000},
    )
    assert {(ep, port) for ep, _, port in policy_keys(dp)} == {
        (EP_ID, 81),
        (EP_ID, 82),
        (9, 81),
        (9, 82),
    }
    out = dp.egress(tcp_segment("198.18.0.11", PEER, 4000, 82), ep_id=9)
    assert_passed(out, new_flow=True)


def test_remove_endpoint_clears_state_policy_and_conntrack(dp: EndpointDatapath) -> None:
    dp.set_policy(OLD, egress=True)
    dp.egress(tcp_segment(EP_IP, PEER, 1111, 80))
    dp.writer.remove_endpoint(EP_ID)
    assert dp.state() is None
    assert policy_keys(dp) == set()
    assert dp.ct() == []
    out = dp.egress(tcp_segment(EP_IP, PEER, 1111, 80, "A"))
    assert_dropped(out, DropReason.NO_ENDPOINT_STATE, EGRESS)


def test_a_replaced_pods_policy_is_not_compiled_again(
    dp: EndpointDatapath, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pod deleted and added again (a new endpoint id) gets the same policy object from
    the compiler; the writer still knows its slots after changes in between."""
    policy = EndpointPolicy(False, True, tuple(OLD))
    dp.writer.apply({EP_ID: policy}, {EP_ID: EP_IDENTITY})
    dp.writer.remove_endpoint(EP_ID)
    dp.writer.apply({}, {})  # another change while no endpoint has the policy
    compiled: list[object] = []
    original = compile_entries
    monkeypatch.setattr(
        "membrane.datapath.policy.compile_entries", lambda e: compiled.append(e) or original(e)
    )
    dp.writer.apply({EP_ID + 1: policy}, {EP_ID + 1: EP_IDENTITY})
    assert compiled == []
    assert policy_keys(dp) == {(EP_ID + 1, 0, 80), (EP_ID + 1, 0, 81)}


def test_a_new_endpoint_needs_its_identity(dp: EndpointDatapath) -> None:
    with pytest.raises(ValueError, match="identity"):
        dp.writer.apply({42: EndpointPolicy(False, False, [])}, {})


# ---- entry encoding --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("entry", "prefixlen", "port"),
    [
        (policy_entry(EGRESS, 5, proto=0, port_bits=0), 64, 0),
        (policy_entry(EGRESS, 5, proto=6, port=80, port_bits=0), 80, 0),
        (policy_entry(EGRESS, 5, proto=6, port=1007, port_bits=13), 93, 1000),
        (policy_entry(EGRESS, 5, proto=6, port=80), 96, 80),
    ],
)
def test_slots(entry: PolicyEntry, prefixlen: int, port: int) -> None:
    slot = slot_of(entry)
    assert (slot.prefixlen, slot.port) == (prefixlen, port)


@pytest.mark.parametrize(
    "entry",
    [
        policy_entry(EGRESS, 5, proto=0, port=80, port_bits=16),
        policy_entry(EGRESS, 5, proto=6, port=80, port_bits=17),
        policy_entry(EGRESS, 5, proto=6, port=70000),
        policy_entry(2, 5),  # type: ignore[arg-type]  # no such direction
        policy_entry(EGRESS, 5, proto=256),
    ],
)
def test_bad_entries_are_refused(entry: PolicyEntry) -> None:
    with pytest.raises(ValueError):
        slot_of(entry)


def test_a_deny_wins_a_shared_slot() -> None:
    entries = [
        allow(EGRESS, 5, port=80, rule_id=1),
        policy_entry(EGRESS, 5, port=80, deny=True, rule_id=2),
    ]
    (verdict,) = compile_entries(entries).values()
    assert (verdict.rule_id, verdict.deny) == (2, True)


def test_the_compilers_types_are_accepted(dp: EndpointDatapath) -> None:
    compiler = pytest.importorskip("membrane.policy")
    entry = compiler.PolicyEntry(
        direction=Direction.EGRESS,
        identity=PEER_ID,
        proto=6,
        port=81,
        port_bits=16,
        deny=False,
        rule_id=5,
    )
    policy = compiler.EndpointPolicy(False, True, frozenset([entry]))
    dp.writer.apply({EP_ID: policy}, {EP_ID: EP_IDENTITY})
    assert verdicts(dp) == {80: "drop", 81: "pass", 82: "drop"}
