"""What the runtime waits for in `membrane-cni` itself, per call (it runs the plugin twice
per container: ADD and DEL):

  version    `CNI_COMMAND=VERSION`, answered without an agent: the executable's start.
  del        a DEL of a container the agent never saw, against the real agent: the start
             plus one HTTP request on the agent's socket, the agent doing no work.

Each call is spawned (posix_spawn, stdin from a file, output to /dev/null) and waited for,
`--runs` times after 10 warm-ups; median and p90. With `--against EXE`, another plugin
executable (e.g. the Python script it replaced, `git show 4d487bc:src/membrane/cni/
plugin.py` behind a `#!/path/to/python -IS` line) runs interleaved with ours, call by
call, so both meet the same load.

    python -m bench.cni_plugin_start [--runs 200] [--against EXE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._common import emit, exit_on_sigterm, machine, percentile
from membrane.cni.install import EXECUTABLE
from membrane.testing.agent import running_agent
from membrane.testing.cluster import unique_tag


def timed_call(executable: str, stdin: str, env: dict[str, str]) -> float:
    """One call as a runtime makes it; raises if the plugin did not succeed."""
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, stdin, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
        (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0),
    ]
    started = time.perf_counter()
    pid = os.posix_spawn(executable, [executable], env, file_actions=actions)
    _, status = os.waitpid(pid, 0)
    took = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{executable} failed ({env['CNI_COMMAND']}): status {status}")
    return took


def compare(
    plugins: dict[str, str], stdin: str, env: dict[str, str], runs: int
) -> dict[str, dict[str, float]]:
    times: dict[str, list[float]] = {name: [] for name in plugins}
    for i in range(10 + runs):
        for name, executable in plugins.items():
            took = timed_call(executable, stdin, env)
            if i >= 10:
                times[name].append(took)
    return {
        name: {
            "median_ms": statistics.median(values) * 1e3,
            "p90_ms": percentile(values, 0.9) * 1e3,
        }
        for name, values in times.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--against", help="another plugin executable to run interleaved")
    args = parser.parse_args()
    exit_on_sigterm()
    plugins = {"c": str(EXECUTABLE)}
    if args.against:
        plugins["against"] = os.path.abspath(args.against)
    base = {"PATH": "/usr/bin:/bin", "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin"}
    result: dict[str, Any] = {"machine": machine(), "runs": args.runs, "plugins": plugins}
    with (
        tempfile.TemporaryDirectory(prefix="membrane-cnistart-") as tmp,
        running_agent(unique_tag("p"), log_level="warning", memory_limit=None) as agent,
    ):
        config = Path(tmp) / "config.json"
        config.write_text(json.dumps({
            "cniVersion": "1.0.0", "name": "bench", "type": "membrane-cni",
            "apiSocket": agent.socket,
        }))  # fmt: skip
        version = {**base, "CNI_COMMAND": "VERSION"}
        result["version"] = compare(plugins, str(config), version, args.runs)
        unknown = {**base, "CNI_COMMAND": "DEL", "CNI_CONTAINERID": "never-seen",
                   "CNI_NETNS": "/run/netns/never-seen"}  # fmt: skip
        result["del_unknown"] = compare(plugins, str(config), unknown, args.runs)
    result["load_after"] = os.getloadavg()[0]
    summary = [
        f"{phase} {name}: median {r['median_ms']:.2f} ms, p90 {r['p90_ms']:.2f} ms"
        for phase in ("version", "del_unknown")
        for name, r in result[phase].items()
    ]
    emit(result, summary)


if __name__ == "__main__":
    main()
