"""`membrane-cni`: the CNI plugin executable (CNI spec 1.0.0), a thin client of the agent.

The runtime runs it once per call, so it starts on the standard library alone (the
installed launcher runs Python with -I -S and imports only this module and the API client):
it reads the network configuration from stdin and CNI_* from the environment, hands them to
the agent (`POST /v1/cni/<command>` on the socket named by the configuration's `apiSocket`)
and prints the agent's answer, which is already the spec's result or error JSON.

Without an agent: ADD and CHECK fail with code 11 (try again later) naming the socket; DEL
succeeds, as the spec asks of a cleanup whose resources may be gone: the veth goes with the
runtime's namespace, and the agent forgets the container when it starts again and finds
the namespace gone.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from membrane.api.client import AgentUnavailable, ApiClient, socket_path
from membrane.errors import UserError

SUPPORTED_VERSIONS = ("1.0.0",)
ERR_INCOMPATIBLE_VERSION = 1
ERR_INVALID_ENVIRONMENT = 4
ERR_DECODING_FAILURE = 6
ERR_TRY_AGAIN_LATER = 11
ERR_REFUSED = 100
COMMANDS = ("ADD", "DEL", "CHECK")


def main() -> int:
    command = os.environ.get("CNI_COMMAND", "")
    raw = sys.stdin.buffer.read()
    try:
        config = json.loads(raw) if raw.strip() else {}
        if not isinstance(config, dict):
            raise ValueError("the network configuration is not a JSON object")
    except ValueError as err:
        return _fail("1.0.0", ERR_DECODING_FAILURE, "cannot decode the network configuration", err)
    version = str(config.get("cniVersion", SUPPORTED_VERSIONS[-1]))
    if command == "VERSION":
        _print({"cniVersion": version, "supportedVersions": list(SUPPORTED_VERSIONS)})
        return 0
    if version not in SUPPORTED_VERSIONS:
        return _fail(
            version,
            ERR_INCOMPATIBLE_VERSION,
            f"cniVersion {version} is not supported",
            f"supported: {', '.join(SUPPORTED_VERSIONS)}",
        )
    if command not in COMMANDS:
        return _fail(version, ERR_INVALID_ENVIRONMENT, f"CNI_COMMAND {command!r} is not supported")
    body = {
        "container_id": os.environ.get("CNI_CONTAINERID", ""),
        "netns": os.environ.get("CNI_NETNS", ""),
        "ifname": os.environ.get("CNI_IFNAME", ""),
        "args": os.environ.get("CNI_ARGS", ""),
        "config": config,
    }
    api_socket = socket_path(config.get("apiSocket"))
    try:
        answer = ApiClient(api_socket).post(f"/v1/cni/{command.lower()}", body)
    except AgentUnavailable as err:
        if command == "DEL":
            print(f"membrane-cni: DEL without an agent: {err.problem}", file=sys.stderr)
            return 0
        return _fail(version, ERR_TRY_AGAIN_LATER, "the membrane agent is not reachable", err)
    except UserError as err:
        return _fail(version, ERR_REFUSED, "the membrane agent refused the call", err)
    if not isinstance(answer, dict):
        return _fail(version, ERR_REFUSED, "the membrane agent answered no JSON object", answer)
    if "code" in answer:
        _print(answer)
        return 1
    if command == "ADD":
        _print(answer)
    return 0


def _fail(version: str, code: int, msg: str, details: Any = "") -> int:
    error: dict[str, Any] = {"cniVersion": version, "code": code, "msg": msg}
    if str(details):
        error["details"] = str(details)
    _print(error)
    return 1


def _print(doc: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(doc) + "\n")


if __name__ == "__main__":
    sys.exit(main())
