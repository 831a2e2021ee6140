"""Readers see whole states: while the agent's worker runs a stream of changes (endpoints
added and deleted, namespaces relabelled, policies imported and deleted), several threads
read the published snapshot as the API, the flow reader and `policy trace` do, and check
that every read is one consistent state: every endpoint is findable by id, key and address;
its identity has labels, and those labels are the endpoint's own and its namespace's as the
same snapshot shows them; its compiled policy exists and names only known rules; the policy
revision never goes back. The agent is the real one, in process, on its own node namespace.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from membrane.agent.agent import Agent
from membrane.agent.config import AgentConfig, make_config
from membrane.agent.explain import trace
from membrane.agent.flows import AgentResolver
from membrane.agent.reset import reset_node
from membrane.agent.snapshot import Snapshot
from membrane.api import views
from membrane.api.models import EndpointCreate, NamespaceLabels, TraceRequest
from membrane.bpf.probe import supports

pytestmark = pytest.mark.root

NS_LABEL_PREFIX = "k8s:io.cilium.k8s.namespace.labels."
READERS = 4
POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: p{n}, namespace: snap}}
spec:
  endpointSelector: {{matchLabels: {{app: web}}}}
  ingress:
  - fromEndpoints: [{{matchLabels: {{tier: t{n}}}}}]
    toPorts: [{{ports: [{{port: "80", protocol: TCP}}]}}]
  egressDeny:
  - toCIDR: [198.19.{n}.0/24]
"""


@pytest.fixture
def agent() -> Iterator[Agent]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    tag = f"mbsnap{os.getpid()}"
    workdir = Path(tempfile.mkdtemp(prefix="membrane-snap-"))
    config: AgentConfig = make_config(
        state_dir=str(workdir / "state"),
        api_socket=str(workdir / "api.sock"),
        node_netns=tag,
        pod_cidr="198.18.0.0/16",
        netns_prefix=f"{tag}-",
    )
    started: Agent | None = None
    try:
        started = Agent.start(config)
        yield started
    finally:
        if started is not None:
            started.stop()
        reset_node(config)
        shutil.rmtree(workdir, ignore_errors=True)


def check_consistent(s: Snapshot) -> None:
    addresses = sum(1 + (ep.ipv6 is not None) for ep in s.endpoints.values())
    assert len(s.endpoints) == len(s.endpoints_by_key)
    assert addresses == len(s.endpoints_by_ip)
    assert len(s.stored_policies) == len(s.policies)
    for ep_id, ep in s.endpoints.items():
        assert ep.id == ep_id
        assert s.endpoints_by_key[ep.key] is ep
        assert s.endpoints_by_ip[ep.ipv4] is ep
        assert ep.ipv6 is None or s.endpoints_by_ip[ep.ipv6] is ep
        assert s.universe.endpoints[ep_id].identity == ep.identity
        labels = {str(lb) for lb in s.identity_labels[ep.identity]}
        assert {f"k8s:{k}={v}" for k, v in ep.labels.items()} <= labels
        ns_labels = {lb for lb in labels if lb.startswith(NS_LABEL_PREFIX)}
        shown = {f"{NS_LABEL_PREFIX}{k}={v}" for k, v in s.namespaces[ep.namespace].items()}
        assert ns_labels == shown, f"{ep.key}: identity {ns_labels} vs namespace {shown}"
        policy = s.compiled[ep_id]
        assert all(e.rule_id in s.rules for e in policy.entries)
    # what the API and the flow reader build from it
    views.endpoints_view(s)
    views.namespaces_view(s)
    views.identities_view(s)
    views.policies_view(s, {})
    resolver = AgentResolver(s)
    for ep in s.endpoints.values():
        view = resolver.endpoint_by_ip(ep.ipv4)
        assert view is not None and view.identity == ep.identity
    for rule_id in s.rule_shapes:
        assert resolver.rule(rule_id) is not None


def reader(agent: Agent, stop: threading.Event, failures: list[str], reads: list[int]) -> None:
    revision, count = -1, 0
    while not stop.is_set():
        snapshot = agent.snapshot  # one read, then only this object
        try:
            assert snapshot.policy_revision >= revision, "the policy revision went back"
            revision = snapshot.policy_revision
            check_consistent(snapshot)
            web = snapshot.endpoint("snap", "web0")
            if web is not None:
                trace(snapshot, TraceRequest(src="snap/client0", dst="snap/web0", dport=80))
        except AssertionError as err:
            failures.append(f"read {count}: {err}")
            return
        except Exception as err:  # any other failure is an inconsistency too
            if "snap/client0 does not exist" not in str(err):
                failures.append(f"read {count}: {type(err).__name__}: {err}")
                return
        count += 1
    reads.append(count)


def test_every_read_sees_one_whole_state_during_a_stream_of_changes(agent: Agent) -> None:
    stop = threading.Event()
    failures: list[str] = []
    reads: list[int] = []
    threads = [
        threading.Thread(target=reader, args=(agent, stop, failures, reads), daemon=True)
        for _ in range(READERS)
    ]
    for t in threads:
        t.start()
    try:
        for round_ in range(6):
            agent.add_endpoint(
                EndpointCreate(namespace="snap", name=f"web{round_}", labels={"app": "web"})
            )
            agent.add_endpoint(
                EndpointCreate(
                    namespace="snap", name=f"client{round_}", labels={"tier": f"t{round_ % 3}"}
                )
            )
            agent.label_namespace("snap", NamespaceLabels(labels={"round": str(round_)}))
            agent.import_policies(POLICY.format(n=round_ % 3))
            if round_ % 2:
                agent.delete_endpoint("snap", f"client{round_ - 1}")
                agent.delete_policies("snap", f"p{round_ % 3}", None, False)
            agent.label_namespace("other", NamespaceLabels(labels={"r": str(round_)}))
            assert not failures, failures
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert not failures, failures[:3]
    assert len(reads) == READERS and min(reads) > 0
    final = agent.snapshot
    check_consistent(final)
    # How the programs are attached is recorded and shown, as the kernel allows it.
    expected_mode = "tcx" if supports("tcx") else "clsact"
    assert {ep.attach_mode for ep in final.endpoints.values()} == {expected_mode}
    assert views.endpoints_view(final)["endpoints"][0]["attach_mode"] == expected_mode
    assert final.namespaces["snap"]["round"] == "5"
    assert {ep.name for ep in final.endpoints.values()} >= {"web5", "client5"}
