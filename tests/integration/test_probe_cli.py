"""`membrane probe` as a user runs it: JSON for machines, a table for people, one-line
errors with exit code 2 for bad options and missing privileges."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from membrane.bpf.probe import supports
from membrane.testing.cli import WITHOUT_CAPABILITIES

pytestmark = pytest.mark.root


def membrane(*args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*prefix, sys.executable, "-m", "membrane", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_one_line_error(done: subprocess.CompletedProcess[str], *words: str) -> None:
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("membrane: error: ")
    for word in words:
        assert word in lines[0]


def test_json_lists_every_feature_truthfully() -> None:
    done = membrane("probe", "-o", "json")
    assert done.returncode == 0, done.stderr
    features = json.loads(done.stdout)
    assert isinstance(features, list) and features
    for f in features:
        assert set(f) == {"name", "category", "supported", "detail"}
        assert isinstance(f["supported"], bool) and f["detail"]
    # the same answers as the probe in this process (tests/datapath/test_probe.py checks
    # those against the kernel)
    assert {f["name"]: f["supported"] for f in features} == {
        f["name"]: supports(f["name"]) for f in features
    }


def test_table_for_people() -> None:
    done = membrane("probe")
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines() if line.strip()}
    assert rows["FEATURE"][:4] == ["FEATURE", "CATEGORY", "SUPPORTED", "DETAIL"]
    assert rows["fentry"][1:3] == ["tracing", "yes" if supports("fentry") else "no"]
    if not supports("fentry"):
        assert rows["fentry"][3] in ("load", "attach")  # the reason, "load failed: ..."
    assert rows["tracepoint"][1:3] == ["tracing", "yes"]


def test_bad_output_format_is_one_line_and_exit_2() -> None:
    assert_one_line_error(membrane("probe", "-o", "yaml"), "--output", "yaml")


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
def test_without_privileges_names_what_is_missing() -> None:
    done = membrane("probe", prefix=WITHOUT_CAPABILITIES)
    assert_one_line_error(done, "CAP_BPF", "CAP_SYS_ADMIN")
