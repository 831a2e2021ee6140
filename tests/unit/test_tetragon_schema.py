"""Our security events are Tetragon's: the proto files carry Tetragon's package, message
and field names and numbers (checked against a table taken from Tetragon's api/v1
tetragon.proto and events.proto, so a wrong number fails here), and exec_id is built as
Tetragon builds it."""

from __future__ import annotations

import base64

import pytest
from google.protobuf import descriptor_pool

from membrane.security.process import exec_id
from membrane.tetragon.tetragon import events_pb2, tetragon_pb2  # noqa: F401 (registers)

# (message, field, number) as Tetragon's api/v1/tetragon/{tetragon,events}.proto define them.
TETRAGON_FIELDS = [
    ("tetragon.GetEventsResponse", "process_exec", 1),
    ("tetragon.GetEventsResponse", "process_exit", 5),
    ("tetragon.GetEventsResponse", "process_kprobe", 9),
    ("tetragon.GetEventsResponse", "process_tracepoint", 10),
    ("tetragon.GetEventsResponse", "process_uprobe", 12),
    ("tetragon.GetEventsResponse", "rate_limit_info", 40001),
    ("tetragon.GetEventsResponse", "node_name", 1000),
    ("tetragon.GetEventsResponse", "time", 1001),
    ("tetragon.GetEventsResponse", "cluster_name", 1003),
    ("tetragon.GetEventsRequest", "allow_list", 1),
    ("tetragon.GetEventsRequest", "deny_list", 2),
    ("tetragon.Filter", "binary_regex", 1),
    ("tetragon.Filter", "namespace", 2),
    ("tetragon.Filter", "health_check", 3),
    ("tetragon.Filter", "pid", 4),
    ("tetragon.Filter", "pid_set", 5),
    ("tetragon.Filter", "event_set", 6),
    ("tetragon.Filter", "pod_regex", 7),
    ("tetragon.Filter", "arguments_regex", 8),
    ("tetragon.Filter", "labels", 9),
    ("tetragon.Filter", "policy_names", 10),
    ("tetragon.Filter", "parent_binary_regex", 12),
    ("tetragon.RedactionFilter", "redact", 2),
    ("tetragon.RedactionFilter", "binary_regex", 3),
    ("tetragon.Process", "exec_id", 1),
    ("tetragon.Process", "pid", 2),
    ("tetragon.Process", "uid", 3),
    ("tetragon.Process", "cwd", 4),
    ("tetragon.Process", "binary", 5),
    ("tetragon.Process", "arguments", 6),
    ("tetragon.Process", "flags", 7),
    ("tetragon.Process", "start_time", 8),
    ("tetragon.Process", "auid", 9),
    ("tetragon.Process", "pod", 10),
    ("tetragon.Process", "docker", 11),
    ("tetragon.Process", "parent_exec_id", 12),
    ("tetragon.Process", "refcnt", 13),
    ("tetragon.Process", "tid", 16),
    ("tetragon.Pod", "namespace", 1),
    ("tetragon.Pod", "name", 2),
    ("tetragon.Pod", "container", 4),
    ("tetragon.Pod", "pod_labels", 5),
    ("tetragon.Container", "id", 1),
    ("tetragon.Container", "name", 2),
    ("tetragon.Container", "pid", 5),
    ("tetragon.ProcessExec", "process", 1),
    ("tetragon.ProcessExec", "parent", 2),
    ("tetragon.ProcessExec", "ancestors", 3),
    ("tetragon.ProcessExit", "process", 1),
    ("tetragon.ProcessExit", "parent", 2),
    ("tetragon.ProcessExit", "signal", 3),
    ("tetragon.ProcessExit", "status", 4),
    ("tetragon.ProcessExit", "time", 5),
    ("tetragon.ProcessKprobe", "function_name", 3),
    ("tetragon.ProcessKprobe", "args", 4),
    ("tetragon.ProcessKprobe", "return", 5),
    ("tetragon.ProcessKprobe", "action", 6),
    ("tetragon.ProcessKprobe", "policy_name", 8),
    ("tetragon.ProcessTracepoint", "subsys", 4),
    ("tetragon.ProcessTracepoint", "event", 5),
    ("tetragon.ProcessTracepoint", "args", 6),
    ("tetragon.ProcessTracepoint", "policy_name", 7),
    ("tetragon.ProcessTracepoint", "action", 8),
    ("tetragon.ProcessUprobe", "path", 3),
    ("tetragon.ProcessUprobe", "symbol", 4),
    ("tetragon.ProcessUprobe", "policy_name", 5),
    ("tetragon.ProcessUprobe", "args", 7),
    ("tetragon.KprobeArgument", "string_arg", 1),
    ("tetragon.KprobeArgument", "int_arg", 2),
    ("tetragon.KprobeArgument", "size_arg", 4),
    ("tetragon.KprobeArgument", "bytes_arg", 5),
    ("tetragon.KprobeArgument", "path_arg", 6),
    ("tetragon.KprobeArgument", "file_arg", 7),
    ("tetragon.KprobeArgument", "sock_arg", 9),
    ("tetragon.KprobeArgument", "long_arg", 11),
    ("tetragon.KprobeArgument", "uint_arg", 15),
    ("tetragon.KprobeArgument", "label", 18),
    ("tetragon.KprobeSock", "family", 1),
    ("tetragon.KprobeSock", "type", 2),
    ("tetragon.KprobeSock", "protocol", 3),
    ("tetragon.KprobeSock", "saddr", 6),
    ("tetragon.KprobeSock", "daddr", 7),
    ("tetragon.KprobeSock", "sport", 8),
    ("tetragon.KprobeSock", "dport", 9),
    ("tetragon.KprobeFile", "path", 2),
]
TETRAGON_ENUMS = [
    ("tetragon.EventType", "PROCESS_EXEC", 1),
    ("tetragon.EventType", "PROCESS_EXIT", 5),
    ("tetragon.EventType", "PROCESS_KPROBE", 9),
    ("tetragon.EventType", "PROCESS_TRACEPOINT", 10),
    ("tetragon.EventType", "PROCESS_UPROBE", 12),
    ("tetragon.KprobeAction", "KPROBE_ACTION_POST", 1),
    ("tetragon.KprobeAction", "KPROBE_ACTION_SIGKILL", 3),
    ("tetragon.KprobeAction", "KPROBE_ACTION_OVERRIDE", 5),
    ("tetragon.KprobeAction", "KPROBE_ACTION_NOPOST", 9),
    ("tetragon.KprobeAction", "KPROBE_ACTION_SIGNAL", 10),
]


@pytest.mark.parametrize(("message", "field", "number"), TETRAGON_FIELDS)
def test_field_numbers_are_tetragons(message: str, field: str, number: int) -> None:
    desc = descriptor_pool.Default().FindMessageTypeByName(message)
    assert desc.fields_by_name[field].number == number


@pytest.mark.parametrize(("enum", "name", "number"), TETRAGON_ENUMS)
def test_enum_numbers_are_tetragons(enum: str, name: str, number: int) -> None:
    desc = descriptor_pool.Default().FindEnumTypeByName(enum)
    assert desc.values_by_name[name].number == number


def test_event_types_follow_the_oneof() -> None:
    """Tetragon keeps EventType numbers equal to the oneof's field numbers."""
    oneof = events_pb2.GetEventsResponse.DESCRIPTOR.oneofs_by_name["event"]
    for field in oneof.fields:
        assert events_pb2.EventType.Value(field.name.upper()) == field.number


def test_exec_id_is_base64_of_node_ktime_pid() -> None:
    value = exec_id("node-1", 1234567890, 4242)
    assert base64.b64decode(value, validate=True) == b"node-1:1234567890:4242"
