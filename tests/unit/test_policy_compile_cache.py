"""A compile that reuses the previous one's results gives exactly the uncached answer."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from membrane.identity.labels import RESERVED_LABELS, endpoint_labels
from membrane.policy import (
    CompileCache,
    EndpointInfo,
    RuleTable,
    Universe,
    compile_policies,
    parse_documents,
)

POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: {name}, namespace: x}}
spec:
  endpointSelector: {{matchLabels: {{app: {app}}}}}
  ingress:
  - fromEndpoints: [{{matchLabels: {{app: {peer}}}}}]
    toPorts: [{{ports: [{{port: "{port}", protocol: TCP}}]}}]
"""


def _universe(apps: dict[int, str]) -> Universe:
    identities = dict(RESERVED_LABELS)
    endpoints = {}
    for ep_id, app in apps.items():
        labels = endpoint_labels("x", {"app": app}, {"kubernetes.io/metadata.name": "x"})
        identity = 255 + ep_id
        identities[identity] = labels
        endpoints[ep_id] = EndpointInfo(
            ep_id=ep_id,
            namespace="x",
            name=f"p{ep_id}",
            identity=identity,
            labels=labels,
            named_ports={},
        )
    return Universe(identities=identities, endpoints=endpoints, cidr_identities={})


def test_cached_compiles_match_fresh_ones() -> None:
    cache, rules = CompileCache(), RuleTable()
    web = parse_documents(POLICY.format(name="web", app="web", peer="db", port=80))
    db = parse_documents(POLICY.format(name="db", app="db", peer="web", port=5432))
    db2 = parse_documents(POLICY.format(name="db", app="db", peer="web", port=5433))
    steps = [
        (web, _universe({1: "web", 2: "db"})),
        (web + db, _universe({1: "web", 2: "db"})),
        (web + db2, _universe({1: "web", 2: "db"})),  # one policy replaced
        (web + db2, _universe({1: "web", 2: "db", 3: "db"})),  # a new endpoint
        (db2, _universe({1: "web", 2: "db", 3: "db"})),  # a policy removed
    ]
    for policies, universe in steps:
        cached = compile_policies(policies, universe, rules, cache)
        fresh = compile_policies(policies, universe, RuleTable.from_json(rules.to_json()))
        assert cached == fresh


def test_a_replaced_pod_gets_the_same_policy_object_back() -> None:
    """The datapath writer knows a policy object it installed before: a pod deleted and
    added again (a new endpoint id) must not cost a compile of its entries."""
    cache, rules = CompileCache(), RuleTable()
    web = parse_documents(POLICY.format(name="web", app="web", peer="db", port=80))
    first = compile_policies(web, _universe({1: "web", 2: "db"}), rules, cache)[1]
    compile_policies(web, _universe({2: "db"}), rules, cache)  # the pod is gone
    again = compile_policies(web, _universe({2: "db", 3: "web"}), rules, cache)[3]
    assert again is first


EXPRESSIONS = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: expr-{name}, namespace: x}}
spec:
  endpointSelector: {{matchLabels: {{app: {app}}}}}
  ingress:
  - fromEndpoints: [{{matchExpressions: [{{key: app, operator: {op}, values: [{peer}]}}]}}]
  - fromEndpoints: [{{matchExpressions: [{{key: tier, operator: Exists}}]}}]
    toPorts: [{{ports: [{{port: "81", protocol: TCP}}]}}]
  egressDeny:
  - toEndpoints: [{{matchExpressions: [{{key: tier, operator: DoesNotExist}}]}}]
    toPorts: [{{ports: [{{port: "82", protocol: UDP}}]}}]
"""

APPS = ["web", "db", "cache"]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.dictionaries(  # the endpoints of one step: ep_id -> (app, tier or None)
                st.integers(1, 6),
                st.tuples(st.sampled_from(APPS), st.sampled_from([None, "a", "b"])),
                max_size=6,
            ),
            st.lists(st.integers(0, 5), max_size=4, unique=True),  # the policies in force
        ),
        min_size=1,
        max_size=6,
    )
)
def test_cached_compiles_follow_identity_changes(steps: list[Any]) -> None:
    """Identities come, go and change labels between compiles; the cache updates each
    rule's peers from those changes alone, and must still give the fresh answer."""
    pool = [
        parse_documents(POLICY.format(name="web", app="web", peer="db", port=80)),
        parse_documents(POLICY.format(name="db", app="db", peer="web", port=5432)),
        parse_documents(POLICY.format(name="c", app="cache", peer="cache", port=6379)),
        parse_documents(EXPRESSIONS.format(name="in", app="web", op="In", peer="cache")),
        parse_documents(EXPRESSIONS.format(name="notin", app="db", op="NotIn", peer="web")),
        parse_documents(EXPRESSIONS.format(name="c", app="cache", op="NotIn", peer="db")),
    ]
    cache, rules = CompileCache(), RuleTable()
    for endpoints, chosen in steps:
        policies = [p for i in chosen for p in pool[i]]
        universe = _labelled_universe(endpoints)
        cached = compile_policies(policies, universe, rules, cache)
        fresh = compile_policies(policies, universe, RuleTable.from_json(rules.to_json()))
        assert cached == fresh


def _labelled_universe(endpoints: dict[int, tuple[str, str | None]]) -> Universe:
    """Identities numbered by label set (as the agent's allocator does), so an endpoint
    changing labels moves to another identity and a label set leaving frees its number."""
    identities = dict(RESERVED_LABELS)
    infos = {}
    for ep_id, (app, tier) in sorted(endpoints.items()):
        pod = {"app": app, **({"tier": tier} if tier else {})}
        labels = endpoint_labels("x", pod, {"kubernetes.io/metadata.name": "x"})
        identity = 256 + APPS.index(app) * 3 + [None, "a", "b"].index(tier)
        identities[identity] = labels
        infos[ep_id] = EndpointInfo(ep_id, "x", f"p{ep_id}", identity, labels, {})
    return Universe(identities=identities, endpoints=infos, cidr_identities={})
