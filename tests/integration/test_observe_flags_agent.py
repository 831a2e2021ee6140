"""`membrane observe` with Hubble's filter flags against the real agent, over flows of real
traffic between the cluster's pods: every flow it prints satisfies the flags, the flows the
traffic made are among them, an either-side flag is the union of its two one-sided forms,
and `--not` leaves out exactly what it names."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from agent_support import net_fixture, shared_cluster_fixture

from membrane.testing.cluster import Cluster
from membrane.testing.waiting import wait_for

pytestmark = pytest.mark.root

cluster = shared_cluster_fixture()
net = net_fixture()

DENY_INGRESS_Y = """
    apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata: {name: deny-ingress, namespace: y}
    spec:
      podSelector: {}
      policyTypes: [Ingress]
"""


def observe(net: Cluster, *flags: str) -> list[dict[str, Any]]:
    """The flows `membrane observe --all -o json FLAGS` prints (lost-events lines aside)."""
    out = net.cli("observe", "--all", "-o", "json", *flags).stdout
    lines = [json.loads(line) for line in out.splitlines()]
    return [line["flow"] for line in lines if "flow" in line]


def side(flow: dict[str, Any], which: str) -> str:
    ep = flow.get(which, {})
    return f"{ep.get('namespace', '')}/{ep.get('pod_name', '')}"


def test_filters_select_real_flows(net: Cluster) -> None:
    started = datetime.now(UTC).isoformat()
    net.import_policy(DENY_INGRESS_Y)
    net.check(net.reach(sources=["x/a"], destinations=["y/b", "z/b"]).deny(to="y/b"))
    since = ("--since", started)

    # the drops x/a -> y/b: by pod and namespace, verdict, type and drop reason
    drops = wait_for(
        "the drops x/a -> y/b",
        lambda: observe(net, *since, "--from-pod", "x/a", "--to-namespace", "y", "-t", "drop"),
    )
    assert {(side(f, "source"), side(f, "destination")) for f in drops} == {("x/a", "y/b")}
    assert {f["verdict"] for f in drops} == {"DROPPED"}
    assert {f["drop_reason_desc"] for f in drops} == {"POLICY_DENIED"}
    protocols = {next(iter(f["l4"])) for f in drops}
    assert protocols == {"TCP", "UDP"}  # the probes' TCP and UDP ports 80 and 81

    # the forwarded x/a -> z/b, TCP to port 80 only, by label and address
    z_b = net.pods["z/b"]
    web = observe(
        net,
        *since,
        "--from-label",
        "pod=a",
        "--to-ip",
        z_b.ip,
        "--protocol",
        "tcp",
        "--to-port",
        "80",
    )
    assert web, "no flow x/a -> z/b:80/TCP"
    for f in web:
        assert f["verdict"] == "FORWARDED" and f["IP"]["destination"] == z_b.ip, f
        assert "k8s:pod=a" in f["source"]["labels"], f
        assert f["l4"]["TCP"]["destination_port"] == 80, f

    # --not: everything about x/a except what was forwarded
    not_forwarded = observe(net, *since, "--pod", "x/a", "--not", "--verdict", "FORWARDED")
    assert not_forwarded
    assert {f["verdict"] for f in not_forwarded} == {"DROPPED"}
    assert all("x/a" in (side(f, "source"), side(f, "destination")) for f in not_forwarded)
    assert {f["uuid"] for f in drops} <= {f["uuid"] for f in not_forwarded}

    # an either-side flag is its two one-sided forms ORed (the same store moment: --until)
    until = ("--until", datetime.now(UTC).isoformat())

    def uuids(*flags: str) -> set[str]:
        return {f["uuid"] for f in observe(net, *since, *until, *flags)}

    both = wait_for(
        "the flows up to now settled",  # events still in the reader may arrive late
        lambda: (a := uuids("--ip", z_b.ip)) == uuids("--ip", z_b.ip) and a,
    )
    to_z_b = uuids("--to-ip", z_b.ip)
    assert to_z_b and both == uuids("--from-ip", z_b.ip) | to_z_b
    assert not to_z_b & uuids("--not", "--to-ip", z_b.ip)


def test_a_bad_filter_exits_2_naming_the_flag(net: Cluster) -> None:
    result = net.cli("observe", "--to-label", "pod in (a", check=False)
    assert result.returncode == 2
    assert result.stderr.startswith("membrane: error: --to-label: ")
    assert len(result.stderr.splitlines()) == 1
