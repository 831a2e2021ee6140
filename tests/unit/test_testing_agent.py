"""The agent tests run the `membrane` command of the interpreter that runs them (wherever
its environment is, not a fixed `.venv`), and a missing one fails them instead of skipping
them: a suite that skips every agent test passes without testing anything."""

from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path

import pytest

from membrane.testing import agent


def test_the_cli_is_the_one_of_this_interpreters_environment() -> None:
    command = Path(agent.membrane_command())
    assert command.name == "membrane" and os.access(command, os.X_OK)
    assert command.parent == Path(sysconfig.get_path("scripts"))


@pytest.fixture
def environment_without_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An interpreter whose environment has no `membrane`, while another installation's
    `membrane` is on PATH."""
    scripts = tmp_path / "venv" / "bin"
    scripts.mkdir(parents=True)
    (scripts / "python").symlink_to(sys.executable)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    stranger = elsewhere / "membrane"
    stranger.write_text("#!/bin/sh\nexit 0\n")
    stranger.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(scripts / "python"))
    monkeypatch.setattr(sysconfig, "get_path", lambda name, scheme=None: str(scripts))
    monkeypatch.setenv("PATH", f"{elsewhere}{os.pathsep}{os.environ.get('PATH', '')}")


@pytest.mark.usefixtures("environment_without_the_cli")
def test_another_installations_cli_on_path_is_not_used() -> None:
    with pytest.raises(RuntimeError, match="pip install -e"):
        agent.membrane_command()


@pytest.mark.usefixtures("environment_without_the_cli")
def test_a_missing_cli_is_a_failure_not_a_skip_reason() -> None:
    with pytest.raises(RuntimeError, match="not installed"):
        agent.agent_unusable_reason()
