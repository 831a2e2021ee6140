"""`membrane agent run --monitor-aggregation`: Cilium's level names (any case) and what each
asks of the datapath; a bad name is one line naming the option, exit 2, before anything is
set up."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from membrane.abi import TraceMode
from membrane.agent.config import make_config
from membrane.datapath.monitor import MONITOR_AGGREGATION_LEVELS, parse_monitor_aggregation
from membrane.errors import UserError
from membrane.testing.agent import membrane_command


@pytest.mark.parametrize(
    ("level", "mode"),
    [
        ("medium", TraceMode.CONNECTIONS),
        ("MAXIMUM", TraceMode.OFF),
        ("max", TraceMode.OFF),
        ("low", TraceMode.TO_ENDPOINT),
        ("lowest", TraceMode.TO_ENDPOINT),
        ("none", TraceMode.ALL),
        (" Disabled ", TraceMode.ALL),
    ],
)
def test_cilium_level_names(level: str, mode: TraceMode) -> None:
    assert MONITOR_AGGREGATION_LEVELS[parse_monitor_aggregation(level)] == mode


def test_medium_by_default_and_kept_by_the_config() -> None:
    config = make_config("/tmp/state", "/tmp/sock", None, "198.18.0.0/16")
    assert config.monitor_aggregation == "medium"
    other = make_config("/tmp/s", "/tmp/x", None, "198.18.0.0/16", monitor_aggregation="Max")
    assert other.monitor_aggregation == "max"


def test_a_bad_level_names_the_option() -> None:
    with pytest.raises(UserError) as err:
        make_config("/tmp/state", "/tmp/sock", None, "198.18.0.0/16", monitor_aggregation="loud")
    assert err.value.field == "monitor-aggregation"
    assert "'loud' is not one of none, disabled, lowest, low, medium, max, maximum" in str(
        err.value
    )


def test_the_cli_refuses_a_bad_level_with_exit_2(tmp_path: Path) -> None:
    state = tmp_path / "state"
    done = subprocess.run(
        [membrane_command(), "agent", "run", "--monitor-aggregation", "loud", "--state-dir", state],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done
    assert done.stderr.strip().splitlines() == [
        "membrane: error: monitor-aggregation: 'loud' is not one of none, disabled, lowest, "
        "low, medium, max, maximum"
    ]
    assert not state.exists()
