"""Network sysctls of the namespace the calling thread is in.

The kernel resolves /proc/sys/net against the network namespace of the task that opens the
file, so after `inside(ns)` these read and write `ns`'s values: no `sysctl` or `ip netns
exec` process to fork, and no /sys remount.
"""

from __future__ import annotations

import os


def _file(key: str) -> str:
    """The /proc/sys file of a dotted key such as net.ipv4.conf.all.rp_filter. Device
    names containing dots (VLANs) are not supported: sysctl writes those with "/", and we
    never create them."""
    return "/proc/sys/" + key.replace(".", "/")


def read_sysctl(key: str) -> str:
    with open(_file(key)) as f:
        return f.read().strip()


def write_sysctl(key: str, value: str | int) -> None:
    """Set `key` unless it already has `value`: a re-run (an agent restart) then writes
    nothing, and nothing watching for changes sees one."""
    if read_sysctl(key) != str(value):
        with open(_file(key), "w") as f:
            f.write(str(value))


def disable_ipv6(*devices: str) -> None:
    """Turn IPv6 off on `devices` ("all" and "default" included): no link-local address,
    DAD or router solicitations. Set it before a device comes up and it never gets any.
    A kernel without IPv6 has nothing to turn off."""
    if not os.path.isdir("/proc/sys/net/ipv6"):
        return
    for dev in devices:
        write_sysctl(f"net.ipv6.conf.{dev}.disable_ipv6", 1)


# A pod's or the node's side of a pod link: IPv6 on, but no router advertisements taken,
# no addresses made up from them, and addresses usable at once (no duplicate address
# detection: the agent hands out every address on these links itself).
_QUIET_IPV6 = {"disable_ipv6": 0, "accept_ra": 0, "autoconf": 0, "accept_dad": 0}


def enable_ipv6(*devices: str) -> None:
    """Turn IPv6 on for `devices` ("all" and "default" included), quietly (see above).
    Set it before a device comes up."""
    for dev in devices:
        for key, value in _QUIET_IPV6.items():
            write_sysctl(f"net.ipv6.conf.{dev}.{key}", value)
