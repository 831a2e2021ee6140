"""The real agent for tests and benchmarks: `membrane agent run` as a subprocess with a node
namespace, state directory, API socket and pod-namespace prefix of its own, driven through
the `membrane` CLI exactly as a user would (or through its REST API where only the time
of the call matters).

Everything it makes is named after its tag, so `destroy` removes all of it by name and by
PID whatever happened: the agent's process group, the endpoint links, the pod namespaces
(by prefix), the outside host and node namespaces, the BPF pins and the state directory.

    with running_agent("mbt123a") as agent:
        agent.cli("endpoint", "add", "x/a")
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import time
import warnings
from collections.abc import Iterator, Sequence
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import Any

from membrane import netns
from membrane.api.client import SOCKET_ENV, AgentUnavailable, ApiClient
from membrane.bpf.fs import PIN_ROOT
from membrane.datapath.endpoint_prog import detach_all_endpoints
from membrane.endpoint.node import NodeInfo

AGENTS_PIN_ROOT = Path(PIN_ROOT) / "agent"
NODE_IP = "198.19.0.1"
POD_CIDR = "198.18.0.0/16"
NODE_IP6 = "2001:db8::1"
POD_CIDR6 = "2001:db8:1::/64"
READY_LINE = "membrane agent ready"  # what `membrane agent run` prints once it serves
START_TIMEOUT = 60.0
CLI_TIMEOUT = 120.0
MEMORY_LIMIT = 2 << 30  # address space; an agent normally uses < 0.4 GiB


def membrane_command() -> str:
    """The `membrane` console script of the interpreter running us: its environment's
    scripts directory (a virtualenv's bin/, wherever the checkout is), or the user scheme's
    for a `pip install --user`. Never another `membrane` found on PATH, which would test
    some other installation. Raises when there is none: a broken install is a failure,
    not a reason to skip."""
    schemes = (sysconfig.get_default_scheme(), sysconfig.get_preferred_scheme("user"))
    places = [Path(sysconfig.get_path("scripts", scheme)) for scheme in schemes]
    for place in places:
        script = place / "membrane"
        if os.access(script, os.X_OK):
            return str(script)
    raise RuntimeError(
        f"the `membrane` command is not installed beside {sys.executable} (looked in "
        f"{', '.join(map(str, places))}): run `pip install -e .` in this environment"
    )


def agent_unusable_reason() -> str | None:
    """Why an agent cannot be started here (a skip reason: not root), or None. A missing
    `membrane` command is no such reason: membrane_command() raises, and the test fails."""
    membrane_command()
    if os.geteuid() != 0:
        return "needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_BPF): run the suite as root"
    return None


def _limit_memory(limit: int) -> None:
    """In the agent's child process: a runaway agent fails with MemoryError (a traceback
    in its log) instead of making the kernel's OOM killer pick victims on a shared box."""
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


class AgentProcess:
    """One `membrane agent run` with its own node namespace and everything else.

    `log_level` is the agent's; `memory_limit` caps its address space (None: no cap);
    `allow_localhost` its `--allow-localhost` (None: the agent's default). Change it and
    restart to run the same agent in another mode; `attach` its --attach (auto, tcx or
    clsact; None: the default); `policy_map_max` its --policy-map-max (None: the default)."""

    def __init__(
        self,
        workdir: Path,
        tag: str,
        log_level: str = "debug",
        memory_limit: int | None = MEMORY_LIMIT,
        allow_localhost: str | None = None,
        attach: str | None = None,
        policy_map_max: int | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.tag = tag
        self.node_netns = f"{tag}n"
        self.prefix = f"{tag}-"
        self.external_netns = f"{tag}w"  # the outside host's, when there is one
        self.state_dir = workdir / "state"
        self.socket = str(workdir / "api.sock")
        self.log_path = workdir / "agent.log"
        self.bpf_dir = AGENTS_PIN_ROOT / self.node_netns
        self.log_level = log_level
        self.memory_limit = memory_limit
        self.allow_localhost = allow_localhost
        self.attach = attach  # --attach (None: the agent's default, auto)
        self.policy_map_max = policy_map_max
        self.extra_args = list(extra_args)  # more `agent run` options (--ipv6=false, ...)
        self.proc: subprocess.Popen[str] | None = None
        self.expect_down = False  # we stopped it on purpose (kill9/stop)
        self.env = {**os.environ, SOCKET_ENV: self.socket}
        ipv4_only = "--ipv6=false" in self.extra_args
        node6 = None if ipv4_only else IPv6Address(NODE_IP6)
        self.node = NodeInfo(self.node_netns, IPv4Address(NODE_IP), node6)

    def argv(self) -> list[str]:
        mode = self.allow_localhost
        options = [] if mode is None else ["--allow-localhost", mode]
        if self.attach is not None:
            options += ["--attach", self.attach]
        if self.policy_map_max is not None:
            options += ["--policy-map-max", str(self.policy_map_max)]
        return [
            membrane_command(), "agent", "run",
            "--state-dir", str(self.state_dir),
            "--api-socket", self.socket,
            "--node-netns", self.node_netns,
            "--pod-cidr", POD_CIDR,
            "--node-ip", NODE_IP,
            "--pod-cidr-v6", POD_CIDR6,
            "--node-ipv6", NODE_IP6,
            "--netns-prefix", self.prefix,
            "--log-level", self.log_level,
            *options,
            *self.extra_args,
        ]  # fmt: skip

    # ---- life cycle --------------------------------------------------------------------
    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start the agent and return once it printed its ready line; on a timeout or an
        early exit, kill it and fail with the tail of its log (its stderr)."""
        assert not self.running(), "the agent is already running"
        if self.proc is not None:
            self._reap()  # the previous run's exit status and pipe
        self.expect_down = False
        limit = self.memory_limit
        log = open(self.log_path, "a")  # noqa: SIM115 - the child keeps writing to it
        log.write(f"---- start {time.strftime('%H:%M:%S')}: {' '.join(self.argv())}\n")
        log.flush()
        try:
            self.proc = subprocess.Popen(
                self.argv(),
                stdout=subprocess.PIPE,
                stderr=log,
                stdin=subprocess.DEVNULL,
                text=True,
                env=self.env,
                start_new_session=True,
                preexec_fn=None if limit is None else lambda: _limit_memory(limit),
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        seen = ""
        while READY_LINE not in seen:
            left = deadline - time.monotonic()
            if self.proc.poll() is not None or left <= 0:
                rc = self.proc.poll()
                self._kill()
                raise RuntimeError(
                    f"agent not ready ({'timeout' if rc is None else f'exit {rc}'}); "
                    f"stdout: {seen!r}\nlog tail:\n{self.log_tail()}"
                )
            ready, _, _ = select.select([self.proc.stdout], [], [], min(left, 0.5))
            if ready:
                line = self.proc.stdout.readline()
                seen += line
                if not line and self.proc.poll() is None:
                    self.proc.wait(min(left, 5))

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check_alive(self) -> None:
        if not self.running():
            raise RuntimeError(f"the agent died\n{self.log_tail()}")

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, as an operator would; the exit code."""
        assert self.proc is not None
        self.expect_down = True
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._kill()
                raise AssertionError(f"the agent ignored SIGTERM for {timeout:g} s") from None
        return self._reap()

    def kill9(self) -> None:
        self.expect_down = True
        self._kill()

    def stopped_by_someone_else(self) -> bool:
        """The agent exited cleanly (SIGTERM: it logs "stopping") without us asking: other
        test runs on this machine have been seen to SIGTERM every `membrane agent run`."""
        return self.proc is not None and not self.expect_down and self.proc.poll() == 0

    def revive(self) -> None:
        warnings.warn(
            f"agent {self.node_netns} was stopped by someone else (exit 0); restarted it",
            stacklevel=2,
        )
        self.start()

    def restart(self) -> None:
        if self.running():
            self.stop()
        self.start()

    def _kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        if self.proc is not None:
            self._reap()

    def _reap(self) -> int:
        assert self.proc is not None
        rc = self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return rc

    def log_tail(self, lines: int = 40, width: int = 400) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(line[:width] for line in text.splitlines()[-lines:])

    # ---- what the process costs --------------------------------------------------------
    def memory_kib(self) -> dict[str, int]:
        """The agent's resident set now and at its peak (VmRSS, VmHWM)."""
        found = {}
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    found[key] = int(value.split()[0])
        return {"rss_kib": found["VmRSS"], "peak_rss_kib": found["VmHWM"]}

    def cpu_s(self) -> float:
        """The agent's CPU time so far (user + system)."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    # ---- the CLI and the API -----------------------------------------------------------
    def cli(
        self, *args: str, check: bool = True, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """`membrane ARGS...` pointed at this agent (MEMBRANE_API_SOCKET)."""
        result = subprocess.run(
            [membrane_command(), *args],
            capture_output=True,
            text=True,
            input=input,
            env=self.env,
            timeout=CLI_TIMEOUT,
            check=False,
        )
        if result.returncode == 1 and self.stopped_by_someone_else():
            self.revive()
            return self.cli(*args, check=check, input=input)
        if check and result.returncode != 0:
            raise AssertionError(
                f"membrane {' '.join(args)} exited {result.returncode}\n"
                f"stdout: {result.stdout}\nstderr: {result.stderr}\n"
                f"agent log tail:\n{self.log_tail(15)}"
            )
        return result

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "-o", "json").stdout)

    def client(self, timeout: float | None = 600.0) -> ApiClient:
        """A client of the REST API, for callers that time the agent's side of a call."""
        return ApiClient(self.socket, timeout=timeout)

    def api(self, method: str, path: str, **kw: Any) -> Any:
        """The REST API directly, for a harness's own housekeeping (resets, lookups):
        milliseconds instead of a CLI start-up. What tests assert on goes through `cli`."""
        try:
            return self.client().call(method, path, **kw)
        except AgentUnavailable:
            if not self.stopped_by_someone_else():
                raise
            self.revive()
            return self.client().call(method, path, **kw)

    def import_policy(self, text: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`membrane policy import -` with `text` (dedented) on stdin; enforced on return."""
        return self.cli("policy", "import", "-", input=textwrap.dedent(text), check=check)

    def delete_all_policies(self) -> None:
        self.api("DELETE", "/v1/policies", params={"all": "1"})

    def identities(self) -> dict[str, int]:
        """NS/NAME -> identity of every endpoint (one `endpoint list`)."""
        return {f"{e['namespace']}/{e['name']}": int(e["identity"]) for e in self.endpoints()}

    def policies(self) -> list[dict[str, Any]]:
        return self.cli_json("policy", "list")["policies"]

    def endpoints(self) -> list[dict[str, Any]]:
        return self.cli_json("endpoint", "list")

    def label_namespace(self, ns: str, *changes: str) -> dict[str, Any]:
        return self.cli_json("namespace", "label", ns, *changes)

    def trace(self, src: str, dst: str, dport: str) -> dict[str, Any]:
        return self.cli_json("policy", "trace", "--src", src, "--dst", dst, "--dport", dport)

    def observe(self, last: int = 1000) -> list[dict[str, Any]]:
        """Flow records; `-o json` prints one JSON object per line (or one list)."""
        out = self.cli("observe", "--last", str(last), "-o", "json").stdout.strip()
        if not out:
            return []
        if out.startswith("["):
            return json.loads(out)
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    # ---- cleanup -----------------------------------------------------------------------
    def destroy(self, graceful: bool = False) -> None:
        """Remove everything this agent made, whether or not it is still running; stop it
        with SIGTERM first when `graceful` (SIGKILL after 20 s), else SIGKILL at once."""
        if graceful and self.running():
            with contextlib.suppress(AssertionError):
                self.stop()
        self._kill()
        detach_all_endpoints(str(self.bpf_dir))  # one by one: see bench/RESULTS.md, teardown
        for name in netns.names():
            if name.startswith(self.prefix):
                with contextlib.suppress(OSError):
                    netns.delete(name)
        for name in (self.external_netns, self.node_netns):
            with contextlib.suppress(OSError):
                netns.delete(name)
        if self.bpf_dir.exists():
            shutil.rmtree(self.bpf_dir, ignore_errors=True)
        with contextlib.suppress(OSError):  # /sys/fs/bpf/membrane/agent and up, once empty
            os.removedirs(self.bpf_dir.parent)
        shutil.rmtree(self.state_dir, ignore_errors=True)


@contextlib.contextmanager
def running_agent(
    tag: str, workdir: Path | None = None, graceful: bool = False, **options: Any
) -> Iterator[AgentProcess]:
    """A started agent (in a fresh temporary `workdir` unless given), destroyed however the
    body ends; `options` go to AgentProcess."""
    own = workdir is None
    workdir = workdir or Path(tempfile.mkdtemp(prefix=f"membrane-{tag}-"))
    agent = AgentProcess(workdir, tag, **options)
    try:
        agent.start()
        yield agent
    finally:
        try:
            agent.destroy(graceful=graceful)
        finally:
            if own:
                shutil.rmtree(workdir, ignore_errors=True)
