"""The control-plane benchmark's summary on stderr: each phase's medians beside the targets."""

from __future__ import annotations

from typing import Any


def summary(r: dict[str, Any]) -> list[str]:
    lines = []

    def verdict(value: float, target: float) -> str:
        return "met" if value < target else "MISSED"

    if p := r.get("policy"):
        lines.append("policy change (API wall time until enforced)      median   p90    max")
        rows = [p["first_policy"], *p["one_rule"]]
        rows += [x for b in p["bulk"] for x in (b["import"], b["delete"])]
        rows += p.get("one_rule_with_bulk", [])
        for row in rows:
            lines.append(
                f"  {row['label']:<48}{row['median_ms']:>7} {row['p90_ms']:>6} {row['max_ms']:>6}"
            )
        one = p["one_rule"][0]["median_ms"]
        lines.append(f"  target 1 rule < 100 ms: {one} ms {verdict(one, 100)}")
        for b in p["bulk"]:
            if b["rules"] == 10000:
                t = b["import"]["median_ms"]
                lines.append(f"  target 10,000 rules < 2 s: {t} ms {verdict(t, 2000)}")
        for b in p["bulk_skipped"]:
            lines.append(
                f"  {b['rules']} rules: not measured, predicted {b['predicted_s']} s "
                f"(> --max-wait {b['max_wait_s']:g})"
            )
        if inc := p.get("one_rule_with_bulk"):
            t = inc[0]["median_ms"]
            lines.append(f"  1 rule, bulk in force: {t} ms {verdict(t, 100)} (1-rule target)")
    if e := r.get("endpoints"):
        lines.append("endpoint add/delete                                 median   p90    max")
        for label, key in (("add 1 (empty node)", "single_add"),
                           ("delete 1", "single_delete"),
                           (f"add {e['row']} in a row", "row_add"),
                           (f"delete those {e['row']}", "row_delete")):  # fmt: skip
            s = e[key]
            lines.append(f"  {label:<48}{s['median_ms']:>7} {s['p90_ms']:>6} {s['max_ms']:>6}")
        trend_text = ", ".join(f"{b['endpoints']}: {b['median_ms']}" for b in e["row_add_trend"])
        lines.append(f"  add trend (median ms): {trend_text}")
        t = e["row_add"]["max_ms"]
        lines.append(f"  target < 150 ms each: max {t} ms {verdict(t, 150)}")
    if s := r.get("scale"):
        lines.append(
            f"scale: {s['endpoints']} endpoints ({s['identities']} identities) in "
            f"{s['add_total_s']} s; add median {s['add']['median_ms']} ms, "
            f"p90 {s['add']['p90_ms']}, max {s['add']['max_ms']}"
        )
        trend_text = ", ".join(f"{b['endpoints']}: {b['median_ms']}" for b in s["add_trend"])
        lines.append(f"  add trend (median ms): {trend_text}")
        pc = s["policy_change"]
        lines.append(
            f"  1-rule change: {pc[0]['median_ms']} ms, delete {pc[1]['median_ms']} ms; "
            f"endpoint list {s['endpoint_list_cli_s']} s (CLI); "
            f"RSS {s['memory']['rss_kib'] // 1024} MiB; "
            f"BPF maps {s['bpf']['maps_memlock_bytes'] >> 20} MiB, {s['bpf']['programs']} programs "
            f"{s['bpf']['programs_memlock_bytes'] >> 20} MiB"
        )
        if t := s["pytest_while_present"]:
            lines.append(f"  pytest beside them: exit {t['exit_code']}, {t['summary']}")
        if slow := s["adds_over_1s"]:
            shown = [f"#{a['index']} {a['ms']:.0f} ms (load {a['loadavg_1m']:.0f})" for a in slow]
            lines.append("  adds over 1 s: " + ", ".join(shown))
    for label, t in r["teardown"].items():
        lines.append(
            f"teardown {label}: {t['destroy_s']} s, then the kernel busy {t['kernel_settle_s']} s "
            f"(peak {t['peak_blocked_tasks']} blocked tasks)"
        )
    lines.append(f"total {r['seconds']} s")
    return lines
