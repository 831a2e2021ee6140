"""The policy documents users write, as validated models.

NetworkPolicy (networking.k8s.io/v1), CiliumNetworkPolicy and CiliumClusterwideNetworkPolicy
(cilium.io/v2), with the field names of their docs. Only the L3/L4 parts Membrane enforces
are modelled. Fields Cilium has but Membrane does not implement are declared `Unsupported`
(and first in each model, so their error wins): using one is a clear "not supported" error,
never a silently ignored rule. Any other unknown field is an error too.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from membrane.identity.labels import POD_NAMESPACE_KEY, SOURCE_K8S, SOURCE_RESERVED
from membrane.identity.selector import IN, NOT_IN, OPERATORS, LabelSelector, Requirement
from membrane.policy import validate

KIND_K8S = "NetworkPolicy"
KIND_CNP = "CiliumNetworkPolicy"
KIND_CCNP = "CiliumClusterwideNetworkPolicy"

ENTITIES = (
    "world",
    "world-ipv4",
    "host",
    "remote-node",
    "cluster",
    "all",
    "health",
    "init",
    "unmanaged",
)
_UNSUPPORTED_ENTITIES = ("world-ipv6", "kube-apiserver", "ingress")


def _unsupported(reason: str) -> Any:
    def reject(value: object) -> None:
        raise ValueError(reason)

    return Annotated[Any, BeforeValidator(reject)]


Unsupported = _unsupported("is not supported by Membrane")
L7Unsupported = _unsupported("is not supported: Membrane enforces L3/L4 policy only")

Cidr = Annotated[IPv4Network, BeforeValidator(validate.parse_cidr)]
K8sPort = Annotated[int | str, BeforeValidator(lambda v: validate.parse_port(v, allow_zero=False))]
CiliumPort = Annotated[
    int | str, BeforeValidator(lambda v: validate.parse_port(v, allow_zero=True))
]
K8sProtocol = Annotated[str, AfterValidator(lambda v: validate.check_protocol(v, allow_any=False))]
CiliumProtocol = Annotated[
    str, AfterValidator(lambda v: validate.check_protocol(v, allow_any=True))
]
IcmpType = Annotated[int, BeforeValidator(validate.parse_icmp_type)]
IcmpFamily = Annotated[str, AfterValidator(validate.check_icmp_family)]


def _check_entity(value: str) -> str:
    if value in _UNSUPPORTED_ENTITIES:
        raise ValueError(f"entity {value!r} is not supported")
    if value not in ENTITIES:
        raise ValueError(f"unknown entity {value!r} (use one of {', '.join(ENTITIES)})")
    return value


def _check_policy_type(value: str) -> str:
    if value not in ("Ingress", "Egress"):
        raise ValueError(f"unknown policy type {value!r} (use Ingress or Egress)")
    return value


Entity = Annotated[str, AfterValidator(_check_entity)]
PolicyType = Annotated[str, AfterValidator(_check_policy_type)]


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, alias_generator=to_camel)


# ---- label selectors ---------------------------------------------------------------------


class _Requirement(_Doc):
    key: str
    operator: str
    values: list[str] | None = Field(default=None, validate_default=True)

    @classmethod
    def check_key(cls, key: str) -> None:
        raise NotImplementedError

    @field_validator("key")
    @classmethod
    def _key_syntax(cls, key: str) -> str:
        cls.check_key(key)
        return key

    @field_validator("operator")
    @classmethod
    def _known_operator(cls, operator: str) -> str:
        if operator not in OPERATORS:
            raise ValueError(f"unknown operator {operator!r} (use {', '.join(OPERATORS)})")
        return operator

    @field_validator("values")
    @classmethod
    def _values_fit_operator(cls, values: list[str] | None, info: ValidationInfo) -> list[str]:
        operator = info.data.get("operator")
        if operator in (IN, NOT_IN) and not values:
            raise ValueError(f"must list at least one value for operator {operator}")
        if operator not in (IN, NOT_IN) and values:
            raise ValueError(f"must be empty for operator {operator}")
        for value in values or ():
            validate.check_label_value(value)
        return values or []

    def to_requirement(self, key_prefix: str = "") -> Requirement:
        return Requirement(key_prefix + self.key, self.operator, tuple(self.values or ()))


def _check_match_labels(labels: dict[str, str] | None, check_key: Any) -> dict[str, str] | None:
    for key, value in (labels or {}).items():
        check_key(key)
        validate.check_label_value(value)
    return labels


class K8sRequirement(_Requirement):
    @classmethod
    def check_key(cls, key: str) -> None:
        validate.check_k8s_label_key(key)


class CiliumRequirement(_Requirement):
    @classmethod
    def check_key(cls, key: str) -> None:
        validate.check_cilium_label_key(key)


class K8sSelector(_Doc):
    """A Kubernetes label selector: keys are plain Kubernetes label keys."""

    match_labels: dict[str, str] | None = None
    match_expressions: list[K8sRequirement] | None = None

    @field_validator("match_labels")
    @classmethod
    def _labels_syntax(cls, labels: dict[str, str] | None) -> dict[str, str] | None:
        return _check_match_labels(labels, validate.check_k8s_label_key)

    def to_selector(self, key_prefix: str = f"{SOURCE_K8S}:") -> LabelSelector:
        """The selector over sourced labels; `key_prefix` is put before every key (the
        compiler uses it to turn namespace label keys into endpoint label keys)."""
        return LabelSelector(
            {key_prefix + k: v for k, v in (self.match_labels or {}).items()},
            [r.to_requirement(key_prefix) for r in self.match_expressions or ()],
        )


class CiliumSelector(_Doc):
    """A Cilium endpoint selector: keys may carry a source (`k8s:app`, `reserved:host`)."""

    match_labels: dict[str, str] | None = None
    match_expressions: list[CiliumRequirement] | None = None

    @field_validator("match_labels")
    @classmethod
    def _labels_syntax(cls, labels: dict[str, str] | None) -> dict[str, str] | None:
        return _check_match_labels(labels, validate.check_cilium_label_key)

    def to_selector(self) -> LabelSelector:
        return LabelSelector(
            self.match_labels or {}, [r.to_requirement() for r in self.match_expressions or ()]
        )

    def escapes_namespace(self) -> bool:
        """Whether a CiliumNetworkPolicy peer selector is exempt from the implicit
        restriction to the policy's namespace: it names the namespace itself, or it selects
        reserved identities (which belong to no namespace)."""
        selector = self.to_selector()
        return selector.mentions(SOURCE_K8S, POD_NAMESPACE_KEY) or selector.mentions_source(
            SOURCE_RESERVED
        )


# ---- NetworkPolicy (networking.k8s.io/v1) ---------------------------------------------------


def _check_excepts(excepts: list[IPv4Network] | None, info: ValidationInfo) -> Any:
    cidr = info.data.get("cidr")  # absent when the cidr itself was bad
    for prefix in excepts or ():
        if cidr is not None and not (prefix.subnet_of(cidr) and prefix != cidr):
            raise ValueError(f"{prefix} is not inside cidr {cidr} (except must be a strict part)")
    return excepts


class IPBlock(_Doc):
    cidr: Cidr
    except_: list[Cidr] | None = Field(default=None, alias="except")

    @field_validator("except_")
    @classmethod
    def _excepts_inside(cls, excepts: list[IPv4Network] | None, info: ValidationInfo) -> Any:
        return _check_excepts(excepts, info)


class K8sPeer(_Doc):
    pod_selector: K8sSelector | None = None
    namespace_selector: K8sSelector | None = None
    ip_block: IPBlock | None = None

    @model_validator(mode="after")
    def _one_kind_of_peer(self) -> K8sPeer:
        selectors = self.pod_selector is not None or self.namespace_selector is not None
        if self.ip_block is not None and selectors:
            raise ValueError("ipBlock cannot be combined with podSelector or namespaceSelector")
        if self.ip_block is None and not selectors:
            raise ValueError("needs podSelector, namespaceSelector or ipBlock")
        return self


def _check_range_end(end_port: int | None, info: ValidationInfo) -> int | None:
    if end_port is None or "port" not in info.data:  # a bad port was reported already
        return end_port
    return validate.check_end_port(end_port, info.data["port"])


class K8sPortSpec(_Doc):
    protocol: K8sProtocol | None = None
    port: K8sPort | None = None
    end_port: int | None = None

    @field_validator("end_port")
    @classmethod
    def _end_after_port(cls, end_port: int | None, info: ValidationInfo) -> int | None:
        return _check_range_end(end_port, info)


class K8sIngressRule(_Doc):
    from_: list[K8sPeer] | None = Field(default=None, alias="from")
    ports: list[K8sPortSpec] | None = None

    @property
    def peers(self) -> list[K8sPeer]:
        return self.from_ or []


class K8sEgressRule(_Doc):
    to: list[K8sPeer] | None = None
    ports: list[K8sPortSpec] | None = None

    @property
    def peers(self) -> list[K8sPeer]:
        return self.to or []


class K8sPolicySpec(_Doc):
    pod_selector: K8sSelector | None = None  # optional here: absent selects every pod
    policy_types: list[PolicyType] | None = None
    ingress: list[K8sIngressRule] | None = None
    egress: list[K8sEgressRule] | None = None

    def effective_types(self) -> set[str]:
        """policyTypes, defaulted as the API server does: Ingress always, Egress when the
        policy has egress rules."""
        if self.policy_types:
            return set(self.policy_types)
        return {"Ingress", "Egress"} if self.egress else {"Ingress"}


# ---- CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy (cilium.io/v2) ---------------------


class CIDRRule(_Doc):
    cidr_group_ref: Unsupported = None
    cidr_group_selector: Unsupported = None
    cidr: Cidr
    except_: list[Cidr] | None = Field(default=None, alias="except")

    @field_validator("except_")
    @classmethod
    def _excepts_inside(cls, excepts: list[IPv4Network] | None, info: ValidationInfo) -> Any:
        return _check_excepts(excepts, info)


class PortProtocol(_Doc):
    protocol: CiliumProtocol | None = None  # absent: ANY
    port: CiliumPort | None = None  # absent or 0: every port
    end_port: int | None = None

    @field_validator("end_port")
    @classmethod
    def _end_after_port(cls, end_port: int | None, info: ValidationInfo) -> int | None:
        return _check_range_end(end_port, info)


class PortRule(_Doc):
    rules: L7Unsupported = None
    listener: L7Unsupported = None
    originating_tls: L7Unsupported = Field(default=None, alias="originatingTLS")
    terminating_tls: L7Unsupported = Field(default=None, alias="terminatingTLS")
    server_names: L7Unsupported = None
    ports: list[PortProtocol] | None = None  # absent or empty: every port


class ICMPField(_Doc):
    family: IcmpFamily | None = None  # absent: IPv4
    icmp_type: IcmpType = Field(alias="type")


class ICMPRule(_Doc):
    fields: list[ICMPField]


class CiliumPeerRule(_Doc):
    """What ingress, ingressDeny, egress and egressDeny rules share."""

    authentication: Unsupported = None
    to_ports: list[PortRule] | None = None
    icmps: list[ICMPRule] | None = None

    # The peer fields under their direction-neutral names (fromX / toX).
    @property
    def peer_endpoints(self) -> list[CiliumSelector]:
        raise NotImplementedError

    @property
    def peer_cidrs(self) -> list[IPv4Network]:
        raise NotImplementedError

    @property
    def peer_cidr_sets(self) -> list[CIDRRule]:
        raise NotImplementedError

    @property
    def peer_entities(self) -> list[str]:
        raise NotImplementedError

    def has_peers(self) -> bool:
        return bool(
            self.peer_endpoints or self.peer_cidrs or self.peer_cidr_sets or self.peer_entities
        )

    def has_l4(self) -> bool:
        return bool(self.to_ports or self.icmps)


class CiliumIngressRule(CiliumPeerRule):
    from_requires: Unsupported = None
    from_groups: Unsupported = None
    from_nodes: Unsupported = None
    from_endpoints: list[CiliumSelector] | None = None
    from_cidr: list[Cidr] | None = Field(default=None, alias="fromCIDR")
    from_cidr_set: list[CIDRRule] | None = Field(default=None, alias="fromCIDRSet")
    from_entities: list[Entity] | None = None

    @property
    def peer_endpoints(self) -> list[CiliumSelector]:
        return self.from_endpoints or []

    @property
    def peer_cidrs(self) -> list[IPv4Network]:
        return self.from_cidr or []

    @property
    def peer_cidr_sets(self) -> list[CIDRRule]:
        return self.from_cidr_set or []

    @property
    def peer_entities(self) -> list[str]:
        return self.from_entities or []


class CiliumEgressRule(CiliumPeerRule):
    to_requires: Unsupported = None
    to_services: Unsupported = None
    to_fqdns: Unsupported = Field(default=None, alias="toFQDNs")
    to_groups: Unsupported = None
    to_nodes: Unsupported = None
    to_endpoints: list[CiliumSelector] | None = None
    to_cidr: list[Cidr] | None = Field(default=None, alias="toCIDR")
    to_cidr_set: list[CIDRRule] | None = Field(default=None, alias="toCIDRSet")
    to_entities: list[Entity] | None = None

    @property
    def peer_endpoints(self) -> list[CiliumSelector]:
        return self.to_endpoints or []

    @property
    def peer_cidrs(self) -> list[IPv4Network]:
        return self.to_cidr or []

    @property
    def peer_cidr_sets(self) -> list[CIDRRule]:
        return self.to_cidr_set or []

    @property
    def peer_entities(self) -> list[str]:
        return self.to_entities or []


class DefaultDeny(_Doc):
    ingress: bool | None = None
    egress: bool | None = None


class CiliumRule(_Doc):
    """One Cilium rule (`spec`, or an item of `specs`)."""

    node_selector: Unsupported = None
    endpoint_selector: CiliumSelector
    ingress: list[CiliumIngressRule] | None = None
    ingress_deny: list[CiliumIngressRule] | None = None
    egress: list[CiliumEgressRule] | None = None
    egress_deny: list[CiliumEgressRule] | None = None
    enable_default_deny: DefaultDeny | None = None
    labels: list[Any] | None = None  # rule labels: metadata only
    description: str | None = None

    def sections(self, direction: str) -> tuple[Sequence[CiliumPeerRule], Sequence[CiliumPeerRule]]:
        """(allow rules, deny rules) of a direction ("ingress" or "egress")."""
        if direction == "ingress":
            return self.ingress or [], self.ingress_deny or []
        return self.egress or [], self.egress_deny or []

    def default_deny(self, direction: str) -> bool:
        """Whether this rule puts the endpoints it selects into default deny in a
        direction: it has rules there (allow or deny), unless enableDefaultDeny says no."""
        allow, deny = self.sections(direction)
        wanted = getattr(self.enable_default_deny, direction, None)
        return bool(allow or deny) and wanted is not False


# ---- a parsed document -----------------------------------------------------------------------


@dataclass(frozen=True)
class Policy:
    """One policy document. NetworkPolicy has `k8s_spec`; the Cilium kinds have
    `cilium_specs`: (index in `specs`, or None for `spec`; the rule)."""

    kind: str
    namespace: str | None  # None for CiliumClusterwideNetworkPolicy
    name: str
    k8s_spec: K8sPolicySpec | None = None
    cilium_specs: tuple[tuple[int | None, CiliumRule], ...] = ()

    @property
    def key(self) -> tuple[str, str | None, str]:
        return (self.kind, self.namespace, self.name)

    def describe(self) -> str:
        where = f"{self.namespace}/{self.name}" if self.namespace else self.name
        return f"{self.kind} {where}"

    def prefixes(self) -> Iterator[IPv4Network]:
        """Every CIDR the policy names, excepts included."""
        if self.k8s_spec is not None:
            for rule in [*(self.k8s_spec.ingress or ()), *(self.k8s_spec.egress or ())]:
                for peer in rule.peers:
                    if peer.ip_block is not None:
                        yield peer.ip_block.cidr
                        yield from peer.ip_block.except_ or ()
        for _, spec in self.cilium_specs:
            for direction in ("ingress", "egress"):
                for rule in [r for section in spec.sections(direction) for r in section]:
                    yield from rule.peer_cidrs
                    for cidr_set in rule.peer_cidr_sets:
                        yield cidr_set.cidr
                        yield from cidr_set.except_ or ()
