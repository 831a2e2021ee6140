"""Which flows to show: a FlowFilter, read from the API's query parameters or from the
CLI's options, and matched against flows (flow.Flow messages).

Apart from the store (and its asyncio) because `membrane observe` checks its options with it
before it connects, and a client command imports only what it uses."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from membrane.errors import UserError
from membrane.filter.rules import parse_port

if TYPE_CHECKING:  # `membrane observe` checks its options before it needs protobuf
    from membrane.hubble.flow import flow_pb2

FILTER_PARAMS = ("namespace", "pod", "verdict", "protocol", "port")
VERDICTS = ("FORWARDED", "DROPPED")
# --protocol name -> the field of the flow's l4 that holds that protocol
PROTOCOLS = {
    "tcp": "TCP",
    "udp": "UDP",
    "sctp": "SCTP",
    "icmp": "ICMPv4",
    "icmpv4": "ICMPv4",
    "icmpv6": "ICMPv6",
}
DEFAULT_POD_NAMESPACE = "default"  # `--pod NAME`, as in Hubble


@dataclass(frozen=True)
class FlowFilter:
    """Flows to show; every given criterion must hold. The empty filter matches all."""

    namespace: str | None = None  # either side is in it
    pod: tuple[str, str] | None = None  # (namespace, name) of either side
    verdict: str | None = None  # FORWARDED | DROPPED
    protocol: str | None = None  # one of PROTOCOLS' values (TCP, UDP, SCTP, ICMPv4, ICMPv6)
    port: int | None = None  # either port

    @classmethod
    def from_params(cls, params: Mapping[str, str], option_prefix: str = "") -> FlowFilter:
        """From API query parameters (or CLI options, named in errors with
        `option_prefix="--"`). Unknown keys are refused: a misspelt filter that silently
        matched everything would show flows the user meant to leave out."""
        for key in params:
            if key not in FILTER_PARAMS:
                raise UserError(
                    option_prefix + key,
                    f"unknown flow filter (known: {', '.join(FILTER_PARAMS)})",
                )

        def field(key: str) -> str | None:
            value = params.get(key)
            return value.strip() if value is not None and value.strip() else None

        namespace, pod, verdict = field("namespace"), field("pod"), field("verdict")
        protocol, port = field("protocol"), field("port")
        if namespace is not None:
            _check_name(namespace, option_prefix + "namespace")
        if verdict is not None:
            if verdict.upper() not in VERDICTS:
                raise UserError(
                    option_prefix + "verdict",
                    f"{verdict!r} is not one of {', '.join(VERDICTS)}",
                )
            verdict = verdict.upper()
        if protocol is not None:
            if protocol.lower() not in PROTOCOLS:
                raise UserError(
                    option_prefix + "protocol",
                    f"{protocol!r} is not one of {', '.join(PROTOCOLS)}",
                )
            protocol = PROTOCOLS[protocol.lower()]
        return cls(
            namespace=namespace,
            pod=_parse_pod(pod, option_prefix + "pod") if pod is not None else None,
            verdict=verdict,
            protocol=protocol,
            port=parse_port(port, option_prefix + "port") if port is not None else None,
        )

    def to_params(self) -> dict[str, str]:
        """The query parameters that `from_params` reads back into this filter."""
        params = {}
        if self.namespace:
            params["namespace"] = self.namespace
        if self.pod:
            params["pod"] = "/".join(self.pod)
        if self.verdict:
            params["verdict"] = self.verdict
        if self.protocol:
            params["protocol"] = self.protocol.lower()
        if self.port:
            params["port"] = str(self.port)
        return params

    def matches(self, flow: flow_pb2.Flow) -> bool:
        sides = (flow.source, flow.destination)
        if self.namespace and not any(s.namespace == self.namespace for s in sides):
            return False
        if self.pod and not any((s.namespace, s.pod_name) == self.pod for s in sides):
            return False
        if self.verdict and flow.verdict != _VERDICT_NUMBERS[self.verdict]:
            return False
        protocol = flow.l4.WhichOneof("protocol")
        if self.protocol and self.protocol != protocol:
            return False
        return not self.port or self.port in _ports(flow, protocol)


_VERDICT_NUMBERS = {"FORWARDED": 1, "DROPPED": 2}  # flow.Verdict


def _ports(flow: flow_pb2.Flow, protocol: str | None) -> tuple[int, ...]:
    if protocol in ("TCP", "UDP", "SCTP"):
        ports = getattr(flow.l4, protocol)
        return (ports.source_port, ports.destination_port)
    return ()


def _check_name(name: str, field: str) -> None:
    if "/" in name or any(c.isspace() for c in name):
        raise UserError(field, f"{name!r} is not a valid name")


def _parse_pod(text: str, field: str) -> tuple[str, str]:
    namespace, slash, name = text.rpartition("/")
    if not slash:
        namespace = DEFAULT_POD_NAMESPACE
    if not namespace or not name:
        raise UserError(
            field,
            f"{text!r}: give NAMESPACE/POD (or POD, in namespace {DEFAULT_POD_NAMESPACE}; "
            "use --namespace for a whole namespace)",
        )
    _check_name(namespace, field)
    _check_name(name, field)
    return namespace, name
