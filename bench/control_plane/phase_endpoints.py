"""Phase `endpoints`: adding and deleting one endpoint on an empty node, then a row of them;
each added endpoint is reached by a probe."""

from __future__ import annotations

from typing import Any

from bench.control_plane.harness import (
    Source,
    add_endpoint,
    delete_endpoint,
    listen,
    probe,
    require,
    running_agent,
    source_of,
)
from bench.control_plane.measure import Profiler, ms, stats_ms, trend


def phase_endpoints(single_reps: int, row: int, profile: Profiler) -> dict[str, Any]:
    with running_agent("endpoints") as agent:
        singles, single_deletes = [], []
        for i in range(single_reps):
            pod, took = add_endpoint(agent, "bench", f"single-{i}", {"app": "single"})
            singles.append(took)
            listen(pod)
            require(probe([(Source("node", agent.node_netns), pod, True)]), "single endpoint")
            single_deletes.append(delete_endpoint(agent, pod))
        adds, pods = [], []
        with profile(agent, f"endpoint-add-{row}"):
            for i in range(row):
                pod, took = add_endpoint(agent, "bench", f"row-{i:03d}", {"app": f"app-{i % 10}"})
                adds.append(took)
                pods.append(pod)
        for pod in pods[:: max(1, row // 10)]:
            listen(pod)
        sample = [p for p in pods if p.listener]
        require(
            probe([(source_of(pods[-1]), p, True) for p in sample if p is not pods[-1]]),
            f"after {row} adds",
        )
        rss = agent.memory_kib()
        deletes = []
        with profile(agent, f"endpoint-delete-{row}"):
            for pod in reversed(pods):
                deletes.append(delete_endpoint(agent, pod))
        return {
            "single_add": stats_ms(singles),
            "single_delete": stats_ms(single_deletes),
            "row": row,
            "row_add": stats_ms(adds),
            "row_add_trend": trend(adds, max(1, row // 5)),
            "row_add_ms": [ms(t) for t in adds],
            "row_delete": stats_ms(deletes),
            "row_delete_trend": trend(deletes[::-1], max(1, row // 5)),
            "rss_with_row": rss,
        }
