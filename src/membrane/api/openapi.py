"""The OpenAPI 3.1 description of the agent API (served at /v1/openapi.json).

Request schemas come from the pydantic models that validate the requests; responses are
described here. tests/unit/test_openapi.py checks that every route the server registers
is documented and that every documented route exists.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from membrane.api.models import (
    EndpointCreate,
    NamespaceLabels,
    PolicyImport,
    ServiceCreate,
    TraceRequest,
)

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["field", "problem"],
            "properties": {
                "field": {"type": "string", "description": "the field path at fault"},
                "problem": {"type": "string"},
            },
        }
    },
}

_ENDPOINT = {
    "type": "object",
    "required": ["id", "namespace", "name", "netns", "ipv4", "identity", "labels"],
    "properties": {
        "id": {"type": "integer", "description": "endpoint id on this node (1..65535)"},
        "namespace": {"type": "string"},
        "name": {"type": "string"},
        "netns": {
            "type": "string",
            "description": "network namespace under /run/netns, or the path a container "
            "runtime gave (CNI)",
        },
        "container_id": {
            "type": ["string", "null"],
            "description": "the runtime's container id for an endpoint made through CNI",
        },
        "container_name": {
            "type": ["string", "null"],
            "description": "the runtime's name for that container; null for a pod's (its "
            "processes run in the pod's other containers)",
        },
        "ipv4": {"type": "string"},
        "ipv6": {
            "type": ["string", "null"],
            "description": "null on an IPv4-only node (--ipv6=false)",
        },
        "identity": {"type": "integer", "description": "security identity of its labels"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "identity_labels": {"type": "array", "items": {"type": "string"}},
        "ports": {"type": "array", "items": {"type": "string"}, "description": "NAME=PORT/PROTO"},
        "host_ifname": {"type": "string"},
        "attach_mode": {
            "type": "string",
            "enum": ["tcx", "clsact"],
            "description": "how its programs are attached: tcx links (pinned, adopted after "
            "a restart) or the clsact fallback of kernels without tcx",
        },
        "created": {"type": "number"},
    },
}

_POLICY_CHANGE = {
    "type": "object",
    "properties": {
        "revision": {"type": "integer"},
        "policies": {"type": "array", "items": {"$ref": "#/components/schemas/PolicyRef"}},
        "enforced_in_seconds": {"type": "number"},
        "warnings": {
            "type": "array",
            "items": {"type": "string"},
            "description": "fields accepted but not enforced, entities matching nothing here",
        },
    },
}

_SCHEMAS: dict[str, Any] = {
    "Error": _ERROR,
    "Endpoint": _ENDPOINT,
    "PolicyRef": {
        "type": "object",
        "properties": {
            "kind": {"type": "string"},
            "namespace": {"type": ["string", "null"]},
            "name": {"type": "string"},
        },
    },
    "PolicyChange": _POLICY_CHANGE,
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _body(model: type[BaseModel]) -> dict[str, Any]:
    _SCHEMAS[model.__name__] = model.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, sub in _SCHEMAS[model.__name__].pop("$defs", {}).items():
        _SCHEMAS[name] = sub
    return {"required": True, "content": {"application/json": {"schema": _ref(model.__name__)}}}


def _errors(*codes: int) -> dict[str, Any]:
    text = {400: "bad input", 404: "not found", 500: "the agent failed"}
    return {str(c): _json(_ref("Error"), text[c]) for c in codes}


_NS_NAME = [
    {"name": "namespace", "in": "path", "required": True, "schema": {"type": "string"}},
    {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},
]


_CNI_COMMAND = {
    "name": "command", "in": "path", "required": True,
    "schema": {"enum": ["add", "del", "check"]},
}  # fmt: skip


def _query(*names: str) -> list[dict[str, Any]]:
    return [{"name": n, "in": "query", "schema": {"type": "string"}} for n in names]


def openapi_document() -> dict[str, Any]:
    endpoint_list = {
        "type": "object",
        "properties": {"endpoints": {"type": "array", "items": _ref("Endpoint")}},
    }
    paths: dict[str, Any] = {
        "/v1/healthz": {
            "get": {"summary": "Agent status", "responses": {"200": _json({"type": "object"})}}
        },
        "/v1/openapi.json": {
            "get": {"summary": "This document", "responses": {"200": _json({"type": "object"})}}
        },
        "/v1/endpoints": {
            "get": {"summary": "List endpoints", "responses": {"200": _json(endpoint_list)}},
            "post": {
                "summary": "Create an endpoint (pod): namespace, veth, address, datapath",
                "requestBody": _body(EndpointCreate),
                "responses": {"201": _json(_ref("Endpoint"), "created"), **_errors(400, 500)},
            },
        },
        "/v1/endpoints/{namespace}/{name}": {
            "get": {
                "summary": "One endpoint",
                "parameters": _NS_NAME,
                "responses": {"200": _json(_ref("Endpoint")), **_errors(404)},
            },
            "delete": {
                "summary": "Delete an endpoint",
                "parameters": _NS_NAME,
                "responses": {"200": _json(_ref("Endpoint")), **_errors(404, 500)},
            },
        },
        "/v1/namespaces": {
            "get": {
                "summary": "Namespaces and their labels",
                "responses": {"200": _json({"type": "object"})},
            }
        },
        "/v1/namespaces/{namespace}/labels": {
            "put": {
                "summary": "Set or remove namespace labels; identities and policy follow",
                "parameters": _NS_NAME[:1],
                "requestBody": _body(NamespaceLabels),
                "responses": {"200": _json({"type": "object"}), **_errors(400, 500)},
            }
        },
        "/v1/identities": {
            "get": {
                "summary": "Identities in use and their labels",
                "responses": {"200": _json({"type": "object"})},
            }
        },
        "/v1/policies": {
            "get": {
                "summary": "Policies in force",
                "parameters": _query("namespace", "name", "kind"),
                "responses": {"200": _json({"type": "object"})},
            },
            "post": {
                "summary": "Import policies; returns once every affected endpoint enforces them",
                "requestBody": _body(PolicyImport),
                "responses": {"200": _json(_ref("PolicyChange")), **_errors(400, 500)},
            },
            "delete": {
                "summary": "Delete one policy (namespace, name, kind) or all (all=1)",
                "parameters": _query("namespace", "name", "kind", "all"),
                "responses": {"200": _json(_ref("PolicyChange")), **_errors(400, 404, 500)},
            },
        },
        "/v1/policy/trace": {
            "post": {
                "summary": "Explain the verdict for a connection and the rule that decides it",
                "requestBody": _body(TraceRequest),
                "responses": {"200": _json({"type": "object"}), **_errors(400, 404)},
            }
        },
        "/v1/services": {
            "get": {
                "summary": "Services: ClusterIPs, NodePorts, frontends and backends",
                "responses": {"200": _json({"type": "object"})},
            },
            "post": {
                "summary": "Add a Service (its Kubernetes spec) with backends given by hand",
                "requestBody": _body(ServiceCreate),
                "responses": {"201": _json({"type": "object"}, "created"), **_errors(400, 500)},
            },
        },
        "/v1/services/import": {
            "post": {
                "summary": "Import Kubernetes Service and EndpointSlice YAML (yaml: the text)",
                "requestBody": _body(PolicyImport),
                "responses": {"200": _json({"type": "object"}), **_errors(400, 500)},
            }
        },
        "/v1/services/{namespace}/{name}": {
            "get": {
                "summary": "One service",
                "parameters": _NS_NAME,
                "responses": {"200": _json({"type": "object"}), **_errors(404)},
            },
            "delete": {
                "summary": "Delete a service (and its EndpointSlices)",
                "parameters": _NS_NAME,
                "responses": {"200": _json({"type": "object"}), **_errors(404, 500)},
            },
        },
        "/v1/security/status": {
            "get": {
                "summary": "Runtime security: what runs, what the kernel lacks, counters",
                "responses": {"200": _json({"type": "object"})},
            }
        },
        "/v1/security/events": {
            "get": {
                "summary": "Security events as tetragon.GetEventsResponse JSON lines "
                "(request: a GetEventsRequest's JSON; last: N; follow: 1 streams on)",
                "parameters": _query("request", "last", "follow"),
                "responses": {
                    "200": {
                        "description": "newline-delimited JSON",
                        "content": {"application/x-ndjson": {"schema": {"type": "object"}}},
                    },
                    **_errors(400),
                },
            }
        },
        "/v1/security/policies": {
            "get": {
                "summary": "Tracing policies in force: hooks, and the calls they refused",
                "responses": {"200": _json({"type": "object"})},
            },
            "post": {
                "summary": "Apply TracingPolicy YAML (yaml: the text); whole or not at all, "
                "in force in the kernel on return",
                "requestBody": _body(PolicyImport),
                "responses": {"200": _json({"type": "object"}), **_errors(400, 500)},
            },
        },
        "/v1/security/policies/{name}": {
            "delete": {
                "summary": "Delete a tracing policy (namespace: of a TracingPolicyNamespaced)",
                "parameters": [
                    {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},
                    *_query("namespace"),
                ],
                "responses": {"200": _json({"type": "object"}), **_errors(404, 500)},
            }
        },
        "/v1/cni/{command}": {
            "post": {
                "summary": "A CNI plugin call (add, del, check) with its CNI_* environment and "
                "network config; answered with the CNI spec's result or error JSON",
                "parameters": [_CNI_COMMAND],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"type": "object"}}},
                },
                "responses": {"200": _json({"type": "object"}), **_errors(400)},
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Membrane agent API",
            "version": "1",
            "description": "Served on the agent's unix socket (--api-socket, MEMBRANE_API_SOCKET).",
        },
        "paths": paths,
        "components": {"schemas": _SCHEMAS},
    }
