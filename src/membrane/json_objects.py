"""JSON objects one after another (`{"a":1}{"b":2}`, or one per line, commas between
allowed): how Hubble's and Tetragon's exporters take their filter lists."""

from __future__ import annotations

import json

from membrane.errors import UserError


def concatenated_objects(text: str, option: str) -> list[object]:
    """The values in `text`, in order; text that is not JSON is a UserError on `option`."""
    decoder, objects, at = json.JSONDecoder(), [], 0
    text = text.strip()
    while at < len(text):
        try:
            obj, at = decoder.raw_decode(text, at)
        except json.JSONDecodeError as err:
            raise UserError(option, f"is not JSON ({err})") from None
        objects.append(obj)
        while at < len(text) and (text[at].isspace() or text[at] == ","):
            at += 1
    return objects
