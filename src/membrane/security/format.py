"""Security events as text: one protobuf JSON object per line with proto field names (as
Tetragon's JSON export and `tetra getevents -o json` print them), or one compact line per
event like `tetra getevents -o compact`:

    🚀 process ns/pod /usr/bin/curl https://example.com
    💥 exit    ns/pod /usr/bin/curl https://example.com SIGKILL
    🔌 connect ns/pod /usr/bin/curl 198.18.0.7:5432
    📬 open    ns/pod /usr/bin/cat /etc/shadow

A host process is named by the node instead of ns/pod.
"""

from __future__ import annotations

import json

from google.protobuf import json_format

from membrane.tetragon.tetragon import events_pb2, tetragon_pb2

Event = events_pb2.GetEventsResponse


def json_line(event: Event) -> str:
    return json.dumps(
        json_format.MessageToDict(event, preserving_proto_field_name=True),
        separators=(",", ":"),
        ensure_ascii=False,
    )


def parse_line(line: str) -> Event:
    """A JSON line back into an event, strictly (an unknown field is an error)."""
    return json_format.Parse(line, Event(), ignore_unknown_fields=False)


def where(node_name: str, process: tetragon_pb2.Process) -> str:
    if process.HasField("pod"):
        return f"{process.pod.namespace}/{process.pod.name}"
    return node_name


def _head(icon: str, word: str, event: Event, process: tetragon_pb2.Process) -> str:
    return f"{icon} {word:<7} {where(event.node_name, process)} {process.binary}"


def compact_line(event: Event) -> str:
    kind = event.WhichOneof("event")
    if kind == "process_exec":
        m = event.process_exec
        return _join(_head("🚀", "process", event, m.process), m.process.arguments)
    if kind == "process_exit":
        m = event.process_exit
        status = m.signal or str(m.status)
        return _join(_head("💥", "exit", event, m.process), m.process.arguments, status)
    if kind == "process_tracepoint":
        m = event.process_tracepoint
        special = _SYSCALLS.get(m.event) if m.subsys == "syscalls" else None
        if special is not None:
            icon, word, what = special
            return _join(_head(icon, word, event, m.process), *(what(a) for a in m.args))
        return _join(f"⁉️ {'tracepoint':<7} {where(event.node_name, m.process)}", m.subsys, m.event)
    if kind == "process_uprobe":
        m = event.process_uprobe
        return _join(f"🕵️ {'uprobe':<7} {where(event.node_name, m.process)}", m.path, m.symbol)
    if kind == "process_kprobe":
        m = event.process_kprobe
        return _join(f"❓ {'syscall':<7} {where(event.node_name, m.process)}", m.function_name)
    return f"{kind or 'unknown'} {json_line(event)}"


def _sockaddr(arg: tetragon_pb2.KprobeArgument) -> str:
    if not arg.HasField("sockaddr_arg"):
        return ""
    sa = arg.sockaddr_arg
    return f"[{sa.addr}]:{sa.port}" if ":" in sa.addr else f"{sa.addr}:{sa.port}"


def _path(arg: tetragon_pb2.KprobeArgument) -> str:
    return arg.string_arg if arg.HasField("string_arg") else ""


# Syscall tracepoints tetra shows by what they do: (icon, word, the arguments shown).
_SYSCALLS = {
    "sys_enter_connect": ("🔌", "connect", _sockaddr),
    "sys_enter_sendto": ("📤", "sendto", _sockaddr),
    "sys_enter_openat": ("📬", "open", _path),
    "sys_enter_open": ("📬", "open", _path),
}


def _join(*parts: str) -> str:
    return " ".join(p for p in parts if p)
