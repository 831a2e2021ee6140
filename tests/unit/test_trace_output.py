"""Printer.write_columns builds JSON lines and table rows column by column for speed; the
text must stay exactly what json.dumps and cell-by-cell padding give for each event."""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from membrane.trace.output import Column, Printer

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.text(),
    st.floats(allow_nan=False),
    st.lists(st.integers(), max_size=3),
)
columns_of = st.integers(min_value=0, max_value=5).flatmap(
    lambda n: st.dictionaries(
        st.text(min_size=1), st.lists(scalars, min_size=n, max_size=n), min_size=1, max_size=5
    )
)


def printed(write: Callable[[], None]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        write()
    return out.getvalue()


@given(columns_of)
def test_json_lines_are_json_dumps_of_each_event(fields: dict[str, list[Any]]) -> None:
    count = len(next(iter(fields.values())))
    events = [{k: v[i] for k, v in fields.items()} for i in range(count)]
    printer = Printer([], "json")
    assert printed(lambda: printer.write_columns(fields)) == "".join(
        json.dumps(e) + "\n" for e in events
    )
    assert printer.count == count


@given(
    st.lists(
        st.tuples(
            st.one_of(st.none(), st.integers(), st.text(alphabet="ab c")), st.text(alphabet="xy z")
        ),
        max_size=5,
    )
)
def test_table_rows_pad_each_cell(events: list[tuple[Any, str]]) -> None:
    columns = [Column("n", "N", 4, right=True), Column("s", "S", 3), Column("rest", "REST", 0)]
    printer = Printer(columns, "table")
    printed(printer.header)
    out = printed(
        lambda: printer.write_columns({"n": [n for n, _ in events], "rest": [s for _, s in events]})
    )
    assert out == "".join(
        " ".join([("-" if n is None else str(n)).rjust(4), "-".ljust(3), s]).rstrip() + "\n"
        for n, s in events
    )
    assert printer.count == len(events)
