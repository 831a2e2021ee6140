"""The policy documents users write, as validated models.

NetworkPolicy (networking.k8s.io/v1), CiliumNetworkPolicy and CiliumClusterwideNetworkPolicy
(cilium.io/v2), with the field names of their docs. Every field of Cilium's policy language
is known here and has one of three fates (README: "Policy fields"):

- enforced: modelled, and flattened by `rules.py`;
- ignored with a warning (`IGNORED` of each model): peer fields Membrane cannot resolve
  (DNS names, services, cloud groups, nodes, CIDR groups). In an allow rule they select no
  peer, so the rule allows less than the policy says, never more; a rule naming only them
  allows nothing (its ports do not open to every peer). The parser refuses them in deny
  rules, where selecting nothing would allow what the policy denies;
- refused with the reason (`_refused`): fields whose absence would allow more than the
  policy says (L7 rules, TLS, mutual authentication, host policies, requirements).

Any other unknown field is an error too.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network
from typing import Annotated, Any, ClassVar

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
from membrane.policy.validate import Network

KIND_K8S = "NetworkPolicy"
KIND_CNP = "CiliumNetworkPolicy"
KIND_CCNP = "CiliumClusterwideNetworkPolicy"

# Every entity Cilium documents (rules.py: what each selects on a Membrane node).
ENTITIES = (
    "all",
    "world",
    "world-ipv4",
    "world-ipv6",
    "cluster",
    "host",
    "remote-node",
    "kube-apiserver",
    "ingress",
    "health",
    "init",
    "unmanaged",
)

CIDR_MATCH_MODES = ("world", "all")


def _refused(reason: str, *, unless_empty: bool = False) -> Any:
    """A field Membrane refuses: ignoring it would allow more than the policy says."""

    def reject(value: object) -> object:
        if unless_empty and not value:
            return value
        raise ValueError(reason)

    return Annotated[Any, BeforeValidator(reject)]


L7_RULES = _refused(
    "L7 rules are not enforced by Membrane (it enforces L3/L4): ignoring them would allow "
    "every request on the port; remove `rules` to allow the whole port"
)
L7_LISTENER = _refused(
    "Envoy listeners are not available in Membrane (L3/L4 only): ignoring one would allow "
    "the port without the proxy's checks"
)
L7_TLS = _refused(
    "TLS interception is not available in Membrane (L3/L4 only): ignoring it would allow "
    "the port without the proxy's checks"
)
L7_SERVER_NAMES = _refused(
    "TLS server names (SNI) are not enforced by Membrane (L3/L4 only): ignoring them would "
    "allow every server name on the port"
)
REQUIRES = _refused(
    "is deprecated and no longer accepted by Cilium (its CRD allows no items): ignoring the "
    "requirements would allow peers they exclude",
    unless_empty=True,
)
NODE_SELECTOR = _refused(
    "host policies (nodeSelector) are not enforced by Membrane: the node's own traffic "
    "would stay unrestricted; use endpointSelector for pods"
)

Cidr = Annotated[IPv4Network | IPv6Network, BeforeValidator(validate.parse_cidr)]
K8sPort = Annotated[int | str, BeforeValidator(lambda v: validate.parse_port(v, allow_zero=False))]
CiliumPort = Annotated[
    int | str, BeforeValidator(lambda v: validate.parse_port(v, allow_zero=True))
]
K8sProtocol = Annotated[str, AfterValidator(lambda v: validate.check_protocol(v, cilium=False))]
CiliumProtocol = Annotated[str, AfterValidator(lambda v: validate.check_protocol(v, cilium=True))]
IcmpFamily = Annotated[str, AfterValidator(validate.check_icmp_family)]


def _check_entity(value: str) -> str:
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

    # Fields accepted but not enforced: field name -> why (see the module's docstring).
    # The parser warns about each one used, or refuses it in a deny rule.
    IGNORED: ClassVar[dict[str, str]] = {}

    def ignored(self) -> list[tuple[str, str]]:
        """(field as written, why it is ignored) for every ignored field this item uses."""
        fields = type(self).model_fields
        return [
            (fields[name].alias or name, what)
            for name, what in self.IGNORED.items()
            if getattr(self, name)
        ]


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


def _check_excepts(excepts: list[Network] | None, info: ValidationInfo) -> Any:
    cidr = info.data.get("cidr")  # absent when the cidr itself was bad (or not given)
    for prefix in excepts or ():
        if cidr is not None:
            validate.check_except(prefix, cidr)
    return excepts


class IPBlock(_Doc):
    cidr: Cidr
    except_: list[Cidr] | None = Field(default=None, alias="except")

    @field_validator("except_")
    @classmethod
    def _excepts_inside(cls, excepts: list[Network] | None, info: ValidationInfo) -> Any:
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
    IGNORED: ClassVar[dict[str, str]] = {
        "cidr_group_ref": "CiliumCIDRGroups are not available in Membrane",
        "cidr_group_selector": "CiliumCIDRGroups are not available in Membrane",
    }

    cidr: Cidr | None = None
    cidr_group_ref: str | None = None
    cidr_group_selector: CiliumSelector | None = None
    except_: list[Cidr] | None = Field(default=None, alias="except")

    @field_validator("except_")
    @classmethod
    def _excepts_inside(cls, excepts: list[Network] | None, info: ValidationInfo) -> Any:
        return _check_excepts(excepts, info)

    @model_validator(mode="after")
    def _one_source(self) -> CIDRRule:
        given = [self.cidr, self.cidr_group_ref, self.cidr_group_selector]
        if sum(x is not None for x in given) != 1:
            raise ValueError("needs exactly one of cidr, cidrGroupRef and cidrGroupSelector")
        return self


class PortProtocol(_Doc):
    protocol: CiliumProtocol | None = None  # absent: ANY
    port: CiliumPort | None = None  # absent or 0: every port
    end_port: int | None = None

    @field_validator("end_port")
    @classmethod
    def _end_after_port(cls, end_port: int | None, info: ValidationInfo) -> int | None:
        return _check_range_end(end_port, info)


class PortRule(_Doc):
    rules: L7_RULES = None
    listener: L7_LISTENER = None
    originating_tls: L7_TLS = Field(default=None, alias="originatingTLS")
    terminating_tls: L7_TLS = Field(default=None, alias="terminatingTLS")
    server_names: L7_SERVER_NAMES = None
    ports: list[PortProtocol] | None = None  # absent or empty: every port


class ICMPField(_Doc):
    family: IcmpFamily = "IPv4"
    icmp_type: int = Field(alias="type")

    @field_validator("icmp_type", mode="before")
    @classmethod
    def _type_of_family(cls, value: object, info: ValidationInfo) -> int:
        family = info.data.get("family", "IPv4")  # absent: the family was bad, and said so
        return validate.parse_icmp_type(value, family)

    @property
    def proto(self) -> int:
        """ICMP for IPv4, ICMPv6 for IPv6: the protocol whose type this is."""
        return validate.ICMP_FAMILIES[self.family][0]


class ICMPRule(_Doc):
    fields: list[ICMPField]


class Authentication(_Doc):
    mode: str

    @field_validator("mode")
    @classmethod
    def _mode(cls, mode: str) -> str:
        if mode in ("required", "test-always-fail"):
            raise ValueError(
                f"mutual authentication ({mode}) is not enforced by Membrane: ignoring it "
                "would allow unauthenticated peers"
            )
        if mode != "disabled":
            raise ValueError(f"unknown mode {mode!r} (use disabled, required or test-always-fail)")
        return mode


class CiliumPeerRule(_Doc):
    """What ingress, ingressDeny, egress and egressDeny rules share."""

    authentication: Authentication | None = None
    to_ports: list[PortRule] | None = None
    icmps: list[ICMPRule] | None = None

    # The peer fields under their direction-neutral names (fromX / toX).
    @property
    def peer_endpoints(self) -> list[CiliumSelector]:
        raise NotImplementedError

    @property
    def peer_cidrs(self) -> list[Network]:
        raise NotImplementedError

    @property
    def peer_cidr_sets(self) -> list[CIDRRule]:
        raise NotImplementedError

    @property
    def peer_entities(self) -> list[str]:
        raise NotImplementedError

    def has_peers(self) -> bool:
        """Whether the rule names peers; ignored peer fields count (they select nothing),
        so a rule with only those and ports does not apply to every peer."""
        return bool(
            self.peer_endpoints
            or self.peer_cidrs
            or self.peer_cidr_sets
            or self.peer_entities
            or self.ignored()
        )

    def has_l4(self) -> bool:
        return bool(self.to_ports or self.icmps)

    def cidr_blocks(self) -> list[tuple[Network, list[Network]]]:
        """(cidr, excepts) of every CIDR peer: fromCIDR/toCIDR and the CIDR sets naming a
        cidr (the ones naming CIDR groups select nothing here)."""
        blocks: list[tuple[Network, list[Network]]] = [(c, []) for c in self.peer_cidrs]
        blocks += [(s.cidr, s.except_ or []) for s in self.peer_cidr_sets if s.cidr is not None]
        return blocks


class CiliumIngressRule(CiliumPeerRule):
    IGNORED: ClassVar[dict[str, str]] = {
        "from_groups": "cloud provider groups are not resolved by Membrane",
        "from_nodes": "Membrane does not select nodes by label",
    }

    from_requires: REQUIRES = None
    from_groups: list[Any] | None = None
    from_nodes: list[CiliumSelector] | None = None
    from_endpoints: list[CiliumSelector] | None = None
    from_cidr: list[Cidr] | None = Field(default=None, alias="fromCIDR")
    from_cidr_set: list[CIDRRule] | None = Field(default=None, alias="fromCIDRSet")
    from_entities: list[Entity] | None = None

    @property
    def peer_endpoints(self) -> list[CiliumSelector]:
        return self.from_endpoints or []

    @property
    def peer_cidrs(self) -> list[Network]:
        return self.from_cidr or []

    @property
    def peer_cidr_sets(self) -> list[CIDRRule]:
        return self.from_cidr_set or []

    @property
    def peer_entities(self) -> list[str]:
        return self.from_entities or []


class CiliumEgressRule(CiliumPeerRule):
    IGNORED: ClassVar[dict[str, str]] = {
        "to_services": "Membrane does not resolve services to their endpoints",
        "to_fqdns": "Membrane does not resolve DNS names (no DNS proxy)",
        "to_groups": "cloud provider groups are not resolved by Membrane",
        "to_nodes": "Membrane does not select nodes by label",
    }

    to_requires: REQUIRES = None
    to_services: list[Any] | None = None
    to_fqdns: list[Any] | None = Field(default=None, alias="toFQDNs")
    to_groups: list[Any] | None = None
    to_nodes: list[CiliumSelector] | None = None
    to_endpoints: list[CiliumSelector] | None = None
    to_cidr: list[Cidr] | None = Field(default=None, alias="toCIDR")
    to_cidr_set: list[CIDRRule] | None = Field(default=None, alias="toCIDRSet")
    to_entities: list[Entity] | None = None

    @property
    def peer_endpoints(self) -> list[CiliumSelector]:
        return self.to_endpoints or []

    @property
    def peer_cidrs(self) -> list[Network]:
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


class LogConfig(_Doc):
    value: str | None = None


class CiliumRule(_Doc):
    """One Cilium rule (`spec`, or an item of `specs`)."""

    IGNORED: ClassVar[dict[str, str]] = {"log": "flows do not carry a policy's log value"}

    node_selector: NODE_SELECTOR = None
    endpoint_selector: CiliumSelector
    ingress: list[CiliumIngressRule] | None = None
    ingress_deny: list[CiliumIngressRule] | None = None
    egress: list[CiliumEgressRule] | None = None
    egress_deny: list[CiliumEgressRule] | None = None
    enable_default_deny: DefaultDeny | None = None
    labels: list[Any] | None = None  # rule labels: metadata only
    description: str | None = None
    log: LogConfig | None = None

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
    `cilium_specs`: (index in `specs`, or None for `spec`; the rule). `warnings`: one line
    per ignored field, naming the document and the field path (parse.py)."""

    kind: str
    namespace: str | None  # None for CiliumClusterwideNetworkPolicy
    name: str
    k8s_spec: K8sPolicySpec | None = None
    cilium_specs: tuple[tuple[int | None, CiliumRule], ...] = ()
    warnings: tuple[str, ...] = field(default=(), compare=False)

    @property
    def key(self) -> tuple[str, str | None, str]:
        return (self.kind, self.namespace, self.name)

    def describe(self) -> str:
        where = f"{self.namespace}/{self.name}" if self.namespace else self.name
        return f"{self.kind} {where}"

    def prefixes(self) -> Iterator[Network]:
        """Every CIDR the policy names (IPv4 and IPv6), excepts and /0 included."""
        for cidr, excepts in self._ip_blocks():
            yield cidr
            yield from excepts
        for cidr, excepts in self._cilium_blocks():
            yield cidr
            yield from excepts

    def address_prefixes(self, cidr_match_mode: str = "world") -> Iterator[Network]:
        """The prefixes whose blocks also match pods by address, so each pod address they
        contain needs a pod-address identity labelled with them: a NetworkPolicy's
        ipBlocks (cidr and excepts, /0 included), and with `cidr_match_mode` "all" the
        Cilium CIDR peers too."""
        blocks = list(self._ip_blocks())
        if cidr_match_mode == "all":
            blocks += self._cilium_blocks()
        for cidr, excepts in blocks:
            yield cidr
            yield from excepts

    def _ip_blocks(self) -> Iterator[tuple[Network, list[Network]]]:
        if self.k8s_spec is not None:
            for rule in [*(self.k8s_spec.ingress or ()), *(self.k8s_spec.egress or ())]:
                for peer in rule.peers:
                    if peer.ip_block is not None:
                        yield peer.ip_block.cidr, peer.ip_block.except_ or []

    def _cilium_blocks(self) -> Iterator[tuple[Network, list[Network]]]:
        for _, spec in self.cilium_specs:
            for direction in ("ingress", "egress"):
                for rule in [r for section in spec.sections(direction) for r in section]:
                    yield from rule.cidr_blocks()
