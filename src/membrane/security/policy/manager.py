"""The agent's tracing policies: apply, list, delete; kept in --state-dir and re-applied
when the agent starts; their events read from the kernel and published as Tetragon's.

A policy is applied whole or not at all: every hook is compiled (all user errors found)
before the first loads, and a hook the kernel refuses takes the ones loaded before it
down with it. A policy that replaces one of the same name is attached before the old
one's programs go, so the node is never without it.

Enforcement outlives the agent: links are pinned. A restarted agent loads the stored
policies afresh (the build may have changed), attaches them, then unpins what the
previous agent left, so there is no moment without enforcement (measured in the
integration tests: a kill at every probe across a restart).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from membrane.bpf import BpfObject
from membrane.bpf.maps import Map
from membrane.bpf.ringbuf import RingBuffer
from membrane.errors import NotFound, UserError
from membrane.security.policy.compile import HookPlan, compile_policy
from membrane.security.policy.events import pod_ref, policy_event
from membrane.security.policy.loader import HOOK_OBJECT, LoadedHook, Loader
from membrane.security.policy.model import TracingPolicy
from membrane.security.policy.parse import parse_document, parse_policies
from membrane.security.process import PodRef
from membrane.security.sink import EventSink, EventStore

log = logging.getLogger("membrane.agent")
STATE_FILE = "tracing-policies.json"
POLL_MS = 100


@dataclass(frozen=True)
class PodEndpoint:
    """What scoping and attribution need of an endpoint."""

    namespace: str
    name: str
    netns: str  # its name under /run/netns
    labels: dict[str, str]


@dataclass
class Installed:
    policy: TracingPolicy
    document: dict[str, Any]
    hooks: list[LoadedHook]
    applied_at: float


class TracingPolicies:
    def __init__(
        self,
        state_dir: str | Path,
        bpf_dir: str,
        node_name: str,
        cgroup_root: str | None,
        supports: Callable[[str], bool],
        endpoints: Callable[[], Iterable[PodEndpoint]] = tuple,
        sink: EventSink | None = None,
        cache: Any = None,
    ) -> None:
        self.path = Path(state_dir) / STATE_FILE
        self.node_name = node_name
        self.loader = Loader(bpf_dir, cgroup_root)
        self.supports = supports
        self.endpoints = endpoints
        self.sink: EventSink = sink if sink is not None else EventStore()
        self.cache = cache
        self._installed: dict[str, Installed] = {}
        self._failed: dict[str, tuple[dict[str, Any], str]] = {}  # not re-applied at start
        self._plans: dict[int, HookPlan] = {}  # hook id -> plan, for the reader
        self._next_hook_id = 1
        self._pods: dict[int, PodRef] = {}  # netns inode -> pod
        self._reader: threading.Thread | None = None
        self._stop = threading.Event()
        self.events_read = 0  # posted by the hooks and published

    # ---- start and stop ------------------------------------------------------------------
    def start(self) -> None:
        """Re-apply the stored policies (fresh programs first, then the previous agent's
        pins go), and remove pins of policies no longer stored."""
        started = time.perf_counter()
        stored = self._load_state()
        for key, document in stored:
            try:
                policy = parse_document(document, key)
                self._install(policy, document, self._compile(policy, key))
            except UserError as err:
                # E.g. a binary the policy names is gone. What the previous agent pinned
                # keeps enforcing, and the policy stays stored, until it is deleted.
                self._failed[key] = (document, str(err))
                log.error(
                    "tracing policy not re-applied; its previous programs stay in force",
                    extra={"fields": {"policy": key, "error": str(err)}},
                )
        links = self.loader.link_dir("x").parent
        if links.is_dir():
            known = {self.loader.link_dir(k).name for k in [*self._installed, *self._failed]}
            for stale in links.iterdir():
                if stale.name not in known:
                    _unpin_dir(stale)
        self._save()
        self.refresh_scope()
        log.info(
            "tracing policies re-applied",
            extra={
                "fields": {
                    "policies": len(self._installed),
                    "failed": len(self._failed),
                    "seconds": round(time.perf_counter() - started, 3),
                }
            },
        )

    def stop(self) -> None:
        """Stop reading; every policy stays in force (pinned)."""
        self._stop.set()
        if self._reader is not None:
            self._reader.join(timeout=5)
        for installed in self._installed.values():
            for hook in installed.hooks:
                hook.close(detach=False)
        self.loader.close()

    # ---- changes (the agent's worker thread) ---------------------------------------------
    def apply(self, text: str) -> dict[str, Any]:
        started = time.perf_counter()
        parsed = parse_policies(text)
        compiled = [
            (policy, document, self._compile(policy, f"document {n}"))
            for n, (policy, document) in enumerate(parsed, 1)
        ]  # every user error is found before anything loads
        done = []
        for policy, document, plans in compiled:
            self._install(policy, document, plans)
            done.append(self._view(self._installed[policy.key]))
        self._save()
        self.refresh_scope()
        return {"policies": done, "applied_in_seconds": time.perf_counter() - started}

    def delete(self, key: str) -> dict[str, Any]:
        installed = self._installed.get(key)
        if installed is None and key in self._failed:
            view = self._failed_view(key, *self._failed.pop(key))
            _unpin_dir(self.loader.link_dir(key))
            self._save()
            return {"policies": [view]}
        if installed is None:
            raise NotFound("policy", f"tracing policy {key} does not exist")
        view = self._view(installed)
        for hook in installed.hooks:
            self._plans.pop(hook.hook_id, None)
            hook.close(detach=True)
        _unpin_dir(self.loader.link_dir(key))
        del self._installed[key]
        self._save()
        return {"policies": [view]}

    def list(self) -> dict[str, Any]:
        views = [self._view(i) for i in self._installed.values()]
        views += [self._failed_view(k, doc, err) for k, (doc, err) in self._failed.items()]
        return {
            "policies": views,
            "events": self.events_read,
            "events_lost": self.loader.events_lost(),
        }

    @staticmethod
    def _failed_view(key: str, document: dict[str, Any], error: str) -> dict[str, Any]:
        namespace, _, name = key.rpartition("/")
        return {
            "name": name,
            "namespace": namespace or None,
            "kind": document.get("kind", ""),
            "hooks": [],
            "error": f"not re-applied at start ({error}); its previous programs stay in force",
        }

    def refresh_scope(self) -> None:
        """Point namespaced policies at the net namespaces of the pods they select, and
        learn which pod each namespace is (events name it). Call after endpoint changes."""
        pods: dict[int, PodRef] = {}
        inode_of: dict[tuple[str, str], int] = {}
        endpoints = list(self.endpoints())
        for ep in endpoints:
            with contextlib.suppress(OSError):
                inode = os.stat(f"/run/netns/{ep.netns}").st_ino
                inode_of[(ep.namespace, ep.name)] = inode
                pods[inode] = pod_ref(ep.namespace, ep.name, ep.labels)
        self._pods = pods
        for installed in self._installed.values():
            policy = installed.policy
            if policy.namespace is None:
                continue
            wanted = {
                inode_of[(ep.namespace, ep.name)]
                for ep in endpoints
                if ep.namespace == policy.namespace
                and (ep.namespace, ep.name) in inode_of
                and _selects(policy, ep.labels)
            }
            for hook in installed.hooks:
                scope = hook.scope()
                for old in list(scope.keys()):
                    if int(old) not in wanted:
                        scope.delete(old)
                for inode in wanted:
                    scope.update(inode, 1)

    # ---- internals -------------------------------------------------------------------------
    def _compile(self, policy: TracingPolicy, where: str) -> list[HookPlan]:
        plans = compile_policy(policy, where, self.supports)
        if any(p.overrides for p in plans):
            self.loader.ensure_sock_hooks()
        return plans

    def _install(
        self, policy: TracingPolicy, document: dict[str, Any], plans: list[HookPlan]
    ) -> None:
        loaded: list[LoadedHook] = []
        try:
            for plan in plans:
                hook_id = self._next_hook_id
                self._next_hook_id += 1
                self._plans[hook_id] = plan
                loaded.append(self.loader.load(plan, hook_id, str(hook_id)))
        except BaseException:
            for hook in loaded:
                self._plans.pop(hook.hook_id, None)
                hook.close(detach=True)
            raise
        old = self._installed.get(policy.key)
        self._installed[policy.key] = Installed(policy, document, loaded, time.time())
        self._failed.pop(policy.key, None)
        if old is not None:
            for hook in old.hooks:
                self._plans.pop(hook.hook_id, None)
                hook.close(detach=True)
        # Pins of the same policy left by an earlier agent: the new programs run already.
        keep = {str(h.hook_id) for h in loaded}
        for pin in self.loader.link_dir(policy.key).iterdir():
            if pin.name not in keep:
                _unpin(pin)
        self._ensure_reader()
        log.info(
            "tracing policy applied",
            extra={"fields": {"policy": policy.key, "hooks": [h.hook_id for h in loaded]}},
        )

    def _view(self, installed: Installed) -> dict[str, Any]:
        policy = installed.policy
        denied = self.loader.denied()
        return {
            "name": policy.metadata.name,
            "namespace": policy.namespace,
            "kind": policy.kind,
            "applied": installed.applied_at,
            "hooks": [
                {
                    "id": h.hook_id,
                    "type": h.plan.hook_type,
                    "target": h.plan.target_text,
                    "selectors": len(h.plan.selector_actions),
                    "denied": denied.get(h.hook_id, 0),
                }
                for h in installed.hooks
            ],
        }

    def _load_state(self) -> list[tuple[str, dict[str, Any]]]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        self._next_hook_id = int(data.get("next_hook_id", 1))
        return [(p["key"], p["document"]) for p in data.get("policies", [])]

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "next_hook_id": self._next_hook_id,
            "policies": [
                *({"key": key, "document": i.document} for key, i in self._installed.items()),
                *({"key": key, "document": doc} for key, (doc, _) in self._failed.items()),
            ],
        }
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    # ---- events --------------------------------------------------------------------------
    def _ensure_reader(self) -> None:
        if self._reader is not None:
            return
        self._reader = threading.Thread(
            target=self._read, name="tracing-policy-events", daemon=True
        )
        self._reader.start()

    def _read(self) -> None:
        with BpfObject.open(HOOK_OBJECT) as obj:
            dtype = obj.btf.dtype("sp_event")
        ring_map = Map.from_pin(os.path.join(self.loader.dir, "events"))
        lost_map = Map.from_pin(os.path.join(self.loader.dir, "events_lost"))
        with RingBuffer(ring_map, dtype, lost_map) as ring:
            while not self._stop.is_set():
                rows = ring.poll(POLL_MS)
                if len(rows):
                    self._publish(rows)

    def _publish(self, rows: Any) -> None:
        events = []
        for row in rows:
            plan = self._plans.get(int(row["hook_id"]))
            if plan is None:
                continue  # a hook replaced since it posted
            try:
                events.append(policy_event(row, plan, self.node_name, self.cache, self._pods.get))
            except Exception:
                log.exception("tracing policy event could not be decoded")
        self.events_read += len(events)
        self.sink.publish(events)


def forget_tracing_policies(state_dir: str | Path) -> None:
    """`agent reset`: the stored policies go (their pinned links go with the node's pins)."""
    (Path(state_dir) / STATE_FILE).unlink(missing_ok=True)


def _selects(policy: TracingPolicy, labels: dict[str, str]) -> bool:
    selector = policy.spec.podSelector
    if selector is None:
        return True
    return all(
        labels.get(k) == v or labels.get(f"k8s:{k}") == v for k, v in selector.matchLabels.items()
    )


def _unpin(path: Path) -> None:
    from membrane.bpf import Link

    with contextlib.suppress(OSError):
        Link.from_pin(str(path), "tracepoint").detach()
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _unpin_dir(directory: Path) -> None:
    if not directory.is_dir():
        return
    for pin in directory.iterdir():
        _unpin(pin)
    shutil.rmtree(directory, ignore_errors=True)
