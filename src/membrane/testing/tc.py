"""tc filters on a device as iproute2's `tc` reports them: a view independent of our loader,
so a test can count what is attached (a restart must replace a clsact filter, never add a
second one beside it)."""

from __future__ import annotations

import json
from typing import Any

from membrane import netns


def clsact_filters(ns: str, dev: str, direction: str) -> list[dict[str, Any]]:
    """The filters on `dev`'s clsact hook `direction` (ingress or egress) in namespace
    `ns`; each has `pref` (the priority) and `options` (handle, bpf_name, prog id)."""
    out = netns.run(ns, ["tc", "-j", "filter", "show", "dev", dev, direction]).stdout
    return [f for f in json.loads(out or "[]") if "options" in f]


def filter_program_ids(ns: str, dev: str, direction: str) -> list[int]:
    return [f["options"]["prog"]["id"] for f in clsact_filters(ns, dev, direction)]
