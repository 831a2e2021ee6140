"""Run every benchmark in bench/ one after the other; each one's JSON goes to
bench/out/<name>.json and its summary to our stderr. Exits non-zero if any failed.

    python -m bench.run_all [NAME ...]
"""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"


def benchmarks() -> list[str]:
    """Every module of bench/ except the shared helpers (`_*`) and this runner."""
    return sorted(
        m.name
        for m in pkgutil.iter_modules([str(HERE)])
        if not m.name.startswith("_") and m.name != "run_all"
    )


def main() -> int:
    known = benchmarks()
    chosen = sys.argv[1:] or known
    if unknown := [n for n in chosen if n not in known]:
        print(
            f"unknown benchmark(s): {', '.join(unknown)} (have: {', '.join(known)})",
            file=sys.stderr,
        )
        return 2
    OUT.mkdir(exist_ok=True)
    failed = []
    for name in chosen:
        print(f"== {name}", file=sys.stderr, flush=True)
        result = subprocess.run(
            [sys.executable, "-m", f"bench.{name}"],
            cwd=HERE.parent,
            stdout=subprocess.PIPE,
            text=True,
        )
        if result.returncode != 0:
            failed.append(name)
            print(f"!! {name} failed with exit code {result.returncode}", file=sys.stderr)
            continue
        (OUT / f"{name}.json").write_text(result.stdout)
        print(f"   -> {OUT / f'{name}.json'}", file=sys.stderr)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
