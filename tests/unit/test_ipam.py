"""Pod IPAM: every address handed out is a usable, unreserved pod address held by one
owner at a time; exhaustion is a user error; a restart takes the old map back."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from membrane.endpoint import Ipam
from membrane.errors import UserError

A = IPv4Address


def test_skips_network_broadcast_and_reserved_addresses() -> None:
    ipam = Ipam(IPv4Network("198.18.0.0/29"), reserved={A("198.18.0.1"), A("198.19.0.1")})
    got = [ipam.allocate(f"ep{i}") for i in range(5)]
    assert got == [A(f"198.18.0.{n}") for n in (2, 3, 4, 5, 6)]
    assert ipam.capacity == 5  # 8 - network - broadcast - one reserved (the other is outside)


def test_exhaustion_is_a_user_error_naming_the_pod_cidr() -> None:
    ipam = Ipam(IPv4Network("198.18.0.0/30"))
    ipam.allocate("a")
    ipam.allocate("b")
    with pytest.raises(UserError) as err:
        ipam.allocate("c")
    assert err.value.field == "pod-cidr"
    assert "198.18.0.0/30" in str(err.value) and "exhausted" in str(err.value)


def test_released_address_is_reused_only_after_the_others() -> None:
    ipam = Ipam(IPv4Network("198.18.0.0/29"))
    first = ipam.allocate("a")
    ipam.release(first)
    assert ipam.allocate("b") != first  # round-robin: not handed straight to a new pod
    for owner in "cdefg":  # .3 to .6, then the range wraps to .1
        ipam.allocate(owner)
    assert ipam.owner(first) == "g"


def test_peek_names_what_the_next_allocate_hands_out_and_takes_nothing() -> None:
    ipam = Ipam(IPv4Network("198.18.0.0/29"))
    released = ipam.allocate("a")
    ipam.release(released)
    for owner in "bcdefg":  # round-robin, wrapping back to the released .1 last
        expected = ipam.peek()
        assert ipam.peek() == expected  # peeking twice takes nothing
        assert ipam.allocate(owner) == expected
    assert ipam.owner(released) == "g"
    assert ipam.peek() is None  # exhausted


def test_release_of_a_free_address_is_a_no_op() -> None:
    ipam = Ipam(IPv4Network("198.18.0.0/29"))
    ipam.release(A("198.18.0.3"))
    assert ipam.allocated == {}


def test_restore_adopts_a_previous_run_and_continues_after_it() -> None:
    before = Ipam(IPv4Network("198.18.0.0/24"))
    owners = {before.allocate(f"ep{i}"): f"ep{i}" for i in range(3)}
    after = Ipam(IPv4Network("198.18.0.0/24"))
    after.restore(before.allocated)
    assert after.allocated == owners
    assert after.allocate("new") not in owners


@pytest.mark.parametrize(
    ("addr", "problem"),
    [("198.18.1.5", "not a pod address"), ("198.18.0.1", "reserved"), ("198.18.0.0", "not a")],
)
def test_restore_rejects_addresses_it_cannot_hand_out(addr: str, problem: str) -> None:
    ipam = Ipam(IPv4Network("198.18.0.0/24"), reserved={A("198.18.0.1")})
    with pytest.raises(UserError, match=problem):
        ipam.restore({A("198.18.0.7"): "fine", A(addr): "ep"})
    assert ipam.allocated == {}  # checked as a whole: nothing half-restored


def test_restore_rejects_an_address_held_by_another_owner() -> None:
    ipam = Ipam(IPv4Network("198.18.0.0/24"))
    taken = ipam.allocate("a")
    with pytest.raises(UserError, match="already allocated to a"):
        ipam.restore({taken: "b"})


def test_a_slash_32_has_exactly_one_address() -> None:
    ipam = Ipam(IPv4Network("198.18.0.9/32"))
    assert ipam.allocate("a") == A("198.18.0.9")
    with pytest.raises(UserError):
        ipam.allocate("b")


@given(
    prefixlen=st.integers(min_value=26, max_value=30),
    ops=st.lists(st.one_of(st.none(), st.integers(min_value=0, max_value=63)), max_size=120),
)
def test_allocations_are_unique_usable_and_count_exactly(
    prefixlen: int, ops: list[int | None]
) -> None:
    """None allocates, a number releases the address at that offset of the CIDR."""
    cidr = IPv4Network(f"198.18.0.0/{prefixlen}")
    reserved = {A("198.18.0.1")}
    ipam = Ipam(cidr, reserved)
    held: set[IPv4Address] = set()
    for op in ops:
        if op is None:
            if len(held) == ipam.capacity:
                with pytest.raises(UserError):
                    ipam.allocate("x")
                continue
            addr = ipam.allocate("x")
            assert addr not in held and addr not in reserved
            assert addr in cidr and addr not in (cidr.network_address, cidr.broadcast_address)
            held.add(addr)
        else:
            addr = cidr.network_address + op
            ipam.release(addr)
            held.discard(addr)
        assert set(ipam.allocated) == held
