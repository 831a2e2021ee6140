"""The feature probe against the running kernel: truthful answers on any kernel the README
supports (what every one of them has is supported; what varies is checked against evidence
of its own: the kernel version for tcx, the kprobe interfaces for kprobes, the active LSMs
for BPF LSM), every refusal saying why, every probe cleaned up whether it succeeds or
fails, and `supports()` answering from a cache after the first probe."""

from __future__ import annotations

import errno
import json
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest

from membrane import netns
from membrane.bpf import AttachError, probe
from membrane.bpf import _libbpf as L
from membrane.bpf.fs import cgroup2_root
from membrane.bpf.probe import Feature, feature_names, probe_features, supports

pytestmark = pytest.mark.root

# What every kernel the README supports (5.15 and later, as distributions build them) has.
EVERYWHERE = {
    "xdp_native", "xdp_generic", "clsact", "cgroup_connect4", "cgroup_skb", "tracepoint",
    "raw_tp", "tp_btf", "uprobe", "perf_event", "iter_task", "map_ringbuf", "map_lpm_trie",
    "map_lru_hash", "map_percpu_array", "map_stack_trace", "helper_send_signal",
    "helper_get_stack",
}  # fmt: skip
# What depends on how the kernel was built and booted (kprobes not built, lockdown, ...),
# or on its version (task-local storage from tracepoint programs); SOCK_DESTROY on
# CONFIG_INET_DIAG_DESTROY.
VARIES = {"tcx", "kprobe", "fentry", "fexit", "lsm", "helper_task_storage", "sock_destroy"}


def kernel_version() -> tuple[int, int]:
    major, minor = platform.release().split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def kprobes_offered() -> bool:
    """The kernel has a way to make kprobes: the perf PMU or the tracefs interface."""
    return os.path.isdir("/sys/bus/event_source/devices/kprobe") or any(
        os.path.exists(f"{tracefs}/kprobe_events")
        for tracefs in ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
    )


def active_lsms() -> list[str] | None:
    try:
        with open("/sys/kernel/security/lsm") as f:
            return f.read().strip().split(",")
    except OSError:
        return None  # securityfs not mounted: no evidence either way


def by_name(features: list[Feature]) -> dict[str, Feature]:
    return {f.name: f for f in features}


@pytest.fixture(scope="module")
def features() -> dict[str, Feature]:
    return by_name(probe_features())


def leftovers() -> dict[str, list[str]]:
    """What a probe could leave behind: namespaces, cgroups and loaded probe programs."""
    programs = json.loads(
        subprocess.run(
            [shutil.which("bpftool") or "bpftool", "-j", "prog", "show"],
            capture_output=True,
            check=True,
        ).stdout
    )
    return {
        "netns": [n for n in netns.names() if n.startswith("membrane-probe-")],
        "cgroups": [
            p.name for p in cgroup2_root().iterdir() if p.name.startswith("membrane-probe-")
        ],
        "programs": [p["name"] for p in programs if p.get("name", "").startswith("probe_")],
    }


def assert_nothing_left() -> None:
    """Programs are freed after their last reference drops, a little later: wait for it."""
    deadline = time.monotonic() + 10
    while any(leftovers().values()):
        if time.monotonic() > deadline:
            raise AssertionError(f"the probe left behind: {leftovers()}")
        time.sleep(0.01)


def test_every_feature_is_reported_once(features: dict[str, Feature]) -> None:
    assert list(features) == feature_names()
    assert {f.category for f in features.values()} == {
        "network",
        "cgroup",
        "tracing",
        "map",
        "helper",
    }


def test_reports_this_kernel_truthfully(features: dict[str, Feature]) -> None:
    assert set(features) == EVERYWHERE | VARIES
    assert {name for name in EVERYWHERE if not features[name].supported} == set()
    assert features["tcx"].supported == (kernel_version() >= (6, 6))
    if not kprobes_offered():
        assert not features["kprobe"].supported
    lsms = active_lsms()
    if features["lsm"].supported and lsms is not None:
        assert "bpf" in lsms


def test_refusals_say_why(features: dict[str, Feature]) -> None:
    for f in features.values():
        if not f.supported:
            assert f.detail.startswith(("load failed: ", "attach failed: ")), f


def test_supported_features_did_the_real_thing(features: dict[str, Feature]) -> None:
    tasks = int(features["iter_task"].detail.split()[2])  # "iterated over N tasks"
    assert tasks > 1
    assert "libc.so" in features["uprobe"].detail
    if features["tcx"].supported:
        assert features["tcx"].detail.endswith("as a tcx link")  # not the clsact fallback


def test_probing_leaves_nothing_behind(features: dict[str, Feature]) -> None:
    assert features  # the module fixture has probed everything once already
    assert_nothing_left()


@pytest.fixture
def fresh_cache() -> Iterator[None]:
    probe._group_results.cache_clear()
    yield
    probe._group_results.cache_clear()


def test_a_failure_after_attach_still_detaches(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(_link_fd: int) -> int:
        return -errno.EIO

    # The iterator's link is attached when creating the iterator fails.
    monkeypatch.setattr(L.lib, "bpf_iter_create", refuse)
    iterator = by_name(probe_features())["iter_task"]
    assert not iterator.supported
    assert iterator.detail == "attach failed: Input/output error"
    assert_nothing_left()


def test_a_failing_network_probe_is_isolated_and_cleaned_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AttachError("injected", errno.EIO)

    monkeypatch.setattr(probe, "attach_tc", refuse)
    got = by_name(probe_features())
    assert not got["tcx"].supported and not got["clsact"].supported
    assert got["tcx"].detail == "attach failed: Input/output error"
    assert got["xdp_native"].supported and got["xdp_generic"].supported
    assert_nothing_left()


def test_a_failed_setup_reports_every_feature_of_its_group(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_veth(*_args: object) -> None:
        raise OSError(errno.ENOSPC, "injected")

    monkeypatch.setattr(probe.netns, "add_veth", no_veth)
    got = [f for f in probe_features() if f.category == "network"]
    assert [f.name for f in got] == ["xdp_native", "xdp_generic", "tcx", "clsact", "sock_destroy"]
    assert all(not f.supported and f.detail.startswith("probe setup failed") for f in got)
    assert_nothing_left()  # the namespace made before the failure is gone


def test_supports_probes_once_then_answers_from_cache(
    fresh_cache: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert supports("tracepoint") is True
    fentry = supports("fentry")

    def no_more_probing(*_args: object) -> None:
        raise AssertionError("probed again")

    monkeypatch.setattr(probe.BpfObject, "open", no_more_probing)
    assert supports("tracepoint") is True
    assert supports("fentry") is fentry
    assert isinstance(supports("lsm"), bool)  # the same group: answered from the cache
    with pytest.raises(KeyError, match="tracepoint"):
        supports("no_such_feature")
