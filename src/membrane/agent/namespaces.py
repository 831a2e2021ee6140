"""Namespaces and their labels. Kubernetes `namespaceSelector`s and Cilium's
`io.cilium.k8s.namespace.labels.*` match them, so a label change moves every pod of the
namespace to another identity."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from membrane.errors import UserError

NAME_LABEL = "kubernetes.io/metadata.name"  # set on every namespace, as Kubernetes does


class NamespaceStore:
    """The labels users gave namespaces (the agent's state owns the dictionary)."""

    def __init__(self, stored: dict[str, dict[str, str]]) -> None:
        self._stored = stored

    def labels(self, namespace: str) -> dict[str, str]:
        labels = dict(self._stored.get(namespace, {}))
        labels[NAME_LABEL] = namespace
        return labels

    def all_labels(self, in_use: Iterable[str]) -> dict[str, Mapping[str, str]]:
        """Every namespace that has labels or endpoints (`in_use`), with its labels."""
        names = set(self._stored) | set(in_use)
        return {ns: self.labels(ns) for ns in sorted(names)}

    def change(self, namespace: str, changes: Mapping[str, str | None]) -> None:
        """Set labels; a None value removes one. Checks before it changes anything."""
        if NAME_LABEL in changes:
            raise UserError(f"labels.{NAME_LABEL}", "is set by the agent and cannot change")
        labels = dict(self._stored.get(namespace, {}))
        for key, value in changes.items():
            if value is None:
                labels.pop(key, None)
            else:
                labels[key] = value
        self._stored[namespace] = labels

    def restore(self, namespace: str, labels: dict[str, str] | None) -> None:
        """Undo a change that could not be enforced."""
        if labels is None:
            self._stored.pop(namespace, None)
        else:
            self._stored[namespace] = labels

    def stored(self, namespace: str) -> dict[str, str] | None:
        found = self._stored.get(namespace)
        return None if found is None else dict(found)
