"""Labels, identities and label selectors (Cilium's label model)."""

from membrane.identity.labels import (
    RESERVED_LABELS,
    Label,
    cidr_identity_labels,
    endpoint_labels,
)
from membrane.identity.selector import LabelSelector, Requirement

__all__ = [
    "RESERVED_LABELS",
    "Label",
    "LabelSelector",
    "Requirement",
    "cidr_identity_labels",
    "endpoint_labels",
]
