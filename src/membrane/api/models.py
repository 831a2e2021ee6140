"""Request bodies of the agent API. The same models validate what arrives and describe it
in the OpenAPI document, so the two cannot drift apart."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from membrane.errors import UserError

# Kubernetes object names: namespaces are DNS labels, pods DNS subdomains.
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?)$")
PORT_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,13}[a-z0-9])?$")
PROTOCOLS = ("TCP", "UDP", "SCTP")


def check_namespace(value: str) -> str:
    if not DNS_LABEL.match(value):
        raise ValueError(f"{value!r} is not a valid namespace name (lowercase DNS label)")
    return value


def check_pod_name(value: str) -> str:
    if not DNS_SUBDOMAIN.match(value) or ".." in value:
        raise ValueError(f"{value!r} is not a valid pod name (lowercase DNS subdomain)")
    return value


def check_label_key(key: str) -> str:
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not DNS_SUBDOMAIN.match(prefix)):
        raise ValueError(f"label key {key!r} has an invalid prefix")
    if not _LABEL_NAME.match(name):
        raise ValueError(f"label key {key!r} is not valid (alphanumerics, '-', '_', '.')")
    return key


def check_label_value(key: str, value: str) -> str:
    if not _LABEL_VALUE.match(value):
        raise ValueError(f"label {key}={value!r}: the value is not valid (≤ 63 characters)")
    return value


def check_labels(labels: dict[str, str]) -> dict[str, str]:
    for key, value in labels.items():
        check_label_key(key)
        check_label_value(key, value)
    return labels


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PortModel(_Strict):
    name: str = Field(description="port name, as in a container spec (e.g. http)")
    port: int = Field(ge=1, le=65535)
    protocol: Literal["TCP", "UDP", "SCTP"] = "TCP"

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not PORT_NAME.match(v):
            raise ValueError(f"{v!r} is not a valid port name (≤ 15 lowercase characters)")
        return v


class EndpointCreate(_Strict):
    namespace: str
    name: str
    labels: dict[str, str] = Field(default_factory=dict)
    ports: list[PortModel] = Field(default_factory=list)

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, v: str) -> str:
        return check_namespace(v)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_pod_name(v)

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        return check_labels(v)

    @field_validator("ports")
    @classmethod
    def _unique_ports(cls, v: list[PortModel]) -> list[PortModel]:
        names = [p.name for p in v]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"port name {name!r} is given twice")
        return v


class NamespaceLabels(_Strict):
    labels: dict[str, str | None] = Field(
        description="labels to set; a null value removes the label"
    )

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[str, str | None]) -> dict[str, str | None]:
        for key, value in v.items():
            check_label_key(key)
            if value is not None:
                check_label_value(key, value)
        return v


class PolicyImport(_Strict):
    yaml: str = Field(description="one or more YAML documents (NetworkPolicy, CNP, CCNP)")


class TraceRequest(_Strict):
    src: str = Field(description="NS/NAME of an endpoint, `host`, `world` or an IPv4 address")
    dst: str = Field(description="NS/NAME of an endpoint, `host`, `world` or an IPv4 address")
    dport: int = Field(ge=0, le=65535)
    protocol: Literal["TCP", "UDP", "SCTP", "ICMP"] = "TCP"


def parse_body(model: type[BaseModel], body: Any) -> Any:
    """Validate a request body; the first problem becomes a UserError naming its field."""
    try:
        return model.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "body"
        msg = first["msg"].removeprefix("Value error, ")
        raise UserError(field, msg) from None
