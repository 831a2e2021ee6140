"""The TCP trace tools refuse bad input and missing privileges the way DESIGN.md says:
exit 2, one stderr line naming the problem, before anything is loaded."""

from __future__ import annotations

import pytest
from trace_support import assert_user_error, run_trace

pytestmark = pytest.mark.root
TOOLS = ("connect", "accept", "tcplife", "tcp-count")
NOBODY = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")


@pytest.mark.parametrize("tool", TOOLS)
@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--pid", "999999999"], "--pid"),
        (["-o", "yaml"], "--output"),
    ],
)
def test_bad_common_options(tool: str, args: list[str], field: str) -> None:
    assert_user_error(run_trace(tool, *args), field)


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--by", "src"], "--by"),
        (["--interval", "-1"], "--interval"),
        (["--interval", "nan"], "--interval"),
        (["--interval", "ten"], "--interval"),
    ],
)
def test_bad_tcp_count_options(args: list[str], field: str) -> None:
    assert_user_error(run_trace("tcp-count", *args), field)


@pytest.mark.parametrize("tool", TOOLS)
def test_not_root(tool: str) -> None:
    assert_user_error(run_trace(tool, "-d", "1", prefix=NOBODY), "root")


def test_unknown_option() -> None:
    assert_user_error(run_trace("accept", "--bogus"), "--bogus")
