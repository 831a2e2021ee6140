"""Containers a runtime made, networked by Membrane through the CNI: the `membrane-cni`
plugin (native/cni_plugin.c, a thin client compiled by `make`), the agent's side of its
calls (service.py), what podman knows of a container (podman.py over boltdb.py), and
installing it all (install.py)."""
