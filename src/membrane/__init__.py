"""Membrane: eBPF networking, security and observability for Linux containers."""

__version__ = "0.1.0"
