"""The node agent: its parts composed, and every change to the node as one method.

Changes run on one worker thread (the server serialises them), so the parts need no locks.
Each change ends by publishing a new `Snapshot` (membrane.agent.snapshot) with a single
assignment; readers on any thread use only `agent.snapshot`. A change whose datapath sync
fails (a map too small, refused before any write, or a write that failed) is undone: the
records go back, the datapath is synced to them again, then the error is reported.

    endpoints   EndpointLifecycle   add / adopt / delete, plumbing and program attachment
    namespaces  NamespaceStore      namespace labels
    policies    PolicyStore         policies as written and parsed
    datapath    DatapathReconciler  identities -> ipcache -> policy, in a safe order
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from membrane.agent import memory
from membrane.agent.config import AgentConfig
from membrane.agent.endpoints import EndpointLifecycle
from membrane.agent.flows import EVENTS_RING_BYTES
from membrane.agent.identities import IdentityAllocator
from membrane.agent.namespaces import NamespaceStore
from membrane.agent.notes import PolicyNotes
from membrane.agent.policies import PolicyChange, PolicyKey, PolicyStore
from membrane.agent.reconcile import DatapathReconciler, Reconciled
from membrane.agent.snapshot import Snapshot
from membrane.agent.state import AgentState, EndpointRecord, StateFile
from membrane.api.models import EndpointCreate, NamespaceLabels, ServiceCreate
from membrane.datapath.monitor import set_monitor_aggregation
from membrane.datapath.nodemaps import NodeMapFull, NodeMaps
from membrane.datapath.upgrade import NodeMapMigration
from membrane.endpoint.node import NodeInfo, setup_node
from membrane.errors import NotFound, UserError
from membrane.policy import RuleTable
from membrane.policy.rules import policy_subjects
from membrane.service.manager import ServiceManager, start_services
from membrane.service.nodeport import DeviceWatcher, start_nodeport

log = logging.getLogger("membrane.agent")


@dataclass
class Agent:
    """A started agent (build it with `Agent.start`): every part exists."""

    config: AgentConfig
    state_file: StateFile
    state: AgentState
    identities: IdentityAllocator
    rules: RuleTable
    node: NodeInfo
    maps: NodeMaps
    endpoints: EndpointLifecycle
    namespaces: NamespaceStore
    policies: PolicyStore
    datapath: DatapathReconciler
    policy_notes: PolicyNotes
    snapshot: Snapshot  # replaced at the end of every change; read by other threads
    services: ServiceManager | None = None  # Kubernetes services (membrane.service)
    nodeport: DeviceWatcher | None = None  # the per-packet path on --devices (if any)
    # Deleted endpoints out of force whose programs, veth and address are still to go.
    _removals: list[EndpointRecord] = field(default_factory=list)

    # ---- start and stop ------------------------------------------------------------------
    @classmethod
    @memory.one_change
    def start(cls, config: AgentConfig) -> Agent:
        """Create or adopt the node, its maps and every recorded endpoint, and enforce the
        recorded policies."""
        state_file = StateFile(config.state_dir)
        state = state_file.load()
        identities = IdentityAllocator.from_json(state.identities)
        rules = RuleTable.from_json(state.rules) if state.rules else RuleTable()
        policies = PolicyStore(state.policies)
        namespaces = NamespaceStore(state.namespaces)
        node = setup_node(config.node_netns, config.node_ip, config.node_ipv6)
        # A new build meets the old one's pins: maps whose layout changed are migrated
        # first, adoption swaps every endpoint's program, then the old maps go.
        migration = NodeMapMigration.start(config.bpf_dir)
        maps = NodeMaps.open(
            config.bpf_dir, {"policy": config.policy_map_max, "events": EVENTS_RING_BYTES}
        )
        set_monitor_aggregation(maps.monitor_config, config.monitor_aggregation)
        endpoints = EndpointLifecycle(config, state, node)
        datapath = DatapathReconciler(config, node, maps, identities, rules)
        swept = endpoints.sweep_warm_pairs()  # of an agent killed before it used them
        if swept:
            log.info("deleted veths made ahead", extra={"fields": {"devices": swept}})
        adopted = endpoints.adopt_all()
        migration.finish()
        for ep_id in endpoints.unknown_ids():
            log.warning("detaching an unknown endpoint", extra={"fields": {"id": ep_id}})
            endpoints.detach(ep_id)
            datapath.remove_endpoint(ep_id)
        done = datapath.sync(state.endpoints, namespaces, policies.current.parsed)
        notes = PolicyNotes(config)
        agent = cls(
            config=config,
            state_file=state_file,
            state=state,
            identities=identities,
            rules=rules,
            node=node,
            maps=maps,
            endpoints=endpoints,
            namespaces=namespaces,
            policies=policies,
            datapath=datapath,
            policy_notes=notes,
            snapshot=_snapshot(
                config,
                state,
                namespaces,
                policies,
                rules,
                done,
                None,
                notes.of(policies.current.parsed),
            ),
        )
        agent._save()
        endpoints.preload_next()
        agent.services = start_services(config, lambda: agent.state.endpoints.values())
        agent.nodeport = start_nodeport(
            config.bpf_dir,
            config.bpf_lb_mode,
            config.node_ip,
            config.devices,
            config.node_netns,
            node_ipv6=config.node_ipv6,
        )
        log.info(
            "agent started",
            extra={
                "fields": {
                    "node": config.node_name,
                    "endpoints": len(state.endpoints),
                    "adopted": adopted,
                    "policies": len(state.policies),
                    "bpf_dir": config.bpf_dir,
                }
            },
        )
        return agent

    def stop(self) -> None:
        """Leave everything enforcing; only our own handles go."""
        self.finish_removals()
        self._save()
        self.endpoints.close()
        if self.services is not None:
            self.services.close()
        if self.nodeport is not None:
            self.nodeport.close()
        self.datapath.close()
        self.maps.close()

    # ---- endpoints -----------------------------------------------------------------------
    @memory.one_change
    def add_endpoint(self, req: EndpointCreate) -> EndpointRecord:
        self.finish_removals()  # their ids, addresses and veth names are free only then
        ep = self.endpoints.create(req, self._save)
        try:
            self._reconcile(lambda: self.endpoints.forget(ep))
        except BaseException as err:
            # Plumbed and attached, but never in force: undone completely.
            self._remove(ep)
            if isinstance(err, NodeMapFull):
                raise self._endpoint_refused(ep, err) from None
            raise
        log.info(
            "endpoint added",
            extra={"fields": {"endpoint": ep.key, "id": ep.id, "ipv4": ep.ipv4, "ipv6": ep.ipv6}},
        )
        self._follow_endpoints()
        self.endpoints.preload_next()  # for the next add: its verifier runs while we idle
        return self.state.endpoints[ep.id]

    @memory.one_change
    def delete_endpoint(
        self, namespace: str, name: str, *, finish_later: bool = False
    ) -> EndpointRecord:
        """`finish_later`: return once the endpoint is out of force (records, ipcache,
        peers' policies, saved); its programs, veth and address go at `finish_removals`,
        which the next add and `stop` run first if the caller did not. For a runtime's
        DEL: its container is stopping, nothing waits for the veth to go."""
        ep = self.snapshot.endpoint(namespace, name)
        if ep is None:
            raise NotFound("endpoint", f"{namespace}/{name} does not exist")
        record = self.state.endpoints[ep.id]
        self.endpoints.forget(ep)
        # Its address leaves the ipcache, peers' policies forget it.
        self._reconcile(lambda: self.state.endpoints.__setitem__(ep.id, record))
        if finish_later:
            self._removals.append(ep)
        else:
            self._remove(ep)
        log.info("endpoint deleted", extra={"fields": {"endpoint": ep.key, "id": ep.id}})
        self._follow_endpoints()
        return ep

    # ---- namespaces ----------------------------------------------------------------------
    @memory.one_change
    def label_namespace(self, namespace: str, req: NamespaceLabels) -> dict[str, str]:
        before = self.namespaces.stored(namespace)
        self.namespaces.change(namespace, req.labels)
        self._reconcile(lambda: self.namespaces.restore(namespace, before))
        return self.namespaces.labels(namespace)

    # ---- policies ------------------------------------------------------------------------
    @memory.one_change
    def import_policies(self, text: str) -> dict[str, Any]:
        started = time.perf_counter()  # parsing is part of the time to enforce
        return self._enforce(self.policies.stage_import(text), started)

    @memory.one_change
    def delete_policies(
        self, namespace: str | None, name: str | None, kind: str | None, everything: bool
    ) -> dict[str, Any]:
        started = time.perf_counter()
        return self._enforce(self.policies.stage_delete(namespace, name, kind, everything), started)

    def _enforce(self, change: PolicyChange, started: float) -> dict[str, Any]:
        old = self.policies.current
        self.policies.current = change.policies
        self.state.policies = list(change.policies.stored)
        self.state.policy_revision += 1

        def undo() -> None:
            self.policies.current = old
            self.state.policies = list(old.stored)
            self.state.policy_revision -= 1

        try:
            self._reconcile(undo)
        except NodeMapFull as full:
            names = ", ".join(_policy_name(ref["namespace"], ref["name"]) for ref in change.changed)
            raise UserError(f"policy {names}", full.shortfall()) from None
        elapsed = time.perf_counter() - started
        revision = self.state.policy_revision
        log.info(
            "policy revision enforced",
            extra={
                "fields": {
                    "revision": revision,
                    "changed": change.changed,
                    "seconds": round(elapsed, 4),
                }
            },
        )
        notes = self.snapshot.policy_notes
        warnings = [
            line
            for ref in change.changed
            for line in notes.get((ref["kind"], ref["namespace"], ref["name"]), ())
        ]
        return {
            "revision": revision,
            "policies": change.changed,
            "enforced_in_seconds": elapsed,
            "warnings": warnings,
        }

    # ---- services ------------------------------------------------------------------------
    def _services(self) -> ServiceManager:
        if self.services is None:
            raise RuntimeError("services have not started")
        return self.services

    @memory.one_change
    def import_services(self, text: str) -> dict[str, Any]:
        return self._services().import_yaml(text)

    @memory.one_change
    def add_service(self, req: ServiceCreate) -> dict[str, Any]:
        return self._services().add(*req.records())

    @memory.one_change
    def delete_service(self, namespace: str, name: str) -> dict[str, Any]:
        return self._services().delete(namespace, name)

    def _follow_endpoints(self) -> None:
        """Selector-based services take the endpoints that came or went (and every
        service's local backends change with them)."""
        if self.services is None:
            return
        try:
            self.services.follow_endpoints()
        except Exception:
            log.exception("services could not follow the endpoint change")

    # ---- housekeeping --------------------------------------------------------------------
    def gc_conntrack(self) -> int:
        return self.datapath.gc_conntrack()

    # ---- every change ends here ----------------------------------------------------------
    def _reconcile(self, undo: Callable[[], None]) -> None:
        """Bring the datapath to the records, save them, publish the new snapshot. If the
        sync fails, `undo` puts the records back as they were before the change and the
        datapath is synced to them again (the kernel enforces what it did), then the error
        goes on; nothing is saved."""
        try:
            done = self._sync()
        except BaseException:
            undo()
            try:
                self._sync()
            except Exception:
                log.exception("the datapath could not be brought back to the recorded state")
            raise
        self._save()
        self.snapshot = _snapshot(
            self.config,
            self.state,
            self.namespaces,
            self.policies,
            self.rules,
            done,
            self.snapshot,
            self.policy_notes.of(self.policies.current.parsed),
        )

    def _sync(self) -> Reconciled:
        return self.datapath.sync(
            self.state.endpoints, self.namespaces, self.policies.current.parsed
        )

    @memory.one_change
    def finish_removals(self) -> None:
        """Take down the endpoints `delete_endpoint(finish_later=True)` left. A failure is
        logged, not raised: the deletes were answered, and the next change is another's."""
        while self._removals:
            ep = self._removals.pop(0)
            try:
                self._remove(ep)
            except Exception:
                log.exception(
                    "removing a deleted endpoint failed", extra={"fields": {"endpoint": ep.key}}
                )

    def _remove(self, ep: EndpointRecord) -> None:
        """Take down a forgotten endpoint (no longer in the ipcache or peers' policies)."""
        self.endpoints.detach(ep.id)
        self.datapath.remove_endpoint(ep.id)  # state, policy entries and conntrack
        self.endpoints.unplumb(ep)
        self._save()

    def _endpoint_refused(self, ep: EndpointRecord, full: NodeMapFull) -> UserError:
        """An endpoint the maps have no room for, named with the policies selecting it."""
        labels = self.datapath.labels_of(ep, self.namespaces)
        selecting = [
            _policy_name(p.namespace, p.name)
            for p in self.policies.current.parsed
            if any(subject.selector.matches(labels) for subject in policy_subjects(p))
        ]
        policies = f" (policies selecting it: {', '.join(selecting)})" if selecting else ""
        return UserError(f"endpoint {ep.key}{policies}", full.shortfall())

    def _save(self) -> None:
        self.state.identities = self.identities.to_json()
        self.state_file.save(self.state, self.rules.since(self.state_file.rules_saved))


def _policy_name(namespace: str | None, name: str) -> str:
    return f"{namespace}/{name}" if namespace else name


def _snapshot(
    config: AgentConfig,
    state: AgentState,
    namespaces: NamespaceStore,
    policies: PolicyStore,
    rules: RuleTable,
    done: Reconciled,
    previous: Snapshot | None,
    notes: Mapping[PolicyKey, tuple[str, ...]],
) -> Snapshot:
    endpoints = dict(state.endpoints)
    # Rules are only ever added: the same count is the same table, shared, not copied.
    same_rules = previous is not None and len(previous.rules) == len(rules)
    return Snapshot(
        node_name=config.node_name,
        node_ip=config.node_ip,
        host_addresses=done.host_addresses,
        endpoints=endpoints,
        endpoints_by_key={ep.key: ep for ep in endpoints.values()},
        endpoints_by_ip={
            **{ep.ipv4: ep for ep in endpoints.values()},
            **{ep.ipv6: ep for ep in endpoints.values() if ep.ipv6},
        },
        namespaces=namespaces.all_labels(ep.namespace for ep in endpoints.values()),
        identity_labels=done.universe.identities,
        policy_revision=state.policy_revision,
        stored_policies=policies.current.stored,
        policies=policies.current.parsed,
        rules=previous.rules if same_rules and previous else rules.refs(),
        universe=done.universe,
        compiled=done.compiled,
        dual_stack=config.ipv6,
        address_identities=done.address_identities,
        kube_apiserver_addresses=config.kube_apiserver_ips,
        policy_notes=notes,
    )
