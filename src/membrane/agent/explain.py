"""`policy trace`: what happens to a connection between two peers, and why.

Reads only a published snapshot, so it runs beside changes without waiting for them. Each
direction with a local endpoint gets two answers: the reference evaluator's (with the rule
that decides and an explanation) and the datapath's lookup of the compiled entries; they
agree unless there is a bug, and showing both makes such a bug visible.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import ip_address
from typing import Any

from membrane.abi import Direction, Identity, IpProto
from membrane.agent.snapshot import Snapshot
from membrane.agent.state import EndpointRecord
from membrane.api.models import TraceRequest
from membrane.errors import NotFound, UserError
from membrane.policy import evaluate, explain, lookup
from membrane.policy.rules import policy_subjects


@dataclass(frozen=True)
class Peer:
    """One side of a trace: a local endpoint, or an address with its identity."""

    ip: str
    identity: int
    endpoint: EndpointRecord | None

    def describe(self) -> str:
        return self.endpoint.key if self.endpoint else f"{self.ip} (identity {self.identity})"


def find_peer(snapshot: Snapshot, spec: str, field: str) -> Peer:
    if "/" in spec:
        ns, _, name = spec.partition("/")
        ep = snapshot.endpoint(ns, name)
        if ep is None:
            raise NotFound("endpoint", f"{ns}/{name} does not exist")
        return Peer(ep.ipv4, ep.identity, ep)
    if spec == "host":
        return Peer(str(snapshot.node_ip), int(Identity.HOST), None)
    if spec in ("world", "world-ipv4"):
        return Peer("0.0.0.0", snapshot.world_identity(4), None)
    if spec == "world-ipv6":
        return Peer("::", snapshot.world_identity(6), None)
    try:
        ip = ip_address(spec)
    except ValueError:
        raise UserError(
            field, f"{spec!r} is not NS/NAME, host, world, world-ipv6 or an IP address"
        ) from None
    ep = snapshot.endpoints_by_ip.get(str(ip))
    if ep:
        return Peer(str(ip), ep.identity, ep)
    return Peer(str(ip), snapshot.identity_of_ip(ip), None)


def trace(snapshot: Snapshot, req: TraceRequest) -> dict[str, Any]:
    src, dst = find_peer(snapshot, req.src, "src"), find_peer(snapshot, req.dst, "dst")
    if not src.endpoint and not dst.endpoint:
        raise UserError("dst", "at least one side must be an endpoint of this node")
    proto = int(IpProto[req.protocol])
    steps: list[dict[str, Any]] = []
    allowed = True
    for direction, local, peer in (("egress", src, dst), ("ingress", dst, src)):
        if local.endpoint is None:
            continue
        decision = evaluate(
            list(snapshot.policies),
            snapshot.universe,
            endpoint=snapshot.universe.endpoints[local.endpoint.id],
            direction=direction,
            peer_identity=peer.identity,
            proto=proto,
            port=req.dport,
            peer_address=ip_address(peer.ip)
            if peer.endpoint or peer.identity == Identity.HOST
            else None,
            cidr_match_mode=snapshot.universe.cidr_match_mode,
        )
        dp_allowed, rule_id = lookup(
            snapshot.compiled[local.endpoint.id],
            Direction[direction.upper()],
            peer.identity,
            proto,
            req.dport,
            snapshot.address_identities.get(peer.ip, 0),
        )
        rule = snapshot.rules.get(rule_id)
        steps.append(
            {
                "direction": direction,
                "endpoint": local.endpoint.key,
                "peer": peer.describe(),
                "peer_identity": peer.identity,
                "allowed": decision.allowed,
                "enforced": decision.enforced,
                "deciding_rule": decision.deciding.describe() if decision.deciding else None,
                "explanation": explain(decision),
                "datapath_allowed": dp_allowed,
                "datapath_rule": rule.describe() if rule else None,
            }
        )
        allowed = allowed and decision.allowed
    return {
        "src": src.describe(),
        "dst": dst.describe(),
        "dport": req.dport,
        "protocol": req.protocol,
        "verdict": "ALLOWED" if allowed else "DENIED",
        "steps": steps,
        "notes": _notes(snapshot, [p.endpoint for p in (src, dst) if p.endpoint]),
    }


def _notes(snapshot: Snapshot, endpoints: list[EndpointRecord]) -> list[str]:
    """The notes of the policies selecting the traced endpoints (an entity that matches
    nothing here, an ignored field): what the verdict may hinge on."""
    labels = [snapshot.universe.endpoints[ep.id].labels for ep in endpoints]
    found: list[str] = []
    for policy in snapshot.policies:
        notes = snapshot.policy_notes.get(policy.key)
        if not notes:
            continue
        subjects = policy_subjects(policy, cidr_match_mode=snapshot.universe.cidr_match_mode)
        if any(s.selector.matches(lb) for s in subjects for lb in labels):
            found += notes
    return found
