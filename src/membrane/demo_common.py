"""What both parts of `make demo` share (demo_agent: pods and policy; demo: packet filters):
headings, pass/drop marks, running the real CLI as a user would, and a TCP check."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys

from membrane.netns import inside

BOLD, DIM, GREEN, RED, RESET = "\033[1m", "\033[2m", "\033[32m", "\033[31m", "\033[0m"
PORT = 80


def say(text: str) -> None:
    print(f"\n{BOLD}{text}{RESET}")


def membrane(*args: str) -> None:
    """Run the real CLI the way a user would, echoing the command line."""
    print(f"{DIM}${RESET} membrane {' '.join(args)}")
    out = subprocess.run(
        [sys.executable, "-m", "membrane", *args], text=True, capture_output=True, check=False
    )
    sys.stdout.write(out.stdout + out.stderr)
    if out.returncode:
        raise SystemExit(f"demo: `membrane {' '.join(args)}` failed ({out.returncode})")


def tcp_ok(ns: str, dst: str, src: str | None = None) -> bool:
    with (
        inside(ns),
        contextlib.suppress(OSError),
        socket.create_connection(
            (dst, PORT), timeout=0.5, source_address=(src, 0) if src else None
        ),
    ):
        return True
    return False


def show(label: str, ok: bool) -> None:
    mark = f"{GREEN}passes{RESET}" if ok else f"{RED}dropped{RESET}"
    print(f"  {label:<44} {mark}")
