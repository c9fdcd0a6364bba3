"""A real three-node RabbitMQ cluster for the whole session (quorum mode's tests).

Three new nodes (never the machine's ``rabbit@localhost``) with their own names, ports and data
under a temporary directory, booted in parallel and joined; killed by their process groups
and deleted at the end of the session, whatever happened. Skipped where nodes cannot be
started (no server, not root nor the ``rabbitmq`` user).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from worker.tooling.cluster import LocalCluster, available

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
async def cluster() -> AsyncIterator[LocalCluster]:
    reason = available()
    if reason is not None:
        pytest.skip(f"no local RabbitMQ cluster: {reason}")
    running = LocalCluster(prefix=f"nw{uuid.uuid4().hex[:4]}n")
    try:
        await running.start()
        print(f"\n[cluster] {len(running.nodes)} nodes up in {running.start_seconds:.1f} s")
        yield running
    finally:
        await running.close()
