"""From the agent's records to the datapath: identities, the ipcache and every endpoint's
policy, written in an order that never lets through traffic that neither the old nor the
new state allows:

  1. policy for the union of the old and the new identities (entries for an identity
     exist before any address maps to it),
  2. the ipcache (addresses move to their new identities),
  3. policy without the identities nothing maps to any more.

A sync costs what changed: endpoints' labels are recomputed only for changed records, the
policies' CIDR identities only when the policies change, and the ipcache's CIDR part is
compared only when it changed (the endpoints' addresses are an overlay on it).

A sync is all or nothing. Before the first write it counts the most entries the policy map
and the ipcache will hold on the way (`PolicyWriter.peak`, `IpcacheWriter.peak`) and
refuses with `NodeMapFull` if a map is too small. A write that fails anyway leaves the
caller to put its records back and sync again: this object then forgets what the failed
sync cached (CIDR and endpoint identities, numbers handed out) and re-reads the maps, and
treats the identities the failed sync may have written as outgoing, so the way back keeps
the same safe order.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import lru_cache
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import NamedTuple

from membrane.abi import Identity, IpProto
from membrane.agent.addresses import AddressPrefixes
from membrane.agent.cidr import CidrIdentities
from membrane.agent.config import AgentConfig
from membrane.agent.identities import IdentityAllocator, labels_key
from membrane.agent.namespaces import NamespaceStore
from membrane.agent.state import EndpointRecord
from membrane.datapath import conntrack
from membrane.datapath.ipcache import (
    Address,
    IpcacheWriter,
    Network,
    RawKey,
    RawValue,
    host_key,
    raw_key,
    world_prefix,
)
from membrane.datapath.nodemaps import NodeMapFull, NodeMaps
from membrane.datapath.policy import PolicyWriter
from membrane.endpoint.node import NodeInfo
from membrane.identity.labels import (
    RESERVED_LABELS,
    Label,
    endpoint_labels,
)
from membrane.netns.addresses import AddressDump
from membrane.policy import (
    CompileCache,
    EndpointInfo,
    EndpointPolicy,
    Policy,
    RuleTable,
    Universe,
    address_prefixes,
    compile_policies,
    policy_cidrs,
)


class _EndpointIdentity(NamedTuple):
    """An endpoint's identity labels, kept while its record and namespace labels stay."""

    record: EndpointRecord
    namespace_labels: dict[str, str]
    info: EndpointInfo


class _Checkpoint(NamedTuple):
    """What a sync changes in the reconciler before it writes (see `DatapathReconciler.sync`)."""

    cidr: CidrIdentities
    cidr_policies: tuple[Policy, ...] | None
    prefixes_of: dict[int, tuple[Policy, frozenset[Network]]]
    enforced: Mapping[int, frozenset[Label]]
    numbering: tuple[int, int]


@dataclass(frozen=True)
class Reconciled:
    """What the datapath enforces after a sync."""

    universe: Universe
    compiled: Mapping[int, EndpointPolicy]  # endpoint id -> policy
    host_addresses: tuple[Address, ...]  # what the ipcache maps to the host identity
    address_identities: Mapping[str, int]  # pod address -> its own identity (addresses.py)


class DatapathReconciler:
    """The one writer of identities, ipcache and policy for a node's maps."""

    def __init__(
        self,
        config: AgentConfig,
        node: NodeInfo,
        maps: NodeMaps,
        identities: IdentityAllocator,
        rules: RuleTable,
    ) -> None:
        self.config = config
        self.node = node
        self.maps = maps
        self.identities = identities
        self.rules = rules
        self.writer = PolicyWriter(maps)
        self._cidr = CidrIdentities.empty(config.ipv6)
        world4 = self._cidr.ipcache[raw_key(world_prefix(4))][0]
        self.ipcache = IpcacheWriter(maps, 4, world4)
        self.ipcache6 = IpcacheWriter(maps, 6)
        self._compile_cache = CompileCache(config.cidr_match_mode)
        self._node_addresses: AddressDump | None = None
        self._addresses = AddressPrefixes()
        # endpoint id -> its addresses' own identities (IPv4, IPv6; 0: none), and the label
        # sets behind them (kept by the allocator)
        self._address_identities: dict[int, tuple[int, int]] = {}
        self._host_address_identities: dict[Address, int] = {}
        self._address_label_keys: set[str] = set()
        self._cidr_policies: tuple[Policy, ...] | None = None  # what `_cidr` was made from
        self._prefixes_of: dict[int, tuple[Policy, frozenset[Network]]] = {}
        self._endpoint_identities: dict[int, _EndpointIdentity] = {}
        self._enforced_identities: Mapping[int, frozenset[Label]] = dict(RESERVED_LABELS)
        # The identities a sync in progress writes (a failed one may have left them).
        self._writing: Mapping[int, frozenset[Label]] = {}

    def sync(
        self,
        endpoints: dict[int, EndpointRecord],
        namespaces: NamespaceStore,
        policies: tuple[Policy, ...],
    ) -> Reconciled:
        """Bring the datapath to `endpoints` under `policies`. Endpoint records whose
        identity changed are replaced in `endpoints`. Raises NodeMapFull, having written
        nothing, when a map is too small for the change. On any failure this object is as
        before the call (caches, identity numbers), and after a failed write it re-reads
        the maps: syncing the previous records then restores what the kernel enforced."""
        saved = _Checkpoint(
            self._cidr,
            self._cidr_policies,
            self._prefixes_of,
            self._enforced_identities,
            self.identities.checkpoint(),
        )
        self._writing = {}
        try:
            return self._sync(endpoints, namespaces, policies)
        except BaseException as err:
            self._rollback(saved, wrote=not isinstance(err, NodeMapFull))
            raise

    def _sync(
        self,
        endpoints: dict[int, EndpointRecord],
        namespaces: NamespaceStore,
        policies: tuple[Policy, ...],
    ) -> Reconciled:
        if self._node_addresses is None:  # kept: a socket of the node namespace
            self._node_addresses = self.node.address_dump()
        hosts = tuple(self.node.host_addresses(self._node_addresses))
        universe = self._universe(endpoints, namespaces, policies, hosts)
        identities = {ep_id: info.identity for ep_id, info in universe.endpoints.items()}
        # Identities on their way out keep their entries until no address maps to them.
        outgoing = self._enforced_identities.keys() - universe.identities.keys()
        steps: list[Mapping[int, EndpointPolicy]] = []
        if outgoing:
            kept = {i: self._enforced_identities[i] for i in outgoing}
            union = replace(universe, identities={**kept, **universe.identities})
            steps.append(self._compile(policies, union))
        compiled = self._compile(policies, universe)
        steps.append(compiled)
        overlay, overlay6 = self._address_overlays(hosts, endpoints)
        self._check_capacity([(step, identities) for step in steps], overlay, overlay6)
        self._writing = universe.identities
        self.writer.apply(steps[0], identities)
        moved = [
            self.ipcache.sync_layers(self._cidr.ipcache, overlay),
            self.ipcache6.sync_layers(self._cidr.ipcache6, overlay6),
        ]
        if any(m.added or m.updated or m.removed for m in moved):
            # Peers may have other identities now: established connections are checked
            # again (a policy revision bumped before this write does not cover packets
            # verified against the old ipcache in between).
            self.writer.revalidate(universe.endpoints)
        if outgoing:
            self.writer.apply(compiled, identities)
        self._enforced_identities = universe.identities
        self.identities.retain(
            {labels_key(info.labels) for info in universe.endpoints.values()}
            | self._address_label_keys,
            self._cidr.prefixes,
        )
        return Reconciled(universe, compiled, hosts, self._address_identity_of(endpoints))

    def _check_capacity(
        self,
        steps: list[tuple[Mapping[int, EndpointPolicy], Mapping[int, int]]],
        overlay: Mapping[RawKey, RawValue],
        overlay6: Mapping[RawKey, RawValue],
    ) -> None:
        """Refuse, before anything is written, a sync that would overflow a map."""
        size = self.maps.policy.max_entries
        needed = self.writer.peak(steps)
        if needed > size:
            raise NodeMapFull("policy", needed, size, "membrane agent run --policy-map-max")
        for name, writer, base, addresses in (
            ("ipcache", self.ipcache, self._cidr.ipcache, overlay),
            ("ipcache6", self.ipcache6, self._cidr.ipcache6, overlay6),
        ):
            size = writer.map.max_entries
            needed = writer.peak(base, addresses)
            if needed > size:
                raise NodeMapFull(name, needed, size, "the policies' CIDR prefixes and pods")

    def _rollback(self, saved: _Checkpoint, wrote: bool) -> None:
        """Forget what a failed sync cached; after a failed write, re-read the maps."""
        self._cidr, self._cidr_policies = saved.cidr, saved.cidr_policies
        self._prefixes_of = saved.prefixes_of
        self._endpoint_identities.clear()  # recomputed: their numbers may be forgotten
        # Numbers a map may have held are never handed out again.
        self.identities.rollback(saved.numbering, reuse=not wrote)
        self._enforced_identities = {**self._writing, **saved.enforced}
        if wrote:
            self.writer.refresh()
            self.ipcache.refresh()
            self.ipcache6.refresh()

    def close(self) -> None:
        if self._node_addresses is not None:
            self._node_addresses.close()
            self._node_addresses = None

    def remove_endpoint(self, ep_id: int) -> None:
        """Its policy entries, state and conntrack entries (after its programs are gone)."""
        self.writer.remove_endpoint(ep_id)
        self._endpoint_identities.pop(ep_id, None)

    def labels_of(self, ep: EndpointRecord, namespaces: NamespaceStore) -> frozenset[Label]:
        """The endpoint's identity labels (no identity number is handed out)."""
        return endpoint_labels(
            ep.namespace, ep.labels, namespaces.labels(ep.namespace), cluster=self.config.cluster
        )

    def gc_conntrack(self) -> int:
        return conntrack.gc_expired(self.maps)

    # ---- parts of a sync -----------------------------------------------------------------
    def _universe(
        self,
        endpoints: dict[int, EndpointRecord],
        namespaces: NamespaceStore,
        policies: tuple[Policy, ...],
        hosts: tuple[Address, ...],
    ) -> Universe:
        """Identities, endpoints and CIDR identities as they are now."""
        if policies is not self._cidr_policies:  # only a policy change changes the prefixes
            self._cidr_policies = policies
            prefixes = self._policy_prefixes(policies)
            if prefixes != self._cidr.prefixes:
                self._cidr = self._cidr.updated(prefixes, self.identities)
            wanted = address_prefixes(policies, self.config.cidr_match_mode)
            if wanted != self._addresses.prefixes:
                self._addresses = AddressPrefixes(wanted)
        identities: dict[int, frozenset[Label]] = dict(RESERVED_LABELS)
        # Only this node's world identities: a rule for the world then compiles to the
        # one or two entries the ipcache can ever give, not three.
        for unused in _UNUSED_WORLDS[self.config.ipv6]:
            del identities[unused]
        infos: dict[int, EndpointInfo] = {}
        for ep_id, ep in list(endpoints.items()):
            info = self._endpoint_info(ep, namespaces.labels(ep.namespace))
            if ep.identity != info.identity:
                endpoints[ep_id] = replace(ep, identity=info.identity)
            identities[info.identity] = info.labels
            infos[ep_id] = info
        for gone in self._endpoint_identities.keys() - endpoints.keys():
            del self._endpoint_identities[gone]
        identities.update(self._cidr.labels)
        identities.update(self._number_addresses(endpoints, hosts))
        return Universe(
            identities=identities,
            endpoints=infos,
            cidr_identities=self._cidr.prefix_of,
            allow_localhost=self.config.allow_localhost,
            cidr_match_mode=self.config.cidr_match_mode,
        )

    def _number_addresses(
        self, endpoints: Mapping[int, EndpointRecord], hosts: tuple[Address, ...]
    ) -> dict[int, frozenset[Label]]:
        """Pod-address identities (membrane.agent.addresses) of every endpoint and node
        address an address prefix holds (an ipBlock counts the node's addresses too);
        returns their labels by identity."""
        found: dict[int, frozenset[Label]] = {}
        self._address_identities = {}
        self._host_address_identities = {}
        self._address_label_keys = set()
        if not self._addresses.prefixes:
            return found

        def number(addr: Address | None) -> int:
            labels = None if addr is None else self._addresses.labels_of(addr)
            if labels is None:
                return 0
            ident = self.identities.for_labels(labels)
            found[ident] = labels
            self._address_label_keys.add(labels_key(labels))
            return ident

        for ep in endpoints.values():
            own = (number(IPv4Address(ep.ipv4)), number(_ipv6(ep) if self.config.ipv6 else None))
            if any(own):
                self._address_identities[ep.id] = own
        for addr in hosts:
            if ident := number(addr):
                self._host_address_identities[addr] = ident
        return found

    def _policy_prefixes(self, policies: tuple[Policy, ...]) -> frozenset[Network]:
        """Every policy's CIDR prefixes, each policy's computed once (policies are
        immutable; a changed one is a new object)."""
        known: dict[int, tuple[Policy, frozenset[Network]]] = {}
        for policy in policies:
            found = self._prefixes_of.get(id(policy))
            if found is None or found[0] is not policy:
                found = (policy, frozenset(policy_cidrs((policy,))))
            known[id(policy)] = found
        self._prefixes_of = known
        return frozenset().union(*(prefixes for _, prefixes in known.values()))

    def _endpoint_info(self, ep: EndpointRecord, ns_labels: dict[str, str]) -> EndpointInfo:
        known = self._endpoint_identities.get(ep.id)
        # The record's identity is ours to change (a replaced record with equal fields
        # otherwise) so compare what the labels come from.
        if (
            known is not None
            and known.namespace_labels == ns_labels
            and _same_inputs(known.record, ep)
        ):
            return known.info
        labels = endpoint_labels(ep.namespace, ep.labels, ns_labels, cluster=self.config.cluster)
        info = EndpointInfo(
            ep_id=ep.id,
            namespace=ep.namespace,
            name=ep.name,
            identity=self.identities.for_labels(labels),
            labels=labels,
            named_ports={p.name: (p.port, int(IpProto[p.protocol])) for p in ep.ports},
        )
        self._endpoint_identities[ep.id] = _EndpointIdentity(ep, ns_labels, info)
        return info

    def _address_identity_of(self, endpoints: Mapping[int, EndpointRecord]) -> dict[str, int]:
        """Address (text) -> its own identity, for `policy trace`."""
        found = {str(addr): ident for addr, ident in self._host_address_identities.items()}
        for ep_id, (own4, own6) in self._address_identities.items():
            ep = endpoints[ep_id]
            if own4:
                found[ep.ipv4] = own4
            if own6 and ep.ipv6:
                found[ep.ipv6] = own6
        return found

    def _address_overlays(
        self, hosts: tuple[Address, ...], endpoints: Mapping[int, EndpointRecord]
    ) -> tuple[dict[RawKey, RawValue], dict[RawKey, RawValue]]:
        """The node's and the endpoints' addresses (host prefixes over any CIDR prefix),
        IPv4 and IPv6; the kube-apiserver's addresses, unless they are the node's or a
        pod's (the host and pod identities are what policies name them by then)."""
        overlays: dict[int, dict[RawKey, RawValue]] = {4: {}, 6: {}}
        for addr in self.config.kube_apiserver_ips:
            overlays[addr.version][host_key(addr)] = (int(Identity.KUBE_APISERVER), 0, 0)
        for addr in hosts:
            own = self._host_address_identities.get(addr, 0)
            overlays[addr.version][host_key(addr)] = (int(Identity.HOST), 0, own)
        for ep in endpoints.values():
            own4, own6 = self._address_identities.get(ep.id, (0, 0))
            overlays[4][_recorded_host_key(ep.ipv4)] = (ep.identity, ep.id, own4)
            if ep.ipv6 is not None and self.config.ipv6:
                overlays[6][_recorded_host_key(ep.ipv6)] = (ep.identity, ep.id, own6)
        return overlays[4], overlays[6]

    def _compile(
        self, policies: tuple[Policy, ...], universe: Universe
    ) -> Mapping[int, EndpointPolicy]:
        return compile_policies(policies, universe, self.rules, self._compile_cache)


_UNUSED_WORLDS = {
    True: (int(Identity.WORLD),),  # dual-stack: world-ipv4 and world-ipv6 stand for it
    False: (int(Identity.WORLD_IPV4), int(Identity.WORLD_IPV6)),
}


def _ipv6(ep: EndpointRecord) -> IPv6Address | None:
    return None if ep.ipv6 is None else IPv6Address(ep.ipv6)


def _same_inputs(a: EndpointRecord, b: EndpointRecord) -> bool:
    return a is b or (a.namespace == b.namespace and a.labels == b.labels and a.ports == b.ports)


@lru_cache(maxsize=1 << 17)
def _recorded_host_key(addr: str) -> RawKey:
    """The ipcache key of an endpoint's address as its record holds it: every sync keys
    every endpoint's addresses, and parsing them was ~5 ms a change with 500 pods."""
    return host_key(ip_address(addr))
