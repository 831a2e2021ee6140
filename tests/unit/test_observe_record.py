"""Flow events become Hubble flows (flow.Flow): sides, verdicts, drop reasons with Cilium's
numbers, L4, the deciding policy; trace events at to-endpoint/from-endpoint with conntrack's
reason; numpy rows decode like dicts; every drop reason of the datapath has a name in
Hubble's DropReason enum."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import json_format
from observe_support import ALLOW_DB, DB, WEB, FakeResolver, addr, event, world_drop

from membrane.abi import Direction, DropReason, FlowEventType, FlowMatch
from membrane.hubble.flow import flow_pb2
from membrane.observe import record as rec
from membrane.observe.format import compact, dict_block, json_line, table_row
from membrane.observe.record import (
    FlowEvent,
    UnsupportedEvent,
    flow_events,
    flow_record,
    flow_response,
)

ABI = Path(__file__).resolve().parents[2] / "bpf" / "abi"
POLICY_LABELS = "k8s:io.cilium.k8s.policy."


def build(ev: dict, resolver: FakeResolver | None = None) -> dict:
    """The flow's protobuf JSON (proto field names), without its random uuid."""
    flow = flow_record(ev, resolver or FakeResolver(), "node-1")
    out = json_format.MessageToDict(flow, preserving_proto_field_name=True)
    assert uuid.UUID(out.pop("uuid"))
    return out


def test_allowed_ingress_flow_names_both_pods_and_the_policy() -> None:
    r = build(event())
    # RFC 3339 in UTC with nanoseconds; a float of unix time carries them to ~0.2 us
    assert re.fullmatch(r"2024-11-21T10:00:01\.1234567\d\dZ", r["time"]), r["time"]
    assert r["verdict"] == "FORWARDED"
    assert "drop_reason" not in r and "drop_reason_desc" not in r
    assert r["IP"] == {"source": WEB.ipv4, "destination": DB.ipv4, "ipVersion": "IPv4"}
    assert r["l4"] == {
        "TCP": {"source_port": 43512, "destination_port": 5432, "flags": {"SYN": True}}
    }
    # ingress: the peer sent it, the local endpoint (ep_id) received it
    assert r["source"] == {
        "ID": WEB.id,
        "identity": WEB.identity,
        "namespace": "shop",
        "labels": WEB.labels,
        "pod_name": "web",
    }
    assert r["destination"]["ID"] == DB.id and r["destination"]["pod_name"] == "db"
    assert r["traffic_direction"] == "INGRESS"
    assert r["Type"] == "L3_L4" and r["node_name"] == "node-1"
    assert r["event_type"] == {"type": 5}  # sub_type 0: a zero value, left out
    assert r["policy_match_type"] == rec.POLICY_MATCH_L3_L4
    assert r["is_reply"] is False
    assert r["Summary"] == "TCP Flags: SYN"
    assert r["ingress_allowed_by"] == [
        {
            "name": "db-from-web",
            "namespace": "shop",
            "labels": [
                f"{POLICY_LABELS}derived-from=CiliumNetworkPolicy",
                f"{POLICY_LABELS}name=db-from-web",
                f"{POLICY_LABELS}namespace=shop",
            ],
            "revision": "3",  # uint64: a string in protobuf JSON
            "kind": "CiliumNetworkPolicy",
        }
    ]
    for other in ("egress_allowed_by", "ingress_denied_by", "egress_denied_by"):
        assert other not in r
    assert "policy" not in r and "trace_reason" not in r


def test_egress_puts_the_local_endpoint_on_the_source_side() -> None:
    r = build(event(dir=1, ep_id=WEB.id, peer_identity=DB.identity))
    assert r["traffic_direction"] == "EGRESS"
    assert (r["source"]["pod_name"], r["destination"]["pod_name"]) == ("web", "db")
    assert r["destination"]["identity"] == DB.identity
    assert r["egress_allowed_by"][0]["name"] == "db-from-web"
    assert "ingress_allowed_by" not in r


def test_default_deny_drop_from_world() -> None:
    r = build(world_drop())
    assert r["verdict"] == "DROPPED"
    assert (r["drop_reason"], r["drop_reason_desc"]) == (133, "POLICY_DENIED")
    assert r["event_type"] == {"type": 1, "sub_type": 133}
    assert r["source"] == {"identity": 2, "labels": ["reserved:world"]}
    assert r["destination"]["pod_name"] == "db"
    assert "policy_match_type" not in r  # none: zero
    assert not any(k.endswith(("_allowed_by", "_denied_by")) for k in r)


def test_deny_rule_drop_names_the_policy() -> None:
    r = build(world_drop(drop_reason=181, match=1, rule_id=9))
    assert (r["drop_reason"], r["drop_reason_desc"]) == (181, "POLICY_DENY")
    [deny] = r["ingress_denied_by"]
    assert (deny["name"], deny["kind"]) == ("no-world", "CiliumClusterwideNetworkPolicy")
    assert "namespace" not in deny  # clusterwide
    assert f"{POLICY_LABELS}derived-from=CiliumClusterwideNetworkPolicy" in deny["labels"]
    assert r["policy_match_type"] == rec.POLICY_MATCH_L3_ONLY


@pytest.mark.parametrize(
    ("ours", "cilium", "name"),
    [
        (DropReason.FRAG_NOT_FOUND, 175, "FIRST_LOGICAL_DATAGRAM_FRAGMENT_NOT_FOUND"),
        (
            DropReason.NO_ENDPOINT_STATE,
            165,
            "NO_CONFIGURATION_AVAILABLE_TO_PERFORM_POLICY_DECISION",
        ),
        (DropReason.INVALID_SOURCE_IP, 132, "INVALID_SOURCE_IP"),
    ],
)
def test_drops_carry_ciliums_number_for_the_reason(ours: int, cilium: int, name: str) -> None:
    r = build(world_drop(drop_reason=int(ours)))
    assert (r["drop_reason"], r["drop_reason_desc"]) == (cilium, name)
    assert r["event_type"] == {"type": 1, "sub_type": cilium}


@pytest.mark.parametrize(
    ("l3", "l4", "match_type"),
    [(True, True, 2), (True, False, 1), (False, True, 3), (False, False, 4)],
)
def test_policy_match_type_follows_the_rule_shape(l3: bool, l4: bool, match_type: int) -> None:
    rule = rec.RuleView(**{**ALLOW_DB.__dict__, "l3": l3, "l4": l4})
    assert build(event(), FakeResolver(rules={7: rule}))["policy_match_type"] == match_type


def test_a_rule_removed_since_names_no_policy() -> None:
    r = build(event(), FakeResolver(rules={}))
    assert "ingress_allowed_by" not in r and "policy_match_type" not in r


def test_no_policy_in_the_direction_means_no_policy() -> None:
    r = build(event(match=0, rule_id=0))
    assert "ingress_allowed_by" not in r and r["verdict"] == "FORWARDED"


def test_unknown_drop_reason_is_unknown() -> None:
    r = build(world_drop(drop_reason=199))
    assert "drop_reason" not in r and "drop_reason_desc" not in r  # 0: DROP_REASON_UNKNOWN
    assert r["event_type"] == {"type": 1}


def test_peers_off_this_node_come_from_their_identity() -> None:
    remote = ["k8s:app=api", "k8s:io.kubernetes.pod.namespace=payments"]
    resolver = FakeResolver(identities={300: remote, 1: ["reserved:host"]})
    r = build(event(saddr="198.18.7.7", peer_identity=300), resolver)
    assert r["source"] == {"identity": 300, "labels": remote, "namespace": "payments"}
    host = build(event(saddr="198.19.0.1", peer_identity=1), resolver)
    assert host["source"] == {"identity": 1, "labels": ["reserved:host"]}


def test_a_deleted_local_endpoint_keeps_its_id() -> None:
    r = build(event(), FakeResolver(endpoints=[WEB]))
    assert r["destination"] == {"ID": DB.id}


@pytest.mark.parametrize(
    ("fields", "l4", "summary"),
    [
        ({"proto": 17}, {"UDP": {"source_port": 43512, "destination_port": 5432}}, "UDP"),
        ({"proto": 132}, {"SCTP": {"source_port": 43512, "destination_port": 5432}}, "SCTP"),
        (
            {"proto": 1, "sport": 8, "dport": 0},
            {"ICMPv4": {"type": 8}},
            "ICMPv4 EchoRequest",
        ),
        (
            {"proto": 1, "sport": 3, "dport": 3},
            {"ICMPv4": {"type": 3, "code": 3}},
            "ICMPv4 DestinationUnreachable code 3",
        ),
        ({"proto": 47, "sport": 0, "dport": 0}, None, "IPv4 protocol 47"),
        (
            {"tcp_flags": 0x12},
            {
                "TCP": {
                    "source_port": 43512,
                    "destination_port": 5432,
                    "flags": {"SYN": True, "ACK": True},
                }
            },
            "TCP Flags: SYN, ACK",
        ),
    ],
)
def test_layer4_and_summary(fields: dict, l4: dict | None, summary: str) -> None:
    r = build(event(**fields))
    assert r.get("l4") == l4
    assert r["Summary"] == summary


def test_ipv6_flows_say_so() -> None:
    r = build(event(family=6, saddr="2001:db8::a", daddr="2001:db8::b", proto=58, sport=128))
    assert r["IP"] == {"source": "2001:db8::a", "destination": "2001:db8::b", "ipVersion": "IPv6"}
    assert r["l4"] == {"ICMPv6": {"type": 128, "code": 5432}}


def test_reply_match_sets_is_reply() -> None:
    assert build(world_drop(match=3))["is_reply"] is True


def test_related_icmp_error_says_so() -> None:
    r = build(event(proto=1, sport=3, dport=4, match=FlowMatch.RELATED))
    assert r["verdict"] == "FORWARDED" and r["trace_reason"] == "RELATED"
    assert r["Summary"] == "ICMPv4 DestinationUnreachable code 4"
    assert "ingress_allowed_by" not in r and r["is_reply"] is False


# ---- trace events (FLOW_EVENT_TRACE): forwarded packets, sampled per connection ----------
def trace(**fields: object) -> dict:
    """db receiving web's SYN: a new connection, traced at to-endpoint."""
    base = {"h": {"type": FlowEventType.TRACE}, "match": FlowMatch.NONE, "rule_id": 0}
    return event(**{**base, **fields})


def syn_ack_from_db() -> dict:
    """db's SYN-ACK to web, at db's egress: a reply, traced at from-endpoint."""
    return trace(
        saddr=addr(DB.ipv4),
        daddr=addr(WEB.ipv4),
        sport=5432,
        dport=43512,
        dir=Direction.EGRESS,
        tcp_flags=0x12,
        match=FlowMatch.REPLY,
    )


def test_trace_of_a_new_connection_at_to_endpoint() -> None:
    r = build(trace())
    assert r["verdict"] == "FORWARDED"
    assert r["event_type"] == {"type": 4}  # sub_type 0: TraceToLxc, a zero value
    assert r["trace_observation_point"] == "TO_ENDPOINT"
    assert r["trace_reason"] == "NEW"
    assert r["traffic_direction"] == "INGRESS" and r["is_reply"] is False
    assert r["source"]["pod_name"] == "web" and r["destination"]["pod_name"] == "db"
    assert r["Summary"] == "TCP Flags: SYN"
    # a trace says where a packet went, not which policy let it: that is the verdict's
    assert "policy_match_type" not in r
    assert not {"ingress_allowed_by", "egress_allowed_by"} & set(r)


def test_trace_of_a_reply_at_from_endpoint_belongs_to_the_connection() -> None:
    r = build(syn_ack_from_db())
    assert r["event_type"] == {"type": 4, "sub_type": 5}  # TraceFromLxc
    assert r["trace_observation_point"] == "FROM_ENDPOINT"
    assert r["trace_reason"] == "REPLY" and r["is_reply"] is True
    # leaving db, but the answer of a connection web opened to db: INGRESS, as Hubble says
    assert r["traffic_direction"] == "INGRESS"
    assert r["source"]["pod_name"] == "db" and r["destination"]["pod_name"] == "web"
    assert r["Summary"] == "TCP Flags: SYN, ACK"


@pytest.mark.parametrize(
    ("match", "reason", "direction"),
    [
        (FlowMatch.NONE, "NEW", "EGRESS"),
        (FlowMatch.ESTABLISHED, "ESTABLISHED", "EGRESS"),
        (FlowMatch.REPLY, "REPLY", "INGRESS"),
        (FlowMatch.RELATED, "RELATED", "EGRESS"),
    ],
)
def test_trace_reason_and_direction_follow_conntrack(
    match: FlowMatch, reason: str, direction: str
) -> None:
    r = build(trace(dir=Direction.EGRESS, match=match))
    assert (r["trace_reason"], r["traffic_direction"]) == (reason, direction)
    assert r["trace_observation_point"] == "FROM_ENDPOINT"


def test_observe_prints_traces_as_hubble_does() -> None:
    new, reply = (flow_record(ev, FakeResolver(), "n") for ev in (trace(), syn_ack_from_db()))
    line = compact(new)
    assert line.endswith(
        ": shop/web:43512 (ID:256) -> shop/db:5432 (ID:257) to-endpoint FORWARDED (TCP Flags: SYN)"
    ), line
    assert compact(reply).endswith(
        ": shop/web:43512 (ID:256) <- shop/db:5432 (ID:257) from-endpoint FORWARDED "
        "(TCP Flags: SYN, ACK)"
    ), compact(reply)
    assert table_row(reply)[3:] == ["from-endpoint", "FORWARDED", "TCP Flags: SYN, ACK"]
    assert "TYPE: to-endpoint" in dict_block(new)
    assert json.loads(json_line(flow_response(new)))["flow"]["event_type"] == {"type": 4}


def test_every_flow_has_its_own_uuid() -> None:
    a, b = (flow_record(event(), FakeResolver(), "n").uuid for _ in range(2))
    assert a != b and uuid.UUID(a).version == 4


@pytest.mark.parametrize("h", [{"version": 2}, {"type": 9}])
def test_events_we_cannot_read_are_refused(h: dict) -> None:
    with pytest.raises(UnsupportedEvent):
        build(event(h=h))


# ---- numpy rows, with the layout clang gives the C struct --------------------------------
@pytest.fixture(scope="module")
def flow_event_dtype(tmp_path_factory: pytest.TempPathFactory) -> np.dtype:
    """struct flow_event's dtype from BTF: of the endpoint object when it is built, else
    of a scrap object compiled from the ABI header (the same source)."""
    from membrane.bpf.btf import Btf
    from membrane.bpf.object import objects_dir

    obj = objects_dir() / "endpoint.bpf.o"
    if not obj.exists():
        clang = shutil.which("clang")
        if clang is None:
            pytest.skip("neither endpoint.bpf.o nor clang to build the ABI's BTF")
        src = tmp_path_factory.mktemp("abi") / "flow_event.bpf.c"
        src.write_text(
            '#include <linux/types.h>\n#include "abi/endpoint.h"\nABI_EXPORT(flow_event);\n'
        )
        obj = src.with_suffix(".o")
        includes = ["-I/usr/include/x86_64-linux-gnu", f"-I{ABI.parent}"]
        cmd = [clang, "-O2", "-g", "-target", "bpf", *includes, "-c", str(src), "-o", str(obj)]
        subprocess.run(cmd, check=True)
    return Btf.from_file(obj).dtype("flow_event")


def _row(dtype: np.dtype, ev: dict) -> np.void:
    arr = np.zeros(1, dtype=dtype)
    for name, value in ev.items():
        if name == "h":
            for hname, hvalue in value.items():
                arr[0]["h"][hname] = hvalue
        else:
            arr[0][name] = value
    return arr[0]


def test_numpy_rows_decode_like_dicts(flow_event_dtype: np.dtype) -> None:
    dicts = [event(), world_drop(), event(proto=1, sport=0, dport=0, tcp_flags=0)]
    batch = np.array([_row(flow_event_dtype, d) for d in dicts], dtype=flow_event_dtype)
    assert flow_events(batch) == [FlowEvent.decode(d) for d in dicts]
    assert FlowEvent.decode(batch[1]) == FlowEvent.decode(dicts[1])
    assert build(batch[0]) == build(dicts[0])
    assert FlowEvent.decode(batch[0]).saddr == WEB.ipv4


def test_addresses_are_read_in_network_order(flow_event_dtype: np.dtype) -> None:
    """The kernel writes saddr as it is on the wire; the raw bytes must read back as the
    same dotted address, whatever this host's byte order."""
    raw = bytearray(flow_event_dtype.itemsize)
    offset = flow_event_dtype.fields["saddr"][1]
    raw[offset : offset + 4] = bytes([198, 18, 0, 10])
    row = np.frombuffer(bytes(raw), dtype=flow_event_dtype)[0]
    assert FlowEvent.decode(row).saddr == "198.18.0.10"


# ---- the C side's numbers --------------------------------------------------------------
def test_every_drop_reason_of_the_datapath_has_a_name() -> None:
    assert set(DropReason) - {DropReason.NONE} == set(rec.DROP_REASONS)
    for reason in rec.DROP_REASONS.values():  # a name of Hubble's enum, else Value raises
        assert flow_pb2.DropReason.Value(reason.desc) >= 130
