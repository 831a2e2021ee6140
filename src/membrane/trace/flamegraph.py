"""Flame graphs of sampled stacks.

Folded stacks are the interchange format: one line per distinct stack, frames from the
root to the leaf joined by ';', then a space and the sample count (`main;work;spin 42`).
Other flame graph tools read them. The SVG here draws each frame as a rectangle whose width
is its share of all samples, callers below callees, siblings in name order so equal paths
merge; hovering a frame shows its name, samples and percentage.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from xml.sax.saxutils import escape, quoteattr

Folded = dict[tuple[str, ...], int]

KERNEL_SUFFIX = "_[k]"  # marks kernel frames in folded stacks (and colours them)
ROOT = "all"

_WIDTH = 1200
_FRAME_HEIGHT = 16
_FONT_SIZE = 12
_CHAR_WIDTH = _FONT_SIZE * 0.59  # average width of a character of the font, in px
_PAD = 10
_TOP = 48  # title and subtitle
_BOTTOM = 10
_MIN_WIDTH = 0.1  # narrower frames are left out: they cannot be seen or pointed at


def fold(stacks: Iterable[tuple[Sequence[str], int]]) -> Folded:
    """Stacks (frames root first, count) merged by path. Frames lose ';' and line breaks,
    which the format reserves."""
    folded: Folded = {}
    for frames, count in stacks:
        path = tuple(f.replace(";", ":").replace("\n", " ") for f in frames)
        if path and count > 0:
            folded[path] = folded.get(path, 0) + count
    return folded


def folded_lines(folded: Mapping[tuple[str, ...], int]) -> list[str]:
    return [f"{';'.join(path)} {count}" for path, count in sorted(folded.items())]


def parse_folded(text: str) -> Folded:
    """Folded stacks from their text form; lines without a count are skipped."""
    stacks = []
    for line in text.splitlines():
        path, _, count = line.rstrip().rpartition(" ")
        if path and count.isdigit():
            stacks.append((path.split(";"), int(count)))
    return fold(stacks)


@dataclass
class _Node:
    samples: int = 0
    children: dict[str, _Node] = field(default_factory=dict)


@dataclass(frozen=True)
class Frame:
    """One rectangle: a frame at `depth` (the root is 0) covering samples
    [start, start + samples) of all samples."""

    name: str
    depth: int
    start: int
    samples: int


def layout(folded: Mapping[tuple[str, ...], int]) -> list[Frame]:
    """The frames of the graph, the root first, each child after its parent."""
    root = _Node()
    for path, count in folded.items():
        node = root
        node.samples += count
        for name in path:
            node = node.children.setdefault(name, _Node())
            node.samples += count
    frames: list[Frame] = []
    todo = [(ROOT, root, 0, 0)]
    while todo:
        name, node, depth, start = todo.pop()
        frames.append(Frame(name, depth, start, node.samples))
        offset = start
        children = []
        for child_name in sorted(node.children):
            child = node.children[child_name]
            children.append((child_name, child, depth + 1, offset))
            offset += child.samples
        todo.extend(reversed(children))
    return frames


def render_svg(
    folded: Mapping[tuple[str, ...], int],
    title: str = "Flame Graph",
    subtitle: str = "",
    width: int = _WIDTH,
) -> str:
    """A self-contained SVG document of the flame graph."""
    frames = layout(folded)
    total = frames[0].samples
    depth = max(f.depth for f in frames) + 1
    height = _TOP + depth * _FRAME_HEIGHT + _BOTTOM
    scale = (width - 2 * _PAD) / total if total else 0.0
    out = [
        '<?xml version="1.0" standalone="no"?>',
        f'<svg version="1.1" xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" '
        f'font-family="Verdana, sans-serif" font-size="{_FONT_SIZE}">',
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#f8f8f0"/>',
        f'<text x="{width / 2}" y="20" font-size="16" text-anchor="middle">{escape(title)}</text>',
    ]
    if subtitle:
        out.append(
            f'<text x="{width / 2}" y="38" text-anchor="middle" fill="#555">'
            f"{escape(subtitle)}</text>"
        )
    if not total:
        out.append(f'<text x="{width / 2}" y="{_TOP + 12}" text-anchor="middle">no samples</text>')
    for frame in frames if total else ():
        w = frame.samples * scale
        if w < _MIN_WIDTH:
            continue
        x = _PAD + frame.start * scale
        y = height - _BOTTOM - (frame.depth + 1) * _FRAME_HEIGHT
        share = 100 * frame.samples / total
        plural = "" if frame.samples == 1 else "s"
        name = frame.name.removesuffix(KERNEL_SUFFIX)
        where = " [kernel]" if name != frame.name else ""
        tip = f"{name}{where} ({frame.samples} sample{plural}, {share:.2f}%)"
        out.append(
            f"<g><title>{escape(tip)}</title>"
            f'<rect x="{x:.2f}" y="{y}" width="{w:.2f}" height="{_FRAME_HEIGHT - 1}" '
            f'rx="2" ry="2" fill={quoteattr(_colour(frame))}/>'
        )
        label = _label(name, w)
        if label:
            out.append(f'<text x="{x + 3:.2f}" y="{y + _FRAME_HEIGHT - 4}">{escape(label)}</text>')
        out.append("</g>")
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _label(name: str, width: float) -> str:
    """The name, shortened with '..' to fit the rectangle; empty when too narrow."""
    fits = int((width - 6) / _CHAR_WIDTH)
    if fits >= len(name):
        return name
    return name[: fits - 2] + ".." if fits >= 3 else ""


def _colour(frame: Frame) -> str:
    """Warm colours that stay the same for a name from graph to graph; kernel frames in
    orange-brown, unknown ones grey, the root neutral."""
    if frame.depth == 0:
        return "rgb(200,200,200)"
    if frame.name.startswith("[unknown]"):
        return "rgb(180,180,170)"
    h = zlib.crc32(frame.name.encode())
    v1, v2 = (h & 0xFF) / 255, ((h >> 8) & 0xFF) / 255
    if frame.name.endswith(KERNEL_SUFFIX):
        return f"rgb({200 + int(55 * v1)},{120 + int(60 * v2)},{40 + int(30 * v1)})"
    return f"rgb({205 + int(50 * v1)},{int(200 * v2)},{int(55 * v1)})"
