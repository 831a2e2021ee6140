"""Phase `policy`: 1-rule changes, bulk imports of growing size, and 1-rule changes with the
largest bulk in force; every change checked by first-SYN probes before and right after."""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Any

from bench.control_plane.harness import (
    Case,
    Change,
    Source,
    add_endpoint,
    delete_policy,
    flip,
    import_policy,
    listen,
    running_agent,
    source_of,
    timed_change,
)
from bench.control_plane.measure import Profiler, bpf_footprint, map_entries, ms
from bench.control_plane.policies import (
    BULK_EXTERNAL,
    ONE_EXTERNAL,
    bulk_rules,
    cnp,
    rule_from_cidr,
    rule_from_endpoints,
)
from membrane.testing.pods import add_outside_host

SLOW_S = 10.0  # a change slower than this is measured once, not `--reps` times


def predict(done: Sequence[tuple[int, float]], size: int) -> float | None:
    """Seconds an import of `size` rules would take, extrapolated from the sizes measured so
    far: the growth exponent of the last two (clamped to 1..3), or quadratic from one."""
    if not done:
        return None
    n1, t1 = done[-1]
    exponent = 2.0
    if len(done) >= 2 and done[-2][0] != n1 and done[-2][1] > 0:
        n0, t0 = done[-2]
        exponent = min(3.0, max(1.0, math.log(t1 / t0) / math.log(n1 / n0)))
    return t1 * (size / n1) ** exponent


def phase_policy(
    sizes: Sequence[int], reps: int, bulk_reps: int, max_wait: float, profile: Profiler
) -> dict[str, Any]:
    with running_agent("policy") as agent:
        ns = "bench"
        servers = [add_endpoint(agent, ns, f"server-{i}", {"app": "server"})[0] for i in range(3)]
        client = add_endpoint(agent, ns, "client-ok", {"role": "client"})[0]
        newcomer = add_endpoint(agent, ns, "client-new", {"role": "newcomer"})[0]
        bulk_client = add_endpoint(agent, ns, "client-bulk", {"role": "bulk"})[0]
        ext = add_outside_host(agent, [BULK_EXTERNAL, ONE_EXTERNAL])
        for pod in servers:
            listen(pod)
        ext_bulk = Source(f"outside {BULK_EXTERNAL}", ext.netns, str(BULK_EXTERNAL))
        ext_one = Source(f"outside {ONE_EXTERNAL}", ext.netns, str(ONE_EXTERNAL))

        def cases(src: Source, allowed: bool) -> list[Case]:
            return [(src, s, allowed) for s in servers]

        results: dict[str, Any] = {"rss_after_start": agent.memory_kib()}

        # The first policy: the servers go to default deny; only role=client may connect.
        base = cnp("base", ns, {"app": "server"}, [rule_from_endpoints({"role": "client"})])
        first = Change("first policy: 1 rule, servers go to default deny")
        timed_change(
            first,
            agent,
            lambda: import_policy(agent, base),
            cases(source_of(newcomer), True),
            cases(source_of(client), True) + cases(source_of(newcomer), False),
        )
        results["first_policy"] = first.summary()

        def one_rule_changes(label: str, reps: int, cidr: bool = True) -> list[dict[str, Any]]:
            """Add and delete one rule, with an endpoint selector and with a CIDR peer."""
            variants = [("endpoint selector", "one", rule_from_endpoints({"role": "newcomer"}),
                         source_of(newcomer))]  # fmt: skip
            if cidr:
                variants.append(("CIDR peer", "one-cidr", rule_from_cidr(ONE_EXTERNAL), ext_one))
            out = []
            for kind, name, rule, src in variants:
                text = cnp(name, ns, {"app": "server"}, [rule])
                add = Change(f"{label}: add 1 rule ({kind})")
                remove = Change(f"{label}: delete that rule ({kind})")
                for _ in range(reps):
                    timed_change(
                        add,
                        agent,
                        lambda text=text: import_policy(agent, text),
                        cases(src, False),
                        cases(src, True),
                    )
                    timed_change(
                        remove,
                        agent,
                        lambda name=name: delete_policy(agent, ns, name),
                        cases(src, True),
                        cases(src, False),
                    )
                out += [add.summary(), remove.summary()]
            return out

        results["one_rule"] = one_rule_changes("no other rules", reps)

        # Bulk imports: each verified by probes (its last rule and its CIDR rule) and by the
        # number of entries in the policy map.
        probed = cases(source_of(bulk_client), True) + cases(ext_bulk, True)
        bulks: dict[int, tuple[Change, Change, dict[str, Any]]] = {}
        done: list[tuple[int, float]] = []
        skipped = []

        def bulk_once(size: int, text: str, step: str | None) -> None:
            add, _, facts = bulks[size]
            with profile(agent, step or "", enabled=step is not None):
                timed_change(add, agent, lambda: import_policy(agent, text),
                             flip(probed), probed)  # fmt: skip
            entries = map_entries(agent, "policy")
            want = len(servers) * (size + 1)  # one entry per rule and server, + base
            if entries != want:
                raise AssertionError(f"policy map holds {entries} entries, expected {want}")
            facts.update(
                policy_map_entries=entries,
                ipcache_entries=map_entries(agent, "ipcache"),
                rss_with_rules=agent.memory_kib(),
            )

        def bulk_delete(size: int) -> None:
            timed_change(bulks[size][1], agent, lambda: delete_policy(agent, ns, "bulk"),
                         probed, flip(probed))  # fmt: skip

        texts = {}
        in_force: list[int] = []  # the bulk size in force, if any

        def clear() -> None:
            while in_force:
                bulk_delete(in_force.pop())

        for size in sizes:
            guess = predict(done, size)
            if max_wait > 0 and guess is not None and guess > max_wait:
                skipped.append({"rules": size, "predicted_s": round(guess), "max_wait_s": max_wait})
                print(f"   {size} rules: skipped (predicted {guess:.0f} s)", file=sys.stderr)
                continue
            clear()
            texts[size] = cnp("bulk", ns, {"app": "server"}, bulk_rules(size))
            facts = {"rules": size, "yaml_bytes": len(texts[size])}
            bulks[size] = (Change(f"import {size} rules"), Change(f"delete {size} rules"), facts)
            for rep in range(bulk_reps):
                bulk_once(size, texts[size], f"policy-import-{size}" if rep == 0 else None)
                in_force.append(size)
                if bulks[size][0].seconds[0] > SLOW_S:
                    break  # slow: one sample, and it stays for the incremental case
                clear()
            done.append((size, bulks[size][0].seconds[0]))
            print(
                f"   {size} rules: import {ms(bulks[size][0].seconds[0])} ms",
                file=sys.stderr,
            )

        if done:  # 1-rule changes with the largest bulk in force
            size, took = done[-1]
            if in_force != [size]:
                clear()
                bulk_once(size, texts[size], None)
                in_force.append(size)
            slow = took > SLOW_S
            with profile(agent, f"policy-incremental-{size}"):
                results["one_rule_with_bulk"] = one_rule_changes(
                    f"with {size} rules in force", 1 if slow else reps, cidr=not slow
                )
            results["bpf_with_bulk"] = bpf_footprint(agent)
            clear()
        results["bulk"] = [
            {**facts, "import": add.summary(), "delete": remove.summary()}
            for add, remove, facts in bulks.values()
        ]
        results["bulk_skipped"] = skipped
        results["rss_at_end"] = agent.memory_kib()
        return results
