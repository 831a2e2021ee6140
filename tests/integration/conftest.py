"""Integration fixtures shared across modules: the standard policy-test cluster
(agent_support.shared_cluster_fixture) is built once per session and torn down here."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from agent_support import destroy_shared_clusters


@pytest.fixture(scope="session", autouse=True)
def _shared_agent_clusters() -> Iterator[None]:
    yield
    destroy_shared_clusters()
