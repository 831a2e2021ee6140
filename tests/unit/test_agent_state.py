"""The agent's remembered state: identities keep their numbers across a restart."""

from __future__ import annotations

import json
from ipaddress import IPv4Network
from pathlib import Path

from membrane.agent.identities import (
    FIRST_CIDR_IDENTITY,
    FIRST_ENDPOINT_IDENTITY,
    IdentityAllocator,
)
from membrane.agent.state import AgentState, EndpointRecord, PortSpec, StateFile, StoredPolicy


def test_equal_label_sets_share_an_identity_and_numbers_survive_a_reload() -> None:
    alloc = IdentityAllocator()
    web = alloc.for_labels(frozenset({"k8s:app=web", "k8s:io.kubernetes.pod.namespace=x"}))
    db = alloc.for_labels(frozenset({"k8s:app=db"}))
    assert web == FIRST_ENDPOINT_IDENTITY and db == web + 1
    assert alloc.for_labels(frozenset({"k8s:io.kubernetes.pod.namespace=x", "k8s:app=web"})) == web
    cidr = alloc.for_prefix(IPv4Network("198.19.2.0/24"))
    assert cidr == FIRST_CIDR_IDENTITY

    again = IdentityAllocator.from_json(alloc.to_json())
    assert again.for_labels(frozenset({"k8s:app=db"})) == db
    assert again.for_prefix(IPv4Network("198.19.2.0/24")) == cidr


def test_released_numbers_are_never_handed_out_again() -> None:
    alloc = IdentityAllocator()
    first = alloc.for_labels(frozenset({"k8s:a=1"}))
    alloc.retain(set(), set())
    assert alloc.for_labels(frozenset({"k8s:a=1"})) != first


def test_state_file_round_trip(tmp_path: Path) -> None:
    state = AgentState(
        endpoints={
            3: EndpointRecord(
                id=3,
                namespace="x",
                name="a",
                netns="x-a",
                host_ifname="mbr3",
                ipv4="198.18.0.2",
                labels={"pod": "a"},
                ports=(PortSpec("http", 80, "TCP"),),
                identity=256,
            )
        },
        namespaces={"x": {"ns": "x"}},
        policies=[StoredPolicy("NetworkPolicy", "x", "p", {"kind": "NetworkPolicy"})],
        policy_revision=4,
        next_endpoint_id=4,
    )
    files = StateFile(tmp_path / "state")
    files.save(state)
    loaded = files.load()
    assert loaded == state
    assert StateFile(tmp_path / "missing").load() == AgentState()


def test_a_policy_file_is_written_once(tmp_path: Path) -> None:
    files = StateFile(tmp_path)
    kept = StoredPolicy("NetworkPolicy", "x", "p", {"kind": "A"})
    state = AgentState(policies=[kept])
    files.save(state)
    [first] = tmp_path.glob("policy-*.json")
    inode = first.stat().st_ino
    state.next_endpoint_id = 9  # an endpoint change
    files.save(state)
    state.policies = [kept, StoredPolicy("NetworkPolicy", "x", "q", {"kind": "B"})]
    state.policy_revision += 1
    files.save(state)
    assert first.stat().st_ino == inode
    assert len(list(tmp_path.glob("policy-*.json"))) == 2
    state.policies = state.policies[1:]
    files.save(state)
    assert not first.exists()
    assert StateFile(tmp_path).load() == state
    StateFile(tmp_path).remove()
    assert list(tmp_path.iterdir()) == []


def test_rules_are_appended_and_survive_a_torn_line(tmp_path: Path) -> None:
    files = StateFile(tmp_path)
    rule = {"id": 1, "kind": "NetworkPolicy", "namespace": "x", "name": "p"}
    files.save(AgentState(), [rule])
    files.save(AgentState(), [{**rule, "id": 2}])
    with open(tmp_path / "rules.jsonl", "a") as f:
        f.write('{"id": 3, "ki')  # the agent died while appending
    loaded = StateFile(tmp_path)
    assert [r["id"] for r in loaded.load().rules["rules"]] == [1, 2]
    assert loaded.rules_saved == 2


def test_a_state_file_holding_its_policies_still_loads(tmp_path: Path) -> None:
    state = AgentState(
        policies=[StoredPolicy("NetworkPolicy", "x", "p", {"kind": "A"})],
        rules={"rules": [{"id": 1, "kind": "NetworkPolicy"}]},
    )
    (tmp_path / "state.json").write_text(json.dumps(state.to_json()))
    files = StateFile(tmp_path)
    assert files.load() == state
    assert files.rules_saved == 0  # the journal does not hold them yet


def test_cidr_identities_are_rewritten_only_when_they_change(tmp_path: Path) -> None:
    files = StateFile(tmp_path)
    cidr = {f"198.19.{i // 256}.{i % 256}/32": 16_777_216 + i for i in range(1000)}
    state = AgentState(identities={"endpoint": {}, "cidr": cidr, "next_cidr": 16_778_216})
    files.save(state)
    inode = files.cidr_path.stat().st_ino
    assert "198.19.0.1/32" not in files.path.read_text()  # not in state.json
    state.next_endpoint_id = 7  # an endpoint change
    files.save(state)
    assert files.cidr_path.stat().st_ino == inode
    cidr["198.19.200.1/32"] = 16_778_216
    state.identities["next_cidr"] = 16_778_217
    files.save(state)
    assert files.cidr_path.stat().st_ino != inode
    assert StateFile(tmp_path).load() == state


def test_cidr_numbers_written_before_a_crash_are_never_handed_out_again(tmp_path: Path) -> None:
    files = StateFile(tmp_path)
    state = AgentState(identities={"cidr": {"198.19.0.1/32": 100}, "next_cidr": 101})
    files.save(state)
    # The agent numbered a new prefix, wrote the CIDR file, and died before state.json.
    files.cidr_path.write_text('{"198.19.0.1/32": 100, "198.19.0.2/32": 101}')
    loaded = StateFile(tmp_path).load()
    assert loaded.identities["next_cidr"] == 102
