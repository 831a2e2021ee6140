"""The BPF loader: a thin typed ctypes layer over the system libbpf.so.1."""

from membrane.bpf.btf import Btf
from membrane.bpf.errors import AttachError, BpfError, LoadError
from membrane.bpf.links import Link
from membrane.bpf.maps import Map
from membrane.bpf.object import BpfObject, Program
from membrane.bpf.testrun import TestRunResult, test_run

__all__ = [
    "AttachError",
    "BpfError",
    "BpfObject",
    "Btf",
    "Link",
    "LoadError",
    "Map",
    "Program",
    "TestRunResult",
    "test_run",
]
