"""`membrane-cni`: the CNI plugin executable (CNI spec 1.0.0), a thin client of the agent.

The runtime runs it twice per container (ADD, DEL), so it starts on `os`, `sys` and the C
socket module alone: importing `json` and `socket` (re, enum) would triple its ~10 ms start.
It parses nothing: the network configuration (stdin) goes to the agent as the body of
`POST /v1/cni/<command>?container_id=..&netns=..&ifname=..&args=..` on the socket named by
the configuration's `apiSocket` (read by the agent, so the plugin finds it with a plain
search), and it prints the agent's answer, which is already the spec's result (HTTP 200)
or error (HTTP 400) JSON.

Without an agent: ADD and CHECK fail with code 11 (try again later) naming the socket; DEL
succeeds, as the spec asks of a cleanup whose resources may be gone: the veth goes with the
runtime's namespace, and the agent forgets the container when it starts again and finds
the namespace gone.
"""

from __future__ import annotations

import _socket
import os
import sys

SUPPORTED_VERSIONS = '["1.0.0"]'
COMMANDS = ("ADD", "DEL", "CHECK")
DEFAULT_SOCKET = "/run/membrane/membrane.sock"  # membrane.api.client's default
SOCKET_ENV = "MEMBRANE_API_SOCKET"
ERR_INVALID_ENVIRONMENT = 4
ERR_TRY_AGAIN_LATER = 11
ERR_REFUSED = 100
TIMEOUT = 300.0
_URL_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~/")


def main() -> int:
    command = os.environ.get("CNI_COMMAND", "")
    config = sys.stdin.buffer.read()
    if command == "VERSION":
        _print(f'{{"cniVersion": "1.0.0", "supportedVersions": {SUPPORTED_VERSIONS}}}')
        return 0
    if command not in COMMANDS:
        return _fail(ERR_INVALID_ENVIRONMENT, f"CNI_COMMAND {command!r} is not supported")
    query = "&".join(
        f"{key}={_quote(os.environ.get(var, ''))}"
        for key, var in (
            ("container_id", "CNI_CONTAINERID"),
            ("netns", "CNI_NETNS"),
            ("ifname", "CNI_IFNAME"),
            ("args", "CNI_ARGS"),
        )
    )
    path = api_socket(config)
    try:
        status, answer = _post(path, f"/v1/cni/{command.lower()}?{query}", config)
    except OSError as err:
        problem = f"no agent answers at {path} ({err.strerror or err})"
        if command == "DEL":
            print(f"membrane-cni: DEL without an agent: {problem}", file=sys.stderr)
            return 0
        return _fail(ERR_TRY_AGAIN_LATER, "the membrane agent is not reachable", problem)
    if status not in (200, 400) or not answer.lstrip().startswith(b'{"cniVersion"'):
        text = answer[:300].decode(errors="replace")
        return _fail(ERR_REFUSED, "the membrane agent refused the call", f"HTTP {status}: {text}")
    if status == 400 or command == "ADD":
        sys.stdout.buffer.write(answer.rstrip() + b"\n")
    return 0 if status == 200 else 1


def api_socket(config: bytes) -> str:
    """The configuration's `"apiSocket": "PATH"` (a plain path, as `membrane cni install`
    writes it), else $MEMBRANE_API_SOCKET, else the agent's default."""
    key = config.find(b'"apiSocket"')
    if key >= 0:
        start = config.find(b'"', config.find(b":", key) + 1)
        end = config.find(b'"', start + 1)
        if 0 <= start < end:
            return config[start + 1 : end].decode()
    return os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET


def _post(socket_path: str, target: str, body: bytes) -> tuple[int, bytes]:
    """One HTTP/1.1 request on its own connection; (status, body)."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(TIMEOUT)
        sock.connect(socket_path)
        head = (
            f"POST {target} HTTP/1.1\r\nHost: membrane\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        sock.sendall(head.encode() + body)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    finally:
        sock.close()
    response = b"".join(chunks)
    head_end = response.find(b"\r\n\r\n")
    status_line = response[: response.find(b"\r\n")].split()
    if head_end < 0 or len(status_line) < 2 or not status_line[1].isdigit():
        raise OSError(f"not an HTTP answer: {response[:80]!r}")
    return int(status_line[1]), response[head_end + 4 :]


def _quote(text: str) -> str:
    return "".join(chr(b) if b in _URL_SAFE else f"%{b:02X}" for b in text.encode())


def _string(text: str) -> str:
    """A JSON string (what json.dumps would write, without importing json)."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _fail(code: int, msg: str, details: str = "") -> int:
    extra = f', "details": {_string(details)}' if details else ""
    _print(f'{{"cniVersion": "1.0.0", "code": {code}, "msg": {_string(msg)}{extra}}}')
    return 1


def _print(line: str) -> None:
    sys.stdout.write(line + "\n")


if __name__ == "__main__":
    sys.exit(main())
