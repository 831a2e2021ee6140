"""Tetragon's event filters (tetragon.Filter) as Tetragon applies them, to the events of
`membrane security events` and to the export file's allow and deny lists.

Within a Filter every field that is set must match (AND), and any one of a field's values
matches (OR). An event passes a request when the allow list is empty or one of its
filters matches, and none of the deny list's does.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from google.protobuf import json_format

from membrane.errors import UserError
from membrane.json_objects import concatenated_objects
from membrane.tetragon.tetragon import events_pb2, tetragon_pb2

Event = events_pb2.GetEventsResponse
Check = Callable[[Event], bool]
# EventType number -> the oneof field of that event (Tetragon keeps the numbers equal).
EVENT_FIELDS = {
    field.number: field.name for field in Event.DESCRIPTOR.oneofs_by_name["event"].fields
}
UNSUPPORTED = ("health_check", "pid_set", "container_id", "in_init_tree", "ancestor_binary_regex")


def event_process(event: Event) -> tuple[tetragon_pb2.Process | None, tetragon_pb2.Process | None]:
    """The event's process and parent (None for events without one)."""
    kind = event.WhichOneof("event")
    if kind is None:
        return None, None
    message = getattr(event, kind)
    if not hasattr(message, "process"):
        return None, None
    parent = message.parent if message.HasField("parent") else None
    return message.process, parent


def _regexes(values: Sequence[str], where: str) -> list[re.Pattern[str]]:
    out = []
    for i, value in enumerate(values):
        try:
            out.append(re.compile(value))
        except re.error as err:
            where_i = f"{where}[{i}]"
            raise UserError(where_i, f"{value!r} is not a regular expression: {err}") from None
    return out


def _any_search(patterns: list[re.Pattern[str]], text: str) -> bool:
    return any(p.search(text) for p in patterns)


@dataclass(frozen=True)
class FilterMatcher:
    """One tetragon.Filter, compiled: all its checks must pass."""

    checks: tuple[Check, ...]

    @classmethod
    def build(cls, f: events_pb2.Filter, where: str) -> FilterMatcher:
        for name in UNSUPPORTED:
            if f.HasField(name) if name in ("health_check", "in_init_tree") else getattr(f, name):
                raise UserError(f"{where}.{name}", "is not supported by Membrane")
        checks: list[Check] = []
        if f.event_set:
            kinds = {EVENT_FIELDS.get(int(t)) for t in f.event_set}
            checks.append(lambda e: e.WhichOneof("event") in kinds)
        if f.binary_regex:
            binaries = _regexes(f.binary_regex, f"{where}.binary_regex")
            checks.append(lambda e: _process_text(e, "binary", binaries))
        if f.parent_binary_regex:
            parents = _regexes(f.parent_binary_regex, f"{where}.parent_binary_regex")
            checks.append(lambda e: _parent_text(e, "binary", parents))
        if f.arguments_regex:
            arguments = _regexes(f.arguments_regex, f"{where}.arguments_regex")
            checks.append(lambda e: _process_text(e, "arguments", arguments))
        if f.parent_arguments_regex:
            parent_args = _regexes(f.parent_arguments_regex, f"{where}.parent_arguments_regex")
            checks.append(lambda e: _parent_text(e, "arguments", parent_args))
        if f.pod_regex:
            pods = _regexes(f.pod_regex, f"{where}.pod_regex")
            checks.append(lambda e: _pod_matches(e, lambda pod: _any_search(pods, pod.name)))
        if f.namespace:
            namespaces = set(f.namespace)
            checks.append(lambda e: _namespace_of(e) in namespaces)
        if f.pid:
            pids = set(f.pid)
            checks.append(lambda e: _pid_of(e) in pids)
        if f.policy_names:
            policies = set(f.policy_names)
            checks.append(lambda e: _policy_of(e) in policies)
        if f.labels:
            selectors = [_label_selector(s, f"{where}.labels[{i}]") for i, s in enumerate(f.labels)]
            checks.append(
                lambda e: _pod_matches(e, lambda pod: any(s(pod.pod_labels) for s in selectors))
            )
        return cls(tuple(checks))

    def matches(self, event: Event) -> bool:
        return all(check(event) for check in self.checks)


def _process_text(event: Event, field: str, patterns: list[re.Pattern[str]]) -> bool:
    process, _ = event_process(event)
    return process is not None and _any_search(patterns, getattr(process, field))


def _parent_text(event: Event, field: str, patterns: list[re.Pattern[str]]) -> bool:
    _, parent = event_process(event)
    return parent is not None and _any_search(patterns, getattr(parent, field))


def _pod_matches(event: Event, test: Callable[[tetragon_pb2.Pod], bool]) -> bool:
    process, _ = event_process(event)
    return process is not None and process.HasField("pod") and test(process.pod)


def _namespace_of(event: Event) -> str:
    """The pod's namespace; "" for a host process (Tetragon's filter matches it so)."""
    process, _ = event_process(event)
    return process.pod.namespace if process is not None and process.HasField("pod") else ""


def _pid_of(event: Event) -> int | None:
    process, _ = event_process(event)
    return process.pid.value if process is not None else None


def _policy_of(event: Event) -> str | None:
    kind = event.WhichOneof("event")
    message = getattr(event, kind) if kind else None
    return getattr(message, "policy_name", None)


def _label_selector(text: str, where: str) -> Callable[[object], bool]:
    """`k=v,k2!=v2,k3` (equality-based Kubernetes selectors; all terms must hold)."""
    terms = []
    for term in (t.strip() for t in text.split(",") if t.strip()):
        for op in ("!=", "==", "="):
            if op in term:
                key, value = (s.strip() for s in term.split(op, 1))
                terms.append((key, op, value))
                break
        else:
            if not term.replace(".", "").replace("/", "").replace("-", "").replace("_", ""):
                raise UserError(where, f"{term!r} is not a label selector term")
            terms.append((term, "exists", ""))

    def matches(labels: object) -> bool:
        got = dict(labels)  # type: ignore[call-overload]
        for key, op, value in terms:
            if op == "exists" and key not in got:
                return False
            if op in ("=", "==") and got.get(key) != value:
                return False
            if op == "!=" and got.get(key) == value:
                return False
        return True

    return matches


@dataclass(frozen=True)
class EventMatcher:
    """A GetEventsRequest's allow and deny lists, compiled."""

    allow: tuple[FilterMatcher, ...]
    deny: tuple[FilterMatcher, ...]

    @classmethod
    def build(
        cls,
        allow: Sequence[events_pb2.Filter],
        deny: Sequence[events_pb2.Filter],
        names: tuple[str, str] = ("allow_list", "deny_list"),
    ) -> EventMatcher:
        return cls(
            tuple(FilterMatcher.build(f, f"{names[0]}[{i}]") for i, f in enumerate(allow)),
            tuple(FilterMatcher.build(f, f"{names[1]}[{i}]") for i, f in enumerate(deny)),
        )

    def matches(self, event: Event) -> bool:
        if self.allow and not any(f.matches(event) for f in self.allow):
            return False
        return not any(f.matches(event) for f in self.deny)


def parse_filter_lines(text: str, option: str) -> tuple[events_pb2.Filter, ...]:
    """Filters as Tetragon's --export-allowlist takes them: JSON objects with proto field
    names, one per line (or one after another); unknown fields are errors."""
    filters = []
    for i, obj in enumerate(concatenated_objects(text, option)):
        if not isinstance(obj, dict):
            raise UserError(f"{option}[{i}]", f"is not a Filter object: {json.dumps(obj)}")
        try:
            filters.append(json_format.ParseDict(obj, events_pb2.Filter()))
        except json_format.ParseError as err:
            raise UserError(f"{option}[{i}]", f"is not a Filter: {err}") from None
    return tuple(filters)
