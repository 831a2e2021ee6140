"""Tetragon's event filters, export filters, redaction and the compact format, on events
built the way the agent builds them."""

from __future__ import annotations

import pytest

from membrane.errors import UserError
from membrane.security.cache import ProcessCache
from membrane.security.events import exec_event, exit_event
from membrane.security.export import make_export_settings
from membrane.security.filters import EventMatcher, parse_filter_lines
from membrane.security.format import compact_line, json_line, parse_line
from membrane.security.process import PodRef
from membrane.security.redaction import parse_redaction_filters
from membrane.tetragon.tetragon import events_pb2

_WALL = 1_700_000_000 * 10**9
_WEB = PodRef("shop", "web-1", (("app", "web"),), "abc123")


def _events() -> list[events_pb2.GetEventsResponse]:
    cache = ProcessCache("node1", pod_of=lambda netns, cg: _WEB if netns == 9 else None)
    out = []
    for pid, ppid, binary, args, netns in (
        (1, 0, "/sbin/init", "", 0),
        (10, 1, "/usr/bin/bash", "-c run", 0),
        (11, 10, "/usr/bin/curl", "--password=hunter2 https://example.com", 9),
    ):
        entry = cache.new_entry(
            pid=pid, tid=pid, ktime_ns=pid, start_time_ns=_WALL, uid=0, auid=0, binary=binary,
            arguments=args, cwd="/", flags=["execve"], parent_pid=ppid, netns=netns,
        )  # fmt: skip
        cache.start(entry)
        out.append(exec_event(cache, entry, _WALL).event())
    out.append(exit_event(cache, cache.exit(11), _WALL, 9).event())  # type: ignore[arg-type]
    return out


def _matching(matcher: EventMatcher) -> list[str]:
    return [compact_line(e) for e in _events() if matcher.matches(e)]


def test_filters_and_or_allow_deny() -> None:
    allow = parse_filter_lines(
        '{"binary_regex":["curl$","bash$"],"event_set":["PROCESS_EXEC"]}', "x"
    )
    assert len(_matching(EventMatcher.build(allow, ()))) == 2
    deny = parse_filter_lines('{"namespace":["shop"]}', "x")
    assert [line.split()[3] for line in _matching(EventMatcher.build(allow, deny))] == [
        "/usr/bin/bash"
    ]
    pods = parse_filter_lines('{"pod_regex":["^web-"]}\n{"labels":["app=web"]}', "x")
    assert len(_matching(EventMatcher.build(pods[:1], ()))) == 2  # exec and exit of curl
    assert len(_matching(EventMatcher.build(pods[1:], ()))) == 2
    parent = parse_filter_lines('{"parent_binary_regex":["bash"]}', "x")
    assert len(_matching(EventMatcher.build(parent, ()))) == 2
    host = parse_filter_lines('{"namespace":[""]}', "x")  # Tetragon: "" is the host
    assert len(_matching(EventMatcher.build(host, ()))) == 2


def test_bad_filters_name_their_place() -> None:
    with pytest.raises(UserError) as err:
        EventMatcher.build(parse_filter_lines('{"binary_regex":["ok","("]}', "x"), ())
    assert err.value.field == "allow_list[0].binary_regex[1]"
    with pytest.raises(UserError) as err:
        parse_filter_lines('{"binary_regexp":["x"]}', "security-export-allowlist")
    assert err.value.field == "security-export-allowlist[0]"
    with pytest.raises(UserError) as err:
        make_export_settings("", allowlist='{"namespace":["a"]}')
    assert err.value.field == "security-export-allowlist"


def test_redaction_replaces_capture_groups_everywhere() -> None:
    redactor = parse_redaction_filters('{"redact":["--password=(\\\\S+)"],"binary_regex":["curl"]}')
    events = _events()
    for event in events:
        redactor.event(event)
    curl = events[2].process_exec.process
    assert curl.arguments == "--password=***** https://example.com"
    assert "hunter2" not in json_line(events[3])
    with pytest.raises(UserError) as err:
        parse_redaction_filters('{"redact":["--password=\\\\S+"]}')
    assert err.value.field == "security-redaction-filters[0].redact[0]"


def test_compact_and_json_lines() -> None:
    lines = [compact_line(e) for e in _events()]
    assert lines[2] == "🚀 process shop/web-1 /usr/bin/curl --password=hunter2 https://example.com"
    assert lines[3].startswith("💥 exit    shop/web-1 /usr/bin/curl ") and lines[3].endswith(
        " SIGKILL"
    )
    assert lines[0] == "🚀 process node1 /sbin/init"
    for event in _events():
        assert parse_line(json_line(event)) == event


def test_compact_lines_of_policy_events() -> None:
    event = events_pb2.GetEventsResponse(node_name="node1")
    tp = event.process_tracepoint
    tp.subsys, tp.event = "syscalls", "sys_enter_connect"
    tp.process.binary = "/usr/bin/curl"
    tp.process.pod.namespace, tp.process.pod.name = "shop", "web"
    arg = tp.args.add()
    arg.sockaddr_arg.family, arg.sockaddr_arg.addr, arg.sockaddr_arg.port = (
        "AF_INET",
        "198.18.0.7",
        5432,
    )
    assert compact_line(event) == "🔌 connect shop/web /usr/bin/curl 198.18.0.7:5432"
    tp.event = "sys_enter_openat"
    tp.ClearField("args")
    tp.args.add(int_arg=-100)
    tp.args.add(string_arg="/etc/shadow")
    assert compact_line(event) == "📬 open    shop/web /usr/bin/curl /etc/shadow"
    tp.subsys, tp.event = "sched", "sched_process_exec"
    assert compact_line(event) == "⁉️ tracepoint shop/web sched sched_process_exec"
