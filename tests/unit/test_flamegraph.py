"""Folded stacks and the SVG flame graph: merging, layout, proportional widths, escaping."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import pytest

from membrane.trace.flamegraph import (
    KERNEL_SUFFIX,
    Frame,
    fold,
    folded_lines,
    layout,
    parse_folded,
    render_svg,
)

SVG = "{http://www.w3.org/2000/svg}"
FOLDED = """\
app;main;work;spin 6
app;main;work;spin 2
app;main;idle 4
tool;main 4
not a stack line
"""


def frames_by_title(svg: str) -> dict[str, tuple[float, float, int]]:
    """Frame name -> (x, width, samples) of every drawn frame."""
    out = {}
    for group in ET.fromstring(svg).iter(f"{SVG}g"):
        title = group.find(f"{SVG}title").text  # type: ignore[union-attr]
        rect = group.find(f"{SVG}rect")
        match = re.fullmatch(r"(.*) \((\d+) samples?, [\d.]+%\)", title or "")
        assert match and rect is not None, title
        out[match[1]] = (float(rect.get("x", 0)), float(rect.get("width", 0)), int(match[2]))
    return out


def test_fold_merges_equal_paths_and_parses_back() -> None:
    folded = parse_folded(FOLDED)
    assert folded == {
        ("app", "main", "work", "spin"): 8,
        ("app", "main", "idle"): 4,
        ("tool", "main"): 4,
    }
    assert parse_folded("\n".join(folded_lines(folded))) == folded
    assert folded_lines(fold([(["a;b", "c\nd"], 2), (["empty"], 0)])) == ["a:b;c d 2"]


def test_layout_places_children_in_name_order_within_their_parent() -> None:
    frames = layout(parse_folded(FOLDED))
    assert frames[0] == Frame("all", 0, 0, 16)
    assert frames[1:] == [
        Frame("app", 1, 0, 12),
        Frame("main", 2, 0, 12),
        Frame("idle", 3, 0, 4),
        Frame("work", 3, 4, 8),
        Frame("spin", 4, 4, 8),
        Frame("tool", 1, 12, 4),
        Frame("main", 2, 12, 4),
    ]


def test_svg_widths_are_proportional_to_samples() -> None:
    svg = render_svg({("a", "b"): 3, ("a", "c"): 1, ("d",): 4}, subtitle="4 + 4 samples")
    frames = frames_by_title(svg)
    x0, total_width, total = frames["all"]
    assert total == 8 and total_width > 1000
    for name, samples in [("a", 4), ("b", 3), ("c", 1), ("d", 4)]:
        assert frames[name][2] == samples
        assert frames[name][1] == pytest.approx(total_width * samples / total, abs=0.01)
    # children start where their parent does, siblings follow each other
    assert frames["a"][0] == frames["b"][0] == x0
    assert frames["c"][0] == pytest.approx(x0 + frames["b"][1], abs=0.01)
    assert frames["d"][0] == pytest.approx(x0 + frames["a"][1], abs=0.01)
    root = ET.fromstring(svg)
    assert "4 + 4 samples" in "".join(t.text or "" for t in root.iter(f"{SVG}text"))


def test_names_are_escaped_and_kernel_frames_marked() -> None:
    name = 'operator<<(std::ostream&, "x")'
    svg = render_svg({("app", name, "schedule" + KERNEL_SUFFIX): 5})
    frames = frames_by_title(svg)  # parses: the document is well-formed
    assert frames[name][2] == 5
    assert frames["schedule [kernel]"][2] == 5
    labels = [t.text for t in ET.fromstring(svg).iter(f"{SVG}text")]
    assert "schedule" in labels and name in labels


def test_narrow_frames_get_shortened_labels_or_none() -> None:
    long_name = "a_function_with_a_rather_long_name_indeed"
    svg = render_svg({("wide",): 1000, ("mid", long_name): 150, ("tiny",): 1})
    labels = [t.text or "" for t in ET.fromstring(svg).iter(f"{SVG}text")]
    assert "wide" in labels
    shortened = [label for label in labels if label.startswith("a_function")]
    assert len(shortened) == 1 and shortened[0].endswith("..")
    assert len(shortened[0]) < len(long_name)
    assert "tiny" not in labels  # about one pixel wide: drawn, but without text
    assert "tiny" in frames_by_title(svg)


def test_no_samples_is_still_a_valid_document() -> None:
    root = ET.fromstring(render_svg({}))
    assert root.tag == f"{SVG}svg"
    assert "no samples" in [t.text for t in root.iter(f"{SVG}text")]
