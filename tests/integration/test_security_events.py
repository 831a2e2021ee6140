"""Process lifecycle events from the real agent on real processes: a fork+exec storm of
5,000 short processes is seen whole (each exec and exit once, parents linked, nothing
lost), every event parses strictly as Tetragon's GetEventsResponse, filters choose, a
process in an endpoint's network namespace carries its pod, and the export file keeps
what its allow/deny lists choose with arguments redacted.

What the agent can run comes from the feature probe: on a kernel without the hooks the
agent says what is missing, and that is what is checked.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format

from membrane import netns
from membrane.security.lifecycle import NEEDED_FEATURES
from membrane.testing.agent import AgentProcess, agent_unusable_reason, running_agent
from membrane.testing.cluster import unique_tag
from membrane.testing.waiting import wait_for
from membrane.tetragon.tetragon import events_pb2

STORM = 5000
REDACT = '{"redact":["--password[= ](\\\\S+)"]}'
EXPORT_ALLOW = '{"event_set":["PROCESS_EXEC"],"binary_regex":["/echo$"]}'
EXPORT_DENY = '{"arguments_regex":["skip-me"]}'


def _lifecycle_supported() -> bool:
    from membrane.bpf.probe import supports

    return all(supports(name) for name in NEEDED_FEATURES)


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    reason = agent_unusable_reason()
    if reason:
        pytest.skip(reason)
    workdir = tmp_path_factory.mktemp("security")
    options = [
        "--security-event-buffer-size", "65535",
        "--security-export-file", str(workdir / "events.log"),
        "--security-export-allowlist", EXPORT_ALLOW,
        "--security-export-denylist", EXPORT_DENY,
        "--security-redaction-filters", REDACT,
    ]  # fmt: skip
    with running_agent(unique_tag("s"), workdir, extra_args=options) as agent:
        yield agent


def _events(agent: AgentProcess, *flags: str) -> list[events_pb2.GetEventsResponse]:
    """`membrane security events -o json`, every line parsed strictly."""
    out = agent.cli("security", "events", "-o", "json", *flags).stdout
    return [
        json_format.Parse(line, events_pb2.GetEventsResponse(), ignore_unknown_fields=False)
        for line in out.splitlines()
    ]


def _query(agent: AgentProcess, allow: dict[str, Any], last: int) -> list[dict[str, Any]]:
    request = json.dumps({"allow_list": [allow]})
    return list(agent.client().stream("/v1/security/events", {"request": request, "last": last}))


def test_status_names_what_the_kernel_allows(agent: AgentProcess) -> None:
    status = agent.cli_json("security", "status")
    assert status["enabled"] is True
    assert status["process_lifecycle"] is _lifecycle_supported()
    if not status["process_lifecycle"]:
        assert status["missing"]


@pytest.fixture
def lifecycle(agent: AgentProcess) -> AgentProcess:
    if not _lifecycle_supported():
        pytest.skip("this kernel lacks the hooks of process lifecycle events")
    return agent


def test_fork_exec_storm_is_seen_whole(lifecycle: AgentProcess) -> None:
    agent = lifecycle
    tag = f"storm-{agent.tag}"
    shell = subprocess.run(
        ["/bin/bash", "-c", f"for i in $(seq {STORM}); do /bin/true {tag} $i; done; echo $$"],
        capture_output=True,
        text=True,
        check=True,
    )
    shell_pid = int(shell.stdout.strip())
    # The shell's own exit comes after its children's: then the storm is all in.
    shell_exit = {"pid": [shell_pid], "event_set": ["PROCESS_EXIT"]}
    wait_for("the storm shell's exit", lambda: _query(agent, shell_exit, 1) or None, timeout=60)
    events = _events(agent, "--last", str(3 * STORM), "--processes", "/true$")
    execs = [e.process_exec for e in events if e.HasField("process_exec")]
    exits = [e.process_exit for e in events if e.HasField("process_exit")]
    execs = [m for m in execs if m.process.arguments.startswith(tag + " ")]
    exits = [m for m in exits if m.process.arguments.startswith(tag + " ")]
    assert Counter(m.process.arguments for m in execs) == Counter(
        f"{tag} {i}" for i in range(1, STORM + 1)
    )
    assert len(exits) == STORM and {m.process.exec_id for m in exits} == {
        m.process.exec_id for m in execs
    }
    shell_ids = {m.process.parent_exec_id for m in execs}
    assert len(shell_ids) == 1, "every process names the one shell as its parent"
    for m in execs[:50]:
        assert m.parent.pid.value == shell_pid and m.parent.exec_id in shell_ids
        assert m.parent.binary.endswith("/bash") and m.ancestors  # the shell's ancestry
        assert m.process.binary == os.path.realpath("/bin/true")
        assert m.process.cwd == os.getcwd()
        assert set(m.process.flags.split()) == {"execve", "clone"}
    assert all(m.status == 0 and not m.signal for m in exits)
    status = agent.cli_json("security", "status")
    assert status["lost_events"] == 0


def test_pod_attribution_and_filters(lifecycle: AgentProcess) -> None:
    agent = lifecycle
    agent.cli("endpoint", "add", "sec/web", "-l", "app=web")
    try:
        ns_path = netns.path(agent.prefix + "sec-web")
        marker = f"in-pod-{agent.tag}"
        subprocess.run(["nsenter", f"--net={ns_path}", "/bin/echo", marker], check=True)
        subprocess.run(["/bin/echo", f"on-host-{agent.tag}"], check=True, capture_output=True)
        allow = {"binary_regex": ["/echo$"], "arguments_regex": [agent.tag]}
        wait_for("the echo exits", lambda: len(_query(agent, allow, 10)) >= 4 or None)
        in_ns = _events(agent, "--last", "100", "--namespace", "sec", "--pods", "^web$")
        mine = [e for e in in_ns if marker in e.process_exec.process.arguments]
        assert len(mine) == 1
        pod = mine[0].process_exec.process.pod
        assert (pod.namespace, pod.name, dict(pod.pod_labels)) == ("sec", "web", {"app": "web"})
        assert all(
            e.process_exec.process.pod.namespace == "sec"
            for e in in_ns
            if e.HasField("process_exec")
        )
        exits = _events(agent, "--last", "100", "--event-types", "PROCESS_EXIT", "-n", "sec")
        assert any(marker in e.process_exit.process.arguments for e in exits)
        assert all(e.HasField("process_exit") for e in exits)
        compact = agent.cli("security", "events", "--last", "100", "--processes", "/echo$")
        assert f"🚀 process sec/web {os.path.realpath('/bin/echo')} {marker}" in compact.stdout
        assert f"{agent.node_netns} {os.path.realpath('/bin/echo')} on-host-" in compact.stdout
    finally:
        agent.cli("endpoint", "delete", "sec/web")


def test_export_filters_and_redaction(lifecycle: AgentProcess) -> None:
    agent = lifecycle
    secret = f"hunter2-{agent.tag}"
    subprocess.run(["/bin/echo", "--password", secret, f"keep-{agent.tag}"], check=True)
    subprocess.run(["/bin/echo", f"skip-me-{agent.tag}"], check=True, capture_output=True)
    subprocess.run(["/bin/true", f"not-echo-{agent.tag}"], check=True)
    export = Path(agent.state_dir).parent / "events.log"

    def exported() -> list[events_pb2.GetEventsResponse] | None:
        if not export.exists():
            return None
        lines = export.read_text().splitlines()
        found = [
            json_format.Parse(line, events_pb2.GetEventsResponse(), ignore_unknown_fields=False)
            for line in lines
        ]
        return found if any(f"keep-{agent.tag}" in line for line in lines) else None

    events = wait_for("the export line", exported, timeout=10)
    assert all(e.HasField("process_exec") for e in events)
    assert all(e.process_exec.process.binary.endswith("/echo") for e in events)
    text = export.read_text()
    assert secret not in text and f"--password ***** keep-{agent.tag}" in text
    assert f"skip-me-{agent.tag}" not in text and f"not-echo-{agent.tag}" not in text
    shown = agent.cli("security", "events", "--last", "200", "--processes", "/echo$").stdout
    assert secret not in shown and "--password *****" in shown


def test_bad_options_name_the_flag(tmp_path: Path) -> None:
    from membrane.testing.agent import membrane_command

    bad = subprocess.run(
        [membrane_command(), "agent", "run", "--state-dir", str(tmp_path),
         "--security-export-file", str(tmp_path / "x.log"),
         "--security-export-allowlist", '{"binary_regex":["("]}'],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 2
    assert "security-export-allowlist[0].binary_regex[0]" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_follow_streams_new_events(lifecycle: AgentProcess) -> None:
    from membrane.testing.agent import membrane_command

    agent = lifecycle
    marker = f"followed-{agent.tag}"
    follower = subprocess.Popen(
        [membrane_command(), "security", "events", "-f", "-o", "json", "--processes", "/echo$"],
        stdout=subprocess.PIPE,
        text=True,
        env=agent.env,
    )
    try:
        os.set_blocking(follower.stdout.fileno(), False)  # type: ignore[union-attr]
        seen: list[str] = []

        def marker_seen() -> bool | None:
            # The follow may start after an echo: echo again until one arrives.
            subprocess.run(["/bin/echo", marker], check=True, capture_output=True)
            seen.extend(line for line in iter(follower.stdout.readline, "") if line)  # type: ignore[union-attr]
            return any(marker in line for line in seen) or None

        wait_for("a followed exec", marker_seen, timeout=20, interval=0.2)
        event = json_format.Parse(
            next(line for line in seen if marker in line), events_pb2.GetEventsResponse()
        )
        assert event.WhichOneof("event") in ("process_exec", "process_exit")
        assert all(json.loads(line) for line in seen)
    finally:
        follower.terminate()
        follower.wait(timeout=10)
