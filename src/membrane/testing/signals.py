"""Children that must react to signals the way they do by default, however we were started.

A process started by `nohup`, or in the background of a non-interactive shell (`make test &`
from a script, a CI runner), inherits SIGINT and SIGQUIT *ignored*, and passes that on to
everything it starts: an ignored disposition survives exec. A test that stops a tracer
with Ctrl-C, expects a Python program to raise KeyboardInterrupt or a `sleep` to die of
SIGQUIT would then wait for nothing. Such children are started through `env
--default-signal`, which resets the dispositions and execs the program (same PID), instead
of relying on what the test run inherited.

    subprocess.Popen(with_default_signals(["sleep", "60"]))
"""

from __future__ import annotations

import signal
from collections.abc import Sequence

# The signals shells leave ignored in background jobs (SIGINT, SIGQUIT) and that tests send.
DEFAULT_SIGNALS = (signal.SIGINT, signal.SIGQUIT)


def with_default_signals(argv: Sequence[str]) -> list[str]:
    """`argv` run with DEFAULT_SIGNALS at their default action (coreutils >= 8.31 `env`)."""
    names = ",".join(sig.name.removeprefix("SIG") for sig in DEFAULT_SIGNALS)
    return ["env", f"--default-signal={names}", "--", *argv]
