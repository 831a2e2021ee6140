"""The compiled `membrane-cni` executable (native/cni_plugin.c) as a runtime runs it, where
no agent is needed: VERSION, the spec's errors (an unknown command, no agent for ADD, a
configuration it cannot read), DEL without an agent succeeding, the socket it picks, the
HTTP request it sends and the answers it relays (a peer on a unix socket plays the agent's
HTTP side), and `membrane cni install/uninstall` leaving nothing behind. (The real agent's
answers: tests/integration/test_cni_podman.py.)"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import statistics
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from membrane.cni import install as cni_install
from membrane.cni.service import endpoint_name, parse_args
from membrane.errors import UserError
from membrane.testing.agent import membrane_command

PT_INTERP = 3  # an ELF program header naming the dynamic loader
RESULT = b'{"cniVersion": "1.0.0", "interfaces": [{"name": "eth0"}], "ips": []}'


@pytest.fixture
def plugin(tmp_path: Path) -> Path:
    cni_install.install("unit", str(tmp_path / "no-agent.sock"), str(tmp_path / "net.d"),
                        [str(tmp_path / "bin")])  # fmt: skip
    return tmp_path / "bin" / cni_install.PLUGIN


def run(plugin: Path, command: str, config: object, **env: str) -> subprocess.CompletedProcess:
    stdin = config if isinstance(config, str) else json.dumps(config)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("CNI_", "MEMBRANE_"))}
    return subprocess.run(
        [str(plugin)],
        input=stdin,
        env={**base, "CNI_COMMAND": command, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


def config_of(plugin: Path) -> dict:
    conf = json.loads((plugin.parent.parent / "net.d" / "unit.conflist").read_text())
    return {"cniVersion": conf["cniVersion"], "name": conf["name"], **conf["plugins"][0]}


class Peer:
    """The agent's HTTP side on a unix socket: takes one request, answers `answer` bytes
    as they are, and closes."""

    def __init__(self, path: Path, answer: bytes) -> None:
        self.path, self.answer = path, answer
        self.request = b""
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.listener.settimeout(30)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError), self.listener.accept()[0] as conn:
            while not self._complete():
                chunk = conn.recv(65536)
                if not chunk:
                    return
                self.request += chunk
            conn.sendall(self.answer)

    def _complete(self) -> bool:
        head, end, body = self.request.partition(b"\r\n\r\n")
        if not end:
            return False
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        return len(body) >= length

    def close(self) -> None:
        self.thread.join(timeout=10)
        self.listener.close()


@pytest.fixture
def peer(tmp_path: Path) -> Iterator[Callable[[bytes], Peer]]:
    peers: list[Peer] = []

    def start(answer: bytes) -> Peer:
        peers.append(Peer(tmp_path / f"agent{len(peers)}.sock", answer))
        return peers[-1]

    yield start
    for p in peers:
        p.close()


def http(status: str, body: bytes) -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def test_version_lists_what_the_plugin_speaks(plugin: Path) -> None:
    done = run(plugin, "VERSION", {"cniVersion": "1.0.0"})
    assert done.returncode == 0
    assert json.loads(done.stdout) == {"cniVersion": "1.0.0", "supportedVersions": ["1.0.0"]}


def test_add_without_an_agent_is_a_try_again_later_error(plugin: Path) -> None:
    done = run(plugin, "ADD", config_of(plugin), CNI_CONTAINERID="abc", CNI_IFNAME="eth0")
    assert done.returncode == 1
    error = json.loads(done.stdout)
    assert error["code"] == 11 and "not reachable" in error["msg"]
    assert error["details"].startswith(f"no agent answers at {config_of(plugin)['apiSocket']} (")


def test_del_without_an_agent_succeeds(plugin: Path) -> None:
    done = run(plugin, "DEL", config_of(plugin), CNI_CONTAINERID="abc", CNI_IFNAME="eth0")
    assert done.returncode == 0 and done.stdout == ""
    assert "without an agent" in done.stderr and "no-agent.sock" in done.stderr


def test_an_unknown_command_is_error_4(plugin: Path) -> None:
    done = run(plugin, "FROB", config_of(plugin))
    assert done.returncode == 1
    assert json.loads(done.stdout) == {
        "cniVersion": "1.0.0", "code": 4, "msg": "CNI_COMMAND 'FROB' is not supported",
    }  # fmt: skip
    unset = subprocess.run([str(plugin)], input="{}", env={}, capture_output=True, text=True)
    assert json.loads(unset.stdout)["msg"] == "CNI_COMMAND '' is not supported"


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        ("", "it is empty"),
        ("[1]", "no JSON object"),
        ('{"apiSocket": 5}', "apiSocket is not a string"),
        ('{"apiSocket": "/run/x.sock"', "',' or '}' is missing"),
        ('{"apiSocket": "/run/\\q"}', "invalid escape"),
        ('{"apiSocket": "/run/\\ud800"}', "lone UTF-16 surrogate"),
        ('{"apiSocket": "/a\\u0000b"}', "NUL"),
        ('{"a": [1, {"b": "}"}, "apiSocket": "/run/x"}', "out of place"),
        ('{"apiSocket": "/run/x", "a": [1, [2', "unterminated"),
        ('{"apiSocket": "/run/x"} {}', "more follows"),
    ],
)
def test_a_configuration_it_cannot_read_is_error_6(plugin: Path, config: str, problem: str) -> None:
    for command in ("ADD", "DEL"):
        done = run(plugin, command, config)
        assert done.returncode == 1, done
        error = json.loads(done.stdout)
        assert error["code"] == 6 and problem in error["details"], error


def test_the_socket_is_the_top_level_api_socket_decoded(plugin: Path, tmp_path: Path) -> None:
    """Escapes decoded (`membrane cni install` writes json.dumps' ASCII escapes), a nested
    apiSocket ignored, the last of two kept as json.loads keeps it; else the environment's,
    else the agent's default."""
    odd = '/tmp/quote"back\\slash é 😀.sock'
    config = (
        '{"prevResult": {"apiSocket": "/nested"}, "apiSocket": "/first", "apiSocket ": "/x",'
        f' "apiSocket": {json.dumps(odd)}}}'
    )
    done = run(plugin, "ADD", config, MEMBRANE_API_SOCKET="/env.sock")
    assert json.loads(done.stdout)["details"].startswith(f"no agent answers at {odd} (")
    done = run(plugin, "ADD", {"cniVersion": "1.0.0"}, MEMBRANE_API_SOCKET="/env.sock")
    assert json.loads(done.stdout)["details"].startswith("no agent answers at /env.sock (")
    done = run(plugin, "ADD", {"cniVersion": "1.0.0"})
    assert "at /run/membrane/membrane.sock (" in json.loads(done.stdout)["details"]


def test_the_request_carries_the_environment_url_encoded_and_the_config(
    plugin: Path, peer: Callable[[bytes], Peer]
) -> None:
    agent = peer(http("200 OK", RESULT))
    config = json.dumps({"cniVersion": "1.0.0", "apiSocket": str(agent.path), "é": 1})
    done = run(plugin, "ADD", config, CNI_CONTAINERID="abc-1", CNI_NETNS="/run/netns/a b",
               CNI_IFNAME="eth0", CNI_ARGS="K8S_POD_NAME=web;X=é&y")  # fmt: skip
    assert (done.returncode, done.stdout) == (0, RESULT.decode() + "\n")
    agent.close()
    head, _, body = agent.request.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == (
        b"POST /v1/cni/add?container_id=abc-1&netns=/run/netns/a%20b&ifname=eth0"
        b"&args=K8S_POD_NAME%3Dweb%3BX%3D%C3%A9%26y HTTP/1.1"
    )
    assert f"Content-Length: {len(config.encode())}".encode() in lines
    assert body == config.encode()


@pytest.mark.parametrize(
    ("command", "answer", "code", "stdout"),
    [
        ("ADD", http("200 OK", b"\n" + RESULT + b"\n\n"), 0, "\n" + RESULT.decode() + "\n"),
        ("DEL", http("200 OK", b'{"cniVersion": "1.0.0"}'), 0, ""),
        ("CHECK", http("200 OK", b'{"cniVersion": "1.0.0"}'), 0, ""),
        ("DEL", http("400 Bad Request", b'{"cniVersion": "1.0.0", "code": 7}'), 1,
         '{"cniVersion": "1.0.0", "code": 7}\n'),
        # aiohttp answers with a Content-Length; a chunked answer is read as well.
        ("ADD", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
         + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (RESULT[:10], RESULT[10:]))
         + b"0\r\n\r\n", 0, RESULT.decode() + "\n"),
    ],
)  # fmt: skip
def test_the_agents_answer_is_relayed_as_it_is(
    plugin: Path, peer: Callable[[bytes], Peer], command: str, answer: bytes, code: int, stdout: str
) -> None:
    agent = peer(answer)
    done = run(plugin, command, {"cniVersion": "1.0.0", "apiSocket": str(agent.path)})
    assert (done.returncode, done.stdout) == (code, stdout), done.stderr


@pytest.mark.parametrize(
    ("answer", "code", "details"),
    [
        (http("500 Internal Server Error", b"boom \xff"), 100, "HTTP 500: boom \ufffd"),
        (http("200 OK", b"[]"), 100, "HTTP 200: []"),
        (b"SSH-2.0-x\r\n\r\n", 11, "(not an HTTP answer: b'SSH-2.0-x\\r\\n\\r\\n')"),
        (http("200 OK", RESULT)[:-5], 11, "(an answer shorter than its Content-Length)"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab", 11, "cut short"),
        (b"", 11, "(not an HTTP answer: b'')"),
    ],
)
def test_anything_but_the_specs_json_is_an_error(
    plugin: Path, peer: Callable[[bytes], Peer], answer: bytes, code: int, details: str
) -> None:
    agent = peer(answer)
    done = run(plugin, "ADD", {"cniVersion": "1.0.0", "apiSocket": str(agent.path)})
    assert done.returncode == 1
    error = json.loads(done.stdout)
    assert error["code"] == code and details in error["details"], error


def test_the_plugin_is_a_static_executable_that_starts_fast(plugin: Path) -> None:
    """It runs on every container start and stop, on nodes whose libc may differ: no
    interpreter (ELF without PT_INTERP), and a start far below a Python one's ~10 ms."""
    elf = plugin.read_bytes()
    assert elf[:4] == b"\x7fELF"
    (phoff,) = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    segment_types = [struct.unpack_from("<I", elf, phoff + i * phentsize)[0] for i in range(phnum)]
    assert PT_INTERP not in segment_types
    times = []
    for _ in range(9):
        started = time.perf_counter()
        run(plugin, "VERSION", {"cniVersion": "1.0.0"})
        times.append(time.perf_counter() - started)
    assert statistics.median(times) < 0.05  # ~1 ms with Python's subprocess; generous for CI


def test_install_without_the_built_executable_is_a_user_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cni_install, "EXECUTABLE", tmp_path / "not-built" / "membrane-cni")
    with pytest.raises(UserError, match=r"membrane-cni is not built: run `make"):
        cni_install.install("a", "/run/x.sock", str(tmp_path / "net.d"), [str(tmp_path / "b")])
    assert list(tmp_path.iterdir()) == []


def test_install_and_uninstall_leave_nothing(tmp_path: Path) -> None:
    conf_dir, bin_dir = tmp_path / "net.d", tmp_path / "bin"
    args = ["--conf-dir", str(conf_dir), "--bin-dir", str(bin_dir)]
    cli = membrane_command()
    subprocess.run([cli, "cni", "install", "--name", "a", "--api-socket", "/run/x.sock", *args],
                   check=True, capture_output=True)  # fmt: skip
    subprocess.run([cli, "cni", "install", "--name", "b", *args], check=True, capture_output=True)
    doc = json.loads((conf_dir / "a.conflist").read_text())
    assert doc["name"] == "a" and doc["cniVersion"] == "1.0.0"
    assert doc["plugins"] == [{"type": "membrane-cni", "apiSocket": "/run/x.sock"}]
    subprocess.run([cli, "cni", "uninstall", "--name", "a", *args], check=True)
    assert (bin_dir / "membrane-cni").exists()  # network b still uses it
    subprocess.run([cli, "cni", "uninstall", "--name", "b", *args], check=True)
    assert list(conf_dir.iterdir()) == [] and list(bin_dir.iterdir()) == []


def test_a_bad_network_name_is_one_line_and_exit_2(tmp_path: Path) -> None:
    done = subprocess.run(
        [membrane_command(), "cni", "install", "--name", "no spaces", "--conf-dir",
         str(tmp_path), "--bin-dir", str(tmp_path)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "membrane: error: --name: 'no spaces' is not a CNI network name ([A-Za-z0-9_.-])"
    ]
    assert list(tmp_path.iterdir()) == []


def test_cni_args_and_names() -> None:
    assert parse_args("IgnoreUnknown=1;K8S_POD_NAME=web;K8S_POD_NAMESPACE=shop") == {
        "IgnoreUnknown": "1", "K8S_POD_NAME": "web", "K8S_POD_NAMESPACE": "shop",
    }  # fmt: skip
    assert parse_args("") == {}
    assert endpoint_name("magical_proskuriakova", "abc") == "magical-proskuriakova"
    assert endpoint_name("Web.1", "abc") == "web.1"
    assert endpoint_name("___", "0123456789abcdef") == "c-0123456789ab"
    assert endpoint_name(None, "0123456789ABCDEF") == "c-0123456789ab"
