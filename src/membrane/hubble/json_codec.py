"""Protobuf JSON (what `hubble observe -o json` prints) to and from our messages, fast
enough for flow logs: written as flows happen, read back to refill the flow store when the
agent starts.

protobuf's own `json_format` walks every field in Python with checks for every type
protobuf knows: ~0.14 ms to write a flow and ~0.6 ms to read one here (a minute for 100k
flows). This codec plans each message type once (JSON key -> field, kind, enum names) and
handles only the kinds our protos use (scalars, enums, messages, repeated fields, Timestamp
and the wrapper types); it falls back to `json_format` for anything else, so the result is
always what protobuf gives (tests/unit/test_json_codec.py checks them against each other).
`json_format` itself is imported only for such a fallback (`membrane observe -o json`
starts without it).
"""

from __future__ import annotations

import calendar
from collections.abc import Callable
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

_WRAPPERS = {
    "google.protobuf.BoolValue",
    "google.protobuf.Int32Value",
    "google.protobuf.UInt32Value",
    "google.protobuf.Int64Value",
    "google.protobuf.UInt64Value",
    "google.protobuf.FloatValue",
    "google.protobuf.DoubleValue",
    "google.protobuf.StringValue",
    "google.protobuf.BytesValue",
}
_TIMESTAMP = "google.protobuf.Timestamp"
_INTS = {
    FieldDescriptor.TYPE_INT32,
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT32,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED32,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED32,
    FieldDescriptor.TYPE_SFIXED64,
}
_FLOATS = {FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE}
_AS_IS = {FieldDescriptor.TYPE_BOOL, FieldDescriptor.TYPE_STRING}
_64_BITS = {
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED64,
}


class _Unplanned(Exception):
    """A value this decoder does not handle: let protobuf's parser have the line."""


Setter = Callable[[Message, str, Any], None]
_plans: dict[str, dict[str, tuple[str, Setter]]] = {}


# ---- to JSON -------------------------------------------------------------------------------
_Encoder = Callable[[Any], Any]
_encoders: dict[str, dict[str, tuple[str, _Encoder]]] = {}


def encode(message: Message) -> dict[str, Any]:
    """`json_format.MessageToDict(message, preserving_proto_field_name=True)`, faster."""
    try:
        return _dict_of(message)
    except _Unplanned:
        from google.protobuf import json_format

        return json_format.MessageToDict(message, preserving_proto_field_name=True)


def _dict_of(message: Message) -> dict[str, Any]:
    plan = _encoder_plan(message.DESCRIPTOR)
    out = {}
    for field, value in message.ListFields():  # set fields only: zero values left out
        name, convert = plan[field.name]
        out[name] = convert(value)
    return out


def _encoder_plan(descriptor: Descriptor) -> dict[str, tuple[str, _Encoder]]:
    plan = _encoders.get(descriptor.full_name)
    if plan is None:
        plan = {f.name: (f.name, _encoder(f)) for f in descriptor.fields}
        _encoders[descriptor.full_name] = plan
    return plan


def _encoder(field: FieldDescriptor) -> _Encoder:
    one: _Encoder
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        sub = field.message_type
        if sub.GetOptions().map_entry:
            one = _refuse
        elif sub.full_name == _TIMESTAMP:
            one = _timestamp_text
        elif sub.full_name in _WRAPPERS:
            inner = _encoder(sub.fields_by_name["value"])
            one = lambda msg: inner(msg.value)  # noqa: E731 - present even when zero
        elif sub.full_name.startswith("google.protobuf."):
            one = _refuse
        else:
            one = _dict_of
    elif field.type == FieldDescriptor.TYPE_ENUM:
        names = {v.number: v.name for v in field.enum_type.values}
        one = lambda number: names.get(number, number)  # noqa: E731 - unknown: the number
    elif field.type in _64_BITS:
        one = str  # protobuf JSON writes 64-bit integers as strings
    elif field.type in _INTS or field.type in _AS_IS:
        one = _same
    else:
        one = _refuse  # floats, bytes: protobuf's own formatting
    if _is_repeated(field):
        return lambda values: [one(v) for v in values]
    return one


def _same(value: Any) -> Any:
    return value


def _refuse(value: Any) -> Any:
    raise _Unplanned


def _timestamp_text(stamp: Any) -> str:
    return stamp.ToJsonString()


# ---- from JSON -----------------------------------------------------------------------------
def decode(obj: dict[str, Any], message: Message) -> Message:
    """`message` filled from `obj` (a JSON object); ValueError/ParseError if it is not
    that message's JSON, exactly as json_format.ParseDict says."""
    try:
        _fill(obj, message)
    except (_Unplanned, TypeError, ValueError, KeyError, AttributeError):
        from google.protobuf import json_format

        message.Clear()
        json_format.ParseDict(obj, message)
    return message


def _fill(obj: dict[str, Any], message: Message) -> None:
    plan = _plan(message.DESCRIPTOR)
    for key, value in obj.items():
        name, setter = plan[key]  # KeyError: not a field (protobuf reports it)
        if value is not None:
            setter(message, name, value)


def _plan(descriptor: Descriptor) -> dict[str, tuple[str, Setter]]:
    plan = _plans.get(descriptor.full_name)
    if plan is None:
        plan = {}
        for field in descriptor.fields:
            setter = _setter(field)
            plan[field.name] = plan[field.json_name] = (field.name, setter)
        _plans[descriptor.full_name] = plan
    return plan


def _setter(field: FieldDescriptor) -> Setter:
    repeated = _is_repeated(field)
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        sub = field.message_type
        if sub.GetOptions().map_entry:
            return _unplanned
        if sub.full_name == _TIMESTAMP:
            convert: Callable[[Message, Any], None] = _timestamp
        elif sub.full_name in _WRAPPERS:
            value_setter = _setter(sub.fields_by_name["value"])
            convert = lambda msg, v: value_setter(msg, "value", v)  # noqa: E731
        elif sub.full_name.startswith("google.protobuf."):
            return _unplanned  # Any, Struct, Duration...: protobuf's parser
        else:
            convert = _fill_object
        if repeated:
            return lambda msg, name, values: _each(getattr(msg, name), convert, values)
        return lambda msg, name, v: _singular(getattr(msg, name), convert, v)
    scalar = _scalar(field)
    if repeated:
        return lambda msg, name, values: getattr(msg, name).extend(
            [scalar(v) for v in _list(values)]
        )
    return lambda msg, name, v: setattr(msg, name, scalar(v))


def _is_repeated(field: FieldDescriptor) -> bool:
    # protobuf >= 6 has `is_repeated` (and drops `label` in 7); older ones only `label`
    if hasattr(field, "is_repeated"):
        return bool(field.is_repeated)
    return field.label == FieldDescriptor.LABEL_REPEATED  # type: ignore[attr-defined]


def _singular(sub: Message, convert: Callable[[Message, Any], None], value: Any) -> None:
    sub.SetInParent()  # present even when empty ({} in JSON)
    convert(sub, value)


def _each(container: Any, convert: Callable[[Message, Any], None], values: Any) -> None:
    for value in _list(values):
        convert(container.add(), value)


def _fill_object(message: Message, value: Any) -> None:
    if not isinstance(value, dict):
        raise _Unplanned
    _fill(value, message)


def _scalar(field: FieldDescriptor) -> Callable[[Any], Any]:
    t = field.type
    if t == FieldDescriptor.TYPE_ENUM:
        numbers = {v.name: v.number for v in field.enum_type.values}
        return lambda v: numbers[v] if isinstance(v, str) else _int(v)
    if t in _INTS:
        return _int
    if t in _FLOATS:
        return float
    if t == FieldDescriptor.TYPE_BOOL:
        return _bool
    if t == FieldDescriptor.TYPE_STRING:
        return _str
    raise _Unplanned  # bytes: protobuf's parser (our flows carry none)


def _list(values: Any) -> list[Any]:
    if not isinstance(values, list):
        raise _Unplanned
    return values


def _int(value: Any) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise _Unplanned
    return int(value)


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Unplanned
    return value


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise _Unplanned
    return value


def _unplanned(message: Message, name: str, value: Any) -> None:
    raise _Unplanned


def _timestamp(message: Message, text: Any) -> None:
    """RFC 3339 in UTC as protobuf writes it ("2026-12-06T10:00:01.123456789Z")."""
    if not isinstance(text, str) or len(text) < 20 or text[-1] != "Z" or text[10] != "T":
        raise _Unplanned
    whole, _, fraction = text[:-1].partition(".")
    shape = (whole[4], whole[7], whole[13], whole[16]) if len(whole) == 19 else ()
    if shape != ("-", "-", ":", ":") or len(fraction) > 9 or (not fraction.isdigit() and fraction):
        raise _Unplanned
    seconds = calendar.timegm(
        (
            int(whole[0:4]),
            int(whole[5:7]),
            int(whole[8:10]),
            int(whole[11:13]),
            int(whole[14:16]),
            int(whole[17:19]),
        )
    )
    message.seconds = seconds  # type: ignore[attr-defined]
    message.nanos = int(fraction.ljust(9, "0")) if fraction else 0  # type: ignore[attr-defined]
