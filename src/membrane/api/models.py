"""Request bodies of the agent API. The same models validate what arrives and describe it
in the OpenAPI document, so the two cannot drift apart."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from membrane.errors import UserError
from membrane.policy import validate


def check_labels(labels: dict[str, str]) -> dict[str, str]:
    for key, value in labels.items():
        validate.check_k8s_label_key(key)
        validate.check_label_value(value)
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
        return validate.check_port_name(v)


class EndpointCreate(_Strict):
    namespace: str
    name: str
    labels: dict[str, str] = Field(default_factory=dict)
    ports: list[PortModel] = Field(default_factory=list)
    netns: str | None = Field(
        None,
        description="an existing network namespace (absolute path) that a container runtime "
        "made, plumbed instead of one the agent creates; the runtime owns it",
    )
    container_id: str | None = Field(
        None, description="the runtime's container id (CNI_CONTAINERID)", min_length=1
    )
    container_name: str | None = Field(
        None, description="the runtime's name for the container (with container_id)"
    )

    @field_validator("netns")
    @classmethod
    def _netns(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith("/"):
            raise ValueError(f"{v!r} is not an absolute path")
        return v

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, v: str) -> str:
        return validate.check_namespace(v)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return validate.check_name(v, "pod name")

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        return check_labels(v)

    @model_validator(mode="after")
    def _runtime_pair(self) -> EndpointCreate:
        # The agent deletes namespaces it made; one with a container id is the runtime's.
        if (self.netns is None) != (self.container_id is None):
            raise ValueError("netns and container_id are given together (a runtime's container)")
        if self.container_name is not None and self.container_id is None:
            raise ValueError("container_name is given only with container_id")
        return self

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
            validate.check_k8s_label_key(key)
            if value is not None:
                validate.check_label_value(value)
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


class ServiceBackend(_Strict):
    address: str
    port: int | None = Field(None, ge=1, le=65535, description="default: the targetPort")
    weight: int = Field(1, ge=1, le=65535, description="share of a Maglev table")
    state: Literal["active", "terminating", "maintenance"] = "active"


class ServiceCreate(_Strict):
    """`membrane service add`: a Service as its Kubernetes spec, and backends by hand (one
    port services) instead of EndpointSlices or a selector."""

    namespace: str = "default"
    name: str
    spec: dict[str, Any] = Field(description="a Kubernetes ServiceSpec")
    annotations: dict[str, str] = Field(default_factory=dict)
    backends: list[ServiceBackend] = Field(default_factory=list)

    def records(self) -> tuple[Any, Any]:
        """(ServiceRecord, EndpointSliceRecord or None), checked as an imported Service."""
        from membrane.service.kubernetes import hand_written

        return hand_written(
            self.namespace,
            self.name,
            self.spec,
            self.annotations,
            [b.model_dump() for b in self.backends],
        )
