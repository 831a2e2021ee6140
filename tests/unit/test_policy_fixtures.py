"""The example policies of the Cilium policy-language pages and the Kubernetes
NetworkPolicy docs (tests/unit/policies/, written from their documented semantics): every
one the README lists as supported imports — parsed, flattened in both CIDR match modes and
compiled on a dual-stack node — and the ones refused by design fail with their one line.

Each file says what to expect in its header comments:
`# expect: ok`, `# expect: warning <text>` (one per warning; there must be no others), or
`# expect: error <field>: <problem>` (the start of the error line)."""

from __future__ import annotations

from pathlib import Path

import pytest
from policy_support import Pod, build_node

from membrane.errors import UserError
from membrane.policy import RuleTable, compile_policies, parse_documents
from membrane.policy.rules import address_prefixes, policy_subjects

FIXTURES = Path(__file__).parent / "policies"
PODS = [
    Pod("default", "db", {"role": "db"}, ("198.18.0.2", "2001:db8:1::2"), {"metrics": (9100, 6)}),
    Pod("default", "web", {"app": "web", "role": "frontend"}, ("198.18.0.3", "2001:db8:1::3")),
    Pod("kube-system", "dns", {"k8s-app": "kube-dns"}, ("198.18.0.4", "2001:db8:1::4")),
]


def expectations(path: Path) -> list[tuple[str, str]]:
    found = []
    for line in path.read_text().splitlines():
        if line.startswith("# expect: "):
            kind, _, text = line.removeprefix("# expect: ").partition(" ")
            found.append((kind, text))
    assert found, f"{path.name} says nothing about what to expect"
    return found


@pytest.mark.parametrize("path", sorted(FIXTURES.glob("*.yaml")), ids=lambda p: p.stem)
def test_documented_examples(path: Path) -> None:
    expected = expectations(path)
    kinds = {kind for kind, _ in expected}
    text = path.read_text()
    if kinds == {"error"}:
        ((_, line),) = expected
        with pytest.raises(UserError) as caught:
            parse_documents(text)
        assert str(caught.value).startswith(line), str(caught.value)
        assert "\n" not in str(caught.value)
        return
    policies = parse_documents(text)
    assert policies
    warnings = [w for p in policies for w in p.warnings]
    wanted = [text for kind, text in expected if kind == "warning"]
    assert len(warnings) == len(wanted), warnings
    for want in wanted:
        assert any(want in w for w in warnings), (want, warnings)
    assert all(w.startswith("document ") and "\n" not in w for w in warnings)
    for mode in ("world", "all"):
        for policy in policies:
            assert policy_subjects(policy, mode)
        address_prefixes(policies, mode)
        node = build_node(
            PODS,
            {"default": {}, "kube-system": {}},
            policies,
            dual_stack=True,
            cidr_match_mode=mode,
        )
        compiled = compile_policies(policies, node.universe, RuleTable())
        assert set(compiled) == set(node.universe.endpoints)


def test_the_fixtures_cover_both_outcomes() -> None:
    kinds = {kind for path in FIXTURES.glob("*.yaml") for kind, _ in expectations(path)}
    assert kinds == {"ok", "warning", "error"}
