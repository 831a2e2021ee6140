"""TracingPolicy enforced by the real agent on real processes: a reader of /etc/shadow is
killed in the kernel before its read() (an allowed binary is not), a pod's connect() and
sendto() to a port/CIDR fail with EPERM (other destinations and other processes work), a
uprobe on a test program's function posts events with its arguments, and an agent restart
leaves no moment without enforcement.

The kill policies are scoped to this test process's descendants (matchPIDs followForks),
so nothing else on the machine that reads /etc/shadow meanwhile is touched.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from membrane.bpf.probe import supports, temporary_cgroup
from membrane.errors import UserError
from membrane.security.policy.compile import compile_policy
from membrane.security.policy.loader import Loader
from membrane.security.policy.parse import parse_policies
from membrane.testing.agent import AgentProcess, agent_unusable_reason, running_agent
from membrane.testing.cluster import unique_tag
from membrane.testing.waiting import wait_for

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not supports("tracepoint"), reason="needs root and tracepoints"
)

SECRET = "/etc/shadow"
ALLOWED = "/usr/bin/head"

KILL_POLICY = f"""
apiVersion: cilium.io/v1alpha1
kind: TracingPolicy
metadata:
  name: shadow-readers
spec:
  tracepoints:
  - subsystem: syscalls
    event: sys_enter_openat
    message: "{SECRET} opened"
    tags: [credentials]
    args:
    - index: 6
      type: string
      label: filename
    selectors:
    - matchArgs:
      - index: 6
        operator: Equal
        values: ["{SECRET}"]
      matchBinaries:
      - operator: NotIn
        values: ["{ALLOWED}"]
      matchPIDs:
      - operator: In
        followForks: true
        values: [{os.getpid()}]
      matchActions:
      - action: Sigkill
"""


@pytest.fixture(scope="module")
def cgroup() -> Iterator[Path]:
    if not supports("cgroup_connect4"):
        pytest.skip("cgroup connect hooks do not attach on this kernel")
    with temporary_cgroup("mbsp") as path:
        yield path


@pytest.fixture(scope="module")
def agent(cgroup: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    reason = agent_unusable_reason()
    if reason:
        pytest.skip(reason)
    workdir = tmp_path_factory.mktemp("agent")
    with running_agent(
        unique_tag("p"), workdir, extra_args=["--cgroup-root", str(cgroup)]
    ) as agent:
        yield agent


def apply(agent: AgentProcess, text: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return agent.cli("security", "policy", "apply", "-", input=textwrap.dedent(text), check=check)


def policy_events(agent: AgentProcess, name: str, kind: str) -> list[dict[str, Any]]:
    """The agent's stored events of policy `name` (process_tracepoint, process_uprobe)."""
    lines = agent.cli("security", "events", "--last", "1000", "-o", "json").stdout.splitlines()
    events = [json.loads(line) for line in lines if line.strip()]
    return [e[kind] for e in events if kind in e and e[kind].get("policy_name") == name]


def read_secret(argv: list[str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, capture_output=True, timeout=30)


def cat_the_secret(signal_number: int) -> int:
    """`cat SECRET`, which the policy in force must end with `signal_number` before it
    prints a byte (on its way back from openat: read() never runs); its pid."""
    cat = subprocess.Popen(["cat", SECRET], stdout=subprocess.PIPE)
    out, _ = cat.communicate(timeout=30)
    assert cat.returncode == -signal_number and out == b""
    return cat.pid


def the_event_of(agent: AgentProcess, policy: str, kind: str, pid: int) -> dict[str, Any]:
    """The one `kind` event policy `policy` posted for process `pid`, once the agent has it."""

    def of_pid() -> list[dict[str, Any]]:
        return [e for e in policy_events(agent, policy, kind) if e["process"]["pid"] == pid]

    [event] = wait_for(f"{policy}'s {kind} event of pid {pid}", of_pid)
    return event


# ---- kill on read -----------------------------------------------------------------------
def test_a_reader_of_the_secret_is_killed_before_it_reads(agent: AgentProcess) -> None:
    apply(agent, KILL_POLICY)
    try:
        pid = cat_the_secret(signal.SIGKILL)
        reader = read_secret(
            [sys.executable, "-c", f"f = open({SECRET!r}); print('READ', f.read())"]
        )
        assert reader.returncode == -signal.SIGKILL
        assert b"READ" not in reader.stdout
        allowed = read_secret([ALLOWED, "-c", "5", SECRET])
        assert allowed.returncode == 0 and len(allowed.stdout) == 5
        assert read_secret(["cat", "/etc/hostname"]).returncode == 0

        event = the_event_of(agent, "shadow-readers", "process_tracepoint", pid)
        assert event["action"] == "KPROBE_ACTION_SIGKILL"
        assert event["subsys"] == "syscalls" and event["event"] == "sys_enter_openat"
        assert event["args"] == [{"string_arg": SECRET, "label": "filename"}]
        assert event["message"] == f"{SECRET} opened" and event["tags"] == ["credentials"]
        assert os.path.basename(event["process"]["binary"]) == "cat"
        status = agent.cli_json("security", "policy", "list")
        assert status["events"] >= 2 and status["events_lost"] == 0
    finally:
        agent.cli("security", "policy", "delete", "shadow-readers")
    assert read_secret(["cat", "/etc/hostname"]).returncode == 0
    assert read_secret(["cat", SECRET]).returncode == 0  # the policy is gone


def test_signal_sends_the_policys_signal(agent: AgentProcess) -> None:
    apply(agent, KILL_POLICY.replace("- action: Sigkill", "- action: Signal\n        argSig: 10"))
    try:
        pid = cat_the_secret(signal.SIGUSR1)
        event = the_event_of(agent, "shadow-readers", "process_tracepoint", pid)
        assert event["action"] == "KPROBE_ACTION_SIGNAL"
    finally:
        agent.cli("security", "policy", "delete", "shadow-readers")


def test_binaries_by_path_prefix_with_symlinked_directories(
    agent: AgentProcess, tmp_path: Path
) -> None:
    """matchBinaries Prefix on the executable's real path: a copy of cat under a directory
    (named through a symlink in the policy) is killed, /usr/bin/cat is not."""
    real = tmp_path / "real-tools"
    real.mkdir()
    shutil.copy2("/usr/bin/cat", real / "cat")
    (tmp_path / "tools").symlink_to(real)
    text = KILL_POLICY.replace("operator: NotIn", "operator: Prefix").replace(
        f'values: ["{ALLOWED}"]', f'values: ["{tmp_path}/tools/"]'
    )
    apply(agent, text)
    try:
        copy = read_secret([str(real / "cat"), SECRET])
        assert copy.returncode == -signal.SIGKILL and copy.stdout == b""
        assert read_secret(["/usr/bin/cat", SECRET]).returncode == 0
    finally:
        agent.cli("security", "policy", "delete", "shadow-readers")


def test_capabilities_and_namespaces_select_in_the_kernel(agent: AgentProcess) -> None:
    """matchCapabilities (effective set) and matchNamespaces (host_ns): the same reader is
    killed while it holds CAP_SYS_ADMIN in the host's mount namespace, not once it has
    dropped the capability."""
    text = KILL_POLICY.replace(
        f"""      matchBinaries:
      - operator: NotIn
        values: ["{ALLOWED}"]
""",
        """      matchCapabilities:
      - type: Effective
        operator: In
        values: ["CAP_SYS_ADMIN"]
      matchNamespaces:
      - namespace: Mnt
        operator: In
        values: ["host_ns"]
""",
    )
    assert "matchCapabilities" in text
    apply(agent, text)
    try:
        assert read_secret(["cat", SECRET]).returncode == -signal.SIGKILL
        dropped = read_secret(["setpriv", "--bounding-set=-sys_admin", "cat", SECRET])
        assert dropped.returncode == 0 and dropped.stdout
    finally:
        agent.cli("security", "policy", "delete", "shadow-readers")


# ---- deny connect ------------------------------------------------------------------------
DENIED, OPEN = 7311, 7312
PORTS = (str(DENIED), str(OPEN))

CONNECT_POLICY = f"""
apiVersion: cilium.io/v1alpha1
kind: TracingPolicyNamespaced
metadata:
  name: no-db
  namespace: shop
spec:
  podSelector:
    matchLabels:
      app: web
  tracepoints:
  - subsystem: syscalls
    event: sys_enter_connect
    args:
    - index: 6
      type: sockaddr
    selectors:
    - matchArgs:
      - index: 6
        operator: DPort
        values: ["{DENIED}"]
      - index: 6
        operator: DAddr
        values: ["198.18.0.0/16", "127.0.0.0/8", "2001:db8:1::/64"]
      matchActions:
      - action: Override
        argError: -1
  - subsystem: syscalls
    event: sys_enter_sendto
    args:
    - index: 9
      type: sockaddr
    selectors:
    - matchArgs:
      - index: 9
        operator: DPort
        values: ["{DENIED}"]
      matchActions:
      - action: Override
"""

# Run in the pod: listen on both ports of its own address, then connect and send to each.
CLIENT = """
import errno, json, socket, sys
ip, denied, open_ = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
family = socket.AF_INET6 if ":" in ip else socket.AF_INET
out = {}
listeners = []
for port in (denied, open_):
    s = socket.socket(family); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((ip, port)); s.listen(); listeners.append(s)
for port in (denied, open_):
    c = socket.socket(family)
    try:
        c.connect((ip, port)); out[f"tcp{port}"] = "ok"
    except OSError as e:
        out[f"tcp{port}"] = errno.errorcode[e.errno]
    u = socket.socket(family, socket.SOCK_DGRAM)
    try:
        u.sendto(b"x", (ip, port)); out[f"udp{port}"] = "ok"
    except OSError as e:
        out[f"udp{port}"] = errno.errorcode[e.errno]
print(json.dumps(out))
"""


def _in_cgroup(cgroup: Path) -> Any:
    def enter() -> None:
        (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    return enter


def test_a_pods_connect_to_a_denied_port_fails_with_eperm(
    agent: AgentProcess, cgroup: Path
) -> None:
    agent.cli("endpoint", "add", "shop/web", "--label", "app=web")
    agent.cli("endpoint", "add", "shop/cache", "--label", "app=cache")
    try:
        apply(agent, CONNECT_POLICY)
        pods = {f"{e['namespace']}/{e['name']}": e for e in agent.endpoints()}

        def run_in(pod: str, family: str = "ipv4") -> dict[str, str]:
            netns = f"{agent.prefix}{pod.replace('/', '-')}"
            ip = pods[pod][family]
            done = subprocess.run(
                ["ip", "netns", "exec", netns, sys.executable, "-c", CLIENT, ip, *PORTS],
                capture_output=True, text=True, timeout=30, preexec_fn=_in_cgroup(cgroup),
                check=True,
            )  # fmt: skip
            return json.loads(done.stdout)

        web = run_in("shop/web")
        assert web == {
            f"tcp{DENIED}": "EPERM", f"udp{DENIED}": "EPERM",
            f"tcp{OPEN}": "ok", f"udp{OPEN}": "ok",
        }  # fmt: skip
        if pods["shop/web"].get("ipv6"):  # connect6 and sendmsg6
            assert run_in("shop/web", "ipv6") == web
        # Another pod of the namespace that the podSelector does not select: not refused.
        cache = run_in("shop/cache")
        assert set(cache.values()) == {"ok"}
        # A process outside the pods (the same cgroup) to the same port: not refused.
        host = subprocess.run(
            [sys.executable, "-c", CLIENT, "127.0.0.1", *PORTS],
            capture_output=True, text=True, timeout=30, preexec_fn=_in_cgroup(cgroup),
            check=True,
        )  # fmt: skip
        assert set(json.loads(host.stdout).values()) == {"ok"}
        [listed] = agent.cli_json("security", "policy", "list")["policies"]
        refused = 4 if pods["shop/web"].get("ipv6") else 2
        assert sum(h["denied"] for h in listed["hooks"]) == refused

        events = wait_for(
            "the refusals' events",
            lambda: (
                [
                    e
                    for e in policy_events(agent, "no-db", "process_tracepoint")
                    if e["action"] == "KPROBE_ACTION_OVERRIDE"
                ]
                or None
            ),
        )
        event = events[0]
        assert event["process"]["pod"]["namespace"] == "shop"
        assert event["process"]["pod"]["name"] == "web"
        assert event["process"]["binary"] == os.path.realpath(sys.executable)
        sockaddr = event["args"][0]["sockaddr_arg"]
        assert sockaddr == {"family": "AF_INET", "addr": pods["shop/web"]["ipv4"], "port": DENIED}
    finally:
        agent.cli("security", "policy", "delete", "shop/no-db", check=False)
        agent.cli("endpoint", "delete", "shop/web", check=False)
        agent.cli("endpoint", "delete", "shop/cache", check=False)


# ---- uprobe ------------------------------------------------------------------------------
TARGET_C = r"""
#include <stdio.h>
__attribute__((noinline)) int mb_target(int n, const char *word)
{
	return printf("%d %s\n", n, word);
}
int main(int argc, char **argv)
{
	for (int i = 1; i < argc; i++)
		mb_target(i, argv[i]);
	return 0;
}
"""


@pytest.fixture(scope="module")
def target_program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not supports("uprobe"):
        pytest.skip("uprobes do not attach on this kernel")
    workdir = tmp_path_factory.mktemp("uprobe")
    (workdir / "target.c").write_text(TARGET_C)
    subprocess.run(
        ["clang", "-O1", "-g", "-o", str(workdir / "target"), str(workdir / "target.c")],
        check=True,
    )
    return workdir / "target"


def test_a_uprobe_policy_posts_events_with_arguments(
    agent: AgentProcess, target_program: Path
) -> None:
    apply(
        agent,
        f"""
        apiVersion: cilium.io/v1alpha1
        kind: TracingPolicy
        metadata:
          name: words
        spec:
          uprobes:
          - path: "{target_program}"
            symbols: [mb_target]
            args:
            - index: 0
              type: int32
            - index: 1
              type: string
            selectors:
            - matchArgs:
              - index: 1
                operator: Equal
                values: ["secret-quiet"]
              matchActions:
              - action: NoPost
            - matchArgs:
              - index: 1
                operator: Prefix
                values: ["secret-"]
        """,
    )
    try:
        run = subprocess.Popen(
            [str(target_program), "hello", "secret-one", "secret-quiet", "secret-two"],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        out, _ = run.communicate(timeout=30)
        assert run.returncode == 0 and out.split("\n")[1] == "2 secret-one"

        def posted() -> list[dict[str, Any]]:
            events = policy_events(agent, "words", "process_uprobe")
            return [e for e in events if e["process"]["pid"] == run.pid]

        events = wait_for("two uprobe events", lambda: len(posted()) >= 2 and posted())
        # The first matching selector decides: "secret-quiet" is NoPost'ed by the first.
        assert [(e["args"][0]["int_arg"], e["args"][1]["string_arg"]) for e in events] == [
            (2, "secret-one"),
            (4, "secret-two"),
        ]
        assert events[0]["path"] == str(target_program.resolve())
        assert events[0]["symbol"] == "mb_target"
        assert events[0]["action"] == "KPROBE_ACTION_POST"
    finally:
        agent.cli("security", "policy", "delete", "words")


# ---- kill at exec -----------------------------------------------------------------------------
def test_a_binary_killed_at_exec_runs_no_instruction(
    agent: AgentProcess, target_program: Path, tmp_path: Path
) -> None:
    """Sigkill at sched_process_exec: the program never prints, whichever name (a symlink)
    it is started by; the event carries the exec'd filename (a __data_loc string)."""
    link = tmp_path / "innocent-name"
    link.symlink_to(target_program)
    apply(
        agent,
        f"""
        apiVersion: cilium.io/v1alpha1
        kind: TracingPolicy
        metadata:
          name: no-target
        spec:
          tracepoints:
          - subsystem: sched
            event: sched_process_exec
            args:
            - index: 4
              type: string
            selectors:
            - matchBinaries:
              - operator: In
                values: ["{target_program}"]
              matchPIDs:
              - operator: In
                followForks: true
                values: [{os.getpid()}]
              matchActions:
              - action: Sigkill
        """,
    )
    try:
        for path in (target_program, link):
            run = subprocess.Popen([str(path), "hello"], stdout=subprocess.PIPE, text=True)
            out, _ = run.communicate(timeout=30)
            assert run.returncode == -signal.SIGKILL and out == ""

            def killed() -> list[dict[str, Any]]:
                events = policy_events(agent, "no-target", "process_tracepoint")
                return [e for e in events if e["process"]["pid"] == run.pid]  # noqa: B023

            [event] = wait_for("the exec kill's event", killed)
            assert event["action"] == "KPROBE_ACTION_SIGKILL"
            assert event["args"] == [{"string_arg": str(path)}]
        assert read_secret(["cat", "/etc/hostname"]).returncode == 0  # other binaries run
    finally:
        agent.cli("security", "policy", "delete", "no-target")


# ---- validation through the agent ---------------------------------------------------------
def test_bad_policies_exit_2_naming_the_field_and_load_nothing(agent: AgentProcess) -> None:
    bad = apply(agent, KILL_POLICY.replace("operator: Equal", "operator: Equals"), check=False)
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "matchArgs[0].operator" in bad.stderr
    # Two documents, the second impossible: the first is not applied either.
    second = KILL_POLICY.replace("shadow-readers", "other").replace(
        "sys_enter_openat", "sys_enter_no_such_call"
    )
    both = apply(agent, KILL_POLICY + "---\n" + second, check=False)
    assert both.returncode == 2 and "document 2: spec.tracepoints[0].event" in both.stderr
    assert agent.cli_json("security", "policy", "list")["policies"] == []
    assert read_secret(["cat", SECRET]).returncode == 0


# Kernel-dependent refusals, checked where the agent checks them (compile_policy).
def _compile(text: str) -> None:
    [(policy, _)] = parse_policies(textwrap.dedent(text))
    compile_policy(policy, "document 1", supports)


def _variant(old: str, new: str) -> str:
    assert old in KILL_POLICY
    return KILL_POLICY.replace(old, new, 1)


COMPILE_ERRORS = [
    (_variant("sys_enter_openat", "sys_enter_nothing"),
     "spec.tracepoints[0].event", "no tracepoint"),
    (_variant("index: 6\n      type: string", "index: 7\n      type: string"),
     "spec.tracepoints[0].args[0].type", "needs a pointer field"),
    (_variant("index: 6\n      type: string", "index: 2\n      type: int"),
     "spec.tracepoints[0].args[0].index", "common field"),
    (_variant("    - index: 6\n        operator: Equal", "    - index: 5\n        operator: Equal"),
     "spec.tracepoints[0].selectors[0].matchArgs[0].index", "not among the hook's args"),
    (_variant("operator: Equal", "operator: DPort"),
     "spec.tracepoints[0].selectors[0].matchArgs[0].operator", "does not apply to a string"),
    (_variant("action: Sigkill", "action: Override"),
     "spec.tracepoints[0].selectors[0].matchActions[0].action", "error injection"),
    (_variant(ALLOWED, "/no/such/binary"),
     "spec.tracepoints[0].selectors[0].matchBinaries[0].values[0]", "No such file"),
    (CONNECT_POLICY.replace("argError: -1", "argError: -13"),
     "spec.tracepoints[0].selectors[0].matchActions[0].argError", "EPERM"),
    (CONNECT_POLICY.replace('"127.0.0.0/8",', '"nowhere",'),
     "spec.tracepoints[0].selectors[0].matchArgs[1].values[1]", "not an address"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("text", "field", "words"), COMPILE_ERRORS, ids=[c[1] for c in COMPILE_ERRORS]
)
def test_impossible_hooks_are_refused_by_field(text: str, field: str, words: str) -> None:
    with pytest.raises(UserError) as err:
        _compile(text)
    assert err.value.field == f"document 1: {field}"
    assert words in err.value.problem


KPROBE_POLICY = f"""
apiVersion: cilium.io/v1alpha1
kind: TracingPolicy
metadata:
  name: shadow-kprobe
spec:
  kprobes:
  - call: sys_openat
    syscall: true
    args:
    - index: 1
      type: string
    selectors:
    - matchArgs:
      - index: 1
        operator: Equal
        values: ["{SECRET}"]
      matchPIDs:
      - operator: In
        followForks: true
        values: [{os.getpid()}]
      matchActions:
      - action: Sigkill
"""


def test_kprobes_are_refused_where_they_cannot_attach() -> None:
    if supports("kprobe"):
        pytest.skip("this kernel attaches kprobes")
    with pytest.raises(UserError) as err:
        _compile(KPROBE_POLICY)
    assert err.value.field == "document 1: spec.kprobes[0]"
    assert "cannot be attached on this kernel" in err.value.problem


def test_the_kprobe_program_passes_the_verifier(tmp_path: Path) -> None:
    """Where kprobe programs load (even if, as here, nothing can attach them): the kprobe
    form of the hook program with a syscall's selectors is accepted by the verifier."""
    [(policy, _)] = parse_policies(KPROBE_POLICY)
    [plan] = compile_policy(policy, "document 1", lambda name: True)
    assert plan.target == ("__x64_sys_openat",) and plan.config["syscall"] == 1
    pins = f"/sys/fs/bpf/membrane/test-kprobe-{os.getpid()}"
    try:
        Loader(pins).prepare(plan, 1).close()
    finally:
        shutil.rmtree(pins, ignore_errors=True)


@pytest.mark.skipif(not supports("kprobe"), reason="kprobes do not attach on this kernel")
def test_a_kprobe_policy_kills_and_posts(agent: AgentProcess) -> None:
    apply(agent, KPROBE_POLICY)
    try:
        pid = cat_the_secret(signal.SIGKILL)
        event = the_event_of(agent, "shadow-kprobe", "process_kprobe", pid)
        assert event["function_name"] == "__x64_sys_openat"
        assert event["action"] == "KPROBE_ACTION_SIGKILL"
        assert event["args"] == [{"string_arg": SECRET}]
    finally:
        agent.cli("security", "policy", "delete", "shadow-kprobe")


def test_a_missing_uprobe_symbol_is_refused(target_program: Path) -> None:
    with pytest.raises(UserError) as err:
        _compile(
            f"""
            apiVersion: cilium.io/v1alpha1
            kind: TracingPolicy
            metadata: {{name: u}}
            spec:
              uprobes:
              - path: "{target_program}"
                symbols: [mb_target, no_such_function]
            """
        )
    assert err.value.field == "document 1: spec.uprobes[0].symbols[1]"


# ---- agent restart ---------------------------------------------------------------------------
def test_policies_are_reapplied_on_restart_without_a_gap(agent: AgentProcess) -> None:
    apply(agent, KILL_POLICY)
    links = agent.bpf_dir / "security" / "links" / "shadow-readers"
    before = sorted(p.name for p in links.iterdir())
    assert len(before) == 1
    results: list[int] = []
    stop = threading.Event()

    def probe() -> None:
        while not stop.is_set():
            results.append(read_secret(["cat", SECRET]).returncode)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        started = time.monotonic()
        agent.stop()
        down = len(results)
        agent.start()
        restart_s = time.monotonic() - started
        wait_for("probes after the restart", lambda: len(results) > down + 5 or None, timeout=30)
    finally:
        stop.set()
        prober.join()
    try:
        # Every read across the stop, the time down and the start was killed: no gap.
        assert results and set(results) == {-signal.SIGKILL}, results
        [listed] = agent.cli_json("security", "policy", "list")["policies"]
        assert listed["name"] == "shadow-readers"
        after = sorted(p.name for p in links.iterdir())
        assert len(after) == 1 and after != before  # the new program's link; the old one went
        print(f"restart {restart_s:.2f} s, {len(results)} reads, all killed")
    finally:
        agent.cli("security", "policy", "delete", "shadow-readers")
    assert not links.exists()


def test_a_policy_that_cannot_be_reapplied_keeps_its_programs(
    agent: AgentProcess, tmp_path: Path
) -> None:
    """At restart a policy naming a binary that is gone cannot be compiled again: its
    previous programs stay pinned and enforcing, and `list` says why, until it is deleted."""
    allowed = tmp_path / "allowed-head"
    shutil.copy2(ALLOWED, allowed)
    apply(agent, KILL_POLICY.replace(ALLOWED, str(allowed)))
    try:
        agent.stop()
        allowed.unlink()
        agent.start()
        [listed] = agent.cli_json("security", "policy", "list")["policies"]
        assert "not re-applied" in listed["error"] and str(allowed) in listed["error"]
        assert read_secret(["cat", SECRET]).returncode == -signal.SIGKILL
    finally:
        agent.cli("security", "policy", "delete", "shadow-readers")
    assert agent.cli_json("security", "policy", "list")["policies"] == []
    assert read_secret(["cat", SECRET]).returncode == 0


def test_agent_reset_removes_policies_and_their_programs(agent: AgentProcess) -> None:
    apply(agent, KILL_POLICY)
    assert read_secret(["cat", SECRET]).returncode == -signal.SIGKILL
    agent.stop()
    agent.cli(
        "agent", "reset", "--yes",
        "--state-dir", str(agent.state_dir),
        "--node-netns", agent.node_netns,
    )  # fmt: skip
    assert read_secret(["cat", SECRET]).returncode == 0  # nothing enforces any more
    agent.start()
    assert agent.cli_json("security", "policy", "list")["policies"] == []
    assert read_secret(["cat", SECRET]).returncode == 0
