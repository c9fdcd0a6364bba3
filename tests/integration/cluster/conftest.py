"""A real three-node RabbitMQ cluster for the whole session, and quorum mode's fixtures.

Three new nodes (never the machine's ``rabbit@localhost``) with their own names, ports and data
under a temporary directory, booted in parallel and joined; killed by their process groups
and deleted at the end of the session, whatever happened. Skipped where nodes cannot be
started (no server, not root nor the ``rabbitmq`` user).

``harness`` here is the outcome suite's harness (``tests/integration/conftest.py``) on the
cluster in quorum mode, with every node in ``WORKER_AMQP_URL``.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aio_pika.abc import AbstractConnection

from worker.broker import connect_first
from worker.tooling.cluster import LocalCluster, available
from worker.tooling.demo_provider import DemoProvider

from ..conftest import Harness, running_harness
from ..faults.conftest import Fleet, running_fleet

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


@pytest.fixture
async def amqp(cluster: LocalCluster) -> AsyncIterator[AbstractConnection]:
    """The test's own connection, to the first node that answers."""
    connection = await connect_first(cluster.urls)
    yield connection
    await connection.close()


@pytest.fixture
async def harness(
    cluster: LocalCluster, database_url: str, provider: DemoProvider, amqp: AbstractConnection
) -> AsyncIterator[Harness]:
    async with running_harness(
        database_url, provider, amqp, amqp_url=cluster.amqp_url, queue_type="quorum"
    ) as running:
        yield running


@pytest.fixture
async def cluster_fleet(
    request: pytest.FixtureRequest, cluster: LocalCluster, database_url: str, tmp_path: Path
) -> AsyncIterator[Fleet]:
    """The fault suite's fleet of real ``worker run`` processes, in quorum mode on every node
    of the cluster; a node a test killed is booted again afterwards."""
    try:
        async with running_fleet(
            request.node.name,
            database_url,
            tmp_path,
            amqp_url=cluster.amqp_url,
            WORKER_QUEUE_TYPE="quorum",
        ) as running:
            yield running
    finally:
        await cluster.ensure_running()
