"""Attaches, changes and removes `membrane filter` programs; all state lives in bpffs.

Layout under /sys/fs/bpf/membrane/filter/:
    events, events_lost                 ring buffer shared by every filter program
    <scope>/<device>/<hook>/            one attachment: `link` plus its maps
where scope is `host` or `netns-<name>` and hook is xdp, tc-ingress or tc-egress. bpffs
refuses names containing a dot, so names are stored with `.` as `%2e` (eth0.100).

Nothing lives only in this process: a second CLI run reopens the pins, and filters keep
enforcing after it exits. A new attachment is built in a staging directory and renamed
into place only once it is attached, so a failure leaves nothing half-attached.
"""

from __future__ import annotations

import contextlib
import errno as E
import fcntl
import ipaddress
import os
import shutil
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from membrane.abi import (
    DIR24_GROUPS,
    FILTER_BUCKETS,
    FILTER_GUARD_RATE,
    FILTER_GUARD_SYN,
    FilterFeature,
    FilterHook,
    FilterStat,
    FilterXdpMode,
)
from membrane.bpf import AttachError, BpfError, BpfObject, Link, Map
from membrane.bpf.fs import ensure_bpffs
from membrane.bpf.links import ClsactAttachment, TcSlot, attach_tc, attach_xdp
from membrane.bpf.maps import possible_cpus
from membrane.errors import NotPermitted, UserError
from membrane.filter.keys import DropDstTables, flow_key, guard_key, network_of
from membrane.filter.rules import (
    AllowedFlow,
    IPNetwork,
    protocol_name,
)
from membrane.netns.links import kind_here

FILTER_ROOT = "filter"
LOCK_FILE = "/run/lock/membrane-filter.lock"
# Hooks and XDP modes as users name them, and their numbers in bpf/abi/filter.h.
HOOK_IDS = {
    "xdp": FilterHook.XDP,
    "tc-ingress": FilterHook.TC_INGRESS,
    "tc-egress": FilterHook.TC_EGRESS,
}
HOOKS = tuple(HOOK_IDS)
XDP_MODE_IDS = {"native": FilterXdpMode.NATIVE, "generic": FilterXdpMode.GENERIC}
XDP_MODE_NAMES = {v: k for k, v in XDP_MODE_IDS.items()}
_SHARED_MAPS = ("events", "events_lost")
# The maps of each hook that hold rules (values: rule ids, 0 for none) and the kind of rule.
_RULE_MAPS = {
    "xdp": (
        ("drop_dst_v4", "drop-dst"),
        ("drop_dst_v6", "drop-dst"),
        ("drop_src_v4", "drop-src"),
        ("drop_src_v6", "drop-src"),
        ("drop_proto", "drop-proto"),
    ),
    "tc": (("allow_guard", "guard"), ("allow_flows", "allow-only")),
}
# IPv4 drop-dst maps of older builds: an LPM trie in drop_dst_v4 (with drop_dst_v4_summary
# in front of it later), then DIR-24-8 with groups that repeated the /24's answer in every
# entry (drop_dst_tbl8), then DIR-24-8 holding prefixes of /8 and shorter in tbl24 too
# (drop_dst_groups, but no drop_dst_top). A filter without drop_dst_top is moved to the
# current maps on first change.
_OLD_DROP_DST_MAPS = (
    "drop_dst_v4",
    "drop_dst_v4_summary",
    "drop_dst_tbl24",
    "drop_dst_tbl8",
    "drop_dst_groups",
)
_CURRENT_DROP_DST = "drop_dst_top"  # the map only the current layout has
_LIST_NAMES = {"dst": "deny list", "src": "source deny list"}
# The drop-src tables sized at one element while drop-src is off (see _open).
_SRC_TABLES = ("drop_src_tbl24", "drop_src_groups")
MAX_GROUPS = 1 << 20  # tbl8 groups a filter may ask for (1 KiB each)
# The prefix lists: the feature that enables each, by the address it judges.
PREFIX_FEATURES = {"dst": FilterFeature.DROP_DST, "src": FilterFeature.DROP_SRC}
# The token-bucket guards: their index in guard_config, feature, bucket map and rule kind.
GUARDS = {
    "rate-limit": (FILTER_GUARD_RATE, FilterFeature.RATE_LIMIT, "rate_buckets"),
    "syn-guard": (FILTER_GUARD_SYN, FilterFeature.SYN_GUARD, "syn_buckets"),
}
MAX_BUCKETS = 1 << 24  # buckets a guard may ask for
# The clsact slot of filter programs (tc hooks, where the kernel has no tcx or --attach
# clsact asks for it): fixed, so a filter is found and replaced in place, never added twice.
# Endpoint programs of the agent use priority 1; a filter comes after them.
CLSACT_SLOT = TcSlot(priority=2, handle=0x4D46)
# The counters the programs keep (seen is their sum), by their names in `filter stats`.
_COUNTED = {
    FilterStat.PASSED: "passed",
    FilterStat.DROPPED: "dropped",
    FilterStat.UNPARSED: "unparsed",
}


def encode_pin_name(name: str) -> str:
    return name.replace("%", "%25").replace(".", "%2e")


def decode_pin_name(name: str) -> str:
    return name.replace("%2e", ".").replace("%25", "%")


@dataclass
class Rule:
    id: int
    kind: str  # drop-dst, drop-proto, allow-only, guard
    text: str
    packets: int = 0
    bytes: int = 0
    settings: dict[str, int] | None = None  # guards: what `text` says, as numbers


@dataclass
class Attachment:
    """One filter program on one device and hook, read back from its pins."""

    scope: str
    device: str
    hook: str
    path: Path
    meta: Any = None
    rules: list[Rule] = field(default_factory=list)

    @property
    def netns(self) -> str | None:
        return self.scope.removeprefix("netns-") if self.scope != "host" else None

    @property
    def features(self) -> int:
        return self.meta.features

    def map(self, name: str) -> Map:
        return Map.from_pin(str(self.path / name))


def require_root() -> None:
    """Refuse early, naming what is missing: the capabilities decide, not the uid (uid 0
    without them gets nowhere either)."""
    from membrane.bpf.probe import missing_capabilities

    if missing := missing_capabilities(("CAP_BPF", "CAP_NET_ADMIN", "CAP_SYS_ADMIN")):
        raise NotPermitted(
            "",
            f"membrane filter needs root ({', '.join(missing)} missing) to load programs, "
            "attach them and pin them",
        )


@contextlib.contextmanager
def in_netns(netns: str | None) -> Iterator[None]:
    """Run the block in network namespace `netns` (None: where we are)."""
    if netns is None:
        yield
        return
    if not os.path.exists(f"/run/netns/{netns}"):
        raise UserError("--netns", f"no network namespace named {netns!r} (see `ip netns list`)")
    from membrane.netns import inside

    with inside(netns):
        yield


def device_index(device: str, field: str = "--dev") -> int:
    """The device's index in the current namespace; a missing one is the user's error."""
    try:
        return socket.if_nametoindex(device)
    except OSError:
        raise UserError(field, f"no network device named {device!r}") from None


def _counter_sum(values: list[Any]) -> tuple[int, int]:
    return sum(v.packets for v in values), sum(v.bytes for v in values)


class FilterManager:
    def __init__(self, pin_root: str | None = None) -> None:
        require_root()
        base = pin_root or ensure_bpffs()
        self.root = Path(base) / FILTER_ROOT

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Serialise changes: two commands at once would otherwise pick the same rule ids
        or instance numbers, or race on the staging directory."""
        os.makedirs(os.path.dirname(LOCK_FILE), exist_ok=True)
        with open(LOCK_FILE, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    # ---- finding attachments -----------------------------------------------------------
    @staticmethod
    def scope_of(netns: str | None) -> str:
        return f"netns-{encode_pin_name(netns)}" if netns else "host"

    def attachment_path(self, netns: str | None, device: str, hook: str) -> Path:
        return self.root / self.scope_of(netns) / encode_pin_name(device) / hook

    def load_attachment(self, path: Path) -> Attachment:
        scope, device, hook = path.parts[-3:]
        att = Attachment(decode_pin_name(scope), decode_pin_name(device), hook, path)
        with att.map("filter_meta") as meta:
            att.meta = meta.lookup(0)
        return att

    def attachments(self, netns: str | None = None, device: str | None = None) -> list[Attachment]:
        if not self.root.is_dir():
            return []
        found = []
        for path in sorted(self.root.glob("*/*/*")):
            scope = path.parts[-3]
            if not path.is_dir() or not (scope == "host" or scope.startswith("netns-")):
                continue
            if netns is not None and scope != self.scope_of(netns):
                continue
            if device is not None and path.parts[-2] != encode_pin_name(device):
                continue
            with contextlib.suppress(FileNotFoundError):  # detached meanwhile by another run
                found.append(self.load_attachment(path))
        return found

    def find(self, netns: str | None, device: str, hook: str) -> Attachment | None:
        path = self.attachment_path(netns, device, hook)
        return self.load_attachment(path) if (path / "filter_meta").exists() else None

    # ---- loading and attaching ---------------------------------------------------------
    def _next_instance(self) -> int:
        used = [a.meta.instance for a in self.attachments()]
        return max(used, default=0) + 1

    def _open(
        self,
        hook: str,
        features: int,
        instance: int,
        pin_dir: Path,
        groups: int | None = None,
        buckets: int | None = None,
    ) -> BpfObject:
        """Load the program for `hook`, reusing the maps pinned in `pin_dir`; a new
        drop_dst_groups or drop_src_groups gets `groups` groups (default DIR24_GROUPS), a
        new bucket map `buckets` buckets (default FILTER_BUCKETS); pinned ones keep their
        size."""
        if hook == "xdp":
            obj = BpfObject.open("filter_xdp")
            obj.set_config(
                enable_drop_dst=bool(features & FilterFeature.DROP_DST),
                enable_drop_src=bool(features & FilterFeature.DROP_SRC),
                enable_drop_proto=bool(features & FilterFeature.DROP_PROTO),
                enable_rate_limit=bool(features & FilterFeature.RATE_LIMIT),
                enable_syn_guard=bool(features & FilterFeature.SYN_GUARD),
                instance=instance,
            )
            sizes = {"drop_dst_groups": groups, "drop_src_groups": groups}
            sizes |= {"rate_buckets": buckets, "syn_buckets": buckets}
            for _, guard_feature, bucket_map in GUARDS.values():
                if not features & guard_feature:  # a placeholder until the guard is used
                    sizes[bucket_map] = 1
            if not features & FilterFeature.DROP_SRC:
                # unused, drop-src's tables take one element each instead of 64 MiB; they
                # are replaced by full ones when drop-src is first enabled
                sizes |= {name: 1 for name in _SRC_TABLES}
            for name, size in sizes.items():
                default = DIR24_GROUPS if name.endswith("groups") else FILTER_BUCKETS
                obj.set_max_entries(name, _pinned_size(pin_dir / name) or size or default)
        else:
            obj = BpfObject.open("filter_tc")
            obj.set_config(enable_allow_only=True, hook=HOOK_IDS[hook], instance=instance)
        obj.pin_maps(str(pin_dir), names=[n for n in obj.map_names() if n not in _SHARED_MAPS])
        for name in _SHARED_MAPS:
            obj.pin_map(name, str(self.root / name))
        return obj.load()

    def _attach_new(
        self,
        netns: str | None,
        device: str,
        hook: str,
        features: int,
        fill: Any,
        xdp_mode: str,
        tc_mode: str = "auto",
        groups: int | None = None,
        buckets: int | None = None,
    ) -> Attachment:
        """Build a new attachment in staging, fill its rules, attach, then publish it."""
        final = self.attachment_path(netns, device, hook)
        staging = self.root / f"staging-{os.getpid()}-{encode_pin_name(device)}-{hook}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        link: Link | ClsactAttachment | None = None
        try:
            with in_netns(netns):
                ifindex = device_index(device)
                obj = self._open(hook, features, self._next_instance(), staging, groups, buckets)
                with obj:
                    att = Attachment(self.scope_of(netns), device, hook, staging)
                    meta = obj.map("filter_meta").value_type(
                        instance=obj.get_config("instance"),
                        ifindex=ifindex,
                        features=features,
                        hook=HOOK_IDS[hook],
                    )
                    fill(att)
                    prog = obj.program("filter_xdp" if hook == "xdp" else "filter_tc")
                    if hook == "xdp":
                        link, mode = attach_xdp(prog, ifindex, xdp_mode_for(ifindex, xdp_mode))
                        meta.xdp_mode = XDP_MODE_IDS[mode]
                    else:
                        direction = hook.removeprefix("tc-")
                        link = attach_tc(prog, ifindex, direction, tc_mode, slot=CLSACT_SLOT)
                        if isinstance(link, ClsactAttachment):
                            meta.tc_handle, meta.tc_priority = link.handle, link.priority
                    obj.map("filter_meta").update(0, meta)
                    link.pin(str(staging / "link"))
            final.parent.mkdir(parents=True, exist_ok=True)
            os.rename(staging, final)
        except AttachError as err:
            self._undo(link, staging)
            raise UserError("--dev", attach_problem(device, hook, err)) from None
        except BaseException:
            self._undo(link, staging)
            raise
        finally:
            if link is not None:
                link.close()
        return self.load_attachment(final)

    def _ensure(
        self,
        netns: str | None,
        device: str,
        hook: str,
        feature: int,
        fill: Any,
        xdp_mode: str = "auto",
        tc_mode: str = "auto",
        groups: int | None = None,
        buckets: int | None = None,
    ) -> Attachment:
        """Add rules with `fill`, attaching the program (or enabling `feature` in it) first
        when needed. Rules are written before the program that reads them goes live."""
        att = self.find(netns, device, hook)
        if att is None:
            return self._attach_new(
                netns, device, hook, feature, fill, xdp_mode, tc_mode, groups, buckets
            )
        if hook != "xdp" and tc_mode != "auto" and tc_mode != self.tc_mode(att):
            raise UserError(
                "--attach",
                f"{device} already has the {hook} filter attached with {self.tc_mode(att)}; "
                "detach it first to change how it attaches",
            )
        if hook == "xdp" and xdp_mode != "auto" and XDP_MODE_IDS[xdp_mode] != att.meta.xdp_mode:
            raise UserError(
                "--mode",
                f"{device} already has the filter in "
                f"{XDP_MODE_NAMES[att.meta.xdp_mode]} mode; detach it "
                "first to change modes",
            )
        if hook == "xdp" and not (att.path / "guard_config").exists():
            # attached by a build without drop-src and the guards: a reload with the same
            # features pins their (empty) maps before `fill` writes to them
            self._reload(att, att.features)
        fill(att)
        if not att.features & feature:
            self._reload(att, att.features | feature)
        return att

    def _reload(self, att: Attachment, features: int, buckets: int | None = None) -> None:
        """Swap in a program with more features enabled; maps are reused, the link is
        updated atomically, so traffic always sees one complete program. A filter of an
        older build is moved to the current drop-dst maps first: the program loaded here
        reads them, and would otherwise get new empty ones beside the old."""
        if att.hook == "xdp" and not (att.path / _CURRENT_DROP_DST).exists():
            self._migrate_drop_dst(att)
        with (
            in_netns(att.netns),
            self._open(att.hook, features, att.meta.instance, att.path, buckets=buckets) as obj,
        ):
            prog = obj.program("filter_xdp" if att.hook == "xdp" else "filter_tc")
            if (att.path / "link").exists():
                with Link.from_pin(str(att.path / "link")) as link:
                    link.update(prog)
            else:
                self._clsact(att).update(prog)
            att.meta.features = features
            with att.map("filter_meta") as meta:
                meta.update(0, att.meta)

    # ---- rule ids ----------------------------------------------------------------------
    @staticmethod
    def _rule_ids(att: Attachment) -> dict[str, np.ndarray]:
        """Rule kind -> the ids in use, read with one batch syscall per map (and 4,096
        rules), not one per rule (the IPv6 trie has no batch reads: one per IPv6 rule)."""
        found: dict[str, list[np.ndarray]] = {}
        for name, kind in _RULE_MAPS["xdp" if att.hook == "xdp" else "tc"]:
            if not (att.path / name).exists():  # attached by an older build
                continue
            with att.map(name) as m:
                values = np.frombuffer(m.lookup_batch_raw()[1], dtype=np.uint32)
            found.setdefault(kind, []).append(values[values != 0])
        if att.hook == "xdp" and (att.path / "guard_config").exists():
            with att.map("guard_config") as config:
                for kind, (index, _, _) in GUARDS.items():
                    rule_id = config.lookup(index).rule_id
                    found.setdefault(kind, []).append(np.array([rule_id] if rule_id else []))
        return {kind: np.concatenate(parts).astype(np.int64) for kind, parts in found.items()}

    @classmethod
    def _id_allocator(cls, att: Attachment) -> Iterator[int]:
        """Free rule ids, lowest first."""
        with att.map("rule_stats") as stats:
            limit = stats.max_entries
        used = np.zeros(limit, dtype=bool)
        for ids in cls._rule_ids(att).values():
            used[ids[ids < limit]] = True
        used[0] = True  # 0 means no rule
        yield from (int(i) for i in np.flatnonzero(~used))
        raise UserError("", f"{att.device} {att.hook}: the filter is full ({limit - 1} rules)")

    def rule_counts(self, att: Attachment) -> dict[str, int]:
        """Rule kind -> how many, in the order of their first rule id (as `rules` lists)."""
        ids = {kind: found for kind, found in self._rule_ids(att).items() if found.size}
        return {kind: len(ids[kind]) for kind in sorted(ids, key=lambda k: int(ids[k].min()))}

    @staticmethod
    def _reset_stats(att: Attachment, ids: list[int]) -> None:
        """Zero the counters of freed rule ids so a reused id starts from nothing."""
        if not ids:
            return
        with att.map("rule_stats") as stats:
            zero = stats.value_type()
            stats.update_batch((i, [zero] * possible_cpus()) for i in ids)

    # ---- drop-dst ----------------------------------------------------------------------
    @contextlib.contextmanager
    def _prefix_tables(self, att: Attachment, direction: str = "dst") -> Iterator[DropDstTables]:
        """The drop-dst (`dst`) or drop-src (`src`) list of an attachment."""
        if not (att.path / _CURRENT_DROP_DST).exists():
            self._migrate_drop_dst(att)
        with contextlib.ExitStack() as stack:
            yield DropDstTables.of(lambda name: stack.enter_context(att.map(name)), direction)

    def _migrate_drop_dst(self, att: Attachment) -> None:
        """Move a filter attached by an older build (see _OLD_DROP_DST_MAPS) to the current
        maps, its IPv4 prefixes and rule ids (so counters) kept: the old maps are set
        aside, the current program is loaded beside the running one with new maps (the
        others are reused), filled, and swapped in with bpf_link_update. The old program
        enforces the old maps until that instant: the same list, no gap. Cut short, the
        old maps go back and the old program stays."""
        rules = _v4_record(att)
        groups = None
        for name in ("drop_dst_groups", "drop_dst_tbl8"):
            if (att.path / name).exists():
                with att.map(name) as tbl8:
                    groups = tbl8.max_entries
                break
        aside = att.path / "migrating"
        aside.mkdir(exist_ok=True)
        moved = [name for name in _OLD_DROP_DST_MAPS if (att.path / name).exists()]
        try:
            for name in moved:
                os.rename(att.path / name, aside / name)
            with (
                in_netns(att.netns),
                self._open("xdp", att.features, att.meta.instance, att.path, groups) as obj,
            ):
                DropDstTables.of(obj.map).add(rules)
                with Link.from_pin(str(att.path / "link")) as link:
                    link.update(obj.program("filter_xdp"))
        except BaseException:
            for name in ("drop_dst_v4", "drop_dst_tbl24", "drop_dst_groups", _CURRENT_DROP_DST):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(att.path / name)  # pinned by the new object
            for name in moved:
                os.rename(aside / name, att.path / name)
            aside.rmdir()
            raise
        shutil.rmtree(aside)

    def add_prefixes(
        self,
        netns: str | None,
        device: str,
        nets: list[IPNetwork],
        direction: str = "dst",
        xdp_mode: str = "auto",
        groups: int | None = None,
    ) -> Attachment:
        """Add prefixes to the drop-dst (`dst`) or drop-src (`src`) list; `groups` sizes
        the tbl8 of a filter attached now (None: default; refused for one attached with
        another size)."""
        if groups is not None and not 1 <= groups <= MAX_GROUPS:
            raise UserError("--tbl8-groups", f"{groups} is not between 1 and {MAX_GROUPS}")
        att = self.find(netns, device, "xdp")
        if direction == "src" and att and not att.features & FilterFeature.DROP_SRC:
            self._enable_drop_src(att, groups)

        def fill(att: Attachment) -> None:
            with self._prefix_tables(att, direction) as tables:
                existing = {n for n, _ in tables.items(version=6)}
                new = [
                    n
                    for n in nets
                    if n not in existing and (n.version == 6 or tables.lookup(n) is None)
                ]
                for version in (4, 6):  # check both families before writing either
                    table = tables.v4 if version == 4 else tables.v6
                    count = sum(1 for n in new if n.version == version)
                    if count and len(table) + count > table.max_entries:
                        raise UserError(
                            "CIDR",
                            f"{device}: the deny list would exceed its "
                            f"{table.max_entries} IPv{version} prefixes",
                        )
                if groups is not None and groups != tables.dir24.groups:
                    raise UserError(
                        "--tbl8-groups",
                        f"{device} already has the filter with {tables.dir24.groups} tbl8 "
                        "groups; detach it first to change how many",
                    )
                v4 = [n for n in new if isinstance(n, ipaddress.IPv4Network)]
                if tables.dir24.groups_needed(v4) > tables.dir24.groups_available():
                    raise UserError(
                        "CIDR",
                        f"{device}: the deny list would have prefixes longer than /24 in more "
                        f"than {tables.dir24.groups} different /24s, the most this filter "
                        "holds (--tbl8-groups when it is first attached)",
                    )
                ids = self._id_allocator(att)
                tables.add((n, next(ids)) for n in new)

        return self._ensure(
            netns, device, "xdp", PREFIX_FEATURES[direction], fill, xdp_mode, groups=groups
        )

    def _enable_drop_src(self, att: Attachment, groups: int | None) -> None:
        """Swap in the program with drop-src on and new, full-size, empty drop-src tables
        (those pinned while it was off have one element): it drops nothing until prefixes
        are added. The running program never reads the old tables, so they can go first."""
        if not (att.path / _CURRENT_DROP_DST).exists():
            self._migrate_drop_dst(att)  # else _open would make empty drop-dst tables too
        for name in ("drop_src_v4", "drop_src_v6", "drop_src_top", *_SRC_TABLES):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(att.path / name)
        with (
            in_netns(att.netns),
            self._open("xdp", att.features | FilterFeature.DROP_SRC, att.meta.instance, att.path,
                       groups) as obj,
        ):  # fmt: skip
            with Link.from_pin(str(att.path / "link")) as link:
                link.update(obj.program("filter_xdp"))
            att.meta.features |= FilterFeature.DROP_SRC
            with att.map("filter_meta") as meta:
                meta.update(0, att.meta)

    def remove_prefixes(
        self,
        netns: str | None,
        device: str,
        nets: list[IPNetwork],
        direction: str = "dst",
        check_only: bool = False,
    ) -> int:
        """Remove prefixes from the drop-dst (`dst`) or drop-src (`src`) list; with
        `check_only`, only raise if one of them cannot be."""
        att = self._require(netns, device, "xdp")
        if direction == "src" and not att.features & FilterFeature.DROP_SRC:
            raise UserError("--remove", f"{nets[0]} is not in the source deny list of {device}")
        with self._prefix_tables(att, direction) as tables:
            for net in nets:
                if tables.lookup(net) is None:
                    raise UserError(
                        "--remove", f"{net} is not in the {_LIST_NAMES[direction]} of {device}"
                    )
            if check_only:
                return 0
            freed = tables.remove(nets)  # in force from here
            # groups the removal unlinked are free after a grace period (~10 ms): wait for
            # it now rather than in a later add
            tables.dir24.reclaim()
        self._reset_stats(att, freed)
        return len(freed)

    def _prefix_rules(self, att: Attachment, direction: str) -> list[Rule]:
        if direction == "src" and not att.features & FilterFeature.DROP_SRC:
            return []  # its tables are placeholders (or, from an older build, absent)
        if (att.path / _CURRENT_DROP_DST).exists():
            with self._prefix_tables(att, direction) as tables:
                listed = tables.items()
        else:  # an older build's, read as it is: only a change (under the lock) moves it
            with att.map("drop_dst_v6") as v6:
                listed = [*_v4_record(att), *((network_of(k), v) for k, v in v6.lookup_batch())]
        return [Rule(rule_id, f"drop-{direction}", str(net)) for net, rule_id in listed]

    # ---- drop-proto --------------------------------------------------------------------
    def add_drop_proto(
        self, netns: str | None, device: str, protocols: list[int], xdp_mode: str = "auto"
    ) -> Attachment:
        def fill(att: Attachment) -> None:
            with att.map("drop_proto") as m:
                todo = [p for p in protocols if not m.lookup(p)]
                ids = self._id_allocator(att)
                for proto in todo:
                    m.update(proto, next(ids))

        return self._ensure(netns, device, "xdp", FilterFeature.DROP_PROTO, fill, xdp_mode)

    def remove_drop_proto(
        self, netns: str | None, device: str, protocols: list[int], check_only: bool = False
    ) -> int:
        """Stop dropping protocols; with `check_only`, only raise if one is not dropped."""
        att = self._require(netns, device, "xdp")
        with att.map("drop_proto") as m:
            for proto in protocols:
                if not m.lookup(proto):
                    raise UserError(
                        "--remove", f"{protocol_name(proto)} is not dropped on {device}"
                    )
            if check_only:
                return 0
            freed = [m.lookup(p) for p in protocols]
            for proto in protocols:
                m.update(proto, 0)
        self._reset_stats(att, freed)
        return len(freed)

    # ---- token-bucket guards (rate-limit, syn-guard) ------------------------------------
    def set_guard(
        self,
        netns: str | None,
        device: str,
        guard: str,
        pps: int,
        burst: int,
        prefix_len4: int = 32,
        prefix_len6: int = 128,
        buckets: int | None = None,
        xdp_mode: str = "auto",
    ) -> Attachment:
        """Turn a guard on or change it live (the program reads guard_config per packet);
        `buckets` sizes its LRU map (changing it replaces the map: only while it is off)."""
        for name, value, low, high in (
            ("--pps", pps, 1, 2**32 - 1),
            ("--burst", burst, 1, 2**32 - 1),
            ("--prefix-len", prefix_len4, 1, 32),
            ("--prefix-len6", prefix_len6, 1, 128),
            ("--buckets", 1 if buckets is None else buckets, 1, MAX_BUCKETS),
        ):
            if not low <= value <= high:
                raise UserError(name, f"{value} is not between {low} and {high}")
        index, feature, bucket_map = GUARDS[guard]
        att = self.find(netns, device, "xdp")
        if att and not (att.path / "guard_config").exists():
            self._reload(att, att.features)  # an older build's: pin the guards' maps first
        size = _pinned_size(att.path / bucket_map) if att else None
        if att and att.features & feature:
            if buckets is not None and size != buckets:
                raise UserError(
                    "--buckets",
                    f"the {guard} of {device} has {size} buckets; turn it off (--remove) "
                    "before giving it another number",
                )
        elif att and size is not None:
            # the guard is off, its map unread: a placeholder (1 bucket, see _open) or
            # another size than asked for is replaced, and the program that reads the new
            # map swapped in (the guard has no rule until `fill`: it drops nothing yet)
            wanted = buckets or (FILTER_BUCKETS if size == 1 else size)
            if size != wanted:
                os.unlink(att.path / bucket_map)
                self._reload(att, att.features | feature, buckets=wanted)

        def fill(att: Attachment) -> None:
            with att.map("guard_config") as config:
                rule_id = config.lookup(index).rule_id or next(self._id_allocator(att))
                # fields are read one by one: a packet may see old and new ones mixed
                new = config.value_type(
                    rule_id=rule_id,
                    pps=pps,
                    burst=burst,
                    prefix_len4=prefix_len4,
                    prefix_len6=prefix_len6,
                )
                config.update(index, new)

        return self._ensure(netns, device, "xdp", feature, fill, xdp_mode, buckets=buckets)

    def remove_guard(
        self, netns: str | None, device: str, guard: str, check_only: bool = False
    ) -> None:
        """Turn a guard off: its rule stops at once, the program without it is swapped in."""
        att = self._require(netns, device, "xdp")
        index, feature, bucket_map = GUARDS[guard]
        rule_id = 0
        if (att.path / "guard_config").exists():
            with att.map("guard_config") as config:
                rule_id = config.lookup(index).rule_id
        if not rule_id:
            raise UserError("--remove", f"{device} has no {guard}")
        if check_only:
            return
        with att.map("guard_config") as config:
            config.update(index, config.value_type())
        self._reload(att, att.features & ~feature)
        with att.map(bucket_map) as buckets:  # a guard turned on again starts afresh
            buckets.delete_batch(list(buckets.keys()))
        self._reset_stats(att, [rule_id])

    def _guard_rules(self, att: Attachment) -> list[Rule]:
        if not (att.path / "guard_config").exists():
            return []
        rules = []
        with att.map("guard_config") as config:
            for kind, (index, _, bucket_map) in GUARDS.items():
                c = config.lookup(index)
                if not c.rule_id:
                    continue
                with att.map(bucket_map) as buckets:
                    size, memory = buckets.max_entries, map_memory(buckets)
                settings = {"pps": c.pps, "burst": c.burst, "buckets": size, "memory": memory}
                if kind == "rate-limit":
                    settings |= {"prefix_len": c.prefix_len4, "prefix_len6": c.prefix_len6}
                    per = f"per source /{c.prefix_len4} (IPv6 /{c.prefix_len6})"
                else:
                    per = "TCP SYN per destination address and port"
                text = (
                    f"{c.pps} pps, burst {c.burst}, {per}; "
                    f"{size} buckets ({memory // 1024} KiB of kernel memory)"
                )
                rules.append(Rule(c.rule_id, kind, text, settings=settings))
        return rules

    # ---- allow-only --------------------------------------------------------------------
    def add_allow_flow(
        self,
        netns: str | None,
        device: str,
        flow: AllowedFlow,
        direction: str = "ingress",
        tc_mode: str = "auto",
    ) -> Attachment:
        """Allow `flow` (the filter attaches on first use: tc_mode auto, tcx or clsact)."""

        def fill(att: Attachment) -> None:
            ids = self._id_allocator(att)
            # The flow goes in before its guard, so enabling the guard never drops it.
            with att.map("allow_flows") as flows:
                key = flow_key(flows, flow)
                if flows.lookup(key) is None:
                    flows.update(key, next(ids))
            with att.map("allow_guard") as guards:
                key = guard_key(guards, flow.protocol, flow.port)
                if guards.lookup(key) is None:
                    guards.update(key, next(ids))

        return self._ensure(
            netns, device, f"tc-{direction}", FilterFeature.ALLOW_ONLY, fill, tc_mode=tc_mode
        )

    def remove_allow_flow(
        self, netns: str | None, device: str, flow: AllowedFlow, direction: str = "ingress"
    ) -> None:
        att = self._require(netns, device, f"tc-{direction}")
        freed = []
        with att.map("allow_flows") as flows:
            key = flow_key(flows, flow)
            rule_id = flows.lookup(key)
            if rule_id is None:
                raise UserError("--remove", f"{flow} is not a rule on {device}")
            others = [
                k
                for k, _ in flows.items()
                if (k.port, k.protocol) == (flow.port, flow.protocol) and bytes(k) != bytes(key)
            ]
            # With no allowed flow left the guard goes first: the port is then unguarded
            # rather than closed to the one flow the user still meant to allow.
            if not others:
                with att.map("allow_guard") as guards:
                    gkey = guard_key(guards, flow.protocol, flow.port)
                    freed.append(guards.lookup(gkey))
                    guards.delete(gkey)
            flows.delete(key)
            freed.append(rule_id)
        self._reset_stats(att, [f for f in freed if f])

    def _tc_rules(self, att: Attachment) -> list[Rule]:
        rules = []
        with att.map("allow_guard") as guards:
            for key, rule_id in guards.items():
                rules.append(
                    Rule(rule_id, "guard", f"drop other {protocol_name(key.protocol)}/{key.port}")
                )
        with att.map("allow_flows") as flows:
            for key, rule_id in flows.items():
                size = 4 if key.family == 4 else 16
                flow = AllowedFlow(
                    ipaddress.ip_address(bytes(key.src)[:size]),
                    ipaddress.ip_address(bytes(key.dst)[:size]),
                    key.port,
                    key.protocol,
                )
                rules.append(Rule(rule_id, "allow-only", str(flow)))
        return rules

    # ---- reading -----------------------------------------------------------------------
    def _require(self, netns: str | None, device: str, hook: str) -> Attachment:
        att = self.find(netns, device, hook)
        if att is None:
            where = f" in netns {netns}" if netns else ""
            raise UserError("--dev", f"{device}{where} has no {hook} filter attached")
        return att

    def rules(self, att: Attachment, with_stats: bool = True) -> list[Rule]:
        if att.hook == "xdp":
            rules = self._prefix_rules(att, "dst") + self._prefix_rules(att, "src")
            rules += self._guard_rules(att)
            with att.map("drop_proto") as m:
                rules += [Rule(v, "drop-proto", protocol_name(p)) for p, v in m.items() if v]
        else:
            rules = self._tc_rules(att)
        if with_stats and rules:
            with att.map("rule_stats") as stats:
                for rule in rules:
                    rule.packets, rule.bytes = _counter_sum(stats.lookup(rule.id))
        return sorted(rules, key=lambda r: r.id)

    def totals(self, att: Attachment) -> dict[str, dict[str, int]]:
        with att.map("filter_stats") as stats:
            out = {}
            for stat, name in _COUNTED.items():
                packets, size = _counter_sum(stats.lookup(stat))
                out[name] = {"packets": packets, "bytes": size}
        out["seen"] = {k: out["passed"][k] + out["dropped"][k] for k in ("packets", "bytes")}
        return out

    @staticmethod
    def _clsact(att: Attachment) -> ClsactAttachment:
        direction = att.hook.removeprefix("tc-")
        return ClsactAttachment(
            att.meta.ifindex, direction, att.meta.tc_handle, att.meta.tc_priority
        )

    @staticmethod
    def tc_mode(att: Attachment) -> str:
        """How a tc filter is attached: tcx (a pinned link) or clsact."""
        return "tcx" if (att.path / "link").exists() else "clsact"

    def link_state(self, att: Attachment) -> str:
        """attached, or defunct when the device (or the clsact filter) went away."""
        if not (att.path / "link").exists():
            try:
                with in_netns(att.netns):
                    present = self._clsact(att).program_id() is not None
            except UserError:  # its namespace is gone, and the device with it
                present = False
            return "attached (clsact)" if present else "defunct (clsact filter gone)"
        with Link.from_pin(str(att.path / "link")) as link:
            return "attached" if link.ifindex else "defunct (device gone)"

    # ---- detaching ---------------------------------------------------------------------
    def detach(self, att: Attachment) -> None:
        with contextlib.suppress(FileNotFoundError), Link.from_pin(str(att.path / "link")) as link:
            link.detach()
        if not (att.path / "link").exists() and att.hook != "xdp" and att.meta.tc_handle:
            # a namespace deleted under the filter took the device (and the filter) along
            with contextlib.suppress(BpfError, UserError), in_netns(att.netns):
                self._clsact(att).detach()
        shutil.rmtree(att.path, ignore_errors=True)
        for parent in (att.path.parent, att.path.parent.parent):
            with contextlib.suppress(OSError):
                parent.rmdir()
        self._remove_shared_if_unused()

    def _undo(self, link: Link | ClsactAttachment | None, staging: Path) -> None:
        """Take back a half-made attachment."""
        if link is not None:
            with contextlib.suppress(BpfError):
                link.detach()
        shutil.rmtree(staging, ignore_errors=True)
        self._remove_shared_if_unused()

    def _remove_shared_if_unused(self) -> None:
        if not self.attachments():
            for name in _SHARED_MAPS:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.root / name)
            for directory in (self.root, self.root.parent):  # the latter only when empty
                with contextlib.suppress(OSError):
                    directory.rmdir()


def map_memory(m: Map) -> int:
    """Bytes of kernel memory a map holds, as the kernel accounts it (fdinfo memlock)."""
    with open(f"/proc/self/fdinfo/{m.fd}") as info:
        for line in info:
            if line.startswith("memlock:"):
                return int(line.split()[1])
    return 0


def _pinned_size(path: Path) -> int | None:
    """max_entries of the map pinned at `path` (None: none pinned there)."""
    if not path.exists():
        return None
    with Map.from_pin(str(path)) as pinned:
        return pinned.max_entries


def _v4_record(att: Attachment) -> list[tuple[ipaddress.IPv4Network, int]]:
    """The IPv4 deny list as drop_dst_v4 records it: struct lpm_v4_key -> __u32 rule id in
    every build (an LPM trie in older ones, a hash now), read without BTF."""
    with att.map("drop_dst_v4") as record:
        keys, values = record.lookup_batch_raw()
    lengths = np.frombuffer(keys, dtype="<u4")[::2].tolist()
    ids = np.frombuffer(values, dtype=np.uint32).tolist()
    return [
        (ipaddress.IPv4Network((keys[i * 8 + 4 : i * 8 + 8], length)), rule_id)
        for i, (length, rule_id) in enumerate(zip(lengths, ids, strict=True))
    ]


def xdp_mode_for(ifindex: int, requested: str) -> str:
    """`auto` means native, except on veth: native XDP there turns off TSO on the peer and
    costs about 70 % of TCP throughput (bench/RESULTS.md), while generic costs a few %."""
    if requested != "auto":
        return requested
    return "generic" if kind_here(ifindex) == "veth" else "auto"


def attach_problem(device: str, hook: str, err: AttachError) -> str:
    if err.errno in (E.EBUSY, E.EEXIST):
        return (
            f"{device} already has an {hook} program that membrane did not attach; remove it first"
        )
    if err.errno in (E.EOPNOTSUPP, E.ENOTSUP, E.EINVAL):
        return (
            f"cannot attach {hook} to {device}: the kernel or driver does not support it "
            f"({os.strerror(err.errno)}); see `membrane probe`"
        )
    return f"cannot attach {hook} to {device}: {os.strerror(err.errno)}"
