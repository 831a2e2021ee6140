"""The agent API of runtime security:

    GET /v1/security/status    what runs, what the kernel lacks, counters
    GET /v1/security/events    ?request=GetEventsRequest JSON &last=N &follow=1
                               newline-delimited GetEventsResponse JSON (proto field names)

A follower that falls behind is told how many events it lost, in the stream where they are
missing, as a rate_limit_info event (number_of_dropped_process_events).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

from aiohttp import web
from google.protobuf import json_format

from membrane.errors import UserError
from membrane.security.events import dropped_notice
from membrane.security.filters import EventMatcher
from membrane.security.format import json_line
from membrane.security.runtime import SecurityRuntime
from membrane.security.sink import Event, Item, resolve
from membrane.tetragon.tetragon import events_pb2

Runtime = Callable[[], SecurityRuntime | None]


def add_routes(router: web.UrlDispatcher, runtime: Runtime) -> None:
    async def status(request: web.Request) -> web.Response:
        return await _status(runtime())

    async def events(request: web.Request) -> web.StreamResponse:
        return await _events(request, runtime())

    router.add_get("/v1/security/status", status)
    router.add_get("/v1/security/events", events)


async def _status(runtime: SecurityRuntime | None) -> web.Response:
    if runtime is None:
        return web.json_response({"enabled": False})
    return web.json_response(runtime.status())


def _matcher(request: web.Request) -> EventMatcher:
    text = request.query.get("request", "")
    parsed = events_pb2.GetEventsRequest()
    if text:
        try:
            json_format.Parse(text, parsed)
        except json_format.ParseError as err:
            raise UserError("request", f"is not a GetEventsRequest: {err}") from None
    return EventMatcher.build(parsed.allow_list, parsed.deny_list)


def _count(request: web.Request) -> int | None:
    text = request.query.get("last")
    if text is None:
        return None
    if not text.isdigit():
        raise UserError("last", f"{text!r} is not a whole number")
    return int(text)


async def _events(request: web.Request, runtime: SecurityRuntime | None) -> web.StreamResponse:
    if runtime is None:
        raise UserError("runtime-security", "is off in this agent (--runtime-security=false)")
    matcher = _matcher(request)
    last = _count(request)
    follow = request.query.get("follow") in ("1", "true")
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    if not follow:
        stored = runtime.store.recent()
        await _write(response, _last(stored, matcher, 20 if last is None else last))
        await response.write_eof()
        return response
    history, follower = runtime.store.follow(asyncio.get_running_loop())
    try:
        await _write(response, _last(history, matcher, last or 0))
        reported = 0
        while True:
            batch = await follower.queue.get()
            events = (resolve(item) for item in batch)
            lines = [json_line(e) for e in events if matcher.matches(e)]
            if follower.lost > reported:
                notice = dropped_notice(runtime.node_name, follower.lost - reported)
                lines.insert(0, json_line(notice))
                reported = follower.lost
            if lines:
                await response.write(("\n".join(lines) + "\n").encode())
    except ConnectionResetError:  # the reader went away
        return response
    finally:
        runtime.store.unfollow(follower)


def _last(items: list[Item], matcher: EventMatcher, count: int) -> list[str]:
    """The last `count` matching events, oldest first (built newest first, only as many
    as it takes)."""
    if count <= 0:
        return []
    chosen: list[Event] = []
    for item in reversed(items):
        event = resolve(item)
        if matcher.matches(event):
            chosen.append(event)
            if len(chosen) == count:
                break
    return [json_line(e) for e in reversed(chosen)]


async def _write(response: web.StreamResponse, lines: Iterable[str]) -> None:
    text = "".join(line + "\n" for line in lines)
    if text:
        await response.write(text.encode())
