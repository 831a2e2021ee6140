"""A compile that reuses the previous one's results gives exactly the uncached answer."""

from __future__ import annotations

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
