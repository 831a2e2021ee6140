"""TracingPolicy and TracingPolicyNamespaced (cilium.io/v1alpha1) as Tetragon users write
them: the subset Membrane enforces, strictly. A field Tetragon has and Membrane does not
is refused by name ("is not supported"), an unknown one as unknown; nothing is ignored
silently, because a policy that enforces less than it says is worse than no policy.

Kernel questions (does the tracepoint exist, may kprobes load, is the symbol in the ELF)
are compile.py's; this module checks only what the document says.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

API_VERSION = "cilium.io/v1alpha1"
KIND_CLUSTER = "TracingPolicy"
KIND_NAMESPACED = "TracingPolicyNamespaced"
KINDS = (KIND_CLUSTER, KIND_NAMESPACED)

ARG_OPERATORS = (
    "Equal",
    "NotEqual",
    "Prefix",
    "NotPrefix",
    "Postfix",
    "NotPostfix",
    "GT",
    "LT",
    "GreaterThan",
    "LessThan",
    "Mask",
    "DPort",
    "NotDPort",
    "DAddr",
    "NotDAddr",
    "Family",
    "NotFamily",
)
ACTIONS = ("Post", "NoPost", "Sigkill", "Signal", "Override")
NAMESPACES = ("Uts", "Ipc", "Mnt", "Net", "Cgroup", "User", "PidForChildren")
CAP_SETS = ("Effective", "Inheritable", "Permitted")


class _Strict(BaseModel):
    """No unknown fields; Tetragon fields Membrane does not implement named as such."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    unsupported: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name in cls.unsupported:
                if name in data:
                    raise ValueError(f"{name} is not supported by Membrane")
        return data


def _strings(values: list[Any]) -> list[str]:
    """Tetragon's values are strings; YAML numbers are taken as written."""
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, str | int):
            raise ValueError("values must be strings or numbers")
        out.append(str(v))
    return out


class ArgSpec(_Strict):
    index: int = Field(ge=0)
    type: str = "auto"
    label: str = ""
    unsupported = ("returnCopy", "sizeArgIndex", "maxData", "resolve", "btfType")


class MatchArg(_Strict):
    index: int = Field(ge=0)
    operator: Literal[ARG_OPERATORS]  # type: ignore[valid-type]
    values: list[str] = Field(min_length=1)
    unsupported = ("args",)

    @field_validator("values", mode="before")
    @classmethod
    def _values(cls, v: Any) -> Any:
        return _strings(v) if isinstance(v, list) else v


class MatchBinaries(_Strict):
    operator: Literal["In", "NotIn", "Prefix", "NotPrefix"]
    values: list[str] = Field(min_length=1)
    unsupported = ("followChildren",)


class MatchPIDs(_Strict):
    operator: Literal["In", "NotIn"]
    values: list[int] = Field(min_length=1)
    followForks: bool = False
    isNamespacePID: bool = False

    @field_validator("isNamespacePID")
    @classmethod
    def _host_pids(cls, v: bool) -> bool:
        if v:
            raise ValueError("isNamespacePID: true is not supported by Membrane (host pids only)")
        return v


class MatchNamespace(_Strict):
    namespace: Literal[NAMESPACES]  # type: ignore[valid-type]
    operator: Literal["In", "NotIn"]
    values: list[str] = Field(min_length=1)

    @field_validator("values", mode="before")
    @classmethod
    def _values(cls, v: Any) -> Any:
        return _strings(v) if isinstance(v, list) else v


class MatchCapabilities(_Strict):
    type: Literal[CAP_SETS] = "Effective"  # type: ignore[valid-type]
    operator: Literal["In", "NotIn"]
    values: list[str] = Field(min_length=1)
    isNamespaceCapability: bool = False

    @field_validator("isNamespaceCapability")
    @classmethod
    def _host_caps(cls, v: bool) -> bool:
        if v:
            raise ValueError("isNamespaceCapability: true is not supported by Membrane")
        return v


class MatchAction(_Strict):
    action: Literal[ACTIONS]  # type: ignore[valid-type]
    argSig: int | None = Field(default=None, ge=1, le=64)
    argError: int | None = None
    unsupported = (
        "argFd",
        "argName",
        "argUrl",
        "argFqdn",
        "rateLimit",
        "rateLimitScope",
        "userStackTrace",
        "kernelStackTrace",
        "imaHash",
    )

    @model_validator(mode="after")
    def _arguments(self) -> MatchAction:
        if self.action == "Signal" and self.argSig is None:
            raise ValueError("action Signal needs argSig (the signal number)")
        if self.action != "Signal" and self.argSig is not None:
            raise ValueError(f"argSig belongs to action Signal, not {self.action}")
        if self.action != "Override" and self.argError is not None:
            raise ValueError(f"argError belongs to action Override, not {self.action}")
        return self


class Selector(_Strict):
    matchArgs: list[MatchArg] = Field(default_factory=list, max_length=4)
    matchBinaries: list[MatchBinaries] = Field(default_factory=list, max_length=1)
    matchPIDs: list[MatchPIDs] = Field(default_factory=list, max_length=1)
    matchNamespaces: list[MatchNamespace] = Field(default_factory=list, max_length=2)
    matchCapabilities: list[MatchCapabilities] = Field(default_factory=list, max_length=2)
    matchActions: list[MatchAction] = Field(default_factory=list, max_length=3)
    unsupported = (
        "matchReturnArgs",
        "matchReturnActions",
        "matchData",
        "matchParentBinaries",
        "matchNamespaceChanges",
        "matchCapabilityChanges",
    )


class _Hook(_Strict):
    args: list[ArgSpec] = Field(default_factory=list, max_length=5)
    selectors: list[Selector] = Field(default_factory=list, max_length=5)
    message: str = ""
    tags: list[str] = Field(default_factory=list)


class Tracepoint(_Hook):
    subsystem: str = Field(min_length=1)
    event: str = Field(min_length=1)
    raw: bool = False

    @field_validator("subsystem", "event")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if "/" in v or v.startswith("."):
            raise ValueError(f"{v!r} is not a tracepoint name")
        return v

    @field_validator("raw")
    @classmethod
    def _not_raw(cls, v: bool) -> bool:
        if v:
            raise ValueError("raw tracepoints are not supported by Membrane")
        return v


class Kprobe(_Hook):
    call: str = Field(min_length=1)
    syscall: bool = False
    return_: bool = Field(default=False, alias="return")
    returnArg: ArgSpec | None = None


class Uprobe(_Hook):
    path: str = Field(min_length=1)
    symbols: list[str] = Field(min_length=1)
    unsupported = ("offsets", "refCtrOffsets", "addrs", "btfPath", "preload")

    @field_validator("path")
    @classmethod
    def _absolute(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError(f"{v!r} is not an absolute path")
        return v


class LabelSelector(_Strict):
    matchLabels: dict[str, str] = Field(default_factory=dict)
    unsupported = ("matchExpressions",)


class Spec(_Strict):
    tracepoints: list[Tracepoint] = Field(default_factory=list)
    kprobes: list[Kprobe] = Field(default_factory=list)
    uprobes: list[Uprobe] = Field(default_factory=list)
    podSelector: LabelSelector | None = None
    unsupported = ("lsmhooks", "usdts", "lists", "options", "enforcers", "containerSelector")

    @model_validator(mode="after")
    def _some_hook(self) -> Spec:
        if not (self.tracepoints or self.kprobes or self.uprobes):
            raise ValueError("names no hook (tracepoints, kprobes or uprobes)")
        return self


class Metadata(BaseModel):
    model_config = ConfigDict(extra="allow")  # labels, annotations, uid, ...: kept, unused
    name: str = Field(min_length=1, max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    namespace: str | None = Field(
        default=None, min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
    )


class TracingPolicy(_Strict):
    apiVersion: Literal["cilium.io/v1alpha1"]
    kind: Literal[KINDS]  # type: ignore[valid-type]
    metadata: Metadata
    spec: Spec

    @model_validator(mode="after")
    def _namespace(self) -> TracingPolicy:
        if self.kind == KIND_CLUSTER and self.metadata.namespace is not None:
            raise ValueError("metadata.namespace: a TracingPolicy is clusterwide (no namespace)")
        if self.kind == KIND_CLUSTER and self.spec.podSelector is not None:
            raise ValueError("spec.podSelector: only a TracingPolicyNamespaced selects pods")
        return self

    @property
    def namespace(self) -> str | None:
        if self.kind == KIND_NAMESPACED:
            return self.metadata.namespace or "default"
        return None

    @property
    def key(self) -> str:
        """How `policy list` and `policy delete` name it: NAME, or NS/NAME."""
        ns = self.namespace
        return f"{ns}/{self.metadata.name}" if ns else self.metadata.name
