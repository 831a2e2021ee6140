"""`membrane agent run --attach`: a mode the agent does not know, or tcx on a kernel without
it, is refused before anything is made (no state directory, no node namespace)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from membrane import netns
from membrane.bpf.probe import supports
from membrane.testing.agent import membrane_command
from membrane.testing.cli import user_error
from membrane.testing.cluster import unique_tag

pytestmark = pytest.mark.root


def agent_run(tmp_path: Path, node_netns: str, attach: str) -> subprocess.CompletedProcess[str]:
    options = {
        "--state-dir": str(tmp_path / "state"),
        "--api-socket": str(tmp_path / "api.sock"),
        "--node-netns": node_netns,
        "--attach": attach,
    }
    argv = [membrane_command(), "agent", "run", *(x for kv in options.items() for x in kv)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("attach", "problem"), [("tc", "'tc' is not one of"), ("tcx", "no tcx (Linux 6.6")]
)
def test_a_mode_that_cannot_be_had_is_refused(tmp_path: Path, attach: str, problem: str) -> None:
    if attach == "tcx" and supports("tcx"):
        pytest.skip("this kernel has tcx: --attach=tcx is no error here")
    node_netns = f"{unique_tag('o')}n"
    try:
        user_error(agent_run(tmp_path, node_netns, attach), "attach: ", problem)
        assert not (tmp_path / "state").exists()
        assert not netns.exists(node_netns)
    finally:
        if netns.exists(node_netns):
            netns.delete(node_netns)
