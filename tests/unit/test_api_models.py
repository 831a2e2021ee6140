"""Request validation names the field at fault."""

from __future__ import annotations

import pytest

from membrane.api.models import EndpointCreate, NamespaceLabels, TraceRequest, parse_body
from membrane.errors import UserError


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"namespace": "X", "name": "a"}, "namespace", "namespace name"),
        ({"namespace": "x", "name": "a_b"}, "name", "pod name"),
        ({"namespace": "x", "name": "a", "labels": {"bad key!": "v"}}, "labels", "label key"),
        ({"namespace": "x", "name": "a", "labels": {"k": "-bad"}}, "labels", "value"),
        (
            {"namespace": "x", "name": "a", "ports": [{"name": "http", "port": 70000}]},
            "ports.0.port",
            "65535",
        ),
        (
            {"namespace": "x", "name": "a", "ports": [{"name": "h", "port": 1, "protocol": "X"}]},
            "ports.0.protocol",
            "TCP",
        ),
        ({"namespace": "x", "name": "a", "colour": "red"}, "colour", "not permitted"),
        ({"namespace": "x", "name": "a", "container_name": "c"}, "body", "container_id"),
    ],
)
def test_bad_endpoint_requests(body: dict, field: str, words: str) -> None:
    with pytest.raises(UserError) as err:
        parse_body(EndpointCreate, body)
    assert err.value.field == field
    assert words.lower() in err.value.problem.lower()


def test_good_requests() -> None:
    ep = parse_body(
        EndpointCreate,
        {
            "namespace": "x",
            "name": "web-1.a",
            "labels": {"app.kubernetes.io/name": "web", "tier": ""},
            "ports": [{"name": "http", "port": 80}],
        },
    )
    assert ep.ports[0].protocol == "TCP"
    assert parse_body(NamespaceLabels, {"labels": {"team": None}}).labels == {"team": None}
    assert parse_body(TraceRequest, {"src": "x/a", "dst": "y/b", "dport": 80}).protocol == "TCP"


def test_duplicate_port_names() -> None:
    with pytest.raises(UserError, match="twice"):
        parse_body(
            EndpointCreate,
            {
                "namespace": "x",
                "name": "a",
                "ports": [{"name": "h", "port": 1}, {"name": "h", "port": 2}],
            },
        )
