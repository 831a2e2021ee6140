"""Tables for people: aligned columns under a header, or the `empty` line."""

from __future__ import annotations

import pytest

from membrane.cli.output import print_table


def test_columns_are_aligned_two_spaces_apart(capsys: pytest.CaptureFixture[str]) -> None:
    print_table(["ID", "ENDPOINT", "LABELS"], [["1", "x/a", "app=a"], ["12", "y/bb", ""]])
    assert capsys.readouterr().out.splitlines() == [
        "ID  ENDPOINT  LABELS",
        "1   x/a       app=a",
        "12  y/bb",
    ]


def test_no_rows_prints_the_empty_line(capsys: pytest.CaptureFixture[str]) -> None:
    print_table(["ID"], [], empty="no endpoints")
    assert capsys.readouterr().out == "no endpoints\n"
