"""What the control-plane benchmark measures besides wall time: duration statistics, the
BPF maps and programs of a node, where the agent spends its time (py-spy), and which
sources were measured."""

from __future__ import annotations

import contextlib
import hashlib
import json
import select
import signal
import subprocess
import sysconfig
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from bench._common import median
from membrane.bpf import Map
from membrane.bpf.links import Link
from membrane.datapath.abi import NODE_MAPS
from membrane.testing.agent import AgentProcess

REPO = Path(__file__).resolve().parents[2]
PY_SPY = str(Path(sysconfig.get_path("scripts")) / "py-spy")  # this interpreter's environment


# ---- BPF state -------------------------------------------------------------------------
def map_entries(agent: AgentProcess, name: str) -> int:
    with Map.from_pin(str(agent.bpf_dir / name)) as m:
        return len(m)


def _memlock(fd: int) -> int:
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("memlock:"):
                return int(line.split()[1])
    return 0


def bpf_footprint(agent: AgentProcess) -> dict[str, Any]:
    """Per node map: max entries, entries in use, kernel memory (fdinfo memlock); and the
    endpoint programs behind this agent's pinned links (count, JIT size, memlock)."""
    maps = {}
    for name in NODE_MAPS:
        with Map.from_pin(str(agent.bpf_dir / name)) as m:
            counted = name not in ("events", "events_lost")  # a ring; a per-CPU counter
            maps[name] = {
                "max_entries": m.max_entries,
                "entries": len(m) if counted else None,
                "memlock_bytes": _memlock(m.fd),
            }
    prog_ids = set()
    links_root = agent.bpf_dir / "endpoint_links"
    for pin in links_root.glob("*/*"):
        with Link.from_pin(str(pin), kind="tcx") as link:
            prog_ids.add(int(link.info().prog_id))
    progs = json.loads(
        subprocess.run(
            ["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=True
        ).stdout
    )
    ours = [p for p in progs if p["id"] in prog_ids]
    return {
        "maps": maps,
        "maps_memlock_bytes": sum(m["memlock_bytes"] for m in maps.values()),
        "programs": len(ours),
        "programs_jited_bytes": sum(p.get("bytes_jited", 0) for p in ours),
        "programs_memlock_bytes": sum(p.get("bytes_memlock", 0) for p in ours),
    }


# ---- profiling ---------------------------------------------------------------------------
class Profiler:
    """py-spy on the agent around chosen steps (none when `directory` is None)."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self.results: dict[str, Any] = {}

    @contextlib.contextmanager
    def __call__(self, agent: AgentProcess, step: str, enabled: bool = True) -> Iterator[None]:
        if self.directory is None or not enabled:
            yield
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        out = self.directory / f"{step}.txt"
        proc = subprocess.Popen(
            [PY_SPY, "record", "--pid", str(agent.pid), "--rate", "250", "--format", "raw",
             "--nonblocking", "--output", str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], 10)  # "Sampling process ..."
            said = proc.stdout.readline() if ready else ""
            if "Sampling" not in said:
                raise RuntimeError(f"py-spy did not start: {said!r}")
            yield
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
        if out.exists():
            self.results[step] = hotspots(out)


# Frames every stack of the worker thread or the event loop passes through.
_PLUMBING = ("threading.py", "futures/thread.py", "asyncio/", "selectors.py", "<module>")


def _function(frame: str) -> str:
    """`name (path/to/module.py:123)` -> `name (module.py)`; lines vary, functions don't."""
    name, _, where = frame.partition(" (")
    path = where.rsplit(":", 1)[0]
    short = "/".join(path.split("/")[-2:])
    return f"{name} ({short})" if where else name


def hotspots(folded: Path, top: int = 25) -> dict[str, Any]:
    """Share of samples in each function (inclusive: anywhere on the stack; self: on top)."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in folded.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_function(f) for f in stack.split(";")]
        if frames and frames[0].startswith("process "):
            frames = frames[1:]  # py-spy's "process 123:..." and "thread ..." roots
        frames = [f for f in frames if not f.startswith("thread ")]
        total += n
        for name in set(frames):
            if not any(p in name for p in _PLUMBING):
                inclusive[name] += n
        if frames:
            own[frames[-1]] += n

    def share(c: Counter[str]) -> list[list[Any]]:
        return [[name, round(n / total, 3)] for name, n in c.most_common(top)]

    return {"samples": total, "inclusive": share(inclusive), "self": share(own)}


# ---- statistics --------------------------------------------------------------------------
def ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def stats_ms(values: Sequence[float]) -> dict[str, Any]:
    """median, p90 and max of durations in seconds, in ms."""
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
    return {
        "n": len(ordered),
        "median_ms": ms(median(ordered)),
        "p90_ms": ms(p90),
        "max_ms": ms(ordered[-1]),
        "min_ms": ms(ordered[0]),
    }


def trend(values: Sequence[float], block: int) -> list[dict[str, Any]]:
    """stats_ms per block of `block` consecutive values (how a filling node slows down)."""
    return [
        {"endpoints": f"{i + 1}-{min(i + block, len(values))}", **stats_ms(values[i : i + block])}
        for i in range(0, len(values), block)
    ]


def source_digest() -> dict[str, Any]:
    """Which code was measured: the tree is shared and changes under us, so a digest of
    the agent's sources (and when the newest of them changed) goes into the JSON."""
    files = sorted([*(REPO / "src" / "membrane").rglob("*.py"), *(REPO / "bpf").rglob("*.[ch]")])
    digest = hashlib.sha256()
    for f in files:
        digest.update(str(f.relative_to(REPO)).encode() + b"\0" + f.read_bytes())
    newest = max(files, key=lambda f: f.stat().st_mtime)
    return {
        "sha256_12": digest.hexdigest()[:12],
        "newest_file": str(newest.relative_to(REPO)),
        "newest_mtime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(newest.stat().st_mtime)),
    }
