"""TracingPolicy documents as users write them: accepted, or refused with one line naming
the field path (no kernel needed: what the document alone says)."""

from __future__ import annotations

import textwrap

import pytest

from membrane.errors import UserError
from membrane.security.policy.parse import parse_policies

GOOD = textwrap.dedent(
    """\
    apiVersion: cilium.io/v1alpha1
    kind: TracingPolicy
    metadata:
      name: shadow
    spec:
      tracepoints:
      - subsystem: syscalls
        event: sys_enter_openat
        args:
        - index: 6
          type: string
        selectors:
        - matchArgs:
          - index: 6
            operator: Equal
            values: ["/etc/shadow"]
          matchBinaries:
          - operator: NotIn
            values: ["/usr/bin/head"]
          matchActions:
          - action: Sigkill
    """
)


def test_a_policy_as_tetragon_documents_it_parses() -> None:
    [(policy, document)] = parse_policies(GOOD)
    assert policy.key == "shadow"
    assert document["spec"]["tracepoints"][0]["event"] == "sys_enter_openat"
    selector = policy.spec.tracepoints[0].selectors[0]
    assert selector.matchArgs[0].values == ["/etc/shadow"]
    assert selector.matchActions[0].action == "Sigkill"


def test_namespaced_policies_are_keyed_by_namespace() -> None:
    text = GOOD.replace("kind: TracingPolicy", "kind: TracingPolicyNamespaced").replace(
        "  name: shadow", "  name: shadow\n  namespace: shop"
    )
    [(policy, _)] = parse_policies(text)
    assert policy.key == "shop/shadow"


# (what is changed in GOOD, the field path named, words of the problem)
BAD = [
    (("operator: Equal", "operator: Equals"),
     "document 1: spec.tracepoints[0].selectors[0].matchArgs[0].operator", "is not one of"),
    (("action: Sigkill", "action: Sigkil"),
     "document 1: spec.tracepoints[0].selectors[0].matchActions[0].action", "is not one of"),
    (("action: Sigkill", "action: Signal"),
     "document 1: spec.tracepoints[0].selectors[0].matchActions[0]", "needs argSig"),
    (("action: Sigkill", "action: Post\n        argSig: 9"),
     "document 1: spec.tracepoints[0].selectors[0].matchActions[0]", "argSig belongs to"),
    (("matchBinaries", "matchParentBinaries"),
     "document 1: spec.tracepoints[0].selectors[0]", "matchParentBinaries is not supported"),
    (("  - subsystem: syscalls", "  - subsys: syscalls"),
     "document 1: spec.tracepoints[0].subsys", "unknown field"),
    (("operator: NotIn", "operator: Prefixes"),
     "document 1: spec.tracepoints[0].selectors[0].matchBinaries[0].operator", "is not one of"),
    (("kind: TracingPolicy", "kind: TracingPolicies"), "document 1: kind", "is not one of"),
    (("cilium.io/v1alpha1", "cilium.io/v2"), "document 1: apiVersion", "cilium.io/v1alpha1"),
    (("  name: shadow", "  name: Shadow!"), "document 1: metadata.name", "pattern"),
    (("  name: shadow", "  name: shadow\n  namespace: shop"),
     "document 1", "a TracingPolicy is clusterwide"),
    (("    - index: 6\n      type: string", "    - index: -1"),
     "document 1: spec.tracepoints[0].args[0].index", "greater than or equal to 0"),
    (("  tracepoints:", "  lsmhooks: []\n  tracepoints:"),
     "document 1: spec", "lsmhooks is not supported"),
]  # fmt: skip


@pytest.mark.parametrize(("change", "field", "words"), BAD, ids=[b[1] + " " + b[2] for b in BAD])
def test_a_bad_document_names_the_field(change: tuple[str, str], field: str, words: str) -> None:
    old, new = change
    assert old in GOOD
    with pytest.raises(UserError) as err:
        parse_policies(GOOD.replace(old, new, 1))
    assert err.value.field == field
    assert words in err.value.problem


def test_too_many_selectors_are_refused() -> None:
    selector = GOOD.split("    selectors:\n")[1]
    text = GOOD + "".join(selector for _ in range(5))
    with pytest.raises(UserError) as err:
        parse_policies(text)
    assert err.value.field == "document 1: spec.tracepoints[0].selectors"
    assert "at most 5" in err.value.problem


def test_a_policy_with_no_hook_is_refused() -> None:
    with pytest.raises(UserError) as err:
        parse_policies(GOOD.split("  tracepoints:")[0] + "  podSelector: {}\n")
    assert err.value.field == "document 1: spec"


def test_the_same_policy_twice_is_refused() -> None:
    with pytest.raises(UserError) as err:
        parse_policies(GOOD + "---\n" + GOOD)
    assert err.value.field == "document 2: metadata.name"


def test_invalid_yaml_names_the_line() -> None:
    with pytest.raises(UserError) as err:
        parse_policies("kind: [")
    assert err.value.field == "file"
    assert "line" in err.value.problem
