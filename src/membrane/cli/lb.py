"""`membrane lb`: a standalone XDP L4 load balancer (Katran class) with Maglev and DSR."""

from __future__ import annotations

import sys
from typing import Any

import typer

from membrane.choices import check_choice
from membrane.cli.commands import typer_app
from membrane.cli.output import print_json, print_table
from membrane.filter.rules import protocol_name

app = typer_app("lb", no_args_is_help=True)
vip_app = typer.Typer(
    name="vip", help="Add and delete VIPs (ADDR:PORT/PROTO).", no_args_is_help=True
)
backend_app = typer.Typer(
    name="backend", help="Add, re-weight and delete a VIP's backends.", no_args_is_help=True
)
app.add_typer(vip_app)
app.add_typer(backend_app)

OUTPUT = typer.Option("table", "-o", "--output", help="table or json.")
VIP = typer.Argument(..., help="ADDR:PORT/PROTO, e.g. 198.19.0.10:80/tcp or [2001:db8::10]:80/tcp.")


def _manager() -> Any:
    from membrane.lb.manager import LbManager

    return LbManager()


def _output(value: str) -> str:
    return check_choice(value, ("table", "json"), "--output")


@app.command(
    "attach",
    epilog="Examples:\n\n  membrane lb attach eth0\n\n"
    "  membrane lb attach eth0 --netns lb --source 198.19.0.2",
)
def attach(
    dev: str = typer.Argument(..., help="Device the VIP traffic arrives on."),
    netns: str = typer.Option(None, "--netns", help="Network namespace of the device."),
    mode: str = typer.Option(
        "auto", "--mode", help="XDP mode: auto (generic on veth), native, generic."
    ),
    source: list[str] = typer.Option(
        [],
        "--source",
        help="Outer source address of encapsulated packets (one per family; default: "
        "the device's first address).",
    ),
) -> None:
    """Attach the load balancer's XDP program to DEV."""
    from membrane.lb.frontend import parse_source

    mode = check_choice(mode, ("auto", "native", "generic"), "--mode")
    sources = [parse_source(s) for s in source]
    mgr = _manager()
    with mgr.locked():
        att = mgr.attach(dev, netns, mode, sources)
    where = f" (netns {att.netns})" if att.netns else ""
    srcs = ", ".join(str(s) for s in (att.source4, att.source6) if s)
    typer.echo(f"load balancer attached to {att.device}{where}: xdp {att.xdp_mode}, source {srcs}")
    _warn_forwarding(att)


def _warn_forwarding(att: Any) -> None:
    """The program asks the kernel's FIB for the next hop as a router would: with
    forwarding off on the device, the lookup refuses and VIP packets are dropped."""
    from membrane.filter.manager import in_netns
    from membrane.netns.sysctl import read_sysctl

    with in_netns(att.netns):
        for family, src in (("ipv4", att.source4), ("ipv6", att.source6)):
            key = f"net.{family}.conf.{att.device}.forwarding"
            if src is not None and read_sysctl(key) == "0":
                print(
                    f"membrane: note: {key} is 0: turn it on, or VIPs of this "
                    "family cannot be forwarded",
                    file=sys.stderr,
                )


@app.command("detach")
def detach() -> None:
    """Detach the load balancer and remove its VIPs, backends and counters."""
    mgr = _manager()
    with mgr.locked():
        att = mgr.detach()
    typer.echo(f"load balancer detached from {att.device or f'ifindex {att.ifindex}'}")


@vip_app.command(
    "add", epilog="Example:\n\n  membrane lb vip add 198.19.0.10:80/tcp --maglev-size 65537"
)
def vip_add(
    vip: str = VIP,
    maglev_size: int = typer.Option(
        None,
        "--maglev-size",
        help="Maglev table size, a prime (default 16381).",
        show_default=False,
    ),
) -> None:
    """Add a VIP (no backends yet: its packets are dropped until one is added)."""
    from membrane.lb.frontend import Vip, check_table_size

    parsed, size = Vip.parse(vip), check_table_size(maglev_size)
    mgr = _manager()
    with mgr.locked():
        svc = mgr.add_vip(parsed, size)
    typer.echo(f"VIP {svc.vip} added (service {svc.id}, Maglev table of {svc.table_size})")


@vip_app.command("delete")
def vip_delete(vip: str = VIP) -> None:
    """Delete a VIP and its backends (its traffic then passes to the kernel)."""
    from membrane.lb.frontend import Vip

    parsed = Vip.parse(vip)
    mgr = _manager()
    with mgr.locked():
        mgr.delete_vip(parsed)
    typer.echo(f"VIP {parsed} deleted")


@backend_app.command(
    "add",
    epilog="Examples:\n\n  membrane lb backend add 198.19.0.10:80/tcp 198.18.5.2\n\n"
    "  membrane lb backend add 198.19.0.10:80/tcp 198.18.5.3 --weight 2",
)
def backend_add(
    vip: str = VIP,
    addr: str = typer.Argument(..., help="The backend's address (same family as the VIP)."),
    weight: int = typer.Option(1, "--weight", help="Relative share of new flows (1-65535)."),
) -> None:
    """Add a backend to a VIP (or change its weight): a new Maglev table goes live at once."""
    from membrane.lb.frontend import Vip, check_weight, parse_backend

    parsed = Vip.parse(vip)
    address, weight = parse_backend(addr, parsed), check_weight(weight)
    mgr = _manager()
    with mgr.locked():
        backend = mgr.set_backend(parsed, address, weight)
    typer.echo(f"backend {backend.addr} (id {backend.id}, weight {backend.weight}) serves {parsed}")


@backend_app.command("delete")
def backend_delete(
    vip: str = VIP,
    addr: str = typer.Argument(..., help="The backend's address."),
) -> None:
    """Remove a backend; its flows move to the others (only those: Maglev)."""
    from membrane.lb.frontend import Vip, parse_backend

    parsed = Vip.parse(vip)
    address = parse_backend(addr, parsed)
    mgr = _manager()
    with mgr.locked():
        mgr.remove_backend(parsed, address)
    typer.echo(f"backend {address} removed from {parsed}")


def _state(with_stats: bool) -> dict[str, Any]:
    mgr = _manager()
    att = mgr.require()
    tables = att.tables()
    services = tables.services(with_stats=with_stats)
    data: dict[str, Any] = {
        "device": att.device,
        "netns": att.netns,
        "xdp_mode": att.xdp_mode,
        "state": mgr.link_state(att),
        "source4": str(att.source4) if att.source4 else None,
        "source6": str(att.source6) if att.source6 else None,
        "vips": [
            {
                "vip": str(s.vip),
                "address": str(s.vip.addr),
                "port": s.vip.port,
                "protocol": protocol_name(s.vip.protocol),
                "service": s.id,
                "maglev_size": s.table_size,
                "backends": [
                    {
                        "address": str(b.addr),
                        "id": b.id,
                        "weight": b.weight,
                        **({"packets": b.packets, "bytes": b.bytes} if with_stats else {}),
                    }
                    for b in sorted(s.backends, key=lambda b: b.addr)
                ],
            }
            for s in services
        ],
    }
    if with_stats:
        data["totals"] = tables.totals()
    return data


@app.command("list")
def list_lb(output: str = OUTPUT) -> None:
    """The VIPs and their backends."""
    data = _state(with_stats=False)
    if _output(output) == "json":
        print_json(data)
        return
    where = f" (netns {data['netns']})" if data["netns"] else ""
    print(f"{data['device']}{where}: xdp {data['xdp_mode']}, {data['state']}")
    rows = [
        [v["vip"], str(v["maglev_size"]), b["address"], str(b["weight"])]
        for v in data["vips"]
        for b in v["backends"] or [{"address": "-", "weight": "-"}]
    ]
    print_table(["VIP", "MAGLEV", "BACKEND", "WEIGHT"], rows, empty="no VIPs")


@app.command("stats")
def stats(output: str = OUTPUT) -> None:
    """Packets and bytes sent to each backend, and the program's totals."""
    data = _state(with_stats=True)
    if _output(output) == "json":
        print_json(data)
        return
    rows = [
        [v["vip"], b["address"], str(b["packets"]), str(b["bytes"])]
        for v in data["vips"]
        for b in v["backends"]
    ]
    print_table(["VIP", "BACKEND", "PACKETS", "BYTES"], rows, empty="no backends")
    print()
    print_table(
        ["TOTAL", "PACKETS", "BYTES"],
        [[k, str(v["packets"]), str(v["bytes"])] for k, v in data["totals"].items()],
    )


decap_app = typer.Typer(
    name="decap",
    help="On a backend: strip the LB's IP-in-IP header in XDP (where no ipip device can be made).",
    no_args_is_help=True,
)
app.add_typer(decap_app)


@decap_app.command("attach", epilog="Example:\n\n  membrane lb decap attach eth0 --netns backend1")
def decap_attach(
    dev: str = typer.Argument(..., help="The backend's device the LB's packets arrive on."),
    netns: str = typer.Option(None, "--netns", help="Network namespace of the device."),
    mode: str = typer.Option("auto", "--mode", help="XDP mode: auto, native, generic."),
) -> None:
    """Decapsulate IPv4-in-IPv4 and IPv6-in-IPv6 arriving on DEV."""
    from membrane.lb.decap import attach_decap
    from membrane.lb.manager import require_root

    mode = check_choice(mode, ("auto", "native", "generic"), "--mode")
    require_root()
    took = attach_decap(dev, netns, mode)
    typer.echo(f"decapsulation attached to {dev} (xdp {took})")


@decap_app.command("detach")
def decap_detach(
    dev: str = typer.Argument(..., help="The device."),
    netns: str = typer.Option(None, "--netns", help="Network namespace of the device."),
) -> None:
    """Remove the decapsulation program from DEV."""
    from membrane.lb.decap import detach_decap
    from membrane.lb.manager import require_root

    require_root()
    detach_decap(dev, netns)
    typer.echo(f"decapsulation detached from {dev}")


@decap_app.command("stats")
def decap_stats(
    dev: str = typer.Argument(..., help="The device."),
    netns: str = typer.Option(None, "--netns", help="Network namespace of the device."),
    output: str = OUTPUT,
) -> None:
    """Packets decapsulated on DEV, and those passed untouched."""
    from membrane.lb.decap import decap_counts
    from membrane.lb.manager import require_root

    output = _output(output)
    require_root()
    counts = decap_counts(dev, netns)
    if output == "json":
        print_json(counts)
        return
    print_table(["DECAPSULATED", "PASSED"], [[str(counts["decapsulated"]), str(counts["passed"])]])
