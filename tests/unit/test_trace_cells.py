"""The native formatter's lists of strings (exec's argv, NUL-ended items in the record's
tail) against what Python writes for the same values: json.dumps of a list and of the
joined text, and the table's joined text."""

from __future__ import annotations

import json

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from membrane.native.eventfmt import RowFormatter
from membrane.trace.cells import Cells, _distinct, ints, mapped, tail_text, text_lists

ITEMS = st.lists(st.binary(max_size=12).map(lambda b: b.replace(b"\0", b"")), max_size=6)


def _texts(items: list[bytes]) -> list[str]:
    return [i.decode(errors="replace") for i in items]


def _format(cells: dict[str, Cells], rows: int, json_lines: bool) -> str:
    formatter = RowFormatter(json_lines)
    keys = {k: (json.dumps(k) + ": ").encode() for k in cells}
    columns = [c.column(keys[k] if json_lines else b"", 0, False) for k, c in cells.items()]
    text = b"".join(bytes(chunk) for chunk in formatter.chunks(columns, rows))
    return text.decode(errors="surrogateescape")  # a table writes other bytes as they are


def _batch(rows: list[list[bytes]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows as a record block: each row's items with their NULs, after a 3-byte head."""
    block, starts, lengths = b"", [], []
    for items in rows:
        body = b"".join(i + b"\0" for i in items)
        block += b"hd:"
        starts.append(len(block))
        lengths.append(len(body))
        block += body
    return np.frombuffer(block or b"\0", dtype=np.uint8), np.array(starts), np.array(lengths)


@given(st.lists(st.tuples(ITEMS, st.booleans()), min_size=1, max_size=5))
def test_lists_as_json_dumps_writes_them(rows: list[tuple[list[bytes], bool]]) -> None:
    block, starts, lengths = _batch([items for items, _ in rows])
    more = np.array([m for _, m in rows])
    cells = {
        "argv": text_lists(block, starts, lengths),
        "args": text_lists(block, starts, lengths, join=True, more=more),
    }
    expected = "".join(
        json.dumps({"argv": _texts(items), "args": " ".join(_texts(items)) + (" ..." * m)}) + "\n"
        for items, m in rows
    )
    assert _format(cells, len(rows), json_lines=True) == expected


def test_table_joins_the_items_and_escapes_control_bytes() -> None:
    rows = [[b"/bin/echo", b"a b", b"tab\there"], [], [b""], [b"x", b"back\\slash"]]
    block, starts, lengths = _batch(rows)
    more = np.array([False, False, False, True])
    cells = {"args": text_lists(block, starts, lengths, join=True, more=more)}
    assert _format(cells, len(rows), json_lines=False).splitlines() == [
        "/bin/echo a b tab\\x09here",
        "",
        "",
        "x back\\\\slash ...",
    ]


def test_an_item_cut_without_its_nul_is_still_an_item() -> None:
    block = np.frombuffer(b"one\0tw", dtype=np.uint8)
    cells = {"argv": text_lists(block, np.array([0]), np.array([6]))}
    assert _format(cells, 1, json_lines=True) == '{"argv": ["one", "tw"]}\n'


@given(
    st.lists(st.integers(-(2**40), 2**40), min_size=1, max_size=50)
    | st.lists(st.integers(-5, 300), min_size=1, max_size=50)
)
def test_mapped_names_each_value_as_unique_would(values: list[int]) -> None:
    """The O(n) path for values in a small range and the sort for the others agree with
    np.unique, and every row gets its own value's text."""
    array = np.array(values, dtype=np.int64)
    distinct, inverse = _distinct(array)
    expected, expected_inverse = np.unique(array, return_inverse=True)
    assert distinct.tolist() == expected.tolist()
    assert inverse.tolist() == expected_inverse.reshape(-1).tolist()
    cells = {"v": mapped(array, lambda v: None if v < 0 else f"n{v}")}
    assert _format(cells, len(values), json_lines=True).splitlines() == [
        json.dumps({"v": None if v < 0 else f"n{v}"}) for v in values
    ]


def _table_text(raw: bytes) -> str:
    """What the table writes for text: control bytes as \\xNN, the backslash doubled."""
    out = bytearray()
    for byte in raw:
        if byte < 0x20 or byte == 0x7F:
            out += f"\\x{byte:02x}".encode()
        elif byte == 0x5C:
            out += b"\\\\"
        else:
            out.append(byte)
    return out.decode(errors="surrogateescape")


@given(
    st.lists(
        st.binary(max_size=40).map(lambda b: b.replace(b"\0", b"")),
        min_size=1,
        max_size=6,
    ),
    st.lists(st.integers(-(2**63), 2**63 - 1), min_size=6, max_size=6),
)
def test_text_and_numbers_as_python_writes_them(texts: list[bytes], numbers: list[int]) -> None:
    """Text of any bytes (scanned 8 at a time for what needs escaping) and integers of
    any size, against json.dumps and the table's escaping."""
    block = np.frombuffer(b"".join(texts) or b"\0", dtype=np.uint8)
    lengths = np.array([len(t) for t in texts])
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    rows = len(texts)
    cells = {"text": tail_text(block, starts, lengths), "n": ints(np.array(numbers[:rows]))}
    assert _format(cells, rows, json_lines=True) == "".join(
        json.dumps({"text": t.decode(errors="replace"), "n": n}) + "\n"
        for t, n in zip(texts, numbers, strict=False)
    )
    table = _format(cells, rows, json_lines=False)
    assert table.split("\n")[:-1] == [
        f"{_table_text(t)} {n}".rstrip() for t, n in zip(texts, numbers, strict=False)
    ]
