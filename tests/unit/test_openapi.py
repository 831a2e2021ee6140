"""Every route the agent serves is in its OpenAPI document, and nothing else is."""

from __future__ import annotations

import re
from pathlib import Path

from membrane.agent.config import make_config
from membrane.agent.server import AgentServer
from membrane.api.openapi import openapi_document


def test_routes_and_document_agree(tmp_path: Path) -> None:
    config = make_config(str(tmp_path), str(tmp_path / "sock"), "unused-node", "198.18.0.0/16")
    app = AgentServer(config).app()
    served = {
        (route.method.lower(), re.sub(r"\{(\w+)\}", r"{\1}", route.resource.canonical))
        for route in app.router.routes()
        if route.method != "HEAD"
    }
    doc = openapi_document()
    documented = {(m, path) for path, ops in doc["paths"].items() for m in ops}
    assert served == documented
    assert doc["openapi"].startswith("3.")


def test_request_schemas_come_from_the_models() -> None:
    schemas = openapi_document()["components"]["schemas"]
    endpoint = schemas["EndpointCreate"]
    assert set(endpoint["properties"]) == {
        "namespace", "name", "labels", "ports", "netns", "container_id", "container_name",
    }  # fmt: skip
    assert endpoint.get("additionalProperties") is False
    assert "PortModel" in schemas
    assert {"id", "namespace", "name", "netns", "ipv4", "identity", "labels"} <= set(
        schemas["Endpoint"]["required"]
    )
