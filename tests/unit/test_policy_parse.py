"""Parsing policy documents: what users copy from the docs works, every mistake is one
UserError naming the document, the field path and the problem."""

from __future__ import annotations

from ipaddress import IPv4Network

import pytest

from membrane.errors import UserError
from membrane.policy import parse_documents, policy_cidrs
from membrane.policy.model import KIND_CCNP, KIND_CNP, KIND_K8S

K8S = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p}\n"
CNP = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\n"
CCNP = "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: p}\n"
ALL = CNP + "spec: {endpointSelector: {}, "  # then the rest of the spec and "}"

# The NetworkPolicy example of the Kubernetes documentation, as users copy it.
K8S_DOCS_EXAMPLE = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: test-network-policy
  namespace: default
spec:
  podSelector:
    matchLabels:
      role: db
  policyTypes:
  - Ingress
  - Egress
  ingress:
  - from:
    - ipBlock:
        cidr: 172.17.0.0/16
        except:
        - 172.17.1.0/24
    - namespaceSelector:
        matchLabels:
          project: myproject
    - podSelector:
        matchLabels:
          role: frontend
    ports:
    - protocol: TCP
      port: 6379
  egress:
  - to:
    - ipBlock:
        cidr: 10.0.0.0/24
    ports:
    - protocol: TCP
      port: 5978
"""

CILIUM_DOCS_EXAMPLES = """
apiVersion: "cilium.io/v2"
kind: CiliumNetworkPolicy
metadata:
  name: "l3-rule"
spec:
  endpointSelector:
    matchLabels:
      role: backend
  ingress:
  - fromEndpoints:
    - matchLabels:
        role: frontend
---
apiVersion: "cilium.io/v2"
kind: CiliumNetworkPolicy
metadata:
  name: "l4-rule"
spec:
  endpointSelector:
    matchLabels:
      app: myService
  egress:
    - toPorts:
      - ports:
        - port: "80"
          protocol: TCP
---
apiVersion: "cilium.io/v2"
kind: CiliumClusterwideNetworkPolicy
metadata:
  name: "external-lockdown"
spec:
  endpointSelector: {}
  ingressDeny:
  - fromEntities:
    - "world"
  ingress:
  - fromEntities:
    - "all"
---
apiVersion: "cilium.io/v2"
kind: CiliumNetworkPolicy
metadata:
  name: "cidr-rule"
spec:
  endpointSelector:
    matchLabels:
      app: myService
  egress:
  - toCIDR:
    - 20.1.1.1/32
  - toCIDRSet:
    - cidr: 10.0.0.0/8
      except:
      - 10.96.0.0/12
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: icmp-rule
spec:
  endpointSelector:
    matchLabels:
      app: myService
  egress:
  - icmps:
    - fields:
      - type: 8
        family: IPv4
      - type: EchoReply
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: default-allow
  namespace: prod
spec:
  endpointSelector: {}
  enableDefaultDeny:
    egress: false
    ingress: false
  egress:
  - toEntities: [cluster]
"""


def parse_one(text: str):
    (policy,) = parse_documents(text)
    return policy


def error_of(text: str) -> UserError:
    with pytest.raises(UserError) as info:
        parse_documents(text)
    return info.value


# ---- documents that parse -----------------------------------------------------------------


def test_kubernetes_docs_example() -> None:
    policy = parse_one(K8S_DOCS_EXAMPLE)
    assert (policy.kind, policy.namespace, policy.name) == (
        KIND_K8S,
        "default",
        "test-network-policy",
    )
    spec = policy.k8s_spec
    assert spec.effective_types() == {"Ingress", "Egress"}
    block = spec.ingress[0].peers[0].ip_block
    assert block.cidr == IPv4Network("172.17.0.0/16")
    assert block.except_ == [IPv4Network("172.17.1.0/24")]
    assert spec.ingress[0].ports[0].port == 6379
    assert policy_cidrs([policy]) == {
        IPv4Network("172.17.0.0/16"),
        IPv4Network("172.17.1.0/24"),
        IPv4Network("10.0.0.0/24"),
    }


def test_cilium_docs_examples() -> None:
    policies = parse_documents(CILIUM_DOCS_EXAMPLES)
    assert [p.name for p in policies] == [
        "l3-rule",
        "l4-rule",
        "external-lockdown",
        "cidr-rule",
        "icmp-rule",
        "default-allow",
    ]
    assert policies[0].namespace == "default"
    assert policies[2].kind == KIND_CCNP and policies[2].namespace is None
    assert policies[1].cilium_specs[0][1].egress[0].to_ports[0].ports[0].port == 80
    icmp = policies[4].cilium_specs[0][1].egress[0].icmps[0].fields
    assert [f.icmp_type for f in icmp] == [8, 0]
    assert not policies[5].cilium_specs[0][1].default_deny("egress")
    assert IPv4Network("10.96.0.0/12") in policy_cidrs(policies)


def test_specs_list_keeps_indexes() -> None:
    policy = parse_one(CNP + "specs:\n- endpointSelector: {}\n- endpointSelector: {}\n")
    assert [i for i, _ in policy.cilium_specs] == [0, 1]
    both = parse_one(CNP + "spec: {endpointSelector: {}}\nspecs: [{endpointSelector: {}}]\n")
    assert [i for i, _ in both.cilium_specs] == [None, 0]


def test_empty_documents_are_skipped_and_metadata_extras_ignored() -> None:
    text = (
        "---\n---\n"
        + K8S.replace("{name: p}", "{name: p, labels: {a: b}, annotations: {x: y}, uid: '1'}")
        + "spec: {podSelector: {}}\nstatus: {}\n---\n"
    )
    assert [p.name for p in parse_documents(text)] == ["p"]
    assert parse_documents("") == []


def test_cidr_host_bits_are_cleared_and_bare_addresses_are_slash_32() -> None:
    policy = parse_one(ALL + "egress: [{toCIDR: [10.1.2.3/8, 1.2.3.4]}]}")
    assert policy.cilium_specs[0][1].egress[0].to_cidr == [
        IPv4Network("10.0.0.0/8"),
        IPv4Network("1.2.3.4/32"),
    ]


def test_zero_prefix_needs_no_cidr_identity() -> None:
    policy = parse_one(ALL + "egress: [{toCIDR: [0.0.0.0/0]}]}")
    assert policy_cidrs([policy]) == set()


def test_same_name_in_other_namespace_or_kind_is_fine() -> None:
    text = (
        K8S
        + "spec: {}\n---\n"
        + K8S.replace("{name: p}", "{name: p, namespace: other}")
        + "spec: {}\n---\n"
        + CNP
        + "spec: {endpointSelector: {}}\n"
    )
    assert [(p.kind, p.namespace) for p in parse_documents(text)] == [
        (KIND_K8S, "default"),
        (KIND_K8S, "other"),
        (KIND_CNP, "default"),
    ]


def test_port_forms() -> None:
    policy = parse_one(
        K8S + "spec:\n  ingress:\n  - ports: [{port: http}, {port: '8080'}, {protocol: UDP}]\n"
    )
    assert [p.port for p in policy.k8s_spec.ingress[0].ports] == ["http", 8080, None]
    cilium = parse_one(
        ALL + "ingress: [{toPorts: [{ports: [{port: '0'}, {port: 53, protocol: ANY}]}]}]}"
    )
    assert [p.port for p in cilium.cilium_specs[0][1].ingress[0].to_ports[0].ports] == [0, 53]


# ---- documents that do not ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "field", "problem"),
    [
        (
            K8S + "spec: {ingress: [{from: [{podSelector: {}}, {ipBlock: {cidr: 10.0.0.300/8}}]}]}",
            "document 1: spec.ingress[0].from[1].ipBlock.cidr",
            "not a valid CIDR",
        ),
        (
            K8S
            + "spec: {ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, except: [11.0.0.0/16]}}]}]}",
            "document 1: spec.ingress[0].from[0].ipBlock.except",
            "11.0.0.0/16 is not inside cidr 10.0.0.0/8",
        ),
        (
            K8S
            + "spec: {ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.0.0.0/8]}}]}]}",
            "document 1: spec.ingress[0].from[0].ipBlock.except",
            "not inside",
        ),
        (
            K8S + "spec: {egress: [{to: [{}]}]}",
            "document 1: spec.egress[0].to[0]",
            "needs podSelector, namespaceSelector or ipBlock",
        ),
        (
            K8S + "spec: {egress: [{to: [{podSelector: {}, ipBlock: {cidr: 1.0.0.0/8}}]}]}",
            "document 1: spec.egress[0].to[0]",
            "cannot be combined",
        ),
        (
            K8S + "spec: {podSelector: {matchExpressions: [{key: app, operator: Equals, "
            "values: [a]}]}}",
            "document 1: spec.podSelector.matchExpressions[0].operator",
            "unknown operator 'Equals'",
        ),
        (
            K8S + "spec: {podSelector: {matchExpressions: [{key: app, operator: NotIn}]}}",
            "document 1: spec.podSelector.matchExpressions[0].values",
            "at least one value",
        ),
        (
            K8S + "spec: {podSelector: {matchExpressions: [{key: app, operator: DoesNotExist, "
            "values: [x]}]}}",
            "document 1: spec.podSelector.matchExpressions[0].values",
            "must be empty",
        ),
        (
            K8S + "spec: {podSelector: {matchLabels: {'app name': web}}}",
            "document 1: spec.podSelector.matchLabels",
            "'app name' is invalid",
        ),
        (
            K8S + "spec: {podSelector: {matchLabels: {app: 'web server'}}}",
            "document 1: spec.podSelector.matchLabels",
            "label value 'web server' is invalid",
        ),
        (
            K8S + "spec: {podSelector: {matchLabels: {k8s:app: web}}}",
            "document 1: spec.podSelector.matchLabels",
            "is invalid",
        ),
        (
            K8S + "spec: {podSelector: {matchLabels: {version: 2}}}",
            "document 1: spec.podSelector.matchLabels.version",
            "must be a string (quote the value)",
        ),
        (
            K8S + "spec: {ingress: [{ports: [{port: 0}]}]}",
            "document 1: spec.ingress[0].ports[0].port",
            "out of range (1..65535)",
        ),
        (
            K8S + "spec: {ingress: [{ports: [{port: 65536}]}]}",
            "document 1: spec.ingress[0].ports[0].port",
            "out of range",
        ),
        (
            K8S + "spec: {ingress: [{ports: [{port: 100, endPort: 99}]}]}",
            "document 1: spec.ingress[0].ports[0].endPort",
            "below port 100",
        ),
        (
            K8S + "spec: {ingress: [{ports: [{port: web, endPort: 99}]}]}",
            "document 1: spec.ingress[0].ports[0].endPort",
            "named port",
        ),
        (
            K8S + "spec: {ingress: [{ports: [{endPort: 99}]}]}",
            "document 1: spec.ingress[0].ports[0].endPort",
            "needs a port",
        ),
        (
            K8S + "spec: {ingress: [{ports: [{port: Not_A_Name}]}]}",
            "document 1: spec.ingress[0].ports[0].port",
            "neither a port number nor a valid port name",
        ),
        (
            K8S + "spec: {ingress: [{ports: [{port: 80, protocol: ANY}]}]}",
            "document 1: spec.ingress[0].ports[0].protocol",
            "unknown protocol 'ANY'",
        ),
        (
            K8S + "spec: {ingress: [{ports: [{port: 80, protocol: tcp}]}]}",
            "document 1: spec.ingress[0].ports[0].protocol",
            "unknown protocol 'tcp'",
        ),
        (
            K8S + "spec: {policyTypes: [ingress]}",
            "document 1: spec.policyTypes[0]",
            "unknown policy type",
        ),
        (K8S + "spec: {ingres: []}", "document 1: spec.ingres", "unknown field"),
        (
            K8S + "spec: {ingress: [{from: [{podSelector: {matchLabel: {a: b}}}]}]}",
            "document 1: spec.ingress[0].from[0].podSelector.matchLabel",
            "unknown field",
        ),
        (K8S + "spec: {ingress: {}}", "document 1: spec.ingress", "must be a list"),
        (K8S + "spec: {podSelector: []}", "document 1: spec.podSelector", "must be a mapping"),
        (K8S + "spec:\n", "document 1: spec", "is required"),
        (K8S + "specs: []\n", "document 1: specs", "unknown field"),
        (
            ALL + "ingress: [{toPorts: [{ports: [{port: '80'}], "
            "rules: {http: [{method: GET}]}}]}]}",
            "document 1: spec.ingress[0].toPorts[0].rules",
            "L7 rules are not enforced by Membrane",
        ),
        (
            ALL + "egressDeny: [{toServices: [{k8sService: {serviceName: a}}]}]}",
            "document 1: spec.egressDeny[0].toServices",
            "a deny rule cannot ignore it",
        ),
        (
            ALL + "egressDeny: [{toFQDNs: [{matchName: example.com}]}]}",
            "document 1: spec.egressDeny[0].toFQDNs",
            "does not resolve DNS names",
        ),
        (
            ALL + "ingressDeny: [{fromNodes: [{}]}]}",
            "document 1: spec.ingressDeny[0].fromNodes",
            "a deny rule cannot ignore it",
        ),
        (
            ALL + "ingress: [{fromRequires: [{}]}]}",
            "document 1: spec.ingress[0].fromRequires",
            "deprecated and no longer accepted by Cilium",
        ),
        (
            ALL + "ingress: [{authentication: {mode: required}}]}",
            "document 1: spec.ingress[0].authentication.mode",
            "mutual authentication (required) is not enforced",
        ),
        (
            CNP + "spec: {nodeSelector: {}, ingress: [{}]}",
            "document 1: spec.nodeSelector",
            "host policies (nodeSelector) are not enforced",
        ),
        (
            ALL + "egressDeny: [{toCIDRSet: [{cidrGroupRef: x}]}]}",
            "document 1: spec.egressDeny[0].toCIDRSet[0].cidrGroupRef",
            "CiliumCIDRGroups are not available in Membrane: a deny rule cannot ignore it",
        ),
        (
            ALL + "egress: [{toCIDRSet: [{cidrGroupRef: x, cidr: 10.0.0.0/8}]}]}",
            "document 1: spec.egress[0].toCIDRSet[0]",
            "needs exactly one of cidr, cidrGroupRef and cidrGroupSelector",
        ),
        (CNP + "spec: {ingress: [{}]}", "document 1: spec.endpointSelector", "is required"),
        (CNP + "metadata2: {}\n", "document 1: metadata2", "unknown field"),
        (CNP, "document 1: spec", "is required (or specs)"),
        (
            CNP + "specs: [{endpointSelector: {}}, "
            "{endpointSelector: {}, egress: [{toPorts: [{ports: [{port: 99999}]}]}]}]",
            "document 1: specs[1].egress[0].toPorts[0].ports[0].port",
            "out of range (0..65535)",
        ),
        (
            ALL + "egress: [{toPorts: [{ports: [{port: '80', protocol: ICMP}]}]}]}",
            "document 1: spec.egress[0].toPorts[0].ports[0].protocol",
            "unknown protocol 'ICMP'",
        ),
        (
            ALL + "egress: [{icmps: [{fields: [{type: 256}]}]}]}",
            "document 1: spec.egress[0].icmps[0].fields[0].type",
            "out of range (0..255)",
        ),
        (
            ALL + "egress: [{icmps: [{fields: [{type: 128, family: IPv5}]}]}]}",
            "document 1: spec.egress[0].icmps[0].fields[0].family",
            "unknown family 'IPv5' (use IPv4 or IPv6)",
        ),
        (
            ALL + "egress: [{icmps: [{fields: [{type: Bogus}]}]}]}",
            "document 1: spec.egress[0].icmps[0].fields[0].type",
            "not an IPv4 ICMP type",
        ),
        (
            ALL + "egress: [{icmps: [{fields: [{type: NeighborSolicitation}]}]}]}",
            "document 1: spec.egress[0].icmps[0].fields[0].type",
            "'NeighborSolicitation' is not an IPv4 ICMP type",
        ),
        (
            ALL + "egress: [{toEntities: [everything]}]}",
            "document 1: spec.egress[0].toEntities[0]",
            "unknown entity 'everything'",
        ),
        (
            ALL + "egress: [{toCIDRSet: [{cidr: 10.0.0.0/8, except: ['2001:db8::/64']}]}]}",
            "document 1: spec.egress[0].toCIDRSet[0].except",
            "2001:db8::/64 is not of the same family as cidr 10.0.0.0/8",
        ),
        (
            ALL + "egress: [{toCIDR: ['10.0.0.0/33']}]}",
            "document 1: spec.egress[0].toCIDR[0]",
            "not a valid CIDR",
        ),
        (
            ALL + "egress: [{toCIDR: ['fe80::1%eth0']}]}",
            "document 1: spec.egress[0].toCIDR[0]",
            "not a valid CIDR",
        ),
        (
            ALL + "egress: [{toEndpoints: [{matchLabels: {'cidr:nonsense': ''}}]}]}",
            "document 1: spec.egress[0].toEndpoints[0].matchLabels",
            "label key 'cidr:nonsense' is invalid: a cidr: key is a prefix",
        ),
        (
            ALL + "ingress: [{authentication: {mode: maybe}}]}",
            "document 1: spec.ingress[0].authentication.mode",
            "unknown mode 'maybe'",
        ),
        (
            ALL + "egress: [{toCIDRSet: [{}]}]}",
            "document 1: spec.egress[0].toCIDRSet[0]",
            "needs exactly one of cidr, cidrGroupRef and cidrGroupSelector",
        ),
        (
            CNP + "spec: {endpointSelector: {matchLabels: {'pod:app': x}}}",
            "document 1: spec.endpointSelector.matchLabels",
            "unknown source 'pod'",
        ),
        (
            ALL + "enableDefaultDeny: {ingress: 'no'}}",
            "document 1: spec.enableDefaultDeny.ingress",
            "must be true or false",
        ),
        (
            CCNP.replace("{name: p}", "{name: p, namespace: x}") + "spec: {endpointSelector: {}}",
            "document 1: metadata.namespace",
            "clusterwide policy has no namespace",
        ),
        (
            K8S.replace("{name: p}", "{name: My_Policy}") + "spec: {}",
            "document 1: metadata.name",
            "not a valid name",
        ),
        (
            K8S.replace("{name: p}", "{name: p, namespace: Prod}") + "spec: {}",
            "document 1: metadata.namespace",
            "not a valid namespace name",
        ),
        (
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nspec: {}\n",
            "document 1: metadata",
            "is required",
        ),
        ("kind: NetworkPolicy\n", "document 1: apiVersion", "is required"),
        ("apiVersion: v1\nkind: Pod\n", "document 1: kind", "'Pod' is not a policy kind"),
        (
            "apiVersion: cilium.io/v2\nkind: NetworkPolicy\n",
            "document 1: apiVersion",
            "NetworkPolicy needs apiVersion networking.k8s.io/v1",
        ),
        ("- a\n- b\n", "document 1", "must be a mapping"),
        (
            K8S + "spec: {}\n---\n" + K8S + "spec: {}\n",
            "document 2: metadata.name",
            "NetworkPolicy default/p is defined twice (also in document 1)",
        ),
        (
            K8S + "spec: {}\n---\n\n---\nfoo: bar: baz\n",
            "document 3",
            "invalid YAML at line 8, column 9: mapping values are not allowed",
        ),
    ],
)
def test_errors_name_the_field(text: str, field: str, problem: str) -> None:
    err = error_of(text)
    assert err.field == field
    assert problem in err.problem
    assert "\n" not in str(err)


def test_second_document_errors_are_numbered() -> None:
    err = error_of(K8S + "spec: {}\n---\n" + ALL + "ingress: [{fromCIDR: [x]}]}")
    assert err.field == "document 2: spec.ingress[0].fromCIDR[0]"
