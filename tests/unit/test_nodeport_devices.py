"""Which devices `--devices` names: exact names and shell-style patterns, never lo."""

from membrane.service.nodeport import matching_devices


def test_names_and_patterns_pick_present_devices_but_never_lo() -> None:
    present = ["lo", "eth0", "eth1", "ens3", "lxc1234"]
    assert matching_devices(["eth*"], present) == ["eth0", "eth1"]
    assert matching_devices(["ens3", "wlan0"], present) == ["ens3"]
    assert matching_devices(["*"], present) == ["ens3", "eth0", "eth1", "lxc1234"]
    assert matching_devices([], present) == []
