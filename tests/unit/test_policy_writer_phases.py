"""Property test of the in-place policy change (membrane.datapath.policy): applying the
tightening key changes first and the loosening ones second, every moment in between allows
only what the old policy allows (during the first phase) or what the new one allows (during
the second), whatever the two policies are. `lookup` is the datapath's decision."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from membrane.abi import POLICY_KEY_PROTO_BITS, Direction
from membrane.datapath.policy import Entries, Op, compile_entries, split_changes
from membrane.datapath.policy_entries import EndpointPolicy, PolicyEntry, lookup

IDENTITIES = [0, 300, 301]  # Identity.ANY and two peers
EGRESS = Direction.EGRESS
PORTS = [(0, 0), (80, 16), (81, 16), (80, 15), (64, 12), (0, 8), (0, 1)]
QUERIES = [
    (ident, proto, port)
    for ident in (300, 301, 302)
    for proto in (6, 17)
    for port in (0, 64, 79, 80, 81, 82, 4000, 40000)
]


@st.composite
def entries(draw: st.DrawFn) -> list[PolicyEntry]:
    out = []
    for _ in range(draw(st.integers(0, 8))):
        proto = draw(st.sampled_from([0, 6, 6, 17]))
        port, bits = (0, 0) if proto == 0 else draw(st.sampled_from(PORTS))
        out.append(
            PolicyEntry(
                direction=EGRESS,
                identity=draw(st.sampled_from(IDENTITIES)),
                proto=proto,
                port=port,
                port_bits=bits,
                deny=draw(st.booleans()),
                rule_id=draw(st.integers(1, 3)),
            )
        )
    return out


def as_policy(slots: Entries, enforce: bool) -> EndpointPolicy:
    return EndpointPolicy(
        enforce_ingress=False,
        enforce_egress=enforce,
        entries=frozenset(
            PolicyEntry(
                direction=Direction(s.direction),
                identity=s.identity,
                proto=s.proto,
                port=s.port,
                port_bits=max(0, s.prefixlen - POLICY_KEY_PROTO_BITS) if s.proto else 0,
                deny=v.deny,
                rule_id=v.rule_id,
            )
            for s, v in slots.items()
        ),
    )


def allowed(slots: Entries, enforce: bool) -> set[tuple[int, int, int]]:
    policy = as_policy(slots, enforce)
    return {q for q in QUERIES if lookup(policy, EGRESS, *q)[0]}


def applied(slots: Entries, op: Op) -> Entries:
    slot, verdict = op
    out = dict(slots)
    if verdict is None:
        del out[slot]
    else:
        out[slot] = verdict
    return out


@settings(max_examples=400, deadline=None)
@given(entries(), entries(), st.booleans(), st.booleans(), st.randoms())
def test_every_moment_is_within_the_old_or_the_new_policy(
    old_entries: list[PolicyEntry],
    new_entries: list[PolicyEntry],
    old_enforce: bool,
    new_enforce: bool,
    rnd,
) -> None:
    old, new = compile_entries(old_entries), compile_entries(new_entries)
    tighten, loosen = split_changes(old, new)
    rnd.shuffle(tighten)  # the order inside a phase does not matter
    rnd.shuffle(loosen)
    old_allowed, new_allowed = allowed(old, old_enforce), allowed(new, new_enforce)

    slots = old
    for op in tighten:
        slots = applied(slots, op)
        assert allowed(slots, old_enforce) <= old_allowed
    enforce = old_enforce or new_enforce  # the writer turns default deny on first
    assert allowed(slots, enforce) <= old_allowed
    for op in loosen:
        slots = applied(slots, op)
        assert allowed(slots, enforce) <= new_allowed
    assert slots == new
    assert allowed(slots, new_enforce) == new_allowed


def test_a_rule_id_change_alone_is_not_a_tightening() -> None:
    [entry] = entries_of(deny=False, rule_id=1)
    [renamed] = entries_of(deny=False, rule_id=2)
    tighten, loosen = split_changes(compile_entries([entry]), compile_entries([renamed]))
    assert (len(tighten), len(loosen)) == (0, 1)


def entries_of(deny: bool, rule_id: int) -> list[PolicyEntry]:
    return [PolicyEntry(EGRESS, 300, 6, 80, 16, deny, rule_id)]
