"""The agent's memory of recent flows, and the live feed for `membrane observe --follow`.

Everything here runs on the agent's event loop thread (a reader thread hands records over
with `loop.call_soon_threadsafe(store.extend, records)`): no locks, and a follower can never
slow the agent down. A follower that does not keep up loses its oldest queued records and
is told how many, in the stream, where they are missing.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from membrane.errors import UserError
from membrane.filter.rules import parse_port

DEFAULT_CAPACITY = 8192
DEFAULT_FOLLOWER_QUEUE = 4096
FILTER_PARAMS = ("namespace", "pod", "verdict", "protocol", "port")
VERDICTS = ("FORWARDED", "DROPPED")
# --protocol name -> the key of the record's "l4" that holds that protocol
PROTOCOLS = {"tcp": "TCP", "udp": "UDP", "sctp": "SCTP", "icmp": "ICMPv4", "icmpv4": "ICMPv4"}
DEFAULT_POD_NAMESPACE = "default"  # `--pod NAME`, as in Hubble

Record = dict[str, Any]


@dataclass(frozen=True)
class FlowFilter:
    """Flows to show; every given criterion must hold. The empty filter matches all."""

    namespace: str | None = None  # either side is in it
    pod: tuple[str, str] | None = None  # (namespace, name) of either side
    verdict: str | None = None  # FORWARDED | DROPPED
    protocol: str | None = None  # a key of PROTOCOLS' values (TCP, UDP, SCTP, ICMPv4)
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

    def matches(self, record: Record) -> bool:
        sides = (record.get("source") or {}, record.get("destination") or {})
        if self.namespace and not any(s.get("namespace") == self.namespace for s in sides):
            return False
        if self.pod and not any((s.get("namespace"), s.get("pod_name")) == self.pod for s in sides):
            return False
        if self.verdict and record.get("verdict") != self.verdict:
            return False
        l4 = record.get("l4") or {}
        if self.protocol and self.protocol not in l4:
            return False
        return not self.port or self.port in _ports(l4)


def _ports(l4: Record) -> tuple[int, ...]:
    for protocol in ("TCP", "UDP", "SCTP"):
        if protocol in l4:
            return (l4[protocol]["source_port"], l4[protocol]["destination_port"])
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


def lost_events(count: int) -> Record:
    """The line a follower gets in place of records it was too slow to take; shaped like
    Hubble's lost_events message (source: the follower's own buffer)."""
    return {"lost_events": {"source": "HUBBLE_RING_BUFFER", "num_events_lost": count}}


class SubscriptionClosed(Exception):
    """The store closed the subscription (the agent is stopping)."""


class Subscription:
    """One follower's queue of matching records. Iterate it (`async for item in sub`), or
    `await sub.get()`; an item is a record, or a `lost_events` notice where records were
    dropped because the follower fell `maxsize` records behind."""

    def __init__(self, flow_filter: FlowFilter, backlog: list[Record], maxsize: int) -> None:
        self.filter = flow_filter
        self.missed = 0  # records dropped for this follower, in total
        self._unreported = 0
        # The backlog was asked for, so it raises the limit rather than using it up.
        self._items: deque[Record] = deque(backlog)
        self._limit = maxsize + len(backlog)
        self._ready = asyncio.Event()
        self._closed = False
        if backlog:
            self._ready.set()

    def offer(self, record: Record) -> None:
        if self._closed or not self.filter.matches(record):
            return
        if len(self._items) >= self._limit:
            self._items.popleft()
            self.missed += 1
            self._unreported += 1
        self._items.append(record)
        self._ready.set()

    def close(self) -> None:
        self._closed = True
        self._ready.set()

    async def get(self) -> Record:
        while not self._items and not self._unreported:
            if self._closed:
                raise SubscriptionClosed
            self._ready.clear()
            await self._ready.wait()
        if self._unreported:
            count, self._unreported = self._unreported, 0
            return lost_events(count)
        return self._items.popleft()

    def __aiter__(self) -> AsyncIterator[Record]:
        return self

    async def __anext__(self) -> Record:
        try:
            return await self.get()
        except SubscriptionClosed:
            raise StopAsyncIteration from None


class FlowStore:
    """The last `capacity` flow records, oldest first, and the followers' subscriptions."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self._records: deque[Record] = deque(maxlen=capacity)
        self._subscriptions: set[Subscription] = set()
        self.total = 0  # records ever appended

    def __len__(self) -> int:
        return len(self._records)

    def append(self, record: Record) -> None:
        self._records.append(record)
        self.total += 1
        for sub in self._subscriptions:
            sub.offer(record)

    def extend(self, records: Iterable[Record]) -> None:
        for record in records:
            self.append(record)

    def last(self, n: int, flow_filter: FlowFilter | None = None) -> list[Record]:
        """The newest `n` records that match, oldest first."""
        if n <= 0:
            return []
        found: list[Record] = []
        for record in reversed(self._records):
            if flow_filter is None or flow_filter.matches(record):
                found.append(record)
                if len(found) == n:
                    break
        found.reverse()
        return found

    def subscribe(
        self,
        flow_filter: FlowFilter | None = None,
        last: int = 0,
        maxsize: int = DEFAULT_FOLLOWER_QUEUE,
    ) -> Subscription:
        """A follower's feed: first the newest `last` matching records, then every new
        one. Taken in one step, so nothing falls between the backlog and the live feed."""
        flow_filter = flow_filter or FlowFilter()
        sub = Subscription(flow_filter, self.last(last, flow_filter), maxsize)
        self._subscriptions.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subscriptions.discard(sub)
        sub.close()

    def close(self) -> None:
        """End every follower's feed (their iteration stops once they have read it)."""
        for sub in self._subscriptions:
            sub.close()
        self._subscriptions.clear()
