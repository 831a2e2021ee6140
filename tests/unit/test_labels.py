"""Labels, identities and selectors: Cilium's label model."""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Network

import pytest

from membrane.errors import UserError
from membrane.identity import labels as lbl
from membrane.identity.labels import (
    RESERVED_LABELS,
    Label,
    cidr_identity_labels,
    endpoint_labels,
)
from membrane.identity.selector import LabelIndex, LabelSelector, Requirement, split_key


def L(text: str) -> Label:
    return Label.parse(text)


def test_parse_label_forms() -> None:
    assert L("k8s:app=web") == Label("k8s", "app", "web")
    assert L("app=web") == Label("any", "app", "web")
    assert L("reserved:host") == Label("reserved", "host", "")
    assert L("cidr:10.0.0.0/8") == Label("cidr", "10.0.0.0/8", "")
    assert L("k8s:io.kubernetes.pod.namespace=prod").key == "io.kubernetes.pod.namespace"


def test_label_str_round_trips() -> None:
    for text in ("k8s:app=web", "reserved:world", "cidr:10.0.0.0/8", "any:tier=db"):
        assert str(L(text)) == text


def test_label_without_key_is_a_user_error() -> None:
    with pytest.raises(UserError):
        Label.parse("k8s:=x")


def test_reserved_labels() -> None:
    assert RESERVED_LABELS[1] == {L("reserved:host")}
    assert RESERVED_LABELS[2] == {L("reserved:world")}
    assert RESERVED_LABELS[6] == {L("reserved:remote-node")}
    assert RESERVED_LABELS[7] == {L("reserved:kube-apiserver")}
    assert RESERVED_LABELS[9] == {L("reserved:world-ipv4")}
    assert RESERVED_LABELS[10] == {L("reserved:world-ipv6")}
    assert set(RESERVED_LABELS) == {1, 2, 3, 4, 5, 6, 7, 8, 9, 10}


def test_endpoint_labels_follow_cilium() -> None:
    labels = endpoint_labels(
        "prod", {"app": "web"}, {"team": "a"}, cluster="c1", service_account="web-sa"
    )
    assert labels == {
        L("k8s:app=web"),
        L("k8s:io.kubernetes.pod.namespace=prod"),
        L("k8s:io.cilium.k8s.policy.cluster=c1"),
        L("k8s:io.cilium.k8s.policy.serviceaccount=web-sa"),
        L("k8s:io.cilium.k8s.namespace.labels.team=a"),
        L("k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name=prod"),
    }


def test_endpoint_labels_defaults() -> None:
    labels = endpoint_labels("dev", {}, {})
    assert L("k8s:io.cilium.k8s.policy.cluster=default") in labels
    assert not any(x.key == lbl.SERVICE_ACCOUNT_KEY for x in labels)
    assert L("k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name=dev") in labels


def test_cidr_identity_labels_include_every_containing_policy_prefix() -> None:
    prefixes = [IPv4Network(p) for p in ("10.0.0.0/8", "10.1.0.0/16", "192.168.0.0/16")]
    labels = cidr_identity_labels(IPv4Network("10.1.0.0/16"), prefixes)
    world = {L("reserved:world"), L("reserved:world-ipv4")}
    assert labels == {*world, L("cidr:10.0.0.0/8"), L("cidr:10.1.0.0/16")}


def test_cidr_identity_labels_of_an_extra_prefix_and_of_zero() -> None:
    prefixes = [IPv4Network("0.0.0.0/0"), IPv4Network("10.0.0.0/8")]
    labels = cidr_identity_labels(IPv4Network("10.2.3.0/24"), prefixes)
    world = {L("reserved:world"), L("reserved:world-ipv4")}
    assert labels == {*world, L("cidr:10.0.0.0/8"), L("cidr:10.2.3.0/24")}


def test_cidr_identity_labels_of_ipv6_prefixes() -> None:
    prefixes = [IPv6Network("2001:db8::/32"), IPv4Network("10.0.0.0/8")]
    labels = cidr_identity_labels(IPv6Network("2001:db8:5::/48"), prefixes)
    world = {L("reserved:world"), L("reserved:world-ipv6")}
    assert labels == {*world, L("cidr:2001:db8::/32"), L("cidr:2001:db8:5::/48")}


# ---- selectors -----------------------------------------------------------------------------

WEB = endpoint_labels("prod", {"app": "web", "tier": "front"}, {"team": "a"})


def test_split_key() -> None:
    assert split_key("k8s:app") == ("k8s", "app")
    assert split_key("app") == ("any", "app")
    assert split_key("reserved:host") == ("reserved", "host")
    assert split_key("any:app") == ("any", "app")


def test_empty_selector_matches_everything() -> None:
    assert LabelSelector().matches(WEB)
    assert LabelSelector().matches(frozenset())
    assert LabelSelector().matches(RESERVED_LABELS[2])


def test_match_labels_with_and_without_source() -> None:
    assert LabelSelector({"app": "web"}).matches(WEB)
    assert LabelSelector({"k8s:app": "web"}).matches(WEB)
    assert LabelSelector({"any:app": "web"}).matches(WEB)
    assert not LabelSelector({"reserved:app": "web"}).matches(WEB)
    assert not LabelSelector({"app": "db"}).matches(WEB)
    assert not LabelSelector({"app": "web", "tier": "back"}).matches(WEB)


def test_reserved_selector() -> None:
    host = LabelSelector({"reserved:host": ""})
    assert host.matches(RESERVED_LABELS[1])
    assert not host.matches(RESERVED_LABELS[2])
    assert not host.matches(WEB)


@pytest.mark.parametrize(
    ("requirement", "expected"),
    [
        (Requirement("app", "In", ("web", "db")), True),
        (Requirement("app", "In", ("db",)), False),
        (Requirement("app", "NotIn", ("db",)), True),
        (Requirement("app", "NotIn", ("web",)), False),
        (Requirement("missing", "NotIn", ("x",)), True),  # absent key: NotIn holds
        (Requirement("missing", "In", ("x",)), False),
        (Requirement("app", "Exists"), True),
        (Requirement("missing", "Exists"), False),
        (Requirement("missing", "DoesNotExist"), True),
        (Requirement("app", "DoesNotExist"), False),
        (Requirement("k8s:tier", "In", ("front",)), True),
        (Requirement("reserved:tier", "Exists"), False),
    ],
)
def test_match_expressions(requirement: Requirement, expected: bool) -> None:
    assert LabelSelector({}, [requirement]).matches(WEB) is expected


def test_selector_accepts_lists_and_is_hashable() -> None:
    a = LabelSelector({"app": "web"}, [("tier", "In", ["front"])])
    b = LabelSelector({"app": "web"}, [Requirement("tier", "In", ("front",))])
    assert a == b and hash(a) == hash(b)
    assert a.matches(WEB)


def test_mentions() -> None:
    sel = LabelSelector({"k8s:io.kubernetes.pod.namespace": "x"})
    assert sel.mentions("k8s", "io.kubernetes.pod.namespace")
    plain = LabelSelector({}, [Requirement("io.kubernetes.pod.namespace", "Exists")])
    assert plain.mentions("k8s", "io.kubernetes.pod.namespace")
    assert not LabelSelector({"app": "x"}).mentions("k8s", "io.kubernetes.pod.namespace")
    assert LabelSelector({"reserved:host": ""}).mentions_source("reserved")


def test_namespace_labels_are_selectable() -> None:
    sel = LabelSelector({"k8s:io.cilium.k8s.namespace.labels.team": "a"})
    assert sel.matches(WEB)
    assert not sel.matches(endpoint_labels("prod", {"app": "web"}, {"team": "b"}))


def test_label_index_selects_like_matching_every_set() -> None:
    sets = {
        1: RESERVED_LABELS[1],
        2: RESERVED_LABELS[2],
        10: WEB,
        11: endpoint_labels("prod", {"app": "db"}, {"team": "a"}),
        12: endpoint_labels("dev", {"app": "web"}, {}),
    }
    index = LabelIndex(sets)
    selectors = [
        LabelSelector(),
        LabelSelector({"app": "web"}),
        LabelSelector({"k8s:app": "web", "k8s:io.kubernetes.pod.namespace": "dev"}),
        LabelSelector({"reserved:host": ""}),
        LabelSelector({}, [Requirement("app", "NotIn", ("web",))]),
        LabelSelector({}, [Requirement("app", "Exists"), Requirement("tier", "DoesNotExist")]),
        LabelSelector({}, [Requirement("app", "In", ("db", "web"))]),
        LabelSelector({"reserved:app": "web"}),
        LabelSelector({"app": "nothing"}),
    ]
    for selector in selectors:
        expected = {n for n, labels in sets.items() if selector.matches(labels)}
        assert index.select(selector) == expected, selector


def test_batch_cidr_labels_equal_one_by_one() -> None:
    from ipaddress import IPv4Network

    from membrane.identity.labels import cidr_identities_labels, cidr_identity_labels

    prefixes = {
        IPv4Network(p)
        for p in ("198.19.0.0/16", "198.19.2.0/24", "198.19.2.10/32", "198.18.0.0/15", "10.0.0.0/8")
    }
    batch = cidr_identities_labels(prefixes)
    assert batch == {p: cidr_identity_labels(p, prefixes) for p in prefixes}
