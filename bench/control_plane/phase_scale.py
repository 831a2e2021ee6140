"""Phase `scale`: hundreds of endpoints under a policy: their adds, listing them, sampled
reachability, a policy change among them, the endpoint plumbing tests run beside them, the
agent's memory and the node's BPF footprint."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from typing import Any

from bench.control_plane.harness import (
    Case,
    Change,
    add_endpoint,
    api,
    blocked_tasks,
    delete_endpoint,
    delete_policy,
    flip,
    import_policy,
    listen,
    probe,
    require,
    running_agent,
    source_of,
    timed_change,
)
from bench.control_plane.measure import REPO, Profiler, bpf_footprint, ms, stats_ms, trend
from bench.control_plane.policies import cnp, rule_from_endpoints
from membrane.testing.pods import Pod


def phase_scale(count: int, reps: int, run_tests: bool, profile: Profiler) -> dict[str, Any]:
    """`count` endpoints in namespace `scale`, ten per "deployment" (label deploy=dNN, so
    ten endpoints share an identity), the first half tier=front, the rest tier=back. The
    policy: back endpoints accept TCP 8080 from front endpoints only."""
    with running_agent("scale") as agent:
        ns = "scale"
        policy = cnp("back", ns, {"tier": "back"}, [rule_from_endpoints({"tier": "front"})])
        import_policy(agent, policy)
        pods: list[Pod] = []
        adds: list[float] = []
        slow_adds: list[dict[str, Any]] = []
        started = time.perf_counter()
        with profile(agent, f"scale-add-{count}"):
            for i in range(count):
                tier = "front" if i < count // 2 else "back"
                labels = {"deploy": f"d{i // 10:02d}", "tier": tier}
                pod, took = add_endpoint(agent, ns, f"p{i:03d}", labels)
                pods.append(pod)
                adds.append(took)
                if took > 1.0:  # what else was going on (see RESULTS.md: RTNL storms)
                    slow_adds.append(
                        {"index": i, "ms": ms(took), "loadavg_1m": os.getloadavg()[0],
                         "blocked_tasks_after": blocked_tasks()}
                    )  # fmt: skip
                if (i + 1) % 100 == 0:
                    print(f"   {i + 1} endpoints, last add {ms(took)} ms", file=sys.stderr)
        total = time.perf_counter() - started
        front, back = pods[: count // 2], pods[count // 2 :]
        rng = random.Random(5)

        def sample_cases(n: int = 16) -> list[Case]:
            cases: list[Case] = []
            for srcs, dsts, want in ((front, back, True), (back, back, False),
                                     (back, front, True), (front, front, True)):  # fmt: skip
                for _ in range(n):
                    src, dst = rng.sample(srcs, 1)[0], rng.sample(dsts, 1)[0]
                    if src is not dst:
                        cases.append((source_of(src), dst, want))
            return cases

        for pod in pods:
            listen(pod)
        reach = sample_cases()
        require(probe(reach), f"{count} endpoints, sampled reachability")

        listed_started = time.perf_counter()
        listed = json.loads(agent.cli("endpoint", "list", "-o", "json").stdout)
        list_seconds = time.perf_counter() - listed_started
        listed_keys = {f"{e['namespace']}/{e['name']}" for e in listed}
        missing = {p.key for p in pods} - listed_keys
        if missing or len(listed) != count or len({e["ipv4"] for e in listed}) != count:
            raise AssertionError(f"endpoint list is incomplete: {len(listed)}, missing {missing}")
        identities = len({e["identity"] for e in listed})
        api_started = time.perf_counter()
        api_listed = api(agent).get("/v1/endpoints")["endpoints"]
        api_list_seconds = time.perf_counter() - api_started
        if len(api_listed) != count:
            raise AssertionError(f"GET /v1/endpoints returned {len(api_listed)} endpoints")

        # A policy change with every endpoint present: one back deployment may reach back pods.
        deploy_index = (count // 2) // 10 + (count - count // 2) // 20
        deploy, mover = f"d{deploy_index:02d}", pods[deploy_index * 10]
        targets = [p for p in back if p is not mover][:: max(1, len(back) // 8)]
        extra = cnp("extra", ns, {"tier": "back"}, [rule_from_endpoints({"deploy": deploy})])
        add, remove = Change("add 1 rule"), Change("delete that rule")
        denied = [(source_of(mover), t, False) for t in targets]
        for rep in range(reps):
            with profile(agent, f"scale-policy-{count}", enabled=rep == 0):
                timed_change(add, agent, lambda: import_policy(agent, extra),
                             denied, flip(denied))  # fmt: skip
            timed_change(remove, agent, lambda: delete_policy(agent, ns, "extra"),
                         flip(denied), denied)  # fmt: skip

        tests = None
        if run_tests:
            t0 = time.perf_counter()
            result = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                 "tests/integration/test_endpoint_plumbing.py"],
                cwd=REPO, capture_output=True, text=True, timeout=600,
            )  # fmt: skip
            last = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
            tests = {
                "command": "pytest -q tests/integration/test_endpoint_plumbing.py",
                "exit_code": result.returncode,
                "summary": last,
                "seconds": round(time.perf_counter() - t0, 1),
            }
            require(probe(sample_cases()), "after the test suite ran beside them")

        footprint = bpf_footprint(agent)
        rss = agent.memory_kib()
        deletes = []
        for pod in pods[-20:]:
            deletes.append(delete_endpoint(agent, pod))
        return {
            "endpoints": count,
            "identities": identities,
            "add_total_s": round(total, 2),
            "add": stats_ms(adds),
            "add_trend": trend(adds, 50),
            "add_ms": [ms(t) for t in adds],
            "adds_over_1s": slow_adds,
            "reachability_sampled": len(reach),
            "endpoint_list_cli_s": round(list_seconds, 3),
            "endpoint_list_api_s": round(api_list_seconds, 3),
            "policy_change": [add.summary(), remove.summary()],
            "pytest_while_present": tests,
            "memory": rss,
            "bpf": footprint,
            "delete_20_of_them": stats_ms(deletes),
        }
