"""`membrane filter`: packet filters from the seed documents, as a pinned, live tool."""

from __future__ import annotations

import json
from typing import Any

import typer

from membrane.bpf.links import TC_MODES
from membrane.choices import check_choice
from membrane.cli.commands import typer_app
from membrane.cli.output import print_json, print_table
from membrane.errors import UserError
from membrane.filter.manager import HOOKS, XDP_MODE_NAMES, Attachment, FilterManager
from membrane.filter.rules import (
    AllowedFlow,
    parse_cidrs,
    parse_protocol,
    protocol_name,
    read_cidr_file,
)

app = typer_app("filter", no_args_is_help=True)

NETNS = typer.Option(None, "--netns", help="Network namespace of the device (/run/netns/NAME).")
DEV = typer.Option(..., "--dev", "-d", help="Network device to filter on.")
MODE = typer.Option(
    "auto",
    "--mode",
    help="XDP mode: auto (generic on veth, where native "
    "XDP disables TSO; else native if the driver has "
    "it), native, generic.",
)
OUTPUT = typer.Option("table", "-o", "--output", help="table or json.")


def _mode(value: str) -> str:
    return check_choice(value, ("auto", "native", "generic"), "--mode")


def _summary(mgr: FilterManager, att: Attachment) -> None:
    mode = f" {XDP_MODE_NAMES.get(att.meta.xdp_mode, '')}" if att.hook == "xdp" else ""
    where = f" (netns {att.netns})" if att.netns else ""
    kinds = mgr.rule_counts(att)
    text = ", ".join(f"{n} {k}" for k, n in kinds.items()) or "no rules"
    typer.echo(f"{att.device}{where}: {att.hook}{mode} filter with {text}")


TBL8_GROUPS = typer.Option(
    None,
    "--tbl8-groups",
    help="When the list is first made: how many /24s may hold prefixes longer "
    "than /24 (1 KiB of kernel memory each; default 8192).",
    show_default=False,
)


def _prefix_list(
    direction: str,
    cidrs: list[str] | None,
    dev: str,
    add: list[str],
    remove: list[str],
    from_file: str | None,
    netns: str | None,
    mode: str,
    groups: int | None,
) -> None:
    """drop-dst and drop-src: one list each, the same commands."""
    mode = _mode(mode)
    nets_add = parse_cidrs(list(cidrs or []), "CIDR") + parse_cidrs(list(add), "--add")
    if from_file:
        nets_add += parse_cidrs(read_cidr_file(from_file, "--from-file"), "--from-file")
    nets_add = list(dict.fromkeys(nets_add))
    nets_remove = parse_cidrs(list(remove), "--remove")
    if not nets_add and not nets_remove:
        raise UserError("CIDR", "give at least one prefix to drop (or --remove PREFIX)")
    if overlap := set(nets_add) & set(nets_remove):
        raise UserError("--remove", f"{sorted(map(str, overlap))[0]} is both added and removed")
    mgr = FilterManager()
    with mgr.locked():
        # Check the removals, add, then remove: a refused command changes nothing, and every
        # intermediate list drops at least what the old and the new list drop.
        if nets_remove:
            mgr.remove_prefixes(netns, dev, nets_remove, direction, check_only=True)
        att = (
            mgr.add_prefixes(netns, dev, nets_add, direction, mode, groups)
            if nets_add
            else mgr.find(netns, dev, "xdp")
        )
        if nets_remove:
            mgr.remove_prefixes(netns, dev, nets_remove, direction)
        if att:
            _summary(mgr, att)


@app.command(
    "drop-dst",
    epilog="Examples:\n\n  membrane filter drop-dst --dev eth0 192.168.0.1\n\n"
    "  membrane filter drop-dst --dev eth0 --add 2001:db8::/32\n\n"
    "  membrane filter drop-dst --dev eth0 --remove 192.168.0.1",
)
def drop_dst(
    cidrs: list[str] = typer.Argument(
        None, help="Prefixes to drop (IPv4 or IPv6).", show_default=False
    ),
    dev: str = DEV,
    add: list[str] = typer.Option([], "--add", help="Add a prefix to the deny list."),
    remove: list[str] = typer.Option([], "--remove", help="Remove a prefix from the list."),
    from_file: str = typer.Option(None, "--from-file", help="Read prefixes, one per line."),
    netns: str = NETNS,
    mode: str = MODE,
    groups: int = TBL8_GROUPS,
) -> None:
    """Drop packets whose destination is in a deny list of prefixes (XDP, longest match)."""
    _prefix_list("dst", cidrs, dev, add, remove, from_file, netns, mode, groups)


@app.command(
    "drop-src",
    epilog="Examples:\n\n  membrane filter drop-src --dev eth0 198.18.66.0/24\n\n"
    "  membrane filter drop-src --dev eth0 --add 2001:db8:bad::/48\n\n"
    "  membrane filter drop-src --dev eth0 --remove 198.18.66.0/24",
)
def drop_src(
    cidrs: list[str] = typer.Argument(
        None, help="Source prefixes to drop (IPv4 or IPv6).", show_default=False
    ),
    dev: str = DEV,
    add: list[str] = typer.Option([], "--add", help="Add a prefix to the source deny list."),
    remove: list[str] = typer.Option([], "--remove", help="Remove a prefix from the list."),
    from_file: str = typer.Option(None, "--from-file", help="Read prefixes, one per line."),
    netns: str = NETNS,
    mode: str = MODE,
    groups: int = TBL8_GROUPS,
) -> None:
    """Drop packets whose source is in a deny list of prefixes (XDP, longest match)."""
    _prefix_list("src", cidrs, dev, add, remove, from_file, netns, mode, groups)


PPS = typer.Option(None, "--pps", help="Packets per second a bucket refills.", show_default=False)
BUCKETS = typer.Option(
    None,
    "--buckets",
    help="Size of the LRU map of buckets (default 65536; bounds kernel memory under "
    "spoofed floods). Changed only while the guard is off.",
    show_default=False,
)


def _guard(
    guard: str,
    dev: str,
    pps: int | None,
    burst: int | None,
    remove: bool,
    netns: str | None,
    mode: str,
    buckets: int | None,
    prefix_len4: int = 32,
    prefix_len6: int = 128,
) -> None:
    mode = _mode(mode)
    mgr = FilterManager()
    with mgr.locked():
        if remove:
            mgr.remove_guard(netns, dev, guard)
            att = mgr.find(netns, dev, "xdp")
        else:
            if pps is None:
                raise UserError("--pps", "give the rate in packets per second (or --remove)")
            burst = pps if burst is None else burst
            att = mgr.set_guard(
                netns, dev, guard, pps, burst, prefix_len4, prefix_len6, buckets, mode
            )
        if att:
            _summary(mgr, att)


@app.command(
    "rate-limit",
    epilog="Examples:\n\n  membrane filter rate-limit --dev eth0 --pps 1000 --burst 100\n\n"
    "  membrane filter rate-limit --dev eth0 --pps 10000 --prefix-len 24 --prefix-len6 64\n\n"
    "  membrane filter rate-limit --dev eth0 --remove",
)
def rate_limit(
    dev: str = DEV,
    pps: int = PPS,
    burst: int = typer.Option(None, "--burst", help="Bucket size in packets (default: --pps)."),
    prefix_len4: int = typer.Option(32, "--prefix-len", help="IPv4 sources sharing a bucket."),
    prefix_len6: int = typer.Option(128, "--prefix-len6", help="IPv6 sources sharing a bucket."),
    buckets: int = BUCKETS,
    remove: bool = typer.Option(False, "--remove", help="Turn the rate limit off."),
    netns: str = NETNS,
    mode: str = MODE,
) -> None:
    """Limit each source address (or source prefix) to --pps packets per second with bursts
    of --burst (XDP token bucket); run again to change it live."""
    _guard("rate-limit", dev, pps, burst, remove, netns, mode, buckets, prefix_len4, prefix_len6)


@app.command(
    "syn-guard",
    epilog="Examples:\n\n  membrane filter syn-guard --dev eth0 --pps 2000 --burst 200\n\n"
    "  membrane filter syn-guard --dev eth0 --remove",
)
def syn_guard(
    dev: str = DEV,
    pps: int = PPS,
    burst: int = typer.Option(None, "--burst", help="Bucket size in SYNs (default: --pps)."),
    buckets: int = BUCKETS,
    remove: bool = typer.Option(False, "--remove", help="Turn the SYN guard off."),
    netns: str = NETNS,
    mode: str = MODE,
) -> None:
    """Limit TCP SYNs (without ACK) to each destination address and port to --pps per second
    with bursts of --burst (XDP token bucket); run again to change it live."""
    _guard("syn-guard", dev, pps, burst, remove, netns, mode, buckets)


@app.command(
    "drop-proto",
    epilog="Examples:\n\n  membrane filter drop-proto --dev eth0 tcp\n\n"
    "  membrane filter drop-proto --dev eth0 --remove tcp",
)
def drop_proto(
    protocols: list[str] = typer.Argument(
        None, help="tcp, udp, icmp, icmpv6, sctp, ... or a protocol number.", show_default=False
    ),
    dev: str = DEV,
    remove: list[str] = typer.Option([], "--remove", help="Stop dropping this protocol."),
    netns: str = NETNS,
    mode: str = MODE,
) -> None:
    """Drop every packet of the given IP protocols (XDP)."""
    mode = _mode(mode)
    add = [parse_protocol(p, f"PROTOCOL[{i}]") for i, p in enumerate(protocols or [])]
    rem = [parse_protocol(p, "--remove") for p in remove]
    if not add and not rem:
        raise UserError("PROTOCOL", "give at least one protocol to drop (or --remove PROTO)")
    if overlap := set(add) & set(rem):
        raise UserError("--remove", f"{protocol_name(min(overlap))} is both dropped and removed")
    mgr = FilterManager()
    with mgr.locked():
        # As in drop-dst: check, add, then remove.
        if rem:
            mgr.remove_drop_proto(netns, dev, rem, check_only=True)
        att = mgr.add_drop_proto(netns, dev, add, mode) if add else mgr.find(netns, dev, "xdp")
        if rem:
            mgr.remove_drop_proto(netns, dev, rem)
        if att:
            _summary(mgr, att)


@app.command(
    "allow-only",
    epilog="Example (only 198.18.0.1 may reach 198.18.0.2 on TCP 80):"
    "\n\n  membrane filter allow-only --dev eth0 --src 198.18.0.1 "
    "--dst 198.18.0.2 --dport 80",
)
def allow_only(
    dev: str = DEV,
    src: str = typer.Option(..., "--src", help="Source address of the allowed flow."),
    dst: str = typer.Option(..., "--dst", help="Destination address of the allowed flow."),
    dport: str = typer.Option(..., "--dport", help="Destination port (1-65535)."),
    proto: str = typer.Option("tcp", "--proto", help="tcp, udp or sctp."),
    direction: str = typer.Option("ingress", "--direction", help="ingress or egress."),
    remove: bool = typer.Option(False, "--remove", help="Remove this allowed flow."),
    attach: str = typer.Option(
        "auto",
        "--attach",
        help="How the filter attaches: auto (tcx where the kernel has it, kernel >= 6.6; "
        "else tc clsact), tcx or clsact.",
    ),
    netns: str = NETNS,
) -> None:
    """Among packets to a port, let only the given flow through (tc); other traffic to the
    port is dropped, everything else passes. Repeat to allow more flows."""
    direction = check_choice(direction, ("ingress", "egress"), "--direction")
    attach = check_choice(attach, TC_MODES, "--attach")
    flow = AllowedFlow.parse(src, dst, dport, proto)
    mgr = FilterManager()
    with mgr.locked():
        if remove:
            mgr.remove_allow_flow(netns, dev, flow, direction)
            att = mgr.find(netns, dev, f"tc-{direction}")
        else:
            att = mgr.add_allow_flow(netns, dev, flow, direction, attach)
        if att:
            _summary(mgr, att)


def _collect(
    netns: str | None, dev: str | None, output: str, with_stats: bool
) -> list[dict[str, Any]] | None:
    """The selected attachments as dicts; printed as JSON (and None returned) for -o json."""
    output = check_choice(output, ("table", "json"), "--output")
    mgr = FilterManager()
    data = [_attachment_dict(mgr, a, with_stats) for a in mgr.attachments(netns=netns, device=dev)]
    if output == "json":
        print_json(data)
        return None
    return data


def _attachment_dict(mgr: FilterManager, att: Attachment, with_stats: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "device": att.device,
        "netns": att.netns,
        "hook": att.hook,
        "state": mgr.link_state(att),
        "ifindex": att.meta.ifindex,
        "instance": att.meta.instance,
    }
    if att.hook == "xdp":
        out["mode"] = XDP_MODE_NAMES.get(att.meta.xdp_mode)
    rules = mgr.rules(att, with_stats=with_stats)
    out["rules"] = [
        {
            "id": r.id,
            "kind": r.kind,
            "rule": r.text,
            **({"settings": r.settings} if r.settings else {}),
            **({"packets": r.packets, "bytes": r.bytes} if with_stats else {}),
        }
        for r in rules
    ]
    if with_stats:
        out["totals"] = mgr.totals(att)
    return out


@app.command("list")
def list_filters(
    dev: str = typer.Option(None, "--dev", "-d", help="Only this device."),
    netns: str = NETNS,
    output: str = OUTPUT,
) -> None:
    """What is attached where, with its rules."""
    data = _collect(netns, dev, output, with_stats=False)
    if data is None:
        return
    rows = []
    for a in data:
        hook = a["hook"] + (f" ({a['mode']})" if a.get("mode") else "")
        where = a["netns"] or "-"
        if not a["rules"]:
            rows.append([a["device"], where, hook, a["state"], "", "", "(no rules)"])
        for r in a["rules"]:
            rows.append([a["device"], where, hook, a["state"], str(r["id"]), r["kind"], r["rule"]])
    print_table(
        ["DEVICE", "NETNS", "HOOK", "STATE", "ID", "KIND", "RULE"],
        rows,
        empty="no filters attached",
    )


@app.command("stats")
def stats(
    dev: str = typer.Option(None, "--dev", "-d", help="Only this device."),
    netns: str = NETNS,
    output: str = OUTPUT,
) -> None:
    """Packets and bytes per rule (summed over CPUs), and per filter."""
    data = _collect(netns, dev, output, with_stats=True)
    if data is None:
        return
    rows = []
    for a in data:
        for r in a["rules"]:
            rows.append(
                [
                    a["device"],
                    a["hook"],
                    str(r["id"]),
                    r["kind"],
                    r["rule"],
                    str(r["packets"]),
                    str(r["bytes"]),
                ]
            )
        t = a["totals"]
        rows.append(
            [
                a["device"],
                a["hook"],
                "",
                "total",
                f"passed {t['passed']['packets']}, "
                f"dropped {t['dropped']['packets']}, unparsed {t['unparsed']['packets']}",
                str(t["seen"]["packets"]),
                str(t["seen"]["bytes"]),
            ]
        )
    print_table(
        ["DEVICE", "HOOK", "ID", "KIND", "RULE", "PACKETS", "BYTES"],
        rows,
        empty="no filters attached",
    )


@app.command("events", epilog="Example:\n\n  membrane filter events --follow -o json")
def events(
    follow: bool = typer.Option(
        False, "--follow", "-f", help="Keep printing new drops until Ctrl-C."
    ),
    output: str = typer.Option(
        "table", "-o", "--output", help="table or json (one object per line)."
    ),
    dev: str = typer.Option(None, "--dev", "-d", help="Only drops on this device."),
    netns: str = NETNS,
) -> None:
    """Drop events: time, device, source, destination, protocol, ports, rule.

    The ring buffer has one reader: events are consumed as they are shown (also those that
    --dev/--netns leave out), and a second reader at the same time sees the rest."""
    from membrane.filter.events import FilterEvents

    output = check_choice(output, ("table", "json"), "--output")
    mgr = FilterManager()
    with FilterEvents(mgr) as stream:
        header_done = False
        for batch in stream.batches(follow=follow):
            for ev in batch:
                if (dev and ev["device"] != dev) or (netns and ev["netns"] != netns):
                    continue
                if output == "json":
                    typer.echo(json.dumps(ev))
                    continue
                if not header_done:
                    typer.echo(FilterEvents.TABLE_HEADER)
                    header_done = True
                typer.echo(FilterEvents.table_line(ev))
        if stream.lost:
            typer.echo(
                f"{stream.lost} events lost since the first filter was attached "
                "(the ring buffer was full; read it with --follow to keep up)",
                err=True,
            )


@app.command(
    "detach",
    epilog="Examples:\n\n  membrane filter detach --dev eth0\n\n  membrane filter detach --all",
)
def detach(
    dev: str = typer.Option(None, "--dev", "-d", help="Device whose filters to remove."),
    hook: str = typer.Option(None, "--hook", help="Only this hook: xdp, tc-ingress, tc-egress."),
    all_: bool = typer.Option(False, "--all", help="Remove every filter on every device."),
    netns: str = NETNS,
) -> None:
    """Remove filters: every pin and link goes, traffic flows unfiltered."""
    if hook is not None:
        hook = check_choice(hook, HOOKS, "--hook")
    if not dev and not all_:
        raise UserError("--dev", "name a device (or use --all)")
    mgr = FilterManager()
    with mgr.locked():
        targets = (
            mgr.attachments() if all_ and not dev else mgr.attachments(netns=netns, device=dev)
        )
        targets = [a for a in targets if hook is None or a.hook == hook]
        if dev and not targets:
            where = f" in netns {netns}" if netns else ""
            raise UserError("--dev", f"{dev}{where} has no {hook or 'filter'} attached")
        for att in targets:
            mgr.detach(att)
            typer.echo(
                f"detached {att.hook} filter from {att.device}"
                + (f" (netns {att.netns})" if att.netns else "")
            )
