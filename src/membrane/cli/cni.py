"""`membrane cni`: the CNI plugin for container runtimes (podman, containerd, CRI-O)."""

from __future__ import annotations

import typer

from membrane.api.client import socket_path
from membrane.choices import check_choice
from membrane.cli.api_options import API_SOCKET, OUTPUT
from membrane.cli.commands import typer_app
from membrane.cli.output import print_json
from membrane.cni import install as cni_install

app = typer_app("cni", no_args_is_help=True)

NAME = typer.Option(cni_install.DEFAULT_NAME, "--name", help="The CNI network's name.")
CONF_DIR = typer.Option(
    cni_install.DEFAULT_CONF_DIR, "--conf-dir", help="Where runtimes read network configs."
)
BIN_DIR = typer.Option(
    list(cni_install.DEFAULT_BIN_DIRS),
    "--bin-dir",
    help="Where runtimes look for plugins (repeatable).",
)


@app.command(
    "install",
    epilog="Example:\n\n  membrane cni install --name membrane\n\n"
    "  podman run --network-backend cni --network membrane --label app=web IMAGE",
)
def install(
    name: str = NAME,
    api_socket: str = API_SOCKET,
    conf_dir: str = CONF_DIR,
    bin_dir: list[str] = BIN_DIR,
    podman_root: str = typer.Option(
        None,
        "--podman-root",
        help="podman's storage root (--root) whose database holds the containers' labels "
        "(default /var/lib/containers/storage).",
        show_default=False,
    ),
    output: str = OUTPUT,
) -> None:
    """Write the network config NAME.conflist (the membrane-cni plugin, pointed at the
    agent's socket) and install the plugin executable (one static file, built by `make`)."""
    check_choice(output, ("table", "json"), "--output")
    done = cni_install.install(name, socket_path(api_socket), conf_dir, bin_dir, podman_root)
    if output == "json":
        print_json(done)
    else:
        typer.echo(f"network {name}: {done['config']}; plugin {', '.join(done['plugins'])}")


@app.command("uninstall", epilog="Example:\n\n  membrane cni uninstall --name membrane")
def uninstall(
    name: str = NAME,
    conf_dir: str = CONF_DIR,
    bin_dir: list[str] = BIN_DIR,
    output: str = OUTPUT,
) -> None:
    """Remove the network config NAME.conflist, and the plugin executable once no network
    config in the directory uses it."""
    check_choice(output, ("table", "json"), "--output")
    done = cni_install.uninstall(name, conf_dir, bin_dir)
    if output == "json":
        print_json(done)
    else:
        typer.echo(f"network {name}: removed {', '.join(done['removed']) or 'nothing'}")
