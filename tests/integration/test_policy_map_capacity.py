"""The policy map's size (`membrane agent run --policy-map-max`): a change that would not fit
is refused before anything is written (issue 16 item 6), as one line naming the policy (or
the endpoint and the policies selecting it) with the entries needed and the map's size,
exit code 2. Nothing changes: policies, traffic, the pinned policy map and ipcache, the
state; an endpoint add leaves no namespace, veth or record. Once something is deleted the
same change goes through."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from agent_support import cluster_fixture, net_fixture

from membrane import netns
from membrane.agent.endpoints import WARM_PEER
from membrane.agent.state import StateFile
from membrane.datapath.ipcache import read_ipcache
from membrane.datapath.nodemaps import NodeMaps
from membrane.testing.agent import membrane_command
from membrane.testing.cluster import Cluster

pytestmark = pytest.mark.root

SIZE = 300
cluster = cluster_fixture(namespaces=("x",), pod_names=("a", "b"), policy_map_max=SIZE)
net = net_fixture()


def ports_policy(name: str, subject: str, peer: str, ports: list[int]) -> str:
    """x/NAME: pods labelled pod=SUBJECT take TCP on `ports` from pod=PEER (an entry each)."""
    listed = ", ".join(f'{{port: "{p}", protocol: TCP}}' for p in ports)
    return f"""
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {{name: {name}, namespace: x}}
        spec:
          endpointSelector: {{matchLabels: {{pod: {subject}}}}}
          ingress:
          - fromEndpoints: [{{matchLabels: {{pod: {peer}}}}}]
            toPorts: [{{ports: [{listed}]}}]
    """


# ~100 entries, fits; x/b reaches x/a on 80 (not 81, where the echo servers also listen)
A_IN = ports_policy("a-in", "a", "b", [80, *range(1000, 1100)])
# ~250 entries more: does not fit beside A_IN; x/a reaches x/b on 81, not 80
B_IN = ports_policy("b-in", "b", "a", [81, *range(2000, 2250)])
C_IN = ports_policy("c-in", "c", "a", [81, *range(2000, 2250)])  # for an endpoint x/c
PORTS = [(80, "TCP"), (81, "TCP")]

REFUSED = re.compile(
    r"membrane: error: (?P<what>.+): needs (?P<needed>[\d,]+) policy map entries at its "
    rf"peak, the map holds {SIZE:,} \(membrane agent run --policy-map-max\); nothing was "
    r"changed"
)


def refused(result: subprocess.CompletedProcess[str]) -> str:
    """The refusal's subject, after checking it is one line with the numbers, exit 2."""
    assert result.returncode == 2, result
    (line,) = result.stderr.splitlines()
    found = REFUSED.fullmatch(line)
    assert found, line
    assert int(found["needed"].replace(",", "")) > SIZE, line
    return found["what"]


def in_force(net: Cluster) -> dict[str, Any]:
    """Everything a refused change must leave as it was."""
    with NodeMaps.open(str(net.agent.bpf_dir)) as maps:
        assert maps.policy.max_entries == SIZE
        policy = sorted((bytes(k), bytes(v)) for k, v in maps.policy.lookup_batch())
        ipcache = read_ipcache(maps)
    state: Path = net.agent.state_dir
    links = subprocess.run(
        ["ip", "-n", net.agent.node_netns, "-o", "link", "show"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {
        "policies": net.agent.policies(),
        "endpoints": net.agent.endpoints(),
        "recorded endpoints": StateFile(state).load().endpoints,
        "state files": {str(p): p.read_bytes() for p in state.rglob("*") if p.is_file()},
        "policy map": policy,
        "ipcache": ipcache,
        "node links": sorted(
            name
            for name in (line.split(":")[1].strip() for line in links.splitlines())
            # The veth pair the agent makes ahead for its next endpoint comes and goes.
            if not any(WARM_PEER.fullmatch(side) for side in name.split("@"))
        ),
        "pod namespaces": sorted(n for n in netns.names() if n.startswith(net.agent.prefix)),
    }


def test_a_policy_that_does_not_fit_is_refused_and_nothing_changes(net: Cluster) -> None:
    net.import_policy(A_IN)
    under_a_in = net.reach(ports=PORTS).deny("x/b", "x/a", port=81)
    net.check(under_a_in)
    before = in_force(net)

    assert refused(net.import_policy(B_IN, check=False)) == "policy x/b-in"
    assert in_force(net) == before
    net.check(under_a_in)

    net.cli("policy", "delete", "x/a-in")
    net.import_policy(B_IN)
    assert [p["name"] for p in net.agent.policies()] == ["b-in"]
    net.check(net.reach(ports=PORTS).deny("x/a", "x/b", port=80))


def test_an_endpoint_that_does_not_fit_is_refused_and_leaves_nothing(net: Cluster) -> None:
    net.import_policy(C_IN)  # selects no pod yet: no entries
    net.import_policy(A_IN)
    before = in_force(net)

    result = net.cli("endpoint", "add", "x/c", "--label", "pod=c", check=False)
    assert refused(result) == "endpoint x/c (policies selecting it: x/c-in)"
    after = in_force(net)
    del before["state files"], after["state files"]  # the next endpoint id moved on
    assert after == before  # no record, namespace, veth, ipcache or policy entry of x/c
    net.check(net.reach(ports=PORTS).deny("x/b", "x/a", port=81))

    net.cli("policy", "delete", "x/a-in")
    net.add_pod("x", "c", {"pod": "c"})
    reach = net.reach(ports=PORTS, sources=["x/a", "x/b"], destinations=["x/c"])
    net.check(reach.deny(to="x/c").allow("x/a", "x/c", port=81))


def test_a_bad_size_is_one_line_and_a_pinned_map_keeps_its_size(net: Cluster) -> None:
    argv = [arg for arg in net.agent.argv() if arg != membrane_command()]
    for bad, problem in (("lots", "'lots' is not a whole number"), ("0", "0 is not between")):
        result = subprocess.run(
            [membrane_command(), *argv, "--policy-map-max", bad],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 2, result
        (line,) = result.stderr.splitlines()
        assert line.startswith(f"membrane: error: policy-map-max: {problem}"), line

    net.agent.policy_map_max = 2 * SIZE
    try:
        net.agent.restart()
        assert "keeps its 300 entries (asked for 600)" in net.agent.log_tail(200)
        with NodeMaps.open(str(net.agent.bpf_dir)) as maps:
            assert maps.policy.max_entries == SIZE
    finally:
        net.agent.policy_map_max = SIZE
        net.agent.restart()
