"""Tetragon's redaction filters: secrets in process arguments (a password on a command
line) replaced by "*****" before any reader or the export file sees them.

Each filter has `redact` regular expressions whose capture groups' text is replaced, and
optionally `binary_regex` naming the binaries it applies to. Applied to the process, the
parent and the ancestors of every event.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass

from google.protobuf import json_format

from membrane.errors import UserError
from membrane.json_objects import concatenated_objects
from membrane.tetragon.tetragon import events_pb2, tetragon_pb2

REDACTED = "*****"


@dataclass(frozen=True)
class Redaction:
    redact: tuple[re.Pattern[str], ...]
    binaries: tuple[re.Pattern[str], ...]

    def applies_to(self, binary: str) -> bool:
        return not self.binaries or any(b.search(binary) for b in self.binaries)

    def apply(self, text: str) -> str:
        for pattern in self.redact:
            text = pattern.sub(lambda m: _redact_groups(m), text)
        return text


def _redact_groups(match: re.Match[str]) -> str:
    """The match with each capture group's text replaced (groups in order, not nested)."""
    whole, start = match.group(0), match.start(0)
    pieces, at = [], 0
    for i in range(1, (match.re.groups or 0) + 1):
        if match.start(i) < 0:
            continue
        s, e = match.start(i) - start, match.end(i) - start
        if s < at:
            continue
        pieces += [whole[at:s], REDACTED]
        at = e
    return "".join(pieces) + whole[at:]


class Redactor:
    def __init__(self, redactions: tuple[Redaction, ...]) -> None:
        self.redactions = redactions

    def __bool__(self) -> bool:
        return bool(self.redactions)

    def process(self, process: tetragon_pb2.Process) -> None:
        for r in self.redactions:
            if process.arguments and r.applies_to(process.binary):
                process.arguments = r.apply(process.arguments)

    def event(self, event: events_pb2.GetEventsResponse) -> None:
        for process in _processes(event):
            self.process(process)


def _processes(event: events_pb2.GetEventsResponse) -> Iterator[tetragon_pb2.Process]:
    kind = event.WhichOneof("event")
    message = getattr(event, kind) if kind else None
    if message is None or not hasattr(message, "process"):
        return
    yield message.process
    if message.HasField("parent"):
        yield message.parent
    yield from getattr(message, "ancestors", ())


def parse_redaction_filters(text: str, option: str = "security-redaction-filters") -> Redactor:
    """RedactionFilter objects in JSON (proto field names), one per line, as Tetragon's
    --redaction-filters takes them. Every regular expression must have a capture group."""
    out = []
    for i, obj in enumerate(concatenated_objects(text, option)):
        where = f"{option}[{i}]"
        if not isinstance(obj, dict):
            raise UserError(where, f"is not a RedactionFilter object: {json.dumps(obj)}")
        try:
            f = json_format.ParseDict(obj, events_pb2.RedactionFilter())
        except json_format.ParseError as err:
            raise UserError(where, f"is not a RedactionFilter: {err}") from None
        if f.match:
            raise UserError(f"{where}.match", "is deprecated in Tetragon and not supported")
        if not f.redact:
            raise UserError(f"{where}.redact", "names no regular expression")
        redact = tuple(_compile(p, f"{where}.redact[{j}]", True) for j, p in enumerate(f.redact))
        binaries = tuple(
            _compile(p, f"{where}.binary_regex[{j}]", False) for j, p in enumerate(f.binary_regex)
        )
        out.append(Redaction(redact, binaries))
    return Redactor(tuple(out))


def _compile(pattern: str, where: str, needs_group: bool) -> re.Pattern[str]:
    try:
        compiled = re.compile(pattern)
    except re.error as err:
        raise UserError(where, f"{pattern!r} is not a regular expression: {err}") from None
    if needs_group and not compiled.groups:
        raise UserError(where, f"{pattern!r} has no capture group: nothing would be redacted")
    return compiled
