"""`membrane trace exec` sees exactly the execs of a workload the test runs, with the right
pid, parent, argv and result, and its filters keep everything else out.

Every workload exec carries a token of its own in argv, so the test can pick its execs
out of everything the machine runs meanwhile, and count them exactly."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from trace_support import run_trace, stop_tracer

from membrane.testing.cli import user_error
from membrane.testing.tracer import start_tracer, stop_tracer_text

pytestmark = pytest.mark.root

EXEC_FIELDS = {
    "time",
    "pid",
    "tid",
    "ppid",
    "uid",
    "comm",
    "ret",
    "error",
    "syscall",
    "path",
    "argv",
    "argv_truncated",
    "args",
}
TRUE = "/bin/true"
NOBODY = 65534

# A thread that is not the leader execs: the kernel gives it the leader's pid (de_thread).
EXEC_FROM_THREAD = textwrap.dedent("""
    import os, sys, threading
    t = threading.Thread(target=os.execv, args=(sys.argv[1], sys.argv[1:]))
    t.start()
    t.join()
""")
# fexecve(3): execveat(fd, "", argv, envp, AT_EMPTY_PATH).
EXEC_BY_FD = "import os, sys; os.execve(os.open(sys.argv[1], os.O_RDONLY), sys.argv[1:], {})"
EXEC_PATH = textwrap.dedent("""
    import os, sys
    try:
        os.execv(sys.argv[1], sys.argv[1:])
    except OSError:
        sys.exit(127)
""")


def run(argv: list[str]) -> int:
    """Run argv to completion; its pid (that of every exec it makes itself)."""
    proc = subprocess.Popen(argv)
    proc.wait(timeout=30)
    return proc.pid


def with_token(records: list[dict[str, Any]], token: str) -> list[dict[str, Any]]:
    return [r for r in records if token in r["argv"]]


def test_sees_exactly_the_workloads_execs(tmp_path: Path) -> None:
    token = f"mbt-{secrets.token_hex(4)}"
    missing = str(tmp_path / "no-such-program")
    # Past the old fixed limits (20 arguments of up to 127 bytes): all there now.
    long_args = ["a" * 127, "b" * 200, "c" * 3000, *map(str, range(100))]
    tracer = start_tracer("exec", "-o", "json")
    trues = [run([TRUE, token, str(i)]) for i in range(10)]
    failing = run([sys.executable, "-c", EXEC_PATH, missing, token, "fails"])
    threaded = run([sys.executable, "-c", EXEC_FROM_THREAD, TRUE, token, "thread"])
    by_fd = run([sys.executable, "-c", EXEC_BY_FD, TRUE, token, "fd"])
    whole = run([TRUE, token, *long_args])
    exactly_128 = run([TRUE, token, *map(str, range(126))])
    too_many = run([TRUE, token, *map(str, range(127))])
    too_long = run([TRUE, token, "x" * 6000, "y" * 3000, "z"])
    records, summary = stop_tracer(tracer)

    assert summary["lost"] == 0 and summary["events"] == len(records)
    assert all(set(r) == EXEC_FIELDS for r in records)
    ours = with_token(records, token)
    me = os.getpid()

    execs_of_true = [
        r for r in ours if r["argv"][0] == TRUE and r["argv"][2].isdigit() and len(r["argv"]) == 3
    ]
    assert [(r["pid"], r["tid"], r["argv"]) for r in execs_of_true] == [
        (pid, pid, [TRUE, token, str(i)]) for i, pid in enumerate(trues)
    ]
    for r in execs_of_true:
        assert (r["ppid"], r["uid"], r["comm"], r["ret"], r["error"]) == (me, 0, "true", 0, None)
        assert (r["path"], r["syscall"], r["argv_truncated"]) == (TRUE, "execve", False)
        assert r["args"] == f"{TRUE} {token} {r['argv'][2]}"

    # The failed exec: the caller's name, -ENOENT, and argv as it was passed.
    (failed,) = [r for r in ours if r["ret"] < 0]
    assert (failed["pid"], failed["ppid"], failed["error"], failed["ret"]) == (
        failing,
        me,
        "ENOENT",
        -2,
    )
    assert failed["argv"] == [missing, token, "fails"] and failed["path"] == missing
    assert failed["comm"] == Path(sys.executable).name[:15]

    # The thread's exec is reported under the process's pid, which it took over.
    (from_thread,) = [r for r in ours if r["argv"] == [TRUE, token, "thread"]]
    assert (from_thread["pid"], from_thread["tid"], from_thread["ret"]) == (threaded, threaded, 0)
    assert from_thread["ppid"] == me and from_thread["comm"] == "true"

    (at,) = [r for r in ours if r["argv"] == [TRUE, token, "fd"]]
    assert (at["pid"], at["syscall"], at["path"], at["ret"]) == (by_fd, "execveat", "", 0)

    (long,) = [r for r in ours if r["pid"] == whole]
    assert long["argv"] == [TRUE, token, *long_args] and not long["argv_truncated"]
    assert long["args"] == " ".join([TRUE, token, *long_args])
    (full,) = [r for r in ours if r["pid"] == exactly_128]  # the most copied: all there
    assert len(full["argv"]) == 128 and not full["argv_truncated"]
    (many,) = [r for r in ours if r["pid"] == too_many]
    assert many["argv"] == [TRUE, token, *map(str, range(126))] and many["argv_truncated"]
    assert many["args"].endswith(" 125 ...")
    # 8 KiB for the path and argv, each with its NUL: the "y"s are cut where it ends.
    (cut,) = [r for r in ours if r["pid"] == too_long]
    room = 8192 - len(TRUE) - 1 - sum(len(a) + 1 for a in (TRUE, token, "x" * 6000)) - 1
    assert cut["argv"] == [TRUE, token, "x" * 6000, "y" * room] and cut["argv_truncated"]
    assert cut["args"] == " ".join(cut["argv"]) + " ..."

    # The python launchers of the three scripted cases, and nothing else of ours.
    launchers = [r for r in ours if r["argv"][0] == sys.executable]
    assert sorted(r["pid"] for r in launchers) == sorted([failing, threaded, by_fd])
    assert len(ours) == len(trues) + len(launchers) + 7


def test_pid_filter_keeps_only_that_process(tmp_path: Path) -> None:
    token = f"mbt-{secrets.token_hex(4)}"
    script = f"read line; {TRUE} {token} child; exec {TRUE} {token} self"
    shell = subprocess.Popen(["/bin/sh", "-c", script], stdin=subprocess.PIPE, text=True)
    try:
        tracer = start_tracer("exec", "--pid", str(shell.pid), "-o", "json")
        run([TRUE, token, "other"])
        shell.communicate("go\n", timeout=30)
    finally:
        shell.kill()
    records, summary = stop_tracer(tracer)
    # The shell's child (another pid) and the test's own exec are not reported.
    assert [(r["pid"], r["argv"], r["comm"]) for r in records] == [
        (shell.pid, [TRUE, token, "self"], "true")
    ]
    assert summary["events"] == 1


def test_comm_and_uid_filters_select_the_caller(tmp_path: Path) -> None:
    token = f"mbt-{secrets.token_hex(4)}"
    name = f"mbx{secrets.token_hex(4)}"
    shell = tmp_path / name  # a shell whose command name is `name`
    shell.symlink_to("/bin/sh")
    by_comm = start_tracer("exec", "--comm", name, "-o", "json")
    as_nobody = start_tracer("exec", "--uid", str(NOBODY), "-o", "json")
    run([str(shell), "-c", f"{TRUE} {token} one; {TRUE} {token} two"])
    run(["/bin/sh", "-c", f"{TRUE} {token} three; {TRUE} {token} four"])
    run(
        [
            "setpriv",
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            "--clear-groups",
            TRUE,
            token,
            "nobody",
        ]
    )
    named, _ = stop_tracer(by_comm)
    nobodys, _ = stop_tracer(as_nobody)
    assert [r["argv"][2] for r in named] == ["one", "two"]
    assert [(r["argv"], r["uid"]) for r in with_token(nobodys, token)] == [
        ([TRUE, token, "nobody"], NOBODY)
    ]
    assert all(r["uid"] == NOBODY for r in nobodys)


def test_failed_only() -> None:
    token = f"mbt-{secrets.token_hex(4)}"
    tracer = start_tracer("exec", "-x", "-o", "json")
    run([TRUE, token, "works"])
    failing = run([sys.executable, "-c", EXEC_PATH, "/nonexistent/x", token, "fails"])
    records, _ = stop_tracer(tracer)
    assert [(r["pid"], r["argv"][-1], r["error"]) for r in with_token(records, token)] == [
        (failing, "fails", "ENOENT")
    ]
    assert all(r["ret"] < 0 for r in records)


def test_table_has_bcc_columns(tmp_path: Path) -> None:
    name = f"mbx{secrets.token_hex(4)}"
    shell = tmp_path / name
    shell.symlink_to("/bin/sh")
    tracer = start_tracer("exec", "-T", "--comm", name)
    many = " ".join(map(str, range(1, 200)))
    shell_pid = run([str(shell), "-c", f"{TRUE} one two; {TRUE} {many}"])
    out, err = stop_tracer_text(tracer)
    header, *rows = out.splitlines()
    assert header.split() == ["TIME", "PCOMM", "PID", "PPID", "RET", "ARGS"]
    first = rows[0].split()
    assert first[1:4] == ["true", first[2], str(shell_pid)]  # forked by the shell
    assert first[4:] == ["0", TRUE, "one", "two"]
    assert rows[1].endswith(f"{TRUE} " + " ".join(map(str, range(1, 128))) + " ...")
    assert len(rows) == 2 and "events: 2, lost: 0" in err


def test_per_thread_is_not_an_exec_option() -> None:
    """`exit`'s option is not one of exec's. (The options every tool shares are checked in
    test_trace_options.py.)"""
    user_error(run_trace("exec", "--per-thread"), "--per-thread")
