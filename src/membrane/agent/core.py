"""The agent's model of its node and every change to it.

All methods are synchronous and called from one worker thread (the server serialises
them), so the model needs no locks; readers on other threads (the flow reader) only see
whole dictionaries swapped in.

Every change ends in `_sync_datapath()`, which computes identities, the ipcache and every
endpoint's policy from scratch and writes only the differences, in an order that never
lets through traffic that neither the old nor the new state allows:

  1. policy for the union of the old and the new identities (entries for an identity
     exist before any address maps to it),
  2. the ipcache (addresses move to their new identities),
  3. policy without the identities nothing maps to any more.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv4Network
from typing import Any, NamedTuple

import yaml

from membrane.agent import memory
from membrane.agent.config import AgentConfig
from membrane.agent.identities import IdentityAllocator, labels_key
from membrane.agent.state import AgentState, EndpointRecord, PortSpec, StateFile, StoredPolicy
from membrane.api.models import EndpointCreate, NamespaceLabels, TraceRequest
from membrane.datapath import conntrack
from membrane.datapath.endpoint_prog import (
    attach_endpoint,
    detach_endpoint,
    is_attached,
    pinned_endpoint_ids,
)
from membrane.datapath.ipcache import IpcacheWriter
from membrane.datapath.nodemaps import NodeMaps
from membrane.datapath.policy import PolicyWriter
from membrane.endpoint.ipam import Ipam
from membrane.endpoint.node import NodeInfo, delete_node_link, setup_node
from membrane.endpoint.plumbing import create_pod, delete_pod, inspect_pod
from membrane.errors import UserError
from membrane.identity.labels import RESERVED_LABELS, cidr_identities_labels, endpoint_labels
from membrane.policy import (
    CompileCache,
    EndpointInfo,
    EndpointPolicy,
    Policy,
    RuleTable,
    Universe,
    compile_policies,
    evaluate,
    explain,
    lookup,
    parse_documents,
    parse_with_documents,
    policy_cidrs,
)

log = logging.getLogger("membrane.agent")

IDENTITY_HOST, IDENTITY_WORLD = 1, 2
PROTO_NUMBERS = {"TCP": 6, "UDP": 17, "SCTP": 132, "ICMP": 1}
MAX_ENDPOINT_ID = 0xFFFF


class NotFound(UserError):
    """A named object does not exist (HTTP 404)."""


@dataclass(frozen=True)
class Peer:
    """One side of a `policy trace`: a local endpoint, or an address with its identity."""

    ip: str
    identity: int
    endpoint: EndpointRecord | None

    def describe(self) -> str:
        return self.endpoint.key if self.endpoint else f"{self.ip} (identity {self.identity})"


class _CidrIdentities(NamedTuple):
    """The policies' prefixes and their identities, kept until the prefixes change."""

    prefixes: frozenset[IPv4Network]
    labels: dict[int, frozenset[Any]]  # identity -> labels
    prefix_of: dict[int, IPv4Network]
    identity_of: dict[IPv4Network, int]


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.state_file = StateFile(config.state_dir)
        self.state = AgentState()
        self.identities = IdentityAllocator()
        self.rules = RuleTable()
        self.parsed: dict[tuple, Policy] = {}
        self._compile_cache = CompileCache()
        self._cidr = _CidrIdentities(frozenset(), {}, {}, {})
        self.node: NodeInfo | None = None
        self.maps: NodeMaps | None = None
        self.writer: PolicyWriter | None = None
        self.ipcache: IpcacheWriter | None = None
        self.ipam = Ipam(config.pod_cidr, set())
        # Snapshots for readers on other threads (flows): replaced, never mutated.
        self.identity_labels: dict[int, frozenset[Any]] = dict(RESERVED_LABELS)
        self.endpoints_by_ip: dict[str, EndpointRecord] = {}
        self._compiled: dict[int, EndpointPolicy] = {}
        self._rule_shapes: dict[int, tuple[bool, bool]] | None = None

    # ---- start and stop ------------------------------------------------------------------
    @memory.one_change
    def start(self) -> None:
        """Create or adopt the node, its maps and every recorded endpoint."""
        self.state = self.state_file.load()
        self.identities = IdentityAllocator.from_json(self.state.identities)
        self.rules = RuleTable.from_json(self.state.rules) if self.state.rules else RuleTable()
        self.parsed = self._parse_stored(self.state.policies)
        self.node = setup_node(self.config.node_netns, self.config.node_ip)
        self.maps = NodeMaps.open(self.config.bpf_dir)
        self.writer = PolicyWriter(self.maps)
        self.ipcache = IpcacheWriter(self.maps)
        self.ipam.restore({IPv4Address(ep.ipv4): ep.key for ep in self.state.endpoints.values()})
        adopted = 0
        for ep in list(self.state.endpoints.values()):
            if self._adopt_endpoint(ep):
                adopted += 1
        self._detach_unknown_endpoints()
        self._sync_datapath()
        log.info(
            "agent started",
            extra={
                "fields": {
                    "node": self.config.node_name,
                    "endpoints": len(self.state.endpoints),
                    "adopted": adopted,
                    "policies": len(self.policies),
                    "bpf_dir": self.config.bpf_dir,
                }
            },
        )

    def _adopt_endpoint(self, ep: EndpointRecord) -> bool:
        """Keep a recorded endpoint: re-create what is missing, never disturb what works."""
        assert self.node is not None
        if inspect_pod(self.node, ep.netns, ep.host_ifname, IPv4Address(ep.ipv4)):
            if not is_attached(self.config.bpf_dir, ep.id):
                self._attach(ep)
            return True
        log.warning("endpoint was broken; re-plumbing it", extra={"fields": {"endpoint": ep.key}})
        # The pod's namespace stays (its processes are the workload); the veth is rebuilt.
        delete_node_link(self.node, ep.host_ifname)
        link = create_pod(
            self.node, ep.netns, ep.host_ifname, IPv4Address(ep.ipv4), reuse_netns=True
        )
        self._attach(ep, link.host_ifindex)
        return False

    def _detach_unknown_endpoints(self) -> None:
        """Programs and datapath state of endpoint ids the state does not know (leftovers
        of an agent that died mid-delete): detach and forget them."""
        assert self.writer is not None
        for ep_id in pinned_endpoint_ids(self.config.bpf_dir):
            if ep_id not in self.state.endpoints:
                log.warning("detaching an unknown endpoint", extra={"fields": {"id": ep_id}})
                detach_endpoint(self.config.bpf_dir, ep_id)
                self.writer.remove_endpoint(ep_id)

    def _attach(self, ep: EndpointRecord, ifindex: int | None = None) -> None:
        assert self.node is not None
        if ifindex is None:
            info = inspect_pod(self.node, ep.netns, ep.host_ifname, IPv4Address(ep.ipv4))
            assert info is not None
            ifindex = info.host_ifindex
        attach_endpoint(
            self.config.bpf_dir, ep.id, IPv4Address(ep.ipv4), ifindex, self.config.node_netns
        )

    def stop(self) -> None:
        """Leave everything enforcing; only our own handles go."""
        self._save()
        if self.maps is not None:
            self.maps.close()

    def _save(self) -> None:
        self.state.identities = self.identities.to_json()
        self.state_file.save(self.state, self.rules.since(self.state_file.rules_saved))

    # ---- endpoints -----------------------------------------------------------------------
    def endpoint_view(self, ep: EndpointRecord) -> dict[str, Any]:
        return {
            "id": ep.id,
            "namespace": ep.namespace,
            "name": ep.name,
            "netns": ep.netns,
            "ipv4": ep.ipv4,
            "identity": ep.identity,
            "labels": ep.labels,
            "identity_labels": sorted(str(lb) for lb in self.identity_labels.get(ep.identity, ())),
            "ports": [str(p) for p in ep.ports],
            "host_ifname": ep.host_ifname,
            "created": ep.created,
        }

    def find_endpoint(self, namespace: str, name: str) -> EndpointRecord:
        for ep in self.state.endpoints.values():
            if ep.namespace == namespace and ep.name == name:
                return ep
        raise NotFound("endpoint", f"{namespace}/{name} does not exist")

    def list_endpoints(self) -> list[EndpointRecord]:
        return sorted(self.state.endpoints.values(), key=lambda e: (e.namespace, e.name))

    @memory.one_change
    def add_endpoint(self, req: EndpointCreate) -> EndpointRecord:
        assert self.node is not None
        if any(
            e.namespace == req.namespace and e.name == req.name
            for e in self.state.endpoints.values()
        ):
            raise UserError("endpoint", f"{req.namespace}/{req.name} already exists")
        netns = self.config.pod_netns(req.namespace, req.name)
        if len(netns) > 200:
            raise UserError("name", f"{req.namespace}/{req.name} is too long for a namespace")
        ep_id = self._free_endpoint_id()
        ip = self.ipam.allocate(f"{req.namespace}/{req.name}")
        ep = EndpointRecord(
            id=ep_id,
            namespace=req.namespace,
            name=req.name,
            netns=netns,
            host_ifname=f"mbr{ep_id}",
            ipv4=str(ip),
            labels=dict(req.labels),
            ports=[PortSpec(p.name, p.port, p.protocol) for p in req.ports],
            created=time.time(),
        )
        # Recorded first: an agent killed halfway through leaves an endpoint its restart
        # completes (see _adopt_endpoint), never a pod nobody knows about.
        self.state.endpoints[ep_id] = ep
        self.state.next_endpoint_id = ep_id % MAX_ENDPOINT_ID + 1
        self._save()
        try:
            link = create_pod(self.node, netns, ep.host_ifname, ip)
            # Attached before it has state: the program drops everything until then.
            self._attach(ep, link.host_ifindex)
        except BaseException:
            del self.state.endpoints[ep_id]
            # Undo every step even if one of the undos fails: a leftover veth would make
            # every later add with this id fail.
            for undo in (
                lambda: detach_endpoint(self.config.bpf_dir, ep_id),
                lambda: delete_pod(self.node, netns, ep.host_ifname),
                lambda: self.ipam.release(ip),
            ):
                try:
                    undo()
                except Exception:
                    log.exception("cleanup after a failed endpoint add failed")
            self._save()
            raise
        self._sync_datapath()
        log.info(
            "endpoint added",
            extra={"fields": {"endpoint": ep.key, "id": ep_id, "ipv4": ep.ipv4}},
        )
        return ep

    def _free_endpoint_id(self) -> int:
        candidate = self.state.next_endpoint_id
        for _ in range(MAX_ENDPOINT_ID):
            if candidate not in self.state.endpoints:
                return candidate
            candidate = candidate % MAX_ENDPOINT_ID + 1
        raise UserError("endpoint", f"this node has the maximum of {MAX_ENDPOINT_ID} endpoints")

    @memory.one_change
    def delete_endpoint(self, namespace: str, name: str) -> EndpointRecord:
        assert self.node is not None and self.writer is not None and self.maps is not None
        ep = self.find_endpoint(namespace, name)
        del self.state.endpoints[ep.id]
        self._sync_datapath()  # its address leaves the ipcache, peers' policies forget it
        detach_endpoint(self.config.bpf_dir, ep.id)
        self.writer.remove_endpoint(ep.id)  # state, policy entries and conntrack
        delete_pod(self.node, ep.netns, ep.host_ifname)
        self.ipam.release(IPv4Address(ep.ipv4))
        self._save()
        log.info("endpoint deleted", extra={"fields": {"endpoint": ep.key, "id": ep.id}})
        return ep

    # ---- namespaces ----------------------------------------------------------------------
    def namespace_labels(self, namespace: str) -> dict[str, str]:
        labels = dict(self.state.namespaces.get(namespace, {}))
        labels["kubernetes.io/metadata.name"] = namespace
        return labels

    def list_namespaces(self) -> dict[str, dict[str, str]]:
        names = set(self.state.namespaces) | {e.namespace for e in self.state.endpoints.values()}
        return {ns: self.namespace_labels(ns) for ns in sorted(names)}

    @memory.one_change
    def label_namespace(self, namespace: str, req: NamespaceLabels) -> dict[str, str]:
        if "kubernetes.io/metadata.name" in req.labels:
            raise UserError(
                "labels.kubernetes.io/metadata.name", "is set by the agent and cannot change"
            )
        labels = dict(self.state.namespaces.get(namespace, {}))
        for key, value in req.labels.items():
            if value is None:
                labels.pop(key, None)
            else:
                labels[key] = value
        self.state.namespaces[namespace] = labels
        self._sync_datapath()
        return self.namespace_labels(namespace)

    # ---- policies ------------------------------------------------------------------------
    def _parse_stored(self, stored: list[StoredPolicy]) -> dict[tuple, Policy]:
        if not stored:
            return {}
        parsed = parse_documents(yaml.dump_all([p.document for p in stored], Dumper=_Dumper))
        return {p.key: p for p in parsed}

    @memory.one_change
    def import_policies(self, text: str) -> dict[str, Any]:
        started = time.perf_counter()
        parsed = parse_with_documents(text)  # raises UserError before anything changes
        if not parsed:
            raise UserError("file", "holds no policy documents")
        stored = {p.key: p for p in self.state.policies}
        policies = dict(self.parsed)
        for policy, document in parsed:
            stored[policy.key] = StoredPolicy(policy.kind, policy.namespace, policy.name, document)
            policies[policy.key] = policy
        return self._replace_policies(
            list(stored.values()), policies, [_policy_ref(p) for p, _ in parsed], started
        )

    @memory.one_change
    def delete_policies(
        self, namespace: str | None, name: str | None, kind: str | None, everything: bool
    ) -> dict[str, Any]:
        if everything:
            gone = self.state.policies
        else:
            gone = [
                p
                for p in self.state.policies
                if p.name == name and p.namespace == namespace and kind in (None, p.kind)
            ]
            if not gone:
                where = f"{namespace}/{name}" if namespace else str(name)
                raise NotFound("policy", f"{where} does not exist")
        keep = [p for p in self.state.policies if p not in gone]
        policies = {k: v for k, v in self.parsed.items() if k in {p.key for p in keep}}
        return self._replace_policies(keep, policies, [_stored_ref(p) for p in gone])

    @property
    def policies(self) -> list[Policy]:
        return [self.parsed[k] for k in sorted(self.parsed, key=_policy_order)]

    def _replace_policies(
        self,
        stored: list[StoredPolicy],
        policies: dict[tuple, Policy],
        changed: list[dict[str, Any]],
        started: float | None = None,
    ) -> dict[str, Any]:
        # The clock starts when the request does: parsing is part of the time to enforce.
        started = time.perf_counter() if started is None else started
        stored.sort(key=lambda p: _policy_order(p.key))
        old = (self.state.policies, self.parsed)
        self.state.policies, self.parsed = stored, policies
        self.state.policy_revision += 1
        try:
            self._sync_datapath()
        except BaseException:
            self.state.policies, self.parsed = old
            raise
        elapsed = time.perf_counter() - started
        log.info(
            "policy revision enforced",
            extra={
                "fields": {
                    "revision": self.state.policy_revision,
                    "changed": changed,
                    "seconds": round(elapsed, 4),
                }
            },
        )
        return {
            "revision": self.state.policy_revision,
            "policies": changed,
            "enforced_in_seconds": elapsed,
        }

    def list_policies(self) -> list[dict[str, Any]]:
        return [{**_stored_ref(p), "document": p.document} for p in self.state.policies]

    # ---- the datapath --------------------------------------------------------------------
    def _universe(self) -> tuple[Universe, dict[IPv4Network, int]]:
        """Identities, endpoints and CIDR identities as they are now."""
        prefixes = policy_cidrs(self.policies)
        identities: dict[int, frozenset[Any]] = dict(RESERVED_LABELS)
        endpoints: dict[int, EndpointInfo] = {}
        for ep in self.state.endpoints.values():
            labels = endpoint_labels(
                ep.namespace,
                ep.labels,
                self.namespace_labels(ep.namespace),
                cluster=self.config.cluster,
            )
            ep.identity = self.identities.for_labels(labels)
            identities[ep.identity] = labels
            endpoints[ep.id] = EndpointInfo(
                ep_id=ep.id,
                namespace=ep.namespace,
                name=ep.name,
                identity=ep.identity,
                labels=labels,
                named_ports={p.name: (p.port, PROTO_NUMBERS[p.protocol]) for p in ep.ports},
            )
        key = frozenset(prefixes)
        if self._cidr.prefixes != key:  # only a policy change can change the prefixes
            labels_of = cidr_identities_labels(key)
            ids = {p: self.identities.for_prefix(p) for p in labels_of}
            self._cidr = _CidrIdentities(
                key,
                {ids[p]: labels for p, labels in labels_of.items()},
                {i: p for p, i in ids.items()},
                ids,
            )
        identities.update(self._cidr.labels)
        universe = Universe(
            identities=identities,
            endpoints=endpoints,
            cidr_identities=dict(self._cidr.prefix_of),
        )
        return universe, self._cidr.identity_of

    def _desired_ipcache(
        self, cidr_ids: dict[IPv4Network, int]
    ) -> dict[IPv4Network, tuple[int, int]]:
        assert self.node is not None
        desired: dict[IPv4Network, tuple[int, int]] = {
            IPv4Network("0.0.0.0/0"): (IDENTITY_WORLD, 0)
        }
        for prefix, ident in cidr_ids.items():
            desired[prefix] = (ident, 0)
        for addr in self.node.host_addresses():
            desired[IPv4Network(f"{addr}/32")] = (IDENTITY_HOST, 0)
        for ep in self.state.endpoints.values():
            desired[IPv4Network(f"{ep.ipv4}/32")] = (ep.identity, ep.id)
        return desired

    def _sync_datapath(self) -> None:
        assert self.writer is not None and self.ipcache is not None
        universe, cidr_ids = self._universe()
        # Identities on their way out keep their entries until no address maps to them.
        outgoing = {
            i: labels for i, labels in self.identity_labels.items() if i not in universe.identities
        }
        if outgoing:
            self._apply_policy(replace(universe, identities={**outgoing, **universe.identities}))
        else:
            self._apply_policy(universe)
        self.ipcache.sync(self._desired_ipcache(cidr_ids))
        self.endpoints_by_ip = {ep.ipv4: ep for ep in self.state.endpoints.values()}
        if outgoing:
            self._apply_policy(universe)
        self.identity_labels = dict(universe.identities)
        self.identities.retain(
            {labels_key(universe.identities[e.identity]) for e in universe.endpoints.values()},
            cidr_ids.keys(),
        )
        self._save()

    def _apply_policy(self, universe: Universe) -> None:
        assert self.writer is not None
        compiled = compile_policies(self.policies, universe, self.rules, self._compile_cache)
        self.writer.apply(
            compiled, {ep_id: info.identity for ep_id, info in universe.endpoints.items()}
        )
        self._compiled = compiled
        self._universe_now = universe
        self._rule_shapes = None

    @property
    def rule_shapes(self) -> dict[int, tuple[bool, bool]]:
        """rule id -> (its entries name peers, they name protocols or ports), for flow
        records. Computed when a flow first asks, not on every policy change; endpoints
        with the same policy share one object, so each is read once."""
        if self._rule_shapes is None:
            shapes: dict[int, tuple[bool, bool]] = {}
            unique = {id(p): p for p in self._compiled.values()}
            for policy in unique.values():
                for e in policy.entries:
                    l3, l4 = shapes.get(e.rule_id, (False, False))
                    shapes[e.rule_id] = (l3 or e.identity != 0, l4 or e.proto != 0)
            self._rule_shapes = shapes
        return self._rule_shapes

    def gc_conntrack(self) -> int:
        assert self.maps is not None
        return conntrack.gc_expired(self.maps)

    # ---- explaining verdicts -------------------------------------------------------------
    def _peer(self, spec: str, field: str) -> Peer:
        if "/" in spec:
            ns, _, name = spec.partition("/")
            ep = self.find_endpoint(ns, name)
            return Peer(ep.ipv4, ep.identity, ep)
        if spec == "host":
            assert self.node is not None
            return Peer(str(self.config.node_ip), IDENTITY_HOST, None)
        if spec == "world":
            return Peer("0.0.0.0", IDENTITY_WORLD, None)
        try:
            ip = IPv4Address(spec)
        except ValueError:
            raise UserError(
                field, f"{spec!r} is not NS/NAME, host, world or an IPv4 address"
            ) from None
        ep = self.endpoints_by_ip.get(str(ip))
        if ep:
            return Peer(ep.ipv4, ep.identity, ep)
        identity = self._identity_of_ip(ip)
        return Peer(str(ip), identity, None)

    def _identity_of_ip(self, ip: IPv4Address) -> int:
        """The ipcache's answer for an address: its longest matching prefix."""
        assert self.node is not None
        best: tuple[int, int] = (-1, IDENTITY_WORLD)
        desired = self._desired_ipcache(
            {p: i for i, p in self._universe_now.cidr_identities.items()}
        )
        for prefix, (ident, _) in desired.items():
            if ip in prefix and prefix.prefixlen > best[0]:
                best = (prefix.prefixlen, ident)
        return best[1]

    def trace(self, req: TraceRequest) -> dict[str, Any]:
        src, dst = self._peer(req.src, "src"), self._peer(req.dst, "dst")
        if not src.endpoint and not dst.endpoint:
            raise UserError("dst", "at least one side must be an endpoint of this node")
        proto = PROTO_NUMBERS[req.protocol]
        steps: list[dict[str, Any]] = []
        allowed = True
        for direction, local, peer in (("egress", src, dst), ("ingress", dst, src)):
            if local.endpoint is None:
                continue
            info = self._universe_now.endpoints[local.endpoint.id]
            decision = evaluate(
                self.policies,
                self._universe_now,
                endpoint=info,
                direction=direction,
                peer_identity=peer.identity,
                proto=proto,
                port=req.dport,
            )
            dp_allowed, rule_id = lookup(
                self._compiled[local.endpoint.id],
                0 if direction == "ingress" else 1,
                peer.identity,
                proto,
                req.dport,
            )
            rule = self.rules.get(rule_id)
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
        }


_Dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def _policy_order(key: tuple) -> tuple[str, str, str]:
    kind, namespace, name = key
    return (kind, namespace or "", name)


def _policy_ref(p: Policy) -> dict[str, Any]:
    return {"kind": p.kind, "namespace": p.namespace, "name": p.name}


def _stored_ref(p: StoredPolicy) -> dict[str, Any]:
    return {"kind": p.kind, "namespace": p.namespace, "name": p.name}
